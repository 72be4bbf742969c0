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

The FlashPortrait model callable (per-window conditioning and guidance) is
:class:`flashportrait.window_model.WindowDenoiser`; this module imports no model code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .alp import ALPConfig, ALPRun
from .config import DEFAULT_SHIFT, NUM_TRAIN_TIMESTEPS
from .windows import WindowBlender, check_windows

__all__ = [
    "SAMPLERS",
    "make_scheduler",
    "blended_velocity",
    "sample_windows",
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
    blend: bool = True,
) -> torch.Tensor:
    """Evaluate ``model`` on every window of ``latents`` and blend into one velocity (SPEC.md section 4).

    Args:
        model: ``model(x_window, timestep, window) -> velocity`` (see ``WindowModel``).
        latents: ``[B, C, F, h, w]`` full-length noisy latent.
        timestep: 0-d tensor, 0..1000 scale.
        windows: in order, as :func:`~flashportrait.windows.context_windows` returns them.
        disable: hide the per-window progress bar (``None``: hide when not a terminal).
        blend: weighted blending in the overlaps; ``False``: the later window overwrites them (the released
            loop's first step).

    Returns:
        ``[B, C, F, h, w]`` float32 blended velocity.
    """
    blender = WindowBlender(latents.shape[2], dim=2, dtype=torch.float32, blend=blend)
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
    blend_first_step: bool = False,
    velocity_fn: Callable[..., torch.Tensor] | None = None,
    alp: ALPConfig | None = None,
    sigmas: Sequence[float] | None = None,
) -> torch.Tensor:
    """Sliding-window sampling with one scheduler over the full latent (SPEC.md section 4).

    Per timestep: every window is evaluated, the window velocities are blended
    (:func:`blended_velocity`), then ``scheduler.step`` advances the full latent once. Multistep
    schedulers therefore keep one consistent history for the whole video. At the first step the later
    window's velocity overwrites the overlaps, as the released loop does (it blends from the second step
    on); ``blend_first_step=True`` blends at every step.

    Args:
        model: window model callable (``WindowModel``).
        latents: ``[B, 16, F, h, w]`` initial noise (sigma = 1; flow schedulers have
            ``init_noise_sigma = 1``). Computed in float32 whatever its dtype.
        scheduler: a diffusers scheduler from :func:`make_scheduler` (its timesteps are reset here).
        num_inference_steps: sampling steps, ``>= 1``.
        windows: from :func:`~flashportrait.windows.context_windows` (checked).
        callback: called after every step with ``{"step": i, "timestep": t (0..1000), "sigma": sigma_i,
            "latents": latents after the step, "velocity": blended velocity}``; if it returns a dict with
            ``"latents"``, sampling continues from that tensor (diffusers' ``callback_on_step_end`` rule).
            Raise from it to stop.
        disable: hide the progress bars.
        generator: passed to ``scheduler.step`` when it accepts one (stochastic samplers).
        blend_first_step: blend the overlaps at the first step too (default: the released overwrite).
        velocity_fn: ``velocity_fn(model, latents, timestep, windows, disable=..., blend=...) -> velocity``,
            how one step's blended velocity is computed (default :func:`blended_velocity`; e.g. a
            window-parallel version that evaluates this rank's windows and gathers the others).
        alp: Adaptive Latent Prediction (:class:`~flashportrait.alp.ALPConfig`): evaluate only some steps and
            forecast the velocity at the others (``None``: evaluate every step). At the latent granularity a
            skipped step calls neither ``velocity_fn`` nor ``model``; at the window / branch granularity
            ``velocity_fn`` gets a forecasting wrapper of ``model``. The callback dict then also holds
            ``"evaluated"`` (whether the step called the model).
        sigmas: a custom schedule of ``num_inference_steps`` sigmas, passed to ``scheduler.set_timesteps(
            sigmas=...)`` (``FlowMatchEulerDiscreteScheduler`` applies its shift to them; e.g. the distilled
            4-step schedule :data:`flashportrait.lora.DISTILL_SIGMAS`).

    Returns:
        ``[B, 16, F, h, w]`` float32 denoised latents.

    Raises:
        ValueError: ``num_inference_steps < 1``, bad windows, ``sigmas`` of another length or for a scheduler
        that takes none.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    check_windows(windows, latents.shape[2])
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
    else:
        if len(sigmas) != num_inference_steps:
            raise ValueError(f"sigmas has {len(sigmas)} values for num_inference_steps={num_inference_steps}")
        if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"{type(scheduler).__name__} takes no custom sigmas; use the euler sampler")
        scheduler.set_timesteps(sigmas=[float(v) for v in sigmas], device=latents.device)
    latents = latents.float()
    sigmas = scheduler.sigmas
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if generator is not None and accepts_generator else {}
    velocity_fn = velocity_fn or blended_velocity
    run = None if alp is None else ALPRun(alp, sigmas, scheduler.timesteps)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="steps", disable=disable)):
        blend = i > 0 or blend_first_step
        evaluated = run is None or run.evaluates(i)
        if run is None:
            velocity = velocity_fn(model, latents, t, windows, disable=disable, blend=blend)
        elif evaluated:
            velocity = velocity_fn(run.wrap(model, i), latents, t, windows, disable=disable, blend=blend)
            latents, velocity = run.observe(i, latents, velocity, scheduler)
        else:
            velocity = run.forecast(i, latents)
        latents = scheduler.step(velocity, t, latents, return_dict=False, **step_kwargs)[0].float()
        if callback is not None:
            info = {"step": i, "timestep": t, "sigma": sigmas[i], "latents": latents, "velocity": velocity}
            if run is not None:
                info["evaluated"] = evaluated
            update = callback(info)
            if update and "latents" in update:
                latents = update["latents"].float()
    return latents
