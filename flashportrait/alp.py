"""Adaptive Latent Prediction (ALP): forecast the model output at skipped sampling steps (SPEC.md section 5).

The sampler (:func:`flashportrait.sampling.sample_windows`) calls the model only at *evaluated* steps; at the
steps between, the model output is **forecast** from the last evaluated steps, so a run of ``N`` steps costs
far fewer than ``N`` model evaluations. This module is model-free: it sees latents, sigmas and what the model
callable returned, nothing else.

Forecasters (:class:`ALPConfig` ``mode``):

* ``"newton"`` (ours, default): exact polynomial extrapolation of order ``n`` through the last ``n + 1``
  evaluated steps (Newton / Lagrange interpolation, :func:`newton_weights`), in the sampling-step index. Exact on
  polynomial trajectories of degree ``<= n`` with any spacing. What is extrapolated (``target``): the model output
  (``"velocity"``) or the **data prediction** ``x0 = x - sigma * v`` (``"data"``; flow matching, SPEC.md section
  2), turned back into a velocity with the *current* latents, ``v = (x - x0) / sigma``. Holding ``x0`` constant
  over skipped Euler steps is exactly one Euler step over the whole interval (DDIM's identity), so with the data
  target order 0 is plain step reduction on the evaluated steps' sigmas and higher orders add to it. On the dev
  oracle problems the velocity target had the lower median error on mixtures and videos, but was up to 1.7x
  *worse* than plain Euler at 8 evaluations on element-wise bimodal problems with sharp modes, where the data
  target stays below Euler: there a mode is decided inside an interval, the forecasts of both targets are off by
  30-150% at the next evaluation, and extrapolating the velocity overshoots where holding ``x0`` degrades to a
  plain Euler step. The default, ``"auto"``, keeps both histories and uses the velocity target for the next
  interval while the forecast error just observed (the better target's, best order, relative to the velocity)
  is at most ``auto_limit`` (0.3), the data target otherwise (``bench/bench_alp.py --set dev``).
* ``"paper"``: the printed ALP formula (SPEC.md section 5), the paper's ablation: Taylor series with
  backward-difference derivatives over evaluated steps, divided by the timestep factor ``s = (rate /
  mean rate) ** alpha`` and, when several quantities are forecast together (guidance branches), the layer
  factor ``w = 1 / sqrt(r)``. With ``s = w = 1`` it is TaylorSeer's recursion (:class:`TaylorForecaster`).

Which steps are evaluated (:class:`ALPConfig`):

* a fixed grid: ``warmup`` first steps, then every ``interval``-th, and the last step;
* an adaptive planner: at each evaluated step the forecasts that *would have been made* for it (orders
  ``0 .. n``) are compared with the true output (free); the best order is kept for the next interval, and the
  next evaluated step is the furthest one whose predicted forecast error, weighted by each step's weight in the
  latents (:func:`step_weights`) and accumulated over the interval, stays below ``tolerance``; or, with an
  evaluation ``budget`` instead, the tolerance that spends the remaining budget exactly (:func:`plan_evaluations`).
  Late steps weigh far more (the last steps of the shift-5 grid move the latents most), so evaluations
  concentrate there.
* correction (``correct=True``, latent granularity): when a new evaluation arrives, the skipped steps since the
  previous one are integrated again with the polynomial that now *interpolates* both ends (the scheduler's
  state is restored and replayed), like UniPC's corrector, at no model cost.

Granularity (what one forecast covers):

* ``"latent"`` (default): the blended, guided velocity of the whole latent: one history of ``order + 2``
  full-latent tensors (float32: 150 MB per tensor per minute of 480x832 video at 25 fps) plus one copy of the
  latents and the scheduler state for the correction. Model calls are skipped entirely at skipped steps, so
  it works around any ``velocity_fn`` (window parallelism): every rank forecasts the same gathered velocity.
* ``"window"``: per window (keyed by ``window.start``, so the state lives where the window is evaluated), each
  window with its own adaptive schedule; no correction (windows evaluate at different steps).
* ``"branch"``: per window and guidance branch (the paper's granularity), through the model's
  ``branch_outputs(x, t, window, branches=...)`` / ``combine(outputs)`` (:class:`~flashportrait.window_model.
  WindowDenoiser`); with ``guidance_refresh = m > 1`` only the conditional branch (the last one) is evaluated at
  most evaluations and the other branches' differences to it are forecast, refreshed every ``m``-th evaluation.

Paper numbers and what is ours: SPEC.md section 5. Measurements: ``bench/bench_alp.py``.

Length: this is one module (over 500 lines) because its parts are one algorithm with shared conventions (step
index as time, the targets, errors relative to the output's norm): the planner reads the forecasters' errors,
the run replays with the forecasters' polynomials, and ``sample_windows`` uses them only together; the
docstrings are most of the length.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "FORECAST_MODES",
    "TARGETS",
    "GRANULARITIES",
    "DEFAULT_EVALUATION_FRACTION",
    "ALPConfig",
    "newton_weights",
    "newton_extrapolate",
    "NewtonForecaster",
    "TaylorForecaster",
    "layer_factors",
    "step_weights",
    "plan_evaluations",
    "fixed_schedule",
    "EvaluationPlanner",
    "ALPRun",
]

FORECAST_MODES = ("newton", "paper")
TARGETS = ("data", "velocity", "auto")
GRANULARITIES = ("latent", "window", "branch")
#: evaluations per sampling step when neither ``interval``, ``tolerance`` nor ``budget`` is given (6 of 30)
DEFAULT_EVALUATION_FRACTION = 0.2
#: predicted relative forecast error ``PRIOR_ERROR * k ** PRIOR_EXPONENT`` ``k`` steps after an evaluation, before
#: any error has been observed (typical of the oracle problems: an order-0 forecast 8 steps ahead is off by about
#: 0.3 relative); in budget mode only the exponent matters
PRIOR_ERROR = 5e-3
PRIOR_EXPONENT = 2


# --- configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ALPConfig:
    """Settings of Adaptive Latent Prediction; ``ALPConfig()`` is the shipped default (``bench/bench_alp.py``).

    Attributes:
        mode: ``"newton"`` (exact polynomial extrapolation) or ``"paper"`` (the printed Taylor formula).
        order: polynomial / Taylor order ``n`` (``newton``: the highest order the planner may choose; default 1,
            measured on the dev oracle problems: orders 2 and 3 were no better; the paper uses 3).
        interval: fixed grid: evaluate every ``interval``-th step after the warm-up (and the last step).
        warmup: the first ``warmup`` steps are always evaluated (>= 1: nothing to forecast from before).
        tolerance: adaptive intervals against this predicted error (relative to the output's norm, weighted by
            the steps' weights in the latents, accumulated over one interval).
        budget: adaptive intervals spending exactly this many evaluations (per window) over the run.
            With none of ``interval``, ``tolerance``, ``budget``: a budget of ``DEFAULT_EVALUATION_FRACTION``
            of the steps (6 of 30).
        alpha: exponent of the paper's timestep factor ``s`` (``paper`` mode; 0 = TaylorSeer).
        evaluate_last: always evaluate the last step (default: on the fixed grid yes, in the planner only
            if the planner picks it: forcing it was worse on the dev oracle problems at 6 evaluations,
            ``bench/bench_alp.py --extended``, row "last step forced").
        correct: re-integrate skipped steps once the next evaluation is known (latent granularity, newton).
        target: ``"data"`` (``x0 = x - sigma v``), ``"velocity"`` (the model output; default for ``paper``, as
            printed) or ``"auto"`` (default for ``newton`` at latent granularity, where it is the only one allowed;
            ``"data"`` for ``newton`` per window / branch): both histories are kept, and each interval uses the
            velocity target unless the forecast error observed at its first evaluation is above ``auto_limit``,
            then the data target (see the module docstring).
        auto_limit: ``target="auto"``: the largest observed forecast error (relative to the velocity's norm, the
            best order of the better target) at which the next interval still uses the velocity target.
        granularity: ``"latent"``, ``"window"`` or ``"branch"`` (see the module docstring).
        guidance_refresh: ``branch`` granularity: evaluate the non-conditional branches at every
            ``guidance_refresh``-th evaluation of a window only.
        importance: exponent on the step weights in the planner (1: the weights as they are; 0: every step
            alike, uniform intervals). Default 0.8, measured with the ``auto`` target on the dev oracle problems
            (0.6-0.75 and 0.85-0.9 gave fewer problems within a third of Euler's error; 1 put too few
            evaluations early: 0.98x Euler on a guided problem at 6 evaluations). With the data target 0.6
            was best (0.75 and 1 lost to plain Euler on a guided problem at 8 evaluations).

    Raises:
        ValueError: a value out of range, or more than one of ``interval`` / ``tolerance`` / ``budget``.
    """

    mode: str = "newton"
    order: int = 1
    interval: int | None = None
    warmup: int = 1
    tolerance: float | None = None
    budget: int | None = None
    alpha: float = 1.5
    evaluate_last: bool | None = None
    correct: bool = True
    target: str | None = None
    granularity: str = "latent"
    guidance_refresh: int = 1
    importance: float = 0.8
    auto_limit: float = 0.3

    def __post_init__(self):
        if self.mode not in FORECAST_MODES:
            raise ValueError(f"ALP mode must be one of {FORECAST_MODES}, got {self.mode!r}")
        if self.target is not None and self.target not in TARGETS:
            raise ValueError(f"ALP target must be one of {TARGETS}, got {self.target!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"ALP granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        _check_int("order", self.order, 0)
        _check_int("warmup", self.warmup, 1)
        _check_int("guidance_refresh", self.guidance_refresh, 1)
        if self.interval is not None:
            _check_int("interval", self.interval, 1)
        if self.budget is not None:
            _check_int("budget", self.budget, 1)
        if self.tolerance is not None and not (isinstance(self.tolerance, (int, float)) and 0 < self.tolerance < math.inf):
            raise ValueError(f"ALP tolerance must be a finite number > 0, got {self.tolerance!r}")
        if self.target == "auto" and (self.mode != "newton" or self.granularity != "latent"):
            raise ValueError("ALP target 'auto' needs mode 'newton' and granularity 'latent'")
        for name in ("alpha", "importance", "auto_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"ALP {name} must be a finite number >= 0, got {value!r}")
        given = [n for n in ("interval", "tolerance", "budget") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of ALP interval / tolerance / budget, got {', '.join(given)}")
        if self.guidance_refresh > 1 and self.granularity != "branch":
            raise ValueError("ALP guidance_refresh > 1 needs granularity 'branch' (per guidance branch forecasts)")

    @property
    def forecast_target(self) -> str:
        """The quantity extrapolated: ``target``, else for newton ``"auto"`` (latent granularity) or ``"data"`` (per
        window / branch; measured, see the module docstring), and ``"velocity"`` for paper (as printed)."""
        if self.target is not None:
            return self.target
        if self.mode != "newton":
            return "velocity"
        return "auto" if self.granularity == "latent" else "data"

    def evaluations(self, num_steps: int) -> int | None:
        """The evaluation budget for a run of ``num_steps`` (``None`` on a fixed grid or with a tolerance)."""
        if self.interval is not None or self.tolerance is not None:
            return None
        if self.budget is not None:
            return min(self.budget, num_steps)
        return min(num_steps, max(self.warmup + 1, round(num_steps * DEFAULT_EVALUATION_FRACTION)))


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ALP {name} must be a whole number >= {minimum}, got {value!r}")


# --- forecasters --------------------------------------------------------------------------------------


def newton_weights(times: Sequence[float], t: float) -> list[float]:
    """Weights ``c_m`` with ``p(t) = sum_m c_m f_m`` for the polynomial ``p`` of degree ``len(times) - 1``
    through the points ``(times[m], f_m)`` (Lagrange's form of Newton's interpolation polynomial).

    Exact for any polynomial of degree ``< len(times)`` at any spacing; ``t`` outside the points
    extrapolates. Raises ``ValueError`` for repeated times.
    """
    if len(set(times)) != len(times):
        raise ValueError(f"interpolation times must differ, got {list(times)}")
    weights = []
    for m, tm in enumerate(times):
        c = 1.0
        for k, tk in enumerate(times):
            if k != m:
                c *= (t - tk) / (tm - tk)
        weights.append(c)
    return weights


def newton_extrapolate(times: Sequence[float], values: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    """The interpolation polynomial through ``(times, values)`` evaluated at ``t`` (see :func:`newton_weights`)."""
    weights = newton_weights(times, t)
    out = values[0] * weights[0]
    for c, v in zip(weights[1:], values[1:]):
        out = out + c * v
    return out


class NewtonForecaster:
    """Polynomial extrapolation through the last evaluated points of one quantity.

    Keeps the last ``order + 2`` points (one more than a forecast needs, to measure the forecast error of
    every order at the next evaluation).

    Args:
        order: the highest order used (``n``: ``n + 1`` points).
    """

    def __init__(self, order: int):
        self.order = order
        self.times: list[float] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.times)

    def add(self, time: float, value: torch.Tensor) -> None:
        self.times.append(float(time))
        self.values.append(value)
        del self.times[: -(self.order + 2)], self.values[: -(self.order + 2)]

    def forecast(self, time: float, order: int | None = None) -> torch.Tensor:
        """Extrapolate to ``time`` with ``order`` (capped by the points held). Needs one point."""
        n = min(self.order if order is None else order, len(self.times) - 1)
        return newton_extrapolate(self.times[-(n + 1):], self.values[-(n + 1):], time)

    def errors(self, time: float, value: torch.Tensor, max_order: int | None = None) -> dict[int, float]:
        """``{order: |forecast - value| / |value|}`` for every order the held points allow (before ``add``)."""
        top = min(self.order if max_order is None else max_order, len(self.times) - 1)
        scale = float(value.float().norm()) or 1.0
        return {n: float((self.forecast(time, n) - value).float().norm()) / scale for n in range(top + 1)}


class TaylorForecaster:
    """The paper's forecaster (SPEC.md section 5) in TaylorSeer's recursive form.

    At each evaluated step ``j``: ``d_0 = f(j)``, ``d_i = (d_{i-1} - d_{i-1}^{previous}) / K`` for
    ``i = 1 .. order`` with ``K`` the distance to the previous evaluated step (TaylorSeer divides each
    difference by its step distance, so ``d_i`` estimates the ``i``-th derivative per step; on a uniform grid
    ``d_i = D_i / K^i`` with the paper's backward differences ``D_i``). Forecast ``k`` steps later:

        f(j + k) = d_0 + sum_i d_i k^i / (i! w_i s),

    the paper's ``f(j) + sum_i D_i k^i / (i! K^i w s)``. ``s = (rate / mean rate) ** alpha``, ``rate`` =
    mean ``|d_1|`` at the last evaluated step, the mean over every evaluated step so far; ``s = 1`` until
    a rate is known. ``w`` is 1 unless given (:func:`layer_factors`).
    """

    def __init__(self, order: int, alpha: float = 0.0):
        self.order, self.alpha = order, alpha
        self.derivatives: list[torch.Tensor] = []
        self.step: int | None = None
        self.rates: list[float] = []

    def __len__(self) -> int:
        return 0 if self.step is None else 1

    def add(self, step: int, value: torch.Tensor) -> None:
        new = [value]
        if self.step is not None:
            distance = step - self.step
            for i in range(min(self.order, len(self.derivatives))):
                new.append((new[i] - self.derivatives[i]) / distance)
        self.derivatives, self.step = new, step
        if len(new) > 1:
            self.rates.append(float(new[1].float().abs().mean()))

    def timestep_factor(self) -> float:
        """``s = (rate / mean rate) ** alpha`` (1 without a rate or with ``alpha = 0``)."""
        if not self.alpha or not self.rates:
            return 1.0
        mean = sum(self.rates) / len(self.rates)
        return (self.rates[-1] / mean) ** self.alpha if mean > 0 and self.rates[-1] > 0 else 1.0

    def forecast(self, step: int, layer_factor: Sequence[float] | None = None) -> torch.Tensor:
        k = step - self.step
        s = self.timestep_factor()
        out = self.derivatives[0]
        for i in range(1, len(self.derivatives)):
            w = 1.0 if layer_factor is None else layer_factor[i - 1]
            out = out + self.derivatives[i] * (k**i / (math.factorial(i) * w * s))
        return out

    def errors(self, step: int, value: torch.Tensor, max_order: int | None = None) -> dict[int, float]:
        scale = float(value.float().norm()) or 1.0
        return {self.order: float((self.forecast(step) - value).float().norm()) / scale}


def layer_factors(forecasters: Sequence[TaylorForecaster]) -> list[list[float]]:
    """The paper's layer factor ``w(l, i) = 1 / sqrt(r(l, i))``, ``r(l, i) = mean |d_i(l)| / mean over l of the
    same`` for quantities ``l`` forecast together (SPEC.md section 5); ``w = 1`` where undefined."""
    orders = min(len(f.derivatives) for f in forecasters) - 1
    out = [[1.0] * max(f.order, 1) for f in forecasters]
    for i in range(1, orders + 1):
        means = [float(f.derivatives[i].float().abs().mean()) for f in forecasters]
        avg = sum(means) / len(means)
        for layer, m in enumerate(means):
            if avg > 0 and m > 0:
                out[layer][i - 1] = 1.0 / math.sqrt(m / avg)
    return out


# --- which steps to evaluate ---------------------------------------------------------------------------


def step_weights(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    """Weight of each step's data prediction in the latents after it: ``1 - sigma_{j+1} / sigma_j``.

    The flow-matching Euler step written with the data prediction ``x0 = x - sigma v`` is
    ``x_{j+1} = (sigma_{j+1} / sigma_j) x_j + (1 - sigma_{j+1} / sigma_j) x0_j`` (DDIM's form), so an error in
    ``x0_j`` moves ``x_{j+1}`` by that fraction of it. On the shift-5 30-step grid it grows from 0.007 (step 0)
    to 0.86 (step 28) and 1 (the last step, which returns ``x0`` itself).

    Args:
        sigmas: ``N + 1`` decreasing sigmas (the scheduler's, ending at 0).
    """
    s = [float(v) for v in sigmas]
    return [1.0 - s[j + 1] / s[j] if s[j] > 0 else 1.0 for j in range(len(s) - 1)]


def _greedy(start: int, num_steps: int, weights: Sequence[float], error: Callable[[int], float], tolerance: float,
            evaluate_last: bool) -> list[int]:
    steps, j = [], start
    while True:
        total, h = 0.0, 1
        while j + h < num_steps:
            total += weights[j + h] * error(h)
            if total > tolerance:
                break
            h += 1
        if j + h >= num_steps:
            if evaluate_last and j != num_steps - 1:
                steps.append(num_steps - 1)
            return steps
        steps.append(j + h)
        j += h


def plan_evaluations(
    start: int,
    num_steps: int,
    weights: Sequence[float],
    error: Callable[[int], float],
    tolerance: float | None = None,
    budget: int | None = None,
    evaluate_last: bool = False,
) -> list[int]:
    """The steps to evaluate after the evaluated step ``start``.

    Greedy: from each evaluated step ``j``, skip steps ``j + 1, j + 2, ...`` while ``sum_k weights[j + k] *
    error(k)`` (the predicted forecast error ``k`` steps after an evaluation, weighted) stays within
    ``tolerance``; the first step that would exceed it is evaluated next. With a ``budget`` (evaluations after
    ``start``), the smallest tolerance whose plan fits it (bisection). ``evaluate_last`` adds the last step.

    Args:
        start: an evaluated step index.
        num_steps: ``N`` (steps ``0 .. N-1``).
        weights: per-step weights (:func:`step_weights`, possibly raised to a power).
        error: ``k -> predicted relative forecast error`` ``k`` steps after an evaluation (increasing).
        tolerance, budget: exactly one.

    Returns:
        Increasing step indices ``> start`` (empty if nothing is left to evaluate).
    """
    if (tolerance is None) == (budget is None):
        raise ValueError("give exactly one of tolerance and budget")
    if tolerance is not None:
        return _greedy(start, num_steps, weights, error, tolerance, evaluate_last)
    if budget <= 0:
        return []
    if budget >= num_steps - 1 - start:
        return list(range(start + 1, num_steps))
    lo, hi = 0.0, 1.0
    while len(_greedy(start, num_steps, weights, error, hi, evaluate_last)) > budget:
        hi *= 4
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if len(_greedy(start, num_steps, weights, error, mid, evaluate_last)) <= budget:
            hi = mid
        else:
            lo = mid
    return _greedy(start, num_steps, weights, error, hi, evaluate_last)


def fixed_schedule(num_steps: int, warmup: int, interval: int, evaluate_last: bool = True) -> list[int]:
    """Evaluated steps of the fixed grid: ``0 .. warmup-1``, then every ``interval``-th step from ``warmup - 1``,
    and the last step if ``evaluate_last``."""
    steps = set(range(min(warmup, num_steps))) | set(range(warmup - 1, num_steps, interval))
    if evaluate_last:
        steps.add(num_steps - 1)
    return sorted(s for s in steps if s < num_steps)


class EvaluationPlanner:
    """Decides, step by step, whether one forecast quantity (the whole latent, or one window) is evaluated.

    Fixed grid (``config.interval``): :func:`fixed_schedule`, order fixed at ``config.order``. Otherwise the
    adaptive planner: after every evaluation it is told the forecast errors each order would have made for
    that evaluation (:meth:`observe`), keeps the best order, models the error ``k`` steps ahead as
    ``e * (k / h) ** (order + 1)`` (``e`` observed after an interval of ``h`` steps) and re-plans
    (:func:`plan_evaluations`) against the tolerance or the remaining budget.
    """

    def __init__(self, config: ALPConfig, sigmas: Sequence[float] | torch.Tensor, num_steps: int):
        self.config = config
        self.num_steps = num_steps
        self.order = config.order
        self.evaluated: list[int] = []
        self.log: list[tuple[int, int, dict[int, float]]] = []
        if config.interval is not None:
            last = True if config.evaluate_last is None else config.evaluate_last
            self.fixed = set(fixed_schedule(num_steps, config.warmup, config.interval, last))
            self.budget = None
        else:
            self.fixed = None
            self.evaluate_last = bool(config.evaluate_last)
            self.budget = config.evaluations(num_steps)
            if self.budget is not None and self.budget < min(num_steps, config.warmup + int(self.evaluate_last)):
                raise ValueError(
                    f"ALP budget {self.budget} is smaller than the warm-up ({config.warmup} steps)"
                    + (" plus the last step" if self.evaluate_last else "")
                )
            self.weights = [w**config.importance for w in step_weights(sigmas)]
        self.next = 0

    def should_evaluate(self, step: int) -> bool:
        if self.fixed is not None:
            return step in self.fixed
        return step < self.config.warmup or step == self.next

    def observe(self, step: int, errors: dict[int, float]) -> None:
        """Record an evaluation of ``step`` and the forecast errors ``{order: relative error}`` for it."""
        previous = self.evaluated[-1] if self.evaluated else None
        self.evaluated.append(step)
        if self.fixed is not None:
            self.log.append((step, self.order, errors))
            return
        if errors and self.config.mode == "newton":
            self.order = min(errors, key=errors.get)
        self.log.append((step, self.order, errors))
        if step < self.config.warmup - 1:
            self.next = step + 1
            return
        if errors and previous is not None and self.order in errors:
            e, h, p = errors[self.order], step - previous, self.order + 1
            error = (lambda k: e * (k / h) ** p) if e > 0 else (lambda k: 1e-12 * k)
        else:
            error = lambda k: PRIOR_ERROR * k**PRIOR_EXPONENT  # noqa: E731
        remaining = None if self.budget is None else self.budget - len(self.evaluated)
        plan = plan_evaluations(step, self.num_steps, self.weights, error, tolerance=self.config.tolerance,
                                budget=remaining, evaluate_last=self.evaluate_last) \
            if self.config.tolerance is not None or remaining is not None else []
        self.next = plan[0] if plan else self.num_steps


# --- the run: what sample_windows uses -----------------------------------------------------------------


def _to_target(target: str, velocity: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return velocity.float() if target == "velocity" else x.float() - sigma * velocity.float()


def _from_target(target: str, value: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    if target == "velocity":
        return value
    if sigma <= 0:
        raise ValueError("the data-prediction target needs sigma > 0 at every sampling step")
    return (x.float() - value) / sigma


def _new_forecaster(config: ALPConfig):
    if config.mode == "newton":
        return NewtonForecaster(config.order)
    return TaylorForecaster(config.order, config.alpha)


def _forecast(config: ALPConfig, forecaster, step: int, order: int, layer_factor=None) -> torch.Tensor:
    if config.mode == "newton":
        return forecaster.forecast(float(step), order)
    return forecaster.forecast(step, layer_factor)


class ALPRun:
    """The state of one sampling run with ALP (created by :func:`~flashportrait.sampling.sample_windows`).

    Latent granularity: :meth:`evaluates` says whether step ``i`` calls the model; if so the sampler computes the
    blended velocity and calls :meth:`observe` (which may correct the latents, see the module docstring),
    otherwise :meth:`forecast` gives the velocity. Window / branch granularity: every step "evaluates" and the
    model returned by :meth:`wrap` decides per window.

    Attributes:
        evaluations: model calls made (latent: steps evaluated; window: window calls; branch: window calls with at
            least one branch), and ``branch_passes`` (branches evaluated, branch granularity).
    """

    def __init__(self, config: ALPConfig, sigmas: torch.Tensor, timesteps: torch.Tensor):
        self.config = config
        self.sigmas = [float(s) for s in sigmas]
        self.timesteps = timesteps
        self.num_steps = len(timesteps)
        self.target = config.forecast_target
        self.auto = self.target == "auto"
        if self.auto:
            self.target = "velocity"  # until a forecast error has been observed
        self.targets = ("data", "velocity") if self.auto else (self.target,)
        self.target_log: list[tuple[int, str, dict[str, float]]] = []  # (step, target chosen, best error each)
        self.evaluations = 0
        self.branch_passes = 0
        self.evaluated_steps: list[int] = []
        if config.granularity == "latent":
            self.planner = EvaluationPlanner(config, self.sigmas, self.num_steps)
            self.forecasters = {t: _new_forecaster(config) for t in self.targets}
            self.forecaster = self.forecasters[self.target]
            self._anchor = None  # (step, latents, scheduler copy, {target: value}) at the last evaluation
        else:
            self.windows: dict[int, _WindowState] = {}

    # latent granularity ------------------------------------------------------------------------------

    def evaluates(self, step: int) -> bool:
        """Whether the sampler evaluates ``velocity_fn`` at ``step``."""
        return self.config.granularity != "latent" or self.planner.should_evaluate(step)

    def wrap(self, model, step: int):
        """The model callable to hand to ``velocity_fn`` at ``step`` (window / branch: the forecasting wrapper)."""
        if self.config.granularity == "latent":
            return model
        return _WindowModel(self, model, step)

    def observe(self, step: int, latents: torch.Tensor, velocity: torch.Tensor, scheduler):
        """Record the evaluated ``velocity`` of ``step``; return ``(latents, velocity)`` to step with.

        With correction (newton, latent granularity), the latents are re-integrated from the previous evaluation
        with the interpolation through it and this one, and the velocity re-expressed at them (data target).
        """
        if self.config.granularity != "latent":
            return latents, velocity
        sigma = self.sigmas[step]
        values = {t: _to_target(t, velocity, latents, sigma) for t in self.targets}
        self.evaluations += 1
        self.evaluated_steps.append(step)
        errors = {t: self.forecasters[t].errors(step, values[t]) if len(self.forecasters[t]) else {}
                  for t in self.targets}
        used, order = self.target, self.planner.order  # the target and order the skipped steps were forecast with
        if self.auto and errors["data"] and errors["velocity"]:
            self.target = self._choose_target(errors, values, velocity, sigma, step)
            self.forecaster = self.forecasters[self.target]
        self.planner.observe(step, errors[self.target])
        anchor = self._anchor
        if (self.config.correct and self.config.mode == "newton" and anchor is not None and step - anchor[0] > 1):
            latents = self._replay(anchor, step, values[used], scheduler, order, used)
            velocity = _from_target(self.target, values[self.target], latents, sigma)
        for t in self.targets:
            self.forecasters[t].add(step, values[t])
        if self.config.correct and self.config.mode == "newton":
            self._anchor = (step, latents, copy.deepcopy(scheduler), values)
        return latents, velocity

    def _choose_target(self, errors, values, velocity: torch.Tensor, sigma: float, step: int) -> str:
        """``target="auto"``: the velocity target while the forecasts work (the best forecast of this evaluation
        within ``auto_limit`` of the truth, relative), the data target where they break down. Errors compared in
        the velocity (a data-prediction error ``e |x0|`` is a velocity error ``e |x0| / sigma``; both move the
        latents alike)."""
        scale = float(velocity.float().norm()) or 1.0
        best = {"velocity": min(errors["velocity"].values()),
                "data": min(errors["data"].values()) * float(values["data"].norm()) / (sigma * scale)}
        choice = "data" if min(best.values()) > self.config.auto_limit else "velocity"
        self.target_log.append((step, choice, best))
        return choice

    def _replay(self, anchor, step: int, value: torch.Tensor, scheduler, order: int, target: str) -> torch.Tensor:
        start, x, saved, start_values = anchor
        # the polynomial of the same order (at least 1) through this evaluation and the latest before it:
        # it interpolates the skipped steps, and stays exact wherever the forecasts were
        f = self.forecasters[target]
        n = max(1, min(order, len(f)))
        times, values = f.times[-n:] + [float(step)], f.values[-n:] + [value]
        replay = copy.deepcopy(saved)
        for k in range(start, step):
            fk = start_values[target] if k == start else newton_extrapolate(times, values, float(k))
            v = _from_target(target, fk, x, self.sigmas[k])
            x = replay.step(v, self.timesteps[k], x, return_dict=False)[0].float()
        scheduler.__dict__.update(replay.__dict__)
        return x

    def forecast(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """The forecast velocity at a skipped ``step`` (latent granularity)."""
        value = _forecast(self.config, self.forecaster, step, self.planner.order)
        return _from_target(self.target, value, latents, self.sigmas[step])


class _WindowState:
    """Forecast state of one window (window granularity) or of its branches (branch granularity)."""

    def __init__(self, run: ALPRun):
        self.planner = EvaluationPlanner(run.config, run.sigmas, run.num_steps)
        self.forecasters: dict[int | str, object] = {}
        self.count = 0  # evaluations of this window
        self.num_branches: int | None = None


class _WindowModel:
    """The model callable for window / branch granularity at one step: evaluates or forecasts per window."""

    def __init__(self, run: ALPRun, model, step: int):
        self.run, self.model, self.step = run, model, step

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, window: range) -> torch.Tensor:
        run, step = self.run, self.step
        config, sigma = run.config, run.sigmas[step]
        state = run.windows.get(window.start)
        if state is None:
            state = run.windows[window.start] = _WindowState(run)
        if config.granularity == "window":
            return self._window(state, x, timestep, window, sigma)
        return self._branches(state, x, timestep, window, sigma)

    def _window(self, state: _WindowState, x, timestep, window, sigma):
        run, config, step = self.run, self.run.config, self.step
        f = state.forecasters.setdefault("guided", _new_forecaster(config))
        if not state.planner.should_evaluate(step):
            return _from_target(run.target, _forecast(config, f, step, state.planner.order), x, sigma)
        velocity = self.model(x, timestep, window)
        value = _to_target(run.target, velocity, x, sigma)
        state.planner.observe(step, f.errors(step, value) if len(f) else {})
        f.add(step, value)
        run.evaluations += 1
        return velocity

    def _branches(self, state: _WindowState, x, timestep, window, sigma):
        run, config, step, model = self.run, self.run.config, self.step, self.model
        if not hasattr(model, "branch_outputs"):
            raise ValueError("ALP granularity 'branch' needs a model with branch_outputs() and combine() "
                             "(flashportrait.window_model.WindowDenoiser)")
        fs = state.forecasters
        num = state.num_branches  # known after the first evaluation
        if state.planner.should_evaluate(step):
            full = num is None or state.count % config.guidance_refresh == 0
            if full:
                outputs = model.branch_outputs(x, timestep, window)
                num = state.num_branches = outputs.shape[0] // x.shape[0]
                run.branch_passes += num
            else:
                outputs = model.branch_outputs(x, timestep, window, branches=[num - 1])
                run.branch_passes += 1
            run.evaluations += 1
            state.count += 1
            parts = outputs.float().chunk(outputs.shape[0] // x.shape[0])
            cond = _to_target(run.target, parts[-1], x, sigma)
            c = fs.setdefault("cond", _new_forecaster(config))
            errors = c.errors(step, cond) if len(c) else {}
            if full:
                diffs = [cond - _to_target(run.target, p, x, sigma) for p in parts[:-1]]
                for b, d in enumerate(diffs):
                    fs.setdefault(b, _new_forecaster(config)).add(step, d)
            else:
                diffs = [self._forecast_one(state, b, step) for b in range(num - 1)]
            c.add(step, cond)
            state.planner.observe(step, errors)
        else:
            cond = self._forecast_one(state, "cond", step)
            diffs = [self._forecast_one(state, b, step) for b in range(num - 1)]
        branches = [_from_target(run.target, cond - d, x, sigma) for d in diffs]
        branches.append(_from_target(run.target, cond, x, sigma))
        return model.combine(torch.cat(branches))

    def _forecast_one(self, state: _WindowState, key, step: int) -> torch.Tensor:
        config = self.run.config
        f = state.forecasters[key]
        w = None
        if config.mode == "paper":  # the layer factor across the branches of this window
            group = [g for g in state.forecasters.values() if len(g.derivatives) > 1]
            if len(group) > 1 and f in group:
                w = layer_factors(group)[group.index(f)]
        return _forecast(config, f, step, state.planner.order, w)
