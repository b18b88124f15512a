"""Stage 2 of EditedID: null-text inversion (Mokady et al. 2023) of both images (paper Eq. 4, "dual
null-text").

Going back from z_T with guidance s, at each step i a per-step unconditional embedding ∅_i is
optimised so that the guided step lands on the pivot: ∅_i = argmin ||Step_i(z_i, ε̃(z_i, t_i; c,
∅_i)) − pivot_{i+1}||². With several images in the batch the loss is the sum over images; each image
keeps its own ∅ and its own early stop, so a batch of non-interacting images gives what separate
runs give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import math

import torch

from minid.models.attention import at_step
from minid.sampling.plans import Plan
from minid.sampling.samplers import cfg, sample_loop


@dataclass(frozen=True)
class NullTextConfig:
    """Stage 2, null-text optimisation (Mokady et al. 2023, their defaults for 50 steps)."""

    inner_steps: int = 10  # at most this many Adam updates of ∅_i per step
    lr: float = 1e-2  # Adam learning rate at the first step; decays as lr·(1 − i'/100)
    reference_steps: int = 50  # i' = i·reference_steps/N: the decay is scaled to the step count
    # early stop when the loss < epsilon + i'·epsilon_growth, i' scaled as the lr's
    epsilon: float = 1e-5
    epsilon_growth: float = 2e-5
    # The loss is multiplied by this while its gradient crosses the UNet (and the gradient divided
    # by it after): an fp16 UNet's gradient of ∅ underflows without it (cosine to float64 0.93 at
    # the first threshold, 0.99975 with 2^16; bench/results/precision_cpu.md); exact in float32.
    # It is the starting scale of dynamic loss scaling, as torch's GradScaler does it: an update
    # whose gradient is not finite is skipped and the scale halved; after `scale_growth_interval`
    # clean updates in a row the scale doubles. Powers of two keep float32 runs exact.
    loss_scale: float = 2.0**16
    scale_growth_interval: int = 20
    # "last": the authors' loop (null-text notebook): compute the loss, take the Adam step, then
    # stop if that loss was under the threshold; ∅_i is the last iterate. "best": check the loss
    # before each update, stop without applying it once under the threshold, and keep the ∅ with the
    # lowest loss seen (one more loss evaluation per step, one update fewer at every early-stopped
    # step).
    keep: Literal["last", "best"] = "last"

    def __post_init__(self):
        if self.keep not in ("last", "best"):
            raise ValueError(f"NullTextConfig.keep must be 'last' or 'best', got {self.keep!r}")
        if not (self.loss_scale > 0 and math.isfinite(self.loss_scale)):
            raise ValueError(
                f"NullTextConfig.loss_scale must be a positive finite number, got {self.loss_scale}"
            )
        if self.scale_growth_interval < 1:
            raise ValueError(
                "NullTextConfig.scale_growth_interval must be at least 1, got "
                f"{self.scale_growth_interval}"
            )


@dataclass
class NullTextStep:
    """What happened at one reconstruction step, per image of the batch."""

    initial_loss: list[float]  # loss with the warm-started ∅ (the previous step's result)
    # keep="best": the loss of the ∅ kept; "last": the last loss computed (before its update)
    final_loss: list[float]
    iterations: list[int]  # Adam updates made
    threshold: float  # the early-stop threshold of this step
    reached_threshold: list[bool]

    def rows(self, rows: list[int]) -> "NullTextStep":
        """The same statistics for some images of the batch."""
        return NullTextStep(
            [self.initial_loss[r] for r in rows],
            [self.final_loss[r] for r in rows],
            [self.iterations[r] for r in rows],
            self.threshold,
            [self.reached_threshold[r] for r in rows],
        )


@dataclass
class NullTextResult:
    null_embeddings: list[torch.Tensor]  # per step i: (B, 77, D), the optimised ∅_i of each image
    latents: list[torch.Tensor]  # reconstruction z_N … z_0 with the optimised ∅ (B, 4, h, w each)
    steps: list[NullTextStep] = field(default_factory=list)
    # dynamic loss scaling: the updates skipped for a non-finite gradient, and the scale at the end
    skipped_updates: int = 0
    loss_scale: float = 0.0

    @property
    def z0(self) -> torch.Tensor:
        return self.latents[-1]


class _LossScaler:
    """Dynamic loss scaling (torch.amp.GradScaler's rule) for the gradient of ∅ across the UNet: the
    scale halves on a non-finite gradient (that update is skipped) and doubles after `interval`
    clean updates in a row."""

    def __init__(self, scale: float, interval: int):
        self.scale, self.interval, self.clean = float(scale), interval, 0

    def update(self, grads: list[torch.Tensor]) -> bool:
        """Whether the (unscaled) gradients are finite, the scale adjusted for the next update."""
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            self.scale, self.clean = self.scale / 2, 0
            return False
        self.clean += 1
        if self.clean >= self.interval:
            self.scale, self.clean = self.scale * 2, 0
        return True


def _per_image_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)  # (B,)


def null_text_optimization(
    unet,
    plan: Plan,
    pivots: list[torch.Tensor],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    config: NullTextConfig = NullTextConfig(),
    z_T: torch.Tensor | None = None,
    observer=None,
    progress: Callable | None = None,
) -> NullTextResult:
    """Optimise one ∅ per step and per image so that guided reconstruction follows `pivots`.

    pivots: N+1 latents (B, 4, h, w), z_0 first (as `invert` returns them). cond: (B, 77, D) prompt
    embeddings. uncond: (1 or B, 77, D) starting ∅ (the embedding of ""). guidance: s of ε̃. z_T:
    the start (default pivots[-1]). observer: a controller attached to the conditional UNet call of
    each step (e.g. an `AttentionStore`), which sees the final reconstruction's cross-attention.

    Per step i (Mokady et al. 2023, Alg. 1): ε(z_i, t_i, c) once without gradient; then up to
    `inner_steps` Adam updates of ∅ on Σ_k mse(Step_i(z_i, ε̃), pivot), lr = lr·(1 − i'/100) with
    i' = i·reference_steps/N; an image stops when its loss < epsilon + i·epsilon_growth, by the rule
    of `config.keep` (default: the authors' — the update of the iteration whose loss stops it is
    still applied, and the last iterate is kept). ∅_{i+1} starts from ∅_i. Then z advances with the
    kept ∅: the model function returns ε̃ with it, and the loop takes the step. With guidance 1 ε̃
    is ε(c) and ∅ plays no part: nothing is optimised (one UNet call per step, ∅ stays `uncond`).
    """
    n = len(plan.steps)
    if len(pivots) != n + 1:
        raise ValueError(f"null_text_optimization needs N+1 = {n + 1} pivots, got {len(pivots)}")
    b = cond.shape[0]
    z_start = (pivots[-1] if z_T is None else z_T).detach()
    result = NullTextResult([], [z_start])
    scaler = _LossScaler(config.loss_scale, config.scale_growth_interval)
    null = uncond.detach().expand(b, -1, -1).clone()  # (B, 77, D), warm start for step 0
    keep_best = config.keep == "best"

    def model(z, t, i, land):
        nonlocal null
        target = pivots[n - i - 1].detach()
        with torch.no_grad():
            e_c = unet(z, t, cond, controller=at_step(observer, i))
        lr = config.lr * (1.0 - i * config.reference_steps / n / 100.0)
        # i scaled as the lr
        threshold = config.epsilon + i * config.reference_steps / n * config.epsilon_growth
        if guidance == 1.0:  # ε̃ = ε(c): ∅ plays no part, there is nothing to optimise
            with torch.no_grad():
                values = _per_image_mse(land(e_c).float(), target.float()).tolist()
            result.null_embeddings.append(null)
            result.steps.append(
                NullTextStep(values, values, [0] * b, threshold, [v < threshold for v in values])
            )
            return e_c
        # fp32 master copies: Adam's small steps would be lost in a half-precision embedding
        master = torch.promote_types(null.dtype, torch.float32)
        params = [null[k : k + 1].to(master).clone().requires_grad_(True) for k in range(b)]
        opt = torch.optim.Adam(params, lr=lr)
        best = [p.detach().clone() for p in params]
        initial = [float("nan")] * b  # nan: no loss computed (inner_steps = 0)
        final = [float("inf") if keep_best else float("nan")] * b
        active = [True] * b
        iterations = [0] * b
        for it in range(config.inner_steps + (1 if keep_best else 0)):
            e_u = unet(z, t, torch.cat(params).to(cond.dtype))
            # (B,)
            loss_k = _per_image_mse(land(cfg(e_u, e_c, guidance)).to(master), target.to(master))
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
            # Eq. 4: one loss summed over the images. autograd.grad (not backward) differentiates
            # with respect to the embeddings only, so UNet weights that require grad get no gradient
            # computed or stored. The loss is scaled while its gradient crosses the UNet, so that a
            # half-precision UNet's small gradients do not underflow (exact in float32: a power of
            # two), and unscaled on the embeddings.
            grads = torch.autograd.grad(loss_k.sum() * scaler.scale, [params[k] for k in live])
            grads = [g / scaler.scale for g in grads]
            if scaler.update(grads):
                for k in range(b):
                    # Adam skips parameters without a gradient: the stopped images
                    params[k].grad = None
                for k, g in zip(live, grads):
                    params[k].grad = g
                    iterations[k] += 1
                opt.step()
            else:  # an overflow: this update is skipped, the next runs at half the scale
                result.skipped_updates += 1
            # the authors' rule: the loss computed before this update stops the image
            if not keep_best:
                for k in live:
                    if values[k] < threshold:
                        active[k] = False
                if not any(active):
                    break
        kept = best if keep_best else [p.detach() for p in params]
        null = torch.cat(kept).detach().to(cond.dtype)
        result.null_embeddings.append(null)
        result.steps.append(
            NullTextStep(initial, final, iterations, threshold, [v < threshold for v in final])
        )
        with torch.no_grad():
            return cfg(unet(z, t, null), e_c, guidance)

    def record(i, t, z, x0):
        result.latents.append(z)
        if progress:
            progress()

    sample_loop(model, z_start, plan, callback=record)
    result.loss_scale = scaler.scale
    return result
