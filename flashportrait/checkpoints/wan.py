"""The frozen Wan2.1-I2V components of a downloaded folder, in either layout (SPEC.md section 3).

``load_wan_i2v_components`` tells the layouts apart (:func:`~flashportrait.checkpoints.layout.detect_wan_layout`)
and loads the VAE, umT5 encoder, tokenizer and CLIP tower with the loaders of :mod:`.vae`, :mod:`.umt5` and
:mod:`.clip`. The transformer is loaded separately (:mod:`.transformer`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .clip import load_clip_vision
from .common import CheckpointError, PathLike
from .layout import ORIGINAL_CLIP, ORIGINAL_T5, ORIGINAL_T5_TOKENIZER, ORIGINAL_VAE, detect_wan_layout
from .umt5 import load_umt5_encoder, load_umt5_tokenizer
from .vae import load_wan_vae

__all__ = ["load_wan_i2v_components"]

def load_wan_i2v_components(
    folder: PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load the frozen Wan2.1-I2V components from a downloaded folder of either layout.

    Args:
        folder: ``Wan2.1-I2V-14B-720P`` (original: ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
            ``google/umt5-xxl/``, ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``) or
            ``Wan2.1-I2V-14B-720P-Diffusers`` (``vae/``, ``text_encoder/``, ``tokenizer/``, ``image_encoder/``),
            told apart by :func:`~flashportrait.checkpoints.layout.detect_wan_layout`.
        dtype: text and image encoders' dtype.
        vae_dtype: the VAE's dtype (``None``: ``dtype``); float32 by default, as Wan runs it.
        device: where the models end up.

    Returns:
        ``{"vae": AutoencoderKLWan, "text_encoder": UMT5EncoderModel, "tokenizer": tokenizer,
        "image_encoder": CLIPVisionModel}``, all in eval mode. The transformer is loaded separately.

    Raises:
        CheckpointError: a component's file or folder is missing (the message names it) or does not fit.
    """
    folder = Path(os.fspath(folder)).expanduser()
    layout = detect_wan_layout(folder)
    if layout == "original":
        paths = dict(
            vae=folder / ORIGINAL_VAE,
            text_encoder=folder / ORIGINAL_T5,
            tokenizer=folder / ORIGINAL_T5_TOKENIZER,
            image_encoder=folder / ORIGINAL_CLIP,
        )
    else:
        paths = {name: folder / name for name in ("vae", "text_encoder", "tokenizer", "image_encoder")}
    absent = [str(p.relative_to(folder)) for p in paths.values() if not p.exists()]
    if absent:
        raise CheckpointError(
            f"{folder}: {layout}-layout Wan folder without {absent}. Download the complete "
            f"Wan-AI/Wan2.1-I2V-14B-720P{'-Diffusers' if layout == 'diffusers' else ''} release into it."
        )
    if layout == "diffusers":
        _check_model_index(folder / "model_index.json")
    return dict(
        vae=load_wan_vae(paths["vae"], dtype=vae_dtype or dtype, device=device),
        text_encoder=load_umt5_encoder(paths["text_encoder"], dtype=dtype, device=device),
        tokenizer=load_umt5_tokenizer(paths["tokenizer"]),
        image_encoder=load_clip_vision(paths["image_encoder"], dtype=dtype, device=device),
    )


def _check_model_index(path: Path) -> None:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable model_index.json ({exc}).") from exc
    expected = {"vae": "AutoencoderKLWan", "text_encoder": "UMT5EncoderModel", "image_encoder": "CLIPVision"}
    for name, cls in expected.items():
        entry = index.get(name)
        if entry is not None and (not isinstance(entry, list) or len(entry) != 2 or not str(entry[1]).startswith(cls)):
            raise CheckpointError(f"{path}: '{name}' is {entry}, expected a {cls} (Wan2.1 I2V Diffusers layout).")
