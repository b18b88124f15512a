"""The demo: a portrait, an edit whose face drifted, its restoration.

`demo` makes a complete EditedID example: generate a portrait, edit it with prompt-to-prompt (add an
element) while fresh noise in the subject's region makes the face drift to another identity, restore
it, and save everything.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from minid.imaging import images
from minid.method.control import AttentionStore, BatchLayout, Chain, word_mask
from minid.method.editedid import EditedIDConfig, progress_bar
from minid.method.prompt_to_prompt import PromptToPrompt, local_blend, prompt_alignment
from minid.restore.config import RestoreConfig
from minid.restore.pipeline import EditedID
from minid.restore.report import RESULT_FILES, check_result_folder, labelled_row
from minid.sampling.guided import reconstruct
from minid.sampling.hybrid import HybridSchedule
from minid.sampling.schedule import NoiseSchedule
from minid.sampling.text_to_image import solver_plan

# what `demo` writes in its folder
DEMO_FILES = RESULT_FILES + ("original.png", "edited.png", "comparison.png")


@torch.no_grad()
def _edit_with_drift(
    sd, plan, z_T, prompt, prompt_edited, subject_word, element_word, guidance, seed, drift, bar
):
    """Prompt-to-prompt refine from `prompt` to `prompt_edited`, with fresh noise in the subject's
    region.

    Branch 0 regenerates the original, branch 1 the edit; the subject's region of branch 1's start
    latent is re-drawn (weight `drift`), so its face comes out as another identity while the layout
    is kept. `bar(n)` (or None) counts the steps of both passes. Returns the edited image and the
    subject region (latent size) used.
    """
    tok = sd.tokenizer
    device = z_T.device
    ids = tok(["", "", prompt, prompt_edited]).to(device)
    ctx = sd.text_encoder(ids).to(z_T.dtype)
    uncond, cond = ctx[:2], ctx[2:]
    guided = guidance != 1.0  # guidance 1 is ε(c) alone: no unconditional half in the batch
    layout = BatchLayout(2, cfg=guided)
    # First pass: cross-attention of the original to locate the subject.
    store = AttentionStore(rows=[BatchLayout(1, cfg=guided).row(0)])  # its conditional row
    reconstruct(
        sd.unet,
        plan,
        z_T,
        cond[0:1],
        uncond[0:1],
        guidance,
        controller=store,
        on_step=_counted(bar),
    )
    side = tuple(z_T.shape[-2:])
    region = word_mask(store, 0, tok.token_positions(prompt, subject_word), side)
    g = torch.Generator().manual_seed(seed + 1)
    fresh = torch.randn(z_T.shape, generator=g).to(device, z_T.dtype)
    # variance-preserving re-draw inside the region: sqrt(1−drift) z + sqrt(drift) ε (region is 0 or
    # 1)
    z_edit = z_T * (1 - region) + region * ((1 - drift) ** 0.5 * z_T + drift**0.5 * fresh)
    p2p = PromptToPrompt(
        layout,
        [prompt_alignment(tok, prompt, prompt_edited, "refine")],
        cross_window=(0.0, 0.8),
        self_window=(0.0, 0.2),
        num_steps=len(plan.steps),
    )
    elem_positions = tok.token_positions(prompt_edited, element_word)
    blend_store = AttentionStore()  # the element's cross-attention, for the local blend
    z = torch.cat([z_T, z_edit])

    def on_step(i, z):
        if bar is not None:
            bar(1)
        # local blend on the element: the edit changes the element region and the re-drawn subject
        # only
        try:
            m = word_mask(blend_store, layout.row(1), elem_positions, side)
        except ValueError:
            return z
        m = torch.maximum(m.to(z.device, z.dtype), region)
        return torch.cat([z[0:1], local_blend(z[0:1], z[1:2], m)])

    latents = reconstruct(
        sd.unet,
        plan,
        z,
        cond,
        uncond,
        guidance,
        controller=Chain(p2p, blend_store),
        on_step=on_step,
    )
    image = sd.vae.decode_latent(latents[-1][1:2]).float().clamp(-1, 1).cpu()
    return image, region


def _counted(bar):
    """An `on_step` that counts a step on `bar` and keeps z (None without a bar)."""
    if bar is None:
        return None

    def on_step(i, z):
        bar(1)
        return z

    return on_step


def demo(
    sd,
    out_dir: str | Path,
    prompt: str = "a photo of a man",
    subject_word: str = "man",
    element: str = "black glasses",
    element_word: str = "glasses",
    seed: int = 0,
    num_steps: int = 6,
    generate_steps: int = 20,
    size: int = 512,
    drift: float = 0.8,
    config: RestoreConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Generate a portrait, edit it with prompt-to-prompt (add `element`) while its face drifts to
    another identity (fresh noise in the face region), restore it with EditedID, and save
    everything.

    Writes original.png, edited.png, restored.png, comparison.png (side by side), masks, the w
    schedule (JSON, PNG) and attention grids under `out_dir`; returns their paths. Files of those
    names already there are refused before any work unless `overwrite`.
    """
    out = Path(out_dir)
    # before any work: the files it writes, refused where they exist unless `overwrite`
    check_result_folder(out, overwrite=overwrite, what="out_dir", names=DEMO_FILES)
    prompt_edited = f"{prompt} wearing {element}"
    device = next(sd.unet.parameters()).device
    dtype = next(sd.unet.parameters()).dtype
    plan = solver_plan("ddim", generate_steps, NoiseSchedule.scaled_linear())
    g = torch.Generator().manual_seed(seed)
    z_T = torch.randn(1, sd.unet.cfg.in_channels, size // 8, size // 8, generator=g).to(
        device, dtype
    )
    ctx = sd.text_encoder(sd.tokenizer(["", prompt]).to(device)).to(dtype)
    steps = len(plan.steps)
    with torch.no_grad(), progress_bar(progress, steps, "demo 1/2 generate") as bar:
        z0 = reconstruct(sd.unet, plan, z_T, ctx[1:2], ctx[0:1], 7.5, on_step=_counted(bar))[-1]
        original = sd.vae.decode_latent(z0).float().clamp(-1, 1).cpu()
    with progress_bar(progress, 2 * steps, "demo 2/2 edit") as bar:
        edited, _ = _edit_with_drift(
            sd, plan, z_T, prompt, prompt_edited, subject_word, element_word, 7.5, seed, drift, bar
        )
    cfg = config or RestoreConfig(
        EditedIDConfig(solver=HybridSchedule(num_steps=num_steps)), image_size=size
    )
    if cfg.image_size != size:
        cfg = dataclasses.replace(cfg, image_size=size)
    result = EditedID(sd, cfg).restore(
        original,
        edited,
        prompt,
        prompt_edited,
        id_words=[subject_word],
        element_words=[element_word],
        seed=seed,
        progress=progress,
        save_intermediates=out,
        overwrite=overwrite,
    )
    paths = dict(result.paths)
    paths["original"] = images.save_image(original, out / "original.png")
    paths["edited"] = images.save_image(edited, out / "edited.png")
    panel = labelled_row(
        [
            ("original", images.tensor_to_pil(original)),
            (f"edited (+ {element}, face drifted)", images.tensor_to_pil(edited)),
            ("restored (EditedID)", result.pil),
        ]
    )
    paths["comparison"] = images.save_image(panel, out / "comparison.png")
    return paths


PAPER_GENERATE_STEPS = 20  # the demo's generation and edit on a GPU


CPU_GENERATE_STEPS = 10  # on a CPU, where every full-size UNet call costs seconds


def demo_unet_images(generate_steps: int, method: EditedIDConfig) -> dict[str, int]:
    """How many images the demo sends through the UNet, per phase: a batch of B counts B, and a call
    that is differentiated counts 3 (its backward costs about two forwards). Null-text is counted at
    its most (`inner_steps` updates at every step; early stops only make it cheaper)."""
    g, n = generate_steps, method.num_steps
    halves = 1 if method.guidance == 1.0 else 2  # guidance 1: ε(c) alone, nothing to optimise
    # ε(c); updates; the kept ∅'s ε̃
    stage2 = {
        "null-text": 2 * n + (n * (3 * 2 * method.null_text.inner_steps + 2) if halves == 2 else 0),
        "direct": 2 * n,
        "negative-prompt": 2 * n,
    }[method.inversion]
    return {
        "generate": 2 * g,  # [uncond; cond]
        "edit": 2 * g + 4 * g,  # the subject's maps, then source and edit with guidance
        # O and E; O, E, T with guidance
        "align": 2 * n,
        "disentangle": stage2,
        "entangle": 3 * halves * n,
    }


@torch.no_grad()
def seconds_per_unet_image(sd, size: int, repeats: int = 1) -> float:
    """The time one image takes through the UNet at this working size, measured on a batch of two
    (the median of `repeats` calls after one that warms up)."""
    device = next(sd.unet.parameters()).device
    dtype = next(sd.unet.parameters()).dtype
    z = torch.zeros(2, sd.unet.cfg.in_channels, size // 8, size // 8, device=device, dtype=dtype)
    context = sd.text_encoder(sd.tokenizer(["", ""]).to(device)).to(dtype)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sd.unet(z, 500, context)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) / 2


def demo_settings(
    device: str, method: EditedIDConfig, paper_settings: bool = False
) -> tuple[int, EditedIDConfig]:
    """(generation steps, method) of the demo: the paper's on a GPU or when asked for; on a CPU,
    fewer generation steps and direct inversion, which finish in minutes instead of hours."""
    if paper_settings or not str(device).startswith("cpu"):
        return PAPER_GENERATE_STEPS, method
    return CPU_GENERATE_STEPS, dataclasses.replace(method, inversion="direct")
