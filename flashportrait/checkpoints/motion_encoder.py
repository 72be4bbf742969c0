"""Loading the PD-FGC motion encoder (``pd_fpg.pth``), strictly; the released key names need no renaming."""

from __future__ import annotations

import os

import torch

from ..models.motion_encoder import PDFGCMotionEncoder
from .common import empty_model, load_state_dict_strict, read_state_dict

__all__ = ["load_pdfgc_motion_encoder"]


def load_pdfgc_motion_encoder(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> PDFGCMotionEncoder:
    """Load ``pd_fpg.pth`` (or a ``.safetensors`` with the same keys) strictly; frozen, eval mode.

    The trunk width (64 released) is read from ``model.conv1.weight``; every other shape must then fit.

    Raises:
        CheckpointError: the file is unreadable or has missing / unexpected / mis-shaped keys (the
            message names the file and the keys).
    """
    state_dict = read_state_dict(path)
    conv1 = state_dict.get("model.conv1.weight")
    width = int(conv1.shape[0]) if conv1 is not None and conv1.ndim == 4 else 64  # 64 released
    with empty_model():
        model = PDFGCMotionEncoder(width=width)
    load_state_dict_strict(
        model, state_dict, path, what="the PD-FGC motion encoder (pd_fpg.pth)", dtype=dtype,
        hint="Expected the PD-FGC file pd_fpg.pth from FrancisRing/FlashPortrait.",
    )
    return model.to(device).eval().requires_grad_(False)
