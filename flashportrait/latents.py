"""The Wan VAE's latent space: normalisation, and decoding in chunks through its causal cache.

The transformer works on *normalised* latents ``(z - latents_mean) / latents_std`` (per channel, the VAE
config's 16 values; SPEC.md section 2). :func:`iter_decode_latents` decodes them chunk by chunk with the
VAE's causal feature cache kept between chunks, which equals one whole-video decode while holding only
one chunk of frames (ENVIRONMENT.md, "Verified equivalences"), so output length costs no memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["normalize_latents", "denormalize_latents", "iter_decode_latents", "frames_to_uint8"]


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
    return mean, std


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents ``[B, 16, F, h, w]`` -> the transformer's space ``(z - latents_mean) / latents_std``
    (float32)."""
    mean, std = _latent_stats(vae, latents)
    return (latents.float() - mean) / std


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_latents` (float32)."""
    mean, std = _latent_stats(vae, latents)
    return latents.float() * std + mean


def _vae_onload(vae) -> None:
    """Trigger an accelerate offload hook on ``vae`` (as diffusers' ``apply_forward_hook`` does)."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


@torch.no_grad()
def iter_decode_latents(vae, latents: torch.Tensor, chunk_size: int = 4) -> Iterator[torch.Tensor]:
    """Decode normalised latents chunk by chunk through the Wan VAE's causal cache.

    ``AutoencoderKLWan._decode`` runs its decoder one latent frame at a time with a feature cache
    (``_feat_map`` / ``_conv_idx``); doing the same here across chunks, with the cache kept between them,
    is exactly the whole-video decode while only one chunk of frames is ever held. Decoding windows
    independently would not be.

    Args:
        vae: ``AutoencoderKLWan`` (Wan2.1: ``patch_size`` None; tiling is not used here).
        latents: ``[B, 16, F, h, w]`` normalised latents (the sampler's output).
        chunk_size: latent frames per yielded chunk, ``>= 1``.

    Yields:
        ``[B, 3, T, 8h, 8w]`` float in ``[-1, 1]`` (vae dtype): ``T = 1 + 4 (c - 1)`` for the first chunk
        of ``c`` latent frames (latent frame 0 decodes to one frame), ``4c`` afterwards; in all
        ``4(F - 1) + 1`` frames.

    Raises:
        ValueError: ``chunk_size < 1``, or a VAE with ``patch_size`` (Wan2.2).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 latent frame, got {chunk_size}")
    if getattr(vae.config, "patch_size", None) is not None:
        raise ValueError("iter_decode_latents supports the Wan2.1 VAE (patch_size None) only")
    _vae_onload(vae)
    z = denormalize_latents(vae, latents)
    device = next(vae.post_quant_conv.parameters()).device
    if device.type == "meta":  # sequential offload: the submodule hooks place inputs themselves
        device = latents.device
    vae.clear_cache()
    try:
        for start in range(0, z.shape[2], chunk_size):
            x = vae.post_quant_conv(z[:, :, start : start + chunk_size].to(device=device, dtype=vae.dtype))
            outs = []
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                outs.append(
                    vae.decoder(
                        x[:, :, i : i + 1],
                        feat_cache=vae._feat_map,
                        feat_idx=vae._conv_idx,
                        first_chunk=(start + i == 0),
                    )
                )
            yield torch.clamp(torch.cat(outs, dim=2), -1.0, 1.0)
    finally:
        vae.clear_cache()


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[1, 3, T, H, W]`` in ``[-1, 1]`` -> uint8 ``[T, H, W, 3]`` RGB (rounded).

    Raises:
        ValueError: another shape.
    """
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"video must be [1, 3, T, H, W], got {tuple(video.shape)}")
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()
