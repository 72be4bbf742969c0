"""fast_infer.py with --tiny: ALP and the distillation-LoRA fast path end to end, and its flag policy.

The runs call ``main()`` in-process (one import of the package for all of them) at small output sizes; the
real-clip case uses the first 25 frames of ``d0.mp4`` (skipped without ../shared).
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

import fast_infer
from flashportrait.args import resolve_alp
from flashportrait.cli import run_main
from flashportrait.video_io import probe_video

from .test_infer import expected_output_frames

LINE = re.compile(r"model evaluations: (\d+(?:\.\d)?) of (\d+) \((\d+\.\d)x fewer\)")


def _run(capsys, *argv):
    out = fast_infer.main(fast_infer.parse_args(["--tiny", *argv]))
    printed = capsys.readouterr().out
    match = LINE.search(printed)
    assert match, printed
    made, full, ratio = float(match[1]), int(match[2]), float(match[3])
    assert ratio == pytest.approx(full / made, abs=0.05)
    return out, made, full


def test_fast_infer_on_a_real_driving_clip(examples_dir, tmp_path, capsys):
    """The first 25 frames of d0.mp4 (the run extracts their expression features into the session's cache
    folder, never into ../shared): the same kind of video as ``infer.py --tiny`` writes, and the line."""
    driving = examples_dir / "driving" / "d0.mp4"
    source = probe_video(driving)
    frames = 25
    assert source.num_frames > frames
    out_path = tmp_path / "fast.mp4"
    out, made, full = _run(capsys, "--reference_image", str(examples_dir / "case-1" / "reference.png"),
                           "--driving_video", str(driving), "--output", str(out_path), "--max_size", "32",
                           "--num_inference_steps", "5", "--max_frames", str(frames))
    info = probe_video(out_path)
    assert info.num_frames == out.num_frames == expected_output_frames(frames)  # what infer.py --tiny writes
    assert info.fps == pytest.approx(source.fps)
    windows = full // 5
    assert windows > 1 and made == 2 * windows  # the default budget: warm-up + 1 of 5 steps, every window


def test_alp_lora_and_plain_runs_on_the_demo_inputs(tmp_path, capsys):
    common = ["--max_size", "32", "--max_frames", "13"]  # 13 frames -> 4 latent frames, one window
    alp, made, full = _run(capsys, *common, "--num_inference_steps", "5", "--alp_budget", "2",
                           "--output", str(tmp_path / "alp.mp4"))
    assert (made, full) == (2, 5)
    plain, made, full = _run(capsys, *common, "--num_inference_steps", "3", "--no_alp",
                             "--output", str(tmp_path / "plain.mp4"))
    assert (made, full) == (3, 3)
    assert probe_video(tmp_path / "alp.mp4").num_frames == probe_video(tmp_path / "plain.mp4").num_frames == 12

    # the released fast path with a LoRA file in the released key format (rank 4, on two attention layers)
    g = torch.Generator().manual_seed(0)
    lora = {f"diffusion_model.blocks.{b}.self_attn.{p}.lora_{kind}.weight":
            torch.randn((64, 4) if kind == "up" else (4, 64), generator=g) * 0.05
            for b in (0, 1) for p in ("q", "o") for kind in ("up", "down")}
    lora_path = tmp_path / "fast_lora_rank64.safetensors"
    save_file(lora, str(lora_path))
    fast, made, full = _run(capsys, *common, "--step_distill_lora", str(lora_path), "--output", str(tmp_path / "lora.mp4"))
    assert (made, full) == (4, 4)  # the 4 distilled steps, each evaluated
    assert probe_video(tmp_path / "lora.mp4").num_frames == 12


@pytest.mark.parametrize("granularity", ["latent", "window", "branch"])
def test_every_alp_granularity_runs_through_the_pipeline(tmp_path, capsys, granularity):
    """The pipeline's model callable (progress bar around the WindowDenoiser) keeps ``branch_outputs`` /
    ``combine``, which the per-branch forecasts need."""
    out, made, full = _run(capsys, "--max_size", "32", "--max_frames", "13", "--num_inference_steps", "5",
                           "--alp_budget", "2", "--alp_granularity", granularity, "--output", str(tmp_path / "o.mp4"))
    assert (made, full) == (2, 5) and out.num_frames == 12


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--step_distill_lora", "x.safetensors", "--alp_budget", "4"], "does not combine with --alp_budget"),
        (["--lora_scale", "0.5"], "--lora_scale needs --step_distill_lora"),
        (["--alp_alpha", "1.0"], "add --alp_mode paper"),
        (["--alp_interval", "5", "--alp_budget", "6"], "at most one"),
        (["--no_alp", "--alp_order", "1"], "--no_alp contradicts --alp_order"),
    ],
)
def test_contradicting_acceleration_flags_are_refused(argv, message):
    with pytest.raises(ValueError, match=re.escape(message) if "--" in message else message):
        resolve_alp(fast_infer.parse_args(["--tiny", *argv]))


def test_lora_settings_are_checked_before_models_load(tmp_path, capsys):
    missing = tmp_path / "absent.safetensors"
    code = run_main(fast_infer.main, fast_infer.parse_args(["--tiny", "--step_distill_lora", str(missing),
                                                            "--output", str(tmp_path / "o.mp4")]))
    assert code == 2 and "no such file" in capsys.readouterr().err
    present = tmp_path / "lora.safetensors"
    save_file({"blocks.0.self_attn.q.diff": torch.zeros(64, 64)}, str(present))
    for extra, text in ((["--num_inference_steps", "8"], "4 distilled steps"), (["--sampler", "unipc"], "euler"),
                        (["--shift", "3"], "shift 5")):
        code = run_main(fast_infer.main, fast_infer.parse_args(["--tiny", "--step_distill_lora", str(present),
                                                                "--output", str(tmp_path / "o.mp4"), *extra]))
        assert code == 2 and text in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
