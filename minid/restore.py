"""Restoring files: EditedID (editedid.py) wrapped for people and their pictures.

`EditedID(sd, config).restore(original, edited, prompts, words, ...)` reads the images (paths, PIL images or
tensors), checks every input before any heavy work, encodes the images and prompts, runs the method
(`editedid.run`) and decodes the result; `restore_batch` does the same for K pairs in one batch. Face masks
come from the user, from the original's face landmarks (a face analyzer), or from the cross-attention maps of
the identity words. `report.save_result` writes the intermediates (reconstructions, masks, w schedule,
attention maps). Photos with several faces: multiface.py.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import PIL.Image
import torch

from minid import crops, images, masks, metrics
from minid.control import word_map
from minid.editedid import EditedIDConfig, PairText, Tokens, blend_mask, run
from minid.inversion import NullTextStep
from minid.schedule import NoiseSchedule


MIN_IMAGE_SIZE = 64  # the smallest working square (RestoreConfig.image_size, `--image-size`)


@dataclass(frozen=True)
class RestoreConfig:
    """How pictures go through the method: the method's own settings nested, and the image-side ones."""

    method: EditedIDConfig = EditedIDConfig()
    image_size: int = 512  # side of the square the models work on (SD1.4: 512; a multiple of 8, the VAE's factor)
    sample_posterior: bool = False  # encode with a posterior sample (seeded per pair) instead of its mean
    # σ of the blur that softens a landmark face mask, as a fraction of image_size (4 px at 512), so a setting
    # means the same on the tests' 64² squares as on SD's 512²
    face_mask_feather: float = 1 / 128
    # The fused attention edits of Stage 3: "auto" = Triton kernels on CUDA, the PyTorch path elsewhere;
    # "triton" or "torch" to force one (the same semantics; tests compare them).
    attention_backend: str = "auto"

    def __post_init__(self):
        # at least 64: the masks from attention come from maps of a quarter of the latent side (64 px → 2²)
        if not isinstance(self.image_size, int) or self.image_size % 8 or self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"RestoreConfig.image_size must be a multiple of 8 (the VAE's factor) of at least "
                             f"{MIN_IMAGE_SIZE}, got {self.image_size!r}")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"RestoreConfig.attention_backend must be 'auto', 'triton' or 'torch', got "
                             f"{self.attention_backend!r}")


@dataclass
class RestoreResult:
    image: torch.Tensor  # (1, 3, S, S) in [-1, 1], the restored edited image
    reconstructions: dict[str, torch.Tensor]  # "original", "edited": Stage 2's reconstructions
    psnr: dict[str, float]  # each reconstruction against its input, dB
    masks: dict[str, torch.Tensor]  # "face" (M_O), "element" (M_E) at image size; "blend" at latent size
    w_schedule: list[float]  # Stage 1's mixing weights, one per inversion step
    timings: dict[str, float]  # seconds per stage (of the whole batch when restored with others)
    inversion: str = "null-text"  # Stage 2's way: "null-text", "direct" or "negative-prompt"
    # UNet calls per stage (of the whole batch): "forward" every call, "backward" those differentiated
    # (null-text optimisation's inner iterations)
    unet_calls: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was adjusted (mask resized, …)
    latent: torch.Tensor | None = None  # z_0^T
    null_text: list[NullTextStep] = field(default_factory=list)  # Stage 2's per-step statistics (O and E)
    attention_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # word -> (h, w) averaged cross map
    paths: dict[str, Path] = field(default_factory=dict)  # files written by report.save_result
    # with regions: per region, PSNR (dB) and SSIM of the result against the original in the aligned face frame
    regions: dict[str, dict[str, float]] = field(default_factory=dict)
    identity_schedule: list[float] = field(default_factory=list)  # s_i of Stage 3, one per step
    w_differences: list[float] = field(default_factory=list)  # Stage 1's D = mean((ẑ^O − ẑ^E)²) per step
    # the plan the reconstruction ran, one entry per step: solver, order, t, and the σ it starts from and lands on
    plan: list[dict] = field(default_factory=list)

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
    # ConsistentID's fine-grained regions instead of one face mask: "eyes=original,mouth=edited:0.7", a dict
    # of the same or a JSON file (regions.parse_regions); needs a face analyzer (the 106 landmarks)
    regions: object = None


@dataclass
class _Job:
    """A checked pair, ready to run: images at working size, masks (or None), prompts and token positions."""

    x_o: torch.Tensor  # (1, 3, S, S)
    x_e: torch.Tensor
    sources: list  # the files the inputs were read from (never overwritten)
    mask_o: torch.Tensor | None  # (1, 1, S, S) or None: from the cross-attention maps
    mask_e: torch.Tensor | None
    pair: RestorePair
    text: PairText
    notes: list[str]
    regions: dict | None = None  # the parsed region choices
    keep_e: torch.Tensor | None = None  # (1, 1, S, S) regions kept from E exactly
    lambda_map: torch.Tensor | None = None  # (1, 1, S, S) λ_O per pixel
    face: object = None  # the original's face (faces.Face) when an analyzer ran, for the region report


class EditedID:
    """EditedID over a `StableDiffusion` (tokenizer, text_encoder, unet, vae) and a `RestoreConfig`."""

    def __init__(self, sd, config: RestoreConfig = RestoreConfig()):
        self.sd = sd
        self.config = config
        self.schedule = NoiseSchedule.scaled_linear()
        self.plan = config.method.plan(self.schedule)
        # Called as stage_hook(stage_name, "start" | "end") around each timed stage of `restore`
        # (benchmarks use it to reset and read peak-memory counters); None does nothing.
        self.stage_hook = None

    @contextlib.contextmanager
    def _stage(self, name: str, timings: dict[str, float], calls: dict[str, dict[str, int]]):
        """Time a stage and count its UNet calls (a forward hook: a call whose output requires grad is one
        that null-text optimisation differentiates)."""
        if self.stage_hook is not None:
            self.stage_hook(name, "start")
        counts = calls.setdefault(name, {"forward": 0, "backward": 0})

        def count(module, args, output):
            counts["forward"] += 1
            counts["backward"] += int(output.requires_grad)

        hook = self.sd.unet.register_forward_hook(count)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            hook.remove()
        timings[name] = time.perf_counter() - t0
        if self.stage_hook is not None:
            self.stage_hook(name, "end")

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

    # ---- the entry points ---------------------------------------------------------------------------------
    def restore(self, original, edited, prompt_original: str, prompt_edited: str, id_words: list[str],
                element_words: list[str], face_mask=None, element_mask=None, seed: int = 0,
                progress: bool = True, save_intermediates: str | Path | None = None,
                analyzer=None, regions=None) -> RestoreResult:
        """Restore `original`'s face identity in `edited`. Images: paths, PIL images or (1, 3, S, S) tensors.

        id_words (in both prompts) have their cross-attention columns taken from O; element_words (in the
        edited prompt) from E. face_mask / element_mask: mask images (white = region) of the original's /
        edited image's size, or tensors. Without face_mask, M_O comes from `analyzer` when given (anything
        with `analyze(image) -> list[faces.Face]`, e.g. `faces.FaceAnalyzer`): the landmark mask of the
        original's largest face (`landmark_face_mask`); without an analyzer, and for a missing element_mask,
        the masks come from the cross-attention maps of the words, gathered during Stage 2's conditional
        calls (M_O from O's maps of id_words, M_E from E's maps of element_words; P2P local blend).
        regions: ConsistentID's fine-grained regions instead of one face mask (`RestorePair.regions`): each of
        eyes, brows, nose, mouth, skin restored from the original or kept from the edit exactly, with an optional
        λ, and the region words of the prompts replaced inside their region only; needs `analyzer`.
        seed: seeds the posterior sample when `config.sample_posterior` (the method is otherwise deterministic).
        save_intermediates: a folder for restored.png, reconstructions, masks, w schedule (JSON and PNG) and
        the attention-map grid. Progress bars (tqdm) per stage when `progress`.
        """
        job = check_pair(RestorePair(original, edited, prompt_original, prompt_edited, id_words, element_words,
                                   face_mask, element_mask, seed=seed, regions=regions), self.sd.tokenizer, self.config)
        self._face_masks(job, analyzer, "the original image" + (f" {original}" if isinstance(original, (str, Path))
                                                                else ""))
        result = self._run([job], progress)[0]
        if save_intermediates is not None:
            from minid.report import save_result

            result.paths = save_result(result, save_intermediates, inputs=job.sources)
        return result

    def restore_batch(self, pairs: list[RestorePair], progress: bool = True,
                      save_intermediates: str | Path | None = None, analyzer=None) -> list[RestoreResult]:
        """Restore K pairs in ONE batch through every stage: 2K latents in Stage 1, 2K null-texts in Stage 2,
        3K branches × 2 guidance halves in Stage 3. Each pair keeps its own prompts, words, masks, λ and seed,
        and the result of each equals what `restore` gives it alone, up to the rounding of a larger batch
        (and, through it, a null-text early stop that may fall one iteration apart when a loss lands on the
        threshold). save_intermediates: a folder that gets one sub-folder per pair, pair_0, pair_1, …
        """
        if not pairs:
            raise ValueError("restore_batch needs at least one RestorePair")
        jobs = [check_pair(p, self.sd.tokenizer, self.config, f"pair {k}: " if len(pairs) > 1 else "")
                for k, p in enumerate(pairs)]
        for k, job in enumerate(jobs):
            self._face_masks(job, analyzer, f"the original image of pair {k}")
        results = self._run(jobs, progress)
        if save_intermediates is not None:
            from minid.report import save_result

            for k, (job, result) in enumerate(zip(jobs, results)):
                result.paths = save_result(result, Path(save_intermediates) / f"pair_{k}", inputs=job.sources)
        return results

    def _face_masks(self, job: _Job, analyzer, name: str) -> None:
        """M_O from the original's largest face when no face mask was given and an analyzer is: its landmark
        mask, or its regions (`RestorePair.regions`: M_O, the kept-from-E mask, λ_O map, region words)."""
        if job.regions and analyzer is None:
            raise ValueError("regions need the face landmarks of the original: give a face analyzer "
                             "(CLI: the face pack, --face-pack/--face-root or --download-faces)")
        if job.mask_o is not None or analyzer is None:
            return
        found = analyze(analyzer, job.x_o, name)
        job.face = max(found, key=lambda f: f.area)
        if not job.regions:
            job.mask_o, how = landmark_face_mask(job.face, self.config)
            job.notes.append(f"face mask from the original's largest face ({len(found)} found): {how}")
            return
        from minid.gating import LocalTokens
        from minid.regions import region_edits, region_masks

        s = self.config.image_size
        region_mask, how = region_masks(s, job.face.kps, job.face.landmarks_106, self.config.face_mask_feather * s)
        p = job.pair
        edits = region_edits(region_mask, job.regions, self.config.method.gating.lambda_o,
                             (p.prompt_original, p.prompt_edited), self.sd.tokenizer)
        job.mask_o, job.keep_e, job.lambda_map = edits.face, edits.keep, edits.lambda_o
        prompt_t = p.prompt_original if self.config.method.target == "original" else p.prompt_edited
        for word, source, mask in edits.local:
            prompt_s = p.prompt_original if source == "original" else p.prompt_edited
            pairs = _pairs(self.sd.tokenizer, prompt_t, prompt_s, [word], "region")
            job.text.tokens.local.append(LocalTokens(pairs, 0 if source == "original" else 1, mask))
        chosen = ", ".join(f"{r}={c.source}" + ("" if c.lambda_o is None else f":{c.lambda_o}")
                           for r, c in job.regions.items())
        words = ", ".join(w for w, _, _ in edits.local) or "none"
        job.notes.append(f"regions {chosen} ({how}); region words replaced inside their region: {words}")

    # ---- the run ------------------------------------------------------------------------------------------
    def _run(self, jobs: list[_Job], progress: bool) -> list[RestoreResult]:
        """Encode, run the method, decode, for K checked pairs in one batch. Batch rows: O_1 … O_K,
        E_1 … E_K (Stages 1-2), then T_1 … T_K (Stage 3)."""
        cfg = self.config
        k_pairs = len(jobs)
        timings: dict[str, float] = {}
        calls: dict[str, dict[str, int]] = {}
        device, dtype = self.device, self.dtype
        with self._stage("encode", timings, calls), torch.no_grad():
            x = torch.cat([j.x_o for j in jobs] + [j.x_e for j in jobs]).to(device, dtype)  # (2K, 3, S, S)
            # each pair draws its (O, E) noise from its own seed, as it would alone
            generators = [torch.Generator().manual_seed(j.pair.seed) for j in jobs] * 2
            z0 = self.sd.vae.encode_latent(x, sample=cfg.sample_posterior,
                                           generator=generators if cfg.sample_posterior else None)
            cond = self.encode_text([j.pair.prompt_original for j in jobs] + [j.pair.prompt_edited for j in jobs])
            cond_o, cond_e = cond[:k_pairs], cond[k_pairs:]  # (K, 77, D) each
            uncond = self.encode_text([""])
        gatings = [cfg.method.gating if j.pair.lambda_o is None else replace(cfg.method.gating, lambda_o=j.pair.lambda_o)
                   for j in jobs]
        outcome = run(self.sd.unet, self.plan, cfg.method, z0[:k_pairs], z0[k_pairs:], cond_o, cond_e, uncond,
                      [j.text for j in jobs], [j.mask_o for j in jobs], [j.mask_e for j in jobs], cfg.image_size,
                      gatings=gatings, backend=cfg.attention_backend,
                      stage=lambda name: self._stage(name, timings, calls), progress=progress,
                      keeps_e=[j.keep_e for j in jobs], lambda_maps=[j.lambda_map for j in jobs])
        d = outcome.disentanglement
        with self._stage("decode", timings, calls), torch.no_grad():
            recon = self.sd.vae.decode_latent(d.z0).float().clamp(-1, 1).cpu()  # (2K, 3, S, S)
            restored = self.sd.vae.decode_latent(outcome.z0[2 * k_pairs:]).float().clamp(-1, 1).cpu()  # (K, 3, S, S)

        latent_side = z0.shape[-1]
        blend = blend_mask(outcome.mask_o, outcome.mask_e, latent_side, cfg.method.blend_dilation,
                           outcome.keep_e).cpu()
        results = []
        for k, job in enumerate(jobs):
            row_o, row_e = k, k_pairs + k
            words = [(w, row_o, job.pair.prompt_original) for w in job.pair.id_words]
            words += [(w, row_e, job.pair.prompt_edited) for w in job.pair.element_words]
            maps = {w: word_map(d.store, row, _positions(self.sd.tokenizer, prompt, [w], "mask"), (latent_side, latent_side),
                                cfg.method.attention_masks.map_factors, pool=cfg.method.attention_masks.pool)[0, 0]
                    for w, row, prompt in words} if d.store.maps else {}  # none gathered: every mask was given
            o_attn, e_attn = outcome.from_attention[k]
            if o_attn:
                job.notes.append("face mask taken from the cross-attention maps of " + ", ".join(job.pair.id_words))
            if e_attn:
                job.notes.append("element mask taken from the cross-attention maps of "
                                 + ", ".join(job.pair.element_words))
            r_o, r_e = recon[row_o:row_o + 1], recon[row_e:row_e + 1]
            results.append(RestoreResult(
                image=restored[k:k + 1], reconstructions={"original": r_o, "edited": r_e},
                psnr={"original": metrics.psnr(r_o, job.x_o, 2.0), "edited": metrics.psnr(r_e, job.x_e, 2.0)},
                masks={"face": outcome.mask_o[k:k + 1].cpu(), "element": outcome.mask_e[k:k + 1].cpu(),
                       "blend": blend[k:k + 1]},
                w_schedule=outcome.alignment.w_schedules[k], timings=dict(timings), notes=job.notes,
                inversion=cfg.method.inversion, unet_calls={stage: dict(c) for stage, c in calls.items()},
                latent=outcome.z0[2 * k_pairs + k:2 * k_pairs + k + 1].cpu(),
                null_text=[st.rows([row_o, row_e]) for st in d.steps], attention_maps=maps,
                regions=self._region_report(job, restored[k]),
                identity_schedule=cfg.method.gating.identity.values(cfg.method.num_steps),
                w_differences=outcome.alignment.differences[k], plan=self.plan_record()))
        return results

    def plan_record(self) -> list[dict]:
        """The reconstruction's plan as plain data: per step its solver, order, t and σ from → to."""
        return [{"solver": s.solver, "order": s.order, "t": s.t, "sigma": self.schedule.sigma(s.t),
                 "sigma_next": self.schedule.sigma(s.s)} for s in self.plan.steps]

    @staticmethod
    def _region_report(job: _Job, restored: torch.Tensor) -> dict[str, dict[str, float]]:
        """Per region PSNR and SSIM of the result against the original (regions.region_scores), when the
        pair's regions were chosen from its landmarks."""
        if not job.regions or job.face is None:
            return {}
        from minid.regions import region_scores

        return region_scores(job.x_o[0], restored, job.face.kps, job.face.landmarks_106)


def analyze(analyzer, x: torch.Tensor, name: str) -> list:
    """The analyzer's faces of a (1, 3, H, W) image in [-1, 1] (given to it as (3, H, W) in [0, 1])."""
    found = analyzer.analyze(((x[0].float() + 1) / 2).clamp(0, 1))
    if not found:
        raise ValueError(f"the face analyzer found no face in {name}; check that the face is visible and not tiny, "
                         "give a face mask, or restore without an analyzer (the face mask then comes from the "
                         "cross-attention maps)")
    return found


# --------------------------------------------------------------------------------------------------------
# Checks, before any heavy work


def check_pair(pair: RestorePair, tokenizer, config: RestoreConfig, name: str = "") -> _Job:
    """Every check of one pair, before any heavy work: prompts, words, images, masks, λ; `name` prefixes the
    messages (e.g. "pair 2: ")."""
    method = config.method
    notes: list[str] = []
    for what, p in (("prompt_original", pair.prompt_original), ("prompt_edited", pair.prompt_edited)):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{name}{what} must be a non-empty string, got {p!r}")
        note = prompt_note(tokenizer, p, f"{name}{what}")
        if note:
            notes.append(note)
    if isinstance(pair.id_words, str) or isinstance(pair.element_words, str):
        raise TypeError(f"{name}id_words and element_words are lists of words, e.g. ['man'], ['glasses']")
    if not pair.id_words:
        raise ValueError(f"{name}give at least one identity word (e.g. 'man', 'face') in id_words")
    prompt_t = pair.prompt_original if method.target == "original" else pair.prompt_edited
    id_positions = _positions(tokenizer, pair.prompt_original, pair.id_words, "identity")
    _positions(tokenizer, prompt_t, pair.id_words, "identity")
    element_positions = _positions(tokenizer, pair.prompt_edited, pair.element_words, "element")
    _positions(tokenizer, prompt_t, pair.element_words, "element")
    tokens = Tokens(identity=_pairs(tokenizer, prompt_t, pair.prompt_original, pair.id_words, "identity"),
                    element=_pairs(tokenizer, prompt_t, pair.prompt_edited, pair.element_words, "element"))
    x_o, frame_o = _image(config.image_size, pair.original, "original")
    x_e, frame_e = _image(config.image_size, pair.edited, "edited")
    mask_o = _mask(config.image_size, pair.face_mask, "face", frame_o, notes)
    mask_e = _mask(config.image_size, pair.element_mask, "element", frame_e, notes)
    if mask_e is None and not pair.element_words:
        raise ValueError(f"{name}with no element_mask, element_words must name the edited elements (their "
                         "cross-attention maps give the element region)")
    if pair.lambda_o is not None and not 0 <= pair.lambda_o <= 1:
        raise ValueError(f"{name}lambda_o must be in [0, 1], got {pair.lambda_o}")
    sources = [f.source for f in (frame_o, frame_e) if f is not None and f.source is not None]
    sources += [Path(m) for m in (pair.face_mask, pair.element_mask) if isinstance(m, (str, Path))]  # inputs too
    choices = None
    if pair.regions is not None:
        from minid.regions import parse_regions

        choices = parse_regions(pair.regions)
        if pair.face_mask is not None:
            raise ValueError(f"{name}give either a face mask or regions (which make the face mask), not both")
    return _Job(x_o=x_o, x_e=x_e, sources=sources, mask_o=mask_o, mask_e=mask_e, pair=pair, regions=choices,
                text=PairText(id_positions, element_positions, tokens), notes=notes)


def prompt_note(tokenizer, prompt: str, what: str) -> str | None:
    """Check that a prompt is text the tokenizer can read (ValueError otherwise) and return a note when it is
    longer than the text encoder's window (SD's convention: the rest is cut off), else None."""
    tokenizer.check_text(prompt, what)
    dropped = tokenizer.dropped_text(prompt)
    if not dropped:
        return None
    return (f"{what} is longer than the {tokenizer.max_content_tokens} tokens SD1.4's text encoder reads; "
            f"the end is ignored: {dropped[:60]!r}{'…' if len(dropped) > 60 else ''}")


def _image(s: int, image, name: str) -> tuple[torch.Tensor, images.CropFrame | None]:
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image.unsqueeze(0)
        if x.shape[:2] != (1, 3) or x.shape[-2:] != (s, s):
            raise ValueError(f"the {name} image tensor must be (1, 3, {s}, {s}) in [-1, 1]; found "
                             f"{tuple(image.shape)}. Load files with minid.images.load_image")
        if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
            raise ValueError(f"the {name} image tensor must hold finite floats in [-1, 1]; found dtype "
                             f"{x.dtype} with {int((~torch.isfinite(x.float())).sum())} NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.01 or hi > 1.01:  # a little slack for resampling overshoot
            hint = " (0-255 pixels? divide by 127.5 and subtract 1)" if hi > 2 else ""
            raise ValueError(f"the {name} image tensor must be in [-1, 1]; found values in [{lo:.3g}, {hi:.3g}]{hint}")
        return x.float(), None
    if not isinstance(image, (str, Path, PIL.Image.Image)):
        raise TypeError(f"the {name} image must be a file path, a PIL image or a (1, 3, {s}, {s}) tensor in "
                        f"[-1, 1]; got {type(image).__name__}")
    return images.load_image(image, size=s)


def _mask(s: int, mask, name: str, frame, notes: list[str]) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, (str, Path, torch.Tensor)):
        raise TypeError(f"the {name} mask must be a file path or an (H, W) tensor in [0, 1]; got "
                        f"{type(mask).__name__}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = masks.load_mask(mask, size=s, frame=frame if not isinstance(mask, torch.Tensor) else None,
                            required=False)
    for w in caught:  # a note of the result, and a warning for Python users (the CLI prints notes only)
        notes.append(f"{name} mask: {w.message}")
        warnings.warn(str(w.message))
    if float(m.max()) <= 0:
        raise ValueError(f"the {name} mask is empty (all zero); give a mask with the region white, or leave it "
                         "out to take it from the cross-attention maps")
    return m[None, None]  # (1, 1, S, S)


def _positions(tokenizer, prompt: str, words: list[str], what: str) -> list[int]:
    out = []
    for w in words:
        try:
            found = tokenizer.token_positions(prompt, w)
        except ValueError as e:
            raise ValueError(f"{what} word {w!r} is not in the prompt {prompt!r} ({e})") from None
        if not found:  # every occurrence lies past the window the text encoder reads
            raise ValueError(f"{what} word {w!r} lies beyond the first {tokenizer.max_content_tokens} tokens of "
                             f"the prompt {prompt[:50]!r}…, which are all SD1.4's text encoder reads; move it earlier "
                             "or shorten the prompt")
        out += found
    return out


def _pairs(tokenizer, prompt_t: str, prompt_s: str, words: list[str], what: str) -> list[tuple[int, int]]:
    pairs = []
    for w in words:
        try:
            pos_s, pos_t = tokenizer.align_tokens(prompt_s, prompt_t, w)
        except ValueError as e:
            raise ValueError(f"{what} word {w!r}: {e}") from None
        pairs += list(zip(pos_t, pos_s))
    return pairs


def landmark_face_mask(face, config: RestoreConfig, affine=None) -> tuple[torch.Tensor, str]:
    """M_O from a `faces.Face`: the hull of its 106 landmarks (else the 5-point ellipse), feathered by
    `config.face_mask_feather`, at image size (1, 1, S, S); `affine` maps the face's image to the
    working square (a face patch). Returns the mask and a note saying which landmarks made it."""
    s = config.image_size
    kps, dense = face.kps, face.landmarks_106
    if affine is not None:
        kps = crops.apply_affine(kps, affine)
        dense = None if dense is None else crops.apply_affine(dense, affine)
    m = masks.face_mask(s, kps=kps, landmarks_106=dense)  # (S, S), 0 or 1
    sigma = config.face_mask_feather * s
    m = masks.feather(m, sigma)
    how = "the hull of its 106 landmarks" if dense is not None else "an ellipse on its 5 keypoints"
    return m[None, None], f"{how}, feathered (σ = {sigma:.3g} px)"
