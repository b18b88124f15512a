"""Inversion: from a clean latent to noise and back, faithfully.

Three procedures, in the order EditedID runs them (ALGORITHM.md, Stages 1 and 2):

- `invert`: DDIM (or hybrid-solver) inversion with guidance 1, conditional prompt only. Returns the
  trajectory z_0 … z_N ("pivots").
- `adaptive_mixing_inversion`: both images inverted in one batch; after each step the two latents are mixed
  with a learnable weight w (EditedID Eq. 1-3) that gradient descent drives from w_0 toward 0.5, and the
  last step forces w = 0.5 so both trajectories end at one shared z_T. Several pairs may share the batch
  (multi-person restoration), each with its own w.
- `null_text_optimization`: null-text inversion (Mokady et al. 2023). Going back from z_T with guidance s,
  at each step i a per-step unconditional embedding ∅_i is optimised so that the guided step lands on the
  pivot: ∅_i = argmin ||Step_i(z_i, ε̃(z_i, t_i; c, ∅_i)) − pivot_{i+1}||². With several images in the batch
  the loss is the sum over images (EditedID Eq. 4, "dual null-text"); each image keeps its own ∅ and its own
  early stop, so a batch of non-interacting images gives what separate runs give.

Steps are counted from pure noise: reconstruction step i (0 … N−1) goes from pivots[N−i] to pivots[N−i−1];
inversion step j (0 … N−1) goes from pivots[j] to pivots[j+1]. Inversion step j mirrors reconstruction step
N−1−j (same solver, same noise levels: the symmetry constraint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from minid.samplers import (HybridSchedule, Plan, SolverState, ddim_plan, hybrid_inversion_step, hybrid_plan,
                            hybrid_step)
from minid.schedule import NoiseSchedule


class SolverPlan:
    """A `samplers.Plan` indexed the way the loops here count: reconstruction step i = plan.steps[i],
    inversion step j = plan.steps[N−1−j] run backwards. Steps return a new `SolverState` instead of
    appending to the given one, so a step can be tried many times (null-text's inner loop) without side
    effects."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.schedule = plan.schedule
        self.num_steps = len(plan.steps)

    @staticmethod
    def initial_state() -> SolverState:
        return SolverState()

    @staticmethod
    def _copy(state: SolverState) -> SolverState:
        return SolverState(list(state.x0s), list(state.lams), state.keep)

    def eval_time(self, i: int) -> int:
        """The timestep the model is told at reconstruction step i."""
        return self.plan.steps[i].timestep

    def invert_eval_time(self, j: int) -> int:
        """The timestep the model is told at inversion step j (the mirrored step's label)."""
        return self.plan.steps[self.num_steps - 1 - j].timestep

    def step(self, i: int, z: torch.Tensor, eps: torch.Tensor, state: SolverState):
        state = self._copy(state)
        return hybrid_step(z, eps, self.plan.steps[i], self.schedule, state), state

    def invert_step(self, j: int, z: torch.Tensor, eps: torch.Tensor, state: SolverState):
        state = self._copy(state)
        step = self.plan.steps[self.num_steps - 1 - j]
        return hybrid_inversion_step(z, eps, step, self.schedule, state), state


def make_plan(schedule: NoiseSchedule, num_steps: int, dpm_steps: tuple[int, int] | None = (5, 6),
              global_presetting: bool = True, dpm_spacing: str = "logSNR", dpm_order: int = 2) -> SolverPlan:
    """DDIM only (`dpm_steps=None`) or the hybrid solver with DPM-Solver++ on steps dpm_steps[0]..[1]."""
    if dpm_steps is None:
        return SolverPlan(ddim_plan(schedule, num_steps))
    hybrid = HybridSchedule(num_steps=num_steps, dpm_start=dpm_steps[0], dpm_end=dpm_steps[1],
                            timesteps="global" if global_presetting else "fragmented", dpm_spacing=dpm_spacing,
                            dpm_order=dpm_order)
    return SolverPlan(hybrid_plan(schedule, hybrid))


@dataclass(frozen=True)
class InversionConfig:
    """Every tunable of Stages 1 and 2 (defaults: ALGORITHM.md and the null-text paper)."""

    num_steps: int = 6  # N, diffusion steps of inversion and of reconstruction (EditedID: 6)
    solver: Literal["hybrid", "ddim"] = "hybrid"  # "ddim": DDIM only (the "no disentanglement" ablation)
    dpm_start: int = 5  # τ_s: first reconstruction step (1-based, from noise) run by DPM-Solver++
    dpm_end: int = 6  # τ_e: last such step; DDIM runs the others
    global_presetting: bool = True  # False: "fragmented" schedule, each solver's own shorter sequence
    dpm_spacing: Literal["logSNR", "linspace"] = "logSNR"  # DPM-Solver++ timestep sequence (paper A.4)
    dpm_order: int = 2  # DPM-Solver++ multistep order
    guidance: float = 7.5  # s, classifier-free guidance scale of reconstruction
    inversion_guidance: float = 1.0  # guidance of inversion: 1 = conditional prediction only
    # Null-text optimisation (Mokady et al. 2023, their defaults for 50 steps).
    inner_steps: int = 10  # at most this many Adam updates of ∅_i per step
    lr: float = 1e-2  # Adam learning rate at the first step; decays as lr·(1 − i'/100)
    reference_steps: int = 50  # i' = i·reference_steps/N: the decay is scaled to the step count
    epsilon: float = 1e-5  # early stop when the loss < epsilon + i·epsilon_growth
    epsilon_growth: float = 2e-5
    # Adaptive mixing (EditedID Eq. 1-3).
    w0: float = 0.04  # initial mixing weight; too large blends identities, too small leaves a jump at the end
    w_lr: float = 0.05  # gradient-descent step on L(w) = (1−2w)² D; with D ≈ 1 (two portraits' latents)
    #                     the gap to 0.5 shrinks by about 40 % per step (1 − 8·w_lr·D)
    w_iterations: int = 1  # gradient steps on w per inversion step
    w_max: float = 0.5  # w is projected onto [0, w_max] after each update, so it never overshoots 0.5

    def plan(self, schedule: NoiseSchedule) -> SolverPlan:
        """The per-step solver and timesteps of reconstruction (inversion uses the mirror image)."""
        dpm = (self.dpm_start, self.dpm_end) if self.solver == "hybrid" else None
        return make_plan(schedule, self.num_steps, dpm_steps=dpm, global_presetting=self.global_presetting,
                         dpm_spacing=self.dpm_spacing, dpm_order=self.dpm_order)


EpsFn = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]


def unet_eps(unet, controller=None) -> EpsFn:
    """ε(z, t, context) from a UNet, optionally with a controller attached."""
    def eps(z, t, context):
        return unet(z, t, context, controller=controller)
    return eps


def guided_eps(unet, z: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, scale: float,
               controller=None) -> torch.Tensor:
    """ε̃ = ε(∅) + s (ε(c) − ε(∅)) with both halves in one batch [uncond; cond] (the controllers' layout)."""
    if scale == 1.0:
        return unet(z, t, cond, controller=controller)
    both = unet(torch.cat([z, z]), t, torch.cat([uncond, cond]), controller=controller)
    e_u, e_c = both.chunk(2)
    return e_u + scale * (e_c - e_u)


# --------------------------------------------------------------------------------------------------------
# Plain inversion


@torch.no_grad()
def invert(unet, plan: SolverPlan, z0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None,
           guidance: float = 1.0, progress: Callable | None = None) -> list[torch.Tensor]:
    """DDIM / hybrid inversion z_0 → z_N. Returns the N+1 latents (pivots), each (B, 4, h, w)."""
    z, state = z0, plan.initial_state()
    pivots = [z0]
    for j in range(plan.num_steps):
        t = plan.invert_eval_time(j)
        eps = guided_eps(unet, z, t, cond, uncond, guidance) if guidance != 1.0 else unet(z, t, cond)
        z, state = plan.invert_step(j, z, eps, state)
        pivots.append(z)
        if progress:
            progress()
    return pivots


# --------------------------------------------------------------------------------------------------------
# Stage 1: adaptive mixing


@dataclass
class AlignmentResult:
    """Stage 1's result for K pairs (O_k, E_k), k = 0 … K−1, inverted in one batch."""

    pivots_o: list[torch.Tensor]  # z^O_0 … z^O_N after mixing, each (K, 4, h, w)
    pivots_e: list[torch.Tensor]  # z^E_0 … z^E_N; pivots_o[-1] and pivots_e[-1] are the same tensor values
    w_schedules: list[list[float]]  # per pair, the w each of the N steps mixed with: w_0, …, 0.5
    alignment_losses: list[list[float]]  # per pair, L(w) = (1−2w)² mean((ẑ^O − ẑ^E)²) at each step

    @property
    def z_T(self) -> torch.Tensor:
        return self.pivots_o[-1]

    def _one(self, values: list[list[float]], name: str) -> list[float]:
        if len(values) != 1:
            raise ValueError(f"inversion.py: AlignmentResult.{name} is for one pair; this result has "
                             f"{len(values)}, read {name}s[k]")
        return values[0]

    @property
    def w_schedule(self) -> list[float]:
        """The w schedule of a single pair (K = 1)."""
        return self._one(self.w_schedules, "w_schedule")

    @property
    def alignment_loss(self) -> list[float]:
        """The alignment losses of a single pair (K = 1)."""
        return self._one(self.alignment_losses, "alignment_loss")


def adaptive_mixing_inversion(unet, plan: SolverPlan, z0_o: torch.Tensor, z0_e: torch.Tensor,
                              cond_o: torch.Tensor, cond_e: torch.Tensor, config: InversionConfig,
                              mixing: bool = True, progress: Callable | None = None) -> AlignmentResult:
    """Invert K pairs (O_k, E_k) together (one batched UNet call per step) and align each (EditedID Eq. 1-3).

    z0_o, z0_e: (K, 4, h, w); cond_o, cond_e: (K, 77, D). At step j each image takes its own inversion
    step (ẑ^O, ẑ^E), then each pair is mixed with its own current w:
        z^O = (1−w) ẑ^O + w ẑ^E,   z^E = (1−w) ẑ^E + w ẑ^O
    then w takes `w_iterations` gradient steps on the pair's alignment loss
        L(w) = mean(((1−w) ẑ^O + w ẑ^E − ((1−w) ẑ^E + w ẑ^O))²) = (1−2w)² mean((ẑ^O − ẑ^E)²),
    whose minimum is w = 0.5. The last step uses w = 0.5 (constrained convergence, Eq. 3), so the two
    trajectories end at the same z_T exactly. `mixing=False` inverts the images separately (w = 0).
    Pairs share nothing but the UNet batch: each has its own w and optimiser, so K pairs give what K
    separate calls give (up to the UNet's batch-size-dependent rounding).
    """
    k_pairs = z0_o.shape[0]
    if z0_e.shape[0] != k_pairs or cond_o.shape[0] != k_pairs or cond_e.shape[0] != k_pairs:
        raise ValueError(f"inversion.py: adaptive_mixing_inversion needs as many rows in z0_o, z0_e, cond_o, cond_e; "
                         f"found {z0_o.shape[0]}, {z0_e.shape[0]}, {cond_o.shape[0]}, {cond_e.shape[0]}")
    z = torch.cat([z0_o, z0_e])  # (2K, 4, h, w): rows 0..K−1 are O_k, rows K..2K−1 are E_k
    cond = torch.cat([cond_o, cond_e])
    w = [torch.tensor(float(config.w0), dtype=torch.float64, requires_grad=True) for _ in range(k_pairs)]
    opts = [torch.optim.SGD([w_k], lr=config.w_lr) for w_k in w]
    state = plan.initial_state()
    pivots_o, pivots_e = [z0_o], [z0_e]
    ws: list[list[float]] = [[] for _ in range(k_pairs)]
    losses: list[list[float]] = [[] for _ in range(k_pairs)]
    n = plan.num_steps
    for j in range(n):
        t = plan.invert_eval_time(j)
        with torch.no_grad():
            eps = unet(z, t, cond)
            z_hat, state = plan.invert_step(j, z, eps, state)
        mixed_o, mixed_e = [], []
        for k in range(k_pairs):
            zo, ze = z_hat[k:k + 1], z_hat[k_pairs + k:k_pairs + k + 1]
            if not mixing:
                w_j = 0.0
            elif j == n - 1:
                w_j = 0.5  # Eq. 3: both trajectories meet at z_T
            else:
                w_j = float(w[k].detach())
            if w_j == 0.5:
                # Computed once and copied, so that z_T^O and z_T^E are equal bit for bit.
                zo_m = 0.5 * zo + 0.5 * ze
                ze_m = zo_m.clone()
            else:
                zo_m = (1 - w_j) * zo + w_j * ze
                ze_m = (1 - w_j) * ze + w_j * zo
            d = float(((zo - ze).double() ** 2).mean())
            ws[k].append(w_j)
            losses[k].append((1 - 2 * w_j) ** 2 * d)
            mixed_o.append(zo_m)
            mixed_e.append(ze_m)
            if mixing and j < n - 1:
                zo_d, ze_d = zo.double(), ze.double()
                for _ in range(config.w_iterations):
                    opts[k].zero_grad()
                    loss = (((1 - w[k]) * zo_d + w[k] * ze_d - ((1 - w[k]) * ze_d + w[k] * zo_d)) ** 2).mean()
                    loss.backward()
                    opts[k].step()
                    with torch.no_grad():
                        w[k].clamp_(0.0, config.w_max)
        zo_m, ze_m = torch.cat(mixed_o), torch.cat(mixed_e)  # (K, 4, h, w) each
        pivots_o.append(zo_m)
        pivots_e.append(ze_m)
        z = torch.cat([zo_m, ze_m])
        if progress:
            progress()
    return AlignmentResult(pivots_o, pivots_e, ws, losses)


# --------------------------------------------------------------------------------------------------------
# Stage 2: null-text optimisation


@dataclass
class NullTextStep:
    """What happened at one reconstruction step, per image of the batch."""

    initial_loss: list[float]  # loss with the warm-started ∅ (the previous step's result)
    final_loss: list[float]  # loss with the ∅ kept (the best seen)
    iterations: list[int]  # Adam updates made
    threshold: float  # the early-stop threshold of this step
    reached_threshold: list[bool]


@dataclass
class NullTextResult:
    null_embeddings: list[torch.Tensor]  # per step i: (B, 77, D), the optimised ∅_i of each image
    latents: list[torch.Tensor]  # reconstruction z_N … z_0 with the optimised ∅ (B, 4, h, w each)
    steps: list[NullTextStep] = field(default_factory=list)

    @property
    def z0(self) -> torch.Tensor:
        return self.latents[-1]


def _per_image_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)  # (B,)


def null_text_optimization(unet, plan: SolverPlan, pivots: list[torch.Tensor], cond: torch.Tensor,
                           uncond: torch.Tensor, config: InversionConfig, z_T: torch.Tensor | None = None,
                           observer=None, progress: Callable | None = None) -> NullTextResult:
    """Optimise one ∅ per step and per image so that guided reconstruction follows `pivots`.

    pivots: N+1 latents (B, 4, h, w), z_0 first (as `invert` returns them). cond: (B, 77, D) prompt
    embeddings. uncond: (1 or B, 77, D) starting ∅ (the embedding of ""). z_T: the start (default
    pivots[-1]). observer: a controller attached to the conditional UNet call of each step (e.g. an
    `AttentionStore`), which sees the final reconstruction's cross-attention.

    Per step i (Mokady et al. 2023, Alg. 1): ε(z_i, t_i, c) once without gradient; then up to
    `inner_steps` Adam updates of ∅ on Σ_k mse(Step_i(z_i, ε̃), pivot), lr = lr·(1 − i'/100) with
    i' = i·reference_steps/N; an image stops when its loss < epsilon + i·epsilon_growth. The ∅ kept for an
    image is the one with its lowest loss seen. ∅_{i+1} starts from ∅_i. Then z advances with the kept ∅.
    """
    n = plan.num_steps
    if len(pivots) != n + 1:
        raise ValueError(f"inversion.py: null_text_optimization needs N+1 = {n + 1} pivots, got {len(pivots)}")
    b = cond.shape[0]
    null = uncond.detach().expand(b, -1, -1).clone()  # (B, 77, D), warm start for step 0
    z = (pivots[-1] if z_T is None else z_T).detach()
    state = plan.initial_state()
    result = NullTextResult([], [z])
    for i in range(n):
        t = plan.eval_time(i)
        target = pivots[n - i - 1].detach()
        with torch.no_grad():
            e_c = unet(z, t, cond, controller=observer)
        scale = config.guidance
        i_ref = i * config.reference_steps / n
        lr = config.lr * (1.0 - i_ref / 100.0)
        threshold = config.epsilon + i * config.epsilon_growth
        # fp32 master copies: Adam's small steps would be lost in a half-precision embedding
        master = torch.promote_types(null.dtype, torch.float32)
        params = [null[k:k + 1].to(master).clone().requires_grad_(True) for k in range(b)]
        opt = torch.optim.Adam(params, lr=lr)
        best = [p.detach().clone() for p in params]
        best_loss = [float("inf")] * b
        initial = [0.0] * b
        active = [True] * b
        iterations = [0] * b
        for it in range(config.inner_steps + 1):
            e_u = unet(z, t, torch.cat(params).to(cond.dtype))
            eps = e_u + scale * (e_c - e_u)
            z_prev, _ = plan.step(i, z, eps, state)
            loss_k = _per_image_mse(z_prev.to(master), target.to(master))  # (B,)
            values = loss_k.detach().tolist()
            for k in range(b):
                if it == 0:
                    initial[k] = values[k]
                if active[k] and values[k] < best_loss[k]:
                    best_loss[k] = values[k]
                    best[k] = params[k].detach().clone()
                if active[k] and values[k] < threshold:
                    active[k] = False  # early stop: this image keeps the ∅ that reached the threshold
            if it == config.inner_steps or not any(active):
                break
            # Eq. 4: one loss summed over the images. autograd.grad (not backward) differentiates with respect
            # to the embeddings only, so UNet weights that require grad get no gradient computed or stored.
            live = [k for k in range(b) if active[k]]
            grads = torch.autograd.grad(loss_k.sum(), [params[k] for k in live])
            for k in range(b):
                params[k].grad = None  # Adam skips parameters without a gradient: the stopped images
            for k, g in zip(live, grads):
                params[k].grad = g
                iterations[k] += 1
            opt.step()
        null = torch.cat(best).detach().to(cond.dtype)
        with torch.no_grad():
            e_u = unet(z, t, null)
            z, state = plan.step(i, z, e_u + scale * (e_c - e_u), state)
        result.null_embeddings.append(null)
        result.latents.append(z)
        result.steps.append(NullTextStep(initial, best_loss, iterations, threshold,
                                         [v < threshold for v in best_loss]))
        if progress:
            progress()
    return result


@torch.no_grad()
def reconstruct(unet, plan: SolverPlan, z_T: torch.Tensor, cond: torch.Tensor, null_embeddings,
                guidance: float, controller=None, on_step: Callable | None = None) -> list[torch.Tensor]:
    """Guided reconstruction z_T → z_0 with per-step ∅ (a list of (B, 77, D)) or one fixed (B, 77, D).

    The UNet batch is [uncond; cond] (`BatchLayout(B, cfg=True)`). `on_step(i, z)` may return a new z
    (used for blending); a controller with a `step` attribute gets the step index before each call.
    """
    z, state = z_T, plan.initial_state()
    latents = [z]
    for i in range(plan.num_steps):
        null = null_embeddings[i] if isinstance(null_embeddings, (list, tuple)) else null_embeddings
        if controller is not None and hasattr(controller, "step"):
            controller.step = i
        eps = guided_eps(unet, z, plan.eval_time(i), cond, null, guidance, controller)
        z, state = plan.step(i, z, eps, state)
        if on_step is not None:
            z = on_step(i, z)
        latents.append(z)
    return latents


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of two images in [-1, 1] (range 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range ** 2 / mse)).item()
