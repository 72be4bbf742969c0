"""Building a :class:`~flashportrait.pipeline.FlashPortraitPipeline`: from the files users download, or the
built-in tiny family (random weights, no files)."""

from __future__ import annotations

import os

import torch

from .config import DEFAULT_SHIFT
from .pipeline import FlashPortraitPipeline
from .sampling import make_scheduler

__all__ = ["pipeline_from_checkpoints", "tiny_pipeline"]


def pipeline_from_checkpoints(
    wan_model_dir: str | os.PathLike,
    transformer_path: str | os.PathLike | None,
    portrait_encoder_path: str | os.PathLike,
    pd_fpg_model_path: str | os.PathLike | None = None,
    *,
    sampler: str = "euler",
    shift: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
    portrait_encoder_config=None,
) -> FlashPortraitPipeline:
    """The pipeline from the files users download (SPEC.md section 3), on the CPU.

    Args:
        wan_model_dir: ``Wan2.1-I2V-14B-720P`` (original or Diffusers layout).
        transformer_path: FlashPortrait ``transformer.pt`` (``None``: the base weights must already hold
            the NFEB projections).
        portrait_encoder_path: ``portrait_encoder.pt``.
        pd_fpg_model_path: ``pd_fpg.pth`` (PD-FGC); needed only for driving videos.
        sampler, shift: see :func:`flashportrait.sampling.make_scheduler`.
        dtype: transformer, text / image encoder and portrait encoder dtype (the VAE stays float32,
            the motion encoder float32).
        portrait_encoder_config: :class:`~flashportrait.models.portrait_encoder.PortraitEncoderConfig`
            of ``portrait_encoder.pt`` (``None``: the released sizes; its head count cannot be read from
            the file).

    Raises:
        CheckpointError: any file that is missing, unreadable or does not fit (naming file and keys).
    """
    from .checkpoints import (
        load_flashportrait_transformer,
        load_pdfgc_motion_encoder,
        load_portrait_encoder,
        load_wan_i2v_components,
    )

    wan = load_wan_i2v_components(wan_model_dir, dtype=dtype, device="cpu")
    transformer = load_flashportrait_transformer(transformer_path, wan_model_dir, dtype=dtype)
    portrait_encoder = load_portrait_encoder(portrait_encoder_path, portrait_encoder_config, dtype=dtype)
    motion_encoder = load_pdfgc_motion_encoder(pd_fpg_model_path) if pd_fpg_model_path is not None else None
    return FlashPortraitPipeline(
        tokenizer=wan["tokenizer"],
        text_encoder=wan["text_encoder"],
        image_encoder=wan["image_encoder"],
        vae=wan["vae"],
        transformer=transformer,
        portrait_encoder=portrait_encoder,
        scheduler=make_scheduler(sampler, DEFAULT_SHIFT if shift is None else shift),
        motion_encoder=motion_encoder,
    )


def tiny_pipeline(
    seed: int = 0, *, sampler: str = "euler", shift: float | None = None, dtype: torch.dtype = torch.float32
) -> FlashPortraitPipeline:
    """The ``--tiny`` pipeline: random tiny components (:func:`flashportrait.tiny.build_tiny_components`),
    deterministic for ``seed``."""
    from .tiny import build_tiny_components

    components = build_tiny_components(seed=seed, dtype=dtype)
    return FlashPortraitPipeline(**components, scheduler=make_scheduler(sampler, DEFAULT_SHIFT if shift is None else shift))
