"""Which of the two Wan2.1-I2V folder layouts a directory holds (SPEC.md section 3)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from .common import CheckpointError

WanLayout = Literal["original", "diffusers"]

#: file names of the original-format (Wan-AI/Wan2.1-I2V-14B-720P) release
ORIGINAL_VAE = "Wan2.1_VAE.pth"
ORIGINAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_T5_TOKENIZER = "google/umt5-xxl"
ORIGINAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
ORIGINAL_TRANSFORMER_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def detect_wan_layout(folder: str | os.PathLike) -> WanLayout:
    """Tell the Diffusers layout (``model_index.json`` + component folders) from the original one.

    Returns:
        ``"diffusers"`` if ``folder/model_index.json`` exists, ``"original"`` if the original release's
        ``config.json`` with ``"_class_name": "WanModel"`` or its VAE/T5 files are there.

    Raises:
        CheckpointError: the folder does not exist or holds neither layout (the message lists what it
        looked for).
    """
    folder = Path(os.fspath(folder)).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: not a folder. --wan_model_name must point at the downloaded Wan2.1-I2V-14B-720P "
            "folder (original or -Diffusers layout)."
        )
    if (folder / "model_index.json").is_file():
        return "diffusers"
    if (folder / ORIGINAL_VAE).is_file() or (folder / ORIGINAL_T5).is_file() or (folder / "config.json").is_file():
        return "original"
    raise CheckpointError(
        f"{folder}: neither a Diffusers-layout Wan folder (model_index.json) nor an original-layout one "
        f"(config.json, {ORIGINAL_VAE}, {ORIGINAL_T5}, {ORIGINAL_CLIP}). Download Wan-AI/Wan2.1-I2V-14B-720P "
        "or Wan-AI/Wan2.1-I2V-14B-720P-Diffusers into it."
    )
