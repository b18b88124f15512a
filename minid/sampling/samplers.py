"""Samplers: DDIM, DPM-Solver++ (multistep, orders 1-3), their inversions, and EditedID's hybrid
solver.

Every step is a function of one family,

    step(z, eps, t, s, schedule[, state, order]) -> z

over plain tensors. A step is named by its pair of times (t, s), t the noisier end and s the less
noisy end, in both directions: a sampling step takes z at t to z at s; its inversion takes z at s
back to z at t. `eps` is the model's noise prediction at the current point (convert other prediction
types with `eps_from_model_output`), `schedule` is a `NoiseSchedule`, `state` a `SolverState` (the
multistep history, read by the DPM-Solver++ steps; `hybrid_step` returns the new one with the step's
x̂_0 recorded). Times are floats on the training axis (see schedule.py, with the two levels below 0:
FINAL and CLEAN).

Notation (schedule.py has the schedule's half; docs/editedid.md "Notation" is the same table):

    | symbol                     | code name  | meaning                                     |
    |----------------------------|------------|---------------------------------------------|
    | z_t                        | `z`        | the latent at time t: z_t = α_t x_0 + σ_t ε |
    | ε_θ(z_t, t)                | `eps`      | the network's noise prediction              |
    | x̂_0 = (z_t − σ_t ε)/α_t   | `x0`       | data prediction (DDIM Eq. 12)               |
    | v = α_t ε − σ_t x̂_0       | `v`        | velocity prediction (Salimans & Ho 2022)    |
    | ε̃ = ε(∅) + s(ε(c) − ε(∅)) | `eps_cfg`  | classifier-free guidance, scale s (SD: 7.5) |
    | λ_t = log(α_t/σ_t)         | `lam`      | half log-SNR, grows toward clean            |
    | h = λ_s − λ_t              | `h`        | step in λ (> 0 sampling, < 0 inverting)     |
    | r_k = h_k / h              | `r0`, `r1` | an earlier step's λ-length / this one's     |
    | η                          | `eta`      | DDIM noise (0: the ODE, 1: DDPM-like)       |

Papers: DDIM (Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models"), DPM-Solver (Lu et al.
2022a), DPM-Solver++ (Lu et al. 2022b, "Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"), EditedID (hybrid solver: its Eq. 5-6; see docs/editedid.md).

The loop stays visible: `sample_loop` / `invert_loop` below are a dozen lines each, and every pass
of minid runs through them (text to image, inversion, EditedID's three stages): what differs between
those passes is the model function and the callback, never the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from minid.sampling.plans import DDIM, Plan, PlanStep
from minid.sampling.schedule import NoiseSchedule

# ---- guidance and prediction types ---------------------------------------------------------------


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ε̃ = ε(∅) + s·(ε(c) − ε(∅)); s = 1 gives
    ε(c)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def x0_from_eps(
    z: torch.Tensor, eps: torch.Tensor, t: float, schedule: NoiseSchedule
) -> torch.Tensor:
    """x̂_0 = (z_t − σ_t ε) / α_t  (DDIM Eq. 12, "predicted x_0")."""
    return (z - schedule.sigma(t) * eps) / schedule.alpha(t)


def eps_from_x0(
    z: torch.Tensor, x0: torch.Tensor, t: float, schedule: NoiseSchedule
) -> torch.Tensor:
    """ε = (z_t − α_t x̂_0) / σ_t; undefined at CLEAN (σ = 0)."""
    return (z - schedule.alpha(t) * x0) / schedule.sigma(t)


def v_from_eps(
    z: torch.Tensor, eps: torch.Tensor, t: float, schedule: NoiseSchedule
) -> torch.Tensor:
    """v = α_t ε − σ_t x̂_0 = (ε − σ_t z_t) / α_t   (using α² + σ² = 1)."""
    return (eps - schedule.sigma(t) * z) / schedule.alpha(t)


def eps_from_v(z: torch.Tensor, v: torch.Tensor, t: float, schedule: NoiseSchedule) -> torch.Tensor:
    """ε = σ_t z_t + α_t v."""
    return schedule.sigma(t) * z + schedule.alpha(t) * v


def x0_from_v(z: torch.Tensor, v: torch.Tensor, t: float, schedule: NoiseSchedule) -> torch.Tensor:
    """x̂_0 = α_t z_t − σ_t v."""
    return schedule.alpha(t) * z - schedule.sigma(t) * v


def eps_from_model_output(
    output: torch.Tensor,
    z: torch.Tensor,
    t: float,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The network's output as ε, for `prediction_type` "epsilon" (SD1.x) or "v_prediction"
    (SD2.x-v)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return eps_from_v(z, output, t, schedule)
    raise ValueError(f"prediction_type {prediction_type!r} is not 'epsilon' or 'v_prediction'")


# ---- DDIM ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverState:
    """What a multistep solver remembers between steps: the last x̂_0 predictions and the λ they
    were made at, oldest first. Immutable: `remember` returns a new state, so a step can be tried
    many times from the same state (null-text optimisation aims each step at a pivot) without
    copies. `hybrid_step` and `hybrid_inversion_step` return the state after their step; every step
    records its x̂_0 there, the DDIM steps too, so that a DPM-Solver++ step right after DDIM steps
    (the hybrid solver) is already multistep. Which of the remembered predictions a step uses is its
    order's business (the plans count only predictions on the current path; see `_with_orders`)."""

    x0s: tuple = ()  # x̂_0 of earlier steps, each like z
    lams: tuple = ()  # λ of the point each x̂_0 was predicted at
    keep: int = 2  # order 3 needs the two previous predictions

    def remember(self, x0: torch.Tensor, lam: float) -> "SolverState":
        return SolverState(
            (*self.x0s, x0)[-self.keep :], (*self.lams, lam)[-self.keep :], self.keep
        )


def ddim_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    t: float,
    s: float,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    clip: Optional[float] = None,
) -> torch.Tensor:
    """DDIM from t to s < t (Song et al. 2021, Eq. 12):

        z_s = α_s x̂_0 + sqrt(1 − ᾱ_s − σ_η²) ε + σ_η n,   n ~ N(0, I) from `generator`
        σ_η = η · sqrt((1 − ᾱ_s)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_s)                          (Eq. 16)

    η = 0 is the deterministic sampler (the first-order solver of the probability-flow ODE).
    clip: x̂_0 clamped to [−clip, clip] (diffusers' clip_sample), the direction term keeping the
    model's ε (diffusers' default, use_clipped_model_output=False); None leaves x̂_0 as predicted.
    """
    # 1. noise levels of the two ends (s may be FINAL or CLEAN after the last step)
    a_t, a_s = schedule.alphas_cumprod_at(t), schedule.alphas_cumprod_at(s)
    # 2. predicted x_0 (Eq. 12, first term), clipped on request
    x0 = _clipped((z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t), clip)
    # 3. the noise added back (Eq. 16); zero for η = 0
    sigma_eta = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
    # 4. "direction pointing to x_t" (Eq. 12, second term)
    direction = math.sqrt(max(1 - a_s - sigma_eta**2, 0.0)) * eps
    # 5. the step
    z_s = math.sqrt(a_s) * x0 + direction
    if sigma_eta > 0:
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        z_s = z_s + sigma_eta * noise
    return z_s


def ddim_inversion_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    t: float,
    s: float,
    schedule: NoiseSchedule,
    clip: Optional[float] = None,
) -> torch.Tensor:
    """DDIM inversion: the η = 0 formula run from s up to t > s, z given at s:

        x̂_0 = (z_s − σ_s ε)/α_s,   z_t = α_t x̂_0 + σ_t ε

    ε is the model's prediction at the current, less noisy point z_s (the unknown z_t is replaced by
    z_s, the approximation every DDIM inversion makes; exact when ε does not depend on z). The loops
    tell the model the pair's noisier timestep t, as diffusers' DDIMInverseScheduler pipelines and
    null-text inversion do, so a step and its inversion see the same label. `clip` as in `ddim_step`
    (DDIMInverseScheduler's clip_sample: x̂_0 clamped, ε kept).
    """
    # 1. noise levels: current s, target t
    a_s, a_t = schedule.alphas_cumprod_at(s), schedule.alphas_cumprod_at(t)
    # 2. predicted x_0 at the current point, clipped on request
    x0 = _clipped((z - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s), clip)
    # 3. re-noise to t with the same ε
    return math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps


def _clipped(x0: torch.Tensor, clip: Optional[float]) -> torch.Tensor:
    return x0 if clip is None else x0.clamp(-clip, clip)


# ---- DPM-Solver++ (multistep, data prediction) ---------------------------------------------------
# The probability-flow ODE has the exact solution (DPM-Solver++, Eq. 8), from the current time c to
# the next n:
#
#     z_n = (σ_n/σ_c) z_c + σ_n ∫_{λ_c}^{λ_n} e^λ x̂_0(z_λ, λ) dλ
#
# The linear part is solved exactly; only x̂_0(λ) is approximated, by its Taylor expansion around
# λ_c in powers of (λ − λ_c). With h = λ_n − λ_c, the integrals of the first terms are (integrate by
# parts):
#
#     σ_n ∫ e^λ dλ              = α_n (1 − e^{−h})                  = −α_n (e^{−h} − 1)
#     σ_n ∫ e^λ (λ − λ_c) dλ    = α_n h ((e^{−h} − 1)/h + 1)
#     σ_n ∫ e^λ (λ − λ_c)²/2 dλ = α_n h² (1/2 − (e^{−h} − 1 + h)/h²)
#
# (using σ_n e^{λ_n} = α_n). The derivatives of x̂_0 in λ are estimated from the earlier predictions
# (multistep: no extra model calls): with h_0 = λ_c − λ_p1 the previous step's length and r0 =
# h_0/h, D1 = (x̂_0(c) − x̂_0(p1))/r0 ≈ h·x̂_0'. Order 2 ("2M", Alg. 2 of DPM-Solver++) replaces the
# second integral by half the first one, which gives Alg. 2's D = (1 + 1/(2 r0)) x̂_0(c) − (1/(2
# r0)) x̂_0(p1). Order 3 ("3M") uses the two previous predictions for a second difference. Every
# formula holds for h < 0 too: that is the inversion, the same update with the two times exchanged,
# explicit, from the current (less noisy) point.
#
# The step to CLEAN (σ_n = 0, h = +∞). The Taylor terms above diverge there (α_n h ((e^{−h} − 1)/h +
# 1) → ∞): no polynomial in λ can be extrapolated to λ = ∞, which is why diffusers
#    (final_sigmas_type="zero") and
# k-diffusion take this step at order 1, z_n = x̂_0(c). The exact solution is finite: as σ_n → 0 the
# weight σ_n e^λ of the integral concentrates at λ → ∞, so z_n = x̂_0 at σ = 0, the limit of the
# predictions along the path. In u = σ²/α² = e^{−2λ} that limit is an ordinary point: with y = z/α
# the probability-flow ODE reads dy/du = −½ ∇log p_u(y), p_u the data smoothed by a Gaussian of
# variance u (heat-equation time u/2), a right-hand side smooth in u down to u = 0 for a smooth data
# density; so y and x̂_0 = y − 2u dy/du are smooth functions of u along the path. An order-k step to
# CLEAN (k ≥ 2) therefore extrapolates the k latest predictions to u = 0 with the polynomial through
# them in u (order 2: z_n = x̂_0(c) + (x̂_0(c) − x̂_0(p1)) / (e^{2 h_0} − 1)). Only the hybrid plans
# ask for it; DPM-Solver++ plans keep diffusers' order 1 there.


def _dpm_solver_update(
    z: torch.Tensor,
    x0: torch.Tensor,
    cur: float,
    nxt: float,
    schedule: NoiseSchedule,
    state: SolverState,
    order: int,
) -> torch.Tensor:
    """One multistep DPM-Solver++ update from time `cur` to `nxt` (either direction), x0 predicted
    at `cur`; `state` holds the earlier predictions (it is read, not changed)."""
    # 1. noise levels and the step length in λ
    sigma_c, sigma_n, alpha_n = schedule.sigma(cur), schedule.sigma(nxt), schedule.alpha(nxt)
    lam_c, lam_n = schedule.lam(cur), schedule.lam(nxt)
    h = lam_n - lam_c
    # 2. the order this step can use: at most one more than the remembered predictions at finite λ
    #    (warm-up; a prediction made at CLEAN, λ = ∞, has no finite distance in λ to this one), and
    # 1 from CLEAN
    usable = 0
    while usable < len(state.lams) and math.isfinite(state.lams[-1 - usable]):
        usable += 1
    order = min(order, usable + 1)
    if math.isinf(lam_c):
        order = 1
    if h == 0.0:  # a zero-length step is the identity (and would divide by h below)
        return z
    phi_1 = math.expm1(-h)  # e^{−h} − 1
    # 3. the update: exact linear part + Taylor terms of the integral (see the block comment above)
    # to CLEAN: extrapolate x̂_0 to u = σ²/α² = 0 (block comment above)
    if order > 1 and sigma_n == 0.0:
        if order > 3:
            raise ValueError(f"DPM-Solver++ order {order} is not 1, 2 or 3")
        us = [math.exp(-2.0 * lam) for lam in (*state.lams[-(order - 1) :], lam_c)]
        x0s = [*state.x0s[-(order - 1) :], x0]
        z_next = sum(_lagrange_weight_at_zero(us, j) * x0s[j] for j in range(order))
    # DPM-Solver++1 = DDIM; to CLEAN it is z_n = x̂_0(c) (σ_n = 0, e^{−h} − 1 = −1, α_n = 1)
    elif order == 1:
        z_next = (sigma_n / sigma_c) * z - alpha_n * phi_1 * x0
    elif order == 2:  # DPM-Solver++(2M), midpoint form
        h_0 = lam_c - state.lams[-1]
        r0 = h_0 / h
        D0, D1 = x0, (x0 - state.x0s[-1]) / r0
        z_next = (sigma_n / sigma_c) * z - alpha_n * phi_1 * D0 - 0.5 * alpha_n * phi_1 * D1
    elif order == 3:  # DPM-Solver++(3M)
        h_0, h_1 = lam_c - state.lams[-1], state.lams[-1] - state.lams[-2]
        r0, r1 = h_0 / h, h_1 / h
        D0 = x0
        D1_0 = (x0 - state.x0s[-1]) / r0  # ≈ h·x̂_0' from the last two points
        D1_1 = (state.x0s[-1] - state.x0s[-2]) / r1  # the same one step earlier
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)  # first derivative, corrected to second order
        D2 = (D1_0 - D1_1) / (r0 + r1)  # ≈ h²·x̂_0''/2
        # Caution: the coefficient of D2 below is the one of DPM-Solver's reference code and of
        # diffusers, kept for parity. With D2 ≈ h² x̂_0''/2, the Taylor term of the block comment
        # above, α_n h² (1/2 − (e^{−h} − 1 + h)/h²) x̂_0'', equals −2 α_n ((e^{−h} − 1 + h)/h² −
        # 1/2) D2: twice the term used. So "3M" is third order only before the asymptotic regime; on
        # a Gaussian test problem its global error falls like N^-2 for large N
        # (tests/test_samplers.py measures both slopes).
        z_next = (
            (sigma_n / sigma_c) * z
            - alpha_n * phi_1 * D0
            + alpha_n * (phi_1 / h + 1.0) * D1
            - alpha_n * ((phi_1 + h) / h**2 - 0.5) * D2
        )
    else:
        raise ValueError(f"DPM-Solver++ order {order} is not 1, 2 or 3")
    return z_next


def _lagrange_weight_at_zero(us: list[float], j: int) -> float:
    """The weight of point j in the value at u = 0 of the polynomial through the points us (Lagrange
    form)."""
    w = 1.0
    for m, u in enumerate(us):
        if m != j:
            w *= u / (u - us[j])  # (0 − u_m) / (u_j − u_m)
    return w


def dpm_solver_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    t: float,
    s: float,
    schedule: NoiseSchedule,
    state: SolverState,
    order: int = 2,
) -> torch.Tensor:
    """DPM-Solver++ multistep from t to s < t, with x̂_0 = (z_t − σ_t ε)/α_t (data prediction).

    order 1: z_s = (σ_s/σ_t) z_t − α_s (e^{−h} − 1) x̂_0(t), h = λ_s − λ_t — the same map as DDIM (η
    = 0). order 2: x̂_0(t) → D = (1 + 1/(2r)) x̂_0(t) − (1/(2r)) x̂_0(t_prev), r = h_prev/h.
    order 3: the 3M update with two previous predictions.
    To CLEAN, order k ≥ 2 extrapolates the k latest predictions to σ = 0 in u = σ²/α² (see the block
    comment); diffusers, and `dpm_solver_plan`, take that step at order 1.
    The order used is at most 1 + the number of predictions in `state` (warm-up; the DDIM steps'
    count too).
    """
    x0 = x0_from_eps(z, eps, t, schedule)
    return _dpm_solver_update(z, x0, t, s, schedule, state, order)


def dpm_solver_inversion_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    t: float,
    s: float,
    schedule: NoiseSchedule,
    state: SolverState,
    order: int = 2,
) -> torch.Tensor:
    """DPM-Solver++ inversion: the update above with the roles of t and s exchanged, z given at s,
    returns z at t. Explicit: x̂_0 is predicted at the current point s; `state` holds the
    predictions of the earlier (less noisy) inversion steps. From CLEAN (σ_s = 0) the first-order
    update is written in DDIM form, z_t = α_t x̂_0 + σ_t ε, the finite form of (σ_t/σ_s) z_s − α_t
    (e^{−h} − 1) x̂_0 there.
    """
    x0 = x0_from_eps(z, eps, s, schedule)
    if schedule.sigma(s) == 0.0:
        return schedule.alpha(t) * x0 + schedule.sigma(t) * eps
    return _dpm_solver_update(z, x0, s, t, schedule, state, order)


# ---- dispatch and the two loops ------------------------------------------------------------------


def hybrid_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    step: PlanStep,
    schedule: NoiseSchedule,
    state: SolverState,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    clip: Optional[float] = None,
) -> tuple[torch.Tensor, SolverState]:
    """The sampling step `step` names: DDIM or DPM-Solver++ from step.t to step.s. Returns the new z
    and the state with this step's prediction (x̂_0(t), λ_t) remembered. `clip` (`Plan.clip`) clamps
    a DDIM step's x̂_0, the remembered one too."""
    x0 = x0_from_eps(z, eps, step.t, schedule)
    if step.solver == DDIM:
        z_next = ddim_step(
            z, eps, step.t, step.s, schedule, eta=eta, generator=generator, clip=clip
        )
        x0 = _clipped(x0, clip)
    else:
        z_next = dpm_solver_step(z, eps, step.t, step.s, schedule, state, order=step.order)
    return z_next, state.remember(x0, schedule.lam(step.t))


def hybrid_inversion_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    step: PlanStep,
    schedule: NoiseSchedule,
    state: SolverState,
    clip: Optional[float] = None,
) -> tuple[torch.Tensor, SolverState]:
    """The inversion of `step`: the same solver, from step.s up to step.t, at
    `step.inversion_order`. Returns the new z and the state with this step's prediction (x̂_0(s),
    λ_s) remembered (clipped as in `hybrid_step`).

    The multistep history of an explicit inversion step is the x̂_0 of the preceding INVERSION steps
    (`state` as `invert_loop` threads it), predicted at less noisy points than this one; a sampling
    step's history is at noisier points. So a step and its inversion are exact inverses when x̂_0 is
    constant along the path (ε constant: every difference D1, D2 vanishes and both reduce to DDIM),
    not in general at order ≥ 2.
    """
    x0 = x0_from_eps(z, eps, step.s, schedule)
    if step.solver == DDIM:
        z_next = ddim_inversion_step(z, eps, step.t, step.s, schedule, clip=clip)
        x0 = _clipped(x0, clip)
    else:
        z_next = dpm_solver_inversion_step(
            z, eps, step.t, step.s, schedule, state, order=step.inversion_order
        )
    return z_next, state.remember(x0, schedule.lam(step.s))


# The model function of both loops: model_fn(z, timestep, i, land) -> the model's output at z.
#   timestep  what the network is told (the step's noisier end, rounded)
#   i         the plan's step index, 0 = the noisiest step, in both directions: controllers that act
# in a             window of steps (prompt-to-prompt, EditedID's gating) get it from here,
# explicitly
#   land      land(eps) -> the latent this step would land on with that ε, the solver's history
# included             (pure: the loop's state is immutable). A model function that aims at a target
# uses it             (null-text optimisation, inversion.py); most ignore it.
ModelFn = Callable[[torch.Tensor, int, int, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
# callback(i, timestep, z after the step, x̂_0 of the step) -> None, or a tensor that replaces z
# (blending, EditedID's mixing)
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def sample_loop(
    model_fn: ModelFn,
    z: torch.Tensor,
    plan: Plan,
    callback: Optional[Callback] = None,
    prediction_type: str = "epsilon",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """From z at the plan's first time to data: one model call and one step per plan step."""
    schedule, state = plan.schedule, SolverState()
    for i, step in enumerate(plan.steps):

        def land(eps, z=z, state=state, step=step):
            if plan.eta > 0:
                raise ValueError("land() needs a deterministic plan (η = 0)")
            return hybrid_step(z, eps, step, schedule, state, clip=plan.clip)[0]

        # 1. the model at the current point
        output = model_fn(z, step.timestep, i, land)
        eps = eps_from_model_output(output, z, step.t, schedule, prediction_type)
        # 2. one step to step.s
        z, state = hybrid_step(
            z, eps, step, schedule, state, eta=plan.eta, generator=generator, clip=plan.clip
        )
        # 3. the caller's look at the step, which may replace z
        if callback is not None:
            z = _replaced(callback(i, step.timestep, z, state.x0s[-1]), z)
    return z


def invert_loop(
    model_fn: ModelFn,
    z: torch.Tensor,
    plan: Plan,
    callback: Optional[Callback] = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """From data back to the plan's first time: the plan's steps in reverse, each one inverted. The
    model is evaluated at the current (less noisy) point and told the step's timestep (its noisier
    end)."""
    schedule, state = plan.schedule, SolverState()
    for i in reversed(range(len(plan.steps))):
        step = plan.steps[i]

        def land(eps, z=z, state=state, step=step):
            return hybrid_inversion_step(z, eps, step, schedule, state, clip=plan.clip)[0]

        # 1. the model at the current point, which lies at step.s
        output = model_fn(z, step.timestep, i, land)
        eps = eps_from_model_output(output, z, step.s, schedule, prediction_type)
        # 2. one step up to step.t
        z, state = hybrid_inversion_step(z, eps, step, schedule, state, clip=plan.clip)
        # 3. the caller's look at the step, which may replace z
        if callback is not None:
            z = _replaced(callback(i, step.timestep, z, state.x0s[-1]), z)
    return z


def _replaced(returned: Optional[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return z if returned is None else returned
