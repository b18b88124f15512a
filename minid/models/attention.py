"""The attention seam: every attention call of the UNet goes through `attention()` here.

A call names its `Site` (where in the UNet it happens) and may carry a `controller`: an object the
caller passes to `UNet.forward` for one call, which sees every site and may return a replacement
output. There is no global state and no monkeypatching: a UNet called without a controller is plain
Stable Diffusion.

Shapes: q is (B, heads, Nq, d), k and v are (B, heads, Nk, d); the output is (B, heads, Nq, d).
For self-attention Nq = Nk = height·width of the feature map; for cross-attention Nk = 77 text
tokens.

What a controller may call instead of materialising attention maps (forward-exact rewrites with
Triton kernels beside their PyTorch paths) is `minid.kernels.dispatch`: `attention_with_map`,
`masked_multi_source`, `token_replace`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from minid.kernels.accounting import op_range


@dataclass(frozen=True)
class Site:
    """Where an attention call happens.

    SD1.4 has 16 transformer blocks (6 down, 1 mid, 9 up), each with one self- and one
    cross-attention, so 32 sites per UNet call. `index` counts transformer blocks in forward order
    (0..15).
    """

    block: Literal["down", "mid", "up"]  # the UNet half the transformer block sits in
    # resolution level of the block within its half (down 0 = highest resolution; up 0 = lowest)
    level: int
    index: int  # running index of the transformer block in forward order, 0..15 for SD1.4
    kind: Literal["self", "cross"]  # attn1 is self-attention, attn2 cross-attention to the text
    height: int = 0  # side lengths of the query grid at this call (64×64 … 8×8 for a 512² image)
    width: int = 0

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"

    @property
    def resolution(self) -> int:
        """Query-grid side (height), the number the papers use to name a layer (64, 32, 16, 8)."""
        return self.height

    def at(self, height: int, width: int) -> "Site":
        return dataclasses.replace(self, height=height, width=width)


class AttentionController(Protocol):
    """What a controller is: called at every site with that call's q, k, v.

    Return a tensor of q's shape to replace the attention output, or None to let the default
    attention run. A controller that only observes computes what it needs (for example a
    head-averaged cross-attention map) and returns None.
    """

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site
    ) -> torch.Tensor | None: ...


def default_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v without a mask, through PyTorch's fused SDPA (a profiler sees it
    as the range `minid.attention op=sdpa …`, minid.kernels.accounting)."""
    with op_range("sdpa", q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    site: Site | None = None,
    controller: AttentionController | None = None,
) -> torch.Tensor:
    """The one entry point the models use. (B, h, Nq, d), (B, h, Nk, d), (B, h, Nk, d) -> (B, h, Nq,
    d)."""
    if controller is not None and site is not None:
        out = controller(q, k, v, site)
        if out is not None:
            if out.shape != q.shape[:-1] + v.shape[-1:]:
                raise ValueError(
                    f"controller {type(controller).__name__} at {site} returned shape "
                    f"{tuple(out.shape)}, expected {tuple(q.shape[:-1] + v.shape[-1:])}"
                )
            return out
    return default_attention(q, k, v)


def at_step(controller, i: int):
    """The controller as one UNet call at step i sees it: `controller(q, k, v, site, step=i)` (a
    `functools.partial`, so `.func` and `.keywords["step"]` say what it binds). The sampling loops
    pass the step index to the model function, which binds it here; None stays None."""
    return None if controller is None else functools.partial(controller, step=i)
