"""Each flag of train_portrait.py changes what it says (table-driven), and the authors' flags we do not support are
refused with a reason. No training run here: the flags are checked through the functions main() calls. About 5 s."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from .conftest import REPO_ROOT


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_portrait", REPO_ROOT / "train_portrait.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lists")
    for name in ("video_square_path.txt", "video_rec_path.txt", "video_vec_path.txt"):
        (folder / name).write_text("")
    return folder


def _accelerator(processes=1, ds_config=None):
    plugin = None if ds_config is None else SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes)


def _settings(script, lists, *argv):
    from flashportrait.training.args import resolve_train_settings

    return resolve_train_settings(script.parse_args([f"--train_data_square_dir={lists}", *argv]))


def _optimizer(script, lists, *argv, processes=1):
    args = script.parse_args([f"--train_data_square_dir={lists}", *argv])
    return script.make_optimizer(args, [torch.nn.Parameter(torch.zeros(2))], _accelerator(processes)).defaults


def _lrs(script, lists, *argv, steps=6):
    args = script.parse_args([f"--train_data_square_dir={lists}", "--learning_rate", "1.0", *argv])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = script.make_lr_scheduler(args, optimizer, steps, 1)
    out = []
    for _ in range(steps):
        out.append(round(scheduler.get_last_lr()[0], 6))
        optimizer.step()
        scheduler.step()
    return out


def _schedule(script, lists, *argv, batches=10, processes=2):
    args = script.parse_args([f"--train_data_square_dir={lists}", *argv])
    return script.training_schedule(args, batches, processes)


def _ds(script, lists, *argv, processes=2, config="zero2_offload"):
    args = script.parse_args([f"--train_data_square_dir={lists}", *argv])
    ds = json.loads((REPO_ROOT / "configs" / "deepspeed" / f"{config}.json").read_text())
    script.configure_deepspeed(_accelerator(processes, ds), args)
    return ds


# (flag(s), what to measure, value without the flag, value with it)
TABLE = [
    (["--learning_rate", "3e-4"], lambda s, lst, *a: _optimizer(s, lst, *a)["lr"], 2e-5, 3e-4),
    (["--adam_beta1", "0.8", "--adam_beta2", "0.95"], lambda s, lst, *a: _optimizer(s, lst, *a)["betas"], (0.9, 0.999), (0.8, 0.95)),
    (["--adam_weight_decay", "0.1"], lambda s, lst, *a: _optimizer(s, lst, *a)["weight_decay"], 3e-2, 0.1),
    (["--adam_epsilon", "1e-6"], lambda s, lst, *a: _optimizer(s, lst, *a)["eps"], 1e-10, 1e-6),
    (["--scale_lr", "--train_batch_size", "2", "--gradient_accumulation_steps", "3"],
     lambda s, lst, *a: _optimizer(s, lst, *a, processes=4)["lr"] / 2e-5, 1.0, 24.0),
    (["--lr_warmup_steps", "3"], lambda s, lst, *a: _lrs(s, lst, "--lr_warmup_steps", "0", *a)[:4],
     [1.0, 1.0, 1.0, 1.0], [0.0, 0.333333, 0.666667, 1.0]),
    (["--lr_scheduler", "linear"], lambda s, lst, *a: _lrs(s, lst, "--lr_warmup_steps", "0", *a)[:3],
     [1.0, 1.0, 1.0], [1.0, 0.833333, 0.666667]),
    (["--max_train_steps", "7"], lambda s, lst, *a: _schedule(s, lst, *a), (5, 100, 20), (5, 7, 2)),
    (["--num_train_epochs", "3"], lambda s, lst, *a: _schedule(s, lst, *a), (5, 100, 20), (5, 15, 3)),
    (["--gradient_accumulation_steps", "2"], lambda s, lst, *a: _schedule(s, lst, *a)[0], 5, 3),
    (["--max_grad_norm", "1.5"], lambda s, lst, *a: _ds(s, lst, *a)["gradient_clipping"], 0.05, 1.5),
    (["--train_batch_size", "3"], lambda s, lst, *a: _ds(s, lst, *a)["train_micro_batch_size_per_gpu"], 1, 3),
    (["--gradient_accumulation_steps", "4"], lambda s, lst, *a: _ds(s, lst, *a)["train_batch_size"], 2, 8),
    (["--motion_sub_loss"], lambda s, lst, *a: _settings(s, lst, *a).step.motion_ratio, None, 0.25),
    (["--motion_sub_loss", "--motion_sub_loss_ratio", "0.5"], lambda s, lst, *a: _settings(s, lst, *a).step.motion_ratio,
     None, 0.5),
    (["--shift", "3"], lambda s, lst, *a: _settings(s, lst, *a).step.shift, 5.0, 3.0),
    (["--train_sampling_steps", "100"], lambda s, lst, *a: _settings(s, lst, *a).step.num_train_timesteps, 1000, 100),
    (["--uniform_sampling"], lambda s, lst, *a: _settings(s, lst, *a).step.uniform_sampling, False, True),
    (["--expression_dropout", "0.3"], lambda s, lst, *a: _settings(s, lst, *a).step.expression_dropout, 0.1, 0.3),
    (["--square_resolution", "512x512"], lambda s, lst, *a: _settings(s, lst, *a).resolutions["square"], (720, 720), (512, 512)),
    (["--rec_resolution", "320x576"], lambda s, lst, *a: _settings(s, lst, *a).resolutions["rec"], (480, 832), (320, 576)),
    (["--vec_resolution", "576x320"], lambda s, lst, *a: _settings(s, lst, *a).resolutions["vec"], (832, 480), (576, 320)),
    (["--tiny"], lambda s, lst, *a: _settings(s, lst, *a).resolutions["square"], (720, 720), (48, 48)),
    (["--video_repeat", "3"], lambda s, lst, *a: _settings(s, lst, *a).video_repeat, 1, 3),
    (["--report_to", "none"], lambda s, lst, *a: _settings(s, lst, *a).report_to, ["tensorboard"], []),
    (["--logging_dir", "tb"], lambda s, lst, *a: _settings(s, lst, "--output_dir", "out", *a).logging_dir.as_posix(),
     "out/logs", "out/tb"),
    (["--train_data_rec_dir", "LISTS"], lambda s, lst, *a: sorted(_settings(s, lst, *a).path_lists), ["square"],
     ["rec", "square"]),
    (["--train_data_vec_dir", "LISTS"], lambda s, lst, *a: sorted(_settings(s, lst, *a).path_lists), ["square"],
     ["square", "vec"]),
    (["--dataloader_num_workers", "2"], lambda s, lst, *a: s.make_dataloader(
        s.parse_args(list(a)), [], [[0]]).num_workers, 0, 2),
    (["--gradient_checkpointing"], lambda s, lst, *a: _checkpointing(s, *a), False, True),
]


def _checkpointing(script, *argv):
    from flashportrait.tiny import build_tiny_portrait_encoder, build_tiny_transformer

    model, _ = script.build_train_model(script.parse_args(list(argv)), build_tiny_transformer(0),
                                        build_tiny_portrait_encoder(0))
    return model.transformer.gradient_checkpointing


def _approx(value):
    numeric = isinstance(value, float) or (isinstance(value, (list, tuple)) and value and
                                           all(isinstance(v, (int, float)) for v in value))
    return pytest.approx(value) if numeric else value


@pytest.mark.parametrize(("flags", "measure", "without", "with_flag"), TABLE, ids=[" ".join(r[0][:1]) for r in TABLE])
def test_flag_changes_what_it_says(script, lists, flags, measure, without, with_flag):
    flags = [str(lists) if f == "LISTS" else f for f in flags]
    assert measure(script, lists) == _approx(without)
    assert measure(script, lists, *flags) == _approx(with_flag)


def test_sample_flags_change_the_frames(script, tmp_path):
    """--video_sample_n_frames / --video_sample_stride / --max_train_samples reach the dataset."""
    from flashportrait.training.data import PortraitClipDataset, scan_clips

    for i in range(2):
        for sub in ("images", "face_masks", "lip_masks"):
            (tmp_path / f"square/speech/c{i}" / sub).mkdir(parents=True)
        (tmp_path / f"square/speech/c{i}/clip.json").write_text(json.dumps({"num_frames": 30}))
    (tmp_path / "video_square_path.txt").write_text("square/speech/c0\nsquare/speech/c1\n")
    for argv, frames, clips in ((["--video_sample_n_frames", "9"], 9, 2),
                                (["--video_sample_n_frames", "5", "--video_sample_stride", "3"], 5, 2),
                                (["--video_sample_n_frames", "5", "--max_train_samples", "1"], 5, 1)):
        args = script.parse_args([f"--train_data_square_dir={tmp_path}", *argv])
        records, _ = scan_clips({"square": tmp_path / "video_square_path.txt"}, args.video_sample_n_frames,
                                args.video_sample_stride, require_expression=False, max_clips=args.max_train_samples)
        index = PortraitClipDataset(records, {"square": (16, 16)}, args.video_sample_n_frames,
                                    args.video_sample_stride).frame_indices(0, 0)
        assert len(records) == clips and len(index) == frames
        assert set(index[1:] - index[:-1]) == {args.video_sample_stride}


def test_vae_mini_batch_gives_the_same_latents(script):
    """--vae_mini_batch changes how many samples go through the VAE at once, not the result (same noise draws)."""
    from flashportrait.pipeline import FlashPortraitPipeline
    from flashportrait.tiny import build_tiny_image_encoder, build_tiny_vae
    from flashportrait.training.step import FrozenEncoders

    pipe = FlashPortraitPipeline(tokenizer=None, text_encoder=None, image_encoder=build_tiny_image_encoder(),
                                 vae=build_tiny_vae(), transformer=None, portrait_encoder=None, scheduler=None)
    batch = {"pixels": torch.randint(0, 255, (2, 3, 5, 16, 16), dtype=torch.uint8),
             "face_masks": torch.zeros(2, 5, 16, 16), "lip_masks": torch.zeros(2, 5, 16, 16),
             "features": torch.zeros(2, 5, 554), "prompt_index": torch.tensor([0, 1])}
    calls = []
    original = pipe.vae.encode
    pipe.vae.encode = lambda x: (calls.append(x.shape[0]), original(x))[1]
    outs = []
    for mini, expected in ((1, [1, 1, 1, 1]), (2, [2, 2])):  # per call: the clip, then its condition video
        calls.clear()
        encoders = FrozenEncoders(pipe, torch.zeros(3, 4, 8), vae_mini_batch=mini)
        outs.append(encoders.encode(batch, torch.Generator().manual_seed(0)))
        assert calls == expected
    for key in ("latents", "condition"):  # the same numbers up to the kernels' batching (same posterior noise)
        assert torch.allclose(outs[0][key], outs[1][key], atol=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--use_ema"], "--use_ema: not supported"),
        (["--weighting_scheme", "logit_normal"], "--weighting_scheme: not supported"),
        (["--validation_steps", "100"], "validation during training is not supported"),
        (["--rank", "64"], "LoRA training is not implemented"),
        (["--train_mode", "normal"], "image-to-video model only"),
        (["--noise_offset", "0.1", "--random_flip"], "--random_flip: not supported"),
        (["--mixed_precision", "fp16"], "fp16 is not supported"),
        (["--video_sample_n_frames", "80"], "4k \\+ 1"),
    ],
)
def test_unsupported_or_bad_flags_are_refused(script, lists, argv, message):
    from flashportrait.training.args import resolve_train_settings

    with pytest.raises(ValueError, match=message):
        resolve_train_settings(script.parse_args([f"--train_data_square_dir={lists}", *argv]))


def test_authors_values_that_match_ours_are_accepted(script, lists):
    """The authors' train_14B.sh passes --train_mode=i2v, --weighting_scheme none, --use_deepspeed, --low_vram ..."""
    from flashportrait.training.args import resolve_train_settings

    args = script.parse_args([f"--train_data_square_dir={lists}", "--train_mode=i2v", "--weighting_scheme", "none",
                              "--use_deepspeed", "--low_vram", "--vae_mini_batch=1", "--video_repeat=1",
                              "--uniform_sampling", "--save_state", "--local_rank", "0"])
    assert resolve_train_settings(args).step.uniform_sampling


def test_missing_and_bad_inputs_are_refused(script, lists, tmp_path):
    from flashportrait.training.args import resolve_train_settings

    with pytest.raises(ValueError, match="give at least one of --train_data_square_dir"):
        resolve_train_settings(script.parse_args([]))
    with pytest.raises(ValueError, match="no such path list"):
        resolve_train_settings(script.parse_args([f"--train_data_rec_dir={tmp_path / 'nothing.txt'}"]))
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="bitsandbytes"):
            resolve_train_settings(script.parse_args([f"--train_data_square_dir={lists}", "--use_8bit_adam"]))
    for argv in (["--train_batch_size", "0"], ["--expression_dropout", "1"], ["--max_train_steps", "0"]):
        with pytest.raises(SystemExit):
            script.parse_args(argv)


def test_launch_scripts_build_the_accelerate_command(tmp_path):
    """scripts/train_{single,multiple}_machine.sh: the DeepSpeed config, process counts, machine settings from the
    environment, and the path lists that exist (DRY_RUN prints the command)."""
    import os
    import subprocess

    (tmp_path / "video_square_path.txt").write_text("square/speech/a\n")
    (tmp_path / "video_vec_path.txt").write_text("")
    env = dict(os.environ, DRY_RUN="1", DATA_DIR=str(tmp_path), NUM_GPUS="4", ZERO="zero2_offload", TRANSFORMER_PATH="")
    single = subprocess.run(["bash", "scripts/train_single_machine.sh", "--max_train_steps", "9"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, check=True).stdout
    assert "accelerate.commands.launch --config_file configs/accelerate/zero2_offload.yaml --num_processes 4" in single
    assert f"--train_data_square_dir {tmp_path}/video_square_path.txt" in single
    assert "--train_data_vec_dir" not in single and "--transformer_path" not in single  # empty list / path: left out
    assert single.rstrip().endswith("--max_train_steps 9")
    env.update(NUM_MACHINES="3", NODE_RANK="2", MASTER_ADDR="10.0.0.7", GPUS_PER_MACHINE="8", MASTER_PORT="1234")
    multi = subprocess.run(["bash", "scripts/train_multiple_machine.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, check=True).stdout
    for part in ("--num_machines 3", "--machine_rank 2", "--main_process_ip 10.0.0.7", "--main_process_port 1234",
                 "--num_processes 24", "--deepspeed_multinode_launcher standard"):
        assert part in multi
    del env["NUM_MACHINES"]
    failed = subprocess.run(["bash", "scripts/train_multiple_machine.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True)
    assert failed.returncode != 0 and "NUM_MACHINES" in failed.stderr
