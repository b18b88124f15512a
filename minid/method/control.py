"""Attention controllers: observe or edit the UNet's attention at the seam of
`minid.models.attention`.

A controller is a callable `controller(q, k, v, site) -> out | None` passed to one `UNet.forward`
call; q is (B, heads, Nq, d), k and v (B, heads, Nk, d). Returning None lets the default attention
run.

Batch layout (every controller here knows it explicitly, through `BatchLayout`):
the UNet batch holds `branches` images (for EditedID: O, E, T in that order; for prompt-to-prompt:
the source first, then the edited prompts). With classifier-free guidance the batch is the
unconditional half followed by the conditional half, each in branch order:

    cfg=True:   [uncond b0, uncond b1, …, uncond b(n-1), cond b0, cond b1, …, cond b(n-1)]
    cfg=False:  [cond b0, …, cond b(n-1)]

Edits never write attention maps to memory: replacing rows of a self-attention map and taking token
columns of a cross-attention map are both linear in V (`(Σ_s w_s ⊙ P_s) V = Σ_s w_s ⊙ (P_s V)`;
`P[:, J] V[J]`), which the fused ops of `minid.models.attention` exploit. Cross-attention maps (77
columns) are cheap and are the only maps stored.

Controllers here:
- `AttentionStore`: head-averaged cross-attention maps per site, summed over calls.
- `word_map` / `word_mask`: a map / region from the stored maps of some words (P2P's local blend).
Prompt-to-prompt's controller lives in prompt_to_prompt.py; EditedID's own, the attentional gating
of Stage 3, in gating.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minid.kernels.dispatch import attention_with_map
from minid.models.attention import Site


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
            raise ValueError(f"branch {branch} outside 0..{self.branches - 1}")
        if not cond and not self.cfg:
            raise ValueError("the layout has no unconditional half (cfg=False)")
        return branch + (self.branches if self.cfg and cond else 0)

    def check(self, q: torch.Tensor, site: Site) -> None:
        if q.shape[0] != self.size:
            raise ValueError(
                f"at {site} the batch has {q.shape[0]} rows, the controller's layout "
                f"expects {self.size} ({self.branches} branches, cfg={self.cfg}); build the "
                f"controller with the layout of the UNet call"
            )


def _site_key(site: Site) -> tuple:
    return (site.block, site.level, site.index, site.kind)


class Chain:
    """One editing controller and observers at the same seam: `Chain(editor, *observers)`. The
    editor's output (or None) is what the UNet uses; each observer then sees the same q, k, v and
    its output is ignored (e.g. `Chain(prompt_to_prompt, store)` edits and records the unedited
    maps)."""

    def __init__(self, editor, *observers):
        self.editor = editor
        self.observers = observers

    def __call__(self, q, k, v, site: Site, step: int | None = None):
        out = self.editor(q, k, v, site, step=step)
        for observer in self.observers:
            observer(q, k, v, site, step=step)
        return out


# --------------------------------------------------------------------------------------------------
# Observing


class AttentionStore:
    """Keeps head-averaged cross-attention maps per site, summed over every call it sees.

    `maps[key]` is (B, Nq, 77) fp32 for the rows in `rows` (all rows when None); `counts[key]` is
    how many calls were summed, so `mean(key)` is the average over steps. Self-attention is not
    stored (4096² per head at 64×64 is what minid never writes to memory).
    """

    def __init__(self, rows: list[int] | None = None):
        self.rows = rows  # batch rows to keep (e.g. the conditional half); None keeps all
        self.maps: dict[tuple, torch.Tensor] = {}
        self.counts: dict[tuple, int] = {}
        self.sites: dict[tuple, Site] = {}

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site, step: int | None = None
    ) -> torch.Tensor | None:
        if not site.is_cross:
            return None
        # amap (B, Nq, Nk)
        out, amap, _ = attention_with_map(q, k, v, want_map=True, want_lse=False)
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
        return [
            (self.sites[key], self.mean(key))
            for key in self.maps
            if self.sites[key].height in sides
        ]


def word_map(
    store: AttentionStore,
    row: int,
    positions: list[int],
    latent_size: tuple[int, int],
    map_factors: tuple[int, ...] = (2, 4),
    pool: int = 3,
) -> torch.Tensor:
    """How much some tokens are attended to, per latent pixel, normalised to a maximum of 1 (1, 1,
    h, w).

    1. the stored maps at the layers whose side is latent side / f for f in `map_factors` ((2, 4)
       are the 32×32 and 16×16 layers of a 512² image) are averaged over those layers (heads are
       already averaged);
    2. the columns `positions` are summed (a word may span several tokens);
    3. max-pooling with a `pool`×`pool` window (stride 1) closes small holes;
    4. upsampled to the latent grid and divided by its maximum.
    """
    h, w = latent_size
    sides = tuple(h // f for f in map_factors)
    found = store.at_sides(sides)
    if not found:
        have = sorted({s.height for s in store.sites.values()})
        raise ValueError(
            f"no stored cross-attention maps of side {sides} (latent {h}×{w}, "
            f"map_factors {map_factors}); the store has sides {have}. Run the UNet with the "
            f"store attached, or change map_factors"
        )
    if not positions:
        raise ValueError("word_mask needs at least one token position")
    acc = torch.zeros(1, 1, h, w)
    for site, amap in found:
        m = amap[row][:, positions].sum(-1)  # (Nq,)
        m = m.reshape(1, 1, site.height, site.width)  # (1, 1, side, side)
        if pool > 1:
            m = F.max_pool2d(m, pool, stride=1, padding=pool // 2)
        acc += F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False).cpu()
    acc = acc / len(found)
    return acc / acc.amax().clamp_min(1e-12)


def word_mask(
    store: AttentionStore,
    row: int,
    positions: list[int],
    latent_size: tuple[int, int],
    map_factors: tuple[int, ...] = (2, 4),
    pool: int = 3,
    threshold: float = 0.3,
) -> torch.Tensor:
    """A binary region where some tokens are attended to, as prompt-to-prompt's local blend makes
    it: `word_map` thresholded at `threshold`. Returns (1, 1, h, w) with values 0. or 1."""
    return (word_map(store, row, positions, latent_size, map_factors, pool) > threshold).float()


# --------------------------------------------------------------------------------------------------
# Prompt-to-prompt
