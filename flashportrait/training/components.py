"""The models of a training run, from the files users have or the built-in tiny family.

* Fine-tuning the release: the Wan2.1-I2V folder (either layout) for the frozen VAE / umT5 / CLIP and the
  transformer's base weights, FlashPortrait's ``transformer.pt`` and ``portrait_encoder.pt``, loaded strictly
  by :mod:`flashportrait.checkpoints`.
* Training from Wan2.1-I2V: no ``transformer.pt``: the base transformer is loaded strictly except for the
  NFEB projections (``blocks.N.attn2.emo_{k,v}_proj``), which the base does not have and which start at zero
  (as in a fresh model: the block then adds only ``mean(x)``); a new portrait encoder (random init, released
  sizes) unless ``portrait_encoder.pt`` is given.
* ``--tiny``: :func:`flashportrait.tiny.build_tiny_components` (random weights, no files).

The motion encoder (PD-FGC) is loaded only when expression features must be computed online.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_base_transformer_with_new_nfeb", "load_training_components"]

logger = logging.getLogger(__name__)


def _base_transformer_weights(wan_dir: Path) -> Path:
    """The base transformer's weights (a shard index or a folder holding one) in either Wan layout."""
    from ..checkpoints import detect_wan_layout
    from ..checkpoints.layout import ORIGINAL_TRANSFORMER_INDEX

    if detect_wan_layout(wan_dir) == "diffusers":
        return wan_dir / "transformer"
    index = wan_dir / ORIGINAL_TRANSFORMER_INDEX
    return index if index.is_file() else wan_dir


def load_base_transformer_with_new_nfeb(wan_dir: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16):
    """The Wan2.1-I2V base transformer as a FlashPortrait transformer with zero NFEB projections.

    Every base key must fit exactly; the only keys the base may lack are the ``emo_k_proj`` / ``emo_v_proj``
    weights, which are created as zeros (a base that has them keeps them).

    Raises:
        CheckpointError: the base misses any other key, or has unexpected or mis-shaped ones (all named).
    """
    from ..checkpoints import (
        build_transformer,
        check_state_dict,
        convert_transformer_state_dict,
        load_state_dict_strict,
        read_state_dict,
        resolve_transformer_config,
    )

    wan_dir = Path(wan_dir).expanduser()
    config = resolve_transformer_config(None, wan_dir)
    model = build_transformer(config, meta=True)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = _base_transformer_weights(wan_dir)
    state_dict = convert_transformer_state_dict(read_state_dict(weights))
    new = [k for k in expected if (".emo_k_proj." in k or ".emo_v_proj." in k) and k not in state_dict]
    check_state_dict(expected, state_dict, weights, what="the Wan2.1-I2V base transformer", ignore_missing=new,
                     hint="Pass the Wan2.1-I2V-14B-720P folder (original or -Diffusers layout).")
    for key in new:
        state_dict[key] = torch.zeros(expected[key], dtype=dtype)
    if new:
        logger.info("transformer: %d NFEB projection tensors start at zero (training from Wan2.1-I2V)", len(new))
    load_state_dict_strict(model, state_dict, weights, what="the FlashPortrait transformer", dtype=dtype)
    return model


def load_training_components(
    *,
    tiny: bool,
    seed: int = 0,
    pretrained_model_name_or_path: str | os.PathLike | None = None,
    transformer_path: str | os.PathLike | None = None,
    portrait_encoder_path: str | os.PathLike | None = None,
    pd_fpg_model_path: str | os.PathLike | None = None,
    need_motion_encoder: bool = False,
    dtype: torch.dtype = torch.float32,
    portrait_encoder_config=None,
) -> dict[str, Any]:
    """Load every model of a training run on the CPU.

    Args:
        tiny: the tiny family (random weights, ``seed``); the paths must then be ``None``.
        pretrained_model_name_or_path: the Wan2.1-I2V folder (original or Diffusers layout).
        transformer_path: FlashPortrait ``transformer.pt`` to fine-tune (``None``: train from the base).
        portrait_encoder_path: ``portrait_encoder.pt`` to fine-tune (``None``: a new encoder).
        pd_fpg_model_path: PD-FGC ``pd_fpg.pth`` (only with ``need_motion_encoder``).
        need_motion_encoder: load the motion encoder (some clips lack ``expression.pt``).
        dtype: the transformer's, portrait encoder's, text and image encoders' dtype (the VAE stays float32).
        portrait_encoder_config: :class:`~flashportrait.models.portrait_encoder.PortraitEncoderConfig` of the
            portrait encoder (``None``: the released sizes).

    Returns:
        ``{"vae", "text_encoder", "tokenizer", "image_encoder", "transformer", "portrait_encoder",
        "motion_encoder" (or None), "transformer_config" (diffusers kwargs), "portrait_encoder_config"
        (dict)}``.

    Raises:
        ValueError: contradicting or missing paths; CheckpointError: files that do not fit.
    """
    from ..checkpoints import (
        load_flashportrait_transformer,
        load_pdfgc_motion_encoder,
        load_portrait_encoder,
        load_wan_i2v_components,
        resolve_transformer_config,
    )
    from ..models.portrait_encoder import PortraitEncoder, PortraitEncoderConfig

    if tiny:
        from ..tiny import TINY_PORTRAIT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG, build_tiny_components

        given = [n for n, v in (("--pretrained_model_name_or_path", pretrained_model_name_or_path),
                                ("--transformer_path", transformer_path),
                                ("--portrait_encoder_path", portrait_encoder_path),
                                ("--pd_fpg_model_path", pd_fpg_model_path)) if v is not None]
        if given:
            raise ValueError(f"--tiny builds random tiny models; it cannot be combined with {', '.join(given)}")
        parts = build_tiny_components(seed=seed, dtype=torch.float32)
        for name in ("transformer", "portrait_encoder", "text_encoder", "image_encoder"):
            if dtype != torch.float32:
                parts[name] = parts[name].to(dtype)
        if not need_motion_encoder:
            parts["motion_encoder"] = None
        parts["transformer_config"] = dict(TINY_TRANSFORMER_CONFIG)
        parts["portrait_encoder_config"] = dict(TINY_PORTRAIT_ENCODER_CONFIG)
        return parts

    if pretrained_model_name_or_path is None:
        raise ValueError("give --pretrained_model_name_or_path (the Wan2.1-I2V-14B-720P folder, original or "
                         "-Diffusers layout), or --tiny")
    wan_dir = Path(pretrained_model_name_or_path).expanduser()
    parts = load_wan_i2v_components(wan_dir, dtype=dtype, vae_dtype=torch.float32)
    if transformer_path is not None:
        transformer = load_flashportrait_transformer(transformer_path, wan_dir, dtype=dtype)
    else:
        transformer = load_base_transformer_with_new_nfeb(wan_dir, dtype=dtype)
    encoder_config = portrait_encoder_config or PortraitEncoderConfig()
    if portrait_encoder_path is not None:
        portrait_encoder = load_portrait_encoder(portrait_encoder_path, encoder_config, dtype=dtype)
    else:
        if transformer_path is not None:
            logger.warning("--transformer_path without --portrait_encoder_path: the portrait encoder starts from "
                           "random weights while the transformer's NFEB was trained with the released one")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            portrait_encoder = PortraitEncoder(encoder_config).to(dtype)
    motion_encoder = None
    if need_motion_encoder:
        if pd_fpg_model_path is None:
            raise ValueError("some clips have no expression.pt: give --pd_fpg_model_path (pd_fpg.pth) to compute "
                             "their expression features online, or run prepare_data on them")
        motion_encoder = load_pdfgc_motion_encoder(pd_fpg_model_path)
    config = resolve_transformer_config(None, wan_dir)
    config["expression_dim"] = transformer.config.expression_dim
    parts.update(transformer=transformer, portrait_encoder=portrait_encoder, motion_encoder=motion_encoder,
                 transformer_config=config, portrait_encoder_config=asdict(encoder_config))
    return parts
