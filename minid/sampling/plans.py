"""Plans: which solver runs each step of a pass, between which times, at which order.

A `Plan` is the whole pass from pure noise to data as a tuple of `PlanStep`s; the sampling loop of
samplers.py walks it forwards and the inversion loop backwards, so one plan fixes both directions
(EditedID's symmetry: the same solver at the same noise levels). Three plans:

- `ddim_plan`: diffusers' DDIMScheduler pass;
- `dpm_solver_plan`: diffusers' DPMSolverMultistepScheduler pass (DPM-Solver++, data prediction);
- `hybrid_plan` with a `HybridSchedule` (hybrid.py): EditedID's hybrid solver (paper Eq. 5-6),
  DPM-Solver++ on steps τ_s … τ_e and DDIM on the others, with global timestep pre-setting.

Times are floats on the training axis, with the two levels below 0 of schedule.py: FINAL and CLEAN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minid.sampling.schedule import (
    CLEAN,
    FINAL,
    NoiseSchedule,
    ddim_timesteps,
    dpm_solver_times,
    model_timestep,
)

DDIM = "ddim"
DPM_SOLVER = "dpm_solver++"


# ---- plans: which solver runs each step, between which times -------------------------------------


@dataclass(frozen=True)
class PlanStep:
    """One step of a plan, named by its pair of times in both directions (see the module
    docstring)."""

    solver: str  # DDIM or DPM_SOLVER
    t: float  # noisier end: where sampling starts, where inversion lands
    # less noisy end: where sampling lands, where inversion starts (FINAL/CLEAN after the last step)
    s: float
    timestep: int  # what the model is told, in both directions: the noisier end, rounded
    # DPM-Solver++ order when sampling (warm-up and lower_order_final applied); 1 for DDIM
    order: int = 1
    # DPM-Solver++ order when inverting: `order`, lowered to what the preceding
    inversion_order: int = 1
    #                           inversion steps' predictions allow (see `_with_orders`)


@dataclass(frozen=True)
class Plan:
    """A whole pass: the schedule and the steps from pure noise to data (inversion walks them
    backwards)."""

    schedule: NoiseSchedule
    steps: tuple[PlanStep, ...]
    eta: float = 0.0  # DDIM η for the sampling direction (inversion is always deterministic)
    # diffusers' DDIMScheduler(clip_sample=True): the DDIM steps (and their inversions) clamp x̂_0
    # to [−clip_sample_range, clip_sample_range]; SD1.4 does not (its latents exceed 1), so off by
    # default
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @property
    def timesteps(self) -> list[int]:
        return [step.timestep for step in self.steps]

    @property
    def clip(self) -> float | None:
        """The bound of the DDIM steps' x̂_0, None when they do not clip."""
        return self.clip_sample_range if self.clip_sample else None


def ddim_plan(
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: str = "leading",
    eta: float = 0.0,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
) -> Plan:
    """DDIMScheduler's pass: timesteps from `ddim_timesteps`, each step from t to t − T//N
    (diffusers' convention for every spacing; below 0 is the FINAL level, ᾱ = final_alphas_cumprod);
    `clip_sample`, `clip_sample_range` as DDIMScheduler's (see `Plan`)."""
    T = schedule.num_train_timesteps
    ts = ddim_timesteps(num_steps, spacing, schedule.steps_offset, T)
    steps = tuple(
        PlanStep(DDIM, float(t), float(t - T // num_steps) if t - T // num_steps >= 0 else FINAL, t)
        for t in ts
    )
    return Plan(schedule, steps, eta, clip_sample, clip_sample_range)


def dpm_solver_plan(
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: str = "logSNR",
    order: int = 2,
    lower_order_final: bool = True,
) -> Plan:
    """DPMSolverMultistepScheduler's pass (algorithm_type="dpmsolver++", final_sigmas_type="zero"):
    the times of `dpm_solver_times`, each step landing on the next, the last one on CLEAN at order 1
    (diffusers' rule)."""
    times = dpm_solver_times(schedule, num_steps, spacing)
    solvers = [DPM_SOLVER] * num_steps
    return Plan(
        schedule,
        _with_orders(
            schedule,
            solvers,
            times,
            times[1:] + [CLEAN],
            order,
            lower_order_final,
            final_order=1,
            history="run",
            clean_order=1,
        ),
    )


def _with_orders(
    schedule: NoiseSchedule,
    solvers: list[str],
    ts: list[float],
    ss: list[float],
    order: int,
    lower_order_final: bool,
    final_order: int,
    history: str,
    clean_order: int,
) -> tuple[PlanStep, ...]:
    """Attach the DPM-Solver++ orders to the steps (DDIM steps get order 1).

    Sampling, step i: order ≤ 1 + the number of predictions already on the path (warm-up, diffusers'
    rule). They are those of the steps just before, back to the first one that did not land where
    the next starts (the fragmented hybrid jumps at a switch), counting DDIM steps with
    `history="pass"` and only DPM-Solver++ steps with `history="run"` (each run warms up afresh).
    With `lower_order_final` and fewer than 15 steps, the last step's order is ≤ `final_order` and
    the one before ≤ 2 (diffusers: 1 and 2). A step to CLEAN is ≤ `clean_order` (diffusers: 1; see
    `_dpm_solver_update` for what order 2 means there).

    Inversion, step i run backwards: the same order at the same step (the paper's symmetry), lowered
    to 1 + the predictions of the preceding INVERSION steps (the later steps of the plan, at their
    less noisy ends), counted by the same rule but only at finite λ: a prediction at CLEAN (λ = ∞;
    FINAL too when the schedule sets ᾱ = 1 there) has no finite distance in λ to the next one. So
    the inversion of a step from CLEAN, and of the step after it, are order 1.
    """
    if history not in ("pass", "run"):
        raise ValueError(
            f"history={history!r} is not 'pass' (every earlier step's x̂_0) or 'run' "
            "(only those of the current run of DPM-Solver++ steps)"
        )

    # does step k's prediction belong to the history of the next step on the path?
    def counts(k: int) -> bool:
        return history == "pass" or solvers[k] == DPM_SOLVER

    n = len(solvers)
    steps = []
    for i, solver in enumerate(solvers):
        o = inv = 1
        if solver == DPM_SOLVER:
            before, k = 0, i - 1  # sampling history: steps i−1, i−2, … on a continuous path
            while k >= 0 and ss[k] == ts[k + 1] and counts(k):
                before, k = before + 1, k - 1
            o = min(order, before + 1)
            if lower_order_final and n < 15:
                o = min(o, final_order) if i == n - 1 else (min(o, 2) if i == n - 2 else o)
            if ss[i] is CLEAN:
                o = min(o, clean_order)
            after, k = 0, i + 1  # inversion history: steps i+1, i+2, … (run first), from finite λ
            while k < n and ss[k - 1] == ts[k] and counts(k) and math.isfinite(schedule.lam(ss[k])):
                after, k = after + 1, k + 1
            inv = min(o, after + 1) if math.isfinite(schedule.lam(ss[i])) else 1
        steps.append(PlanStep(solver, ts[i], ss[i], model_timestep(ts[i]), o, inv))
    return tuple(steps)
