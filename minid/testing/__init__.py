"""A hypothesis kit for sampler math: strategies that draw what samplers take, and property checks
a user calls on their own sampler step or plan (minid's own sampler tests use the same ones).

- `strategies`: noise schedules (scaled-linear, linear, cosine trained betas), times and timestep
  grids, plans (DDIM, DPM-Solver++ orders 1-3, EditedID's hybrid with its window), latents, and the
  prompts and data of the exact-score testbed (minid.sampling.toy).
- `properties`: inversion then sampling returns the start at the exact score within a bound that
  shrinks with N; the observed order of convergence against the exact ODE; two steps are one map
  (DDIM = DPM-Solver++ order 1); a plan's times strictly decrease and cover [T, 0]; the hybrid's
  global timestep pre-setting.
- `FIXED`: hypothesis settings for CI: the same examples on every run (derandomized, no example
  database, no deadline); `@settings(FIXED, max_examples=30)`.

hypothesis is an optional extra: `pip install -e ".[testing]"` (or minid[testing]).
"""

from __future__ import annotations

try:
    import hypothesis
except ImportError:
    raise ImportError(
        'minid.testing needs hypothesis, an optional extra: pip install -e ".[testing]"'
    ) from None

from minid.testing.properties import (
    Solver,
    check_global_presetting,
    check_inverse_pair,
    check_order,
    check_plan_round_trip,
    check_plan_times,
    check_round_trip,
    check_steps_agree,
    convergence_errors,
    exact_eps,
    lambda_grid,
    minid_dpm_solver,
    observed_order,
    plan_round_trip_errors,
    round_trip_errors,
    with_step,
)
from minid.testing.strategies import (
    Grid,
    cosine_betas,
    ddim_plans,
    dpm_solver_plans,
    hybrid_plans,
    hybrid_schedules,
    latents,
    plans,
    schedules,
    step_counts,
    time_pairs,
    times,
    timestep_grids,
    toy_conditions,
    toy_model,
    toy_samples,
)

FIXED = hypothesis.settings(deadline=None, derandomize=True, database=None)

__all__ = [
    "FIXED",
    "Grid",
    "Solver",
    "check_global_presetting",
    "check_inverse_pair",
    "check_order",
    "check_plan_round_trip",
    "check_plan_times",
    "check_round_trip",
    "check_steps_agree",
    "convergence_errors",
    "cosine_betas",
    "ddim_plans",
    "dpm_solver_plans",
    "exact_eps",
    "hybrid_plans",
    "hybrid_schedules",
    "lambda_grid",
    "latents",
    "minid_dpm_solver",
    "observed_order",
    "plan_round_trip_errors",
    "plans",
    "round_trip_errors",
    "schedules",
    "step_counts",
    "toy_model",
    "time_pairs",
    "times",
    "timestep_grids",
    "toy_conditions",
    "toy_samples",
    "with_step",
]
