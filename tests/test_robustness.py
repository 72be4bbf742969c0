"""What users actually feed the tool: phone photos, 16-bit and transparent images, truncated downloads,
unwritable folders, corrupt checkpoints, tiny faces, and interrupted runs."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from flashportrait.checkpoints import CheckpointError, read_state_dict
from flashportrait.cli import run_main
from flashportrait.reference_image import REFERENCE_BACKGROUND, ImageReadError, load_reference_image
from flashportrait.video_io import StreamingVideoWriter, VideoReadError

from .conftest import REPO_ROOT

# --- images ---------------------------------------------------------------------------------------------


def _landscape() -> np.ndarray:
    """uint8 [40, 60, 3]: red on the left half, blue on the right (so a rotation is visible)."""
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30, 0] = 255
    img[:, 30:, 2] = 255
    return img


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with an orientation tag comes out upright (tag 6: rotate 90 clockwise)."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_landscape()).save(path, exif=exif, quality=95)
    image = load_reference_image(path)
    assert image.size == (40, 60)  # width, height swapped
    upright = np.asarray(image).astype(int)
    assert upright[5, 20, 0] > 200 and upright[5, 20, 2] < 60  # stored left (red) is now on top
    assert upright[55, 20, 2] > 200 and upright[55, 20, 0] < 60
    # the pipeline sees the upright image too
    from flashportrait.pipeline import FlashPortraitPipeline  # noqa: F401 - uses load_reference_image

    assert load_reference_image(Image.open(path)).size == (40, 60)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_reference_image(path)).astype(int)
    assert rgb.shape == (32, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 257.0), atol=1)  # not a white blob
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and (rgb[..., 0] == rgb[..., 2]).all()


def test_transparency_is_composited_onto_the_documented_background(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # hidden red everywhere
    rgba[:, :4, 3] = 0  # fully transparent left half
    rgba[:, 4:, 3] = 255
    rgba[0, 4, 3] = 128  # half transparent
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    rgb = np.asarray(load_reference_image(path)).astype(int)
    assert (rgb[:, :4] == REFERENCE_BACKGROUND).all()  # the hidden red never shows
    assert (rgb[1:, 4:] == (255, 0, 0)).all()
    assert abs(rgb[0, 4, 1] - 127) <= 1  # red over white at alpha 128
    assert (np.asarray(load_reference_image(rgba)) == rgb).all()  # arrays are composited the same way


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_reference_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "ref.png"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        content = buffer.getvalue()[:400]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="ref.png"):
        load_reference_image(path)
    with pytest.raises(ImageReadError, match="no such image"):
        load_reference_image(tmp_path / "missing.png")


# --- bad inputs are found before any expensive work ----------------------------------------------------------


def _demo_inputs(tmp_path):
    from flashportrait.demo import write_demo_inputs

    return write_demo_inputs(tmp_path / "demo", num_frames=9)


def _infer(*args, cwd=REPO_ROOT, timeout=300):
    return subprocess.run([sys.executable, "infer.py", "--tiny", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_inputs_fail_before_any_model_or_extraction(tmp_path):
    """An unreadable reference, an unwritable output folder or a truncated driving video used to be found only
    after the driving video was processed and sampled. Now infer.py stops before loading any model."""
    reference, driving = _demo_inputs(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    truncated = tmp_path / "truncated.mp4"
    with StreamingVideoWriter(tmp_path / "full.mp4", 25) as writer:
        writer.write(np.random.default_rng(0).integers(0, 255, (40, 64, 64, 3), dtype=np.uint8))
    data = (tmp_path / "full.mp4").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases = [
        (["--reference_image", str(broken), "--driving_video", str(driving), "--output", str(tmp_path / "a.mp4")],
         "broken.png"),
        (["--reference_image", str(reference), "--driving_video", str(driving), "--output", str(readonly / "a.mp4")],
         "not writable"),
        (["--reference_image", str(reference), "--driving_video", str(truncated), "--output", str(tmp_path / "b.mp4")],
         "truncated"),
    ]
    try:
        for argv, message in cases:
            result = _infer(*argv)
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
            assert "detect faces" not in result.stderr and "Traceback" not in result.stderr
    finally:
        readonly.chmod(0o755)
    assert not list(readonly.iterdir())
    assert not list((tmp_path.glob("*.expression-*")))


def test_pipeline_checks_audio_source_and_output_before_sampling(tmp_path):
    from flashportrait.config import EXPRESSION_DIM
    from flashportrait.factory import tiny_pipeline

    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    reference = np.zeros((32, 32, 3), np.uint8)
    features = torch.zeros(9, EXPRESSION_DIM)
    with pytest.raises(VideoReadError, match="missing.wav"):
        pipe(reference, expression_features=features, max_size=16, num_inference_steps=1,
             output_path=tmp_path / "o.mp4", output_type=None, audio_source=tmp_path / "missing.wav")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="output folder"):
        pipe(reference, expression_features=features, max_size=16, num_inference_steps=1,
             output_path=tmp_path / "file" / "o.mp4", output_type=None)
    assert calls == []


def test_huge_max_size_is_refused_before_allocating(tmp_path, caplog):
    from flashportrait.preflight import check_run_inputs

    reference, driving = _demo_inputs(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"needs about [\d.]+ GiB.*lower --max_size"):
        check_run_inputs(reference, driving, tmp_path / "o.mp4", max_size=40000, context_size=51, vae_base_dim=96)
    assert time.perf_counter() - start < 20  # an estimate, not an attempt


def test_reference_without_a_face_is_warned_about(tmp_path, caplog):
    from flashportrait.preflight import check_run_inputs

    _, driving = _demo_inputs(tmp_path)
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(flat)
    with caplog.at_level(logging.WARNING, logger="flashportrait.preflight"):
        check_run_inputs(flat, driving, tmp_path / "o.mp4", max_size=64, context_size=5, vae_base_dim=8)
    assert "no face found in the reference image" in caplog.text


def test_tiny_driving_face_is_warned_about(tmp_path, caplog):
    from flashportrait.expression import SMALL_FACE_PX, extract_expression_features

    from .test_expression import DotFaceDetector, TinyEncoder, synthetic_landmarks, write_synthetic_video

    small = synthetic_landmarks(6)
    small = (small - small.mean(axis=(0, 1))) * 0.6 + np.array([100, 80])  # a face box of ~30 px
    path = tmp_path / "far.mp4"
    write_synthetic_video(path, small)
    with caplog.at_level(logging.WARNING, logger="flashportrait.expression"):
        extract_expression_features(path, TinyEncoder(), detector=DotFaceDetector(), cache=False, progress=False)
    assert "pixels wide" in caplog.text and str(SMALL_FACE_PX) in caplog.text


# --- checkpoints ----------------------------------------------------------------------------------------------


def test_corrupt_checkpoints_say_what_is_wrong_without_unsafe_advice(tmp_path):
    empty = tmp_path / "transformer.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty \\(0 bytes\\).*Download it again"):
        read_state_dict(empty)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(50_000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:20_000])
    with pytest.raises(CheckpointError, match="corrupt or incomplete.*Download it again") as info:
        read_state_dict(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info2:
        read_state_dict(junk)
    for message in (str(info.value), str(info2.value)):
        assert "weights_only=False" not in message and "weights_only` set to `False" not in message


# --- interruptions -------------------------------------------------------------------------------------------


def test_sigterm_while_writing_removes_the_partial_video(tmp_path, capsys):
    out = tmp_path / "out.mp4"

    def main(_):
        with StreamingVideoWriter(out, 25) as writer:
            writer.write(np.zeros((3, 32, 32, 3), np.uint8))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this returns
            writer.write(np.zeros((3, 32, 32, 3), np.uint8))

    assert run_main(main, None) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # no hidden .out.XXXX.partial.mp4
    err = capsys.readouterr().err
    assert err.strip().startswith("terminated (SIGTERM)") and len(err.strip().splitlines()) == 1
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_infer_exits_cleanly(tmp_path, signum, code):
    """Ctrl-C / SIGTERM during sampling: one line, exit 130 / 143, no traceback, no temporary files."""
    reference, driving = _demo_inputs(tmp_path)
    out_dir = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "infer.py", "--tiny", "--reference_image", str(reference), "--driving_video", str(driving),
         "--output", str(out_dir / "o.mp4"), "--num_inference_steps", "200"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.time() + 240
        seen = ""
        while "inputs checked" not in seen and time.time() < deadline:  # preflight done, models loading
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        time.sleep(3)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, seen + err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("interrupted", "terminated"))
    assert not out_dir.exists() or list(out_dir.iterdir()) == []
