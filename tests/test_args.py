"""Command-line flags and their policy (flashportrait.args), shared by infer.py, fast_infer.py and app.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flashportrait.args import make_parser, resolve_context_size, resolve_settings

from .conftest import REPO_ROOT


def parse(*argv: str):
    return make_parser("test").parse_args(list(argv))


def test_authors_flag_names_and_aliases():
    args = parse("--validation_image_start", "a.png", "--driving_video", "b.mp4", "--tiny")
    assert args.reference_image == "a.png" and args.driving_video == "b.mp4" and args.tiny


@pytest.mark.parametrize(
    "argv",
    [
        ("--num_inference_steps", "0"),
        ("--max_size", "0"),
        ("--max_frames", "0"),
        ("--context_size", "0"),
        ("--context_overlap", "-1"),
        ("--emo_cfg_scale", "-1"),
        ("--text_cfg_scale", "nan"),
        ("--fps", "0"),
        ("--shift", "0"),
        ("--decode_chunk_size", "0"),
    ],
)
def test_out_of_range_values_are_refused_not_replaced_by_defaults(argv, capsys):
    """Zero used to mean "default" (``x or DEFAULT``): 0 steps ran 30, --max_size 0 rendered 720."""
    with pytest.raises(SystemExit) as info:
        parse("--tiny", *argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_tiny_defaults_fill_only_unset_flags():
    s = resolve_settings(parse("--tiny"))
    assert (s.num_inference_steps, s.max_size, s.context_size, s.context_overlap) == (4, 64, 5, 2)
    s = resolve_settings(parse("--tiny", "--num_inference_steps", "1", "--sub_num_frames", "81"))
    assert (s.num_inference_steps, s.context_size, s.context_overlap) == (1, 21, 2)
    s = resolve_settings(parse("--tiny", "--context_size", "2"))
    assert s.context_overlap == 1  # the tiny overlap never reaches the window length
    assert s.device == torch.device("cpu") and s.dtype == torch.float32


def test_released_defaults_without_tiny(tmp_path):
    s = resolve_settings(parse("--wan_model_name", "w", "--portrait_encoder_path", "p", "--pd_fpg_model_path", "d"))
    assert (s.num_inference_steps, s.max_size, s.context_size, s.context_overlap) == (30, 720, 51, 30)
    s = resolve_settings(parse("--tiny", "--context_size", "21", "--context_overlap", "20"))
    assert s.context_overlap == 20
    with pytest.raises(ValueError, match="--context_overlap 21 must be smaller"):
        resolve_settings(parse("--tiny", "--context_size", "21", "--context_overlap", "21"))


def test_cache_dir_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("FLASHPORTRAIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_settings(parse("--tiny")).cache_dir == tmp_path / "xdg" / "flashportrait"
    assert resolve_settings(parse("--tiny", "--cache_dir", str(tmp_path / "c"))).cache_dir == tmp_path / "c"


def test_max_size_above_the_released_sizes_needs_a_flag():
    with pytest.raises(ValueError, match="--allow_large_size"):
        resolve_settings(parse("--tiny", "--max_size", "5000"))
    assert resolve_settings(parse("--tiny", "--max_size", "1280")).max_size == 1280
    assert resolve_settings(parse("--tiny", "--max_size", "2048", "--allow_large_size")).max_size == 2048


def test_missing_checkpoint_flags_name_them():
    with pytest.raises(ValueError, match="missing --wan_model_name, --portrait_encoder_path, --pd_fpg_model_path"):
        resolve_settings(parse())
    with pytest.raises(ValueError, match="float16 is not usable on the CPU"):
        resolve_settings(parse("--tiny", "--dtype", "fp16", "--device", "cpu"))


def test_resolve_context_size():
    assert resolve_context_size() == 51
    assert resolve_context_size(default=5) == 5
    assert resolve_context_size(sub_num_frames=81) == 21
    assert resolve_context_size(context_size=51, sub_num_frames=201, latents_num_frames=51) == 51
    with pytest.raises(ValueError, match="contradicting.*sub_num_frames 81.*context_size 51"):
        resolve_context_size(context_size=51, sub_num_frames=81)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        resolve_context_size(sub_num_frames=80)
    with pytest.raises(ValueError, match="latents_num_frames"):
        resolve_context_size(latents_num_frames=0)


def test_infer_without_checkpoints_or_tiny_is_a_one_line_error(tmp_path):
    """No checkpoint flags and no --tiny used to exit 1 without the ``error:`` prefix."""
    result = subprocess.run([sys.executable, "infer.py", "--reference_image", "a.png", "--driving_video", "b.mp4"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: missing --wan_model_name") and "Traceback" not in result.stderr


def test_face_tracker_models_from_flags_or_next_to_pd_fpg(tmp_path):
    from flashportrait.args import find_face_tracker_models

    pd_fpg = tmp_path / "FlashPortrait" / "pd_fpg.pth"
    pd_fpg.parent.mkdir()
    pd_fpg.write_bytes(b"x")
    assert find_face_tracker_models(str(pd_fpg), None, None) is None  # bundled detector
    for name in ("face_det.onnx", "face_landmark.onnx"):
        (pd_fpg.parent / name).write_bytes(b"x")
    assert find_face_tracker_models(str(pd_fpg), None, None) == (pd_fpg.parent / "face_det.onnx",
                                                                  pd_fpg.parent / "face_landmark.onnx")
    with pytest.raises(ValueError, match="give both"):
        find_face_tracker_models(None, str(pd_fpg.parent / "face_det.onnx"), None)
    with pytest.raises(ValueError, match="no such file"):
        find_face_tracker_models(None, str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"))
    s = resolve_settings(parse("--tiny", "--det_model_path", str(pd_fpg.parent / "face_det.onnx"),
                               "--alignment_model_path", str(pd_fpg.parent / "face_landmark.onnx")))
    assert s.face_tracker_models is not None
