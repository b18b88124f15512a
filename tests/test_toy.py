"""The exact-score testbed (minid/sampling/toy.py): its ε is the score of its density, its ODE is
the flow, and the EditedID stages run on it as on the UNet."""

from __future__ import annotations

import math

import pytest
import torch

from minid.imaging.metrics import psnr
from minid.method.null_text import NullTextConfig, null_text_optimization
from minid.sampling.guided import guided_eps
from minid.sampling.plans import ddim_plan
from minid.sampling.samplers import invert_loop, sample_loop
from minid.sampling.schedule import CLEAN
from minid.sampling.toy import GaussianMixtureModel, ToyConfig


@pytest.fixture(scope="module")
def model() -> GaussianMixtureModel:
    return GaussianMixtureModel()


@pytest.fixture(scope="module")
def data(model):
    context = model.prompt([0, 1, 2, 3, 4, 5])
    x0, _ = model.sample(context, torch.Generator().manual_seed(1))
    return x0, context


@pytest.mark.parametrize("offset", [0.0, 0.3])
@pytest.mark.parametrize("t", [1, 50, 400, 900, 999])
def test_eps_is_minus_sigma_times_the_finite_difference_score(model, data, t, offset):
    # ε = −σ ∇ log p_t(z | c): the directional derivative of log p_t by central differences
    # (float64, h = 1e-5); with a mean offset s in the embedding too (what null-text optimisation
    # moves)
    x0, context = data
    g = torch.Generator().manual_seed(t)
    context = context.clone()
    context[:, 0, model.num_components :] = offset * torch.randn(
        model.dim, generator=g, dtype=torch.float64
    )
    a, s = model.schedule.alpha(t), model.schedule.sigma(t)
    z = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps = model(z, t, context)
    logits, h = context[:, 0], 1e-5
    for _ in range(3):
        direction = torch.randn(z.shape, generator=g, dtype=torch.float64)
        fd = (
            model.log_density(z + h * direction, a, s, logits)
            - model.log_density(z - h * direction, a, s, logits)
        ) / (2 * h)
        analytic = -(eps * direction).flatten(1).sum(1) / s
        rel = ((fd - analytic).abs() / analytic.abs().clamp_min(1e-3)).max().item()
        assert rel < 1e-6, (
            f"t={t}: ε vs −σ·(finite-difference score) relative error {rel:.2e} ≥ 1e-6"
        )


def test_the_score_is_nonlinear(model, data):
    # a single Gaussian would give an ε affine in z; the mixture's ε is not (responsibilities change
    # with z)
    x0, context = data
    t = 500
    a, s = model.schedule.alpha(t), model.schedule.sigma(t)
    z1 = a * x0 + s * torch.randn(
        x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    z2 = a * x0.roll(1, 0) + s * torch.randn(
        x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    mid = model(0.5 * (z1 + z2), t, context)
    gap = (mid - 0.5 * (model(z1, t, context) + model(z2, t, context))).abs().max().item()
    assert gap > 1e-2, (
        f"ε at the midpoint is the mean of the ends to {gap:.2e}: the score looks affine"
    )


def test_flow_matches_the_closed_form_for_one_component():
    # one Gaussian: z_s − α_s μ = V diag(sqrt(c_s/c_t)) Vᵀ (z_t − α_t μ), c = α² e + σ² (commuting
    # covariances)
    m = GaussianMixtureModel(ToyConfig(components=1))
    sch = m.schedule
    x0, _ = m.sample(m.prompt([0, 0]), torch.Generator().manual_seed(4))
    t, s = 700, 20
    z_t = m.flow(x0, CLEAN, t, m.prompt([0, 0]), steps=200)
    v, e = m.eigenvectors[0], m.eigenvalues[0]
    c_t, c_s = sch.alpha(t) ** 2 * e + sch.sigma(t) ** 2, sch.alpha(s) ** 2 * e + sch.sigma(s) ** 2
    centred = (z_t.reshape(2, -1) - sch.alpha(t) * m.means[0]) @ v  # eigen-coordinates
    exact = sch.alpha(s) * m.means[0] + (centred * (c_s / c_t).sqrt()) @ v.T
    ours = m.flow(z_t, t, s, m.prompt([0, 0]), steps=200).reshape(2, -1)
    err = (ours - exact).abs().max().item()
    assert err < 1e-8, f"RK4 flow vs the closed-form Gaussian flow: max abs error {err:.2e} ≥ 1e-8"


def test_flow_maps_samples_to_noise_and_back(model, data):
    x0, context = data
    z_T = model.flow(x0, CLEAN, 999, context, steps=200)
    back = model.flow(z_T, 999, CLEAN, context, steps=200)
    err = (back - x0).abs().max().item()
    assert err < 1e-4, (
        f"data → t=999 → data by the probability-flow ODE: max abs error {err:.2e} ≥ 1e-4"
    )
    # at t = 999 the flow's image is (nearly) unit noise: E[z²] = α² E[x_0²] + σ² per coordinate
    a, s = model.schedule.alpha(999), model.schedule.sigma(999)
    expected = a**2 * float((x0**2).mean()) + s**2
    measured = float((z_T**2).mean())
    assert abs(measured / expected - 1) < 0.05, (
        f"E[z_T²] = {measured:.4f}, expected {expected:.4f} ± 5 %"
    )


def test_the_unet_signature(model, data):
    x0, context = data
    z = x0 + 0.3
    plain = model(z, 500, context)
    assert torch.equal(model(z, 500, context, controller=object()), plain), (
        "controller= must be ignored"
    )
    assert torch.equal(model(z, torch.full((6,), 500), context), plain), (
        "a (B,) timestep tensor as an int"
    )
    assert torch.equal(model(z, 500, context[:1].expand(6, -1, -1)), model(z, 500, context[:1])), (
        "one embedding broadcasts over the batch"
    )
    with pytest.raises(ValueError, match="\\(B, 1, E=262\\), K = 6 logits, then 256 offset values"):
        model(z, 500, torch.zeros(6, 77, 768, dtype=torch.float64))


def test_guidance_and_its_gradient_in_the_unconditional_logits(model, data):
    x0, context = data
    z = 0.8 * x0 + 0.6 * torch.randn(
        x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    # guidance with ∅ = c is ε(c) exactly, for any scale
    same = guided_eps(model, z, 300, context, context, 7.5)
    assert torch.allclose(same, model(z, 300, context), rtol=0, atol=1e-12)
    # the autograd path from ∅ (logits and offset) to ε that null-text optimisation needs, vs finite
    # differences
    null = (
        0.1
        * torch.randn(
            2,
            1,
            model.embedding_width,
            generator=torch.Generator().manual_seed(6),
            dtype=torch.float64,
        )
    ).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda n: model(z[:2], 300, n), (null,), eps=1e-6, atol=1e-6)


def test_the_offset_shifts_the_data(model):
    # x_0 | c with offset s is the mixture with every mean moved by s: the same draws, shifted
    shift = torch.linspace(-1, 1, model.dim, dtype=torch.float64)
    c = model.prompt([2, 3])
    moved = c.clone()
    moved[:, 0, model.num_components :] = shift
    a, _ = model.sample(c, torch.Generator().manual_seed(7))
    b, _ = model.sample(moved, torch.Generator().manual_seed(7))
    assert torch.allclose(b - a, shift.reshape(model.latent_shape).expand_as(a), rtol=0, atol=1e-12)
    logits_only = GaussianMixtureModel(ToyConfig(offset=False))
    assert logits_only.prompt(1).shape == (1, 1, 6) and model.prompt(1).shape == (1, 1, 262)
    z = torch.randn(
        2, *model.latent_shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64
    )
    assert torch.equal(
        logits_only(z, 400, logits_only.prompt([1, 2])), model(z, 400, model.prompt([1, 2]))
    ), "a zero offset must give the logits-only model's ε"


def test_null_text_optimization_runs_on_the_toy(model, data):
    # Stage 2 with the toy as the UNet. Pivots that the guided pass with ∅ = "" follows itself:
    # every loss is 0, so with keep="best" no update is made and the reconstruction is those pivots
    x0, context = data
    plan = ddim_plan(model.schedule, 6)
    null = model.null_prompt()
    z_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    own = [z_T]
    sample_loop(
        lambda z, t, i, land: guided_eps(model, z, t, context, null.expand(6, -1, -1), 7.5),
        z_T,
        plan,
        callback=lambda i, t, z, x: own.append(z),
    )
    result = null_text_optimization(
        model, plan, own[::-1], context, null, 7.5, NullTextConfig(keep="best")
    )
    assert all(it == [0] * 6 for it in (s.iterations for s in result.steps)), [
        s.iterations for s in result.steps
    ]
    err = max((a - b).abs().max().item() for a, b in zip(result.latents, own))
    assert err < 1e-12, f"reconstruction vs the pivots it was given: {err:.2e}"
    # pivots of the unguided inversion: the optimised ∅ lowers the loss below the loss of "" at some
    # step (keep="best" never keeps a worse one)
    pivots = [x0]
    invert_loop(
        lambda z, t, i, land: model(z, t, context),
        x0,
        plan,
        callback=lambda i, t, z, x: pivots.append(z),
    )
    result = null_text_optimization(
        model, plan, pivots, context, null, 7.5, NullTextConfig(keep="best")
    )
    assert result.null_embeddings[0].shape == (6, 1, 262), tuple(result.null_embeddings[0].shape)
    for i, step in enumerate(result.steps):
        assert all(f <= s for f, s in zip(step.final_loss, step.initial_loss)), (
            f"step {i}: kept losses {step.final_loss} above initial {step.initial_loss}"
        )
    assert any(
        f < 0.5 * s for step in result.steps for f, s in zip(step.final_loss, step.initial_loss)
    ), "no step halved its loss: the gradient does not reach the toy's ε"


def test_edit_region_keeps_the_rest_and_draws_the_conditional(model, data):
    x0, _ = data
    mask = torch.zeros(model.latent_shape, dtype=torch.bool)
    mask[:, 2:5, 2:5] = True  # a 3×3 "face", 36 of 256 latent values
    edited = model.edit_region(x0, mask, component=1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(edited[:, ~mask], x0[:, ~mask]), (
        "outside the region the latent must be kept bit for bit"
    )
    assert (edited[:, mask] - x0[:, mask]).abs().min() > 0, (
        "inside the region every value must be redrawn"
    )
    # without a generator: the conditional mean, where the component's log-density is stationary in
    # x_F
    mean = model.edit_region(x0, mask, component=1)
    centred = mean.reshape(6, -1) - model.means[1]
    grad_f = torch.linalg.solve(model.covariances[1], centred.T).T[:, mask.flatten()]
    assert grad_f.abs().max() < 1e-9, f"∇_F log N at the conditional mean: {grad_f.abs().max():.2e}"


def test_psnr_of_the_image_view(model, data):
    x0, _ = data
    delta = 0.01
    expected = 10 * math.log10(model.data_range**2 / delta**2)
    assert model.image(x0) is x0
    assert psnr(model.image(x0 + delta), model.image(x0), model.data_range) == pytest.approx(
        expected, abs=1e-9
    )
