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
EditedID's own controller, the attentional gating of Stage 3, lives in gating.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minid.attention import Site, attention_with_map, default_attention, token_replace


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
