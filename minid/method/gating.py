"""EditedID's attentional gating (Stage 3, Eq. 7-9; docs/editedid.md "Stage 3"), a controller at the
seam of `minid.models.attention` with the batch layout of control.py.

- `EditedIDGating`: mask-selective self-attention and token-selective cross-attention replacement
  for one (O, E, T) batch; `GatingGroup`: K such triples in one batch.
- `IdentitySchedule`: how much of O the gating lets into T at each step (IdGlow's timestep-scheduled
  identity injection, seed 002), a function of the step's noise level (`noise_progress`): s_i
  scales O's weight in the gated self-attention rows and mixes the identity tokens'
  cross-attention columns, s_i·O + (1 − s_i)·T.
- Mask-free identity (`EditedIDGating.mutual`): T's queries over [K_T; K_O], [V_T; V_O] at the
  gated self-attention sites, O's share s_i (MasaCtrl's mutual self-attention), no mask.
- Localised token replacement: region words whose cross-attention columns come from O or E only on
  the query rows inside their region (ConsistentID's localisation, seed 003, at inference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from minid.imaging import masks
from minid.kernels.dispatch import masked_multi_source, mutual_attention, token_replace
from minid.method.control import BatchLayout
from minid.models.attention import Site, default_attention
from minid.sampling.plans import Plan

GatingMode = Literal["output", "map"]
GATING_MODES = get_args(GatingMode)


def noise_progress(plan: Plan) -> list[float]:
    """Per step of `plan`, how far its noise level lies from pure noise: p = 1 − ν with
    ν = σ_t / (α_t + σ_t) at the step's noisier end t — the flow-matching time of the same noise
    level (x_t / (α_t + σ_t) = (1 − ν) x_0 + ν ε), 1 at pure noise, 0 at clean. p depends on the
    noise level alone, so it is the same for a step of any N, plan or solver at the same σ."""
    out = []
    for step in plan.steps:
        alpha, sigma = plan.schedule.alpha(step.t), plan.schedule.sigma(step.t)
        out.append(1.0 - sigma / (alpha + sigma))
    return out


# factor name -> number of arguments; the "-steps" forms count steps, the others noise levels
_FACTOR_ARITY = {"constant": 0, "decay": 2, "window": 4, "decay-steps": 2, "window-steps": 4}


@dataclass(frozen=True)
class IdentitySchedule:
    """s ∈ [0, 1] at each reconstruction step: how much of O the gating lets into T there.

    IdGlow's idea (seed 002): identity injected with a timestep-dependent linear decay and
    concentrated in a window, so that identity does not override structure the edit must change.
    The schedule is a function of the step's noise level, written as the progress p ∈ [0, 1] from
    pure noise (0) to clean (1) (`noise_progress`: p = 1 − σ/(α + σ)), so a spec means the same at
    any N and under any plan. `spec`:
        "constant"                     s ≡ 1: EditedID as the paper has it (bit for bit)
        "decay:S_START:S_END"          linear in p, S_START at p = 0 (noise), S_END at p = 1
        "window:A:B:S_IN:S_OUT"        S_IN where A ≤ p < B (0 ≤ A ≤ B ≤ 1), S_OUT elsewhere
        "decay-steps:S_START:S_END"    by step number: S_START at step 1, S_END at step N
        "window-steps:A:B:S_IN:S_OUT"  S_IN on steps A ≤ i < B (1-based), S_OUT on the others
    and products of these joined by "*", e.g. "decay:1:0.2*window:0:0.5:1:0".
    """

    spec: str = "constant"

    def __post_init__(self):
        self.factors()  # a malformed spec fails here, when the config is made

    def factors(self) -> list[tuple[str, tuple[float, ...]]]:
        out = []
        for part in self.spec.split("*"):
            name, *args = part.strip().split(":")
            arity = _FACTOR_ARITY.get(name)
            try:
                values = tuple(float(a) for a in args)
            except ValueError:
                values = None
            if arity is None or values is None or len(values) != arity:
                raise ValueError(
                    f"identity schedule {self.spec!r}: {part.strip()!r} is not one of constant, "
                    "decay:S_START:S_END, window:A:B:S_IN:S_OUT (A, B: noise progress in [0, 1]), "
                    "decay-steps:S_START:S_END, window-steps:A:B:S_IN:S_OUT (A, B: steps), "
                    "factors joined by '*'"
                )
            strengths = values if name.startswith("decay") else values[2:]
            if any(not 0 <= v <= 1 for v in strengths):
                raise ValueError(
                    f"identity schedule {self.spec!r}: strengths must lie in [0, 1], got "
                    f"{strengths}"
                )
            if name == "window" and not 0 <= values[0] <= values[1] <= 1:
                raise ValueError(
                    f"identity schedule {self.spec!r}: a window A:B needs noise progress "
                    "0 ≤ A ≤ B ≤ 1 (0: pure noise, 1: clean)"
                )
            if name == "window-steps" and not (
                values[0] == int(values[0])
                and values[1] == int(values[1])
                and 1 <= values[0] <= values[1]
            ):
                raise ValueError(
                    f"identity schedule {self.spec!r}: a window-steps A:B needs whole steps "
                    "1 ≤ A ≤ B"
                )
            out.append((name, values))
        return out

    @property
    def by_noise(self) -> bool:
        """Whether some factor reads the noise level (and so needs the plan, not only N)."""
        return any(name in ("decay", "window") for name, _ in self.factors())

    def value(self, step: int, num_steps: int, progress: float | None = None) -> float:
        """s at the plan's step `step` (0-based, from noise) of `num_steps`, whose noise progress is
        `progress` (`noise_progress`; needed by the noise-level factors)."""
        i, s = step + 1, 1.0
        for name, v in self.factors():
            if name in ("decay", "window") and progress is None:
                raise ValueError(
                    f"identity schedule {self.spec!r}: {name} reads the step's noise level; give "
                    "the plan (IdentitySchedule.values(plan))"
                )
            if name == "decay":
                s *= v[0] + (v[1] - v[0]) * progress
            elif name == "window":
                s *= v[2] if v[0] <= progress < v[1] else v[3]
            elif name == "decay-steps":
                s *= v[0] + (v[1] - v[0]) * ((i - 1) / (num_steps - 1) if num_steps > 1 else 0.0)
            elif name == "window-steps":
                s *= v[2] if v[0] <= i < v[1] else v[3]
        return s

    def values(self, plan: Plan | int) -> list[float]:
        """s_i for every step of `plan` (or of N steps, for a schedule that counts steps only)."""
        if isinstance(plan, int):
            return [self.value(i, plan) for i in range(plan)]
        progress = noise_progress(plan)
        return [self.value(i, len(progress), p) for i, p in enumerate(progress)]

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class GatingConfig:
    """Stage 3's attentional gating (EditedID Eq. 7-9; docs/editedid.md, Stage 3)."""

    mode: GatingMode = "output"  # blend attention outputs (released code) or maps (Eq. 7-8)
    # weight of O where M_O and M_E overlap ("co-existence" ≈ 0.5); λ_E = 1 − λ_O
    lambda_o: float = 0.5
    # blocks whose self-attention is gated (paper A.5)
    self_blocks: tuple[str, ...] = ("down", "mid")
    self_sides: tuple[int, ...] | None = None  # query-grid sides gated (None: all of those blocks)
    # [start, end) steps with self-attention gating; None: all
    self_steps: tuple[int, int] | None = None
    self_uncond: bool = True  # gate the unconditional row of T too
    # s_i: O's share per step (constant: the paper's)
    identity: IdentitySchedule = IdentitySchedule()

    def __post_init__(self):
        if self.mode not in GATING_MODES:
            raise ValueError(f"GatingConfig.mode must be 'output' or 'map', got {self.mode!r}")
        if not 0 <= self.lambda_o <= 1:
            raise ValueError(f"GatingConfig.lambda_o (λ_O) must be in [0, 1], got {self.lambda_o}")

    @property
    def lambda_e(self) -> float:
        """λ_E = 1 − λ_O: the rows of a mixed map stay normalised."""
        return 1.0 - self.lambda_o


def gating_weights(
    mask_o: torch.Tensor,
    mask_e: torch.Tensor,
    lambda_o: float,
    lambda_e: float,
    side: tuple[int, int],
) -> torch.Tensor:
    """Per-row weights (3, Nq) of the branches O, E, T for a query grid of `side` (Eq. 8).

    Exclusive to M_O: O; exclusive to M_E: E; in both: λ_O·O + λ_E·E; elsewhere T. Soft masks
    (values in (0, 1), e.g. after resizing) interpolate these four cases bilinearly, so each row's
    weights sum to 1 whenever λ_O + λ_E = 1. Masks are resized by area averaging (a coarse cell is
    the fraction of it covered). λ_O and λ_E may be maps (1, 1, h, w) as well as numbers (regions
    with their own λ).
    """
    mo, me = (masks.to_resolution(m, side).reshape(-1) for m in (mask_o, mask_e))  # (Nq,) each
    if isinstance(lambda_o, torch.Tensor):
        lambda_o, lambda_e = (
            masks.to_resolution(m, side).reshape(-1) for m in (lambda_o, lambda_e)
        )
    w_o = mo * (1 - me) + lambda_o * mo * me
    w_e = me * (1 - mo) + lambda_e * mo * me
    w_t = (1 - mo) * (1 - me)
    return torch.stack([w_o, w_e, w_t])  # (3, Nq)


@dataclass
class EditedIDGating:
    """EditedID's attentional gating (Eq. 7-9) for one UNet batch of the branches (O, E, T).

    Self-attention (mask-selective), at sites whose block is in `config.self_blocks` (and side in
    `config.self_sides` when given) while the step is in `config.self_steps`: T's output rows are a
    per-row mix of the branches by `gating_weights`. `mode="output"` mixes each branch's attention
    output `Σ_s w_s ⊙ (P_s V_s)` (the authors' released fragment); `mode="map"` mixes the maps and
    multiplies by T's values `(Σ_s w_s ⊙ P_s) V_T` (paper Eq. 7-8). With `self_uncond` the same mix
    is applied to T's unconditional row (its null-text prediction then carries the same structure as
    its conditional one). Cross-attention (token-selective), at every site and step, conditional row
    only: T's columns at `id_tokens` come from O's map, those at `element_tokens` from E's; the rest
    stay T's. `id_tokens` / `element_tokens` are (T position, source position) pairs, found per
    prompt and aligned (`CLIPTokenizer.align_tokens`). Masks are (1, 1, h, w) at latent resolution,
    in [0, 1]. The triple's rows are the branches `branch_o`, `branch_e`, `branch_t` of the layout
    (0, 1, 2 for a batch of one triple; a `GatingGroup` holds K triples in one batch).

    `config.identity` (IdGlow) scales O's part at step i by s_i: O's row weight becomes s_i·w_O with
    the rest going to T's own attention, and the identity tokens' columns become s_i·O's + (1 −
    s_i)·T's (linear in V: s_i·(all tokens replaced) + (1 − s_i)·(element tokens only)); s ≡ 1 is
    the paper's gating exactly. `lambda_map` (1, 1, h, w) replaces the constant λ_O where regions
    carry their own. `local_tokens` (ConsistentID): words whose columns — map and values — come from
    O or E only on the query rows of their region mask (linear again: T's row + r ⊙ (replaced − T's
    row), so no row outside the region changes). `mutual` (the mask-free mode): at the same
    self-attention sites T's queries attend over T's and O's keys and values together, O's share
    s_i, with no mask.
    """

    layout: BatchLayout
    mask_o: torch.Tensor
    mask_e: torch.Tensor
    id_tokens: list[tuple[int, int]] = field(default_factory=list)
    element_tokens: list[tuple[int, int]] = field(default_factory=list)
    config: GatingConfig = GatingConfig()
    # False: no self-attention replacement (the "no entanglement" ablation)
    self_gating: bool = True
    # Which implementation runs the fused edits: "auto" (Triton on CUDA, the PyTorch path
    # otherwise), "triton" or "torch" — the same semantics, so the pipeline's result does not depend
    # on it beyond rounding.
    backend: str = "auto"
    num_tokens: int = 77
    branch_o: int = 0
    branch_e: int = 1
    branch_t: int = 2
    # s_i per step of the plan (`IdentitySchedule.values(plan)`); None: config.identity must be
    # constant (s ≡ 1)
    identity_values: list[float] | None = None
    # mask-free (IdGlow): at the gated self-attention sites T's queries attend over [K_T; K_O],
    # [V_T; V_O], O's share s_i (`dispatch.mutual_attention`), instead of the mask-selective rows
    mutual: bool = False
    # (1, 1, h, w) λ_O per pixel, else config.lambda_o everywhere
    lambda_map: torch.Tensor | None = None
    local_tokens: list[LocalTokens] = field(default_factory=list)
    _weights: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        branches = (self.branch_o, self.branch_e, self.branch_t)
        if len(set(branches)) != 3 or not all(0 <= b < self.layout.branches for b in branches):
            raise ValueError(
                f"EditedIDGating needs three distinct branches O, E, T within the layout's "
                f"{self.layout.branches}; found branch_o, branch_e, branch_t = {branches}"
            )
        src_branch = torch.full((self.num_tokens,), -1, dtype=torch.long)
        src_token = torch.zeros(self.num_tokens, dtype=torch.long)
        for branch, pairs in ((0, self.id_tokens), (1, self.element_tokens)):
            for t_pos, s_pos in pairs:
                src_branch[t_pos] = branch
                src_token[t_pos] = s_pos
        self.src_branch, self.src_token = src_branch, src_token
        element_only = src_branch.clone()
        element_only[src_branch == 0] = -1
        # the columns replaced when s = 0: the element tokens alone
        self.element_branch = element_only
        if self.identity_values is None and self.config.identity.spec != "constant":
            raise ValueError(
                f"EditedIDGating: identity schedule {self.config.identity} needs its per-step "
                "values: identity_values=config.identity.values(plan)"
            )

    def identity(self, step: int) -> float:
        """s at the plan's step `step` (0-based)."""
        if self.identity_values is None:
            return 1.0
        if not 0 <= step < len(self.identity_values):
            raise ValueError(
                f"EditedIDGating: step {step} is outside the {len(self.identity_values)} steps "
                "of identity_values"
            )
        return self.identity_values[step]

    def _self_active(self, site: Site, step: int) -> bool:
        c = self.config
        if not self.self_gating or site.block not in c.self_blocks:
            return False
        if c.self_sides is not None and site.height not in c.self_sides:
            return False
        if c.self_steps is not None and not (c.self_steps[0] <= step < c.self_steps[1]):
            return False
        return True

    def weights(self, site: Site, device) -> torch.Tensor | None:
        """(3, Nq) row weights at this site's resolution, or None when T keeps every row."""
        side = (site.height, site.width)
        if side not in self._weights:
            lam = (
                (self.config.lambda_o, self.config.lambda_e)
                if self.lambda_map is None
                else (self.lambda_map, 1 - self.lambda_map)
            )
            w = gating_weights(self.mask_o, self.mask_e, *lam, side)
            self._weights[side] = None if bool((w[2] == 1).all()) else w
        w = self._weights[side]
        return None if w is None else w.to(device)

    def __call__(self, q, k, v, site: Site, step: int = 0):
        self.layout.check(q, site)
        return self.edit(q, k, v, site, step, None)

    def edit(self, q, k, v, site: Site, step: int, out: torch.Tensor | None) -> torch.Tensor | None:
        """Write T's edited rows into `out`, the default attention of the whole batch (computed here
        when None and T needs an edit); returns `out`, still None when nothing is edited at this
        site."""
        lay = self.layout
        s = self.identity(step)
        if site.is_cross:
            if not (self.src_branch >= 0).any() and not self.local_tokens:
                return out
            o, e, t = lay.row(self.branch_o), lay.row(self.branch_e), lay.row(self.branch_t)
            out = default_attention(q, k, v) if out is None else out

            def replaced(src_branch, src_token, v_t=None):  # T's row with these columns replaced
                return token_replace(
                    q[t : t + 1],
                    k[t : t + 1],
                    v[t : t + 1] if v_t is None else v_t,
                    sources=[(q[o : o + 1], k[o : o + 1]), (q[e : e + 1], k[e : e + 1])],
                    src_branch=src_branch.to(q.device),
                    src_token=src_token.to(q.device),
                    backend=self.backend,
                )

            if s == 1.0:
                row = (
                    replaced(self.src_branch, self.src_token)
                    if (self.src_branch >= 0).any()
                    else out[t : t + 1]
                )
            else:  # IdGlow: identity columns s·O's + (1 − s)·T's, element columns E's
                row = replaced(self.element_branch, self.src_token)
                if s > 0 and (self.src_branch == 0).any():
                    row = s * replaced(self.src_branch, self.src_token) + (1 - s) * row
            for local in self.local_tokens:  # ConsistentID: a word's columns only inside its region
                branch, token = self.src_branch.clone(), self.src_token.clone()
                v_t = v[t : t + 1]
                if local.move_values:  # the word's values too: P'V' with V'[j] = V_src[π(j)]
                    v_t = v_t.clone()
                    src = o if local.source == 0 else e
                for t_pos, s_pos in local.pairs:
                    branch[t_pos], token[t_pos] = local.source, s_pos
                    if local.move_values:
                        v_t[:, :, t_pos] = v[src : src + 1, :, s_pos]
                r = (
                    masks.to_resolution(local.mask, (site.height, site.width))
                    .reshape(1, 1, -1, 1)
                    .to(row)
                )
                row = row + r * (replaced(branch, token, v_t) - row)
            out[t : t + 1] = row
            return out
        if not self._self_active(site, step):
            return out
        if self.mutual:
            return self._mutual(q, k, v, s, out)
        w = self.weights(site, q.device)
        if w is not None and s != 1.0:  # IdGlow: O's weight s·w_O, the rest to T's own attention
            w = torch.stack([s * w[0], w[1], w[2] + (1 - s) * w[0]])
            w = None if bool((w[2] == 1).all()) else w
        if w is None:
            return out
        halves = [True, False] if (self.config.self_uncond and lay.cfg) else [True]
        out = default_attention(q, k, v) if out is None else out
        for cond in halves:
            o, e, t = (lay.row(b, cond) for b in (self.branch_o, self.branch_e, self.branch_t))
            rows = [o, e, t]
            # The last entry of vs is T's values, what the map reading multiplies the mixed map by.
            out[t : t + 1] = masked_multi_source(
                [q[r : r + 1] for r in rows],
                [k[r : r + 1] for r in rows],
                [v[r : r + 1] for r in rows],
                w.to(q.dtype),
                mode=self.config.mode,
                backend=self.backend,
            )
        return out

    def _mutual(self, q, k, v, s: float, out: torch.Tensor | None) -> torch.Tensor | None:
        """Mask-free identity (IdGlow, with MasaCtrl's mutual self-attention): T's queries over
        [K_T; K_O] and [V_T; V_O] with prior weights (1 − s, s) — s = ½ is plain attention over the
        concatenation, s = 1 T's queries over O's keys and values alone, s = 0 T's own attention
        (the edit, bit for bit: nothing is recomputed). No spatial mask: O's keys form a set, so O
        need not be position-aligned with T."""
        if s == 0:
            return out
        lay = self.layout
        halves = [True, False] if (self.config.self_uncond and lay.cfg) else [True]
        out = default_attention(q, k, v) if out is None else out
        for cond in halves:
            o, t = lay.row(self.branch_o, cond), lay.row(self.branch_t, cond)
            out[t : t + 1] = mutual_attention(
                q[t : t + 1],
                [k[t : t + 1], k[o : o + 1]],
                [v[t : t + 1], v[o : o + 1]],
                [1.0 - s, s],
                backend=self.backend,
            )
        return out


@dataclass
class LocalTokens:
    """Words whose cross-attention columns come from one source only inside a region
    (ConsistentID)."""

    pairs: list[tuple[int, int]]  # (T position, source position)
    source: int  # 0: from O, 1: from E
    mask: torch.Tensor  # (1, 1, h, w) in [0, 1]: the query rows where the replacement acts
    # the words' values come from the source too (their map columns times the source's values,
    # V'[j] = V_src[π(j)], exact through token_replace); False: maps only, times T's values
    move_values: bool = True


class GatingGroup:
    """K (O, E, T) triples in one UNet batch (multi-person restoration), each gated by its own
    `EditedIDGating`.

    The layout has 3K branches in the order O_1 … O_K, E_1 … E_K, T_1 … T_K (so the batch is
    [uncond O_1 … T_K; cond O_1 … T_K]); gating k reads rows O_k, E_k and writes row T_k only, with
    its own masks, words and λ. The default attention of the whole batch is computed once and each
    triple's T rows are overwritten in place, so the triples never see each other.
    """

    def __init__(self, gatings: list[EditedIDGating]):
        if not gatings:
            raise ValueError("GatingGroup needs at least one EditedIDGating")
        layouts = {g.layout for g in gatings}
        if len(layouts) != 1:
            raise ValueError(f"the gatings of a GatingGroup must share one layout, found {layouts}")
        targets = [g.branch_t for g in gatings]
        if len(set(targets)) != len(targets):
            raise ValueError(f"two gatings of a GatingGroup write the same T branch: {targets}")
        self.gatings = gatings
        self.layout = gatings[0].layout

    def __call__(self, q, k, v, site: Site, step: int = 0):
        self.layout.check(q, site)
        out = None
        for g in self.gatings:
            out = g.edit(q, k, v, site, step, out)
        return out
