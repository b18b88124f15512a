"""minid.testing, the hypothesis kit for sampler math: its properties hold on minid's own samplers
and plans, and fail on a deliberately broken step (a sign error, a wrong α) or plan."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from minid.sampling.hybrid import HybridSchedule, hybrid_plan
from minid.sampling.plans import DPM_SOLVER, ddim_plan, dpm_solver_plan
from minid.sampling.samplers import (
    SolverState,
    ddim_inversion_step,
    ddim_step,
    dpm_solver_step,
)
from minid.sampling.schedule import CLEAN, NoiseSchedule
from minid.testing import (
    FIXED,
    check_global_presetting,
    check_inverse_pair,
    check_order,
    check_plan_round_trip,
    check_plan_times,
    check_round_trip,
    check_steps_agree,
    ddim_plans,
    dpm_solver_plans,
    hybrid_schedules,
    latents,
    minid_dpm_solver,
    schedules,
    time_pairs,
    timestep_grids,
    toy_conditions,
    toy_model,
    toy_samples,
    with_step,
)

SCHEDULE = NoiseSchedule.scaled_linear()


def dpm_solver_1(z, eps, t, s, schedule):
    """DPM-Solver++ of order 1 as a one-step sampler."""
    return dpm_solver_step(z, eps, t, s, schedule, SolverState(), order=1)


# ---- deliberately broken steps: DDIM with one mistake each ---------------------------------------


def sign_error_step(z, eps, t, s, schedule):
    """DDIM with the noise term's sign flipped: z_s = α_s x̂_0 − σ_s ε."""
    x0 = (z - schedule.sigma(t) * eps) / schedule.alpha(t)
    return schedule.alpha(s) * x0 - schedule.sigma(s) * eps


def wrong_alpha_step(z, eps, t, s, schedule):
    """DDIM with x̂_0 divided by α of the wrong end: x̂_0 = (z_t − σ_t ε)/α_s."""
    x0 = (z - schedule.sigma(t) * eps) / schedule.alpha(s)
    return schedule.alpha(s) * x0 + schedule.sigma(s) * eps


BROKEN = [sign_error_step, wrong_alpha_step]
# finding a failure is the point; shrinking it to the smallest example would only cost time
FIND = (Phase.explicit, Phase.generate)


# ---- the extra -----------------------------------------------------------------------------------


def test_without_hypothesis_the_import_names_the_extra():
    code = (
        "import sys\nsys.modules['hypothesis'] = None\n"
        "try:\n    import minid.testing\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert message.count("\n") == 0 and 'pip install -e ".[testing]"' in message, message


# ---- one step: the exact properties --------------------------------------------------------------


@settings(FIXED, max_examples=30)
@given(pair=time_pairs(final=True), z=latents(shape=(16,)), eps=latents(shape=(16,)))
def test_minid_steps_invert_exactly_when_eps_ignores_z(pair, z, eps):
    check_inverse_pair(ddim_step, ddim_inversion_step, z, eps, *pair, SCHEDULE)


@pytest.mark.parametrize("broken", BROKEN, ids=lambda f: f.__name__)
def test_hypothesis_finds_the_broken_step(broken):
    @settings(FIXED, max_examples=20, phases=FIND)
    @given(pair=time_pairs(), z=latents(shape=(16,)), eps=latents(shape=(16,)))
    def inverse_pair(pair, z, eps):
        check_inverse_pair(broken, ddim_inversion_step, z, eps, *pair, SCHEDULE)

    @settings(FIXED, max_examples=20, phases=FIND)
    @given(pair=time_pairs(), z=latents(shape=(16,)), eps=latents(shape=(16,)))
    def same_map(pair, z, eps):
        check_steps_agree(broken, dpm_solver_1, z, eps, *pair, SCHEDULE)

    with pytest.raises(AssertionError, match="inversion then step"):
        inverse_pair()
    with pytest.raises(AssertionError, match="the two steps differ"):
        same_map()


# ---- at the exact score: round trips and orders --------------------------------------------------


def test_round_trip_shrinks_with_n_for_minid_and_not_for_broken_steps():
    errors = check_round_trip(ddim_step, ddim_inversion_step)
    assert errors[-1] < 0.25 * errors[0], errors
    check_round_trip(dpm_solver_1, ddim_inversion_step)
    for broken in BROKEN:
        with pytest.raises(AssertionError, match="do not shrink"):
            check_round_trip(broken, ddim_inversion_step)


@settings(FIXED, max_examples=5)
@given(sample=toy_samples())
def test_round_trip_holds_for_drawn_prompts_and_data(sample):
    x0, context = sample
    check_round_trip(ddim_step, ddim_inversion_step, x0=x0, context=context)


def test_observed_orders_against_the_exact_ode():
    assert 0.7 < check_order(ddim_step, 1) < 1.3
    check_order(dpm_solver_1, 1)
    check_order(minid_dpm_solver(2), 2)
    # a one-step sampler and its solver are the same thing to the check
    check_order(with_step(ddim_step, "DDIM"), 1)
    for broken in BROKEN:
        with pytest.raises(AssertionError, match="observed order"):
            check_order(broken, 1)


# ---- plans ---------------------------------------------------------------------------------------


@settings(FIXED, max_examples=40)
@given(plan=ddim_plans())
def test_ddim_plans_cover_the_pass(plan):
    check_plan_times(plan)


@settings(FIXED, max_examples=40)
@given(plan=dpm_solver_plans())
def test_dpm_solver_plans_cover_the_pass_continuously(plan):
    check_plan_times(plan, continuous=True)


@settings(FIXED, max_examples=40)
@given(schedule=schedules(), hybrid=hybrid_schedules())
def test_hybrid_plans_keep_the_global_presetting(schedule, hybrid):
    check_global_presetting(hybrid_plan(schedule, hybrid), hybrid)


def test_broken_plans_fail_the_plan_checks():
    plan = dpm_solver_plan(SCHEDULE, 6)
    steps = list(plan.steps)
    swapped = dataclasses.replace(plan, steps=(steps[1], steps[0], *steps[2:]))
    with pytest.raises(AssertionError, match="strictly decreasing"):
        check_plan_times(swapped, continuous=True)
    short = dataclasses.replace(plan, steps=tuple(steps[:-1]))  # never reaches data
    with pytest.raises(AssertionError, match="not data"):
        check_plan_times(short, continuous=True)
    gap = dataclasses.replace(steps[2], s=steps[2].s + 30.0)
    with pytest.raises(AssertionError, match="step 4 starts"):
        check_plan_times(dataclasses.replace(plan, steps=(*steps[:2], gap, *steps[3:])), True)
    # a hybrid whose DPM-Solver++ step left the DPM-Solver++ sequence (Eq. 6 broken)
    hybrid = HybridSchedule()
    good = hybrid_plan(SCHEDULE, hybrid)
    assert check_global_presetting(good, hybrid) == []
    hs = list(good.steps)
    moved_t = 0.5 * (hs[3].t + hs[4].t)
    hs[3] = dataclasses.replace(hs[3], s=moved_t)
    hs[4] = dataclasses.replace(hs[4], t=moved_t, timestep=round(moved_t))
    assert hs[4].solver == DPM_SOLVER
    with pytest.raises(AssertionError, match="DPM-Solver.. step 5 moved"):
        check_global_presetting(dataclasses.replace(good, steps=tuple(hs)), hybrid)


@pytest.mark.parametrize(
    "make_plan",
    [
        lambda n: ddim_plan(SCHEDULE, n),
        lambda n: dpm_solver_plan(SCHEDULE, n),
        lambda n: hybrid_plan(SCHEDULE, HybridSchedule(num_steps=n, history="run", final_order=1)),
    ],
    ids=["ddim", "dpm_solver++", "hybrid order 1"],
)
def test_plan_round_trips_shrink_with_n(make_plan):
    check_plan_round_trip(make_plan, ns=(6, 12, 24))


# ---- the strategies draw what they say -----------------------------------------------------------


@settings(FIXED, max_examples=30)
@given(schedule=schedules(), grid=timestep_grids())
def test_schedules_and_grids(schedule, grid):
    a = schedule.alphas_cumprod
    assert a.dtype == torch.float64 and bool((a[1:] < a[:-1]).all()) and 0 < float(a[-1])
    assert len(grid.times) == grid.num_steps
    assert all(x > y for x, y in zip(grid.times, grid.times[1:])), grid


@settings(FIXED, max_examples=10)
@given(context=toy_conditions(), data=st.data())
def test_toy_conditions_fit_the_testbed(context, data):
    model = toy_model()
    assert context.shape[1:] == (1, model.embedding_width) and 1 <= context.shape[0] <= 3
    z = data.draw(latents(shape=(context.shape[0], *model.latent_shape)))
    assert model(z, 500, context).shape == z.shape
    assert model.schedule.sigma(CLEAN) == 0.0


# ---- the README's example ------------------------------------------------------------------------


def _readme_example() -> str:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Testing your own sampler")
    return re.compile(r"```python\n(.*?)```", re.S).search(readme, start).group(1)


def test_the_readme_example_runs_and_catches_a_sign_error():
    code = _readme_example()
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 15, "the example is meant to be read at once"
    good: dict = {}
    exec(compile(code, "README.md", "exec"), good)
    good["test_my_step_undoes_the_inversion"]()
    good["test_my_step_at_the_exact_score"]()
    flipped = code.replace("+ schedule.sigma(s) * eps", "- schedule.sigma(s) * eps")
    assert flipped != code
    bad: dict = {}
    exec(compile(flipped, "README.md (sign error)", "exec"), bad)
    with pytest.raises(AssertionError):
        bad["test_my_step_at_the_exact_score"]()
