"""Adaptive Latent Prediction (flashportrait.alp) and its entry point sample_windows(..., alp=)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from flashportrait.alp import (
    ALPConfig,
    EvaluationPlanner,
    NewtonForecaster,
    TaylorForecaster,
    fixed_schedule,
    layer_factors,
    newton_extrapolate,
    plan_evaluations,
    step_weights,
)
from flashportrait.sampling import make_scheduler, sample_windows
from flashportrait.windows import context_windows


def _poly(coeffs, t):
    return sum(c * t**i for i, c in enumerate(coeffs))


# --- forecasters --------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_newton_is_exact_on_polynomials_up_to_its_order_with_any_spacing(order):
    rng = random.Random(order)
    for trial in range(20):
        times = sorted(rng.sample(range(0, 40), order + 1))
        times = [t + rng.random() * 0.5 for t in times]  # any spacing, not only whole steps
        coeffs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(trial * 10 + k)) for k in range(order + 1)]
        target = times[-1] + rng.uniform(0.2, 9.0)
        for degree in range(order + 1):
            values = [_poly(coeffs[: degree + 1], t) for t in times]
            got = newton_extrapolate(times, values, target)
            torch.testing.assert_close(got, _poly(coeffs[: degree + 1], target), rtol=1e-4, atol=1e-4)
    # and not beyond it: degree order + 1 is not reproduced
    times = [0.0, 3.0, 5.0, 6.0][: order + 1]
    values = [torch.tensor([t ** (order + 1)]) for t in times]
    assert not torch.allclose(newton_extrapolate(times, values, 9.0), torch.tensor([9.0 ** (order + 1)]))


def test_newton_forecaster_keeps_the_latest_points_and_reports_errors_per_order():
    f = NewtonForecaster(order=2)
    for step in range(6):
        f.add(step, torch.tensor([float(step**2)]))
    assert f.times == [2.0, 3.0, 4.0, 5.0]  # order + 2 points
    errors = f.errors(6.0, torch.tensor([36.0]))
    assert set(errors) == {0, 1, 2} and errors[2] < 1e-6 < errors[1] < errors[0]
    assert float(f.forecast(8.0)) == pytest.approx(64.0)
    assert float(f.forecast(8.0, order=0)) == 25.0


def _taylorseer_reference(points, order, query):
    """TaylorSeer's cache recursion written out as its authors describe it: derivative factors updated by
    dividing each new difference by the step distance, forecast by the Taylor polynomial in the distance."""
    factors, last = None, None
    for step, value in points:
        new = {0: value}
        if factors is not None:
            distance = step - last
            for i in range(order):
                if i in factors:
                    new[i + 1] = (new[i] - factors[i]) / distance
        factors, last = new, step
    x = query - last
    return sum(factors[i] * x**i / math.factorial(i) for i in factors)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_paper_mode_with_s_and_w_equal_1_is_taylorseer(order):
    gen = torch.Generator().manual_seed(order)
    steps = [0, 3, 5, 9, 10, 14]  # uneven distances
    points = [(s, torch.randn(5, generator=gen)) for s in steps]
    f = TaylorForecaster(order, alpha=0.0)
    for s, v in points:
        f.add(s, v)
    assert f.timestep_factor() == 1.0
    for q in (15, 17, 20):
        torch.testing.assert_close(f.forecast(q), _taylorseer_reference(points, order, q))
        torch.testing.assert_close(f.forecast(q, layer_factor=[1.0] * order), f.forecast(q))


def test_paper_formula_as_printed_on_a_uniform_grid_and_its_factors():
    """SPEC.md section 5: f(j+k) = f(j) + sum_i D_i k^i / (i! K^i w s), D_i backward differences over full steps."""
    K, order = 5, 2
    values = {j: torch.tensor([0.3 * j**3 - j + 2.0]) for j in range(0, 16, K)}
    f = TaylorForecaster(order, alpha=1.5)
    for j, v in values.items():
        f.add(j, v)
    d1 = [values[5] - values[0], values[10] - values[5], values[15] - values[10]]
    D1, D2 = d1[-1], d1[-1] - d1[-2]
    rates = [float((d1[1]) .abs().mean()) / K, float(d1[2].abs().mean()) / K]
    rates = [float(d1[0].abs().mean()) / K] + rates
    s = (rates[-1] / (sum(rates) / len(rates))) ** 1.5
    assert f.timestep_factor() == pytest.approx(s)
    for k in (1, 3):
        printed = values[15] + D1 * k / (1 * K * s) + D2 * k**2 / (2 * K**2 * s)
        torch.testing.assert_close(f.forecast(15 + k), printed)
    w = [0.5, 2.0]
    printed_w = values[15] + D1 * 2 / (K * w[0] * s) + D2 * 4 / (2 * K**2 * w[1] * s)
    torch.testing.assert_close(f.forecast(17, layer_factor=w), printed_w)


def test_layer_factor_is_one_over_sqrt_of_the_relative_derivative_size():
    a, b = TaylorForecaster(1), TaylorForecaster(1)
    for step in (0, 2):
        a.add(step, torch.full((3,), 1.0 * step))  # |d1| = 1
        b.add(step, torch.full((3,), 4.0 * step))  # |d1| = 4, mean 2.5
    wa, wb = layer_factors([a, b])
    assert wa[0] == pytest.approx(1 / math.sqrt(1 / 2.5)) and wb[0] == pytest.approx(1 / math.sqrt(4 / 2.5))


# --- schedules ----------------------------------------------------------------------------------------


def test_fixed_schedule_and_step_weights():
    assert fixed_schedule(30, 1, 5) == [0, 5, 10, 15, 20, 25, 29]
    assert fixed_schedule(30, 3, 4, evaluate_last=False) == [0, 1, 2, 6, 10, 14, 18, 22, 26]
    sched = make_scheduler("euler")
    sched.set_timesteps(30)
    w = step_weights(sched.sigmas)
    assert len(w) == 30 and w[-1] == 1.0 and all(0 < a < b for a, b in zip(w[:-2], w[1:-1]))


@pytest.mark.parametrize("budget", [3, 6, 8, 12])
def test_budget_plans_spend_exactly_the_budget(budget):
    sched = make_scheduler("euler")
    sched.set_timesteps(30)
    w = step_weights(sched.sigmas)
    plan = plan_evaluations(0, 30, w, lambda k: k**2, budget=budget - 1)
    assert len(plan) == budget - 1 and plan == sorted(set(plan)) and plan[0] > 0 and plan[-1] < 30
    with_last = plan_evaluations(0, 30, w, lambda k: k**2, budget=budget - 1, evaluate_last=True)
    assert len(with_last) == budget - 1 and with_last[-1] == 29
    # later steps weigh more: the gaps shrink towards the end
    gaps = [b - a for a, b in zip([0] + plan, plan)]
    assert gaps[0] >= gaps[-1]


def test_tolerance_planner_evaluates_more_where_forecasts_fail():
    sched = make_scheduler("euler")
    sched.set_timesteps(30)
    planner = EvaluationPlanner(ALPConfig(tolerance=1e-3), sched.sigmas, 30)
    planner.observe(0, {})
    planner.observe(planner.next, {0: 0.01})  # accurate forecasts: a long next interval
    relaxed = planner.next - planner.evaluated[-1]
    planner2 = EvaluationPlanner(ALPConfig(tolerance=1e-3), sched.sigmas, 30)
    planner2.observe(0, {})
    planner2.observe(planner2.next, {0: 1.0})  # bad forecasts: a short one
    assert planner2.next - planner2.evaluated[-1] < relaxed


# --- sample_windows(alp=...) --------------------------------------------------------------------------


class PolyDataModel:
    """Velocity whose data prediction x - sigma v is a fixed polynomial in the step index (per window and
    branch): forecasts of order >= its degree are exact, so ALP must reproduce the full run."""

    def __init__(self, scheduler, degree=2, branches=2, seed=0):
        sigmas = scheduler.sigmas
        self.sigma = {round(float(t), 3): float(s) for t, s in zip(scheduler.timesteps, sigmas)}
        self.step = {round(float(t), 3): i for i, t in enumerate(scheduler.timesteps)}
        g = torch.Generator().manual_seed(seed)
        self.coeffs = torch.randn(branches, degree + 1, 1, 2, 1, 3, 3, generator=g) / 30
        self.coeffs[:, 0] *= 30
        self.calls, self.branch_calls = [], []
        self.weights = torch.tensor([-1.5, 2.5][:branches] if branches == 2 else [1.0])

    def data(self, step, window, branch):
        pos = torch.arange(window.start, window.stop, dtype=torch.float32).view(1, 1, -1, 1, 1)
        c = self.coeffs[branch]
        return sum(c[i] * step**i for i in range(c.shape[0])) * (1 + 0.1 * pos)

    def branch_outputs(self, x, t, window, branches=None):
        key = round(float(t), 3)
        sigma, step = self.sigma[key], self.step[key]
        idx = list(range(len(self.weights))) if branches is None else list(branches)
        self.branch_calls.append((step, window.start, tuple(idx)))
        return torch.cat([(x - self.data(step, window, b)) / sigma for b in idx])

    def combine(self, outputs):
        return sum(w * o for w, o in zip(self.weights, outputs.chunk(len(self.weights))))

    def __call__(self, x, t, window):
        self.calls.append((self.step[round(float(t), 3)], window.start))
        return self.combine(self.branch_outputs(x, t, window))


def _setup(sampler="euler", frames=11, steps=30):
    scheduler = make_scheduler(sampler)
    scheduler.set_timesteps(steps)
    windows = context_windows(frames, 5, 2)
    noise = torch.randn(1, 2, frames, 3, 3, generator=torch.Generator().manual_seed(1))
    return scheduler, windows, noise


@pytest.mark.parametrize("granularity", ["latent", "window", "branch"])
@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_exact_forecasts_reproduce_the_full_run(granularity, sampler):
    scheduler, windows, noise = _setup(sampler)
    full = sample_windows(PolyDataModel(scheduler), noise, scheduler, 30, windows, disable=True)
    model = PolyDataModel(scheduler)
    config = ALPConfig(granularity=granularity, order=2, target="data", budget=7, warmup=3,
                       evaluate_last=True)
    ours = sample_windows(model, noise, scheduler, 30, windows, disable=True, alp=config)
    torch.testing.assert_close(ours, full, rtol=1e-3, atol=1e-3)
    calls = model.calls if granularity != "branch" else [(s, w) for s, w, _ in model.branch_calls]
    assert len(calls) == 7 * len(windows)
    assert {s for s, _ in calls if s == 29} == {29}  # the last step is evaluated


class PolyVelocityModel(PolyDataModel):
    """Velocity (of every branch) a fixed polynomial in the step index, whatever the latents: forecasts of the
    velocity target of order >= its degree are exact."""

    def branch_outputs(self, x, t, window, branches=None):
        step = self.step[round(float(t), 3)]
        idx = list(range(len(self.weights))) if branches is None else list(branches)
        self.branch_calls.append((step, window.start, tuple(idx)))
        return torch.cat([self.data(step, window, b).expand_as(x) for b in idx])


@pytest.mark.parametrize("granularity", ["latent", "window", "branch"])
def test_velocity_target_is_exact_on_polynomial_velocities(granularity):
    scheduler, windows, noise = _setup()
    assert ALPConfig().forecast_target == "auto" and ALPConfig(mode="paper").forecast_target == "velocity"
    assert ALPConfig(granularity="window").forecast_target == "data"
    full = sample_windows(PolyVelocityModel(scheduler), noise, scheduler, 30, windows, disable=True)
    model = PolyVelocityModel(scheduler)
    ours = sample_windows(model, noise, scheduler, 30, windows, disable=True,
                          alp=ALPConfig(granularity=granularity, order=2, target="velocity", budget=7, warmup=4))
    torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)
    assert len(model.calls or model.branch_calls) == 7 * len(windows)
    # order 1 cannot follow a quadratic velocity: the same run is then measurably off
    off = sample_windows(PolyVelocityModel(scheduler), noise, scheduler, 30, windows, disable=True,
                         alp=ALPConfig(granularity=granularity, order=1, target="velocity", budget=7, warmup=4))
    assert not torch.allclose(off, full, rtol=1e-4, atol=1e-4)


def test_auto_target_follows_the_velocity_where_it_forecasts_exactly():
    """target="auto" uses the velocity target while its forecasts hold: exact on a polynomial velocity, where the
    data target is measurably off."""
    scheduler, windows, noise = _setup()
    full = sample_windows(PolyVelocityModel(scheduler), noise, scheduler, 30, windows, disable=True)

    def run(target):
        model = PolyVelocityModel(scheduler)
        config = ALPConfig(order=2, target=target, budget=7, warmup=4, evaluate_last=True)
        out = sample_windows(model, noise, scheduler, 30, windows, disable=True, alp=config)
        assert len(model.calls) == 7 * len(windows)
        return out

    torch.testing.assert_close(run("auto"), full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(run("data"), full, rtol=1e-4, atol=1e-4)


def test_auto_target_switches_to_data_when_the_forecast_breaks_down():
    from flashportrait.alp import ALPRun

    scheduler = make_scheduler("euler")
    scheduler.set_timesteps(30)
    x = torch.ones(1, 2, 3, 3, 3)

    def run(velocities, limit=0.3):
        alp = ALPRun(ALPConfig(target="auto", order=1, budget=6, auto_limit=limit), scheduler.sigmas,
                     scheduler.timesteps)
        assert alp.target == "velocity" and set(alp.forecasters) == {"data", "velocity"}
        for step, v in enumerate(velocities):
            alp.observe(step, x, torch.full_like(x, v), scheduler)
        return alp

    smooth = run([1.0, 2.0, 3.0])  # linear in the step: order 1 of the velocity target is exact
    step, target, best = smooth.target_log[-1]
    assert (step, target, best["velocity"]) == (2, "velocity", 0.0) and best["data"] > 0
    assert smooth.forecaster is smooth.forecasters["velocity"]
    jump = run([1.0, 2.0, 30.0])  # both targets' forecasts off by ~90%: the data target takes over
    assert jump.target_log[-1][1] == "data" and jump.forecaster is jump.forecasters["data"]
    assert jump.target_log[-1][2]["velocity"] > 0.3
    assert run([1.0, 2.0, 30.0], limit=2.0).target_log[-1][1] == "velocity"  # within a generous limit


def test_paper_mode_runs_at_every_granularity_and_counts():
    scheduler, windows, noise = _setup()
    for granularity in ("latent", "window", "branch"):
        model = PolyDataModel(scheduler)
        config = ALPConfig(mode="paper", interval=5, order=3, granularity=granularity)
        out = sample_windows(model, noise, scheduler, 30, windows, disable=True, alp=config)
        assert torch.isfinite(out).all()
        steps = sorted({s for s, *_ in (model.calls or model.branch_calls)})
        assert steps == fixed_schedule(30, 1, 5)


@pytest.mark.parametrize("config", [ALPConfig(interval=4, warmup=2), ALPConfig(budget=6), ALPConfig(budget=9),
                                    ALPConfig(), ALPConfig(tolerance=0.01), ALPConfig(interval=7, warmup=1,
                                                                                      evaluate_last=False)])
def test_evaluation_counts_match_the_schedule(config):
    scheduler, windows, noise = _setup()
    model = PolyDataModel(scheduler, degree=3)
    seen = []
    sample_windows(model, noise, scheduler, 30, windows, disable=True, alp=config,
                   callback=lambda info: seen.append((info["step"], info["evaluated"])))
    evaluated = [s for s, e in seen if e]
    assert sorted({s for s, _ in model.calls}) == evaluated
    assert len(model.calls) == len(evaluated) * len(windows)  # every window once per evaluated step
    if config.interval is not None:
        assert evaluated == fixed_schedule(30, config.warmup, config.interval, config.evaluate_last is not False)
    if config.interval is None and config.tolerance is None:
        assert len(evaluated) == config.evaluations(30)
    assert evaluated[0] == 0


def test_every_step_evaluated_is_bit_identical_to_no_alp():
    scheduler, windows, noise = _setup("unipc")
    reference = sample_windows(PolyDataModel(scheduler), noise, scheduler, 30, windows, disable=True)
    again = sample_windows(PolyDataModel(scheduler), noise, scheduler, 30, windows, disable=True, alp=ALPConfig(budget=30))
    assert torch.equal(reference, again)


class PerWindowPolyModel(PolyDataModel):
    """Every window's data prediction is its own polynomial in the step index (windows disagree in the overlaps,
    as real ones do): a forecast fed from another window's history is wrong."""

    def data(self, step, window, branch):
        k = window.start
        return super().data(step, window, branch) * (1 + 0.3 * k) + 0.02 * (k - 3) * step**2 - 0.1 * k * step


def test_per_window_and_per_branch_states_never_mix(monkeypatch):
    """Windows / branches whose outputs follow different polynomials are each forecast from their own history
    (a shared or mixed cache would break the exact reproduction); the states are keyed by window.start, and
    each one holds exactly its own window's (and branch's) values."""
    from flashportrait import alp as alp_module

    scheduler, windows, noise = _setup(frames=14)
    assert len(windows) >= 3
    reference = sample_windows(PerWindowPolyModel(scheduler, seed=3), noise, scheduler, 30, windows, disable=True)
    runs = []
    original = alp_module._WindowModel.__call__

    def spy(self, x, t, window):
        runs.append(self.run)
        return original(self, x, t, window)

    monkeypatch.setattr(alp_module._WindowModel, "__call__", spy)
    for granularity in ("window", "branch"):
        model = PerWindowPolyModel(scheduler, seed=3)
        runs.clear()
        ours = sample_windows(model, noise, scheduler, 30, windows, disable=True,
                              alp=ALPConfig(granularity=granularity, order=2, target="data", budget=6, warmup=3,
                                            evaluate_last=True))
        torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-3)
        run = runs[-1]
        assert sorted(run.windows) == [w.start for w in windows]
        for window in windows:
            state = run.windows[window.start]
            if granularity == "window":
                # the data target of the guided output: sum_b weight_b * data_b (the weights sum to 1)
                f = state.forecasters["guided"]
                expected = [sum(w * model.data(int(t), window, b) for b, w in enumerate(model.weights))
                            for t in f.times]
            else:
                f = state.forecasters["cond"]  # the conditional (last) branch alone
                expected = [model.data(int(t), window, 1) for t in f.times]
            assert len(f.times) == 4  # order + 2 points held
            for got, want in zip(f.values, expected):
                torch.testing.assert_close(got, want.expand_as(got), rtol=1e-4, atol=1e-4)
    # and the windows' histories do differ, so a mixed cache could not have reproduced the run
    values = [run.windows[w.start].forecasters["cond"].values[-1] for w in windows]
    assert not torch.allclose(values[0], values[1], atol=1e-2)


def test_guidance_refresh_evaluates_the_other_branches_less_often():
    scheduler, windows, noise = _setup()
    model = PolyDataModel(scheduler)
    full = sample_windows(PolyDataModel(scheduler), noise, scheduler, 30, windows, disable=True)
    ours = sample_windows(model, noise, scheduler, 30, windows, disable=True,
                          alp=ALPConfig(granularity="branch", order=2, target="data", guidance_refresh=2, budget=8,
                                        warmup=3))
    per_window = [c for c in model.branch_calls if c[1] == 0]
    assert len(per_window) == 8
    assert [len(b) for _, _, b in per_window] == [2, 1, 2, 1, 2, 1, 2, 1]
    assert all(b == (1,) for _, _, b in per_window[1::2])  # only the conditional (last) branch
    torch.testing.assert_close(ours, full, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("evaluations", [6, 8])
def test_default_forecasting_beats_plain_step_reduction_on_a_smooth_problem(evaluations):
    """The issue's floor on a problem outside the benchmark's families (a data prediction that depends smoothly
    on x and time, not a polynomial): the shipped defaults with 6 or 8 of 30 evaluations are closer to the full
    30-step run than Euler with as many steps. (Measured here: 0.57x Euler's error at 6, 0.58x at 8; the
    benchmark's oracle problems gain more, see bench/bench_alp.py.)"""

    def model(x, t, window):
        s = float(t) / 1000
        x0 = torch.tanh(1.5 * x) * (1 - 0.5 * s) + 0.3 * math.sin(3 * s)
        return (x - x0) / max(s, 1e-3)

    scheduler, windows, noise = _setup()
    full = sample_windows(model, noise, make_scheduler("euler"), 30, windows, disable=True)
    euler = sample_windows(model, noise, make_scheduler("euler"), evaluations, windows, disable=True)
    calls = []

    def counted(x, t, window):
        calls.append(float(t))
        return model(x, t, window)

    config = ALPConfig() if evaluations == 6 else ALPConfig(budget=evaluations)
    ours = sample_windows(counted, noise, make_scheduler("euler"), 30, windows, disable=True, alp=config)
    assert len(calls) == evaluations * len(windows)
    assert (ours - full).norm() < 0.95 * (euler - full).norm()


def test_custom_sigmas_give_the_distilled_schedule():
    from flashportrait.lora import DISTILL_SIGMAS

    scheduler, windows, noise = _setup()
    timesteps = []
    sample_windows(lambda x, t, w: timesteps.append(float(t)) or x * 0, noise, scheduler, 4, windows,
                   disable=True, sigmas=DISTILL_SIGMAS)
    assert sorted(set(timesteps), reverse=True) == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=0.01)
    with pytest.raises(ValueError, match="sigmas has 4 values"):
        sample_windows(lambda x, t, w: x, noise, scheduler, 5, windows, disable=True, sigmas=DISTILL_SIGMAS)
    with pytest.raises(ValueError, match="no custom sigmas"):
        sample_windows(lambda x, t, w: x, noise, make_scheduler("dpm++"), 4, windows, disable=True,
                       sigmas=DISTILL_SIGMAS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="taylor"), "mode"),
        (dict(order=-1), "order"),
        (dict(interval=0), "interval"),
        (dict(budget=4, tolerance=0.1), "at most one"),
        (dict(tolerance=0.0), "tolerance"),
        (dict(warmup=0), "warmup"),
        (dict(alpha=-1.0), "alpha"),
        (dict(guidance_refresh=2), "granularity 'branch'"),
        (dict(target="noise"), "target"),
        (dict(target="auto", granularity="window"), "auto"),
        (dict(target="auto", mode="paper"), "auto"),
        (dict(auto_limit=-1.0), "auto_limit"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ALPConfig(**kwargs)


def test_budget_below_the_warmup_is_refused():
    scheduler, windows, noise = _setup()
    with pytest.raises(ValueError, match="warm-up"):
        sample_windows(lambda x, t, w: x, noise, scheduler, 30, windows, disable=True, alp=ALPConfig(budget=2, warmup=3))


def test_branch_granularity_needs_branch_outputs():
    scheduler, windows, noise = _setup()
    with pytest.raises(ValueError, match="branch_outputs"):
        sample_windows(lambda x, t, w: x, noise, scheduler, 30, windows, disable=True,
                       alp=ALPConfig(granularity="branch"))
