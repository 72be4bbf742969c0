"""Loading the portrait encoder (``portrait_encoder.pt`` of FrancisRing/FlashPortrait), strictly.

Keys ``proj_model.*``, ``mouth_proj_model.*``, ``emo_proj_model.*`` (SPEC.md section 2); the model is built on
the meta device and the file's tensors are assigned into it.
"""

from __future__ import annotations

import os

import torch

from ..models.portrait_encoder import PortraitEncoder, PortraitEncoderConfig
from .common import empty_model, load_state_dict_strict, read_state_dict

__all__ = ["load_portrait_encoder"]


def load_portrait_encoder(
    path: str | os.PathLike,
    config: PortraitEncoderConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PortraitEncoder:
    """Load ``portrait_encoder.pt`` (or a ``.safetensors`` with the same keys) strictly, in eval mode.

    Args:
        path: the weights file (keys ``proj_model.*``, ``mouth_proj_model.*``, ``emo_proj_model.*``).
        config: sizes; ``None`` = the released sizes. The head count of the resamplers cannot be read from
            the file, so it is never guessed.
        device, dtype: where the model goes and its floating-point dtype.

    Raises:
        CheckpointError: unreadable file or missing / unexpected / mis-shaped keys (naming file and keys).
    """
    config = config or PortraitEncoderConfig()
    state_dict = read_state_dict(path)
    with empty_model():
        model = PortraitEncoder(config)
    load_state_dict_strict(
        model, state_dict, path, what=f"the portrait encoder ({config})", dtype=dtype,
        hint="Pass the PortraitEncoderConfig the file was trained with (released sizes by default).",
    )
    return model.to(device).eval()
