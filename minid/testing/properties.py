"""Property checks for a sampler step or a plan. Each `check_…` raises AssertionError with the
numbers when the property fails and returns what it measured when it holds, so it reads the same
inside a hypothesis test, a pytest test or a notebook.

A *step* has the signature of minid's one-step samplers (samplers.py),

    step(z, eps, t, s, schedule) -> z at s          sampling, t noisier than s
    inversion(z, eps, t, s, schedule) -> z at t     the inversion, z given at s

with eps the model's ε at the current point: `ddim_step` and `ddim_inversion_step` are steps as they
are. A multistep method is a *solver*, `Solver(solve)` with `solve(eps_fn, z, times, schedule) -> z`
over a whole grid of times (`minid_dpm_solver(order)` is DPM-Solver++); `with_step(step)` makes the
solver of a one-step method.

The checks that need an exact score run on the testbed of minid.sampling.toy (a Gaussian mixture,
`strategies.toy_model()` by default): its ε is known in closed form and `model.flow` integrates its
probability-flow ODE to ~1e-9, so what a check measures is the sampler's error alone.

- `check_inverse_pair`: with ε independent of z, inversion then step returns the start.
- `check_steps_agree`: two steps are the same map (DDIM = DPM-Solver++ order 1).
- `check_round_trip`: inversion of data over N steps then sampling back returns the data, at the
  exact score, within a bound that shrinks with N (like N^-order).
- `check_order`: the observed order of convergence against the exact ODE.
- `check_plan_times`: a plan's times strictly decrease, cover [T, 0] and land where the next step
  starts; the orders are valid.
- `check_global_presetting`: the hybrid plan's global timestep pre-setting (hybrid._global_times).
- `check_plan_round_trip`: inversion then sampling through minid's loops, errors shrinking with N.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from minid.sampling.hybrid import HybridSchedule
from minid.sampling.plans import DDIM, DPM_SOLVER, Plan
from minid.sampling.samplers import (
    SolverState,
    dpm_solver_step,
    invert_loop,
    sample_loop,
    x0_from_eps,
)
from minid.sampling.schedule import (
    CLEAN,
    FINAL,
    NoiseSchedule,
    ddim_timesteps,
    dpm_solver_times,
    model_timestep,
)

Step = Callable[[torch.Tensor, torch.Tensor, float, float, NoiseSchedule], torch.Tensor]
EpsFn = Callable[[torch.Tensor, float], torch.Tensor]  # eps_fn(z, time) -> ε at z


@dataclass(frozen=True)
class Solver:
    """A sampler over a whole grid: solve(eps_fn, z, times, schedule) -> z at times[-1], from z at
    times[0] (times strictly decreasing)."""

    solve: Callable
    name: str = "solver"

    def __call__(self, eps_fn: EpsFn, z: torch.Tensor, times, schedule: NoiseSchedule):
        return self.solve(eps_fn, z, times, schedule)


def with_step(step: Step, name: str | None = None) -> Solver:
    """The solver of a one-step method: `step` from each time of the grid to the next, ε at the
    current point."""

    def solve(eps_fn, z, times, schedule):
        for t, s in zip(times, times[1:]):
            z = step(z, eps_fn(z, t), t, s, schedule)
        return z

    return Solver(solve, name or getattr(step, "__name__", "step"))


def minid_dpm_solver(order: int) -> Solver:
    """minid's DPM-Solver++ (multistep, data prediction) of `order` over a grid, warming up from
    order 1 as a pass does."""

    def solve(eps_fn, z, times, schedule):
        state = SolverState()
        for t, s in zip(times, times[1:]):
            eps = eps_fn(z, t)
            z, state = (
                dpm_solver_step(z, eps, t, s, schedule, state, order),
                state.remember(x0_from_eps(z, eps, t, schedule), schedule.lam(t)),
            )
        return z

    return Solver(solve, f"DPM-Solver++ order {order}")


def _testbed(model, context):
    from minid.testing.strategies import toy_model

    model = toy_model() if model is None else model
    return model, model.prompt(list(range(model.num_components))) if context is None else context


def exact_eps(model, context: torch.Tensor) -> EpsFn:
    """The testbed's exact ε at z and a time (or the levels FINAL and CLEAN), under `context`."""

    def eps_fn(z, time):
        schedule = model.schedule
        condition = context[:, 0].expand(z.shape[0], -1)
        return model.eps_at(z, schedule.alpha(time), schedule.sigma(time), condition)

    return eps_fn


def lambda_grid(schedule: NoiseSchedule, t: float, s: float, num_steps: int) -> list[float]:
    """num_steps + 1 times from t to s, uniform in λ (both ends exact)."""
    lams = np.linspace(schedule.lam(t), schedule.lam(s), num_steps + 1)
    return [float(t)] + [schedule.t_of_lam(float(x)) for x in lams[1:-1]] + [float(s)]


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    err = (a - b).abs().max().item()
    return math.inf if math.isnan(err) else err


# ---- one step ------------------------------------------------------------------------------------


def check_inverse_pair(
    step: Step,
    inversion: Step,
    z: torch.Tensor,
    eps: torch.Tensor,
    t: float,
    s: float,
    schedule: NoiseSchedule,
    atol: float = 1e-9,
) -> float:
    """With ε independent of z, `inversion` from s up to t then `step` from t back to s returns z
    (to float64 rounding: |z_t|·σ_t/σ_s reaches ~100 on SD's schedule, hence atol 1e-9). Returns
    the error."""
    back = step(inversion(z, eps, t, s, schedule), eps, t, s, schedule)
    err = _max_error(back, z)
    assert err <= atol, f"inversion then step from t={t} to s={s}: error {err:.3e} > {atol:.1e}"
    return err


def check_steps_agree(
    step_a: Step,
    step_b: Step,
    z: torch.Tensor,
    eps: torch.Tensor,
    t: float,
    s: float,
    schedule: NoiseSchedule,
    atol: float = 1e-10,
) -> float:
    """Two steps are the same map at (z, ε, t, s), e.g. DDIM and DPM-Solver++ of order 1. Returns
    the largest difference."""
    err = _max_error(step_a(z, eps, t, s, schedule), step_b(z, eps, t, s, schedule))
    assert err <= atol, f"the two steps differ at t={t}, s={s} by {err:.3e} > {atol:.1e}"
    return err


def round_trip_errors(
    step: Step,
    inversion: Step,
    ns: Sequence[int] = (8, 16, 32, 64),
    model=None,
    context: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    t_max: float = 999.0,
    t_min: float = 0.0,
) -> list[float]:
    """For each N: x0 taken as the latent at t_min, inverted up to t_max over N λ-uniform steps
    with the exact ε at each current point, then sampled back down; the largest error against x0.
    The testbed and its data by default."""
    model, context = _testbed(model, context)
    if x0 is None:
        x0, _ = model.sample(context, torch.Generator().manual_seed(0))
    eps_fn, schedule = exact_eps(model, context), model.schedule
    errors = []
    for n in ns:
        grid = lambda_grid(schedule, t_max, t_min, n)
        z = x0
        for t, s in reversed(list(zip(grid, grid[1:]))):
            z = inversion(z, eps_fn(z, s), t, s, schedule)
        for t, s in zip(grid, grid[1:]):
            z = step(z, eps_fn(z, t), t, s, schedule)
        errors.append(_max_error(z, x0))
    return errors


def check_round_trip(
    step: Step,
    inversion: Step,
    ns: Sequence[int] = (8, 16, 32, 64),
    order: float = 1.0,
    slack: float = 2.0,
    floor: float = 1e-10,
    **testbed,
) -> list[float]:
    """Inversion then sampling returns the start at the exact score within a bound that shrinks
    with N: the error falls at every finer grid (until it reaches `floor`); from the coarsest grid
    to the finest it falls at least like N^-order, and between the two finest grids too (each
    times `slack`). DDIM's round trip is of order 1 (its inversion reads ε at the less noisy end).

    The rate is asked of the whole range and of its fine end, not of every grid from the
    coarsest: under a peaked prompt a coarse inversion can carry the start into another mode's
    basin, where the error stays O(1) (falling slowly) until N is fine enough, and only then falls
    like N^-order. Returns the errors."""
    errors = round_trip_errors(step, inversion, ns, **testbed)
    overall = max(errors[0] * slack * (ns[0] / ns[-1]) ** order, floor)
    fine = max(errors[-2] * slack * (ns[-2] / ns[-1]) ** order, floor) if len(ns) > 1 else overall
    shrinking = all(b < a or b <= floor for a, b in zip(errors, errors[1:]))
    table = ", ".join(f"N={n}: {e:.3e}" for n, e in zip(ns, errors))
    assert math.isfinite(errors[0]) and shrinking and errors[-1] <= min(overall, fine), (
        f"round trip errors do not shrink like N^-{order}: {table} (bounds at N={ns[-1]}: "
        f"{overall:.3e} from N={ns[0]}, {fine:.3e} from N={ns[-2]})"
    )
    return errors


def convergence_errors(
    solver,
    ns: Sequence[int] = (16, 32, 64),
    model=None,
    context: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    t: float = 999.0,
    s: float = 0.0,
    flow_steps: int = 400,
) -> list[float]:
    """The error at s of an N-step λ-uniform solve from z at t, against the exact ODE solution
    (`model.flow`), for each N. `solver`: a `Solver`, or a step (made one by `with_step`). z
    defaults to the testbed's data carried to t by the exact flow."""
    solver = solver if isinstance(solver, Solver) else with_step(solver)
    if z is None and context is None:
        model, context, z, exact = _default_reference(model, t, s, flow_steps)
    else:
        model, context = _testbed(model, context)
        if z is None:
            z = _start(model, context, t, flow_steps)
        exact = model.flow(z, t, s, context, steps=flow_steps)
    eps_fn = exact_eps(model, context)
    return [
        _max_error(solver(eps_fn, z, lambda_grid(model.schedule, t, s, n), model.schedule), exact)
        for n in ns
    ]


def _start(model, context, t, flow_steps):
    """The testbed's data under `context` carried to t by the exact flow."""
    x0, _ = model.sample(context, torch.Generator().manual_seed(0))
    return model.flow(x0, CLEAN, t, context, steps=flow_steps)


@functools.lru_cache(maxsize=16)
def _default_reference(model, t, s, flow_steps):
    """(model, context, z at t, exact z at s) of the default start, computed once per process."""
    model, context = _testbed(model, None)
    z = _start(model, context, t, flow_steps)
    return model, context, z, model.flow(z, t, s, context, steps=flow_steps)


def observed_order(ns: Sequence[int], errors: Sequence[float]) -> float:
    """The slope of −log(error) against log(N), least squares: the order of convergence."""
    if not all(math.isfinite(e) and e > 0 for e in errors):
        return -math.inf
    return float(-np.polyfit(np.log(ns), np.log(errors), 1)[0])


def check_order(
    solver,
    expected: float,
    ns: Sequence[int] = (16, 32, 64),
    tol: float = 0.3,
    **testbed,
) -> float:
    """The observed order of convergence against the exact ODE is `expected` ± `tol` (DDIM 1,
    DPM-Solver++ 2M 2; minid's 3M is 2 in the asymptotic regime, samplers.py's Caution). Returns the
    order."""
    errors = convergence_errors(solver, ns, **testbed)
    order = observed_order(ns, errors)
    name = solver.name if isinstance(solver, Solver) else getattr(solver, "__name__", "step")
    table = ", ".join(f"N={n}: {e:.3e}" for n, e in zip(ns, errors))
    assert abs(order - expected) <= tol, (
        f"{name}: observed order {order:.2f}, expected {expected} ± {tol} ({table})"
    )
    return order


# ---- plans ---------------------------------------------------------------------------------------


def check_plan_times(plan: Plan, continuous: bool = False) -> None:
    """A plan walks the whole pass: its times lie on [0, T−1] and strictly decrease, from within two
    step lengths (2T/N) of pure noise T−1, plus the T mod N (DPM-Solver++: T mod (N+1)) timesteps
    "leading" spacing leaves above its first time (Lin et al. 2023, Table 2), down to within two of
    0, and its last step lands below the training axis (FINAL for DDIM, or timestep 0; CLEAN for
    DPM-Solver++), so the pass covers [T, 0]. Each step
    lands below where it starts and at or above where the next one starts, less than a step away
    (DDIM's t − T//N leaves a gap of a timestep with the trailing and linspace spacings; diffusers'
    rule); with `continuous` (DPM-Solver++ passes, the global hybrid, leading DDIM) exactly there.
    Every step's timestep is its time rounded, and its orders are valid (DDIM 1, DPM-Solver++ 1 ≤
    inversion order ≤ order ≤ 3). The fragmented hybrid (the paper's ablation) is not one pass: it
    restarts at each solver switch."""
    steps, T = plan.steps, plan.schedule.num_train_timesteps
    n = len(steps)
    ts = [step.t for step in steps]
    where = f"plan of {n} steps, times {[round(t, 2) for t in ts][:12]}{'…' if n > 12 else ''}"
    assert n >= 1, "a plan has at least one step"
    assert all(0 <= t <= T - 1 for t in ts), f"a time outside [0, {T - 1}]: {where}"
    assert all(a > b for a, b in zip(ts, ts[1:])), f"times not strictly decreasing: {where}"
    top = T - 1 - 2 * T / n - (n + 1)  # "leading" leaves T mod N (DPM: T mod (N+1)) above
    assert ts[0] >= top, f"the first time is far from pure noise: {where}"
    assert ts[-1] <= 2 * T / n, f"the last time is far from 0: {where}"
    final = {DDIM: FINAL, DPM_SOLVER: CLEAN}
    last = steps[-1]
    # DDIM's t − T//N can land on timestep 0 itself (trailing spacing, T//N dividing the last time)
    on_data = last.s is final[last.solver] or (last.solver == DDIM and last.s == 0.0)
    assert on_data, f"the last step lands on {last.s}, not data: {where}"
    for i, step in enumerate(steps):
        below = step.s is FINAL or step.s is CLEAN or step.s < step.t
        assert below, f"step {i + 1} lands at {step.s}, not below its start {step.t}: {where}"
        if i + 1 < n:
            nxt = steps[i + 1].t
            lands = f"step {i + 1} lands at {step.s}, step {i + 2} starts at {nxt}: {where}"
            if continuous:
                assert step.s == nxt, lands
            else:
                assert nxt <= step.s and step.s - nxt < step.t - step.s, lands
        assert step.timestep == model_timestep(step.t), f"step {i + 1}'s timestep: {where}"
        if step.solver == DDIM:
            assert step.order == step.inversion_order == 1, f"DDIM step {i + 1} of order >1"
        else:
            assert 1 <= step.inversion_order <= step.order <= 3, (
                f"step {i + 1}: orders {step.order}, {step.inversion_order}: {where}"
            )


def check_global_presetting(plan: Plan, hybrid: HybridSchedule) -> list[int]:
    """The hybrid's global timestep pre-setting (paper Eq. 6, hybrid._global_times): the plan is
    continuous; (1) DPM-Solver++ steps keep their times of the full N-step DPM-Solver++ sequence;
    (2) a DDIM step strictly between the DPM-Solver++ times around it keeps its DDIM time; (3) each
    block of DDIM steps that does not is spread uniformly in λ between the kept times on either side
    (from T−1 when it opens the pass, above λ(0) when it ends it). Returns the moved steps
    (0-based)."""
    assert hybrid.timesteps == "global", "global pre-setting is the rule of timesteps='global'"
    schedule, n = plan.schedule, hybrid.num_steps
    T = schedule.num_train_timesteps
    ddim_seq = ddim_timesteps(n, hybrid.ddim_spacing, schedule.steps_offset, T)
    dpm_seq = dpm_solver_times(schedule, n, hybrid.dpm_spacing)
    check_plan_times(plan, continuous=True)
    ts = [s.t for s in plan.steps]
    dpm = [s.solver == DPM_SOLVER for s in plan.steps]
    assert dpm == [solver == DPM_SOLVER for solver in hybrid.solvers()], "solvers differ"
    where = f"{hybrid}: {[round(t, 2) for t in ts]}"
    moved = []
    for i in range(n):
        if dpm[i]:
            assert ts[i] == dpm_seq[i], f"DPM-Solver++ step {i + 1} moved: {where}"
            continue
        above = [dpm_seq[j] for j in range(i) if dpm[j]]
        below = [dpm_seq[j] for j in range(i + 1, n) if dpm[j]]
        if (not above or ddim_seq[i] < above[-1]) and (not below or ddim_seq[i] > below[0]):
            assert ts[i] == ddim_seq[i], f"DDIM step {i + 1} moved although in bounds: {where}"
        else:
            moved.append(i)
    for block in _blocks(moved):
        first, last = block[0], block[-1]
        lams = [schedule.lam(ts[i]) for i in block]
        if first > 0:
            lams = [schedule.lam(ts[first - 1])] + lams
        else:
            assert ts[0] == T - 1, f"a moved block that opens the pass starts at T−1: {where}"
        lams = lams + [schedule.lam(ts[last + 1]) if last + 1 < n else schedule.lam(0)]
        gaps = [b - a for a, b in zip(lams, lams[1:])]
        assert max(gaps) - min(gaps) < 1e-9 * max(1.0, max(map(abs, gaps))), (
            f"moved block {block} not λ-uniform (gaps {gaps}): {where}"
        )
    return moved


def _blocks(indices: list[int]) -> list[list[int]]:
    blocks: list[list[int]] = []
    for i in indices:
        if blocks and blocks[-1][-1] == i - 1:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    return blocks


def plan_round_trip_errors(
    make_plan: Callable[[int], Plan],
    ns: Sequence[int] = (6, 12, 24, 48),
    model=None,
    context: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> list[float]:
    """For each N: x0 taken as the latent at the plan's last level, inverted to its first time by
    `invert_loop` and sampled back by `sample_loop`, the model the testbed's exact ε at the time
    each point lies at; the largest error against x0."""
    model, context = _testbed(model, context)
    if x0 is None:
        x0, _ = model.sample(context, torch.Generator().manual_seed(0))
    eps_fn = exact_eps(model, context)
    errors = []
    for n in ns:
        plan = make_plan(n)
        steps = plan.steps
        z = invert_loop(lambda z, _, i, land, steps=steps: eps_fn(z, steps[i].s), x0, plan)
        z = sample_loop(lambda z, _, i, land, steps=steps: eps_fn(z, steps[i].t), z, plan)
        errors.append(_max_error(z, x0))
    return errors


def check_plan_round_trip(
    make_plan: Callable[[int], Plan],
    ns: Sequence[int] = (6, 12, 24, 48),
    order: float = 1.0,
    slack: float = 2.0,
    floor: float = 1e-10,
    **testbed,
) -> list[float]:
    """`check_round_trip` for the plans `make_plan(N)` through minid's loops. Returns the errors."""
    errors = plan_round_trip_errors(make_plan, ns, **testbed)
    bounds = [max(errors[0] * slack * (ns[0] / n) ** order, floor) for n in ns]
    table = ", ".join(f"N={n}: {e:.3e} (bound {b:.3e})" for n, e, b in zip(ns, errors, bounds))
    shrinking = all(b < a or b <= floor for a, b in zip(errors, errors[1:]))
    assert (
        math.isfinite(errors[0])
        and shrinking
        and all(e <= b for e, b in zip(errors[1:], bounds[1:]))
    ), f"plan round trip errors do not shrink like N^-{order}: {table}"
    return errors
