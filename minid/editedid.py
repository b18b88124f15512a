"""EditedID: restore the original's face identity in an edited photo, keeping the edit (ALGORITHM.md).

    original I_O, edited I_E ──VAE──▶ z_0^O, z_0^E
      Stage 1, alignment      adaptive-mixing inversion of both (guidance 1) ─▶ pivots^O, pivots^E, shared z_T
      Stage 2, disentangling  dual null-text optimisation along the pivots with the hybrid solver ─▶ ∅_O,i, ∅_E,i
      (masks)                 M_O, M_E from the user; M_O from the original's face landmarks when a face
                              analyzer is given; else from the cross-attention maps of the words in Stage 2
      Stage 3, entangling     three branches (O, E, T) from z_T with attentional gating, blending outside the
                              dilated mask union ─▶ z_0^T ──VAE──▶ restored image

`EditedID(sd, config).restore(...)` runs it; the three stages are methods of their own (`align`,
`disentangle`, `entangle`) so each can be studied and tested alone. `restore_batch` runs K pairs as one batch
through every stage (2K latents in Stages 1-2, 3K branches in Stage 3), and `restore_faces` uses it for
photos of several people (paper A.16): detect and pair the faces of both images, restore a square patch
around each pair, paste the patches back. `generate` is plain text-to-image with
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

import numpy as np
import torch
import torch.nn.functional as F

from minid import faces, images, masks, metrics
from minid.control import (AttentionStore, BatchLayout, EditedIDGating, GatingGroup, PromptToPrompt, local_blend,
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
    # The fused attention edits of Stage 3: "auto" = Triton kernels on CUDA, the PyTorch path elsewhere;
    # "triton" or "torch" to force one (the same semantics; tests compare them).
    attention_backend: Literal["auto", "triton", "torch"] = "auto"
    # Landmark face masks and multi-person restoration (paper A.16). Lengths are fractions of image_size, so a
    # setting means the same on the tests' 64² squares as on SD's 512².
    face_mask_feather: float = 1 / 128  # σ of the blur that softens a landmark face mask (4 px at 512)
    face_patch_scale: float = 2.0  # side of a face's square patch / longer side of the pair's box union
    face_min_iou: float = 0.3  # an original's and an edit's face pair when their boxes overlap this much
    paste_feather: float = 1 / 64  # σ of the paste-back mask's soft edge and width of its ramp to the patch border

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
    timings: dict[str, float]  # seconds per stage (of the whole batch when restored with others)
    notes: list[str] = field(default_factory=list)  # what was adjusted (mask resized, …)
    latent: torch.Tensor | None = None  # z_0^T
    null_text: list = field(default_factory=list)  # Stage 2's per-step statistics (this pair's O and E)
    attention_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # word -> (h, w) averaged cross map
    paths: dict[str, Path] = field(default_factory=dict)  # files written by save_intermediates

    @property
    def pil(self):
        return images.tensor_to_pil(self.image)


@dataclass
class RestorePair:
    """One (original, edited) pair of a batched restore, with everything that may differ between pairs.

    Images: paths, PIL images or (1, 3, S, S) tensors in [-1, 1]; masks: as `EditedID.restore` takes them.
    """

    original: object
    edited: object
    prompt_original: str
    prompt_edited: str
    id_words: list[str]
    element_words: list[str]
    face_mask: object = None
    element_mask: object = None
    lambda_o: float | None = None  # weight of O where M_O and M_E overlap; None: the config's; λ_E = 1 − λ_O
    seed: int = 0  # seeds this pair's posterior sample (config.sample_posterior)


@dataclass
class _Job:
    """A checked pair, ready to run: images at working size, masks (or None), token positions and pairs."""

    name: str
    x_o: torch.Tensor  # (1, 3, S, S)
    x_e: torch.Tensor
    frames: list  # the CropFrames of inputs read from files (their sources are never overwritten)
    mask_o: torch.Tensor | None  # (1, 1, S, S) or None: from the cross-attention maps
    mask_e: torch.Tensor | None
    prompt_original: str
    prompt_edited: str
    id_words: list[str]
    element_words: list[str]
    id_pairs: list[tuple[int, int]]
    element_pairs: list[tuple[int, int]]
    lambdas: tuple[float, float]
    seed: int
    notes: list[str]


@dataclass
class Alignment:
    pivots_o: list[torch.Tensor]  # per step (K, 4, h, w)
    pivots_e: list[torch.Tensor]
    w_schedules: list[list[float]]  # per pair


@dataclass
class Disentanglement:
    null_o: list[torch.Tensor]  # per step (K, 77, D)
    null_e: list[torch.Tensor]
    z_T_o: torch.Tensor  # (K, 4, h, w)
    z_T_e: torch.Tensor
    z0: torch.Tensor  # (2K, 4, h, w): the reconstructions of O_1 … O_K, then E_1 … E_K
    store: AttentionStore  # cross-attention maps of the conditional calls, rows as z0
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


def _per_pair(pairs: list, k_pairs: int, what: str) -> list[list[tuple[int, int]]]:
    """Token pairs given for one triple (a list of tuples) or per triple (K lists) → K lists."""
    if len(pairs) == k_pairs and all(isinstance(p, list) for p in pairs):
        return pairs
    if k_pairs == 1:
        return [list(pairs)]
    raise ValueError(f"editedid.py: {what} must be one list of token pairs per restored pair ({k_pairs}); "
                     f"found {len(pairs)} entries")


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

    def landmark_face_mask(self, face, affine=None) -> tuple[torch.Tensor, str]:
        """M_O from a `faces.Face`: the hull of its 106 landmarks (else the 5-point ellipse), feathered by
        `config.face_mask_feather`, at image size (1, 1, S, S); `affine` maps the face's image to the
        working square (a face patch). Returns the mask and a note saying which landmarks made it."""
        s = self.config.image_size
        kps, dense = face.kps, face.landmarks_106
        if affine is not None:
            kps = faces.apply_affine(kps, affine)
            dense = None if dense is None else faces.apply_affine(dense, affine)
        m = masks.face_mask(s, kps=kps, landmarks_106=dense)  # (S, S), 0 or 1
        sigma = self.config.face_mask_feather * s
        m = masks.feather(m, sigma)
        how = "the hull of its 106 landmarks" if dense is not None else "an ellipse on its 5 keypoints"
        return m[None, None], f"{how}, feathered (σ = {sigma:.3g} px)"

    def _analyze(self, analyzer, x: torch.Tensor, name: str) -> list:
        """The analyzer's faces of a (1, 3, H, W) image in [-1, 1] (given to it as (3, H, W) in [0, 1])."""
        found = analyzer.analyze(((x[0].float() + 1) / 2).clamp(0, 1))
        if not found:
            raise ValueError(f"editedid.py: the face analyzer found no face in {name}; check that the face is "
                             "visible and not tiny, give face_mask=..., or restore without an analyzer (the face "
                             "mask then comes from the cross-attention maps)")
        return found

    # ---- Stage 1 --------------------------------------------------------------------------------------
    def align(self, z0_o, z0_e, cond_o, cond_e, progress: bool = False) -> Alignment:
        """Adaptive-mixing inversion of K pairs (K, 4, h, w) in one batch (or separate inversions when
        alignment is ablated)."""
        bar = _progress(progress, self.plan.num_steps, "EditedID 1/3 align")
        res = adaptive_mixing_inversion(self.sd.unet, self.plan, z0_o, z0_e, cond_o, cond_e, self.inv_config,
                                        mixing=self.config.uses_alignment, progress=bar.update)
        bar.close()
        return Alignment(res.pivots_o, res.pivots_e, res.w_schedules)

    # ---- Stage 2 --------------------------------------------------------------------------------------
    def disentangle(self, alignment: Alignment, cond_o, cond_e, uncond, progress: bool = False) -> Disentanglement:
        """Dual null-text optimisation of every O and E in one batch (Eq. 4) with the hybrid solver."""
        k_pairs = alignment.pivots_o[0].shape[0]
        pivots = [torch.cat([a, b]) for a, b in zip(alignment.pivots_o, alignment.pivots_e)]  # (2K, 4, h, w)
        store = AttentionStore()
        bar = _progress(progress, self.plan.num_steps, "EditedID 2/3 disentangle")
        res = null_text_optimization(self.sd.unet, self.plan, pivots, torch.cat([cond_o, cond_e]), uncond,
                                     self.inv_config, observer=store, progress=bar.update)
        bar.close()
        return Disentanglement(null_o=[n[:k_pairs] for n in res.null_embeddings],
                               null_e=[n[k_pairs:] for n in res.null_embeddings],
                               z_T_o=alignment.pivots_o[-1], z_T_e=alignment.pivots_e[-1], z0=res.z0,
                               store=store, steps=res.steps)

    # ---- Stage 3 --------------------------------------------------------------------------------------
    def blend_mask(self, mask_o: torch.Tensor, mask_e: torch.Tensor) -> torch.Tensor:
        """The dilated union of M_O and M_E at latent resolution, (K, 1, h, w), 1 inside."""
        side = self._latent_size()
        union = torch.maximum(F.adaptive_max_pool2d(mask_o.float(), side), F.adaptive_max_pool2d(mask_e.float(), side))
        r = self.config.blend_dilation
        if r > 0:
            union = F.max_pool2d(union, 2 * r + 1, stride=1, padding=r)
        return union

    @torch.no_grad()
    def entangle(self, d: Disentanglement, cond_o, cond_e, mask_o, mask_e, id_pairs, element_pairs,
                 progress: bool = False, blend: bool | None = None,
                 lambdas: list[tuple[float, float]] | None = None) -> torch.Tensor:
        """K triples (O, E, T) from the start latents with attentional gating; returns z_0 (3K, 4, h, w),
        rows O_1 … O_K, E_1 … E_K, T_1 … T_K.

        mask_o, mask_e: (K, 1, h, w) at latent (or any) resolution in [0, 1]; id_pairs / element_pairs:
        (T position, O / E position) token pairs, one list for K = 1 or K lists; lambdas: (λ_O, λ_E) per
        triple (default the config's). T's start: the shared z_T (aligned), z_T^O (baseline) or z_T^E (no
        alignment).
        """
        cfg = self.config
        side = self._latent_size()
        k_pairs = d.z_T_o.shape[0]
        id_pairs = _per_pair(id_pairs, k_pairs, "id_pairs")
        element_pairs = _per_pair(element_pairs, k_pairs, "element_pairs")
        lambdas = lambdas or [(cfg.lambda_o, cfg.lambda_e)] * k_pairs
        m_o = F.interpolate(mask_o.float(), size=side, mode="area") if mask_o.shape[-2:] != side else mask_o.float()
        m_e = F.interpolate(mask_e.float(), size=side, mode="area") if mask_e.shape[-2:] != side else mask_e.float()
        use_o = cfg.target == "original"
        z_t_start = d.z_T_o if (cfg.ablation == "baseline" or use_o) else d.z_T_e
        z = torch.cat([d.z_T_o, d.z_T_e, z_t_start])  # (3K, 4, h, w): rows O_1..O_K, E_1..E_K, T_1..T_K
        cond = torch.cat([cond_o, cond_e, cond_o if use_o else cond_e])
        nulls = [torch.cat([no, ne, no if use_o else ne]) for no, ne in zip(d.null_o, d.null_e)]
        layout = BatchLayout(3 * k_pairs, cfg=True)
        gatings = [EditedIDGating(layout, m_o[k:k + 1].to(z.device), m_e[k:k + 1].to(z.device),
                                  id_tokens=id_pairs[k], element_tokens=element_pairs[k], lambda_o=lambdas[k][0],
                                  lambda_e=lambdas[k][1], mode=cfg.gating_mode, self_blocks=cfg.self_blocks,
                                  self_sides=cfg.self_sides, self_steps=cfg.self_steps,
                                  self_gating=cfg.uses_self_gating, self_uncond=cfg.self_uncond,
                                  backend=cfg.attention_backend, branch_o=k, branch_e=k_pairs + k, branch_t=2 * k_pairs + k)
                   for k in range(k_pairs)]
        controller = gatings[0] if k_pairs == 1 else GatingGroup(gatings)
        blend = cfg.blend if blend is None else blend
        m = self.blend_mask(m_o, m_e).to(z.device, z.dtype) if blend else None  # (K, 1, h, w)
        bar = _progress(progress, self.plan.num_steps, "EditedID 3/3 entangle")

        def on_step(i, z):
            bar.update()
            if m is None:
                return z
            k = k_pairs
            zt = m * z[2 * k:] + (1 - m) * z[k:2 * k]  # Blended Diffusion: E's latent outside the region
            return torch.cat([z[:2 * k], zt])

        latents = reconstruct(self.sd.unet, self.plan, z, cond, nulls, cfg.guidance, controller=controller,
                              on_step=on_step)
        bar.close()
        return latents[-1]

    # ---- the whole method -------------------------------------------------------------------------------
    def restore(self, original, edited, prompt_original: str, prompt_edited: str, id_words: list[str],
                element_words: list[str], face_mask=None, element_mask=None, seed: int = 0,
                progress: bool = True, save_intermediates: str | Path | None = None,
                analyzer=None) -> RestoreResult:
        """Restore `original`'s face identity in `edited`. Images: paths, PIL images or (1, 3, S, S) tensors.

        id_words (in both prompts) have their cross-attention columns taken from O; element_words (in the
        edited prompt) from E. face_mask / element_mask: mask images (white = region) of the original's /
        edited image's size, or tensors. Without face_mask, M_O comes from `analyzer` when given (anything
        with `analyze(image) -> list[faces.Face]`, e.g. `faces.FaceAnalyzer`): the landmark mask of the
        original's largest face (`landmark_face_mask`); without an analyzer, and for a missing element_mask,
        the masks come from the cross-attention maps of the words, gathered during Stage 2's conditional
        calls (M_O from O's maps of id_words, M_E from E's maps of element_words; P2P local blend:
        `control.word_mask`).
        seed: seeds the posterior sample when `config.sample_posterior` (the method is otherwise deterministic).
        save_intermediates: a folder for restored.png, reconstructions, masks, w schedule (JSON and PNG) and
        the attention-map grid. Progress bars (tqdm) per stage when `progress`.
        """
        job = self._prepare(RestorePair(original, edited, prompt_original, prompt_edited, id_words, element_words,
                                        face_mask, element_mask, seed=seed), "")
        if job.mask_o is None and analyzer is not None:
            name = "the original image" + (f" {original}" if isinstance(original, (str, Path)) else "")
            found = self._analyze(analyzer, job.x_o, name)
            job.mask_o, how = self.landmark_face_mask(max(found, key=lambda f: f.area))
            job.notes.append(f"face mask from the original's largest face ({len(found)} found): {how}")
        result = self._run([job], progress)[0]
        if save_intermediates is not None:
            result.paths = save_result(result, save_intermediates, inputs=[f.source for f in job.frames])
        return result

    def restore_batch(self, pairs: list[RestorePair], progress: bool = True,
                      save_intermediates: str | Path | None = None) -> list[RestoreResult]:
        """Restore K pairs in ONE batch through every stage: 2K latents in Stage 1, 2K null-texts in Stage 2,
        3K branches × 2 guidance halves in Stage 3. Each pair keeps its own prompts, words, masks, λ and seed,
        and the result of each equals what `restore` gives it alone, up to the rounding of a larger batch
        (and, through it, a null-text early stop that may fall one iteration apart when a loss lands on the
        threshold). save_intermediates: a folder that gets one sub-folder per pair, pair_0, pair_1, …
        """
        if not pairs:
            raise ValueError("editedid.py: restore_batch needs at least one RestorePair")
        jobs = [self._prepare(p, f"pair {k}: " if len(pairs) > 1 else "") for k, p in enumerate(pairs)]
        results = self._run(jobs, progress)
        if save_intermediates is not None:
            for k, (job, result) in enumerate(zip(jobs, results)):
                result.paths = save_result(result, Path(save_intermediates) / f"pair_{k}",
                                           inputs=[f.source for f in job.frames])
        return results

    def _prepare(self, pair: RestorePair, name: str) -> _Job:
        """Every check of one pair, before any heavy work: prompts, words, images, masks, λ."""
        cfg = self.config
        notes: list[str] = []
        prompt_original, prompt_edited = pair.prompt_original, pair.prompt_edited
        id_words, element_words = pair.id_words, pair.element_words
        for what, p in (("prompt_original", prompt_original), ("prompt_edited", prompt_edited)):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"editedid.py: {name}{what} must be a non-empty string, got {p!r}")
        if isinstance(id_words, str) or isinstance(element_words, str):
            raise TypeError(f"editedid.py: {name}id_words and element_words are lists of words, e.g. ['man'], "
                            "['glasses']")
        if not id_words:
            raise ValueError(f"editedid.py: {name}give at least one identity word (e.g. 'man', 'face') in id_words")
        prompt_t = prompt_original if cfg.target == "original" else prompt_edited
        self._positions(prompt_original, id_words, "identity")
        self._positions(prompt_t, id_words, "identity")
        self._positions(prompt_edited, element_words, "element")
        self._positions(prompt_t, element_words, "element")
        id_pairs = self._pairs(prompt_t, prompt_original, id_words, "identity")
        element_pairs = self._pairs(prompt_t, prompt_edited, element_words, "element")
        x_o, frame_o = self._image(pair.original, "original")
        x_e, frame_e = self._image(pair.edited, "edited")
        mask_o = self._mask(pair.face_mask, "face", frame_o, notes)
        mask_e = self._mask(pair.element_mask, "element", frame_e, notes)
        if mask_e is None and not element_words:
            raise ValueError(f"editedid.py: {name}with no element_mask, element_words must name the edited "
                             "elements (their cross-attention maps give the element region)")
        lambdas = (cfg.lambda_o, cfg.lambda_e)
        if pair.lambda_o is not None:
            if not 0 <= pair.lambda_o <= 1:
                raise ValueError(f"editedid.py: {name}lambda_o must be in [0, 1], got {pair.lambda_o}")
            lambdas = (float(pair.lambda_o), 1.0 - float(pair.lambda_o))
        return _Job(name=name, x_o=x_o, x_e=x_e, frames=[f for f in (frame_o, frame_e) if f is not None],
                    mask_o=mask_o, mask_e=mask_e, prompt_original=prompt_original, prompt_edited=prompt_edited,
                    id_words=list(id_words), element_words=list(element_words), id_pairs=id_pairs,
                    element_pairs=element_pairs, lambdas=lambdas, seed=pair.seed, notes=notes)

    def _run(self, jobs: list[_Job], progress: bool) -> list[RestoreResult]:
        """The three stages for K checked pairs in one batch. Batch rows: O_1 … O_K, E_1 … E_K (Stages 1-2),
        then T_1 … T_K (Stage 3)."""
        cfg = self.config
        k_pairs = len(jobs)
        timings: dict[str, float] = {}
        device, dtype = self.device, self.dtype
        with self._stage("encode", timings), torch.no_grad():
            x = torch.cat([j.x_o for j in jobs] + [j.x_e for j in jobs]).to(device, dtype)  # (2K, 3, S, S)
            if cfg.sample_posterior:
                posterior = self.sd.vae.encode(x)
                # each pair draws its (O, E) noise from its own seed, as it would alone
                eps = [torch.randn((2, *posterior.mean.shape[1:]), generator=torch.Generator().manual_seed(j.seed),
                                   dtype=posterior.mean.dtype) for j in jobs]
                eps = torch.cat([e[0:1] for e in eps] + [e[1:2] for e in eps]).to(posterior.mean.device)
                z0 = (posterior.mean + posterior.std * eps) * self.sd.vae.cfg.scaling_factor
            else:
                z0 = self.sd.vae.encode_latent(x)
            cond = self.encode_text([j.prompt_original for j in jobs] + [j.prompt_edited for j in jobs])
            cond_o, cond_e = cond[:k_pairs], cond[k_pairs:]  # (K, 77, D) each
            uncond = self.encode_text([""])

        with self._stage("align", timings):
            alignment = self.align(z0[:k_pairs], z0[k_pairs:], cond_o, cond_e, progress)

        with self._stage("disentangle", timings):
            d = self.disentangle(alignment, cond_o, cond_e, uncond, progress)
            with torch.no_grad():
                recon = self.sd.vae.decode_latent(d.z0).float().clamp(-1, 1).cpu()  # (2K, 3, S, S)

        # ---- masks: given, or from the words' cross-attention (P2P local blend), at image size
        s = cfg.image_size
        side = self._latent_size()
        attention_maps: list[dict[str, torch.Tensor]] = []
        masks_o, masks_e = [], []
        for k, job in enumerate(jobs):
            row_o, row_e = k, k_pairs + k
            maps = {}
            for word in [*job.id_words, *job.element_words]:
                row, prompt = (row_o, job.prompt_original) if word in job.id_words else (row_e, job.prompt_edited)
                maps[word] = word_map(d.store, row, self._positions(prompt, [word], "mask"), side,
                                      cfg.mask_map_factors, pool=cfg.mask_pool)[0, 0]
            attention_maps.append(maps)
            mask_o, mask_e = job.mask_o, job.mask_e
            if mask_o is None:
                m = word_mask(d.store, row_o, self._positions(job.prompt_original, job.id_words, "identity"), side,
                              cfg.mask_map_factors, cfg.mask_pool, cfg.mask_threshold)
                mask_o = F.interpolate(m, size=(s, s), mode="nearest")
                job.notes.append("face mask taken from the cross-attention maps of " + ", ".join(job.id_words))
            if mask_e is None:
                m = word_mask(d.store, row_e, self._positions(job.prompt_edited, job.element_words, "element"),
                              side, cfg.mask_map_factors, cfg.mask_pool, cfg.mask_threshold)
                mask_e = F.interpolate(m, size=(s, s), mode="nearest")
                job.notes.append("element mask taken from the cross-attention maps of " + ", ".join(job.element_words))
            masks_o.append(mask_o.float())
            masks_e.append(mask_e.float())
        mask_o, mask_e = torch.cat(masks_o), torch.cat(masks_e)  # (K, 1, S, S)

        with self._stage("entangle", timings):
            z_final = self.entangle(d, cond_o, cond_e, mask_o.to(device), mask_e.to(device),
                                    [j.id_pairs for j in jobs], [j.element_pairs for j in jobs], progress,
                                    lambdas=[j.lambdas for j in jobs])
        with self._stage("decode", timings), torch.no_grad():
            restored = self.sd.vae.decode_latent(z_final[2 * k_pairs:]).float().clamp(-1, 1).cpu()  # (K, 3, S, S)

        blend = self.blend_mask(mask_o, mask_e).cpu()
        results = []
        for k, job in enumerate(jobs):
            r_o, r_e = recon[k:k + 1], recon[k_pairs + k:k_pairs + k + 1]
            steps = [dataclasses.replace(st, initial_loss=[st.initial_loss[k], st.initial_loss[k_pairs + k]],
                                         final_loss=[st.final_loss[k], st.final_loss[k_pairs + k]],
                                         iterations=[st.iterations[k], st.iterations[k_pairs + k]],
                                         reached_threshold=[st.reached_threshold[k],
                                                            st.reached_threshold[k_pairs + k]])
                     for st in d.steps]
            results.append(RestoreResult(
                image=restored[k:k + 1], reconstructions={"original": r_o, "edited": r_e},
                psnr={"original": psnr(r_o, job.x_o), "edited": psnr(r_e, job.x_e)},
                masks={"face": mask_o[k:k + 1].cpu(), "element": mask_e[k:k + 1].cpu(), "blend": blend[k:k + 1]},
                w_schedule=alignment.w_schedules[k], timings=dict(timings), notes=job.notes,
                latent=z_final[2 * k_pairs + k:2 * k_pairs + k + 1].cpu(), null_text=steps,
                attention_maps=attention_maps[k]))
        return results

    # ---- several faces in one photo (paper A.16) ----------------------------------------------------------
    def restore_faces(self, original, edited, analyzer, prompt_original: str | list[str],
                      prompt_edited: str | list[str], id_words: list[str] | list[list[str]],
                      element_words: list[str] | list[list[str]], pairs: list[tuple[int, int]] | None = None,
                      min_iou: float | None = None, patch_scale: float | None = None, element_masks=None,
                      lambda_o: float | list[float | None] | None = None, seed: int = 0,
                      progress: bool = True) -> FacesResult:
        """Restore every face of a multi-person photo in one batch.

        1. the analyzer (anything with `analyze(image) -> list[faces.Face]`) finds the faces of both images;
           they are paired by position (`faces.pair_faces`, box IoU ≥ `min_iou`), or by the user's
           `pairs` [(index in the original, index in the edited image), …] in the analyzer's order;
        2. each pair gets one square patch (the same square in both images: `patch_scale` × the longer side
           of the union of the two boxes), resized to `image_size`; its face mask is the original face's
           landmark mask (`landmark_face_mask`), its element mask the cross-attention mask of the element
           words, or `element_masks[k]` ((H, W) in the edited image's coordinates, None for attention);
        3. all patches are restored in one batch (`restore_batch`);
        4. each restored patch goes back into the edited image through a feathered mask: the blended region
           of Stage 3 (M_O ∪ M_E, dilated) softened by `paste_feather` and ramped to 0 at the patch border.
           Every pixel outside it stays the edited image's, bit for bit.

        Images: paths, PIL images or (1, 3, H, W) tensors in [-1, 1] of one size. Prompts: one string for all
        faces or one per pair (in pair order); words: one list for all or one list per pair; lambda_o: one
        value or one per pair. Returns the image, per-face results (square, pair, PSNRs, ID-Sim before and
        after when the analyzer gives embeddings) and notes.
        """
        cfg = self.config
        s = cfg.image_size
        min_iou = cfg.face_min_iou if min_iou is None else min_iou
        patch_scale = cfg.face_patch_scale if patch_scale is None else patch_scale
        notes: list[str] = []
        x_o, name_o = _full_image(original, "original")
        x_e, name_e = _full_image(edited, "edited")
        if x_o.shape != x_e.shape:
            raise ValueError(f"editedid.py: the original {name_o} is {x_o.shape[-1]}×{x_o.shape[-2]} (w×h) but the "
                             f"edited {name_e} is {x_e.shape[-1]}×{x_e.shape[-2]}; give both at one size (resize the "
                             "edited image to the original's)")
        faces_o = self._analyze(analyzer, x_o, f"the original image {name_o}")
        faces_e = self._analyze(analyzer, x_e, f"the edited image {name_e}")
        pairing = faces.pair_faces(np.stack([f.box for f in faces_o]), np.stack([f.box for f in faces_e]),
                                   min_iou=min_iou, pairs=pairs)
        if not pairing.pairs:
            raise ValueError(f"editedid.py: no face of the original {name_o} overlaps one of the edited {name_e} by "
                             f"IoU ≥ {min_iou} ({len(faces_o)} and {len(faces_e)} faces); pick the pairs with "
                             "pairs=[(i, j), …] or lower min_iou")
        notes.append(pairing.describe())
        n = len(pairing.pairs)
        prompts_o = _each(prompt_original, n, "prompt_original")
        prompts_e = _each(prompt_edited, n, "prompt_edited")
        ids = _each(id_words, n, "id_words", words=True)
        elements = _each(element_words, n, "element_words", words=True)
        lambdas = _each(lambda_o, n, "lambda_o")
        element_masks = [None] * n if element_masks is None else list(element_masks)
        if len(element_masks) != n:
            raise ValueError(f"editedid.py: element_masks has {len(element_masks)} entries for {n} face pairs")

        jobs_in, squares, affines = [], [], []
        for k, (i, j) in enumerate(pairing.pairs):
            box = np.concatenate([np.minimum(faces_o[i].box[:2], faces_e[j].box[:2]),
                                  np.maximum(faces_o[i].box[2:], faces_e[j].box[2:])])  # union of the two boxes
            patch_o, affine = faces.crop_square(x_o[0], box, scale=patch_scale, size=s)  # (3, S, S)
            patch_e = faces.warp(x_e[0], affine, s, border="replicate")  # the same square of the edit
            face_mask, how = self.landmark_face_mask(faces_o[i], affine)
            element_mask = element_masks[k]
            if element_mask is not None:
                em = element_mask.float().reshape(1, *element_mask.shape[-2:])
                element_mask = faces.warp(em, affine, s, border="zeros").clamp(0, 1)  # (1, S, S)
            left, top, side = faces.square_around(box, patch_scale)
            squares.append((left, top, left + side, top + side))
            affines.append(affine)
            jobs_in.append(RestorePair(patch_o[None], patch_e[None], prompts_o[k], prompts_e[k], ids[k], elements[k],
                                       face_mask=face_mask, element_mask=element_mask, lambda_o=lambdas[k],
                                       seed=seed))
            notes.append(f"face pair {k} {(i, j)}: square ({left:.1f}, {top:.1f}) side {side:.1f}; face mask "
                         f"from {how}")
        results = self.restore_batch(jobs_in, progress=progress)

        out = x_e.clone()
        width = cfg.paste_feather * s
        ramp = faces.border_ramp(s, width)
        paste_masks = []
        for result, affine in zip(results, affines):
            region = F.interpolate(result.masks["blend"], size=(s, s), mode="nearest")[0, 0]  # (S, S)
            m = masks.feather(region, width) * ramp
            paste_masks.append(m)
            out = faces.paste_back(out, result.image, affine, mask=m)

        per_face = []
        after_faces = None
        if all(faces_o[i].embedding is not None and faces_e[j].embedding is not None for i, j in pairing.pairs):
            after_faces = analyzer.analyze(((out[0] + 1) / 2).clamp(0, 1))
            boxes_after = np.stack([f.box for f in after_faces]) if after_faces else np.zeros((0, 4))
            after_of = dict(faces.pair_faces(np.stack([f.box for f in faces_e]), boxes_after, min_iou=min_iou).pairs)
        else:
            notes.append("no ArcFace embeddings from the analyzer: ID-Sim not measured")
        for k, (i, j) in enumerate(pairing.pairs):
            before = after = None
            if after_faces is not None:
                before = float(metrics.id_similarity(faces_o[i].embedding, faces_e[j].embedding))
                if j in after_of and after_faces[after_of[j]].embedding is not None:
                    after = float(metrics.id_similarity(faces_o[i].embedding, after_faces[after_of[j]].embedding))
                else:
                    notes.append(f"face pair {k}: no face found at its place in the result; ID-Sim after not measured")
            per_face.append(FaceRestoration(pair=(i, j), box=squares[k], affine=affines[k], result=results[k],
                                            paste_mask=paste_masks[k], id_sim_before=before, id_sim_after=after))
        return FacesResult(image=out, faces=per_face, pairing=pairing, notes=notes, timings=results[0].timings)


# --------------------------------------------------------------------------------------------------------
# Several faces: inputs and results


@dataclass
class FaceRestoration:
    """One restored face of `EditedID.restore_faces`."""

    pair: tuple[int, int]  # (index in the original's faces, index in the edited image's), analyzer order
    box: tuple[float, float, float, float]  # the square patch in image coordinates (left, top, right, bottom)
    affine: np.ndarray  # 2×3, image → patch (`faces.crop_square`)
    result: RestoreResult  # the patch's restoration: patch-sized image, reconstructions, masks, w schedule
    paste_mask: torch.Tensor  # (S, S) in patch coordinates: where the restored patch replaced the edit
    id_sim_before: float | None = None  # ArcFace cosine, original face vs edited face
    id_sim_after: float | None = None  # original face vs the face at the same place in the result

    @property
    def psnr(self) -> dict[str, float]:
        """Reconstruction PSNRs of the patch (Stage 2), dB."""
        return self.result.psnr


@dataclass
class FacesResult:
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]: the edited image with every restored face pasted back
    faces: list[FaceRestoration]
    pairing: faces.FacePairing  # pairs used, and faces left unpaired
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the one batch

    @property
    def pil(self):
        return images.tensor_to_pil(self.image)


def _full_image(image, name: str) -> tuple[torch.Tensor, str]:
    """A whole picture (no square crop) as (1, 3, H, W) float32 in [-1, 1], and a name for messages."""
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image.unsqueeze(0)
        if x.dim() != 4 or x.shape[:2] != (1, 3):
            raise ValueError(f"editedid.py: the {name} image tensor must be (1, 3, H, W) in [-1, 1]; found "
                             f"{tuple(image.shape)}")
        return x.float(), "(tensor)"
    from PIL import Image

    if isinstance(image, Image.Image):
        return images.pil_to_tensor(images.to_rgb(image)), "(PIL image)"
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"editedid.py: the {name} image {path} was not found; give the path of a PNG or JPEG")
    with Image.open(path) as img:
        return images.pil_to_tensor(images.to_rgb(img)), str(path)


def _each(value, n: int, name: str, words: bool = False) -> list:
    """One value for every face pair, or a list of one per pair. Words: a list of words for every pair, or
    a list of such lists."""
    if words:
        if value and all(isinstance(v, (list, tuple)) for v in value):
            if len(value) != n:
                raise ValueError(f"editedid.py: {name} has {len(value)} word lists for {n} face pairs; give one "
                                 "list for all faces or one per pair")
            return [list(v) for v in value]
        return [list(value)] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"editedid.py: {name} has {len(value)} entries for {n} face pairs; give one value "
                             "for all faces or one per pair")
        return list(value)
    return [value] * n


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
