"""The method's defaults decided on the exact-score testbed (docs/editedid.md, O1 and O2): the
DPM-Solver++ spacing and the normalised mixing rule, checked as properties of the plan and of Stage
1 on `minid.sampling.toy`."""

from __future__ import annotations

import pytest
import torch

from minid.method.editedid import EditedIDConfig
from minid.method.mixing import MixingConfig, adaptive_mixing_inversion
from minid.sampling.hybrid import HybridSchedule, hybrid_plan
from minid.sampling.plans import ddim_plan
from minid.sampling.schedule import FINAL, NoiseSchedule
from minid.sampling.toy import GaussianMixtureModel

SCHEDULE = NoiseSchedule.scaled_linear()


def _largest_sigma_drop(plan) -> float:
    return max(SCHEDULE.sigma(s.t) - SCHEDULE.sigma(s.s) for s in plan.steps)


def test_the_default_plans_largest_sigma_drop_is_at_most_ddims():
    # DDIM's pass ends on the FINAL level, σ_0 = 0.029 of noise left; the hybrid's DPM-Solver++
    # steps go on to σ = 0. Counted down to the same level, no step of the default plan
    # (DPM-Solver++ on the last two steps, "leading") drops σ more than DDIM's largest, from N = 2
    # to 12. From N = 13 on, diffusers' "leading" grid (step T//(N+1), one finer than DDIM's T//N)
    # puts the last DPM-Solver++ time a few timesteps below DDIM's grid: its step to σ = 0 is up to
    # 10 % longer than DDIM's longest (docs/editedid.md, O1).
    floor = SCHEDULE.sigma(FINAL)
    for n in range(2, 51):
        method = EditedIDConfig(solver=HybridSchedule(num_steps=n))
        ours, ddim = (
            _largest_sigma_drop(method.plan(SCHEDULE)),
            _largest_sigma_drop(ddim_plan(SCHEDULE, n)),
        )
        bound = ddim + floor if n <= 12 else 1.10 * (ddim + floor)
        assert ours <= bound, (
            f"N={n}: the default plan drops σ by {ours:.3f} in one step, DDIM by {ddim:.3f}"
            f" (+ its final {floor:.3f})"
        )
        logsnr = _largest_sigma_drop(
            hybrid_plan(SCHEDULE, HybridSchedule(num_steps=n, dpm_spacing="logSNR"))
        )
        assert n < 5 or logsnr > 1.25 * (ddim + floor), (
            f"N={n}: the λ-uniform plan's one long DDIM step ({logsnr:.3f}) is what the default "
            f"avoids"
        )


def _face_pair(model: GaussianMixtureModel, seed: int):
    g = torch.Generator().manual_seed(seed)
    cond = model.prompt([0])
    x_o, drawn = model.sample(cond, g)
    mask = torch.zeros(model.latent_shape, dtype=torch.bool)
    mask[:, 3:6, 3:6] = True  # a small "face" of the latent
    return x_o, model.edit_region(x_o, mask, int(drawn[0]), g), cond


@pytest.mark.parametrize("n", [6, 10, 20])
def test_w_rises_smoothly_to_one_half_for_a_pair_that_differs_in_a_small_region(n):
    model = GaussianMixtureModel()
    x_o, x_e, cond = _face_pair(model, seed=n)
    plan = EditedIDConfig(solver=HybridSchedule(num_steps=n, dpm_start=n - 1, dpm_end=n)).plan(
        SCHEDULE
    )
    res = adaptive_mixing_inversion(model, plan, x_o, x_e, cond, cond.clone(), MixingConfig())
    ws, ds = res.w_schedules[0], res.differences[0]
    steps = [b - a for a, b in zip(ws, ws[1:])]
    assert all(s >= 0 for s in steps), f"w must rise: {ws}"
    assert steps[-1] <= max(steps[:-1]) + 1e-12, (
        f"the forced 0.5 jumps by more than any earlier step: {ws}"
    )
    assert ws[-2] > 0.35, f"w must be near 0.5 before the last step: {ws}"
    assert len(ds) == n and ds[0] < 0.05, f"D recorded per step, small for a face-only pair: {ds}"
    raw = adaptive_mixing_inversion(
        model, plan, x_o, x_e, cond, cond.clone(), MixingConfig(rule="raw")
    )
    raw_steps = [b - a for a, b in zip(raw.w_schedules[0], raw.w_schedules[0][1:])]
    assert raw_steps[-1] > max(raw_steps[:-1]), (
        "the raw rule's abrupt end, which the default removes"
    )


def test_the_normalised_step_does_not_depend_on_the_pairs_distance():
    model = GaussianMixtureModel()
    x_o, x_e, cond = _face_pair(model, seed=3)
    plan = EditedIDConfig().plan(SCHEDULE)
    near = adaptive_mixing_inversion(model, plan, x_o, x_e, cond, cond.clone()).w_schedules[0]
    far = adaptive_mixing_inversion(
        model, plan, x_o, x_o + 3 * (x_e - x_o), cond, cond.clone()
    ).w_schedules[0]
    assert near == pytest.approx(far, abs=1e-12), f"w paths differ: {near} vs {far}"
    eta = MixingConfig().step_size(6)
    assert eta == pytest.approx((1 - 0.05**0.25) / 8) and near[1] == pytest.approx(
        0.04 + 8 * eta * 0.46
    )


def test_the_dpm_solver_window_counts_from_the_end_by_default():
    # −2 … −1: the last two steps for any N (A.8: DPM-Solver++ towards the end), the paper's 5 … 6
    # at N = 6
    assert HybridSchedule().window() == (5, 6) and HybridSchedule(num_steps=20).window() == (19, 20)
    assert hybrid_plan(SCHEDULE) == hybrid_plan(SCHEDULE, HybridSchedule(dpm_start=5, dpm_end=6))
    assert HybridSchedule(num_steps=1).window() == (1, 1)  # no further back than step 1
    assert (
        HybridSchedule(num_steps=10, dpm_start=3, dpm_end=-3).solvers()
        == ["ddim"] * 2 + ["dpm_solver++"] * 6 + ["ddim"] * 2
    )
    with pytest.raises(ValueError, match="dpm_start"):
        EditedIDConfig(solver=HybridSchedule(num_steps=6, dpm_start=0))
    with pytest.raises(ValueError, match="dpm_start"):
        EditedIDConfig(solver=HybridSchedule(num_steps=6, dpm_start=-1, dpm_end=-2))
