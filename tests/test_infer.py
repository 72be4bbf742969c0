"""infer.py end to end with --tiny: the acceptance cases of the main job.

The synthetic case runs the command as a user would (``python infer.py --tiny --reference_image ...
--driving_video ... --output out.mp4``); the others call ``main(parse_args(argv))`` in this process (the same
code after parsing, without re-importing torch and diffusers). Each checks the written file: frame count = driving frames used
(the largest 4k+1) minus the reference slot, the driving clip's frame rate, and an AAC track cut to the
output's length when the driving clip has audio. The clips' expression features are extracted once per
session (``real_clip_features`` in conftest) and loaded from the session cache by the runs; the long clip
(d6, 1008 frames) runs ``main()`` in-process at a small output size.
"""

from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest

from flashportrait.video_io import StreamingVideoWriter, probe_video

from .conftest import REPO_ROOT


def run_infer(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "infer.py", "--tiny", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def infer_in_process(*args: str):
    """``infer.py --tiny ARGS`` as ``main(parse_args(...))`` in this process: the same code path after argument
    parsing, without the ~15 s of importing torch and diffusers again that a subprocess costs."""
    import infer

    return infer.main(infer.parse_args(["--tiny", *args]))


def audio_streams(path) -> list[tuple[str, float]]:
    with av.open(str(path)) as container:
        return [(s.codec_context.name, float(s.duration * s.time_base)) for s in container.streams.audio]


def expected_output_frames(num_driving_frames: int) -> int:
    used = num_driving_frames - (num_driving_frames - 1) % 4  # largest 4k + 1 <= N
    return used - 1  # the reference slot is dropped


@pytest.mark.parametrize(
    ("clip", "fps", "frames", "has_audio"),
    [("d11.mp4", 25, 225, True), ("d0.mp4", 25, 78, False), ("d6.mp4", 30, 1008, True)],
)
def test_infer_on_real_driving_clips(examples_dir, real_clip_features, tmp_path, clip, fps, frames, has_audio):
    driving = examples_dir / "driving" / clip
    source = probe_video(driving)
    assert (source.num_frames, round(source.fps), source.has_audio) == (frames, fps, has_audio)
    assert len(real_clip_features(f"driving/{clip}")) == frames  # extracted once, cached for the run below
    out = tmp_path / "out.mp4"
    args = ["--reference_image", str(examples_dir / "case-1" / "reference.png"), "--driving_video", str(driving),
            "--output", str(out)]
    if frames > 500:  # the long clip: 32 px output, 21-frame windows (14 windows per step)
        args += ["--max_size", "32", "--context_size", "21", "--context_overlap", "4"]
    infer_in_process(*args)
    info = probe_video(out)
    num_out = expected_output_frames(frames)
    assert info.num_frames == num_out
    assert info.fps == pytest.approx(source.fps)
    audio = audio_streams(out)
    if has_audio:
        assert len(audio) == 1 and audio[0][0] == "aac"
        assert audio[0][1] == pytest.approx(num_out / source.fps, abs=0.1)
    else:
        assert audio == []
    assert not list(tmp_path.glob(".*partial*")), "temporary files left behind"


def test_infer_synthetic_clip_with_audio_and_fps_override(tmp_path):
    """Always runs: the demo portrait and a driving clip made from it, with a tone as its audio; the first run is
    the command a user types (a subprocess), the second the same code in this process."""
    from PIL import Image

    from flashportrait.demo import demo_driving_frames, demo_reference_image

    reference = tmp_path / "ref.png"
    Image.fromarray(demo_reference_image()).save(reference)
    driving = tmp_path / "drive.mp4"
    tone = tmp_path / "tone.wav"
    _write_tone(tone, seconds=2.0)
    with StreamingVideoWriter(driving, 25, audio_source=tone, audio_duration_s=23 / 25) as writer:
        writer.write(demo_driving_frames(23))  # 23 frames -> 21 used -> 20 output frames
    out = tmp_path / "out.mp4"
    run_infer("--validation_image_start", str(reference), "--validation_driven_video_path", str(driving),
              "--output", str(out), "--context_size", "3", "--context_overlap", "1")
    info = probe_video(out)
    assert info.num_frames == 20 and info.fps == pytest.approx(25)
    assert audio_streams(out)[0][0] == "aac"

    # --fps resamples the driving clip by time: 23 frames at 25 fps = 0.92 s -> 11 frames at 12 fps
    out12 = tmp_path / "out12.mp4"
    infer_in_process("--reference_image", str(reference), "--driving_video", str(driving), "--output", str(out12),
                     "--fps", "12")
    info12 = probe_video(out12)
    assert info12.fps == pytest.approx(12) and info12.num_frames == expected_output_frames(11)


def test_infer_refuses_contradicting_window_flags(tmp_path):
    result = subprocess.run(
        [sys.executable, "infer.py", "--tiny", "--sub_num_frames", "81", "--latents_num_frames", "11",
         "--output", str(tmp_path / "x.mp4")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "sub_num_frames" in result.stderr and "latents_num_frames" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.mp4").exists()


def _write_tone(path, seconds: float, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
