"""From ``train_portrait.py``'s flags to what the run does: refused flags, checked values, derived settings.

Kept apart from the script so that a test can check, flag by flag, what each one changes without starting a
run (``tests/test_training_flags.py``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TRAIN_BUCKETS, TRAIN_PATH_LISTS
from .buckets import parse_resolution
from .flags import refused_flags
from .step import StepSettings

__all__ = ["LR_SCHEDULERS", "REPORT_TO", "TINY_TRAIN_BUCKETS", "TrainSettings", "resolve_train_settings"]

#: ``--lr_scheduler`` names (diffusers ``get_scheduler``)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: bucket resolutions (height, width) of ``--tiny`` runs: the released aspect ratios at about 1/15 of the size
TINY_TRAIN_BUCKETS = {"rec": (32, 48), "vec": (48, 32), "square": (48, 48)}
#: ``--report_to`` values
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all", "none")


@dataclass(frozen=True)
class TrainSettings:
    """Derived settings of a run (the flags not listed are used as they are).

    Attributes:
        path_lists: bucket -> path-list file, for the lists given.
        resolutions: bucket -> ``(height, width)``.
        step: what each step does (:class:`~flashportrait.training.step.StepSettings`).
        report_to: tracker names for ``Accelerator(log_with=...)`` (empty: none).
        video_repeat: how many times each clip is listed per epoch.
        logging_dir: where TensorBoard writes.
    """

    path_lists: dict[str, Path]
    resolutions: dict[str, tuple[int, int]]
    step: StepSettings
    report_to: list[str] = field(default_factory=list)
    video_repeat: int = 1
    logging_dir: Path = Path("logs")


def _problem(messages: list[str]) -> ValueError:
    return ValueError("\n  ".join(["train_portrait.py: " + messages[0], *messages[1:]]))


def resolve_train_settings(args: argparse.Namespace) -> TrainSettings:
    """Check the flags and derive :class:`TrainSettings`.

    Raises:
        ValueError: one message listing every refused flag, or the first inconsistent / missing one (naming the
        flag and how to fix it).
    """
    refused = refused_flags(args)
    if refused:
        raise _problem(refused)
    lists = {"square": args.train_data_square_dir, "rec": args.train_data_rec_dir, "vec": args.train_data_vec_dir}
    path_lists = {k: Path(v).expanduser() for k, v in lists.items() if v is not None}
    if not path_lists:
        raise ValueError(
            "give at least one of --train_data_square_dir / --train_data_rec_dir / --train_data_vec_dir: the path lists "
            f"({', '.join(TRAIN_PATH_LISTS.values())}) that prepare_data writes"
        )
    for bucket, path in path_lists.items():
        if path.is_dir() and (path / TRAIN_PATH_LISTS[bucket]).is_file():
            path_lists[bucket] = path / TRAIN_PATH_LISTS[bucket]  # the folder prepare_data wrote
        elif not path.is_file():
            raise ValueError(f"--train_data_{bucket}_dir {path}: no such path list (or folder holding "
                             f"{TRAIN_PATH_LISTS[bucket]})")
    resolutions = dict(TRAIN_BUCKETS)
    for bucket in TRAIN_BUCKETS:
        value = getattr(args, f"{bucket}_resolution")
        if value is not None:
            resolutions[bucket] = parse_resolution(value)
        elif args.tiny:
            resolutions[bucket] = TINY_TRAIN_BUCKETS[bucket]
    if (args.video_sample_n_frames - 1) % 4:
        raise ValueError(f"--video_sample_n_frames must be 4k + 1 (e.g. 81), got {args.video_sample_n_frames}")
    if args.motion_sub_loss and not 0 <= args.motion_sub_loss_ratio <= 1:
        raise ValueError(f"--motion_sub_loss_ratio must be in [0, 1], got {args.motion_sub_loss_ratio}")
    if args.mixed_precision == "fp16":
        raise ValueError("--mixed_precision fp16 is not supported (Wan2.1 overflows in fp16); use bf16")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA GPUs)") from None
    report_to = [] if args.report_to == "none" else (["tensorboard", "wandb", "comet_ml"] if args.report_to == "all"
                                                     else [args.report_to])
    for tracker, module in (("wandb", "wandb"), ("comet_ml", "comet_ml")):
        if tracker in report_to:
            try:
                __import__(module)
            except ImportError:
                if args.report_to == "all":
                    report_to.remove(tracker)
                else:
                    raise ValueError(f"--report_to {tracker} needs the {module} package: pip install {module}") from None
    step = StepSettings(
        shift=args.shift,
        num_train_timesteps=args.train_sampling_steps,
        motion_ratio=args.motion_sub_loss_ratio if args.motion_sub_loss else None,
        expression_dropout=args.expression_dropout,
        uniform_sampling=args.uniform_sampling,
    )
    logging_dir = Path(args.logging_dir)
    if not logging_dir.is_absolute():
        logging_dir = Path(args.output_dir) / logging_dir
    return TrainSettings(path_lists=path_lists, resolutions=resolutions, step=step, report_to=report_to,
                         video_repeat=max(1, args.video_repeat), logging_dir=logging_dir)
