"""Checkpoint folders of a training run: ``<output_dir>/checkpoint-<step>/``.

Each holds what ``accelerator.save_state`` writes (with DeepSpeed: ``pytorch_model/`` ZeRO shards, a
``latest`` file, DeepSpeed's ``zero_to_fp32.py``; the LR scheduler, RNG states) plus :data:`TRAIN_INFO_FILE`,
which ``bin_convert_pt.py`` reads: the step, the model configs and the trainable tensor names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

__all__ = [
    "TRAIN_INFO_FILE",
    "checkpoint_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "prune_checkpoints",
    "write_train_info",
    "read_train_info",
]

TRAIN_INFO_FILE = "flashportrait_train.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint (one with :data:`TRAIN_INFO_FILE`), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        m = _CHECKPOINT_RE.match(entry.name)
        if m and entry.is_dir() and (entry / TRAIN_INFO_FILE).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``--resume_from_checkpoint``: ``"latest"`` (the newest complete checkpoint of ``output_dir``, or ``None``
    to start fresh when there is none), or a checkpoint folder (or its name inside ``output_dir``).

    Raises:
        FileNotFoundError: a named checkpoint that does not exist or is incomplete.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint).expanduser()
    if not path.is_dir() and (Path(output_dir) / resume_from_checkpoint).is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not (path / TRAIN_INFO_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: {path} is not a complete checkpoint folder "
            f"(no {TRAIN_INFO_FILE}); give a checkpoint-<step> folder of a run, or 'latest'"
        )
    return path


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that, with the one about to be saved, at most ``total_limit`` remain.

    Returns:
        The deleted folders.
    """
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    excess = len(found) - (total_limit - 1)
    removed = []
    for _, folder in found[: max(0, excess)]:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def write_train_info(folder: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write :data:`TRAIN_INFO_FILE` atomically (its presence marks the checkpoint complete)."""
    atomic_write_text(Path(folder) / TRAIN_INFO_FILE, json.dumps(info, indent=1, default=list))


def read_train_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's :data:`TRAIN_INFO_FILE`, or ``None`` when it has none (e.g. a folder of shards made by
    ``zero_to_fp32.py``: its parent checkpoint's file is used when there)."""
    folder = Path(folder)
    for candidate in (folder / TRAIN_INFO_FILE, folder.parent / TRAIN_INFO_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None
