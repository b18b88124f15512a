"""EditedID: restore the original's face identity in an edited photo, keeping the edit (ALGORITHM.md).

    original I_O, edited I_E ──VAE──▶ z_0^O, z_0^E
      Stage 1, alignment      adaptive-mixing inversion of both (guidance 1) ─▶ pivots^O, pivots^E, shared z_T
      Stage 2, disentangling  dual null-text optimisation along the pivots with the hybrid solver ─▶ ∅_O,i, ∅_E,i
      (masks)                 M_O, M_E from the user, or from the cross-attention maps of the words in Stage 2
      Stage 3, entangling     three branches (O, E, T) from z_T with attentional gating, blending outside the
                              dilated mask union ─▶ z_0^T ──VAE──▶ restored image

`EditedID(sd, config).restore(...)` runs it; the three stages are methods of their own (`align`,
`disentangle`, `entangle`) so each can be studied and tested alone. `generate` is plain text-to-image with
the same solvers, and `demo` makes a complete example (original, an edit whose face drifted, restoration).
The ablations of the paper's Table 7 are one switch, `EditedIDConfig.ablation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from minid import images
from minid.control import (AttentionStore, BatchLayout, EditedIDGating, PromptToPrompt, local_blend,
                           prompt_alignment, word_map, word_mask)
from minid.inversion import InversionConfig, adaptive_mixing_inversion, null_text_optimization, psnr, reconstruct
from minid.schedule import NoiseSchedule

Ablation = Literal["none", "baseline", "no_alignment", "no_disentanglement", "no_entanglement"]


@dataclass(frozen=True)
class EditedIDConfig:
    """Every default of ALGORITHM.md, one field each. `ablation` switches whole components off (Table 7)."""

    # The ablations of Table 7: "baseline" = independent null-text inversions (DDIM) + prompt-to-prompt
    # cross-attention fusion starting from z_T^O; "no_alignment" = no mixing, two separate inversions (T
    # starts from z_T^E); "no_disentanglement" = DDIM only, no hybrid solver; "no_entanglement" = no
    # self-attention gating, cross-attention tokens only.
    ablation: Ablation = "none"
    image_size: int = 512  # side of the square the models work on (SD1.4: 512)
    num_steps: int = 6  # N, steps of inversion and of reconstruction
    guidance: float = 7.5  # classifier-free guidance of reconstruction
    # Hybrid solver (Eq. 5-6): DPM-Solver++ on reconstruction steps τ_s..τ_e (1-based from noise), DDIM else.
    dpm_start: int = 5
    dpm_end: int = 6
    global_presetting: bool = True  # False: the "fragmented" schedule the paper shows breaking at the switch
    dpm_spacing: Literal["logSNR", "linspace"] = "logSNR"  # DPM-Solver++ timesteps, uniform in λ by default
    dpm_order: int = 2  # DPM-Solver++ multistep order
    # Stage 1, adaptive mixing (Eq. 1-3).
    w0: float = 0.04  # initial mixing weight (the paper's optimum; larger blends identities)
    w_lr: float = 0.05  # gradient-descent step of w on the alignment loss
    w_iterations: int = 1  # updates of w per inversion step
    # Stage 2, null-text optimisation (Mokady et al. 2023 defaults).
    null_inner_steps: int = 10  # Adam updates per step at most
    null_lr: float = 1e-2  # initial Adam learning rate, decayed as lr·(1 − i'/100)
    null_epsilon: float = 1e-5  # early stop when loss < null_epsilon + i·null_epsilon_growth
    null_epsilon_growth: float = 2e-5
    # Stage 3, attentional gating (Eq. 7-9).
    gating_mode: Literal["output", "map"] = "output"  # blend attention outputs (released code) or maps (Eq. 7-8)
    lambda_o: float = 0.5  # weight of O where M_O and M_E overlap ("co-existence" ≈ 0.5)
    lambda_e: float = 0.5  # weight of E there; λ_O + λ_E = 1
    self_blocks: tuple[str, ...] = ("down", "mid")  # blocks whose self-attention is gated (paper A.5)
    self_sides: tuple[int, ...] | None = None  # query-grid sides gated (None: all of those blocks)
    self_steps: tuple[int, int] | None = None  # [start, end) steps with self-attention gating; None: all
    self_uncond: bool = True  # gate the unconditional row of T too
    target: Literal["edited", "original"] = "edited"  # T's prompt and null-text: E's (default) or O's
    blend: bool = True  # Blended-Diffusion step: keep E's latent outside the dilated mask union
    blend_dilation: int = 1  # latent pixels the mask union grows by before blending
    # Masks from cross-attention (when no mask image is given): P2P local blend.
    mask_map_factors: tuple[int, ...] = (2, 4)  # latent side / map side: the 32² and 16² layers at 512²
    mask_pool: int = 3  # max-pool window
    mask_threshold: float = 0.3  # of the normalised map
    sample_posterior: bool = False  # encode with a posterior sample (seeded) instead of its mean

    def __post_init__(self):
        if self.ablation not in ("none", "baseline", "no_alignment", "no_disentanglement", "no_entanglement"):
            raise ValueError(f"editedid.py: EditedIDConfig.ablation={self.ablation!r}; expected one of 'none', "
                             "'baseline', 'no_alignment', 'no_disentanglement', 'no_entanglement'")
        if not 1 <= self.dpm_start <= self.dpm_end <= self.num_steps:
            raise ValueError(f"editedid.py: need 1 ≤ dpm_start ≤ dpm_end ≤ num_steps, got {self.dpm_start}, "
                             f"{self.dpm_end}, {self.num_steps}")
        if self.image_size % 8:
            raise ValueError(f"editedid.py: image_size must be a multiple of 8 (the VAE's factor), got "
                             f"{self.image_size}")

    # what the ablation leaves on
    @property
    def uses_alignment(self) -> bool:
        return self.ablation not in ("no_alignment", "baseline")

    @property
    def uses_hybrid(self) -> bool:
        return self.ablation not in ("no_disentanglement", "baseline")

    @property
    def uses_self_gating(self) -> bool:
        return self.ablation not in ("no_entanglement", "baseline")

    def inversion_config(self) -> InversionConfig:
        return InversionConfig(num_steps=self.num_steps, solver="hybrid" if self.uses_hybrid else "ddim",
                               dpm_start=self.dpm_start, dpm_end=self.dpm_end,
                               global_presetting=self.global_presetting, dpm_spacing=self.dpm_spacing,
                               dpm_order=self.dpm_order, guidance=self.guidance, inner_steps=self.null_inner_steps,
                               lr=self.null_lr, epsilon=self.null_epsilon,
                               epsilon_growth=self.null_epsilon_growth, w0=self.w0, w_lr=self.w_lr,
                               w_iterations=self.w_iterations)


@dataclass
class RestoreResult:
    image: torch.Tensor  # (1, 3, S, S) in [-1, 1], the restored edited image
    reconstructions: dict[str, torch.Tensor]  # "original", "edited": Stage 2's reconstructions
    psnr: dict[str, float]  # each reconstruction against its input, dB
    masks: dict[str, torch.Tensor]  # "face" (M_O), "element" (M_E) at image size; "blend" at latent size
    w_schedule: list[float]  # Stage 1's mixing weights, one per inversion step
    timings: dict[str, float]  # seconds per stage
    notes: list[str] = field(default_factory=list)  # what was adjusted (mask resized, …)
    latent: torch.Tensor | None = None  # z_0^T
    null_text: list = field(default_factory=list)  # Stage 2's per-step statistics
    attention_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # word -> (h, w) averaged cross map
    paths: dict[str, Path] = field(default_factory=dict)  # files written by save_intermediates

    @property
    def pil(self):
        return images.tensor_to_pil(self.image)


@dataclass
class Alignment:
    pivots_o: list[torch.Tensor]
    pivots_e: list[torch.Tensor]
    w_schedule: list[float]


@dataclass
class Disentanglement:
    null_o: list[torch.Tensor]  # per step (1, 77, D)
    null_e: list[torch.Tensor]
    z_T_o: torch.Tensor
    z_T_e: torch.Tensor
    z0: torch.Tensor  # (2, 4, h, w): the reconstructions of O and E
    store: AttentionStore  # cross-attention maps of the conditional calls, rows O, E
    steps: list


def _progress(enabled: bool, total: int, desc: str):
    """A tqdm bar when enabled (tqdm is imported only then), else a no-op with the same interface."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False)

    class _Quiet:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _Quiet()


class EditedID:
    """The pipeline over a `StableDiffusion` (tokenizer, text_encoder, unet, vae) and a config."""

    def __init__(self, sd, config: EditedIDConfig = EditedIDConfig()):
        self.sd = sd
        self.config = config
        self.schedule = NoiseSchedule.scaled_linear()
        self.inv_config = config.inversion_config()
        self.plan = self.inv_config.plan(self.schedule)
        # Called as stage_hook(stage_name, "start" | "end") around each timed stage of `restore`
        # (benchmarks use it to reset and read peak-memory counters); None does nothing.
        self.stage_hook = None

    @contextlib.contextmanager
    def _stage(self, name: str, timings: dict[str, float]):
        if self.stage_hook is not None:
            self.stage_hook(name, "start")
        t0 = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t0
        if self.stage_hook is not None:
            self.stage_hook(name, "end")

    # ---- small pieces ---------------------------------------------------------------------------------
    @property
    def device(self):
        return next(self.sd.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.sd.unet.parameters()).dtype

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.sd.tokenizer(prompts).to(self.device)
        return self.sd.text_encoder(ids).to(self.dtype)  # (B, 77, D)

    def _image(self, image, name: str) -> tuple[torch.Tensor, images.CropFrame | None]:
        s = self.config.image_size
        if isinstance(image, torch.Tensor):
            x = image if image.dim() == 4 else image.unsqueeze(0)
            if x.shape[:2] != (1, 3) or x.shape[-2:] != (s, s):
                raise ValueError(f"editedid.py: the {name} image tensor must be (1, 3, {s}, {s}) in [-1, 1]; found "
                                 f"{tuple(image.shape)}. Load files with minid.images.load_image")
            return x.float(), None
        return images.load_image(image, size=s)

    def _mask(self, mask, name: str, frame, notes: list[str]) -> torch.Tensor | None:
        if mask is None:
            return None
        s = self.config.image_size
        if isinstance(mask, torch.Tensor):
            m = mask.float()
            while m.dim() < 4:
                m = m.unsqueeze(0)
            if m.shape[-2:] != (s, s):
                notes.append(f"{name} mask of size {tuple(m.shape[-2:])} resized to {s}×{s}")
                warnings.warn(f"editedid.py: {name} mask is {tuple(m.shape[-2:])}, resized to {s}×{s}")
            if m.min() < 0 or m.max() > 1:
                raise ValueError(f"editedid.py: the {name} mask must have values in [0, 1]; found "
                                 f"[{float(m.min()):.3g}, {float(m.max()):.3g}]")
            m = images.load_mask(m, size=s)
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m = images.load_mask(mask, frame, size=s)
            for w in caught:
                notes.append(f"{name} mask: {w.message}")
                warnings.warn(f"editedid.py: {w.message}")
        if float(m.max()) <= 0:
            raise ValueError(f"editedid.py: the {name} mask is empty (all zero); give a mask with the region "
                             f"white, or leave it out to take it from the cross-attention maps")
        return m

    def _positions(self, prompt: str, words: list[str], what: str) -> list[int]:
        out = []
        for w in words:
            try:
                out += self.sd.tokenizer.token_positions(prompt, w)
            except ValueError as e:
                raise ValueError(f"editedid.py: {what} word {w!r} is not in the prompt {prompt!r} ({e})") from None
        return out

    def _pairs(self, prompt_t: str, prompt_s: str, words: list[str], what: str) -> list[tuple[int, int]]:
        pairs = []
        for w in words:
            try:
                pos_s, pos_t = self.sd.tokenizer.align_tokens(prompt_s, prompt_t, w)
            except ValueError as e:
                raise ValueError(f"editedid.py: {what} word {w!r}: {e}") from None
            pairs += list(zip(pos_t, pos_s))
        return pairs

    def _latent_size(self) -> tuple[int, int]:
        s = self.config.image_size // 8
        return s, s

    # ---- Stage 1 --------------------------------------------------------------------------------------
    def align(self, z0_o, z0_e, cond_o, cond_e, progress: bool = False) -> Alignment:
        """Adaptive-mixing inversion (or two separate inversions when alignment is ablated)."""
        bar = _progress(progress, self.plan.num_steps, "EditedID 1/3 align")
        res = adaptive_mixing_inversion(self.sd.unet, self.plan, z0_o, z0_e, cond_o, cond_e, self.inv_config,
                                        mixing=self.config.uses_alignment, progress=bar.update)
        bar.close()
        return Alignment(res.pivots_o, res.pivots_e, res.w_schedule)

    # ---- Stage 2 --------------------------------------------------------------------------------------
    def disentangle(self, alignment: Alignment, cond_o, cond_e, uncond, progress: bool = False) -> Disentanglement:
        """Dual null-text optimisation of O and E in one batch (Eq. 4) with the hybrid solver."""
        pivots = [torch.cat([a, b]) for a, b in zip(alignment.pivots_o, alignment.pivots_e)]  # (2, 4, h, w)
        store = AttentionStore()
        bar = _progress(progress, self.plan.num_steps, "EditedID 2/3 disentangle")
        res = null_text_optimization(self.sd.unet, self.plan, pivots, torch.cat([cond_o, cond_e]), uncond,
                                     self.inv_config, observer=store, progress=bar.update)
        bar.close()
        return Disentanglement(null_o=[n[0:1] for n in res.null_embeddings],
                               null_e=[n[1:2] for n in res.null_embeddings],
                               z_T_o=alignment.pivots_o[-1], z_T_e=alignment.pivots_e[-1], z0=res.z0,
                               store=store, steps=res.steps)

    # ---- Stage 3 --------------------------------------------------------------------------------------
    def blend_mask(self, mask_o: torch.Tensor, mask_e: torch.Tensor) -> torch.Tensor:
        """The dilated union of M_O and M_E at latent resolution, (1, 1, h, w), 1 inside."""
        side = self._latent_size()
        union = torch.maximum(F.adaptive_max_pool2d(mask_o.float(), side), F.adaptive_max_pool2d(mask_e.float(), side))
        r = self.config.blend_dilation
        if r > 0:
            union = F.max_pool2d(union, 2 * r + 1, stride=1, padding=r)
        return union

    @torch.no_grad()
    def entangle(self, d: Disentanglement, cond_o, cond_e, mask_o, mask_e, id_pairs, element_pairs,
                 progress: bool = False, blend: bool | None = None) -> torch.Tensor:
        """Three branches (O, E, T) from the start latents with attentional gating; returns z_0 (3, 4, h, w).

        mask_o, mask_e: (1, 1, h, w) at latent (or any) resolution in [0, 1]; id_pairs / element_pairs:
        (T position, O / E position) token pairs. T's start: the shared z_T (aligned), z_T^O (baseline) or
        z_T^E (no alignment).
        """
        cfg = self.config
        side = self._latent_size()
        m_o = F.interpolate(mask_o.float(), size=side, mode="area") if mask_o.shape[-2:] != side else mask_o.float()
        m_e = F.interpolate(mask_e.float(), size=side, mode="area") if mask_e.shape[-2:] != side else mask_e.float()
        use_o = cfg.target == "original"
        z_t_start = d.z_T_o if (cfg.ablation == "baseline" or use_o) else d.z_T_e
        z = torch.cat([d.z_T_o, d.z_T_e, z_t_start])  # (3, 4, h, w): rows O, E, T
        cond = torch.cat([cond_o, cond_e, cond_o if use_o else cond_e])
        nulls = [torch.cat([no, ne, no if use_o else ne]) for no, ne in zip(d.null_o, d.null_e)]
        gating = EditedIDGating(BatchLayout(3, cfg=True), m_o.to(z.device), m_e.to(z.device),
                                id_tokens=id_pairs, element_tokens=element_pairs, lambda_o=cfg.lambda_o,
                                lambda_e=cfg.lambda_e, mode=cfg.gating_mode, self_blocks=cfg.self_blocks,
                                self_sides=cfg.self_sides, self_steps=cfg.self_steps,
                                self_gating=cfg.uses_self_gating, self_uncond=cfg.self_uncond)
        blend = cfg.blend if blend is None else blend
        m = self.blend_mask(m_o, m_e).to(z.device, z.dtype) if blend else None
        bar = _progress(progress, self.plan.num_steps, "EditedID 3/3 entangle")

        def on_step(i, z):
            bar.update()
            if m is None:
                return z
            zt = m * z[2:3] + (1 - m) * z[1:2]  # Blended Diffusion: E's latent outside the region
            return torch.cat([z[:2], zt])

        latents = reconstruct(self.sd.unet, self.plan, z, cond, nulls, cfg.guidance, controller=gating,
                              on_step=on_step)
        bar.close()
        return latents[-1]

    # ---- the whole method -------------------------------------------------------------------------------
    def restore(self, original, edited, prompt_original: str, prompt_edited: str, id_words: list[str],
                element_words: list[str], face_mask=None, element_mask=None, seed: int = 0,
                progress: bool = True, save_intermediates: str | Path | None = None) -> RestoreResult:
        """Restore `original`'s face identity in `edited`. Images: paths, PIL images or (1, 3, S, S) tensors.

        id_words (in both prompts) have their cross-attention columns taken from O; element_words (in the
        edited prompt) from E. face_mask / element_mask: mask images (white = region) of the original's /
        edited image's size, or tensors; when absent they come from the cross-attention maps of the words,
        gathered during Stage 2's conditional calls (M_O from O's maps of id_words, M_E from E's maps of
        element_words; P2P local blend: `control.word_mask`).
        seed: seeds the posterior sample when `config.sample_posterior` (the method is otherwise deterministic).
        save_intermediates: a folder for restored.png, reconstructions, masks, w schedule (JSON and PNG) and
        the attention-map grid. Progress bars (tqdm) per stage when `progress`.
        """
        cfg = self.config
        notes: list[str] = []
        timings: dict[str, float] = {}
        # ---- every check before any heavy work
        for name, p in (("prompt_original", prompt_original), ("prompt_edited", prompt_edited)):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"editedid.py: {name} must be a non-empty string, got {p!r}")
        if isinstance(id_words, str) or isinstance(element_words, str):
            raise TypeError("editedid.py: id_words and element_words are lists of words, e.g. ['man'], ['glasses']")
        if not id_words:
            raise ValueError("editedid.py: give at least one identity word (e.g. 'man', 'face') in id_words")
        prompt_t = prompt_original if cfg.target == "original" else prompt_edited
        self._positions(prompt_original, id_words, "identity")
        self._positions(prompt_t, id_words, "identity")
        self._positions(prompt_edited, element_words, "element")
        self._positions(prompt_t, element_words, "element")
        id_pairs = self._pairs(prompt_t, prompt_original, id_words, "identity")
        element_pairs = self._pairs(prompt_t, prompt_edited, element_words, "element")
        x_o, frame_o = self._image(original, "original")
        x_e, frame_e = self._image(edited, "edited")
        mask_o = self._mask(face_mask, "face", frame_o, notes)
        mask_e = self._mask(element_mask, "element", frame_e, notes)
        if mask_e is None and not element_words:
            raise ValueError("editedid.py: with no element_mask, element_words must name the edited elements "
                             "(their cross-attention maps give the element region)")

        device, dtype = self.device, self.dtype
        gen = torch.Generator().manual_seed(seed)
        with self._stage("encode", timings), torch.no_grad():
            x = torch.cat([x_o, x_e]).to(device, dtype)
            if cfg.sample_posterior:
                z0 = self.sd.vae.encode(x).sample(gen) * self.sd.vae.cfg.scaling_factor
            else:
                z0 = self.sd.vae.encode_latent(x)
            cond = self.encode_text([prompt_original, prompt_edited])
            cond_o, cond_e = cond[0:1], cond[1:2]
            uncond = self.encode_text([""])

        with self._stage("align", timings):
            alignment = self.align(z0[0:1], z0[1:2], cond_o, cond_e, progress)

        with self._stage("disentangle", timings):
            d = self.disentangle(alignment, cond_o, cond_e, uncond, progress)
            with torch.no_grad():
                recon = self.sd.vae.decode_latent(d.z0).float().clamp(-1, 1).cpu()
        psnrs = {"original": psnr(recon[0:1], x_o), "edited": psnr(recon[1:2], x_e)}

        # ---- masks: given, or from the words' cross-attention (P2P local blend), at image size
        s = cfg.image_size
        side = self._latent_size()
        attention_maps = {}
        for word in [*id_words, *element_words]:
            row, prompt = (0, prompt_original) if word in id_words else (1, prompt_edited)
            attention_maps[word] = word_map(d.store, row, self._positions(prompt, [word], "mask"), side,
                                            cfg.mask_map_factors, pool=cfg.mask_pool)[0, 0]
        if mask_o is None:
            m = word_mask(d.store, 0, self._positions(prompt_original, id_words, "identity"), side,
                          cfg.mask_map_factors, cfg.mask_pool, cfg.mask_threshold)
            mask_o = F.interpolate(m, size=(s, s), mode="nearest")
            notes.append("face mask taken from the cross-attention maps of " + ", ".join(id_words))
        if mask_e is None:
            m = word_mask(d.store, 1, self._positions(prompt_edited, element_words, "element"), side,
                          cfg.mask_map_factors, cfg.mask_pool, cfg.mask_threshold)
            mask_e = F.interpolate(m, size=(s, s), mode="nearest")
            notes.append("element mask taken from the cross-attention maps of " + ", ".join(element_words))

        with self._stage("entangle", timings):
            z_final = self.entangle(d, cond_o, cond_e, mask_o.to(device), mask_e.to(device), id_pairs,
                                    element_pairs, progress)
        with self._stage("decode", timings), torch.no_grad():
            image = self.sd.vae.decode_latent(z_final[2:3]).float().clamp(-1, 1)

        result = RestoreResult(image=image.cpu(), reconstructions={"original": recon[0:1].cpu(), "edited": recon[1:2].cpu()},
                               psnr=psnrs, masks={"face": mask_o.cpu(), "element": mask_e.cpu(),
                                                  "blend": self.blend_mask(mask_o, mask_e).cpu()},
                               w_schedule=alignment.w_schedule, timings=timings, notes=notes,
                               latent=z_final[2:3].cpu(), null_text=d.steps, attention_maps=attention_maps)
        if save_intermediates is not None:
            inputs = [f.source for f in (frame_o, frame_e) if f is not None]
            result.paths = save_result(result, save_intermediates, inputs=inputs)
        return result


# --------------------------------------------------------------------------------------------------------
# Saving


def plot_w_schedule(ws: list[float], size: tuple[int, int] = (360, 240)):
    """A line plot of the w schedule drawn with PIL: step on x, w in [0, 0.5] on y."""
    from PIL import Image, ImageDraw

    w_px, h_px = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 40, w_px - 15, 15, h_px - 30
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for frac, label in ((0.0, "0"), (0.5, "0.25"), (1.0, "0.5")):
        y = bottom - frac * (bottom - top)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((2, y - 6), label, fill=(0, 0, 0))
    n = max(len(ws) - 1, 1)
    pts = [(left + i / n * (right - left), bottom - min(max(w / 0.5, 0), 1) * (bottom - top)) for i, w in enumerate(ws)]
    if len(pts) > 1:
        draw.line(pts, fill=(200, 30, 30), width=2)
    for x, y in pts:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    draw.text((left, h_px - 20), "inversion step ->   w (mixing weight)", fill=(0, 0, 0))
    return img


def _grey(t: torch.Tensor, size: int):
    from PIL import Image

    t = t.float()
    t = t / t.max().clamp_min(1e-12)
    t = F.interpolate(t[None, None], size=(size, size), mode="nearest")[0, 0]
    return Image.fromarray((t.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), mode="L").convert("RGB")


def save_result(result: RestoreResult, out_dir: str | Path, inputs=()) -> dict[str, Path]:
    """Write the restored image, reconstructions, masks, w schedule (JSON and PNG), attention grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = result.image.shape[-1]
    paths = {
        "restored": images.save_image(result.image, out / "restored.png", inputs),
        "reconstruction_original": images.save_image(result.reconstructions["original"], out / "reconstruction_original.png", inputs),
        "reconstruction_edited": images.save_image(result.reconstructions["edited"], out / "reconstruction_edited.png", inputs),
        "mask_face": images.save_image(_grey(result.masks["face"][0, 0], size), out / "mask_face.png", inputs),
        "mask_element": images.save_image(_grey(result.masks["element"][0, 0], size), out / "mask_element.png", inputs),
        "mask_blend": images.save_image(_grey(result.masks["blend"][0, 0], size), out / "mask_blend.png", inputs),
        "w_schedule_plot": images.save_image(plot_w_schedule(result.w_schedule), out / "w_schedule.png", inputs),
    }
    summary = {"w_schedule": result.w_schedule, "psnr": result.psnr, "timings": result.timings, "notes": result.notes,
               "null_text": [dataclasses.asdict(s) for s in result.null_text]}
    paths["summary"] = images.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    if result.attention_maps:
        tiles = [_grey(m, 128) for m in result.attention_maps.values()]
        paths["attention_grid"] = images.save_image(images.side_by_side(tiles, gap=4), out / "attention_maps.png", inputs)
    return paths


# --------------------------------------------------------------------------------------------------------
# Text to image, and the demo


def _plan_for(solver: str, num_steps: int, schedule: NoiseSchedule):
    if solver == "ddim":
        return InversionConfig(num_steps=num_steps, solver="ddim").plan(schedule)
    if solver == "dpm":
        return InversionConfig(num_steps=num_steps, solver="hybrid", dpm_start=1, dpm_end=num_steps).plan(schedule)
    if solver == "hybrid":
        return InversionConfig(num_steps=num_steps).plan(schedule)
    raise ValueError(f"editedid.py: solver must be 'ddim', 'dpm' or 'hybrid', got {solver!r}")


@torch.no_grad()
def generate(sd, prompt: str, num_steps: int = 50, guidance: float = 7.5, solver: str = "ddim", seed: int = 0,
             size: int = 512, negative_prompt: str = "", return_latents: bool = False):
    """Text to image: CFG sampling from seeded noise. Returns (1, 3, size, size) in [-1, 1]
    (and the latent trajectory when `return_latents`)."""
    if size % 8:
        raise ValueError(f"editedid.py: size must be a multiple of 8, got {size}")
    device = next(sd.unet.parameters()).device
    dtype = next(sd.unet.parameters()).dtype
    plan = _plan_for(solver, num_steps, NoiseSchedule.scaled_linear())
    ids = sd.tokenizer([negative_prompt, prompt]).to(device)
    ctx = sd.text_encoder(ids).to(dtype)
    g = torch.Generator().manual_seed(seed)
    c = sd.unet.cfg.in_channels
    z = torch.randn(1, c, size // 8, size // 8, generator=g).to(device, dtype)
    latents = reconstruct(sd.unet, plan, z, ctx[1:2], ctx[0:1], guidance)
    image = sd.vae.decode_latent(latents[-1]).float().clamp(-1, 1).cpu()
    return (image, latents) if return_latents else image


@torch.no_grad()
def _edit_with_drift(sd, plan, z_T, prompt, prompt_edited, subject_word, element_word, guidance, seed, drift):
    """Prompt-to-prompt refine from `prompt` to `prompt_edited`, with fresh noise in the subject's region.

    Branch 0 regenerates the original, branch 1 the edit; the subject's region of branch 1's start latent
    is re-drawn (weight `drift`), so its face comes out as another identity while the layout is kept.
    Returns the edited image and the subject region (latent size) used.
    """
    tok = sd.tokenizer
    device = z_T.device
    ids = tok(["", "", prompt, prompt_edited]).to(device)
    ctx = sd.text_encoder(ids).to(z_T.dtype)
    uncond, cond = ctx[:2], ctx[2:]
    # First pass: cross-attention of the original to locate the subject.
    store = AttentionStore()
    reconstruct(sd.unet, plan, z_T, cond[0:1], uncond[0:1], guidance, controller=_CondOnly(store))
    side = tuple(z_T.shape[-2:])
    region = word_mask(store, 0, tok.token_positions(prompt, subject_word), side)
    g = torch.Generator().manual_seed(seed + 1)
    fresh = torch.randn(z_T.shape, generator=g).to(device, z_T.dtype)
    # variance-preserving re-draw inside the region: sqrt(1−drift) z + sqrt(drift) ε (region is 0 or 1)
    z_edit = z_T * (1 - region) + region * ((1 - drift) ** 0.5 * z_T + drift ** 0.5 * fresh)
    p2p = PromptToPrompt(BatchLayout(2, cfg=True), [prompt_alignment(tok, prompt, prompt_edited, "refine")],
                         cross_window=(0.0, 0.8), self_window=(0.0, 0.2), num_steps=plan.num_steps)
    elem_positions = tok.token_positions(prompt_edited, element_word)
    blend_store = AttentionStore()

    class _Both:
        step = 0

        def __call__(self, q, k, v, site):
            p2p.step = self.step
            out = p2p(q, k, v, site)
            if site.is_cross:
                blend_store(q, k, v, site)
            return out

    ctrl = _Both()
    z = torch.cat([z_T, z_edit])

    def on_step(i, z):
        # local blend on the element: the edit changes the element region and the re-drawn subject only
        try:
            m = word_mask(blend_store, 3, elem_positions, side)
        except ValueError:
            return z
        m = torch.maximum(m.to(z.device, z.dtype), region)
        return torch.cat([z[0:1], local_blend(z[0:1], z[1:2], m)])

    latents = reconstruct(sd.unet, plan, z, cond, uncond, guidance, controller=ctrl, on_step=on_step)
    image = sd.vae.decode_latent(latents[-1][1:2]).float().clamp(-1, 1).cpu()
    return image, region


class _CondOnly:
    """Wraps a store so that it records only the conditional half of a [uncond; cond] batch of one image."""

    def __init__(self, store: AttentionStore):
        self.store = store
        self.store.rows = [1]
        self.step = 0

    def __call__(self, q, k, v, site):
        return self.store(q, k, v, site)


def demo(sd, out_dir: str | Path, prompt: str = "a photo of a man", subject_word: str = "man",
         element: str = "black glasses", element_word: str = "glasses", seed: int = 0, num_steps: int = 6,
         generate_steps: int = 20, size: int = 512, drift: float = 0.8,
         config: EditedIDConfig | None = None, progress: bool = True) -> dict[str, Path]:
    """Generate a portrait, edit it with prompt-to-prompt (add `element`) while its face drifts to another
    identity (fresh noise in the face region), restore it with EditedID, and save everything.

    Writes original.png, edited.png, restored.png, comparison.png (side by side), masks, the w schedule
    (JSON, PNG) and attention grids under `out_dir`; returns their paths.
    """
    out = Path(out_dir)
    prompt_edited = f"{prompt} wearing {element}"
    device = next(sd.unet.parameters()).device
    dtype = next(sd.unet.parameters()).dtype
    plan = _plan_for("ddim", generate_steps, NoiseSchedule.scaled_linear())
    g = torch.Generator().manual_seed(seed)
    z_T = torch.randn(1, sd.unet.cfg.in_channels, size // 8, size // 8, generator=g).to(device, dtype)
    ctx = sd.text_encoder(sd.tokenizer(["", prompt]).to(device)).to(dtype)
    with torch.no_grad():
        z0 = reconstruct(sd.unet, plan, z_T, ctx[1:2], ctx[0:1], 7.5)[-1]
        original = sd.vae.decode_latent(z0).float().clamp(-1, 1).cpu()
    edited, _ = _edit_with_drift(sd, plan, z_T, prompt, prompt_edited, subject_word, element_word, 7.5, seed, drift)
    cfg = config or EditedIDConfig(num_steps=num_steps, image_size=size)
    if cfg.image_size != size:
        cfg = dataclasses.replace(cfg, image_size=size)
    result = EditedID(sd, cfg).restore(original, edited, prompt, prompt_edited, id_words=[subject_word],
                                       element_words=[element_word], seed=seed, progress=progress,
                                       save_intermediates=out)
    paths = dict(result.paths)
    paths["original"] = images.save_image(original, out / "original.png")
    paths["edited"] = images.save_image(edited, out / "edited.png")
    panel = images.side_by_side([images.tensor_to_pil(original), images.tensor_to_pil(edited), result.pil])
    paths["comparison"] = images.save_image(panel, out / "comparison.png")
    return paths
