"""Attention controllers: observe or edit the UNet's attention at the seam of `minid.attention`.

A controller is a callable `controller(q, k, v, site) -> out | None` passed to one `UNet.forward` call;
q is (B, heads, Nq, d), k and v (B, heads, Nk, d). Returning None lets the default attention run.

Batch layout (every controller here knows it explicitly, through `BatchLayout`):
the UNet batch holds `branches` images (for EditedID: O, E, T in that order; for prompt-to-prompt: the
source first, then the edited prompts). With classifier-free guidance the batch is the unconditional half
followed by the conditional half, each in branch order:

    cfg=True:   [uncond b0, uncond b1, …, uncond b(n-1), cond b0, cond b1, …, cond b(n-1)]
    cfg=False:  [cond b0, …, cond b(n-1)]

Edits never write attention maps to memory: replacing rows of a self-attention map and taking token
columns of a cross-attention map are both linear in V (`(Σ_s w_s ⊙ P_s) V = Σ_s w_s ⊙ (P_s V)`;
`P[:, J] V[J]`), which the fused ops of `minid.attention` exploit. Cross-attention maps (77 columns) are
cheap and are the only maps stored.

Controllers here:
- `AttentionStore`: head-averaged cross-attention maps per site, summed over calls.
- `word_map` / `word_mask`: a map / region from the stored maps of some words (P2P's local blend).
- `PromptToPrompt`: word replace / refine (token columns from the source prompt), reweight, and
  self-attention injection in a step window (Hertz et al. 2022).
- `EditedIDGating`: mask-selective self-attention and token-selective cross-attention replacement for one
  (O, E, T) batch (EditedID Eq. 7-9, see docs/editedid.md "Stage 3"); `GatingGroup`: K such triples in one batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from minid import masks
from minid.attention import (Site, attention_with_map, default_attention, masked_multi_source,
                             token_replace)


@dataclass(frozen=True)
class BatchLayout:
    """Which UNet batch row holds which branch (see the module docstring)."""

    branches: int  # images in the batch (EditedID: 3, O/E/T)
    cfg: bool = True  # True: an unconditional half precedes the conditional half

    @property
    def size(self) -> int:
        return self.branches * (2 if self.cfg else 1)

    def row(self, branch: int, cond: bool = True) -> int:
        """Batch row of `branch` in the conditional (or unconditional) half."""
        if not 0 <= branch < self.branches:
            raise ValueError(f"control.py: branch {branch} outside 0..{self.branches - 1}")
        if not cond and not self.cfg:
            raise ValueError("control.py: the layout has no unconditional half (cfg=False)")
        return branch + (self.branches if self.cfg and cond else 0)

    def check(self, q: torch.Tensor, site: Site) -> None:
        if q.shape[0] != self.size:
            raise ValueError(f"control.py: at {site} the batch has {q.shape[0]} rows, the controller's layout "
                             f"expects {self.size} ({self.branches} branches, cfg={self.cfg}); build the "
                             f"controller with the layout of the UNet call")


def _site_key(site: Site) -> tuple:
    return (site.block, site.level, site.index, site.kind)


def at_step(controller, i: int):
    """The controller as one UNet call at step i sees it: `controller(q, k, v, site, step=i)` (a
    `functools.partial`, so `.func` and `.keywords["step"]` say what it binds). The sampling loops pass the
    step index to the model function, which binds it here; None stays None."""
    return None if controller is None else functools.partial(controller, step=i)


class Chain:
    """One editing controller and observers at the same seam: `Chain(editor, *observers)`. The editor's output
    (or None) is what the UNet uses; each observer then sees the same q, k, v and its output is ignored (e.g.
    `Chain(prompt_to_prompt, store)` edits and records the unedited maps)."""

    def __init__(self, editor, *observers):
        self.editor = editor
        self.observers = observers

    def __call__(self, q, k, v, site: Site, step: int | None = None):
        out = self.editor(q, k, v, site, step=step)
        for observer in self.observers:
            observer(q, k, v, site, step=step)
        return out


# --------------------------------------------------------------------------------------------------------
# Observing


class AttentionStore:
    """Keeps head-averaged cross-attention maps per site, summed over every call it sees.

    `maps[key]` is (B, Nq, 77) fp32 for the rows in `rows` (all rows when None); `counts[key]` is how many
    calls were summed, so `mean(key)` is the average over steps. Self-attention is not stored (4096² per
    head at 64×64 is what minid never writes to memory).
    """

    def __init__(self, rows: list[int] | None = None):
        self.rows = rows  # batch rows to keep (e.g. the conditional half); None keeps all
        self.maps: dict[tuple, torch.Tensor] = {}
        self.counts: dict[tuple, int] = {}
        self.sites: dict[tuple, Site] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site,
                 step: int | None = None) -> torch.Tensor | None:
        if not site.is_cross:
            return None
        out, amap, _ = attention_with_map(q, k, v, want_map=True, want_lse=False)  # amap (B, Nq, Nk)
        amap = amap.detach().float()
        if self.rows is not None:
            amap = amap[self.rows]
        key = _site_key(site)
        if key in self.maps:
            self.maps[key] += amap
            self.counts[key] += 1
        else:
            self.maps[key] = amap.clone()
            self.counts[key] = 1
            self.sites[key] = site
        return out

    def mean(self, key: tuple) -> torch.Tensor:
        return self.maps[key] / self.counts[key]

    def at_sides(self, sides: tuple[int, ...]) -> list[tuple[Site, torch.Tensor]]:
        """(site, mean map (B, Nq, 77)) of every stored site whose query grid side is in `sides`."""
        return [(self.sites[key], self.mean(key)) for key in self.maps if self.sites[key].height in sides]


def word_map(store: AttentionStore, row: int, positions: list[int], latent_size: tuple[int, int],
             map_factors: tuple[int, ...] = (2, 4), pool: int = 3) -> torch.Tensor:
    """How much some tokens are attended to, per latent pixel, normalised to a maximum of 1 (1, 1, h, w).

    1. the stored maps at the layers whose side is latent side / f for f in `map_factors` ((2, 4) are the
       32×32 and 16×16 layers of a 512² image) are averaged over those layers (heads are already averaged);
    2. the columns `positions` are summed (a word may span several tokens);
    3. max-pooling with a `pool`×`pool` window (stride 1) closes small holes;
    4. upsampled to the latent grid and divided by its maximum.
    """
    h, w = latent_size
    sides = tuple(h // f for f in map_factors)
    found = store.at_sides(sides)
    if not found:
        have = sorted({s.height for s in store.sites.values()})
        raise ValueError(f"control.py: no stored cross-attention maps of side {sides} (latent {h}×{w}, "
                         f"map_factors {map_factors}); the store has sides {have}. Run the UNet with the "
                         f"store attached, or change map_factors")
    if not positions:
        raise ValueError("control.py: word_mask needs at least one token position")
    acc = torch.zeros(1, 1, h, w)
    for site, amap in found:
        m = amap[row][:, positions].sum(-1)  # (Nq,)
        m = m.reshape(1, 1, site.height, site.width)  # (1, 1, side, side)
        if pool > 1:
            m = F.max_pool2d(m, pool, stride=1, padding=pool // 2)
        acc += F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False).cpu()
    acc = acc / len(found)
    return acc / acc.amax().clamp_min(1e-12)


def word_mask(store: AttentionStore, row: int, positions: list[int], latent_size: tuple[int, int],
              map_factors: tuple[int, ...] = (2, 4), pool: int = 3, threshold: float = 0.3) -> torch.Tensor:
    """A binary region where some tokens are attended to, as prompt-to-prompt's local blend makes it:
    `word_map` thresholded at `threshold`. Returns (1, 1, h, w) with values 0. or 1."""
    return (word_map(store, row, positions, latent_size, map_factors, pool) > threshold).float()


# --------------------------------------------------------------------------------------------------------
# Prompt-to-prompt


class PromptToPrompt:
    """Prompt-to-prompt editing for a batch [source, target_1, …] (Hertz et al. 2022), conditional half only.

    - cross-attention, while the step is in the cross window: each target's columns come from the source's
      map through `alignment[i]` (see `tokenizer.prompt_alignment`; -1 keeps the target's column);
    - `reweight[i]` {position: factor}: the target's column is multiplied by the factor (done on V's row,
      which is the same thing: `(P ⊙ c) V = P (c ⊙ V)`), while the cross window is open, as in the authors'
      code, where the factor lives inside the replacement; `reweight_every_step=True` applies it at every step;
    - self-attention, while the step is in the self window and the map side is at most `self_max_side`: the
      target's map is the source's (`P_src V_tgt`, the map reading of injection). The two public conventions:
      the diffusers community pipeline injects up to 16² query positions (`self_max_side=16`, the default),
      PnPInversion's port up to 32² (`self_max_side=32`).
    The unconditional half runs unedited, as in the authors' code: guidance then amplifies the edit.
    Windows are fractions (start, end) of the pass, counted as the authors' code counts them
    (`ptp_utils.get_time_words_attention_alpha` and `AttentionControlEdit`): the cross window covers steps
    int(start·(N+1)) ≤ i < int(end·(N+1)), the self window int(start·N) ≤ i < int(end·N), N = `num_steps`.
    The step index comes with each call (`at_step`).
    """

    def __init__(self, layout: BatchLayout, alignment: list[torch.Tensor],
                 reweight: list[dict[int, float]] | None = None,
                 cross_window: tuple[float, float] = (0.0, 0.8), self_window: tuple[float, float] = (0.0, 0.4),
                 self_max_side: int = 16, num_steps: int = 50, reweight_every_step: bool = False):
        if len(alignment) != layout.branches - 1:
            raise ValueError(f"control.py: {layout.branches - 1} target branch(es) need as many alignments, "
                             f"got {len(alignment)}")
        self.layout = layout
        self.alignment = alignment
        self.reweight = reweight or [{} for _ in alignment]
        self.cross_window = cross_window
        self.self_window = self_window
        self.self_max_side = self_max_side
        self.num_steps = num_steps
        self.reweight_every_step = reweight_every_step

    def cross_active(self, step: int) -> bool:
        """Whether the cross-attention replacement acts at this step: int(start·(N+1)) ≤ step < int(end·(N+1))."""
        start, end = (int(f * (self.num_steps + 1)) for f in self.cross_window)
        return start <= step < end

    def self_active(self, step: int) -> bool:
        """Whether self-attention is injected at this step: int(start·N) ≤ step < int(end·N)."""
        start, end = (int(f * self.num_steps) for f in self.self_window)
        return start <= step < end

    def __call__(self, q, k, v, site: Site, step: int = 0):
        self.layout.check(q, site)
        lay = self.layout
        src = lay.row(0)
        if site.is_cross:
            edit_cross = self.cross_active(step)
            reweight = edit_cross or self.reweight_every_step
            if not edit_cross and not (reweight and any(self.reweight)):
                return None
            out = default_attention(q, k, v)
            for b in range(1, lay.branches):
                r = lay.row(b)
                v_t = v[r:r + 1]
                if reweight and self.reweight[b - 1]:
                    scale = torch.ones(v.shape[2], dtype=v.dtype, device=v.device)
                    for pos, factor in self.reweight[b - 1].items():
                        scale[pos] = factor
                    v_t = v_t * scale[:, None]  # (1, h, 77, d): column j of P scaled = row j of V scaled
                mapping = self.alignment[b - 1].to(q.device)
                if not edit_cross:
                    mapping = torch.full_like(mapping, -1)
                src_branch = torch.where(mapping >= 0, 0, -1)
                src_token = mapping.clamp_min(0)
                out[r:r + 1] = token_replace(q[r:r + 1], k[r:r + 1], v_t, sources=[(q[src:src + 1], k[src:src + 1])],
                                             src_branch=src_branch, src_token=src_token)
            return out
        if not self.self_active(step) or site.height > self.self_max_side:
            return None
        out = default_attention(q, k, v)
        for b in range(1, lay.branches):
            r = lay.row(b)
            out[r:r + 1] = default_attention(q[src:src + 1], k[src:src + 1], v[r:r + 1])  # P_src V_tgt
        return out


def local_blend(z_source: torch.Tensor, z_target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the source latent outside `mask` (1 inside): z_src + m ⊙ (z_tgt − z_src), P2P's local blend."""
    return z_source + mask * (z_target - z_source)


# --------------------------------------------------------------------------------------------------------
# EditedID attentional gating


@dataclass(frozen=True)
class GatingConfig:
    """Stage 3's attentional gating (EditedID Eq. 7-9; docs/editedid.md, Stage 3)."""

    mode: Literal["output", "map"] = "output"  # blend attention outputs (released code) or maps (Eq. 7-8)
    lambda_o: float = 0.5  # weight of O where M_O and M_E overlap ("co-existence" ≈ 0.5); λ_E = 1 − λ_O
    self_blocks: tuple[str, ...] = ("down", "mid")  # blocks whose self-attention is gated (paper A.5)
    self_sides: tuple[int, ...] | None = None  # query-grid sides gated (None: all of those blocks)
    self_steps: tuple[int, int] | None = None  # [start, end) steps with self-attention gating; None: all
    self_uncond: bool = True  # gate the unconditional row of T too

    def __post_init__(self):
        if self.mode not in ("output", "map"):
            raise ValueError(f"GatingConfig.mode must be 'output' or 'map', got {self.mode!r}")
        if not 0 <= self.lambda_o <= 1:
            raise ValueError(f"GatingConfig.lambda_o (λ_O) must be in [0, 1], got {self.lambda_o}")

    @property
    def lambda_e(self) -> float:
        """λ_E = 1 − λ_O: the rows of a mixed map stay normalised."""
        return 1.0 - self.lambda_o


def gating_weights(mask_o: torch.Tensor, mask_e: torch.Tensor, lambda_o: float, lambda_e: float,
                   side: tuple[int, int]) -> torch.Tensor:
    """Per-row weights (3, Nq) of the branches O, E, T for a query grid of `side` (Eq. 8).

    Exclusive to M_O: O; exclusive to M_E: E; in both: λ_O·O + λ_E·E; elsewhere T. Soft masks (values in
    (0, 1), e.g. after resizing) interpolate these four cases bilinearly, so each row's weights sum to 1
    whenever λ_O + λ_E = 1. Masks are resized by area averaging (a coarse cell is the fraction of it covered).
    """
    mo, me = (masks.to_resolution(m, side).reshape(-1) for m in (mask_o, mask_e))  # (Nq,) each
    w_o = mo * (1 - me) + lambda_o * mo * me
    w_e = me * (1 - mo) + lambda_e * mo * me
    w_t = (1 - mo) * (1 - me)
    return torch.stack([w_o, w_e, w_t])  # (3, Nq)


@dataclass
class EditedIDGating:
    """EditedID's attentional gating (Eq. 7-9) for one UNet batch of the branches (O, E, T).

    Self-attention (mask-selective), at sites whose block is in `config.self_blocks` (and side in
    `config.self_sides` when given) while the step is in `config.self_steps`: T's output rows are a per-row mix
    of the branches by `gating_weights`. `mode="output"` mixes each branch's attention output
    `Σ_s w_s ⊙ (P_s V_s)` (the authors' released fragment); `mode="map"` mixes the maps and multiplies by
    T's values `(Σ_s w_s ⊙ P_s) V_T` (paper Eq. 7-8). With `self_uncond` the same mix is applied to T's
    unconditional row (its null-text prediction then carries the same structure as its conditional one).
    Cross-attention (token-selective), at every site and step, conditional row only: T's columns at
    `id_tokens` come from O's map, those at `element_tokens` from E's; the rest stay T's.
    `id_tokens` / `element_tokens` are (T position, source position) pairs, found per prompt and aligned
    (`CLIPTokenizer.align_tokens`). Masks are (1, 1, h, w) at latent resolution, in [0, 1].
    The triple's rows are the branches `branch_o`, `branch_e`, `branch_t` of the layout (0, 1, 2 for a batch
    of one triple; a `GatingGroup` holds K triples in one batch).
    """

    layout: BatchLayout
    mask_o: torch.Tensor
    mask_e: torch.Tensor
    id_tokens: list[tuple[int, int]] = field(default_factory=list)
    element_tokens: list[tuple[int, int]] = field(default_factory=list)
    config: GatingConfig = GatingConfig()
    self_gating: bool = True  # False: no self-attention replacement (the "no entanglement" ablation)
    # Which implementation runs the fused edits: "auto" (Triton on CUDA, the PyTorch path otherwise), "triton"
    # or "torch" — the same semantics, so the pipeline's result does not depend on it beyond rounding.
    backend: str = "auto"
    num_tokens: int = 77
    branch_o: int = 0
    branch_e: int = 1
    branch_t: int = 2
    _weights: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        branches = (self.branch_o, self.branch_e, self.branch_t)
        if len(set(branches)) != 3 or not all(0 <= b < self.layout.branches for b in branches):
            raise ValueError(f"control.py: EditedIDGating needs three distinct branches O, E, T within the layout's "
                             f"{self.layout.branches}; found branch_o, branch_e, branch_t = {branches}")
        src_branch = torch.full((self.num_tokens,), -1, dtype=torch.long)
        src_token = torch.zeros(self.num_tokens, dtype=torch.long)
        for branch, pairs in ((0, self.id_tokens), (1, self.element_tokens)):
            for t_pos, s_pos in pairs:
                src_branch[t_pos] = branch
                src_token[t_pos] = s_pos
        self.src_branch, self.src_token = src_branch, src_token

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
            w = gating_weights(self.mask_o, self.mask_e, self.config.lambda_o, self.config.lambda_e, side)
            self._weights[side] = None if bool((w[2] == 1).all()) else w
        w = self._weights[side]
        return None if w is None else w.to(device)

    def __call__(self, q, k, v, site: Site, step: int = 0):
        self.layout.check(q, site)
        return self.edit(q, k, v, site, step, None)

    def edit(self, q, k, v, site: Site, step: int, out: torch.Tensor | None) -> torch.Tensor | None:
        """Write T's edited rows into `out`, the default attention of the whole batch (computed here when
        None and T needs an edit); returns `out`, still None when nothing is edited at this site."""
        lay = self.layout
        if site.is_cross:
            if not (self.src_branch >= 0).any():
                return out
            o, e, t = lay.row(self.branch_o), lay.row(self.branch_e), lay.row(self.branch_t)
            out = default_attention(q, k, v) if out is None else out
            out[t:t + 1] = token_replace(q[t:t + 1], k[t:t + 1], v[t:t + 1],
                                         sources=[(q[o:o + 1], k[o:o + 1]), (q[e:e + 1], k[e:e + 1])],
                                         src_branch=self.src_branch.to(q.device),
                                         src_token=self.src_token.to(q.device), backend=self.backend)
            return out
        if not self._self_active(site, step):
            return out
        w = self.weights(site, q.device)
        if w is None:
            return out
        halves = [True, False] if (self.config.self_uncond and lay.cfg) else [True]
        out = default_attention(q, k, v) if out is None else out
        for cond in halves:
            o, e, t = (lay.row(b, cond) for b in (self.branch_o, self.branch_e, self.branch_t))
            rows = [o, e, t]
            # The last entry of vs is T's values, what the map reading multiplies the mixed map by.
            out[t:t + 1] = masked_multi_source([q[r:r + 1] for r in rows], [k[r:r + 1] for r in rows],
                                               [v[r:r + 1] for r in rows], w.to(q.dtype), mode=self.config.mode,
                                               backend=self.backend)
        return out


class GatingGroup:
    """K (O, E, T) triples in one UNet batch (multi-person restoration), each gated by its own `EditedIDGating`.

    The layout has 3K branches in the order O_1 … O_K, E_1 … E_K, T_1 … T_K (so the batch is
    [uncond O_1 … T_K; cond O_1 … T_K]); gating k reads rows O_k, E_k and writes row T_k only, with its own
    masks, words and λ. The default attention of the whole batch is computed once and each triple's T rows
    are overwritten in place, so the triples never see each other.
    """

    def __init__(self, gatings: list[EditedIDGating]):
        if not gatings:
            raise ValueError("control.py: GatingGroup needs at least one EditedIDGating")
        layouts = {g.layout for g in gatings}
        if len(layouts) != 1:
            raise ValueError(f"control.py: the gatings of a GatingGroup must share one layout, found {layouts}")
        targets = [g.branch_t for g in gatings]
        if len(set(targets)) != len(targets):
            raise ValueError(f"control.py: two gatings of a GatingGroup write the same T branch: {targets}")
        self.gatings = gatings
        self.layout = gatings[0].layout

    def __call__(self, q, k, v, site: Site, step: int = 0):
        self.layout.check(q, site)
        out = None
        for g in self.gatings:
            out = g.edit(q, k, v, site, step, out)
        return out
