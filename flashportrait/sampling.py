"""Sliding-window sampling over a model callable (SPEC.md section 4), k-diffusion style.

The sampler knows nothing about the transformer: it calls ``model(x, timestep, window)`` for every
context window of the current full-length latent, blends the window velocities into one full-length
velocity (:class:`~flashportrait.windows.WindowBlender`), and takes **one** scheduler step on the full
latent. For the Euler (flow-matching) step this equals the released code's "step every window, blend
the stepped latents"; unlike that, it stays correct for multistep solvers (UniPC, DPM++), whose history
must cover the whole latent (ENVIRONMENT.md, "Verified equivalences").

Flow matching (SPEC.md section 2): ``x_t = (1 - sigma) x_0 + sigma eps``, the model predicts the
velocity ``eps - x_0``, its timestep input is ``1000 * sigma`` (``sigma`` in [0, 1], timestep on the
0..1000 training scale).

:class:`WindowDenoiser` is the model callable for the FlashPortrait transformer: per-window
conditioning (mask + reference latents, text, CLIP image, the window's own expression tokens) and the
three-branch guidance (:mod:`flashportrait.guidance`) evaluated as one batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import DEFAULT_SHIFT, NUM_TRAIN_TIMESTEPS, TOKENS_PER_FRAME, VAE_TEMPORAL_FACTOR
from .guidance import GuidancePlan, batch_branch_inputs, combine_branches
from .windows import WindowBlender, check_windows, window_video_frames

__all__ = [
    "SAMPLERS",
    "make_scheduler",
    "blended_velocity",
    "sample_windows",
    "first_frame_mask",
    "ExpressionTokenWindows",
    "WindowDenoiser",
]

#: sampler names accepted by :func:`make_scheduler` (``--sampler``)
SAMPLERS = ("euler", "unipc", "dpm++")

#: model callable: ``(x [B, 16, L, h, w] float32, timestep 0-d float tensor on the 0..1000 scale,
#: window range of latent frames) -> velocity [B, 16, L, h, w]``
WindowModel = Callable[[torch.Tensor, torch.Tensor, range], torch.Tensor]


def make_scheduler(name: str = "euler", shift: float = DEFAULT_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """A diffusers flow-matching scheduler by name.

    * ``"euler"``: ``FlowMatchEulerDiscreteScheduler(shift=shift)`` (released default sampler "Flow",
      shift 5: sigmas ``linspace(1, sigma_min)`` mapped through ``shift s / (1 + (shift - 1) s)``);
    * ``"unipc"``: ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
      flow_shift=shift)`` (Wan's default solver, "Flow_Unipc" upstream);
    * ``"dpm++"``: ``DPMSolverMultistepScheduler`` with the same flow settings,
      ``algorithm_type="dpmsolver++"`` ("Flow_DPM++" upstream).

    Raises:
        ValueError: unknown ``name``, ``shift <= 0`` or ``num_train_timesteps < 1``.
    """
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=float(shift))
    flow = dict(
        num_train_timesteps=num_train_timesteps,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=float(shift),
    )
    if name == "unipc":
        return UniPCMultistepScheduler(**flow)
    if name == "dpm++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **flow)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")


def blended_velocity(
    model: WindowModel,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    windows: Sequence[range],
    disable: bool | None = None,
) -> torch.Tensor:
    """Evaluate ``model`` on every window of ``latents`` and blend into one velocity (SPEC.md section 4).

    Args:
        model: ``model(x_window, timestep, window) -> velocity`` (see ``WindowModel``).
        latents: ``[B, C, F, h, w]`` full-length noisy latent.
        timestep: 0-d tensor, 0..1000 scale.
        windows: in order, as :func:`~flashportrait.windows.context_windows` returns them.
        disable: hide the per-window progress bar (``None``: hide when not a terminal).

    Returns:
        ``[B, C, F, h, w]`` float32 blended velocity.
    """
    blender = WindowBlender(latents.shape[2], dim=2, dtype=torch.float32)
    for window in tqdm(windows, desc="windows", leave=False, disable=disable or len(windows) == 1):
        blender.add(window, model(latents[:, :, window.start : window.stop], timestep, window))
    return blender.result()


def sample_windows(
    model: WindowModel,
    latents: torch.Tensor,
    scheduler,
    num_inference_steps: int,
    windows: Sequence[range],
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sliding-window sampling with one scheduler over the full latent (SPEC.md section 4).

    Per timestep: every window is evaluated, the window velocities are blended
    (:func:`blended_velocity`), then ``scheduler.step`` advances the full latent once. Multistep
    schedulers therefore keep one consistent history for the whole video.

    Args:
        model: window model callable (``WindowModel``).
        latents: ``[B, 16, F, h, w]`` initial noise (sigma = 1; flow schedulers have
            ``init_noise_sigma = 1``). Computed in float32 whatever its dtype.
        scheduler: a diffusers scheduler from :func:`make_scheduler` (its timesteps are reset here).
        num_inference_steps: sampling steps, ``>= 1``.
        windows: from :func:`~flashportrait.windows.context_windows` (checked).
        callback: called after every step with ``{"step": i, "timestep": t (0..1000), "sigma": sigma_i,
            "latents": latents after the step, "velocity": blended velocity}``.
        disable: hide the progress bars.
        generator: passed to ``scheduler.step`` when it accepts one (stochastic samplers).

    Returns:
        ``[B, 16, F, h, w]`` float32 denoised latents.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    check_windows(windows, latents.shape[2])
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents.float()
    sigmas = scheduler.sigmas
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if generator is not None and accepts_generator else {}
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="steps", disable=disable)):
        velocity = blended_velocity(model, latents, t, windows, disable=disable)
        latents = scheduler.step(velocity, t, latents, return_dict=False, **step_kwargs)[0].float()
        if callback is not None:
            callback({"step": i, "timestep": t, "sigma": sigmas[i], "latents": latents, "velocity": velocity})
    return latents


# --- the FlashPortrait window model ------------------------------------------------------------------------


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
        split: ``split(tokens [B, n*T, C], num_latent_frames) -> [B, L, 4T+1, C]``; defaults to
            :func:`flashportrait.models.portrait_encoder.split_tokens_per_latent_frame`.

    Raises:
        ValueError: features that are not 2- or 3-D; (on call) a window beyond the features, or an
            encoder whose output is not ``T`` tokens per frame.
    """

    def __init__(
        self,
        features: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor],
        tokens_per_frame: int = TOKENS_PER_FRAME,
        split=None,
    ):
        if features.ndim not in (2, 3):
            raise ValueError(f"features must be [N, D] or [B, N, D], got shape {tuple(features.shape)}")
        if split is None:
            from .models.portrait_encoder import split_tokens_per_latent_frame

            def split(t, n):
                return split_tokens_per_latent_frame(t, n, tokens_per_frame=tokens_per_frame)

        self.features = features if features.ndim == 3 else features[None]
        self.encode = encode
        self.tokens_per_frame = tokens_per_frame
        self.num_video_frames = self.features.shape[1]
        self._split = split

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
        return self._split(tokens, len(window))


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
        n = self.plan.num_branches
        length = x.shape[2]
        if length != len(window) or length > self.condition.shape[2]:
            raise ValueError(
                f"window {window} with {length} latent frames; the condition has {self.condition.shape[2]}"
            )
        inputs = torch.cat([x.to(self.dtype), self.condition[:, :, :length]], dim=1)
        tokens = None if self.expression_tokens is None else self.expression_tokens(window).to(self.dtype)
        t = torch.as_tensor(timestep, device=x.device).reshape(-1)
        if self.batch_branches:
            out = self._forward(inputs.repeat(n, 1, 1, 1, 1), t, tokens, n, slice(None))
        else:
            batch = x.shape[0]
            out = torch.cat([self._forward(inputs, t, tokens, 1, slice(i * batch, (i + 1) * batch)) for i in range(n)])
        return combine_branches(self.plan, out)

    def _forward(self, inputs, t, tokens, repeats: int, rows: slice) -> torch.Tensor:
        """One transformer call on ``inputs`` (already ``repeats`` times batched) for branch rows ``rows``."""
        if tokens is not None:
            tokens = tokens.repeat(repeats, 1, 1, 1)
        return self.transformer(
            hidden_states=inputs,
            timestep=t.expand(inputs.shape[0]),
            encoder_hidden_states=self.text[rows],
            encoder_hidden_states_image=self.image[rows],
            expression_tokens=tokens,
            expression_scale=self.scale[rows].to(inputs.device) if tokens is not None else None,
            attention_kwargs=self.attention_kwargs,
            return_dict=False,
        )[0]
