"""Inversion on a tiny random SD stack: null-text optimisation (single and joint) and adaptive
mixing."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import random_image

from minid.method.mixing import MixingConfig, adaptive_mixing_inversion
from minid.method.null_text import NullTextConfig, null_text_optimization
from minid.sampling.guided import invert, reconstruct
from minid.sampling.hybrid import HybridSchedule, hybrid_plan
from minid.sampling.plans import ddim_plan
from minid.sampling.samplers import cfg, ddim_step, invert_loop, sample_loop
from minid.sampling.schedule import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = NoiseSchedule.scaled_linear()
PLAN = hybrid_plan(SCHEDULE)  # EditedID's default: N = 6, DPM-Solver++ (2M) on the last two steps
N = len(PLAN.steps)
GUIDANCE = 7.5


def _context(sd, prompts):
    with torch.no_grad():
        return sd.text_encoder(sd.tokenizer(prompts))


def _reachable_pivots(sd, plan, cond, uncond, seed, perturbation=0.05):
    """A guided trajectory made with known per-step null embeddings near `uncond`: null-text
    optimisation started from `uncond` has an exact solution to find, so its early-stop threshold is
    reachable."""
    g = torch.Generator().manual_seed(seed)
    z_T = torch.randn(cond.shape[0], 4, 8, 8, generator=g)
    nulls = [
        uncond.expand(cond.shape[0], -1, -1)
        + perturbation * torch.randn(cond.shape[0], *uncond.shape[1:], generator=g)
        for _ in range(len(plan.steps))
    ]
    return reconstruct(sd.unet, plan, z_T, cond, nulls, 7.5)[::-1]  # z_0 first, as `invert` returns


def test_null_text_lowers_the_loss_at_every_step_and_reaches_the_threshold(tiny_sd):
    ctx = _context(tiny_sd, ["", "a photo of a man"])
    uncond, cond = ctx[0:1], ctx[1:2]
    config = NullTextConfig(inner_steps=50)
    plan = PLAN
    pivots = _reachable_pivots(tiny_sd, plan, cond, uncond, seed=1)
    result = null_text_optimization(tiny_sd.unet, plan, pivots, cond, uncond, GUIDANCE, config)
    assert len(result.null_embeddings) == N and len(result.latents) == N + 1
    for i, step in enumerate(result.steps):
        (initial,), (final,) = step.initial_loss, step.final_loss
        assert final <= initial, f"step {i}: loss rose from {initial} to {final}"
        if initial >= step.threshold:
            assert final < initial, f"step {i}: loss {initial} above the threshold was not lowered"
        assert step.reached_threshold == [True], (
            f"step {i}: final loss {final} did not reach the early-stop threshold {step.threshold}"
        )
        assert step.iterations[0] <= config.inner_steps
    # the threshold grows with the step: epsilon + i·epsilon_growth
    assert [s.threshold for s in result.steps] == pytest.approx(
        [config.epsilon + i * config.reference_steps / N * config.epsilon_growth for i in range(N)]
    )


def test_null_text_keeps_the_conditional_embedding_fixed_and_warm_starts(tiny_sd):
    ctx = _context(tiny_sd, ["", "a photo of a man"])
    uncond, cond = ctx[0:1], ctx[1:2]
    cond_before = cond.clone()
    # no updates: every ∅_i is the warm start, i.e. ""'s embedding
    config = NullTextConfig(inner_steps=0)
    plan = PLAN
    pivots = _reachable_pivots(tiny_sd, plan, cond, uncond, seed=2)
    result = null_text_optimization(tiny_sd.unet, plan, pivots, cond, uncond, GUIDANCE, config)
    assert torch.equal(cond, cond_before), "the conditional embedding was modified"
    for i, null in enumerate(result.null_embeddings):
        assert torch.equal(null, uncond), f"step {i}: with 0 inner steps ∅ must stay the warm start"
    # and then reconstruction with them is the plain guided reconstruction
    plain = reconstruct(tiny_sd.unet, plan, pivots[-1], cond, uncond, GUIDANCE)
    # (batched [uncond; cond] and separate calls round differently: a relative tolerance)
    assert torch.allclose(result.z0, plain[-1], rtol=1e-4, atol=1e-4), (
        "0-iteration null-text differs from plain sampling"
    )


def test_joint_null_text_equals_two_single_runs(tiny_sd):
    """Eq. 4's summed loss gives each ∅_k the gradient of its own image's loss (the images do not
    interact in the batch), and each image stops on its own: the joint run is two single runs. In
    float64, so that Adam's normalised steps do not amplify the rounding differences of batched and
    single convolutions."""
    unet = copy.deepcopy(tiny_sd.unet).double()
    ctx = _context(tiny_sd, ["", "a photo of a man", "a photo of a woman wearing glasses"]).double()
    uncond, cond = ctx[0:1], ctx[1:3]
    config = NullTextConfig(inner_steps=4)
    plan = PLAN
    pivots = [
        p.double()
        for p in _reachable_pivots(
            tiny_sd, plan, cond.float(), uncond.float(), seed=3, perturbation=0.2
        )
    ]
    joint = null_text_optimization(unet, plan, pivots, cond, uncond, GUIDANCE, config)
    for k in range(2):
        single = null_text_optimization(
            unet, plan, [p[k : k + 1] for p in pivots], cond[k : k + 1], uncond, GUIDANCE, config
        )
        for i in range(N):
            assert joint.steps[i].iterations[k] == single.steps[i].iterations[0]
            err = (
                (joint.null_embeddings[i][k : k + 1] - single.null_embeddings[i]).abs().max().item()
            )
            assert err < 1e-9, (
                f"image {k}, step {i}: joint ∅ differs from the single run's by {err}"
            )
        err = (joint.z0[k : k + 1] - single.z0).abs().max().item()
        assert err < 1e-9, f"image {k}: joint reconstruction differs from the single run's by {err}"
    # and the two images did get different embeddings (the test is not trivially satisfied)
    assert not torch.allclose(joint.null_embeddings[-1][0], joint.null_embeddings[-1][1])


def test_null_text_stops_early_by_the_authors_rule(tiny_sd):
    """The authors' inner loop (the null-text notebook), written out for one image with DDIM steps:
    compute the loss, take the Adam step, then stop if that loss was under the threshold ε +
    i·ε_growth (here one that stops some steps early); ∅_i is the last iterate. minid's default loop
    gives the same update counts and embeddings."""
    ctx = _context(tiny_sd, ["", "a photo of a man"])
    uncond, cond = ctx[0:1], ctx[1:2]
    plan = ddim_plan(SCHEDULE, N)
    g = torch.Generator().manual_seed(4)
    z_T = torch.randn(1, 4, 8, 8, generator=g)
    pivots = reconstruct(
        tiny_sd.unet,
        plan,
        z_T,
        cond,
        [uncond + 0.3 * torch.randn(uncond.shape, generator=g) for _ in range(N)],
        GUIDANCE,
    )[::-1]
    config = NullTextConfig(inner_steps=6, epsilon=1e-3, epsilon_growth=1e-3)
    ours = null_text_optimization(tiny_sd.unet, plan, pivots, cond, uncond, GUIDANCE, config)

    z, null, counts, nulls = pivots[-1], uncond.clone(), [], []
    for i, step in enumerate(plan.steps):
        with torch.no_grad():
            e_c = tiny_sd.unet(z, step.timestep, cond)
        null = null.clone().requires_grad_(True)
        optimizer = torch.optim.Adam(
            [null], lr=config.lr * (1.0 - i * config.reference_steps / N / 100.0)
        )
        # the authors' threshold 1e-5 + i·2e-5 is written for 50 steps: i scaled to N, as the
        # learning rate
        threshold, count = (
            config.epsilon + i * config.reference_steps / N * config.epsilon_growth,
            0,
        )
        for _ in range(config.inner_steps):
            e_u = tiny_sd.unet(z, step.timestep, null)
            z_prev = ddim_step(z, cfg(e_u, e_c, GUIDANCE), step.t, step.s, SCHEDULE)
            loss = torch.nn.functional.mse_loss(z_prev, pivots[N - i - 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            count += 1
            if loss.item() < threshold:
                break
        counts.append(count)
        null = null.detach()
        nulls.append(null)
        with torch.no_grad():
            z = ddim_step(
                z,
                cfg(tiny_sd.unet(z, step.timestep, null), e_c, GUIDANCE),
                step.t,
                step.s,
                SCHEDULE,
            )

    assert [s.iterations[0] for s in ours.steps] == counts, (
        f"updates per step {counts} by the authors' rule"
    )
    assert min(counts) < config.inner_steps, f"the threshold must stop some steps early: {counts}"
    for i, (a, b) in enumerate(zip(ours.null_embeddings, nulls)):
        err = (a - b).abs().max().item()
        assert err < 1e-5, f"step {i}: ∅ differs from the authors' loop's by {err}"
    best = null_text_optimization(
        tiny_sd.unet,
        plan,
        pivots,
        cond,
        uncond,
        GUIDANCE,
        NullTextConfig(inner_steps=6, epsilon=1e-3, epsilon_growth=1e-3, keep="best"),
    )
    assert all(s.final_loss[0] <= s.initial_loss[0] for s in best.steps), (
        "keep='best' never keeps a worse ∅"
    )


@pytest.mark.parametrize("solver", ["hybrid", "ddim"])
def test_adaptive_mixing_meets_at_z_T_and_w_moves_monotonically_to_one_half(tiny_sd, solver):
    ctx = _context(tiny_sd, ["a photo of a man", "a photo of a man wearing black glasses"])
    with torch.no_grad():
        z0 = tiny_sd.vae.encode_latent(torch.cat([random_image(1), random_image(2)]))
    # normalised by D: w moves whatever the size of the tiny model's latents
    config = MixingConfig()
    plan = PLAN if solver == "hybrid" else ddim_plan(SCHEDULE, N)
    res = adaptive_mixing_inversion(
        tiny_sd.unet, plan, z0[0:1], z0[1:2], ctx[0:1], ctx[1:2], config
    )
    assert torch.equal(res.pivots_o[-1], res.pivots_e[-1]), "z_T^O and z_T^E differ"
    assert len(res.pivots_o) == len(res.pivots_e) == N + 1
    assert torch.equal(res.pivots_o[0], z0[0:1]) and torch.equal(res.pivots_e[0], z0[1:2])
    ws, losses = res.w_schedules[0], res.alignment_losses[0]
    assert len(ws) == N
    assert ws[0] == config.w0, f"w starts at {ws[0]}, expected w_0 = {config.w0}"
    assert ws[-1] == 0.5, f"the last inversion step must force w = 0.5, found {ws[-1]}"
    assert all(b > a for a, b in zip(ws, ws[1:])), f"w does not increase strictly toward 0.5: {ws}"
    assert all(w <= 0.5 for w in ws), f"w overshoots 0.5: {ws}"
    # Eq. 2: the mixed pair differs by (1 − 2w) times the unmixed pair, so the mean squared gap of
    # each kept pivot pair is the step's alignment loss (1 − 2w)² mean((ẑ^O − ẑ^E)²), and 0 at z_T
    for j, loss in enumerate(losses):
        gap = float(((res.pivots_o[j + 1] - res.pivots_e[j + 1]).double() ** 2).mean())
        assert gap == pytest.approx(loss, rel=1e-4, abs=1e-12), (
            f"step {j}: pivot gap {gap} vs alignment loss {loss}"
        )
    assert losses[0] > 0, "the two images must start apart (the check above is not trivially 0 = 0)"


def test_without_mixing_the_two_inversions_are_independent(tiny_sd):
    ctx = _context(tiny_sd, ["a photo of a man", "a photo of a man wearing black glasses"])
    with torch.no_grad():
        z0 = tiny_sd.vae.encode_latent(torch.cat([random_image(1), random_image(2)]))
    res = adaptive_mixing_inversion(
        tiny_sd.unet, PLAN, z0[0:1], z0[1:2], ctx[0:1], ctx[1:2], mixing=None
    )
    alone = invert(tiny_sd.unet, PLAN, z0[0:1], ctx[0:1])
    assert res.w_schedules[0] == [0.0] * N
    err = (res.pivots_o[-1] - alone[-1]).abs().max().item()
    assert err < 1e-5, f"unmixed batched inversion differs from a single inversion by {err}"
    assert not torch.equal(res.pivots_o[-1], res.pivots_e[-1])


def test_fragmented_and_ddim_plans_are_different_passes():
    hybrid = PLAN
    fragmented = hybrid_plan(SCHEDULE, HybridSchedule(timesteps="fragmented"))
    ddim = ddim_plan(SCHEDULE, 6)
    assert [s.solver for s in ddim.steps] == ["ddim"] * 6
    assert [s.solver for s in hybrid.steps][-2:] == ["dpm_solver++"] * 2
    assert hybrid.timesteps != fragmented.timesteps


def test_both_loops_pass_the_step_index_and_mirror_each_other():
    """Inversion step i is sampling step i run backwards: the model is told the same timestep and
    index (the symmetry of Eq. 6), and `land` is the step the loop then takes."""
    seen = {"sample": [], "invert": []}

    def model(kind):
        def eps(z, t, i, land):
            seen[kind].append((i, t))
            e = torch.full_like(z, 0.1)
            landed = land(e)
            seen[kind + "_land"] = seen.get(kind + "_land", []) + [landed]
            return e

        return eps

    lands = []
    z = sample_loop(
        model("sample"),
        torch.ones(4, dtype=torch.float64),
        PLAN,
        callback=lambda i, t, z, x0: lands.append(z),
    )
    invert_loop(model("invert"), z, PLAN)
    assert seen["sample"] == [(i, s.timestep) for i, s in enumerate(PLAN.steps)]
    assert seen["invert"] == seen["sample"][::-1]
    assert all(torch.equal(a, b) for a, b in zip(seen["sample_land"], lands)), (
        "land(eps) must be the step taken"
    )


def test_stage_2_in_fp16_with_loss_scaling_reaches_the_fp32_loss(tiny_sd):
    """The precision policy (docs/editedid.md, "Defaults and readings": Stage 2 in the model's
    dtype, fp16 on a GPU, with the loss scaled by 2^16 across the UNet) on the tiny model: the ∅ it
    keeps give, measured in float64, per-step losses within 1.5× of those float32's optimisation
    reaches, both far below no optimisation. (bf16, the same way, ends 2.4-6× above float32 here: it
    is not the default.)"""
    ctx = _context(tiny_sd, ["", "a photo of a man"])
    uncond, cond = ctx[0:1], ctx[1:2]
    pivots = _reachable_pivots(tiny_sd, PLAN, cond, uncond, seed=1, perturbation=0.3)
    z_T = pivots[-1]
    unet64 = copy.deepcopy(tiny_sd.unet).double()

    # the guided reconstruction with these ∅, in float64, against the pivots, per step
    def true_losses(nulls):
        latents = reconstruct(
            unet64, PLAN, z_T.double(), cond.double(), [n.double() for n in nulls], GUIDANCE
        )
        return [
            ((z - p.double()) ** 2).mean().item() for z, p in zip(latents[1:], pivots[::-1][1:])
        ]

    config = NullTextConfig(inner_steps=20)
    fp32 = null_text_optimization(tiny_sd.unet, PLAN, pivots, cond, uncond, GUIDANCE, config)
    half = torch.float16
    fp16 = null_text_optimization(
        copy.deepcopy(tiny_sd.unet).to(half),
        PLAN,
        [p.to(half) for p in pivots],
        cond.to(half),
        uncond.to(half),
        GUIDANCE,
        config,
    )
    assert config.loss_scale == 2.0**16 and fp16.null_embeddings[0].dtype == half
    ours, reference = true_losses(fp16.null_embeddings), true_losses(fp32.null_embeddings)
    unoptimised = true_losses([uncond] * N)
    for i, (a, b, c) in enumerate(zip(ours, reference, unoptimised)):
        assert b < 0.2 * c, (
            f"step {i}: float32 null-text must optimise ({b:.2e} against {c:.2e} without)"
        )
        assert a <= 1.5 * b, (
            f"step {i}: fp16 Stage 2 reaches {a:.2e}, float32 {b:.2e}: more than 1.5×"
        )


def test_fp16_stage_2_survives_an_overflowing_loss_scale(tiny_sd):
    """Dynamic loss scaling: started at 2^24, an fp16 UNet's gradient of ∅ overflows; those updates
    are skipped and the scale halves until the gradient is finite, so ∅ stays finite and the loss
    still falls at every step (where a fixed scale would have written inf into ∅)."""
    ctx = _context(tiny_sd, ["", "a photo of a man"])
    uncond, cond = ctx[0:1], ctx[1:2]
    pivots = _reachable_pivots(tiny_sd, PLAN, cond, uncond, seed=1, perturbation=0.3)
    half = torch.float16
    config = NullTextConfig(inner_steps=20, loss_scale=2.0**24)  # fp16 holds at most 65504
    result = null_text_optimization(
        copy.deepcopy(tiny_sd.unet).to(half),
        PLAN,
        [p.to(half) for p in pivots],
        cond.to(half),
        uncond.to(half),
        GUIDANCE,
        config,
    )
    assert result.skipped_updates > 0, "a 2^24 scale must overflow an fp16 gradient"
    assert all(bool(torch.isfinite(n).all()) for n in result.null_embeddings), "∅ went non-finite"
    assert all(bool(torch.isfinite(z).all()) for z in result.latents)
    for i, step in enumerate(result.steps):
        assert sum(step.iterations) > 0, f"step {i}: no update was ever applied"
        assert step.final_loss[0] < step.initial_loss[0], (
            f"step {i}: the loss did not fall ({step.initial_loss[0]:.3e} -> "
            f"{step.final_loss[0]:.3e})"
        )


def test_loss_scale_grows_after_clean_updates_and_keeps_float32_exact(tiny_sd):
    """In float32 the scale is a power of two that grows after `scale_growth_interval` clean
    updates; the optimised ∅ are bit for bit those of a scale that never grows."""
    ctx = _context(tiny_sd, ["", "a photo of a man"])
    uncond, cond = ctx[0:1], ctx[1:2]
    pivots = _reachable_pivots(tiny_sd, PLAN, cond, uncond, seed=1, perturbation=0.3)
    growing = NullTextConfig(inner_steps=6, scale_growth_interval=2)
    fixed = NullTextConfig(inner_steps=6, scale_growth_interval=10**6)
    a = null_text_optimization(tiny_sd.unet, PLAN, pivots, cond, uncond, GUIDANCE, growing)
    b = null_text_optimization(tiny_sd.unet, PLAN, pivots, cond, uncond, GUIDANCE, fixed)
    assert a.loss_scale > growing.loss_scale and b.loss_scale == fixed.loss_scale
    assert a.skipped_updates == b.skipped_updates == 0
    assert all(torch.equal(x, y) for x, y in zip(a.null_embeddings, b.null_embeddings))


@pytest.mark.parametrize("forced", [2, 3])
def test_forced_steps_end_the_last_steps_at_one_half(tiny_sd, forced):
    """`MixingConfig.forced_steps` (the authors' FINA_STEP): the last `forced` inversion steps mix
    with w = 0.5, so the two trajectories coincide from the first of them on; the free steps before
    reach the same gap ratio `reach` over fewer updates."""
    ctx = _context(tiny_sd, ["a photo of a man", "a photo of a man wearing black glasses"])
    with torch.no_grad():
        z0 = tiny_sd.vae.encode_latent(torch.cat([random_image(1), random_image(2)]))
    config = MixingConfig(forced_steps=forced)
    res = adaptive_mixing_inversion(
        tiny_sd.unet, PLAN, z0[0:1], z0[1:2], ctx[0:1], ctx[1:2], config
    )
    ws = res.w_schedules[0]
    assert ws[-forced:] == [0.5] * forced and ws[-forced - 1] < 0.5, ws
    for j in range(N - forced + 1, N + 1):  # the pivots after each forced step are one latent
        assert torch.equal(res.pivots_o[j], res.pivots_e[j]), f"pivot {j} differs"
    assert not torch.equal(res.pivots_o[N - forced], res.pivots_e[N - forced])
    gap_ratio = (0.5 - ws[-forced - 1]) / (0.5 - ws[0])
    assert gap_ratio == pytest.approx(config.reach, rel=1e-6), gap_ratio
    assert MixingConfig(forced_steps=10).forced(N) == N - 1  # the first step always mixes with w_0
    with pytest.raises(ValueError, match="forced_steps"):
        MixingConfig(forced_steps=0)
