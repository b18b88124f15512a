"""The noise schedule and the timestep sequences, against diffusers and as properties."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minid.sampling.schedule import (
    CLEAN,
    FINAL,
    NoiseSchedule,
    ddim_timesteps,
    dpm_solver_times,
    model_timestep,
)
from minid.testing import FIXED, step_counts, times
from minid.testing.strategies import DDIM_SPACINGS

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.scaled_linear()


def test_alphas_cumprod_match_diffusers(schedule):
    # diffusers builds the betas in float32, minid in float64: they agree to float32 rounding.
    ref = diffusers.DDIMScheduler(**SD).alphas_cumprod.double()
    rel = ((schedule.alphas_cumprod - ref).abs() / ref).max().item()
    assert rel < 1e-5, f"max relative difference of alphas_cumprod {rel:.2e} ≥ 1e-5"
    lin = NoiseSchedule.linear()
    ref_lin = diffusers.DDIMScheduler(beta_schedule="linear").alphas_cumprod.double()
    rel_lin = ((lin.alphas_cumprod - ref_lin).abs() / ref_lin).max().item()
    assert rel_lin < 1e-5, f"linear schedule: max relative difference {rel_lin:.2e} ≥ 1e-5"


def test_from_config_reads_the_sd14_scheduler_config(sd14_reference, schedule):
    config = json.loads(
        (sd14_reference / "hub" / "scheduler" / "scheduler_config.json").read_text()
    )
    loaded = NoiseSchedule.from_config(config)
    assert loaded.steps_offset == 1, f"steps_offset {loaded.steps_offset} != 1"
    assert torch.equal(loaded.alphas_cumprod, schedule.alphas_cumprod)
    # set_alpha_to_one is False for SD1.4: the level after DDIM's last step is timestep 0's
    assert loaded.final_alphas_cumprod == float(schedule.alphas_cumprod[0])


def test_levels_and_lambda(schedule):
    t = 500
    a = float(schedule.alphas_cumprod[t])
    assert schedule.alpha(t) == pytest.approx(math.sqrt(a), rel=1e-15)
    assert schedule.sigma(t) == pytest.approx(math.sqrt(1 - a), rel=1e-15)
    assert schedule.lam(t) == pytest.approx(math.log(math.sqrt(a) / math.sqrt(1 - a)), rel=1e-12)
    assert schedule.alphas_cumprod_at(FINAL) == float(schedule.alphas_cumprod[0])
    # DDIM's t − T//N for t = 1 is the level FINAL, by name
    with pytest.raises(ValueError, match="FINAL"):
        schedule.alphas_cumprod_at(-165)
    assert isinstance(FINAL, float) and schedule.lam(CLEAN) == math.inf, "a level is a float, named"
    assert schedule.sigma(CLEAN) == 0.0 and schedule.lam(CLEAN) == math.inf
    assert NoiseSchedule.scaled_linear(set_alpha_to_one=True).alphas_cumprod_at(FINAL) == 1.0
    with pytest.raises(ValueError, match="past the last training timestep"):
        schedule.alpha(1000)


@settings(FIXED, max_examples=30)
@given(t=times())
def test_t_of_lam_inverts_lam(t):
    schedule = NoiseSchedule.scaled_linear()
    back = schedule.t_of_lam(schedule.lam(t))
    assert abs(back - t) < 1e-6, f"t_of_lam(lam({t})) = {back}"
    # λ decreases with t and ᾱ at a fractional time lies between its integer neighbours
    lo, hi = math.floor(t), min(math.floor(t) + 1, 999)
    assert (
        schedule.alphas_cumprod_at(hi)
        <= schedule.alphas_cumprod_at(t)
        <= schedule.alphas_cumprod_at(lo)
    )


def test_sd_leading_sequence():
    assert ddim_timesteps(6) == [831, 665, 499, 333, 167, 1]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [6, 10, 20, 50, 3, 7])
def test_ddim_timesteps_match_diffusers(spacing, n):
    ref = diffusers.DDIMScheduler(**SD, steps_offset=1, timestep_spacing=spacing)
    ref.set_timesteps(n)
    assert ddim_timesteps(n, spacing, steps_offset=1) == ref.timesteps.tolist()


@pytest.mark.parametrize("use_lu_lambdas", [False, True])
@pytest.mark.parametrize("n", [6, 10, 20, 50, 3, 7])
def test_dpm_solver_timesteps_match_diffusers(schedule, use_lu_lambdas, n):
    ref = diffusers.DPMSolverMultistepScheduler(
        **SD, algorithm_type="dpmsolver++", use_lu_lambdas=use_lu_lambdas
    )
    ref.set_timesteps(n)
    times = dpm_solver_times(schedule, n, "logSNR" if use_lu_lambdas else "linspace")
    assert [model_timestep(t) for t in times] == ref.timesteps.tolist()
    # the solver's own levels are exactly λ-uniform (diffusers keeps them as float32 sigmas)
    if use_lu_lambdas:
        lams = [schedule.lam(t) for t in times]
        steps = [b - a for a, b in zip(lams, lams[1:])]
        assert max(steps) - min(steps) < 1e-9, f"λ steps not uniform: {min(steps)} … {max(steps)}"


def test_leading_ddim_refuses_a_first_timestep_past_the_axis():
    with pytest.raises(ValueError, match="steps_offset"):  # 999·1 + offset 1 = 1000
        ddim_timesteps(1000, "leading", steps_offset=1)


@settings(FIXED, max_examples=40)
@given(n=step_counts(1, 1000), spacing=st.sampled_from(DDIM_SPACINGS))
def test_ddim_sequence_properties(n, spacing):
    assume(not (spacing == "leading" and n == 1000))  # the test just above
    ts = ddim_timesteps(n, spacing, steps_offset=1 if spacing == "leading" else 0)
    assert len(ts) == n
    assert all(0 <= t <= 999 for t in ts), f"out of [0, 999]: {ts}"
    assert all(a > b for a, b in zip(ts, ts[1:])), f"not strictly decreasing: {ts}"
    if spacing == "leading":
        assert ts[-1] == 1 and ts[0] == (n - 1) * (1000 // n) + 1
    if spacing == "trailing":
        assert ts[0] == 999
    if spacing == "linspace":
        # numpy.linspace(0, 999, 1) is [0]
        assert ts == [0] if n == 1 else (ts[0] == 999 and ts[-1] == 0)


@settings(FIXED, max_examples=25)
@given(n=step_counts(1, 200), spacing=st.sampled_from(["logSNR", "linspace"]))
def test_dpm_sequence_properties(n, spacing):
    schedule = NoiseSchedule.scaled_linear()
    ts = dpm_solver_times(schedule, n, spacing)
    assert len(ts) == n and ts[0] == 999.0
    assert all(0 <= t <= 999 for t in ts), f"out of [0, 999]: {ts}"
    assert all(a > b for a, b in zip(ts, ts[1:])), f"not strictly decreasing: {ts}"
    if spacing == "logSNR" and n > 1:
        assert ts[-1] == 0.0


def test_bad_arguments_name_the_file():
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(6, "uniform")
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})


# ---- DPM-Solver++ spacings of diffusers' DPMSolverMultistepScheduler (docs/editedid.md, Open item

# N = 48 is where numpy's arange(T, 0, −T/N) rounds differently from k·(T/N) ("trailing": 937 vs
# 936)
SPACING_STEP_COUNTS = [1, 2, 3, 6, 7, 10, 20, 48, 50, 999]


# 1: SD1.4's scheduler config; 0: the scheduler's default
@pytest.mark.parametrize("steps_offset", [1, 0])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", SPACING_STEP_COUNTS)
def test_dpm_solver_spacings_match_diffusers(spacing, n, steps_offset):
    ref = diffusers.DPMSolverMultistepScheduler(
        **SD, algorithm_type="dpmsolver++", timestep_spacing=spacing, steps_offset=steps_offset
    )
    ref.set_timesteps(n)
    schedule = NoiseSchedule.scaled_linear(steps_offset=steps_offset)
    # diffusers returns timestep 1000
    if spacing == "leading" and n * (1000 // (n + 1)) + steps_offset > 999:
        assert ref.timesteps.max().item() == 1000
        with pytest.raises(ValueError, match="steps_offset=1 pushes"):
            dpm_solver_times(schedule, n, spacing)
        return
    times = dpm_solver_times(schedule, n, spacing)
    assert all(t == int(t) for t in times), f"{spacing} times must be integers: {times[:8]}"
    assert [int(t) for t in times] == ref.timesteps.tolist(), (
        f"{spacing}, N={n}: {[int(t) for t in times][:8]}… vs diffusers "
        f"{ref.timesteps.tolist()[:8]}…"
    )


def test_dpm_solver_spacings_at_six_steps(schedule):
    # the N = 6 values docs/editedid.md and the schedule.py docstring quote
    assert dpm_solver_times(schedule, 6, "linspace") == [999.0, 832.0, 666.0, 500.0, 333.0, 166.0]
    assert dpm_solver_times(schedule, 6, "leading") == [853.0, 711.0, 569.0, 427.0, 285.0, 143.0]
    assert dpm_solver_times(schedule, 6, "trailing") == [999.0, 832.0, 666.0, 499.0, 332.0, 166.0]


@pytest.mark.parametrize("n", [6, 10, 20, 48, 50])
def test_ddim_trailing_matches_diffusers_where_arange_rounds(n):
    ref = diffusers.DDIMScheduler(**SD, steps_offset=1, timestep_spacing="trailing")
    ref.set_timesteps(n)
    ours = ddim_timesteps(n, "trailing", steps_offset=1)
    assert ours == ref.timesteps.tolist(), (
        f"N={n}: {[(a, b) for a, b in zip(ours, ref.timesteps.tolist()) if a != b]}"
    )


def test_leading_dpm_solver_refuses_a_first_timestep_past_the_axis():
    with pytest.raises(ValueError, match="steps_offset"):  # 999·1 + offset 1 = 1000
        dpm_solver_times(NoiseSchedule.scaled_linear(), 999, "leading")


@settings(FIXED, max_examples=40)
@given(n=step_counts(1, 999), spacing=st.sampled_from(["leading", "trailing"]))
def test_dpm_integer_spacing_properties(n, spacing):
    assume(not (spacing == "leading" and n == 999))  # the test just above
    schedule = NoiseSchedule.scaled_linear()
    ts = dpm_solver_times(schedule, n, spacing)
    assert len(ts) == n, f"{spacing}, N={n}: {len(ts)} times"
    assert all(0 <= t <= 999 for t in ts), f"{spacing}, N={n}: out of [0, 999]: {ts[:3]}…{ts[-3:]}"
    assert all(a > b for a, b in zip(ts, ts[1:])), f"{spacing}, N={n}: not strictly decreasing"
    if spacing == "trailing":
        assert ts[0] == 999.0, f"trailing starts at {ts[0]}, not 999"
    else:  # leading: N+1 equal intervals of T//(N+1), the first one below CLEAN is left out
        ratio = 1000 // (n + 1)
        assert ts[-1] == ratio + 1 and all(a - b == ratio for a, b in zip(ts, ts[1:])), (
            f"leading, N={n}: last {ts[-1]}, ratio {ratio}"
        )


def test_bad_dpm_spacing_names_the_choices(schedule):
    with pytest.raises(ValueError, match="'logSNR', 'linspace', 'leading', 'trailing'"):
        dpm_solver_times(schedule, 6, "karras")
