"""Parity runners for the golden fixtures of the expression models (used by ``tools.check_parity``).

Each ``run_<fixture>(weights_path, io, manifest)`` loads the fixture's weights through the project's public
loader (exactly as a user's checkpoint would be loaded), runs the stored inputs in float32 on the CPU and
returns ``[(output_name, ours, reference), ...]`` for every output in the io file (golden/README.md).
Sizes come from the manifest, so fixtures of other sizes work without code changes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints import load_pdfgc_motion_encoder, load_portrait_encoder
from ..config import VAE_TEMPORAL_FACTOR
from ..models.portrait_encoder import (
    PortraitEncoderConfig,
    split_tokens_per_latent_frame,
    window_token_lens,
)

__all__ = ["run_portrait_encoder", "run_pdfgc_motion_encoder"]

Triples = list[tuple[str, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def run_portrait_encoder(weights_path: Path, io: dict[str, torch.Tensor], manifest: dict) -> Triples:
    """Portrait encoder fixture: ``features`` [1, N, 554] -> ``tokens`` [1, N*24, 2048], ``window_tokens``
    [1, F, 97, 2048] and ``window_token_lens`` [F] (returned as float32), F = (N - 1) / 4 + 1.

    Sizes: ``manifest["portrait_encoder_config"]`` (see :meth:`PortraitEncoderConfig.from_manifest`).
    """
    config = PortraitEncoderConfig.from_manifest(manifest["portrait_encoder_config"])
    model = load_portrait_encoder(weights_path, config)
    features = io["features"].float()
    num_frames = features.shape[1]
    if (num_frames - 1) % VAE_TEMPORAL_FACTOR:
        raise ValueError(f"{weights_path}: features hold {num_frames} frames; expected 4k+1.")
    num_latent = (num_frames - 1) // 4 + 1
    tokens = model(features)
    windows = split_tokens_per_latent_frame(tokens, num_latent, model.tokens_per_frame)
    lens = window_token_lens(num_latent, model.tokens_per_frame)
    return [
        ("tokens", tokens, io["tokens"]),
        ("window_tokens", windows, io["window_tokens"]),
        ("window_token_lens", lens.float(), io["window_token_lens"].float()),
    ]


@torch.no_grad()
def run_pdfgc_motion_encoder(weights_path: Path, io: dict[str, torch.Tensor], manifest: dict) -> Triples:
    """PD-FGC fixture: ``faces`` [B, 3, 224, 224] in [-1, 1] -> ``headpose`` [B, 6], ``eye`` [B, 6],
    ``emotion`` [B, 30], ``mouth`` [B, 512] (eval mode). The released architecture has one size only,
    so ``manifest`` is not needed."""
    model = load_pdfgc_motion_encoder(weights_path)
    parts = model.encode_parts(io["faces"].float())
    return [(name, parts[name], io[name]) for name in ("headpose", "eye", "emotion", "mouth")]
