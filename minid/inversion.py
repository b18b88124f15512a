"""Inversion: from a clean latent to noise and back, faithfully.

Three procedures, in the order EditedID runs them (docs/editedid.md, Stages 1 and 2), each one pass of the one
sampling or inversion loop of samplers.py with its own model function and callback:

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

`reconstruct` is the guided pass z_T → z_0 with those embeddings (Stage 3 and text to image run it).

Steps are indexed as the plan indexes them, from pure noise: step i (0 … N−1) goes from pivots[N−i] to
pivots[N−i−1] when sampling; its inversion goes from pivots[N−i−1] to pivots[N−i] (same solver, same noise
levels: the symmetry constraint). The inversion runs i = N−1 … 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from minid.control import at_step
from minid.plans import Plan
from minid.samplers import cfg, invert_loop, sample_loop


@dataclass(frozen=True)
class MixingConfig:
    """Stage 1, adaptive mixing (EditedID Eq. 1-3; docs/editedid.md, Stage 1).

    The alignment loss is L(w) = (1−2w)²·D, D = mean((ẑ^O − ẑ^E)²). With `rule="normalised"` (the default)
    w descends L/D = (1−2w)², so its path does not depend on how far apart the pair is: the gap 0.5 − w
    shrinks by (1 − 8η) per step, and with `lr=None` η is set from N so that the gap left at the last free
    step is `reach` × the first (8η = 1 − reach^{1/(N−2)}: η = 0.066 at N = 6). `rule="raw"` descends L itself,
    whose steps scale with D: a pair that differs only in the face barely moves w before the forced 0.5.
    Decided on the exact-score testbed (bench/results/mixing_cpu.md).
    """

    w0: float = 0.04  # initial mixing weight; too large blends identities, too small leaves a jump at the end
    rule: Literal["normalised", "raw"] = "normalised"
    lr: float | None = None  # η; None: from N and `reach` (normalised), 0.05 (raw)
    # normalised rule with lr=None: the gap left at the last free step / the first gap. 0.05 keeps the forced
    # last step (w → 0.5) no larger than the first for every N ≤ 50; 0.2 scored 0.4 dB higher on the testbed at
    # N = 6 but ends with a larger jump from N = 10 on (bench/results/mixing_cpu.md)
    reach: float = 0.05
    iterations: int = 1  # gradient steps on w per inversion step
    w_max: float = 0.5  # w is projected onto [0, w_max] after each update, so it never overshoots 0.5

    def __post_init__(self):
        if self.rule not in ("normalised", "raw"):
            raise ValueError(f"MixingConfig.rule must be 'normalised' or 'raw', got {self.rule!r}")

    def step_size(self, num_steps: int) -> float:
        """η for a pass of `num_steps` steps."""
        if self.lr is not None:
            return self.lr
        if self.rule == "raw":
            return 0.05
        return (1.0 - self.reach ** (1.0 / max(num_steps - 2, 1))) / 8.0


@dataclass(frozen=True)
class NullTextConfig:
    """Stage 2, null-text optimisation (Mokady et al. 2023, their defaults for 50 steps)."""

    inner_steps: int = 10  # at most this many Adam updates of ∅_i per step
    lr: float = 1e-2  # Adam learning rate at the first step; decays as lr·(1 − i'/100)
    reference_steps: int = 50  # i' = i·reference_steps/N: the decay is scaled to the step count
    epsilon: float = 1e-5  # early stop when the loss < epsilon + i'·epsilon_growth, i' scaled as the lr's
    epsilon_growth: float = 2e-5
    # The loss is multiplied by this while its gradient crosses the UNet (and the gradient divided by it after):
    # an fp16 UNet's gradient of ∅ underflows without it (cosine to float64 0.93 at the first threshold, 0.99975
    # with 2^16; bench/results/precision_cpu.md); exact in float32
    loss_scale: float = 2.0 ** 16
    # "last": the authors' loop (null-text notebook): compute the loss, take the Adam step, then stop if that
    # loss was under the threshold; ∅_i is the last iterate. "best": check the loss before each update, stop
    # without applying it once under the threshold, and keep the ∅ with the lowest loss seen (one more loss
    # evaluation per step, one update fewer at every early-stopped step).
    keep: Literal["last", "best"] = "last"

    def __post_init__(self):
        if self.keep not in ("last", "best"):
            raise ValueError(f"NullTextConfig.keep must be 'last' or 'best', got {self.keep!r}")


def guided_eps(unet, z: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
               controller=None) -> torch.Tensor:
    """ε̃ = ε(∅) + s (ε(c) − ε(∅)) with both halves in one batch [uncond; cond] (the controllers' layout);
    scale 1 is ε(c) alone, one UNet call on the conditional half."""
    if scale == 1.0:
        return unet(z, t, cond, controller=controller)
    both = unet(torch.cat([z, z]), t, torch.cat([uncond, cond]), controller=controller)
    e_u, e_c = both.chunk(2)
    return cfg(e_u, e_c, scale)


# --------------------------------------------------------------------------------------------------------
# Plain inversion and reconstruction


@torch.no_grad()
def invert(unet, plan: Plan, z0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None,
           guidance: float = 1.0, progress: Callable | None = None) -> list[torch.Tensor]:
    """DDIM / hybrid inversion z_0 → z_N. Returns the N+1 latents (pivots), each (B, 4, h, w)."""
    pivots = [z0]

    def model(z, t, i, land):
        return guided_eps(unet, z, t, cond, uncond, guidance)

    def record(i, t, z, x0):
        pivots.append(z)
        if progress:
            progress()

    invert_loop(model, z0, plan, callback=record)
    return pivots


@torch.no_grad()
def reconstruct(unet, plan: Plan, z_T: torch.Tensor, cond: torch.Tensor, null_embeddings, guidance: float,
                controller=None, on_step: Callable | None = None) -> list[torch.Tensor]:
    """Guided reconstruction z_T → z_0 with per-step ∅ (a list of (B, 77, D)) or one fixed (B, 77, D).

    The UNet batch is [uncond; cond] (`BatchLayout(B, cfg=True)`); the controller is called with the step
    index (`at_step`). `on_step(i, z)` may return a new z (blending). Returns z_T … z_0.
    """
    latents = [z_T]

    def model(z, t, i, land):
        null = null_embeddings[i] if isinstance(null_embeddings, (list, tuple)) else null_embeddings
        return guided_eps(unet, z, t, cond, null, guidance, at_step(controller, i))

    def record(i, t, z, x0):
        if on_step is not None:
            z = on_step(i, z)
        latents.append(z)
        return z

    sample_loop(model, z_T, plan, callback=record)
    return latents


# --------------------------------------------------------------------------------------------------------
# Stage 1: adaptive mixing


@dataclass
class AlignmentResult:
    """Stage 1's result for K pairs (O_k, E_k), k = 0 … K−1, inverted in one batch."""

    pivots_o: list[torch.Tensor]  # z^O_0 … z^O_N after mixing, each (K, 4, h, w)
    pivots_e: list[torch.Tensor]  # z^E_0 … z^E_N; pivots_o[-1] and pivots_e[-1] are the same tensor values
    w_schedules: list[list[float]]  # per pair, the w each of the N steps mixed with: w_0, …, 0.5
    alignment_losses: list[list[float]]  # per pair, L(w) = (1−2w)² mean((ẑ^O − ẑ^E)²) at each step
    differences: list[list[float]] = field(default_factory=list)  # per pair, D = mean((ẑ^O − ẑ^E)²) per step

    @property
    def z_T(self) -> torch.Tensor:
        return self.pivots_o[-1]


def adaptive_mixing_inversion(unet, plan: Plan, z0_o: torch.Tensor, z0_e: torch.Tensor, cond_o: torch.Tensor,
                              cond_e: torch.Tensor, mixing: MixingConfig | None = MixingConfig(),
                              progress: Callable | None = None) -> AlignmentResult:
    """Invert K pairs (O_k, E_k) together (one batched UNet call per step) and align each (EditedID Eq. 1-3).

    z0_o, z0_e: (K, 4, h, w); cond_o, cond_e: (K, 77, D). At each step each image takes its own inversion
    step (ẑ^O, ẑ^E), then each pair is mixed with its own current w:
        z^O = (1−w) ẑ^O + w ẑ^E,   z^E = (1−w) ẑ^E + w ẑ^O
    then w takes `mixing.iterations` gradient steps on the pair's alignment loss
        L(w) = mean(((1−w) ẑ^O + w ẑ^E − ((1−w) ẑ^E + w ẑ^O))²) = (1−2w)² mean((ẑ^O − ẑ^E)²),
    whose minimum is w = 0.5. The last step uses w = 0.5 (constrained convergence, Eq. 3), so the two
    trajectories end at the same z_T exactly. `mixing=None` inverts the images separately (w = 0).
    Pairs share nothing but the UNet batch: each has its own w and optimiser, so K pairs give what K
    separate calls give (up to the UNet's batch-size-dependent rounding).
    """
    k_pairs = z0_o.shape[0]
    if z0_e.shape[0] != k_pairs or cond_o.shape[0] != k_pairs or cond_e.shape[0] != k_pairs:
        raise ValueError(f"inversion.py: adaptive_mixing_inversion needs as many rows in z0_o, z0_e, cond_o, cond_e; "
                         f"found {z0_o.shape[0]}, {z0_e.shape[0]}, {cond_o.shape[0]}, {cond_e.shape[0]}")
    cond = torch.cat([cond_o, cond_e])  # rows 0..K−1 are O_k, rows K..2K−1 are E_k
    w0 = mixing.w0 if mixing is not None else 0.0
    w = [torch.tensor(float(w0), dtype=torch.float64, requires_grad=True) for _ in range(k_pairs)]
    lr = mixing.step_size(len(plan.steps)) if mixing is not None else 0.0
    opts = [torch.optim.SGD([w_k], lr=lr) for w_k in w]
    result = AlignmentResult([z0_o], [z0_e], [[] for _ in range(k_pairs)], [[] for _ in range(k_pairs)],
                             [[] for _ in range(k_pairs)])

    def model(z, t, i, land):
        with torch.no_grad():
            return unet(z, t, cond)

    def mix(i, t, z_hat, x0):
        last = i == 0  # the inversion runs the plan backwards: step 0 is its last, to z_T
        mixed_o, mixed_e = [], []
        for k in range(k_pairs):
            zo, ze = z_hat[k:k + 1], z_hat[k_pairs + k:k_pairs + k + 1]
            w_j = 0.0 if mixing is None else (0.5 if last else float(w[k].detach()))  # Eq. 3 at the last step
            if w_j == 0.5:
                # Computed once and copied, so that z_T^O and z_T^E are equal bit for bit.
                zo_m = 0.5 * zo + 0.5 * ze
                ze_m = zo_m.clone()
            else:
                zo_m = (1 - w_j) * zo + w_j * ze
                ze_m = (1 - w_j) * ze + w_j * zo
            d = float(((zo - ze).double() ** 2).mean())
            result.w_schedules[k].append(w_j)
            result.alignment_losses[k].append((1 - 2 * w_j) ** 2 * d)
            result.differences[k].append(d)
            mixed_o.append(zo_m)
            mixed_e.append(ze_m)
            scale = 1.0 if mixing is None or mixing.rule == "raw" else d  # normalised: L / D = (1 − 2w)²
            if mixing is not None and not last and scale > 0:
                zo_d, ze_d = zo.double(), ze.double()
                for _ in range(mixing.iterations):
                    opts[k].zero_grad()
                    loss = (((1 - w[k]) * zo_d + w[k] * ze_d - ((1 - w[k]) * ze_d + w[k] * zo_d)) ** 2).mean() / scale
                    loss.backward()
                    opts[k].step()
                    with torch.no_grad():
                        w[k].clamp_(0.0, mixing.w_max)
        zo_m, ze_m = torch.cat(mixed_o), torch.cat(mixed_e)  # (K, 4, h, w) each
        result.pivots_o.append(zo_m)
        result.pivots_e.append(ze_m)
        if progress:
            progress()
        return torch.cat([zo_m, ze_m])

    invert_loop(model, torch.cat([z0_o, z0_e]), plan, callback=mix)
    return result


# --------------------------------------------------------------------------------------------------------
# Stage 2: null-text optimisation


@dataclass
class NullTextStep:
    """What happened at one reconstruction step, per image of the batch."""

    initial_loss: list[float]  # loss with the warm-started ∅ (the previous step's result)
    final_loss: list[float]  # keep="best": the loss of the ∅ kept; "last": the last loss computed (before its update)
    iterations: list[int]  # Adam updates made
    threshold: float  # the early-stop threshold of this step
    reached_threshold: list[bool]

    def rows(self, rows: list[int]) -> "NullTextStep":
        """The same statistics for some images of the batch."""
        return NullTextStep([self.initial_loss[r] for r in rows], [self.final_loss[r] for r in rows],
                            [self.iterations[r] for r in rows], self.threshold,
                            [self.reached_threshold[r] for r in rows])


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


def null_text_optimization(unet, plan: Plan, pivots: list[torch.Tensor], cond: torch.Tensor,
                           uncond: torch.Tensor, guidance: float, config: NullTextConfig = NullTextConfig(),
                           z_T: torch.Tensor | None = None, observer=None,
                           progress: Callable | None = None) -> NullTextResult:
    """Optimise one ∅ per step and per image so that guided reconstruction follows `pivots`.

    pivots: N+1 latents (B, 4, h, w), z_0 first (as `invert` returns them). cond: (B, 77, D) prompt
    embeddings. uncond: (1 or B, 77, D) starting ∅ (the embedding of ""). guidance: s of ε̃. z_T: the start
    (default pivots[-1]). observer: a controller attached to the conditional UNet call of each step (e.g. an
    `AttentionStore`), which sees the final reconstruction's cross-attention.

    Per step i (Mokady et al. 2023, Alg. 1): ε(z_i, t_i, c) once without gradient; then up to
    `inner_steps` Adam updates of ∅ on Σ_k mse(Step_i(z_i, ε̃), pivot), lr = lr·(1 − i'/100) with
    i' = i·reference_steps/N; an image stops when its loss < epsilon + i·epsilon_growth, by the rule of
    `config.keep` (default: the authors' — the update of the iteration whose loss stops it is still applied,
    and the last iterate is kept). ∅_{i+1} starts from ∅_i. Then z advances with the kept ∅: the model
    function returns ε̃ with it, and the loop takes the step.
    """
    n = len(plan.steps)
    if len(pivots) != n + 1:
        raise ValueError(f"inversion.py: null_text_optimization needs N+1 = {n + 1} pivots, got {len(pivots)}")
    b = cond.shape[0]
    z_start = (pivots[-1] if z_T is None else z_T).detach()
    result = NullTextResult([], [z_start])
    null = uncond.detach().expand(b, -1, -1).clone()  # (B, 77, D), warm start for step 0
    keep_best = config.keep == "best"

    def model(z, t, i, land):
        nonlocal null
        target = pivots[n - i - 1].detach()
        with torch.no_grad():
            e_c = unet(z, t, cond, controller=at_step(observer, i))
        lr = config.lr * (1.0 - i * config.reference_steps / n / 100.0)
        threshold = config.epsilon + i * config.reference_steps / n * config.epsilon_growth  # i scaled as the lr
        # fp32 master copies: Adam's small steps would be lost in a half-precision embedding
        master = torch.promote_types(null.dtype, torch.float32)
        params = [null[k:k + 1].to(master).clone().requires_grad_(True) for k in range(b)]
        opt = torch.optim.Adam(params, lr=lr)
        best = [p.detach().clone() for p in params]
        initial = [float("nan")] * b  # nan: no loss computed (inner_steps = 0)
        final = [float("inf") if keep_best else float("nan")] * b
        active = [True] * b
        iterations = [0] * b
        for it in range(config.inner_steps + (1 if keep_best else 0)):
            e_u = unet(z, t, torch.cat(params).to(cond.dtype))
            loss_k = _per_image_mse(land(cfg(e_u, e_c, guidance)).to(master), target.to(master))  # (B,)
            values = loss_k.detach().tolist()
            live = [k for k in range(b) if active[k]]
            for k in live:
                if it == 0:
                    initial[k] = values[k]
                if keep_best:  # stop before the update, keeping the lowest loss seen
                    if values[k] < final[k]:
                        final[k], best[k] = values[k], params[k].detach().clone()
                    if values[k] < threshold:
                        active[k] = False
                else:
                    final[k] = values[k]
            live = [k for k in live if active[k]]
            if not live or it == config.inner_steps:
                break
            # Eq. 4: one loss summed over the images. autograd.grad (not backward) differentiates with respect
            # to the embeddings only, so UNet weights that require grad get no gradient computed or stored.
            # The loss is scaled while its gradient crosses the UNet, so that a half-precision UNet's small
            # gradients do not underflow (exact in float32: a power of two), and unscaled on the embeddings.
            grads = torch.autograd.grad(loss_k.sum() * config.loss_scale, [params[k] for k in live])
            grads = [g / config.loss_scale for g in grads]
            for k in range(b):
                params[k].grad = None  # Adam skips parameters without a gradient: the stopped images
            for k, g in zip(live, grads):
                params[k].grad = g
                iterations[k] += 1
            opt.step()
            if not keep_best:  # the authors' rule: the loss computed before this update stops the image
                for k in live:
                    if values[k] < threshold:
                        active[k] = False
                if not any(active):
                    break
        kept = best if keep_best else [p.detach() for p in params]
        null = torch.cat(kept).detach().to(cond.dtype)
        result.null_embeddings.append(null)
        result.steps.append(NullTextStep(initial, final, iterations, threshold, [v < threshold for v in final]))
        with torch.no_grad():
            return cfg(unet(z, t, null), e_c, guidance)

    def record(i, t, z, x0):
        result.latents.append(z)
        if progress:
            progress()

    sample_loop(model, z_start, plan, callback=record)
    return result
