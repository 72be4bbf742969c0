"""The web demo's events without a browser (flashportrait.app_logic, app.py's flags and page).

Tiny random-weight pipeline, a 9-frame 128x128 driving clip with audio, 32-pixel output, 2 steps, windows of
2 latent frames: the whole module takes about 20 s on 2 CPU cores (most of it Gradio's import and the first
run's warm-up).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from flashportrait.app_logic import ADVANCED_FIELDS, AppLimits, DemoApp, JobSettings, user_message
from flashportrait.video_io import probe_video

#: the run settings of these tests: output frames = 9 driving frames -> 9 used -> 8 output frames at 25 fps
TINY_FLAGS = ["--tiny", "--max_size", "32", "--num_inference_steps", "2", "--context_size", "2",
              "--context_overlap", "1"]
FPS = 25


# --- media the tests upload (also used by test_app_browser.py) ------------------------------------------


def write_clip(path: Path, frames: np.ndarray, fps: int = FPS, audio: bool = True, rate: int = 16000) -> Path:
    """An H.264 MP4 of ``frames`` (uint8 [T, H, W, 3]) with, if ``audio``, a 440 Hz AAC tone as long as it."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = None
        if audio:
            sound = out.add_stream("aac", rate=rate)
            sound.layout = "mono"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if sound is not None:
            n = int(len(frames) / fps * rate) + 1024
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)
            for start in range(0, n, 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[None, start:start + 1024]), format="fltp",
                                                   layout="mono")
                chunk.sample_rate, chunk.pts = rate, start
                for packet in sound.encode(chunk):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
    return path


def make_media(folder: Path) -> dict[str, Path]:
    """portrait.png (the demo astronaut, 256 px), talk.mp4 (9 frames of the demo head motion, 128 px, with
    audio), noface.mp4 (9 frames of colour gradients), short.mp4 (3 frames), broken.mp4 (not a video),
    small.png (64 px)."""
    from flashportrait.demo import demo_driving_frames, demo_reference_image

    folder.mkdir(parents=True, exist_ok=True)
    files = {"reference": folder / "portrait.png", "small": folder / "small.png", "broken": folder / "broken.mp4"}
    Image.fromarray(demo_reference_image()).resize((256, 256), Image.LANCZOS).save(files["reference"])
    Image.fromarray(demo_reference_image()).resize((64, 64), Image.LANCZOS).save(files["small"])
    files["broken"].write_bytes(b"this is not a video\n" * 50)
    talk = demo_driving_frames(9, size=128)
    files["talk"] = write_clip(folder / "talk.mp4", talk)
    files["short"] = write_clip(folder / "short.mp4", talk[:3], audio=False)
    yy, xx = np.mgrid[:64, :64]
    gradients = np.stack([np.stack([(xx * 4 + 8 * i) % 256, yy * 4, np.full_like(xx, 128)], -1) for i in range(9)])
    files["noface"] = write_clip(folder / "noface.mp4", gradients.astype(np.uint8), audio=False)
    return files


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    return make_media(tmp_path_factory.mktemp("app-media"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoApp:
    import app as app_script
    from flashportrait.factory import tiny_pipeline

    root = tmp_path_factory.mktemp("app")
    args = app_script.parse_args(TINY_FLAGS)
    return DemoApp(tiny_pipeline(args.seed), args, outputs_dir=root / "outputs", upload_root=root / "uploads",
                   model_description="tiny")


def upload(demo: DemoApp, source: Path, folder: str = "u1") -> str:
    """Copy ``source`` into the app's upload folder as Gradio does (``<root>/<hash>/<name>``)."""
    target = demo.upload_root / folder / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return str(target)


def values(demo: DemoApp, **changes) -> list:
    return JobSettings(**{**vars(demo.default_settings()), **changes}).values()


# --- settings ------------------------------------------------------------------------------------------


def test_page_settings_parse_and_contradictions_are_named():
    settings = JobSettings.from_values(["hi", "3", 5.0, 2, "4", 1, 7.0, "64", "unipc"])
    assert settings == JobSettings("hi", 3, 5, 2, 4.0, 1.0, 7, 64, "unipc")
    assert settings.values() == ["hi", 3, 5, 2, 4.0, 1.0, 7, 64, "unipc"]
    limits = AppLimits()
    with pytest.raises(ValueError, match=r"Window overlap \(5\) must be smaller than the Window length \(5\)"):
        JobSettings("p", 2, 5, 5, 4.0, 1.0, 0, 64, "euler").check(limits)
    with pytest.raises(ValueError, match="Max size must be between 16 and 1280"):
        JobSettings("p", 2, 5, 1, 4.0, 1.0, 0, 2048, "euler").check(limits)
    with pytest.raises(ValueError, match="Sampler must be one of"):
        JobSettings("p", 2, 5, 1, 4.0, 1.0, 0, 64, "ddim").check(limits)
    with pytest.raises(ValueError, match="Sampling steps: expected a whole number"):
        JobSettings.from_values(["p", "two", 5, 1, 4, 1, 0, 64, "euler"])
    with pytest.raises(ValueError, match="Seed: expected a whole number"):
        JobSettings.from_values(["p", 2, 5, 1, 4, 1, 0.5, 64, "euler"])
    assert len(ADVANCED_FIELDS) == 9


def test_defaults_come_from_the_server_flags(demo):
    defaults = demo.default_settings()
    assert (defaults.num_inference_steps, defaults.context_size, defaults.context_overlap, defaults.max_size) == (2, 2, 1, 32)
    assert defaults.prompt == demo.args.prompt and defaults.sampler == "euler"


# --- preview -------------------------------------------------------------------------------------------


def test_preview_shows_the_aligned_driving_faces_and_what_will_be_made(demo, media):
    strip, info, status = demo.on_preview(str(media["reference"]), str(media["talk"]), *values(demo))
    assert status == "Preview ready."
    # 8 of the 9 frames' 224x224 crops, 96 px each, side by side; a face has structure (not a flat image)
    assert strip.dtype == np.uint8 and strip.shape == (96, 8 * 96, 3)
    assert strip.std() > 20
    assert "32x32 pixels" in info and "8 frames at 25 fps (0.32 s)" in info and "driving video's audio" in info
    assert "detected in 9 of 9 frames" in info
    assert "3 latent frames in 2 window(s) of 2 (overlap 1); 2 steps x 2 window(s) x 2 guidance pass(es)" in info
    # only one input yet: the part that can be shown, and what is missing
    strip, info, status = demo.on_preview(str(media["reference"]), None, *values(demo, max_size=64))
    assert strip is None and "64x64 pixels" in info and "upload a driving video" in status


@pytest.mark.parametrize(
    "image, video, message",
    [
        ("reference", "noface", "the driving video (noface.mp4): no face found in any of its 9 frames"),
        ("reference", "broken", "the driving video (broken.mp4): FFmpeg cannot open this file"),
        ("reference", "short", "the driving video (short.mp4) is too short: 3 frame(s); it needs at least 5 frames"),
        ("small", "talk", "the reference image (small.png) is only 64x64 pixels; use one whose shorter side is at least 128"),
    ],
)
def test_bad_inputs_are_readable_messages(demo, media, image, video, message):
    strip, info, status = demo.on_preview(upload(demo, media[image]), upload(demo, media[video]), *values(demo))
    assert strip is None and info == ""
    assert status.startswith("**Error:** ") and message in status
    assert str(demo.upload_root) not in status and "Traceback" not in status  # no server paths, no stack trace


def test_too_large_uploads_and_contradicting_settings_are_refused_before_a_run(demo, media, monkeypatch):
    image, video = upload(demo, media["reference"], "big"), upload(demo, media["talk"], "big")
    monkeypatch.setattr(demo, "limits", AppLimits(max_upload_bytes=5 * 2**10))
    out, files, status = demo.on_generate(image, video, *values(demo), session="s")
    size_kb = round(Path(image).stat().st_size / 2**10)
    assert out is None and files == []
    assert f"the reference image (portrait.png) is {size_kb} KB; this server accepts files up to 5 KB" in status
    monkeypatch.undo()
    out, files, status = demo.on_generate(image, video, *values(demo, context_overlap=2), session="s")
    assert "Window overlap (2) must be smaller than the Window length (2)" in status
    out, files, status = demo.on_generate(image, None, *values(demo), session="s")
    assert "upload a reference portrait and a driving video first" in status
    # refused before the run: the uploads stay for a corrected try
    assert Path(image).is_file() and Path(video).is_file()


def test_user_message_replaces_server_paths():
    error = ValueError("/tmp/gradio/ab/clip.mp4: no face found; see /tmp/gradio/ab/clip.mp4")
    assert user_message(error, {"/tmp/gradio/ab/clip.mp4": "the driving video (clip.mp4)"}) == (
        "the driving video (clip.mp4): no face found; see the driving video (clip.mp4)")


# --- runs ----------------------------------------------------------------------------------------------


def test_generate_writes_the_video_with_audio_and_its_settings_and_deletes_the_uploads(demo, media):
    image, video = upload(demo, media["reference"], "run"), upload(demo, media["talk"], "run")
    outside = media["talk"]  # a file outside the upload folder is never deleted
    demo.on_preview(image, video, *values(demo))  # the run reuses the preview's expression features
    reports: list[tuple[float, str]] = []
    out, files, status = demo.on_generate(image, video, *values(demo, seed=3), session="s",
                                          progress=lambda fraction, desc: reports.append((fraction, desc)))
    assert status.startswith("**Done:** 8 frames at 25 fps, 32x32, with audio"), status
    info = probe_video(out)
    assert (info.num_frames, info.fps, info.width, info.height, info.has_audio) == (8, FPS, 32, 32, True)
    assert Path(out).parent == demo.outputs_dir and files == [out, str(Path(out).with_suffix(".json"))]
    record = json.loads(Path(files[1]).read_text())
    assert record["settings"]["seed"] == 3 and record["settings"]["num_inference_steps"] == 2
    assert record["inputs"]["driving_video"] == "talk.mp4" and record["model"] == "tiny"
    assert record["output"] == {"file": Path(out).name, "frames": 8, "fps": 25.0, "width": 32, "height": 32,
                                "audio": True}
    assert record["plan"]["windows"] == 2 and record["plan"]["output_frames"] == 8
    # progress: never backwards, every window of every step, then decoding, then done; no second extraction
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    descs = [d for _, d in reports]
    for step in (1, 2):
        for window in (1, 2):
            assert f"Sampling: step {step}/2, window {window}/2" in descs
    assert "Decoding the video and adding the audio" in descs
    assert not any("face" in d for d in descs)
    # uploads deleted (with their folder); nothing else
    assert not Path(image).exists() and not Path(video).exists() and not (demo.upload_root / "run").exists()
    assert outside.is_file() and demo._features is None
    assert "progress_bar" not in vars(demo.pipe)  # diffusers' own bar is back


def test_failed_run_is_a_message_and_the_app_keeps_serving(demo, media, monkeypatch):
    image, video = upload(demo, media["reference"], "fail"), upload(demo, media["noface"], "fail")
    out, files, status = demo.on_generate(image, video, *values(demo), session="s")
    assert out is None and "no face found" in status and "Traceback" not in status
    assert not Path(video).exists()  # the run started: its uploads are deleted too
    # a bug is logged on the server; the page gets one line
    image, video = upload(demo, media["reference"], "bug"), upload(demo, media["talk"], "bug")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(demo, "_run", broken)
    out, files, status = demo.on_generate(image, video, *values(demo), session="s")
    assert status == "**Error:** internal error during the run (details in the server log)."
    assert demo._job is None and not demo._gpu.locked()


def test_cancel_stops_at_the_next_step_frees_and_only_touches_its_own_session(demo, media, monkeypatch):
    image, video = upload(demo, media["reference"], "cancel"), upload(demo, media["talk"], "cancel")
    freed = []
    original_free = demo._free_memory
    monkeypatch.setattr(demo, "_free_memory", lambda: (freed.append(True), original_free()))
    answers = {}

    def progress(fraction, desc):
        if desc == "Sampling: step 1/4, window 2/2":  # during step 1: another session cannot stop this run
            answers["other"] = demo.on_cancel("other", wait_s=0)
        if desc.startswith("Sampling: step 2/4") and "own" not in answers:  # step 1 done: cancel
            answers["own"] = demo.on_cancel("s", wait_s=0)

    out, files, status = demo.on_generate(image, video, *values(demo, num_inference_steps=4), session="s",
                                          progress=progress)
    assert answers == {"other": "Nothing to cancel.", "own": "Stopping at the end of the current sampling step..."}
    assert out is None and files == []
    assert status == ("**Cancelled:** stopped after 1 of 4 sampling steps; nothing was written and the memory "
                      "was freed.")
    assert freed and list(demo.outputs_dir.glob("*.partial*")) == [] and not Path(video).exists()
    assert demo._job is None and "progress_bar" not in vars(demo.pipe)

    # a queued run of a session that pressed cancel does not start
    assert demo.on_begin("q") == "Starting..."
    assert demo.on_cancel("q") == "**Cancelled:** your run will not start."
    assert demo.on_generate(None, None, *values(demo), session="q")[2] == (
        "**Cancelled:** the run was cancelled before it started.")
    # and the next run of that session runs
    demo.on_begin("q")
    assert "upload a reference portrait" in demo.on_generate(None, None, *values(demo), session="q")[2]


def test_cancel_from_another_thread_waits_for_the_stop(demo, media):
    image, video = upload(demo, media["reference"], "wait"), upload(demo, media["talk"], "wait")
    started = threading.Event()
    result = {}

    def progress(fraction, desc):
        if desc.startswith("Sampling"):
            started.set()

    worker = threading.Thread(target=lambda: result.setdefault("out", demo.on_generate(
        image, video, *values(demo, num_inference_steps=50), session="t", progress=progress)))
    worker.start()
    assert started.wait(60)
    message = demo.on_cancel("t", wait_s=60)
    worker.join(60)
    assert message.startswith("**Cancelled:** stopped after") and result["out"][2] == message
    steps_done = int(message.split("after ")[1].split(" of")[0])
    assert steps_done < 50


def test_delete_uploads_only_inside_the_upload_folder(demo, tmp_path):
    inside = Path(upload(demo, Path(__file__), "del"))
    outside = tmp_path / "keep.txt"
    outside.write_text("keep")
    assert demo.delete_uploads([str(inside), str(outside), None]) == [inside.resolve()]
    assert not inside.exists() and not inside.parent.exists() and demo.upload_root.is_dir() and outside.exists()


# --- app.py --------------------------------------------------------------------------------------------


def test_app_flags_are_infer_flags_plus_the_server(tmp_path):
    import app as app_script

    args = app_script.parse_args(["--tiny"])
    assert (args.host, args.port, args.share, args.fast, args.save_path) == ("127.0.0.1", 7860, False, False, "outputs")
    args = app_script.parse_args(["--tiny", "--context_size", "3", "--GPU_memory_mode", "model_full_load",
                                  "--emo_cfg_scale", "3", "--share", "--port", "9000"])
    assert (args.context_size, args.emo_cfg_scale, args.share, args.port) == (3, 3.0, True, 9000)
    with pytest.raises(ValueError, match="app.py writes one file per run into --save_path"):
        app_script.check_start_inputs(app_script.parse_args(["--tiny", "--output", "x.mp4"]))
    from flashportrait.alp import ALPConfig

    fast = app_script.parse_args(["--tiny", "--fast"])
    assert app_script.fast_call_kwargs(fast) == {"alp": ALPConfig()}


def test_page_builds_with_one_job_at_a_time(demo, media):
    import app as app_script

    page = app_script.build_page(demo, [[str(media["reference"]), str(media["talk"])]], tiny=True)
    config = page.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert set(app_script.ELEM_IDS) <= ids
    runs = [fn for fn in page.fns.values() if getattr(fn.fn, "__name__", "") in ("on_generate", "on_preview")]
    assert len(runs) == 4  # generate + preview on three triggers
    assert all(fn.concurrency_limit == 1 and fn.concurrency_id == "gpu" for fn in runs)
    cancel = next(fn for fn in page.fns.values() if getattr(fn.fn, "__name__", "") == "on_cancel")
    assert not cancel.queue  # cancel never waits behind the job it stops


def test_fast_app_samples_with_alp_and_records_it(media, tmp_path):
    """``app.py --fast``: every run passes ``alp=ALPConfig()`` to the pipeline (fewer transformer calls than steps x
    windows) and the settings JSON records the ALP configuration."""
    import app as app_script
    from flashportrait.alp import ALPConfig
    from flashportrait.factory import tiny_pipeline

    args = app_script.parse_args([*TINY_FLAGS, "--fast"])
    pipe = tiny_pipeline(args.seed)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    fast = DemoApp(pipe, args, outputs_dir=tmp_path / "outputs", upload_root=tmp_path / "uploads",
                   model_description="tiny", call_kwargs=app_script.fast_call_kwargs(args))
    image, video = upload(fast, media["reference"], "f"), upload(fast, media["talk"], "f")
    out, files, status = fast.on_generate(image, video, *values(fast, num_inference_steps=6), session="f",
                                          progress=lambda fraction, desc: None)
    assert status.startswith("**Done:**"), status
    record = json.loads(Path(files[1]).read_text())
    assert record["settings"]["alp"]["importance"] == ALPConfig().importance  # the shipped defaults
    assert 0 < len(calls) < 6 * record["plan"]["windows"]  # a full run calls the transformer once per window-step
