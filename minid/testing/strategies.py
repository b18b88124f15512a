"""Hypothesis strategies for the sampler math: noise schedules, times and timestep grids, plans,
latents, and the exact-score testbed's prompts.

Every strategy takes plain values or strategies for its parameters (a `NoiseSchedule` or
`schedules()`, an int or `st.integers(…)`), so a test pins what it does not vary:

    @settings(FIXED, max_examples=30)
    @given(plan=plans(schedule=NoiseSchedule.scaled_linear()))
    def test_my_plans(plan): check_plan_times(plan)

Schedules (`schedules`): SD's scaled-linear β (β_start, β_end drawn around SD1.4's 0.00085, 0.012),
DDPM's linear β, and "trained betas" of the cosine kind (Nichol & Dhariwal 2021, Eq. 17, with
their offset s and clip drawn), given as the explicit list a `trained_betas` scheduler config holds
and read through `NoiseSchedule.from_config`. Plans: DDIM (`ddim_plans`), DPM-Solver++ orders 1-3
(`dpm_solver_plans`), EditedID's hybrid with its window (`hybrid_schedules`, `hybrid_plans`).
Latents are drawn by seed (`latents`), so hypothesis shrinks a failure to seed 0, and
`toy_conditions` / `toy_samples` give the testbed of minid.sampling.toy its prompts and data.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from hypothesis import assume
from hypothesis import strategies as st

from minid.sampling.hybrid import HybridSchedule, hybrid_plan
from minid.sampling.plans import DDIM, DPM_SOLVER, Plan, ddim_plan, dpm_solver_plan
from minid.sampling.schedule import (
    DPM_SPACINGS,
    FINAL,
    NoiseSchedule,
    ddim_timesteps,
    dpm_solver_times,
)
from minid.sampling.toy import GaussianMixtureModel, ToyConfig

SCHEDULE_KINDS = ("scaled_linear", "linear", "cosine")
DDIM_SPACINGS = ("leading", "trailing", "linspace")
SEEDS = st.integers(0, 2**31 - 1)


def _strategy(value) -> st.SearchStrategy:
    """A strategy as it is, any other value as `st.just(value)`."""
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def cosine_betas(num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
    """β_t = 1 − ᾱ(t+1)/ᾱ(t) with ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), clipped at `max_beta`
    (Nichol & Dhariwal 2021, Eq. 17; diffusers' "squaredcos_cap_v2"), as a list of floats."""
    T = num_train_timesteps

    def alpha_bar(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    return [min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta) for i in range(T)]


# ---- schedules and times ------------------------------------------------------------------------


@st.composite
def schedules(
    draw,
    kinds=SCHEDULE_KINDS,
    num_train_timesteps=1000,
    set_alpha_to_one=st.booleans(),
    steps_offset=st.sampled_from([0, 1]),
) -> NoiseSchedule:
    """Noise schedules of the kinds named (see the module docstring)."""
    kind = draw(st.sampled_from(kinds))
    T = draw(_strategy(num_train_timesteps))
    common = dict(
        num_train_timesteps=T,
        set_alpha_to_one=draw(_strategy(set_alpha_to_one)),
        steps_offset=draw(_strategy(steps_offset)),
    )
    if kind == "scaled_linear":
        start = draw(st.floats(0.0005, 0.0015))
        end = draw(st.floats(0.008, 0.02))
        return NoiseSchedule.scaled_linear(start, end, **common)
    if kind == "linear":
        start = draw(st.floats(0.00005, 0.0002))
        end = draw(st.floats(0.01, 0.03))
        return NoiseSchedule.linear(start, end, **common)
    if kind == "cosine":
        betas = cosine_betas(T, draw(st.floats(0.004, 0.016)), draw(st.floats(0.99, 0.999)))
        return NoiseSchedule.from_config({"trained_betas": betas, **common})
    raise ValueError(f"schedule kind {kind!r} is not one of {', '.join(SCHEDULE_KINDS)}")


def times(schedule=None, low: float = 0.0, high: float | None = None) -> st.SearchStrategy:
    """Times on the training axis [low, high] (default: all of [0, T−1]), floats."""
    T = 1000 if schedule is None else schedule.num_train_timesteps
    return st.floats(low, T - 1.0 if high is None else high)


@st.composite
def time_pairs(draw, schedule=None, min_gap: float = 1e-3, final: bool = False):
    """(t, s) with t − s ≥ min_gap on the training axis: a step's noisier and less noisy ends. With
    `final`, s is sometimes the level FINAL (where DDIM's last step lands)."""
    a, b = draw(times(schedule)), draw(times(schedule))
    t, s = max(a, b), min(a, b)
    if final and draw(st.booleans()):
        return t, FINAL
    assume(t - s >= min_gap)
    return t, s


def step_counts(low: int = 1, high: int = 500) -> st.SearchStrategy:
    """How many steps a pass takes (one model call each)."""
    return st.integers(low, high)


class Grid(NamedTuple):
    """A timestep sequence and what made it."""

    solver: str  # DDIM or DPM_SOLVER
    num_steps: int
    spacing: str
    times: list  # noisiest first: ints for DDIM, floats for DPM-Solver++


@st.composite
def timestep_grids(
    draw,
    schedule=None,
    solvers=(DDIM, DPM_SOLVER),
    num_steps=None,
    ddim_spacings=DDIM_SPACINGS,
    dpm_spacings=DPM_SPACINGS,
) -> Grid:
    """The N times of `ddim_timesteps` or `dpm_solver_times` for a drawn N and spacing."""
    schedule = draw(_strategy(NoiseSchedule.scaled_linear() if schedule is None else schedule))
    solver = draw(st.sampled_from(solvers))
    n = draw(_strategy(step_counts() if num_steps is None else num_steps))
    if solver == DDIM:
        spacing = draw(st.sampled_from(ddim_spacings))
        ts = ddim_timesteps(n, spacing, schedule.steps_offset, schedule.num_train_timesteps)
    else:
        spacing = draw(st.sampled_from(dpm_spacings))
        ts = dpm_solver_times(schedule, n, spacing)
    return Grid(solver, n, spacing, ts)


# ---- plans ---------------------------------------------------------------------------------------


@st.composite
def ddim_plans(draw, schedule=None, num_steps=None, spacings=DDIM_SPACINGS, eta=0.0) -> Plan:
    """DDIMScheduler's passes (`ddim_plan`), 1 to 100 steps unless `num_steps` says."""
    schedule = draw(_strategy(schedules() if schedule is None else schedule))
    n = draw(_strategy(step_counts(1, 100) if num_steps is None else num_steps))
    return ddim_plan(schedule, n, draw(st.sampled_from(spacings)), eta=draw(_strategy(eta)))


@st.composite
def dpm_solver_plans(
    draw, schedule=None, num_steps=None, orders=(1, 2, 3), spacings=DPM_SPACINGS
) -> Plan:
    """DPMSolverMultistepScheduler's passes (`dpm_solver_plan`), orders 1-3, with and without
    diffusers' lower_order_final; 1 to 100 steps unless `num_steps` says (building a plan of N
    steps takes O(N²) λ look-ups)."""
    schedule = draw(_strategy(schedules() if schedule is None else schedule))
    n = draw(_strategy(step_counts(1, 100) if num_steps is None else num_steps))
    return dpm_solver_plan(
        schedule,
        n,
        draw(st.sampled_from(spacings)),
        draw(st.sampled_from(orders)),
        draw(st.booleans()),
    )


@st.composite
def hybrid_schedules(
    draw, num_steps=None, timesteps=("global",), orders=(1, 2, 3)
) -> HybridSchedule:
    """EditedID's hybrid solvers: N, the DPM-Solver++ window τ_s … τ_e (1-based or counted from
    the end, as `HybridSchedule` takes it), both spacings, the order, the history rule and the caps
    of the last steps. Global pre-setting by default; `timesteps=("global", "fragmented")` draws
    the paper's ablation too."""
    n = draw(_strategy(st.integers(1, 50) if num_steps is None else num_steps))
    start = draw(st.integers(1, n))
    end = draw(st.integers(start, n))
    if draw(st.booleans()):  # the same window counted from the end
        start, end = start - n - 1, end - n - 1
    return HybridSchedule(
        num_steps=n,
        dpm_start=start,
        dpm_end=end,
        timesteps=draw(st.sampled_from(timesteps)),
        ddim_spacing=draw(st.sampled_from(DDIM_SPACINGS)),
        dpm_spacing=draw(st.sampled_from(DPM_SPACINGS)),
        dpm_order=draw(st.sampled_from(orders)),
        history=draw(st.sampled_from(["pass", "run"])),
        lower_order_final=draw(st.booleans()),
        final_order=draw(st.sampled_from([1, 2])),
    )


@st.composite
def hybrid_plans(draw, schedule=None, hybrid=None) -> Plan:
    """The plans of `hybrid_schedules()` (or of the hybrid strategy given)."""
    schedule = draw(_strategy(schedules() if schedule is None else schedule))
    return hybrid_plan(schedule, draw(_strategy(hybrid_schedules() if hybrid is None else hybrid)))


def plans(schedule=None, num_steps=None) -> st.SearchStrategy:
    """Any of minid's plans: DDIM, DPM-Solver++ or the hybrid."""
    hybrid = hybrid_schedules(num_steps=min(num_steps, 50) if isinstance(num_steps, int) else None)
    return st.one_of(
        ddim_plans(schedule, num_steps),
        dpm_solver_plans(schedule, num_steps),
        hybrid_plans(schedule, hybrid),
    )


# ---- latents and the exact-score testbed ---------------------------------------------------------


@st.composite
def latents(draw, shape=(1, 4, 8, 8), dtype=torch.float64, scale=1.0) -> torch.Tensor:
    """Standard normal latents of `shape` (an int tuple or a strategy of them) times `scale`,
    drawn from a seed."""
    shape = tuple(draw(_strategy(shape)))
    g = torch.Generator().manual_seed(draw(SEEDS))
    return draw(_strategy(scale)) * torch.randn(shape, generator=g, dtype=dtype)


@functools.lru_cache(maxsize=8)
def toy_model(side: int = 4, components: int = 3, rank: int = 4, seed: int = 0):
    """A small exact-score testbed (minid.sampling.toy), d = 4·side² (64 by default), built once per
    process: its ε and its ODE solution (`flow`) are known exactly, so a sampler's errors are the
    sampler's own. SD's schedule."""
    return GaussianMixtureModel(ToyConfig(side=side, components=components, rank=rank, seed=seed))


@st.composite
def toy_conditions(draw, model=None, batch=st.integers(1, 3), offsets: bool = True):
    """Prompt embeddings (B, 1, E) of the testbed: each row favours one component at a drawn
    strength, or is ∅ (equal logits); with `offsets`, a small mean offset s is added to some rows
    (what null-text optimisation moves)."""
    model = toy_model() if model is None else model
    rows = []
    for _ in range(draw(_strategy(batch))):
        if draw(st.booleans()):
            row = model.null_prompt()
        else:
            k = draw(st.integers(0, model.num_components - 1))
            row = model.prompt(k, draw(st.floats(0.0, 4.0)))
        if offsets and model.config.offset and draw(st.booleans()):
            g = torch.Generator().manual_seed(draw(SEEDS))
            scale = draw(st.floats(0.0, 0.3))
            offset = scale * torch.randn(model.dim, generator=g, dtype=torch.float64)
            row[0, 0, model.num_components :] = offset
        rows.append(row)
    return torch.cat(rows)


@st.composite
def toy_samples(draw, model=None, batch=st.integers(1, 3)):
    """(x_0, context): data drawn from the testbed under drawn prompts, (B, 4, side, side)
    float64 and (B, 1, E)."""
    model = toy_model() if model is None else model
    context = draw(toy_conditions(model, batch))
    x0, _ = model.sample(context, torch.Generator().manual_seed(draw(SEEDS)))
    return x0, context
