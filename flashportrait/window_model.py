"""The FlashPortrait model callable for the windowed sampler (SPEC.md sections 2 and 4).

:mod:`flashportrait.sampling` calls ``model(x, timestep, window)`` on a window of the full latent and knows
nothing else; this module builds that callable around the transformer, as k-diffusion's ``external.py``
wraps models for its samplers:

* :func:`first_frame_mask`: the 4 Wan I2V mask channels (1 on latent frame 0);
* :class:`ExpressionTokenWindows`: each window's expression tokens, encoded on demand from its own video
  frames' features by the portrait encoder (memory flat in video length);
* :class:`WindowDenoiser`: per-window conditioning (mask + reference latents, text, CLIP image, the
  window's tokens) and the three-branch guidance (:mod:`flashportrait.guidance`) as one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import TOKENS_PER_FRAME, VAE_TEMPORAL_FACTOR
from .guidance import GuidancePlan, batch_branch_inputs, combine_branches
from .models.portrait_encoder import split_tokens_per_latent_frame
from .windows import window_video_frames

__all__ = ["first_frame_mask", "ExpressionTokenWindows", "WindowDenoiser"]


def first_frame_mask(num_latent_frames: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The 4 mask channels of Wan I2V: 1 on latent frame 0 (the reference slot), 0 elsewhere.

    Wan builds the mask per video frame (1 on frame 0), repeats frame 0 four times and folds time by 4;
    the result is all four channels equal to 1 on latent frame 0 (SPEC.md section 4).

    Returns:
        ``[1, 4, num_latent_frames, height, width]`` (latent height/width).
    """
    mask = torch.zeros(1, VAE_TEMPORAL_FACTOR, num_latent_frames, height, width, device=device, dtype=dtype)
    mask[:, :, 0] = 1
    return mask


class ExpressionTokenWindows:
    """Per-window expression tokens, encoded on demand from the driving features (SPEC.md sections 2, 4).

    The portrait encoder maps each video frame to its own ``T`` tokens (24 released) independently of its
    neighbours, so a window of latent frames ``a .. b-1`` is given exactly the tokens of its video frames
    ``4a .. 4(b-1)`` by encoding just those frames, split per latent frame into ``[B, b - a, 4T + 1, C]``
    as a clip of its own (the window's first latent frame plays the reference slot and gets only video
    frame ``4a``'s tokens plus zero padding). Only the ``[N, 554]`` features are held (2.2 KB per frame
    in float32) instead of the whole video's tokens (``24 x 2048`` numbers, 196 KB per frame), so memory
    does not grow with video length; the encoder is small next to the transformer it feeds.

    Args:
        features: ``[N, D]`` per-video-frame features (``D = 554``), ``N >= 4(F - 1) + 1`` for the
            ``F``-frame latent; or ``[B, N, D]``.
        encode: ``encode(features [B, n, D]) -> tokens [B, n * T, C]`` (frame-major), e.g. the portrait
            encoder followed by a move to the transformer's device and dtype.
        tokens_per_frame: ``T``.

    Raises:
        ValueError: features that are not 2- or 3-D; (on call) a window beyond the features, or an
            encoder whose output is not ``T`` tokens per frame.
    """

    def __init__(
        self,
        features: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor],
        tokens_per_frame: int = TOKENS_PER_FRAME,
    ):
        if features.ndim not in (2, 3):
            raise ValueError(f"features must be [N, D] or [B, N, D], got shape {tuple(features.shape)}")
        self.features = features if features.ndim == 3 else features[None]
        self.encode = encode
        self.tokens_per_frame = tokens_per_frame
        self.num_video_frames = self.features.shape[1]

    def __call__(self, window: range) -> torch.Tensor:
        frames = window_video_frames(window)
        if frames.stop > self.num_video_frames:
            raise ValueError(
                f"window {window} needs video frames up to {frames.stop - 1}, the features cover {self.num_video_frames}"
            )
        tokens = self.encode(self.features[:, frames.start : frames.stop])
        expected = len(frames) * self.tokens_per_frame
        if tokens.ndim != 3 or tokens.shape[1] != expected:
            raise ValueError(
                f"the expression encoder returned shape {tuple(tokens.shape)} for {len(frames)} frames; expected "
                f"[B, {expected}, C] ({self.tokens_per_frame} tokens per frame, frame-major)"
            )
        return split_tokens_per_latent_frame(tokens, len(window), tokens_per_frame=self.tokens_per_frame)


class WindowDenoiser:
    """The window model callable for a FlashPortrait (Wan I2V) transformer, with guidance.

    ``denoiser(x [B, 16, L, h, w], timestep, window) -> guided velocity [B, 16, L, h, w] float32``.

    Per window (SPEC.md section 4): the transformer input is ``[x; mask; condition]`` (16 + 4 + 16
    channels) where mask/condition are the first ``L`` latent frames of the reference conditioning (the
    same for every window: each window is conditioned like a clip starting at the reference image), the
    same text and CLIP image features, and the window's own expression tokens. The needed guidance
    branches (``plan``) run as one batch with a per-sample ``expression_scale``.

    Args:
        transformer: callable like ``FlashPortraitTransformer3DModel.forward`` (keyword arguments
            ``hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
            expression_tokens, expression_scale, attention_kwargs, return_dict``).
        condition: ``[B, 20, L_max, h, w]``: 4 mask channels (:func:`first_frame_mask`) + 16 normalised
            VAE latents of ``[reference image, zeros ...]``, ``L_max >=`` every window's length. The VAE is
            causal, so the first ``L`` latent frames of a longer encoding equal the encoding of the
            shorter clip.
        plan: from :func:`flashportrait.guidance.plan_guidance`.
        prompt_embeds, negative_prompt_embeds: ``[B, Lt, 4096]`` (the negative one only if ``"U"`` is in
            the plan).
        image_embeds: ``[B, 257, 1280]`` CLIP penultimate hidden states.
        expression_tokens: ``window -> [B, L, 97, 2048]`` (e.g. :class:`ExpressionTokenWindows`), or
            ``None`` for no expression conditioning.
        dtype: transformer compute dtype for the inputs (output is float32).
        attention_kwargs: passed through to the transformer.
        batch_branches: run the guidance branches as one batch (default; fastest) or one after another
            (same result, peak activation memory of one branch, for small GPUs).
    """

    def __init__(
        self,
        transformer,
        condition: torch.Tensor,
        plan: GuidancePlan,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        image_embeds: torch.Tensor,
        expression_tokens: Callable[[range], torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        attention_kwargs: dict | None = None,
        batch_branches: bool = True,
    ):
        self.transformer = transformer
        self.plan = plan
        self.dtype = dtype or condition.dtype
        self.condition = condition.to(self.dtype)
        self.expression_tokens = expression_tokens
        self.attention_kwargs = attention_kwargs
        self.batch_branches = batch_branches
        batch = prompt_embeds.shape[0]
        if image_embeds.shape[0] != batch or condition.shape[0] != batch:
            raise ValueError(
                f"batch sizes differ: prompt_embeds {batch}, image_embeds {image_embeds.shape[0]}, "
                f"condition {condition.shape[0]}"
            )
        text, _, scale = batch_branch_inputs(plan, prompt_embeds, negative_prompt_embeds, None)
        self.text = text.to(self.dtype)
        self.scale = scale
        self.image = image_embeds.to(self.dtype).repeat(plan.num_branches, 1, 1)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, window: range) -> torch.Tensor:
        """The guided velocity ``[B, 16, L, h, w]`` float32 of window ``window`` (``x`` its noisy latents), on ``x``'s
        device (the transformer runs on the condition's device)."""
        return self.combine(self.branch_outputs(x, timestep, window))

    def combine(self, outputs: torch.Tensor) -> torch.Tensor:
        """Guided velocity from all branches' outputs (:meth:`branch_outputs` order), float32."""
        return combine_branches(self.plan, outputs)

    def branch_outputs(
        self, x: torch.Tensor, timestep: torch.Tensor, window: range, branches: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Raw transformer outputs of guidance branches, before they are combined.

        Args:
            x: ``[B, 16, L, h, w]`` noisy latents of ``window``, on any device: a window of full-length latents
                kept in CPU memory (very long videos) is moved to the model's device (the condition's) and the
                outputs are moved back.
            timestep: 0-d or 1-element tensor on the 0..1000 scale.
            window: latent frames ``x`` holds.
            branches: indices into ``plan.branches`` to evaluate (default: all), e.g. to forecast some
                branches instead of evaluating them, or to give branches to different ranks.

        Returns:
            ``[len(branches) * B, 16, L, h, w]`` in the transformer's output dtype on ``x``'s device,
            branch-major in the order of ``branches``.
        """
        indices = list(range(self.plan.num_branches)) if branches is None else list(branches)
        length = x.shape[2]
        if length != len(window) or length > self.condition.shape[2]:
            raise ValueError(
                f"window {window} with {length} latent frames; the condition has {self.condition.shape[2]}"
            )
        device = self.condition.device
        inputs = torch.cat([x.to(device=device, dtype=self.dtype), self.condition[:, :, :length]], dim=1)
        tokens = None if self.expression_tokens is None else self.expression_tokens(window).to(device, self.dtype)
        t = torch.as_tensor(timestep, device=device).reshape(-1)
        batch = x.shape[0]
        rows = [torch.arange(i * batch, (i + 1) * batch) for i in indices]
        if self.batch_branches:
            out = self._forward(inputs.repeat(len(indices), 1, 1, 1, 1), t, tokens, len(indices), torch.cat(rows))
        else:
            out = torch.cat([self._forward(inputs, t, tokens, 1, r) for r in rows])
        return out.to(x.device)

    def _forward(self, inputs, t, tokens, repeats: int, rows: torch.Tensor) -> torch.Tensor:
        """One transformer call on ``inputs`` (already ``repeats`` times batched) for branch rows ``rows``
        (indices into the branch-major text / image / scale batches)."""
        if tokens is not None:
            tokens = tokens.repeat(repeats, 1, 1, 1)
        return self.transformer(
            hidden_states=inputs,
            timestep=t.expand(inputs.shape[0]),
            encoder_hidden_states=self.text[rows.to(self.text.device)],
            encoder_hidden_states_image=self.image[rows.to(self.image.device)],
            expression_tokens=tokens,
            expression_scale=self.scale[rows].to(inputs.device) if tokens is not None else None,
            attention_kwargs=self.attention_kwargs,
            return_dict=False,
        )[0]
