"""The training objective (SPEC.md section 7): flow matching with uniform shifted timesteps, a face / lip
mask-weighted velocity loss with one random weighting per step, and the motion term.

* Timesteps: an index ``i`` uniform over the ``T`` training steps (1000), ``u = (i + 1) / T``, then Wan's
  shift ``sigma = s u / (1 + (s - 1) u)`` (s = 5) and ``timestep = 1000 sigma``: the sigmas of diffusers'
  ``FlowMatchEulerDiscreteScheduler`` with ``shift=s`` over its ``T`` training steps.
* Noisy latents ``x_t = (1 - sigma) x_0 + sigma eps``; target velocity ``v = eps - x_0``.
* Main term, per element ``e = (v_pred - v)^2`` in float32, with the face and lip masks resized to the latent
  grid (:func:`masks_to_latent_grid`) and one weighting drawn per step (:data:`~flashportrait.config.
  TRAIN_LOSS_MASK_CHOICES`): ``"all"`` ``mean(e (1 + face + lip))`` (p 0.5), ``"face"`` ``mean(e face)``
  (p 0.2), ``"lip"`` ``mean(e lip)`` (p 0.3). The paper weights the loss by ``1 + M_face + M_lip``.
* Motion term: ``mean((dv_pred - dv)^2)`` over the differences along latent time (``d`` = next frame minus
  this frame), only when there are at least 2 latent frames.
* Total: ``(1 - r) main + r motion`` with ``r`` = ``--motion_sub_loss_ratio`` (0.25) when the motion term is
  on, else ``main``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import (
    DEFAULT_SHIFT,
    NUM_TRAIN_TIMESTEPS,
    TRAIN_LOSS_MASK_CHOICES,
    VAE_SPATIAL_FACTOR,
    VAE_TEMPORAL_FACTOR,
)

__all__ = [
    "MASK_WEIGHTINGS",
    "shift_sigmas",
    "sample_sigmas",
    "choose_mask_weighting",
    "masks_to_latent_grid",
    "mask_weighted_loss",
    "motion_loss",
    "flow_matching_loss",
]

MASK_WEIGHTINGS = ("all", "face", "lip")


def shift_sigmas(u: torch.Tensor, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """Wan / SD3 timestep shift ``sigma = s u / (1 + (s - 1) u)`` (``u`` in (0, 1])."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(
    batch_size: int,
    generator: torch.Generator,
    *,
    shift: float = DEFAULT_SHIFT,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    stratum: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Training sigmas: an index uniform over ``num_train_timesteps``, shifted (module docstring).

    Args:
        batch_size: how many to draw.
        generator: the step's CPU generator (the draw is reproducible from it alone).
        shift: schedule shift (5 released).
        num_train_timesteps: the discrete training steps ``T`` (``--train_sampling_steps``, 1000).
        stratum: ``(k, K)``: draw only from the ``k``-th of ``K`` equal parts of the index range
            (``--uniform_sampling``: the ranks of one step then cover the range evenly).

    Returns:
        float32 ``[batch_size]`` in ``(0, 1]``; the timestep is ``1000 * sigma``.
    """
    low, high = 0, num_train_timesteps
    if stratum is not None:
        k, parts = stratum
        if not 0 <= k < parts:
            raise ValueError(f"stratum {stratum}: need 0 <= k < K")
        low = k * num_train_timesteps // parts
        high = max(low + 1, (k + 1) * num_train_timesteps // parts)
    index = torch.randint(low, high, (batch_size,), generator=generator)
    u = (index.double() + 1) / num_train_timesteps
    return shift_sigmas(u, shift).float()


def choose_mask_weighting(generator: torch.Generator,
                          choices: Sequence[tuple[float, str]] = TRAIN_LOSS_MASK_CHOICES) -> str:
    """One draw of the loss weighting for a step: ``"all"``, ``"face"`` or ``"lip"`` with the probabilities
    of ``choices`` (released 0.5 / 0.2 / 0.3), from one uniform number of ``generator``."""
    r = float(torch.rand((), generator=generator))
    total = 0.0
    for probability, name in choices:
        total += probability
        if r < total:
            return name
    return choices[-1][1]


def masks_to_latent_grid(masks: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
    """Video-frame masks -> the latent grid, by area averaging (the fraction of each latent cell covered).

    Video frame 0 maps to latent frame 0; frames ``4i - 3 .. 4i`` to latent frame ``i`` (the Wan VAE's causal
    4x time compression); each ``8 x 8`` pixel block to one latent position.

    Args:
        masks: ``[B, N, H, W]`` in [0, 1] (float or uint8 0 / 255), ``N = 4(F - 1) + 1``, ``H, W`` multiples of 8.
        num_latent_frames: ``F``.

    Returns:
        float32 ``[B, 1, F, H / 8, W / 8]`` in [0, 1].

    Raises:
        ValueError: frame count or size that does not fit.
    """
    b, n, h, w = masks.shape
    if n != VAE_TEMPORAL_FACTOR * (num_latent_frames - 1) + 1 or h % VAE_SPATIAL_FACTOR or w % VAE_SPATIAL_FACTOR:
        raise ValueError(
            f"masks of shape {tuple(masks.shape)} do not fit {num_latent_frames} latent frames (need "
            f"{VAE_TEMPORAL_FACTOR * (num_latent_frames - 1) + 1} frames, sides multiple of {VAE_SPATIAL_FACTOR})"
        )
    m = masks.float() / 255.0 if masks.dtype == torch.uint8 else masks.float()
    m = F.avg_pool2d(m.reshape(b * n, 1, h, w), VAE_SPATIAL_FACTOR).reshape(b, n, h // 8, w // 8)
    first = m[:, :1]
    rest = m[:, 1:].reshape(b, num_latent_frames - 1, VAE_TEMPORAL_FACTOR, h // 8, w // 8).mean(dim=2)
    return torch.cat([first, rest], dim=1).unsqueeze(1)


def mask_weighted_loss(pred: torch.Tensor, target: torch.Tensor, face: torch.Tensor, lip: torch.Tensor,
                       weighting: str) -> torch.Tensor:
    """Main term: ``mean(e (1 + face + lip))``, ``mean(e face)`` or ``mean(e lip)`` with ``e = (pred -
    target)^2`` in float32; ``face`` / ``lip`` ``[B, 1, F, h, w]`` broadcast over the 16 channels.

    Returns:
        0-d float32.
    """
    e = (pred.float() - target.float()).square()
    if weighting == "all":
        weight = 1 + face + lip
    elif weighting == "face":
        weight = face
    elif weighting == "lip":
        weight = lip
    else:
        raise ValueError(f"weighting must be one of {MASK_WEIGHTINGS}, got {weighting!r}")
    return (e * weight).mean()


def motion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((d pred - d target)^2)`` with ``d`` the difference between consecutive latent frames (dim 2),
    float32 0-d. Needs at least 2 latent frames."""
    if pred.shape[2] < 2:
        raise ValueError("the motion term needs at least 2 latent frames")
    d_pred = pred.float()[:, :, 1:] - pred.float()[:, :, :-1]
    d_target = target.float()[:, :, 1:] - target.float()[:, :, :-1]
    return (d_pred - d_target).square().mean()


def flow_matching_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    face: torch.Tensor,
    lip: torch.Tensor,
    weighting: str,
    motion_ratio: float | None,
) -> dict[str, torch.Tensor]:
    """The whole objective (module docstring).

    Args:
        pred, target: ``[B, 16, F, h, w]`` predicted and true velocity.
        face, lip: ``[B, 1, F, h, w]`` masks on the latent grid (:func:`masks_to_latent_grid`).
        weighting: the step's draw (:func:`choose_mask_weighting`).
        motion_ratio: ``r`` of the motion term, or ``None`` without it (also without it for ``F = 1``).

    Returns:
        ``{"loss", "loss_main", "loss_motion" (0 when off), "mse"}``, 0-d float32 each; ``"mse"`` is the plain
        unweighted ``mean(e)``, logged because it is comparable from step to step (the weighted terms jump with
        the random weighting).
    """
    main = mask_weighted_loss(pred, target, face, lip, weighting)
    mse = (pred.float() - target.float()).square().mean().detach()
    if motion_ratio is not None and pred.shape[2] >= 2:
        motion = motion_loss(pred, target)
        total = (1 - motion_ratio) * main + motion_ratio * motion
    else:
        motion = torch.zeros((), dtype=torch.float32, device=pred.device)
        total = main
    return {"loss": total, "loss_main": main.detach(), "loss_motion": motion.detach(), "mse": mse}
