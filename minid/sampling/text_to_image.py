"""Text to image with minid's solvers: classifier-free-guided sampling from seeded noise
(`generate`)."""

from __future__ import annotations

import math

import torch

from minid.models.vae import MIN_SIDE
from minid.sampling.guided import MAX_GUIDANCE, check_finite, reconstruct
from minid.sampling.hybrid import HybridSchedule, hybrid_plan
from minid.sampling.plans import Plan, ddim_plan
from minid.sampling.schedule import NoiseSchedule, max_num_steps

SOLVERS = ("ddim", "dpm", "hybrid")


def solver_plan(solver: str, num_steps: int, schedule: NoiseSchedule) -> Plan:
    """The plan of a text-to-image pass: DDIM, DPM-Solver++ on every step, or EditedID's hybrid
    default."""
    if solver == "ddim":
        return ddim_plan(schedule, num_steps)
    if solver == "dpm":
        return hybrid_plan(
            schedule, HybridSchedule(num_steps=num_steps, dpm_start=1, dpm_end=num_steps)
        )
    if solver == "hybrid":
        return hybrid_plan(schedule, HybridSchedule(num_steps=num_steps))
    raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")


def max_steps(solver: str) -> int:
    """The most steps `solver` may take on SD1.4's schedule (`schedule.max_num_steps`): 999, for
    DDIM and for the default λ-uniform DPM-Solver++ times (diffusers' "leading" ones would allow
    998)."""
    dpm = None if solver == "ddim" else HybridSchedule().dpm_spacing
    return max_num_steps(NoiseSchedule.scaled_linear(), HybridSchedule().ddim_spacing, dpm)


def check_generate(
    num_steps: int,
    guidance: float,
    solver: str,
    size: int,
    names=("num_steps", "guidance", "solver", "size"),
) -> None:
    """The checks of `generate`'s numbers, before any model runs; `names` says them in the caller's
    words (the command line's flags)."""
    if solver not in SOLVERS:
        raise ValueError(f"{names[2]} must be one of {', '.join(SOLVERS)}, got {solver!r}")
    most = max_steps(solver)
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= most:
        raise ValueError(
            f"{names[0]} must be an integer from 1 to {most} with {names[2]} {solver} (one model "
            f"call per step, on the schedule's timesteps), got {num_steps!r}"
        )
    if (
        not isinstance(guidance, (int, float))
        or not math.isfinite(guidance)
        or not 0 < guidance <= MAX_GUIDANCE
    ):
        raise ValueError(
            f"{names[1]} must be a number in (0, {MAX_GUIDANCE:g}] (SD's default is 7.5), got "
            f"{guidance!r}"
        )
    if not isinstance(size, int) or size % 8 or size < MIN_SIDE:
        raise ValueError(
            f"{names[3]} must be a multiple of 8 (the VAE's factor) of at least {MIN_SIDE}, got "
            f"{size!r}"
        )


@torch.no_grad()
def generate(
    sd,
    prompt: str,
    num_steps: int = 50,
    guidance: float = 7.5,
    solver: str = "ddim",
    seed: int = 0,
    size: int = 512,
    negative_prompt: str = "",
    return_latents: bool = False,
    progress: bool = False,
):
    """Text to image: CFG sampling from seeded noise. Returns (1, 3, size, size) in [-1, 1]
    (and the latent trajectory when `return_latents`). A prompt beyond the text encoder's 75 tokens
    is cut off, as SD does (`CLIPTokenizer.dropped_text` says what). `progress`: a tqdm bar over the
    steps."""
    check_generate(num_steps, guidance, solver, size)
    device = next(sd.unet.parameters()).device
    dtype = next(sd.unet.parameters()).dtype
    plan = solver_plan(solver, num_steps, NoiseSchedule.scaled_linear())
    ids = sd.tokenizer([negative_prompt, prompt]).to(device)
    ctx = sd.text_encoder(ids).to(dtype)
    g = torch.Generator().manual_seed(seed)
    c = sd.unet.cfg.in_channels
    z = torch.randn(1, c, size // 8, size // 8, generator=g).to(device, dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(plan.steps), desc=f"minid generate ({solver})", unit="step", leave=False
        )
    try:
        latents = reconstruct(
            sd.unet,
            plan,
            z,
            ctx[1:2],
            ctx[0:1],
            guidance,
            on_step=None if bar is None else (lambda i, z: (bar.update(), z)[1]),
        )
    finally:
        if bar is not None:
            bar.close()
    models = {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder}
    check_finite(latents[-1], "latents", "sampling", models, guidance)
    image = sd.vae.decode_latent(latents[-1]).float()
    check_finite(image, "image", "the VAE decoder", models, guidance)
    image = image.clamp(-1, 1).cpu()
    return (image, latents) if return_latents else image


# --------------------------------------------------------------------------------------------------
# What the demo costs, before it runs
