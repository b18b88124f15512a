"""Stage 1 of EditedID: adaptive-mixing inversion (paper Eq. 1-3).

Both images are inverted in one batch, one pass of the inversion loop of sampling/samplers.py; after
each step the two latents are mixed with a learnable weight w that gradient descent drives from w_0
toward 0.5, and the last step forces w = 0.5 so both trajectories end at one shared z_T. Several
pairs may share the batch (multi-person restoration), each with its own w.

Steps are indexed as the plan indexes them, from pure noise: step i (0 … N−1) goes from pivots[N−i]
to pivots[N−i−1] when sampling; its inversion goes from pivots[N−i−1] to pivots[N−i] (same solver,
same noise levels: the symmetry constraint). The inversion runs i = N−1 … 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from minid.sampling.plans import Plan
from minid.sampling.samplers import invert_loop


@dataclass(frozen=True)
class MixingConfig:
    """Stage 1, adaptive mixing (EditedID Eq. 1-3; docs/editedid.md, Stage 1).

    The alignment loss is L(w) = (1−2w)²·D, D = mean((ẑ^O − ẑ^E)²). With `rule="normalised"` (the
    default) w descends L/D = (1−2w)², so its path does not depend on how far apart the pair is: the
    gap 0.5 − w shrinks by (1 − 8η) per step, and with `lr=None` η is set from N so that the gap
    left at the last free step is `reach` × the first (8η = 1 − reach^{1/(N−2)}: η = 0.020 at N =
    6). `rule="raw"` descends L itself, whose steps scale with D: a pair that differs only in the
    face barely moves w before the forced 0.5. Decided on the pipeline over the exact-score
    testbed (bench/results/defaults_cpu.md; the w paths: bench/results/mixing_cpu.md).
    """

    # initial mixing weight; too large blends identities, too small leaves a jump at the end
    w0: float = 0.04
    rule: Literal["normalised", "raw"] = "normalised"
    lr: float | None = None  # η; None: from N and `reach` (normalised), 0.05 (raw)
    # normalised rule with lr=None: the gap left at the last free step / the first gap. 0.5 (w from
    # 0.04 to 0.27 by the last free step at any N, then the forced 0.5) scored as 0.05 and 0.2 on
    # every pair kind that differs in part, and 0.3-2.4 dB above them on two different images, on
    # the pipeline (Stages 1-2, bench/results/defaults_cpu.md)
    reach: float = 0.5
    iterations: int = 1  # gradient steps on w per inversion step
    # w is projected onto [0, w_max] after each update, so it never overshoots 0.5
    w_max: float = 0.5
    # how many final inversion steps are forced to w = 0.5 (Eq. 3's constrained convergence; the
    # authors' code calls it FINA_STEP and forces fewer when there are few steps): 1, the last
    forced_steps: int = 1

    def __post_init__(self):
        if self.rule not in ("normalised", "raw"):
            raise ValueError(f"MixingConfig.rule must be 'normalised' or 'raw', got {self.rule!r}")
        if not isinstance(self.forced_steps, int) or self.forced_steps < 1:
            raise ValueError(
                f"MixingConfig.forced_steps must be a whole number ≥ 1 (at least the last step "
                f"ends at w = 0.5), got {self.forced_steps!r}"
            )

    def forced(self, num_steps: int) -> int:
        """The final steps forced to w = 0.5 in a pass of `num_steps`: `forced_steps`, but never all
        of them (the first step mixes with w_0)."""
        return max(1, min(self.forced_steps, num_steps - 1))

    def step_size(self, num_steps: int) -> float:
        """η for a pass of `num_steps` steps: the gap left at the last free step is `reach` × the
        first, over the `num_steps − forced − 1` updates between them."""
        if self.lr is not None:
            return self.lr
        if self.rule == "raw":
            return 0.05
        return (1.0 - self.reach ** (1.0 / max(num_steps - self.forced(num_steps) - 1, 1))) / 8.0


# --------------------------------------------------------------------------------------------------
# Stage 1: adaptive mixing


@dataclass
class AlignmentResult:
    """Stage 1's result for K pairs (O_k, E_k), k = 0 … K−1, inverted in one batch."""

    pivots_o: list[torch.Tensor]  # z^O_0 … z^O_N after mixing, each (K, 4, h, w)
    # z^E_0 … z^E_N; pivots_o[-1] and pivots_e[-1] are the same tensor values
    pivots_e: list[torch.Tensor]
    w_schedules: list[list[float]]  # per pair, the w each of the N steps mixed with: w_0, …, 0.5
    alignment_losses: list[list[float]]  # per pair, L(w) = (1−2w)² mean((ẑ^O − ẑ^E)²) at each step
    # per pair, D = mean((ẑ^O − ẑ^E)²) per step
    differences: list[list[float]] = field(default_factory=list)

    @property
    def z_T(self) -> torch.Tensor:
        return self.pivots_o[-1]


def adaptive_mixing_inversion(
    unet,
    plan: Plan,
    z0_o: torch.Tensor,
    z0_e: torch.Tensor,
    cond_o: torch.Tensor,
    cond_e: torch.Tensor,
    mixing: MixingConfig | None = MixingConfig(),
    progress: Callable | None = None,
) -> AlignmentResult:
    """Invert K pairs (O_k, E_k) together (one batched UNet call per step) and align each (EditedID
    Eq. 1-3).

    z0_o, z0_e: (K, 4, h, w); cond_o, cond_e: (K, 77, D). At each step each image takes its own
    inversion step (ẑ^O, ẑ^E), then each pair is mixed with its own current w:
        z^O = (1−w) ẑ^O + w ẑ^E,   z^E = (1−w) ẑ^E + w ẑ^O
    then w takes `mixing.iterations` gradient steps on the pair's alignment loss
        L(w) = mean(((1−w) ẑ^O + w ẑ^E − ((1−w) ẑ^E + w ẑ^O))²) = (1−2w)² mean((ẑ^O − ẑ^E)²),
    whose minimum is w = 0.5. The last step (the last `mixing.forced_steps`) uses w = 0.5
    (constrained convergence, Eq. 3), so the two trajectories end at the same z_T exactly.
    `mixing=None` inverts the images separately (w =
    0). Pairs share nothing but the UNet batch: each has its own w and optimiser, so K pairs give
    what K separate calls give (up to the UNet's batch-size-dependent rounding).
    """
    k_pairs = z0_o.shape[0]
    if z0_e.shape[0] != k_pairs or cond_o.shape[0] != k_pairs or cond_e.shape[0] != k_pairs:
        raise ValueError(
            f"adaptive_mixing_inversion needs as many rows in z0_o, z0_e, cond_o, cond_e; "
            f"found {z0_o.shape[0]}, {z0_e.shape[0]}, {cond_o.shape[0]}, {cond_e.shape[0]}"
        )
    cond = torch.cat([cond_o, cond_e])  # rows 0..K−1 are O_k, rows K..2K−1 are E_k
    w0 = mixing.w0 if mixing is not None else 0.0
    w = [torch.tensor(float(w0), dtype=torch.float64, requires_grad=True) for _ in range(k_pairs)]
    lr = mixing.step_size(len(plan.steps)) if mixing is not None else 0.0
    forced = mixing.forced(len(plan.steps)) if mixing is not None else 0
    opts = [torch.optim.SGD([w_k], lr=lr) for w_k in w]
    result = AlignmentResult(
        [z0_o],
        [z0_e],
        [[] for _ in range(k_pairs)],
        [[] for _ in range(k_pairs)],
        [[] for _ in range(k_pairs)],
    )

    def model(z, t, i, land):
        with torch.no_grad():
            return unet(z, t, cond)

    def mix(i, t, z_hat, x0):
        # the inversion runs the plan backwards: step 0 is its last, to z_T; the last `forced` steps
        # mix with w = 0.5
        last = i < forced
        mixed_o, mixed_e = [], []
        for k in range(k_pairs):
            zo, ze = z_hat[k : k + 1], z_hat[k_pairs + k : k_pairs + k + 1]
            # Eq. 3 at the last step
            w_j = 0.0 if mixing is None else (0.5 if last else float(w[k].detach()))
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
            # normalised: L / D = (1 − 2w)²
            scale = 1.0 if mixing is None or mixing.rule == "raw" else d
            if mixing is not None and not last and scale > 0:
                zo_d, ze_d = zo.double(), ze.double()
                for _ in range(mixing.iterations):
                    opts[k].zero_grad()
                    loss = (
                        ((1 - w[k]) * zo_d + w[k] * ze_d - ((1 - w[k]) * ze_d + w[k] * zo_d)) ** 2
                    ).mean() / scale
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


# --------------------------------------------------------------------------------------------------
# Stage 2: null-text optimisation
