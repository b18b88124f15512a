"""SD's classifier-free-guided loops: the guided noise prediction, plain inversion and
reconstruction.

- `guided_eps`: ε̃ = ε(∅) + s (ε(c) − ε(∅)), both halves in one UNet batch.
- `invert`: DDIM (or hybrid-solver) inversion with guidance 1, conditional prompt only: the
  trajectory z_0 … z_N ("pivots").
- `reconstruct`: the guided pass z_T → z_0 with per-step (or one) unconditional embeddings; text to
  image and EditedID's Stage 3 run it.

Each is one pass of the one sampling or inversion loop of samplers.py with its own model function.
"""

from __future__ import annotations

from typing import Callable

import torch

from minid.models.attention import at_step
from minid.sampling.plans import Plan
from minid.sampling.samplers import cfg, invert_loop, sample_loop


# The largest guidance scale a pass accepts: SD is run at 1-20; far past that, ε̃ overflows (fp16
# near 65504) or the image saturates to black or white
MAX_GUIDANCE = 100.0


def first_nonfinite_weight(models: dict) -> str | None:
    """`name.parameter` of the first weight (or buffer) holding NaN or infinite values among
    `models` (name -> nn.Module), or None when every one is finite."""
    for name, model in models.items():
        for key, value in (*model.named_parameters(), *model.named_buffers()):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"{name}.{key}"
    return None


def check_finite(x: torch.Tensor, what: str, stage: str, models: dict, guidance: float) -> None:
    """Raise a one-line ValueError when `x` holds NaN or infinite values: `what` became non-finite
    in `stage`, with the likely cause: a weight of `models` that is not finite (the weights file is
    damaged), else the guidance or the dtype's range (fp16 overflows first)."""
    if bool(torch.isfinite(x).all()):
        return
    bad = first_nonfinite_weight(models)
    if bad is not None:
        cause = f"the weights hold NaN or infinite values ({bad}): download or convert them again"
    else:
        cause = (
            f"guidance {guidance:g} or the range of {str(x.dtype).removeprefix('torch.')} "
            f"overflowed: lower the guidance (SD's default is 7.5) or run in fp32"
        )
    raise ValueError(f"the {what} became NaN or infinite in {stage}; {cause}; nothing was written")


def guided_eps(
    unet,
    z: torch.Tensor,
    t,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    scale: float,
    controller=None,
) -> torch.Tensor:
    """ε̃ = ε(∅) + s (ε(c) − ε(∅)) with both halves in one batch [uncond; cond] (the controllers'
    layout); scale 1 is ε(c) alone, one UNet call on the conditional half."""
    if scale == 1.0:
        return unet(z, t, cond, controller=controller)
    both = unet(torch.cat([z, z]), t, torch.cat([uncond, cond]), controller=controller)
    e_u, e_c = both.chunk(2)
    return cfg(e_u, e_c, scale)


@torch.no_grad()
def invert(
    unet,
    plan: Plan,
    z0: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    progress: Callable | None = None,
) -> list[torch.Tensor]:
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
def reconstruct(
    unet,
    plan: Plan,
    z_T: torch.Tensor,
    cond: torch.Tensor,
    null_embeddings,
    guidance: float,
    controller=None,
    on_step: Callable | None = None,
) -> list[torch.Tensor]:
    """Guided reconstruction z_T → z_0 with per-step ∅ (a list of (B, 77, D)) or one fixed (B, 77,
    D).

    The UNet batch is [uncond; cond] (`BatchLayout(B, cfg=True)`), at guidance 1 cond alone
    (`BatchLayout(B, cfg=False)`); the controller is called with the step index (`at_step`).
    `on_step(i, z)` may return a new z (blending). Returns z_T … z_0.
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
