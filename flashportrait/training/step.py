"""One training step (SPEC.md section 7): frozen encoders -> noisy latents -> the trainable model -> loss.

Every random draw of a step (VAE posterior sample, sigmas, noise, expression dropout, the loss weighting)
comes from one CPU ``torch.Generator`` the caller seeds from ``(seed, step, micro-step, rank)``
(:func:`step_generator`): a resumed run draws exactly what an uninterrupted one did, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import (
    DEFAULT_SHIFT,
    NUM_TRAIN_TIMESTEPS,
    TRAIN_EXPRESSION_DROPOUT,
    TRAIN_LOSS_MASK_CHOICES,
    TRAIN_MOTION_SUB_LOSS_RATIO,
)
from ..latents import normalize_latents
from ..reference_image import clip_preprocess, encode_clip_image
from ..windows import latent_frames_for_video_frames
from .losses import choose_mask_weighting, flow_matching_loss, masks_to_latent_grid, sample_sigmas

__all__ = ["StepSettings", "step_generator", "FrozenEncoders", "training_step"]


@dataclass(frozen=True)
class StepSettings:
    """What a step does, from the flags.

    Attributes:
        shift: timestep shift (5). num_train_timesteps: discrete training steps (1000).
        motion_ratio: weight ``r`` of the motion term, ``None`` to leave it out (no ``--motion_sub_loss``).
        expression_dropout: probability of zeroing a sample's expression tokens (0.1).
        mask_choices: ``(probability, weighting)`` pairs of the loss weighting draw.
        uniform_sampling: each rank draws its sigmas from its own stratum of the timestep range.
    """

    shift: float = DEFAULT_SHIFT
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    motion_ratio: float | None = TRAIN_MOTION_SUB_LOSS_RATIO
    expression_dropout: float = TRAIN_EXPRESSION_DROPOUT
    mask_choices: tuple = TRAIN_LOSS_MASK_CHOICES
    uniform_sampling: bool = False


def step_generator(seed: int, step: int, micro_step: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch: a fixed function of its position in training and the rank."""
    import numpy as np

    state = np.random.SeedSequence([seed % 2**32, step, micro_step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state) & (2**63 - 1))


class FrozenEncoders:
    """The frozen side of training: VAE, CLIP image tower, the training prompts' umT5 embeddings, and
    optionally the PD-FGC motion encoder (online expression features).

    Args:
        pipeline: a :class:`~flashportrait.pipeline.FlashPortraitPipeline` holding at least ``vae`` and
            ``image_encoder`` (its ``encode_condition`` builds the 20 condition channels).
        prompt_embeds: ``[P, Lt, D]`` umT5 embeddings of :func:`~flashportrait.training.data.training_prompts`
            (from ``pipeline.encode_prompt``; the text encoder is not needed afterwards).
        motion_encoder: PD-FGC, needed only for batches with ``face_crops``.
        device: where the encoders run. vae_mini_batch: samples per VAE call.
        offload: keep the encoders on the CPU between batches (moved to ``device`` for each batch's encoding:
            less accelerator memory, one transfer each per step); otherwise they are moved there once.
    """

    def __init__(self, pipeline, prompt_embeds: torch.Tensor, motion_encoder: nn.Module | None = None, *,
                 device: torch.device | str = "cpu", vae_mini_batch: int = 1, offload: bool = False):
        self.pipeline = pipeline
        self.prompt_embeds = prompt_embeds
        self.motion_encoder = motion_encoder
        self.device = torch.device(device)
        self.vae_mini_batch = max(1, int(vae_mini_batch))
        self.offload = offload
        self._place("cpu" if offload else self.device)

    def _modules(self) -> list[nn.Module]:
        return [m for m in (self.pipeline.vae, self.pipeline.image_encoder, self.motion_encoder) if m is not None]

    def _place(self, device) -> None:
        for module in self._modules():
            module.to(device)

    @torch.no_grad()
    def encode(self, batch: dict, generator: torch.Generator) -> dict:
        """Frozen encodings of a collated batch (see :meth:`_encode`); with ``offload`` the encoders visit
        ``device`` for the call only."""
        if not self.offload:
            return self._encode(batch, generator)
        self._place(self.device)
        try:
            return self._encode(batch, generator)
        finally:
            self._place("cpu")

    def _encode(self, batch: dict, generator: torch.Generator) -> dict:
        """Frozen encodings of a collated batch (:func:`~flashportrait.training.data.collate_clips`).

        Returns:
            ``latents`` ``[B, 16, F, h, w]`` float32 (a posterior sample, normalised), ``condition``
            ``[B, 20, F, h, w]``, ``image_embeds`` ``[B, 257, C]``, ``prompt_embeds`` ``[B, Lt, D]``,
            ``features`` ``[B, N, 554]`` float32, ``face`` / ``lip`` ``[B, 1, F, h, w]`` latent-grid masks.
        """
        pipe = self.pipeline
        vae = pipe.vae
        pixels = batch["pixels"].to(self.device)  # uint8 [B, 3, N, H, W]
        num_latent = latent_frames_for_video_frames(pixels.shape[2])
        video = pixels.to(vae.dtype) / 127.5 - 1.0
        latents, conditions = [], []
        for start in range(0, video.shape[0], self.vae_mini_batch):
            part = video[start : start + self.vae_mini_batch]
            dist = vae.encode(part).latent_dist
            latents.append(normalize_latents(vae, dist.sample(generator=generator)))
            conditions.append(pipe.encode_condition(part[:, :, 0], num_latent))
        reference = pixels[:, :, 0]  # the first sampled frame
        image_embeds = encode_clip_image(pipe.image_encoder, clip_preprocess(reference.cpu()).to(self.device)).float()
        features = batch["features"].to(self.device, torch.float32)
        if "face_crops" in batch and bool(batch["needs_features"].any()):
            features = self._online_features(batch, features)
        return {
            "latents": torch.cat(latents),
            "condition": torch.cat(conditions),
            "image_embeds": image_embeds,
            "prompt_embeds": self.prompt_embeds[batch["prompt_index"].to(self.prompt_embeds.device)].to(self.device),
            "features": features,
            "face": masks_to_latent_grid(batch["face_masks"].to(self.device), num_latent),
            "lip": masks_to_latent_grid(batch["lip_masks"].to(self.device), num_latent),
        }

    def _online_features(self, batch: dict, features: torch.Tensor) -> torch.Tensor:
        from ..face import to_model_input

        if self.motion_encoder is None:
            raise ValueError("some clips have no expression.pt and no motion encoder was loaded; give "
                             "--pd_fpg_model_path or run prepare_data")
        features = features.clone()
        param = next(self.motion_encoder.parameters())
        for row in torch.nonzero(batch["needs_features"]).flatten().tolist():
            x = to_model_input(batch["face_crops"][row].numpy(), device=self.device, dtype=param.dtype)
            features[row] = self.motion_encoder(x).float()
        return features


def training_step(model: nn.Module, encoders: FrozenEncoders, batch: dict, generator: torch.Generator,
                  settings: StepSettings, *, stratum: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Forward pass and loss of one micro-batch (module docstring; SPEC.md section 7).

    Draw order from ``generator``: VAE posterior samples, sigmas, noise, expression dropout, loss weighting.

    Args:
        model: :class:`~flashportrait.training.trainable.FlashPortraitTrainModel` (or its DeepSpeed / DDP wrapper).
        stratum: ``(rank, world size)`` with ``settings.uniform_sampling``.

    Returns:
        :func:`~flashportrait.training.losses.flow_matching_loss`'s dict plus ``"sigma"`` (mean of the batch);
        ``"loss"`` carries the graph.
    """
    inputs = encoders.encode(batch, generator)
    x0 = inputs["latents"]
    b = x0.shape[0]
    sigmas = sample_sigmas(b, generator, shift=settings.shift, num_train_timesteps=settings.num_train_timesteps,
                           stratum=stratum if settings.uniform_sampling else None)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    s = sigmas.to(x0.device).view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    target = noise - x0
    keep = (torch.rand(b, generator=generator) >= settings.expression_dropout).float().to(x0.device)
    weighting = choose_mask_weighting(generator, settings.mask_choices)
    pred = model(noisy, inputs["condition"], (sigmas * 1000).to(x0.device), inputs["prompt_embeds"],
                 inputs["image_embeds"], inputs["features"], keep)
    out = flow_matching_loss(pred, target, inputs["face"], inputs["lip"], weighting, settings.motion_ratio)
    out["sigma"] = sigmas.mean()
    out["weighting"] = weighting
    return out
