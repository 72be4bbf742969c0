"""Training end to end on this CPU: prepare_data on clips made here, ``accelerate launch`` with DeepSpeed ZeRO-2
(one process) and ZeRO-3 (two processes over gloo) on the tiny models, exact resume, conversion with
``bin_convert_pt.py``, strict loading with the inference loader, and sampling from the result.

Run time: about 1-2 minutes on 2 idle cores (4 launches, two at a time; the process start-up and imports
dominate, a tiny step takes ~0.3 s of CPU). DeepSpeed's op compiles are avoided (train_portrait.py:
no shm_comm op, torch AdamW), so no compiler runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import REPO_ROOT

pytest.importorskip("deepspeed")
pytest.importorskip("mediapipe")

NUM_FRAMES = 9  # video frames per training sample (3 latent frames)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_raw_clips(raw: Path) -> None:
    """A square talking clip, a landscape singing clip (the same face, padded), and a clip without a face."""
    from flashportrait.demo import demo_driving_frames
    from flashportrait.video_io import StreamingVideoWriter

    frames = demo_driving_frames(13, 64)
    wide = np.concatenate([np.repeat(frames[:, :, :1], 16, 2), frames, np.repeat(frames[:, :, -1:], 16, 2)], axis=2)
    noise = (np.random.default_rng(0).random((13, 64, 64, 3)) * 40 + 100).astype(np.uint8)
    for rel, clip in (("speech/square.mp4", frames), ("singing/wide.mp4", wide), ("speech/noface.mp4", noise)):
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        with StreamingVideoWriter(raw / rel, 25) as writer:
            writer.write(clip)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The training layout, written by prepare_data from the clips above."""
    from flashportrait.tools import prepare_data

    root = tmp_path_factory.mktemp("train")
    _write_raw_clips(root / "raw")
    prepare_data.main(prepare_data.parse_args([str(root / "raw"), str(root / "data"), "--tiny"]))
    return root


def _launch(config: str, processes: int, out: Path, data: Path, lists: list[str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{config}.yaml",
           "--num_processes", str(processes), "--main_process_port", str(_free_port()), "train_portrait.py", "--tiny",
           "--video_sample_n_frames", str(NUM_FRAMES), "--output_dir", str(out), "--mixed_precision", "no",
           "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--max_grad_norm", "1.0", "--motion_sub_loss",
           *[f"--train_data_{name}_dir={data / 'data'}" for name in lists], *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _fp32(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """Uninterrupted runs (ZeRO-2 on one clip, ZeRO-3 on both), then runs resumed from their middle checkpoints
    in fresh processes and output folders; two launches at a time."""
    out = tmp_path_factory.mktemp("runs")
    # one clip listed 4 times, 2 batches accumulated per step: 2 steps per epoch, so resuming at step 3 starts
    # inside an epoch (the data position is restored by skipping the batches already used)
    one_clip = ("--video_repeat", "4", "--gradient_accumulation_steps", "2")
    z2 = ("zero2", 1, out / "z2", dataset, ["square"], *one_clip, "--max_train_steps", "8", "--checkpointing_steps", "3")
    z3 = ("zero3", 2, out / "z3", dataset, ["square", "rec"], "--max_train_steps", "4", "--checkpointing_steps", "2")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda a: _launch(*a), [z2, z3]))
        resumed = [
            ("zero2", 1, out / "z2_resumed", dataset, ["square"], *one_clip, "--max_train_steps", "8",
             "--checkpointing_steps", "100", "--resume_from_checkpoint", str(out / "z2" / "checkpoint-3"),
             "--stop_at_step", "6"),
            ("zero3", 2, out / "z3_resumed", dataset, ["square", "rec"], "--max_train_steps", "4",
             "--checkpointing_steps", "100", "--resume_from_checkpoint", str(out / "z3" / "checkpoint-2")),
        ]
        list(pool.map(lambda a: _launch(*a), resumed))
    return out


def test_prepare_data_layout(dataset):
    data = dataset / "data"
    assert (data / "video_square_path.txt").read_text().split() == ["square/speech/speech__square"]
    assert (data / "video_rec_path.txt").read_text().split() == ["rec/singing/singing__wide"]
    assert (data / "video_vec_path.txt").read_text() == ""
    skipped = (data / "skipped.txt").read_text()
    assert "noface.mp4" in skipped and "square.mp4" not in skipped
    clip = data / "square/speech/speech__square"
    assert len(list((clip / "images").glob("frame_*.png"))) == 13
    from PIL import Image

    face = np.asarray(Image.open(clip / "face_masks/frame_0.png"))
    lip = np.asarray(Image.open(clip / "lip_masks/frame_0.png"))
    assert 0 < (lip > 0).sum() < (face > 0).sum() < face.size  # lips inside a face inside the frame
    assert ((lip > 0) & (face == 0)).sum() == 0
    from flashportrait.expression import ExpressionFeatures

    assert ExpressionFeatures.load(clip / "expression.pt").features.shape == (13, 554)


def _objective(dataset: Path, states: list[dict[str, torch.Tensor] | None]) -> list[float]:
    """The training objective's unweighted error on the square clip for each state (``None``: the initial tiny
    models), averaged over six fixed random draws: the same draws for every state, so they compare without the
    step-to-step noise of sigma and the loss weighting."""
    from flashportrait.pipeline import FlashPortraitPipeline
    from flashportrait.training.args import TINY_TRAIN_BUCKETS
    from flashportrait.training.components import load_training_components
    from flashportrait.training.data import PortraitClipDataset, collate_clips, scan_clips, training_prompts
    from flashportrait.training.step import FrozenEncoders, StepSettings, step_generator, training_step
    from flashportrait.training.trainable import FlashPortraitTrainModel

    records, _ = scan_clips({"square": dataset / "data" / "video_square_path.txt"}, NUM_FRAMES, 1,
                            require_expression=True)
    clips = PortraitClipDataset(records, TINY_TRAIN_BUCKETS, NUM_FRAMES)
    batches = [collate_clips([clips[(0, 100 + j)]]) for j in range(6)]
    parts = load_training_components(tiny=True, seed=42)  # train_portrait.py's default --seed
    pipe = FlashPortraitPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                                 image_encoder=parts["image_encoder"], vae=parts["vae"], transformer=None,
                                 portrait_encoder=None, scheduler=None)
    encoders = FrozenEncoders(pipe, pipe.encode_prompt(training_prompts()))
    model = FlashPortraitTrainModel(parts["transformer"], parts["portrait_encoder"])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and never spins against the other core's work
    try:
        for state in states:
            model.load_state_dict(initial if state is None else state, strict=True)
            with torch.no_grad():
                errors = [training_step(model, encoders, batch, step_generator(7, j, 0, 0),
                                        StepSettings(expression_dropout=0.0))["mse"] for j, batch in enumerate(batches)]
            out.append(float(torch.stack(errors).mean()))
    finally:
        torch.set_num_threads(threads)
    return out


def test_losses_finite_and_falling_when_overfitting_one_clip(dataset, runs):
    log = _log(runs / "z2")
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in log)
    assert all(np.isfinite(r["loss"]) for r in _log(runs / "z3"))
    before, after_3, after_8 = _objective(
        dataset, [None, _fp32(runs / "z2" / "checkpoint-3"), _fp32(runs / "z2" / "checkpoint-8")])
    assert after_8 < after_3 < before and after_8 < 0.9 * before, (before, after_3, after_8)
    assert list((runs / "z2" / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"


def test_zero2_resume_is_exact(runs):
    full, resumed = _log(runs / "z2"), _log(runs / "z2_resumed")
    assert [r["step"] for r in resumed] == [4, 5, 6]  # resumed after 3, stopped by --stop_at_step 6
    assert [r["epoch"] for r in full] == [0, 0, 1, 1, 2, 2, 3, 3]
    for a, b in zip(full[3:6], resumed):
        assert {k: a[k] for k in ("loss", "mse", "lr", "grad_norm")} == {k: b[k] for k in ("loss", "mse", "lr", "grad_norm")}
    assert sorted(p.name for p in (runs / "z2_resumed").glob("checkpoint-*")) == ["checkpoint-6"]
    _assert_same_tensors(_fp32(runs / "z2" / "checkpoint-6"), _fp32(runs / "z2_resumed" / "checkpoint-6"))


def test_zero3_two_processes_resume_is_exact(runs):
    full, resumed = _log(runs / "z3"), _log(runs / "z3_resumed")
    assert [r["step"] for r in full] == [1, 2, 3, 4] and [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    info = json.loads((runs / "z3" / "checkpoint-4" / "flashportrait_train.json").read_text())
    assert info["num_processes"] == 2 and info["global_step"] == 4
    _assert_same_tensors(_fp32(runs / "z3" / "checkpoint-4"), _fp32(runs / "z3_resumed" / "checkpoint-4"))


def test_convert_load_strictly_and_sample(dataset, runs, tmp_path):
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    from flashportrait.checkpoints import load_flashportrait_transformer
    from flashportrait.factory import pipeline_from_checkpoints
    from flashportrait.models.portrait_encoder import PortraitEncoderConfig
    from flashportrait.tiny import (
        TINY_PORTRAIT_ENCODER_CONFIG,
        TINY_TRANSFORMER_CONFIG,
        build_tiny_transformer,
        write_tiny_wan_folder,
    )

    convert = _load_script("bin_convert_pt")
    checkpoint = runs / "z3" / "checkpoint-4"
    written = convert.main(convert.parse_args([str(checkpoint), "--output_dir", str(tmp_path / "release")]))
    # the two-step route: DeepSpeed's own zero-to-fp32 shards, then bin_convert_pt.py with --pretrained_model_path=
    convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(tmp_path / "fp32"))
    two_step = convert.main(convert.parse_args([f"--pretrained_model_path={tmp_path / 'fp32'}", "--train_info",
                                                str(checkpoint / "flashportrait_train.json")]))
    for name in ("transformer", "portrait_encoder"):
        _assert_same_tensors(torch.load(written[name]), torch.load(two_step[name]))

    saved = torch.load(written["transformer"])
    assert "blocks.0.cross_attn.emo_k_proj.weight" in saved and "blocks.0.self_attn.q.weight" in saved  # original naming
    trained = _fp32(checkpoint)
    model = load_flashportrait_transformer(written["transformer"], config=TINY_TRANSFORMER_CONFIG, dtype=torch.float32)
    _assert_same_tensors(model.state_dict(), {k[len("transformer."):]: v for k, v in trained.items()
                                              if k.startswith("transformer.")})
    assert not torch.equal(model.state_dict()["blocks.0.attn1.to_q.weight"],
                           build_tiny_transformer(42).state_dict()["blocks.0.attn1.to_q.weight"])  # it trained

    wan = write_tiny_wan_folder(tmp_path / "wan")
    (wan / "transformer").mkdir()
    (wan / "transformer" / "config.json").write_text(json.dumps(TINY_TRANSFORMER_CONFIG))
    pipe = pipeline_from_checkpoints(wan, written["transformer"], written["portrait_encoder"], dtype=torch.float32,
                                     portrait_encoder_config=PortraitEncoderConfig(**TINY_PORTRAIT_ENCODER_CONFIG))
    from flashportrait.expression import ExpressionFeatures

    clip = dataset / "data" / "square" / "speech" / "speech__square"
    features = ExpressionFeatures.load(clip / "expression.pt").features[:NUM_FRAMES]
    out = pipe(str(clip / "images" / "frame_0.png"), expression_features=features, num_inference_steps=2,
               max_size=32, context_size=3, context_overlap=1, generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (NUM_FRAMES - 1, 32, 32, 3)
    assert out.frames.std() > 0
