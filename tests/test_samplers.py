"""Samplers against diffusers' schedulers, and the properties their math promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minid.sampling.hybrid import HybridSchedule, hybrid_plan
from minid.sampling.plans import DDIM, DPM_SOLVER, ddim_plan, dpm_solver_plan
from minid.sampling.samplers import (
    SolverState,
    cfg,
    ddim_inversion_step,
    ddim_step,
    dpm_solver_inversion_step,
    dpm_solver_step,
    eps_from_model_output,
    eps_from_v,
    eps_from_x0,
    hybrid_inversion_step,
    hybrid_step,
    invert_loop,
    sample_loop,
    v_from_eps,
    x0_from_eps,
    x0_from_v,
)
from minid.sampling.schedule import CLEAN, FINAL, NoiseSchedule, ddim_timesteps, dpm_solver_times
from minid.testing import (
    FIXED,
    check_global_presetting,
    check_inverse_pair,
    check_plan_times,
    check_steps_agree,
    latents,
    time_pairs,
    times,
)

diffusers = pytest.importorskip("diffusers")

SCHEDULE = NoiseSchedule.scaled_linear()
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEP_COUNTS = [6, 10, 20, 50]


def toy_eps(z: torch.Tensor, timestep: int, *_) -> torch.Tensor:
    """A deterministic stand-in for the UNet that depends on both z and t."""
    return torch.tanh(0.7 * z + 0.3 * math.sin(timestep / 100.0) + 0.1)


@pytest.fixture(scope="module")
def z_start() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _float64_schedule_into(scheduler, final_attr: str | None):
    """Give a diffusers scheduler minid's float64 ᾱ (it builds float32 ones), so the loops compare
    the step math."""
    scheduler.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    if final_attr:
        setattr(
            scheduler, final_attr, torch.tensor(SCHEDULE.final_alphas_cumprod, dtype=torch.float64)
        )
    return scheduler


# ---- parity with diffusers -----------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_ddim_loop_matches_diffusers(z_start, spacing, n):
    ref = _float64_schedule_into(
        diffusers.DDIMScheduler(
            **SD,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing=spacing,
        ),
        "final_alpha_cumprod",
    )
    ref.set_timesteps(n)
    plan = ddim_plan(SCHEDULE, n, spacing)
    assert plan.timesteps == ref.timesteps.tolist()
    z = z_start.clone()
    for t in ref.timesteps.tolist():
        z = ref.step(toy_eps(z, t), t, z).prev_sample
    ours = sample_loop(toy_eps, z_start.clone(), plan)
    err = (ours - z).abs().max().item()
    assert err < 1e-6, f"DDIM {spacing} {n} steps: max abs error {err:.2e} ≥ 1e-6"


def test_ddim_eta_matches_diffusers(z_start):
    ref = _float64_schedule_into(
        diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "final_alpha_cumprod",
    )
    ref.set_timesteps(10)
    g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    z = z_start.clone()
    for t in ref.timesteps.tolist():
        z = ref.step(toy_eps(z, t), t, z, eta=0.8, generator=g_ref).prev_sample
    ours = sample_loop(toy_eps, z_start.clone(), ddim_plan(SCHEDULE, 10, eta=0.8), generator=g_ours)
    err = (ours - z).abs().max().item()
    assert err < 1e-6, f"DDIM η=0.8: max abs error {err:.2e} ≥ 1e-6"
    deterministic = sample_loop(toy_eps, z_start.clone(), ddim_plan(SCHEDULE, 10))
    assert (ours - deterministic).abs().max() > 1e-2, "η > 0 must add noise"


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_ddim_inversion_loop_matches_diffusers(z_start, spacing, n):
    ref = _float64_schedule_into(
        diffusers.DDIMInverseScheduler(
            **SD,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing=spacing,
        ),
        "initial_alpha_cumprod",
    )
    ref.set_timesteps(n)
    plan = ddim_plan(SCHEDULE, n, spacing)
    assert ref.timesteps.tolist() == plan.timesteps[::-1]
    z = z_start.clone()
    for t in ref.timesteps.tolist():
        z = ref.step(toy_eps(z, t), t, z).prev_sample
    ours = invert_loop(toy_eps, z_start.clone(), plan)
    err = (ours - z).abs().max().item()
    assert err < 1e-6, f"DDIM inversion {spacing} {n} steps: max abs error {err:.2e} ≥ 1e-6"


@pytest.mark.parametrize("clip_range", [1.0, 0.5])
def test_ddim_clip_sample_matches_diffusers_in_both_directions(z_start, clip_range):
    # diffusers clamps x̂_0 and keeps the model's ε for the direction
    # (use_clipped_model_output=False)
    n, z0 = 10, 3 * z_start  # |x̂_0| well above the range at every step
    plan = ddim_plan(SCHEDULE, n, clip_sample=True, clip_sample_range=clip_range)
    assert plan.clip == clip_range and ddim_plan(SCHEDULE, n).clip is None
    for scheduler, loop, final_attr in (
        (diffusers.DDIMScheduler, sample_loop, "final_alpha_cumprod"),
        (diffusers.DDIMInverseScheduler, invert_loop, "initial_alpha_cumprod"),
    ):
        ref = _float64_schedule_into(
            scheduler(
                **SD,
                clip_sample=True,
                clip_sample_range=clip_range,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
            final_attr,
        )
        ref.set_timesteps(n)
        z = z0.clone()
        for t in ref.timesteps.tolist():
            z = ref.step(toy_eps(z, t), t, z).prev_sample
        ours = loop(toy_eps, z0.clone(), plan)
        err = (ours - z).abs().max().item()
        assert err < 1e-6, (
            f"{scheduler.__name__} clip_sample_range={clip_range}: max abs error {err:.2e}"
        )
        unclipped = loop(toy_eps, z0.clone(), ddim_plan(SCHEDULE, n))
        assert (ours - unclipped).abs().max() > 0.1, "the clip must act on these latents"


def test_clip_sample_leaves_dpm_solver_steps_alone_and_reaches_the_hybrid_plan(z_start):
    clip = dict(clip_sample=True, clip_sample_range=0.5)
    plan = hybrid_plan(SCHEDULE, HybridSchedule(num_steps=6, **clip))
    assert plan.clip == 0.5
    z0 = 3 * z_start
    unclipped = hybrid_plan(SCHEDULE, HybridSchedule(num_steps=6))
    # a DPM-Solver++-only plan with clip on: every step is DPM-Solver++, so nothing changes
    dpm_only = hybrid_plan(SCHEDULE, HybridSchedule(num_steps=6, dpm_start=1, dpm_end=6, **clip))
    same = hybrid_plan(SCHEDULE, HybridSchedule(num_steps=6, dpm_start=1, dpm_end=6))
    assert torch.equal(sample_loop(toy_eps, z0, dpm_only), sample_loop(toy_eps, z0, same))
    assert (sample_loop(toy_eps, z0, plan) - sample_loop(toy_eps, z0, unclipped)).abs().max() > 0.1
    # the DDIM steps' remembered x̂_0 is the clipped one: what the callback sees lies in the range
    seen = []
    sample_loop(
        toy_eps, z0, plan, callback=lambda i, t, z, x0: seen.append((plan.steps[i].solver, x0))
    )
    assert all(x0.abs().max() <= 0.5 for solver, x0 in seen if solver == DDIM)
    assert any(x0.abs().max() > 0.5 for solver, x0 in seen if solver == DPM_SOLVER)


# DPMSolverMultistepScheduler casts the latent to float32 inside `step` and keeps its sigmas in
# float32, so this comparison is at float32 precision: ~1e-7 relative per step, accumulated over up
# to 50 steps.
DPM_TOL = 1e-4


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("use_lu_lambdas", [False, True])
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_dpm_solver_loop_matches_diffusers(z_start, order, use_lu_lambdas, n):
    ref = _float64_schedule_into(
        diffusers.DPMSolverMultistepScheduler(
            **SD, algorithm_type="dpmsolver++", solver_order=order, use_lu_lambdas=use_lu_lambdas
        ),
        None,
    )
    ref.set_timesteps(n)
    plan = dpm_solver_plan(SCHEDULE, n, "logSNR" if use_lu_lambdas else "linspace", order)
    assert plan.timesteps == ref.timesteps.tolist()
    z = z_start.clone()
    for t in ref.timesteps:
        z = ref.step(toy_eps(z, int(t)), t, z).prev_sample
    ours = sample_loop(toy_eps, z_start.clone(), plan)
    err = (ours - z).abs().max().item()
    assert err < DPM_TOL, (
        f"DPM-Solver++ order {order}, lu={use_lu_lambdas}, {n} steps: max abs error {err:.2e}"
    )


def test_lower_order_final_follows_diffusers_rule():
    # < 15 steps: order 1 at the last step, ≤ 2 at the one before; ≥ 15: only the step to CLEAN
    # drops to 1
    assert [s.order for s in dpm_solver_plan(SCHEDULE, 6, order=3).steps] == [1, 2, 3, 3, 2, 1]
    assert [s.order for s in dpm_solver_plan(SCHEDULE, 16, order=3).steps][-3:] == [3, 3, 1]
    assert [
        s.order for s in dpm_solver_plan(SCHEDULE, 6, order=3, lower_order_final=False).steps
    ] == [1, 2, 3, 3, 3, 1]


# ---- small exact properties ----------------------------------------------------------------------

# the strategies and checks of minid.testing, the kit users test their own steps with


def _dpm_solver_1(z, eps, t, s, schedule):
    return dpm_solver_step(z, eps, t, s, schedule, SolverState(), order=1)


def _dpm_solver_1_inversion(z, eps, t, s, schedule):
    return dpm_solver_inversion_step(z, eps, t, s, schedule, SolverState(), order=1)


@settings(FIXED, max_examples=30)
@given(t=times(), s=times(), z=latents(shape=(16,)), eps=latents(shape=(16,)))
def test_dpm_solver_order_1_is_ddim(t, s, z, eps):
    t, s = max(t, s), min(t, s)
    assume(t - s >= 1e-3)
    check_steps_agree(ddim_step, _dpm_solver_1, z, eps, t, s, SCHEDULE, atol=1e-10)


@settings(FIXED, max_examples=30)
@given(
    pair=time_pairs(min_gap=0.0, final=True),
    z=latents(shape=(16,)),
    eps=latents(shape=(16,)),
    solver=st.sampled_from([DDIM, DPM_SOLVER]),
)
def test_inversion_step_then_step_returns_the_start(pair, z, eps, solver):
    # with ε independent of z, the inversion step and the sampling step are exact inverses (to
    # float64 rounding; |z_t| · σ_t/σ_s reaches ~100)
    steps = {
        DDIM: (ddim_step, ddim_inversion_step),
        DPM_SOLVER: (_dpm_solver_1, _dpm_solver_1_inversion),
    }
    check_inverse_pair(*steps[solver], z, eps, *pair, SCHEDULE, atol=1e-9)


@pytest.mark.parametrize("plan_name", ["ddim", "dpm3", "hybrid", "hybrid_default", "hybrid_middle"])
def test_round_trip_exact_when_eps_ignores_z(z_start, plan_name):
    plan = {
        "ddim": ddim_plan(SCHEDULE, 10),
        "dpm3": dpm_solver_plan(SCHEDULE, 10, order=3),
        "hybrid": hybrid_plan(
            SCHEDULE, HybridSchedule(num_steps=8, dpm_start=5, dpm_end=8, dpm_order=3)
        ),
        "hybrid_default": hybrid_plan(SCHEDULE),
        "hybrid_middle": hybrid_plan(
            SCHEDULE, HybridSchedule(num_steps=10, dpm_start=2, dpm_end=3)
        ),
    }[plan_name]
    fixed = torch.randn_like(z_start)
    # a constant ε keeps x̂_0 constant along the path, at every order
    model = lambda z, t, *_: fixed  # noqa: E731
    err = (sample_loop(model, invert_loop(model, z_start, plan), plan) - z_start).abs().max().item()
    assert err < 1e-10, f"{plan_name}: round trip error {err:.2e}"


def test_prediction_type_conversions(z_start):
    t = 421
    eps = torch.randn_like(z_start)
    x0 = x0_from_eps(z_start, eps, t, SCHEDULE)
    v = v_from_eps(z_start, eps, t, SCHEDULE)
    assert torch.allclose(eps_from_x0(z_start, x0, t, SCHEDULE), eps, atol=1e-12)
    assert torch.allclose(eps_from_v(z_start, v, t, SCHEDULE), eps, atol=1e-12)
    assert torch.allclose(x0_from_v(z_start, v, t, SCHEDULE), x0, atol=1e-12)
    # v = α ε − σ x̂_0 (Salimans & Ho)
    assert torch.allclose(v, SCHEDULE.alpha(t) * eps - SCHEDULE.sigma(t) * x0, atol=1e-12)
    assert torch.equal(eps_from_model_output(eps, z_start, t, SCHEDULE, "epsilon"), eps)
    assert torch.allclose(
        eps_from_model_output(v, z_start, t, SCHEDULE, "v_prediction"), eps, atol=1e-12
    )
    with pytest.raises(ValueError, match="prediction_type"):
        eps_from_model_output(eps, z_start, t, SCHEDULE, "sample")


def test_cfg():
    u, c = torch.randn(8), torch.randn(8)
    assert torch.allclose(cfg(u, c, 1.0), c, atol=1e-6) and torch.equal(cfg(u, c, 0.0), u)
    assert torch.allclose(cfg(u, c, 7.5), u + 7.5 * (c - u))


# ---- Gaussian data: the exact ε and the exact ODE solution ---------------------------------------
# For x_0 ~ N(μ, s²I), z_t ~ N(α_t μ, (α_t² s² + σ_t²) I) and E[x_0 | z_t] is linear in z_t; the
# probability-flow ODE moves z_t − α_t μ by the ratio of the standard deviations.
MU, SD_DATA = 0.5, 0.3


def _std(t):
    return math.sqrt(SCHEDULE.alpha(t) ** 2 * SD_DATA**2 + SCHEDULE.sigma(t) ** 2)


def gaussian_eps(z: torch.Tensor, t: float, *_) -> torch.Tensor:
    a, s = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
    x0 = MU + a * SD_DATA**2 / _std(t) ** 2 * (z - a * MU)
    return (z - a * x0) / s


def gaussian_flow(z: torch.Tensor, t: float, u: float) -> torch.Tensor:
    return SCHEDULE.alpha(u) * MU + _std(u) / _std(t) * (z - SCHEDULE.alpha(t) * MU)


def _solve_error(order: int, n: int, z0: torch.Tensor) -> float:
    """Error at t=0 of an n-step λ-uniform solve from t=999. Multistep methods start from exact
    earlier values (the standard way to measure a multistep method's order without the warm-up's
    lower-order steps)."""
    ta, tb = 999.0, 0.0
    lams = np.linspace(SCHEDULE.lam(ta), SCHEDULE.lam(tb), n + 1)
    ts = [ta] + [SCHEDULE.t_of_lam(x) for x in lams[1:-1]] + [tb]
    state = SolverState()
    for i in range(order - 1):
        zi = gaussian_flow(z0, ta, ts[i])
        state = state.remember(
            x0_from_eps(zi, gaussian_eps(zi, ts[i]), ts[i], SCHEDULE), SCHEDULE.lam(ts[i])
        )
    z = gaussian_flow(z0, ta, ts[order - 1])
    for i in range(order - 1, n):
        eps = gaussian_eps(z, ts[i])
        z, state = (
            dpm_solver_step(z, eps, ts[i], ts[i + 1], SCHEDULE, state, order),
            state.remember(x0_from_eps(z, eps, ts[i], SCHEDULE), SCHEDULE.lam(ts[i])),
        )
    return (z - gaussian_flow(z0, ta, tb)).abs().max().item()


def _slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


@pytest.fixture(scope="module")
def convergence():
    z0 = torch.randn(32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return {
        (order, n): _solve_error(order, n, z0)
        for order in (1, 2, 3)
        for n in (8, 16, 32, 64, 128, 256)
    }


def test_convergence_orders_on_gaussian_data(convergence):
    ns = [32, 64, 128, 256]
    slopes = {o: _slope(ns, [convergence[o, n] for n in ns]) for o in (1, 2, 3)}
    assert 0.8 < slopes[1] < 1.2, f"DDIM / DPM-Solver++1 slope {slopes[1]:.2f} not ≈ 1"
    assert 1.7 < slopes[2] < 2.3, f"2M slope {slopes[2]:.2f} not ≈ 2"
    # 3M: third order before the asymptotic regime, second order in it (see the Caution in
    # samplers.py)
    early = _slope([8, 16], [convergence[3, 8], convergence[3, 16]])
    assert early > 2.5, f"3M slope from 8 to 16 steps {early:.2f} ≤ 2.5"
    assert 1.7 < slopes[3] < 2.3, f"3M asymptotic slope {slopes[3]:.2f} not ≈ 2"
    assert all(convergence[3, n] < convergence[2, n] < convergence[1, n] for n in ns), (
        f"errors must fall with the order: {convergence}"
    )


def test_ddim_plan_converges_on_gaussian_data():
    # the whole DDIM pass (SD spacing) vs the exact flow between its first time and its FINAL level
    z = torch.randn(32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    errs = []
    for n in (10, 20, 40, 80):
        plan = ddim_plan(SCHEDULE, n, "trailing")
        exact = gaussian_flow(z, plan.steps[0].t, 0.0)  # FINAL = timestep 0's level for SD
        errs.append((sample_loop(gaussian_eps, z, plan) - exact).abs().max().item())
    assert _slope([10, 20, 40, 80], errs) > 0.8, f"DDIM pass errors {errs}"


# ---- the hybrid solver ---------------------------------------------------------------------------


def test_default_hybrid_plan():
    # the default DPM-Solver++ spacing is λ-uniform, paper A.4's "log-uniform" (decided on the
    # pipeline, bench/results/defaults_cpu.md; docs O1)
    plan = hybrid_plan(SCHEDULE)
    assert [s.solver for s in plan.steps] == [DDIM] * 4 + [DPM_SOLVER] * 2
    dpm = dpm_solver_times(SCHEDULE, 6, "logSNR")
    assert [s.t for s in plan.steps] == [831.0, 665.0, 499.0, 333.0, dpm[4], dpm[5]]
    assert plan.timesteps == [831, 665, 499, 333, 11, 0]
    assert plan.steps[-1].s == CLEAN
    leading = hybrid_plan(SCHEDULE, HybridSchedule(dpm_spacing="leading"))
    assert leading.timesteps == [831, 665, 499, 333, 285, 143]


@pytest.mark.parametrize("window", [(5, 6), (4, 6), (1, 2), (6, 6), (7, 6)])
def test_global_hybrid_is_continuous_and_smooth(window):
    n = 6
    plan = hybrid_plan(
        SCHEDULE,
        HybridSchedule(num_steps=n, dpm_start=window[0], dpm_end=window[1], dpm_spacing="logSNR"),
    )
    # strictly decreasing, each step landing where the next starts (minid.testing)
    check_plan_times(plan, continuous=True)
    ddim_seq, dpm_seq = ddim_timesteps(n), dpm_solver_times(SCHEDULE, n)
    # paper Eq. 6: each step's time from its own solver's full sequence
    for i, step in enumerate(plan.steps):
        assert step.t == (dpm_seq[i] if window[0] <= i + 1 <= window[1] else ddim_seq[i])

    # No jump: on the Gaussian model the latent moves per unit of λ no faster than in either pure
    # pass.
    def speeds(p):
        z = torch.randn(32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        zs = [z]
        sample_loop(gaussian_eps, z, p, callback=lambda i, t, z_i, x0: zs.append(z_i))
        lams = [SCHEDULE.lam(s.t) for s in p.steps] + [min(SCHEDULE.lam(p.steps[-1].s), 5.0)]
        return [
            ((b - a).norm() / (lb - la)).item() for a, b, la, lb in zip(zs, zs[1:], lams, lams[1:])
        ]

    envelope = max(speeds(ddim_plan(SCHEDULE, n)) + speeds(dpm_solver_plan(SCHEDULE, n)))
    assert max(speeds(plan)) <= 1.05 * envelope, f"speeds {speeds(plan)} exceed {envelope:.3f}"


def test_fragmented_hybrid_uses_each_solvers_own_sequence():
    plan = hybrid_plan(
        SCHEDULE,
        HybridSchedule(
            num_steps=6, dpm_start=5, dpm_end=6, timesteps="fragmented", dpm_spacing="logSNR"
        ),
    )
    # 751, 501, 251, 1
    assert [s.t for s in plan.steps[:4]] == [float(t) for t in ddim_timesteps(4)]
    assert [s.t for s in plan.steps[4:]] == dpm_solver_times(SCHEDULE, 2)  # 999, 0
    assert plan.steps[3].s == FINAL and plan.steps[4].t == 999.0, (
        "the fragmented schedule jumps at the switch"
    )
    with pytest.raises(ValueError, match="timesteps="):
        hybrid_plan(SCHEDULE, HybridSchedule(timesteps="patchwork"))


def test_hybrid_inversion_mirrors_sampling():
    plan = hybrid_plan(SCHEDULE, HybridSchedule(num_steps=10, dpm_start=5, dpm_end=10, dpm_order=3))
    seen = []
    invert_loop(
        lambda z, t, *_: torch.zeros_like(z),
        torch.zeros(4, dtype=torch.float64),
        plan,
        callback=lambda i, t, z, x0: seen.append((i, t)),
    )
    assert seen == [(i, plan.steps[i].timestep) for i in reversed(range(10))]
    # same solver, same order at the same step, except where warm-up has no history
    for step in plan.steps:
        assert step.inversion_order <= step.order
    # DPM-Solver++ steps between DDIM steps: the inversion has the history of the DDIM inversion
    # steps before it, so the orders are the same in both directions (symmetry)
    middle = hybrid_plan(SCHEDULE, HybridSchedule(num_steps=10, dpm_start=2, dpm_end=3))
    assert [(s.order, s.inversion_order) for s in middle.steps[:4]] == [
        (1, 1),
        (2, 2),
        (2, 2),
        (1, 1),
    ]


# ---- the hybrid solver's orders: multistep across the switch -------------------------------------


def _orders(plan):
    return [s.order if s.solver == DPM_SOLVER else "-" for s in plan.steps]


def test_default_hybrid_orders():
    # the DDIM steps' predictions count, so the first DPM-Solver++ step is already 2M; the last one,
    # to CLEAN, keeps order 2 (final_order=2); the inversion starts at CLEAN (λ = ∞), so its first
    # two steps are order 1
    plan = hybrid_plan(SCHEDULE)
    assert _orders(plan) == ["-"] * 4 + [2, 2], f"default hybrid orders {_orders(plan)}"
    assert [s.inversion_order for s in plan.steps] == [1] * 6
    previous = hybrid_plan(SCHEDULE, HybridSchedule(history="run", final_order=1))
    assert _orders(previous) == ["-"] * 4 + [1, 1], f"order-1 variant {_orders(previous)}"
    no_cap = hybrid_plan(SCHEDULE, HybridSchedule(dpm_order=3, lower_order_final=False))
    assert _orders(no_cap) == ["-"] * 4 + [3, 3], f"3M without lower_order_final {_orders(no_cap)}"
    capped = hybrid_plan(SCHEDULE, HybridSchedule(num_steps=8, dpm_start=4, dpm_end=8, dpm_order=3))
    assert _orders(capped) == ["-"] * 3 + [3, 3, 3, 2, 2], (
        f"3M with lower_order_final {_orders(capped)}"
    )
    # the fragmented schedule jumps at the switch (lands on FINAL, restarts at 999): no history
    # across it
    fragmented = hybrid_plan(SCHEDULE, HybridSchedule(timesteps="fragmented"))
    assert _orders(fragmented) == ["-"] * 4 + [1, 2], f"fragmented orders {_orders(fragmented)}"
    with pytest.raises(ValueError, match="history="):
        hybrid_plan(SCHEDULE, HybridSchedule(history="all"))


def test_ddim_steps_feed_the_dpm_solver_history(z_start):
    # the default hybrid pass, step by step: DDIM ×4 with no history, then 2M from the 4th step's
    # prediction, then order 2 to CLEAN from the 5th's
    plan = hybrid_plan(SCHEDULE)
    z, ts = z_start.clone(), [s.t for s in plan.steps]
    for t, s in zip(ts[:4], ts[1:5]):
        z_prev, eps_prev, t_prev = z, toy_eps(z, round(t)), t
        z = ddim_step(z, eps_prev, t, s, SCHEDULE)
    state = SolverState().remember(
        x0_from_eps(z_prev, eps_prev, t_prev, SCHEDULE), SCHEDULE.lam(t_prev)
    )
    eps = toy_eps(z, plan.timesteps[4])
    z, state = (
        dpm_solver_step(z, eps, ts[4], ts[5], SCHEDULE, state, order=2),
        state.remember(x0_from_eps(z, eps, ts[4], SCHEDULE), SCHEDULE.lam(ts[4])),
    )
    by_hand = dpm_solver_step(
        z, toy_eps(z, plan.timesteps[5]), ts[5], CLEAN, SCHEDULE, state, order=2
    )
    ours = sample_loop(toy_eps, z_start.clone(), plan)
    err = (ours - by_hand).abs().max().item()
    assert err < 1e-12, f"hybrid pass vs steps by hand: {err:.2e}"
    order_1 = sample_loop(
        toy_eps,
        z_start.clone(),
        hybrid_plan(SCHEDULE, HybridSchedule(history="run", final_order=1)),
    )
    assert (ours - order_1).abs().max() > 1e-3, "the multistep steps must change the result"
    # a DDIM step of a plan records its prediction, like a DPM-Solver++ step, in a new state
    before = SolverState()
    eps = toy_eps(z_start, 500)
    ddim = plan.steps[0]
    _, state = hybrid_step(z_start, eps, ddim, SCHEDULE, before)
    assert before.lams == () and before.x0s == (), "the state given to a step must not change"
    assert state.lams == (SCHEDULE.lam(ddim.t),) and torch.equal(
        state.x0s[0], x0_from_eps(z_start, eps, ddim.t, SCHEDULE)
    )


@pytest.mark.parametrize("order", [2, 3])
def test_step_to_clean_extrapolates_x0_in_sigma_squared(order):
    # x̂_0 along the path a polynomial of degree order−1 in u = σ²/α² = e^{−2λ}: the step to CLEAN
    # returns its value at u = 0 exactly; one degree more and it does not
    g = torch.Generator().manual_seed(9)
    coef = [torch.randn(16, generator=g, dtype=torch.float64) for _ in range(order + 1)]
    times = [60.0, 25.0, 4.0][3 - order :]

    def x0_at(t, degree):
        u = math.exp(-2 * SCHEDULE.lam(t))
        return sum(c * u**k for k, c in enumerate(coef[: degree + 1]))

    for degree, exact in ((order - 1, True), (order, False)):
        state = SolverState()
        for t in times[:-1]:
            state = state.remember(x0_at(t, degree), SCHEDULE.lam(t))
        z = torch.randn(16, generator=g, dtype=torch.float64)
        eps = eps_from_x0(z, x0_at(times[-1], degree), times[-1], SCHEDULE)
        err = (
            (dpm_solver_step(z, eps, times[-1], CLEAN, SCHEDULE, state, order=order) - coef[0])
            .abs()
            .max()
            .item()
        )
        assert (err < 1e-10) == exact, (
            f"order {order}, x̂_0 of degree {degree} in u: error {err:.2e}"
        )


def _gaussian_pass_error(plan, z):
    """The plan's sampling pass on the Gaussian model, told the exact solver times, vs the exact
    flow."""
    state, z_end = SolverState(), z
    for step in plan.steps:
        z_end, state = hybrid_step(z_end, gaussian_eps(z_end, step.t), step, SCHEDULE, state)
    return (z_end - gaussian_flow(z, plan.steps[0].t, plan.steps[-1].s)).abs().max().item()


def _gaussian_inversion_error(plan, z):
    """The plan's inversion on the Gaussian model from its last level back to its first time, vs the
    exact flow."""
    state, z_end = SolverState(), z
    for step in reversed(plan.steps):
        z_end, state = hybrid_inversion_step(
            z_end, gaussian_eps(z_end, step.s), step, SCHEDULE, state
        )
    return (z_end - gaussian_flow(z, plan.steps[-1].s, plan.steps[0].t)).abs().max().item()


@pytest.mark.parametrize("n", [6, 10])
def test_multistep_hybrid_beats_the_order_1_variant_on_gaussian_data(n):
    z = torch.randn(32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    window = dict(num_steps=n, dpm_start=n - 1, dpm_end=n)
    multistep = _gaussian_pass_error(hybrid_plan(SCHEDULE, HybridSchedule(**window)), z)
    cross_switch = _gaussian_pass_error(
        hybrid_plan(SCHEDULE, HybridSchedule(**window, final_order=1)), z
    )
    order_1 = _gaussian_pass_error(
        hybrid_plan(SCHEDULE, HybridSchedule(**window, history="run", final_order=1)), z
    )
    assert multistep < cross_switch < order_1, (
        f"N={n}: errors multistep {multistep:.4e}, final step order 1 {cross_switch:.4e}, order 1 "
        f"{order_1:.4e}"
    )


@pytest.mark.parametrize("window", [(2, 3), (3, 4)])
def test_multistep_hybrid_inversion_beats_the_order_1_variant_on_gaussian_data(window):
    z = torch.randn(32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    hybrid = dict(num_steps=10, dpm_start=window[0], dpm_end=window[1])
    multistep = _gaussian_inversion_error(hybrid_plan(SCHEDULE, HybridSchedule(**hybrid)), z)
    order_1 = _gaussian_inversion_error(
        hybrid_plan(SCHEDULE, HybridSchedule(**hybrid, history="run", final_order=1)), z
    )
    assert multistep < order_1, (
        f"window {window}: inversion errors multistep {multistep:.4e}, order 1 {order_1:.4e}"
    )


def test_round_trip_with_time_dependent_eps(z_start):
    # ε independent of z but varying with t: the order-1 variant round-trips exactly (DDIM and
    # DPM-Solver++1 steps are exact inverses); the multistep one does not (sampling and inversion
    # histories differ)
    fixed = torch.randn_like(z_start)
    model = lambda z, t, *_: fixed * (1 + 0.5 * math.sin(t / 100.0))  # noqa: E731
    errs = {}
    for name, hybrid in (
        ("order 1", HybridSchedule(history="run", final_order=1)),
        ("multistep", HybridSchedule()),
    ):
        plan = hybrid_plan(SCHEDULE, hybrid)
        errs[name] = (
            (sample_loop(model, invert_loop(model, z_start, plan), plan) - z_start)
            .abs()
            .max()
            .item()
        )
    assert errs["order 1"] < 1e-10 and errs["multistep"] > 1e-4, f"round trip errors {errs}"


@pytest.mark.parametrize(
    "make_plan",
    [
        lambda n: ddim_plan(SCHEDULE, n),
        lambda n: hybrid_plan(SCHEDULE, HybridSchedule(num_steps=n, dpm_start=n - 1, dpm_end=n)),
        # DPM-Solver++ mid-pass, multistep both ways (orders 2, 2 in
        # each direction); spacings that interleave for every n
        lambda n: hybrid_plan(
            SCHEDULE,
            HybridSchedule(
                num_steps=n,
                dpm_start=n // 2,
                dpm_end=n // 2 + 1,
                ddim_spacing="trailing",
                dpm_spacing="linspace",
            ),
        ),
    ],
)
def test_round_trip_error_shrinks_with_steps(z_start, make_plan):
    errs = []
    for n in (6, 12, 24, 48):
        plan = make_plan(n)
        errs.append(
            (sample_loop(toy_eps, invert_loop(toy_eps, z_start, plan), plan) - z_start)
            .abs()
            .max()
            .item()
        )
    assert all(b < a for a, b in zip(errs, errs[1:])), f"round trip errors do not shrink: {errs}"
    assert errs[-1] < 0.25 * errs[0], f"round trip errors {errs}"


# ---- DPM-Solver++ spacings and the global pre-setting rule (plans._global_times) -----------------


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [6, 10, 20])
def test_dpm_solver_loop_matches_diffusers_for_integer_spacings(z_start, spacing, n):
    ref = _float64_schedule_into(
        diffusers.DPMSolverMultistepScheduler(
            **SD,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing=spacing,
            steps_offset=1,
        ),
        None,
    )
    ref.set_timesteps(n)
    plan = dpm_solver_plan(SCHEDULE, n, spacing, 2)
    assert plan.timesteps == ref.timesteps.tolist()
    z = z_start.clone()
    for t in ref.timesteps:
        z = ref.step(toy_eps(z, int(t)), t, z).prev_sample
    err = (sample_loop(toy_eps, z_start.clone(), plan) - z).abs().max().item()
    assert err < DPM_TOL, f"DPM-Solver++ {spacing}, {n} steps: max abs error {err:.2e}"


def test_global_rule_moves_only_the_offending_ddim_time():
    # "linspace" at N = 6 starts step 5 at 333, DDIM's step-4 time: that DDIM time moves to the
    # λ-midpoint of 499 and 333; the DPM-Solver++ times stay
    plan = hybrid_plan(SCHEDULE, HybridSchedule(dpm_spacing="linspace"))
    midpoint = SCHEDULE.t_of_lam(0.5 * (SCHEDULE.lam(499) + SCHEDULE.lam(333)))
    assert [s.t for s in plan.steps] == [831.0, 665.0, 499.0, midpoint, 333.0, 166.0], [
        s.t for s in plan.steps
    ]
    # "trailing": 333 > 332, so Eq. 6 holds literally (a one-timestep DDIM step); "leading"
    # interleaves
    assert [s.t for s in hybrid_plan(SCHEDULE, HybridSchedule(dpm_spacing="trailing")).steps] == [
        831.0,
        665.0,
        499.0,
        333.0,
        332.0,
        166.0,
    ]
    assert [s.t for s in hybrid_plan(SCHEDULE, HybridSchedule(dpm_spacing="leading")).steps] == [
        831.0,
        665.0,
        499.0,
        333.0,
        285.0,
        143.0,
    ]
    # a DPM-Solver++ step 2 above DDIM's step 1 ("trailing": 832 > 831): the opening DDIM step moves
    # to T−1
    early = hybrid_plan(SCHEDULE, HybridSchedule(dpm_start=2, dpm_end=2, dpm_spacing="trailing"))
    assert [s.t for s in early.steps][:3] == [999.0, 832.0, 499.0], [s.t for s in early.steps]


def _windows(n):
    if n <= 8:
        return [(a, b) for a in range(1, n + 1) for b in range(a, n + 1)]
    return [(5, 6), (n - 1, n), (1, 1), (1, 2), (n, n), (1, n), (n // 2, n // 2 + 1), (2, n - 1)]


@pytest.mark.parametrize("dpm_spacing", ["logSNR", "linspace", "leading", "trailing"])
def test_every_dpm_spacing_builds_a_global_plan_for_2_to_50_steps(dpm_spacing):
    """Every window of N = 2 … 50 steps (a selection above 8) builds a plan that walks the pass
    continuously and keeps Eq. 6's rules (minid.testing's checks: rule 1, DPM-Solver++ steps keep
    their times; rule 2, DDIM times inside their DPM-Solver++ bounds stay; rule 3, the others are
    spread λ-uniformly)."""
    checked = moved_total = 0
    for n in range(2, 51):
        for window in _windows(n):
            hybrid = HybridSchedule(
                num_steps=n, dpm_start=window[0], dpm_end=window[1], dpm_spacing=dpm_spacing
            )
            plan = hybrid_plan(SCHEDULE, hybrid)  # must not raise
            moved = check_global_presetting(plan, hybrid)  # check_plan_times(continuous) first
            checked += 1
            moved_total += len(moved)
    assert checked == 455, f"{checked} plans checked, expected 455"
    # "linspace", "trailing" and "logSNR" all collide with leading DDIM somewhere
    if dpm_spacing != "leading":
        assert moved_total > 0, (
            f"{dpm_spacing}: no plan needed rule 3, so the test did not exercise it"
        )
