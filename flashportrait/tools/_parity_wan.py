"""Parity runners for the Wan2.1 component fixtures (``wan_t5_<v>``, ``wan_clip_<v>``, ``wan_vae_<v>``).

Each ``run_<fixture kind>(weights_path, io, manifest)`` loads the fixture's weights file (original Wan naming)
through the project's public loaders in :mod:`flashportrait.checkpoints`, with the sizes of
``manifest["t5" | "clip" | "vae"]``, runs it in float32 on the CPU and returns
``[(output_name, ours, reference), ...]`` for the ``check_parity`` command (relative L2 <= 1e-4).
See /work/shared/reference/golden/README.md for the io tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoints import load_clip_vision, load_umt5_encoder, load_wan_vae
from ..reference_image import encode_clip_image

__all__ = ["run_wan_t5", "run_wan_clip", "run_wan_vae"]

Outputs = list[tuple[str, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def run_wan_t5(weights_path: Path, io: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Outputs:
    """umT5 encoder: ``last_hidden_state`` [B, L, dim], compared at the positions where ``attention_mask`` is 1
    (the reference trims padded positions), flattened to [n_valid, dim]."""
    model = load_umt5_encoder(weights_path, config=manifest.get("t5"), dtype=torch.float32)
    mask = io["attention_mask"]
    ours = model(input_ids=io["input_ids"], attention_mask=mask).last_hidden_state
    valid = mask.bool()
    return [("last_hidden_state", ours[valid], io["last_hidden_state"][valid])]


@torch.no_grad()
def run_wan_clip(weights_path: Path, io: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Outputs:
    """CLIP vision tower: ``penultimate_hidden_states`` [B, tokens, dim] from ``pixel_values`` [B, 3, S, S]."""
    model = load_clip_vision(weights_path, config=manifest.get("clip"), dtype=torch.float32)
    ours = encode_clip_image(model, io["pixel_values"])
    return [("penultimate_hidden_states", ours, io["penultimate_hidden_states"])]


@torch.no_grad()
def run_wan_vae(weights_path: Path, io: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Outputs:
    """Wan VAE: ``normalized_latents = (mu - latents_mean) / latents_std`` of ``video`` [1, 3, T, H, W] and
    ``decoded = decode(normalized_latents * latents_std + latents_mean)`` [1, 3, T, H, W].

    The fixture's ``latents_mean`` / ``latents_std`` are passed to the loader through ``config`` and read back
    from ``vae.config``, so the normalisation uses the loaded model's statistics as inference does.
    """
    config = dict(manifest.get("vae") or {})
    config["latents_mean"] = io["latents_mean"].tolist()
    config["latents_std"] = io["latents_std"].tolist()
    vae = load_wan_vae(weights_path, config=config, dtype=torch.float32)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape)
    mu = vae.encode(io["video"].float()).latent_dist.mean
    normalized = (mu - mean) / std
    decoded = vae.decode(io["normalized_latents"] * std + mean).sample
    return [("normalized_latents", normalized, io["normalized_latents"]), ("decoded", decoded, io["decoded"])]
