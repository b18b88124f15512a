"""Restoring files: EditedID (editedid.py) wrapped for people and their pictures.

`EditedID(sd, config).restore(original, edited, prompts, words, ...)` reads the images (paths, PIL
images or tensors), checks every input before any heavy work, encodes the images and prompts, runs
the method (`editedid.run`) and decodes the result; `restore_batch` does the same for K pairs in one
batch. Face masks come from the user, from the original's face landmarks (a face analyzer), or from
the cross-attention maps of the identity words. `report.save_result` writes the intermediates
(reconstructions, masks, w schedule, attention maps). Photos with several faces: multiface.py.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from minid.imaging import images, metrics
from minid.method.control import word_map
from minid.method.editedid import blend_mask, run
from minid.method.null_text import NullTextStep
from minid.restore.config import RestoreConfig
from minid.restore.inputs import CheckedPair, RestorePair, check_pair, face_masks, word_positions
from minid.sampling.guided import check_finite
from minid.sampling.schedule import NoiseSchedule


@dataclass
class RestoreResult:
    image: torch.Tensor  # (1, 3, S, S) in [-1, 1], the restored edited image
    reconstructions: dict[str, torch.Tensor]  # "original", "edited": Stage 2's reconstructions
    psnr: dict[str, float]  # each reconstruction against its input, dB
    # "face" (M_O), "element" (M_E) at image size; "blend" at latent size
    masks: dict[str, torch.Tensor]
    w_schedule: list[float]  # Stage 1's mixing weights, one per inversion step
    timings: dict[str, float]  # seconds per stage (of the whole batch when restored with others)
    inversion: str = "null-text"  # Stage 2's way: "null-text", "direct" or "negative-prompt"
    # UNet calls per stage (of the whole batch): "forward" every call, "backward" those
    # differentiated (null-text optimisation's inner iterations)
    unet_calls: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was adjusted (mask resized, …)
    latent: torch.Tensor | None = None  # z_0^T
    # Stage 2's per-step statistics (O and E)
    null_text: list[NullTextStep] = field(default_factory=list)
    # word -> (h, w) averaged cross map
    attention_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)  # files written by report.save_result
    # with regions: per region, PSNR (dB) and SSIM of the result against the region's source
    # ("against": the original for regions restored from it, the edited image for the others) in the
    # aligned face frame
    regions: dict[str, dict[str, float]] = field(default_factory=dict)
    identity_schedule: list[float] = field(default_factory=list)  # s_i of Stage 3, one per step
    # Stage 1's D = mean((ẑ^O − ẑ^E)²) per step
    w_differences: list[float] = field(default_factory=list)
    # the plan the reconstruction ran, one entry per step: solver, order, t, and the σ it starts
    # from and lands on
    plan: list[dict] = field(default_factory=list)
    # the face-patch path's registration of the edit onto the original: the 2×3 affine edited →
    # original in the two inputs' pixels, residual, both face boxes, backend (None: centre crops)
    registration: dict | None = None

    @property
    def pil(self):
        return images.tensor_to_pil(self.image)


def _check_models(sd, config) -> None:
    """A TypeError naming what `EditedID(sd, config)` was given instead of a loaded stack and a
    `RestoreConfig`, and what to write."""
    if isinstance(sd, (str, Path)):
        raise TypeError(
            f"EditedID takes the loaded models, not the path {str(sd)!r}: "
            f"EditedID(load_stable_diffusion({str(sd)!r})) (minid.loading.checkpoint)"
        )
    missing = [n for n in ("tokenizer", "text_encoder", "unet", "vae") if not hasattr(sd, n)]
    if missing:
        raise TypeError(
            f"EditedID takes a StableDiffusion (tokenizer, text_encoder, unet, vae); the "
            f"{type(sd).__name__} given has no {', '.join(missing)}: load one with "
            "minid.loading.checkpoint.load_stable_diffusion"
        )
    if not isinstance(config, RestoreConfig):
        hint = (
            f"RestoreConfig(method={type(config).__name__}(…))"
            if type(config).__name__ == "EditedIDConfig"
            else "RestoreConfig(…)"
        )
        raise TypeError(
            f"EditedID's config is a RestoreConfig, not a {type(config).__name__}: give {hint}"
        )


class EditedID:
    """EditedID over a `StableDiffusion` (tokenizer, text_encoder, unet, vae) and a
    `RestoreConfig`."""

    def __init__(self, sd, config: RestoreConfig = RestoreConfig()):
        _check_models(sd, config)
        self.sd = sd
        self.config = config
        self.schedule = NoiseSchedule.scaled_linear()
        self.plan = config.method.plan(self.schedule)
        # Called as stage_hook(stage_name, "start" | "end") around each timed stage of `restore`
        # (benchmarks use it to reset and read peak-memory counters); None does nothing.
        self.stage_hook = None

    @contextlib.contextmanager
    def _stage(self, name: str, timings: dict[str, float], calls: dict[str, dict[str, int]]):
        """Time a stage and count its UNet calls (a forward hook: a call whose output requires grad
        is one that null-text optimisation differentiates)."""
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

    # ---- the entry points ------------------------------------------------------------------------
    def restore(
        self,
        original,
        edited,
        prompt_original: str,
        prompt_edited: str,
        id_words: list[str],
        element_words: list[str],
        face_mask=None,
        element_mask=None,
        seed: int = 0,
        progress: bool = True,
        save_intermediates: str | Path | None = None,
        analyzer=None,
        regions=None,
        overwrite: bool = False,
    ) -> RestoreResult:
        """Restore `original`'s face identity in `edited`. Images: paths, PIL images or (1, 3, S, S)
        tensors.

        id_words (in both prompts) have their cross-attention columns taken from O; element_words
        (in the edited prompt) from E. face_mask / element_mask: mask images (white = region) of the
        original's / edited image's size, or tensors. Without face_mask, M_O comes from `analyzer`
        when given (anything with `analyze(image) -> list[faces.Face]`, e.g. `faces.FaceAnalyzer`):
        the landmark mask of the original's largest face (`landmark_face_mask`); without an
        analyzer, and for a missing element_mask, the masks come from the cross-attention maps of
        the words, gathered during Stage 2's conditional calls (M_O from O's maps of id_words, M_E
        from E's maps of element_words; P2P local blend). regions: ConsistentID's fine-grained
        regions instead of one face mask (`RestorePair.regions`): each of eyes, brows, nose, mouth,
        skin restored from the original or kept from the edit exactly, with an optional λ, and the
        region words of the prompts replaced inside their region only; needs `analyzer`. seed: seeds
        the posterior sample when `config.sample_posterior` (the method is otherwise deterministic).
        save_intermediates: a folder for restored.png, reconstructions, masks, w schedule (JSON and
        PNG) and the attention-map grid; a file of those names already there is refused before any
        work unless `overwrite` (the command line's --overwrite). Progress bars (tqdm) per stage
        when `progress`.
        """
        job = check_pair(
            RestorePair(
                original,
                edited,
                prompt_original,
                prompt_edited,
                id_words,
                element_words,
                face_mask,
                element_mask,
                seed=seed,
                regions=regions,
            ),
            self.sd.tokenizer,
            self.config,
        )
        name = "the original image" + (f" {original}" if isinstance(original, (str, Path)) else "")
        return self.restore_checked(job, progress, save_intermediates, analyzer, name, overwrite)

    def restore_checked(
        self,
        job: CheckedPair,
        progress: bool = True,
        save_intermediates: str | Path | None = None,
        analyzer=None,
        name: str = "the original image",
        overwrite: bool = False,
    ) -> RestoreResult:
        """`restore` of a pair checked already (`inputs.check_pair` with this method's tokenizer and
        config): the images and masks it decoded are used as they are."""
        if save_intermediates is not None:
            _check_folder(save_intermediates, job.sources, overwrite)
        face_masks(job, analyzer, self.config, self.sd.tokenizer, name)
        result = self._run([job], progress)[0]
        result.registration = job.registration
        if save_intermediates is not None:
            from minid.restore.report import save_result

            result.paths = save_result(result, save_intermediates, inputs=job.sources)
        return result

    def restore_batch(
        self,
        pairs: list[RestorePair | CheckedPair],
        progress: bool = True,
        save_intermediates: str | Path | None = None,
        analyzer=None,
        overwrite: bool = False,
    ) -> list[RestoreResult]:
        """Restore K pairs in ONE batch through every stage: 2K latents in Stage 1, 2K null-texts in
        Stage 2, 3K branches × 2 guidance halves in Stage 3. Each pair keeps its own prompts, words,
        masks, λ and seed, and the result of each equals what `restore` gives it alone, up to the
        rounding of a larger batch (and, through it, a null-text early stop that may fall one
        iteration apart when a loss lands on the threshold). save_intermediates: a folder that gets
        one sub-folder per pair, pair_0, pair_1, … (existing files refused unless `overwrite`, as
        `restore`). A `CheckedPair` (checked already with this
        method's tokenizer and config) is taken as it is.
        """
        if not pairs:
            raise ValueError("restore_batch needs at least one RestorePair")
        jobs = [
            p
            if isinstance(p, CheckedPair)
            else check_pair(
                p, self.sd.tokenizer, self.config, f"pair {k}: " if len(pairs) > 1 else ""
            )
            for k, p in enumerate(pairs)
        ]
        for k, job in enumerate(jobs):
            if job.x_o.shape[-1] != self.config.image_size:
                raise ValueError(
                    f"pair {k} was checked for {job.x_o.shape[-1]}² images, this method works on "
                    f"{self.config.image_size}²; check it with this method's config"
                )
        if save_intermediates is not None:
            for k, job in enumerate(jobs):
                _check_folder(Path(save_intermediates) / f"pair_{k}", job.sources, overwrite)
        for k, job in enumerate(jobs):
            face_masks(
                job, analyzer, self.config, self.sd.tokenizer, f"the original image of pair {k}"
            )
        results = self._run(jobs, progress)
        for job, result in zip(jobs, results):
            result.registration = job.registration
        if save_intermediates is not None:
            from minid.restore.report import save_result

            for k, (job, result) in enumerate(zip(jobs, results)):
                result.paths = save_result(
                    result, Path(save_intermediates) / f"pair_{k}", inputs=job.sources
                )
        return results

    # ---- the run ---------------------------------------------------------------------------------
    def _run(self, jobs: list[CheckedPair], progress: bool) -> list[RestoreResult]:
        """Encode, run the method, decode, for K checked pairs in one batch. Batch rows: O_1 … O_K,
        E_1 … E_K (Stages 1-2), then T_1 … T_K (Stage 3)."""
        cfg = self.config
        k_pairs = len(jobs)
        timings: dict[str, float] = {}
        calls: dict[str, dict[str, int]] = {}
        device, dtype = self.device, self.dtype
        with self._stage("encode", timings, calls), torch.no_grad():
            # (2K, 3, S, S)
            x = torch.cat([j.x_o for j in jobs] + [j.x_e for j in jobs]).to(device, dtype)
            # each pair draws its (O, E) noise from its own seed, as it would alone
            generators = [torch.Generator().manual_seed(j.pair.seed) for j in jobs] * 2
            z0 = self.sd.vae.encode_latent(
                x,
                sample=cfg.sample_posterior,
                generator=generators if cfg.sample_posterior else None,
            )
            cond = self.encode_text(
                [j.pair.prompt_original for j in jobs] + [j.pair.prompt_edited for j in jobs]
            )
            cond_o, cond_e = cond[:k_pairs], cond[k_pairs:]  # (K, 77, D) each
            uncond = self.encode_text([""])
        self._check_finite(z0, "latents of the images", "encoding (the VAE encoder)")
        self._check_finite(cond, "prompt embeddings", "encoding (the text encoder)")
        gatings = [
            cfg.method.gating
            if j.pair.lambda_o is None
            else replace(cfg.method.gating, lambda_o=j.pair.lambda_o)
            for j in jobs
        ]
        outcome = run(
            self.sd.unet,
            self.plan,
            cfg.method,
            z0[:k_pairs],
            z0[k_pairs:],
            cond_o,
            cond_e,
            uncond,
            [j.text for j in jobs],
            [j.mask_o for j in jobs],
            [j.mask_e for j in jobs],
            cfg.image_size,
            gatings=gatings,
            backend=cfg.attention_backend,
            stage=lambda name: self._stage(name, timings, calls),
            progress=progress,
            keeps_e=[j.keep_e for j in jobs],
            lambda_maps=[j.lambda_map for j in jobs],
        )
        d = outcome.disentanglement
        # each stage's latents, in the order the stages ran: the first non-finite one is named
        for z, stage in (
            (outcome.alignment.pivots_o[-1], "Stage 1 (align)"),
            (outcome.alignment.pivots_e[-1], "Stage 1 (align)"),
            (d.z0, "Stage 2 (disentangle)"),
            (outcome.z0, "Stage 3 (entangle)"),
        ):
            self._check_finite(z, "latents", stage)
        with self._stage("decode", timings, calls), torch.no_grad():
            recon = self.sd.vae.decode_latent(d.z0).float()  # (2K, 3, S, S)
            restored = self.sd.vae.decode_latent(outcome.z0[2 * k_pairs :]).float()  # (K, 3, S, S)
            for x in (recon, restored):
                self._check_finite(x, "image", "decoding (the VAE decoder)")
            recon, restored = recon.clamp(-1, 1).cpu(), restored.clamp(-1, 1).cpu()

        latent_side = z0.shape[-1]
        blend = blend_mask(
            outcome.mask_o, outcome.mask_e, latent_side, cfg.method.blend_dilation, outcome.keep_e
        ).cpu()
        results = []
        for k, job in enumerate(jobs):
            row_o, row_e = k, k_pairs + k
            words = [(w, row_o, job.pair.prompt_original) for w in job.pair.id_words]
            words += [(w, row_e, job.pair.prompt_edited) for w in job.pair.element_words]
            maps = (
                {
                    w: word_map(
                        d.store,
                        row,
                        word_positions(self.sd.tokenizer, prompt, [w], "mask"),
                        (latent_side, latent_side),
                        cfg.method.attention_masks.map_factors,
                        pool=cfg.method.attention_masks.pool,
                    )[0, 0]
                    # none gathered: every mask was given
                    for w, row, prompt in words
                }
                if d.store.maps
                else {}
            )
            o_attn, e_attn = outcome.from_attention[k]
            if o_attn:
                job.notes.append(
                    "face mask taken from the cross-attention maps of "
                    + ", ".join(job.pair.id_words)
                )
                job.notes += _coverage_note(outcome.mask_o[k], "face", "--face-mask")
            if e_attn:
                job.notes.append(
                    "element mask taken from the cross-attention maps of "
                    + ", ".join(job.pair.element_words)
                )
                job.notes += _coverage_note(outcome.mask_e[k], "element", "--element-mask")
            r_o, r_e = recon[row_o : row_o + 1], recon[row_e : row_e + 1]
            results.append(
                RestoreResult(
                    image=restored[k : k + 1],
                    reconstructions={"original": r_o, "edited": r_e},
                    psnr={
                        "original": metrics.psnr(r_o, job.x_o, 2.0),
                        "edited": metrics.psnr(r_e, job.x_e, 2.0),
                    },
                    masks={
                        "face": outcome.mask_o[k : k + 1].cpu(),
                        "element": outcome.mask_e[k : k + 1].cpu(),
                        "blend": blend[k : k + 1],
                    },
                    w_schedule=outcome.alignment.w_schedules[k],
                    timings=dict(timings),
                    notes=job.notes,
                    inversion=cfg.method.inversion,
                    unet_calls={stage: dict(c) for stage, c in calls.items()},
                    latent=outcome.z0[2 * k_pairs + k : 2 * k_pairs + k + 1].cpu(),
                    null_text=[st.rows([row_o, row_e]) for st in d.steps],
                    attention_maps=maps,
                    regions=self._region_report(job, restored[k]),
                    identity_schedule=cfg.method.gating.identity.values(self.plan),
                    w_differences=outcome.alignment.differences[k],
                    plan=self.plan_record(),
                )
            )
        return results

    def _check_finite(self, x: torch.Tensor, what: str, stage: str) -> None:
        """Stop with one line when `x` holds NaN or infinite values (`guided.check_finite`: the
        stage and the likely cause, a damaged weight or the guidance), before anything is
        written."""
        models = {"unet": self.sd.unet, "vae": self.sd.vae, "text_encoder": self.sd.text_encoder}
        check_finite(x, what, stage, models, self.config.method.guidance)

    def plan_record(self) -> list[dict]:
        """The reconstruction's plan as plain data: per step its solver, order, t and σ from →
        to."""
        return [
            {
                "solver": s.solver,
                "order": s.order,
                "t": s.t,
                "sigma": self.schedule.sigma(s.t),
                "sigma_next": self.schedule.sigma(s.s),
            }
            for s in self.plan.steps
        ]

    @staticmethod
    def _region_report(job: CheckedPair, restored: torch.Tensor) -> dict[str, dict[str, float]]:
        """Per region PSNR and SSIM of the result against the region's own source
        (regions.region_scores): a region restored from the original against the original, one
        kept from the edit — or left to it, not chosen — against the edited image; when the pair's
        regions were chosen from its landmarks."""
        if not job.regions or job.face is None:
            return {}
        from minid.faces.regions import REGIONS, region_scores

        sources = {r: job.regions[r].source if r in job.regions else "edited" for r in REGIONS}
        return region_scores(
            job.x_o[0],
            restored,
            job.face.kps,
            job.face.landmarks_106,
            edited=job.x_e[0],
            sources=sources,
        )


def _check_folder(folder: str | Path, inputs, overwrite: bool) -> None:
    """`save_intermediates`' folder, before any work: the files `save_result` writes must not be
    inputs, nor exist already unless `overwrite` (`report.check_result_folder`)."""
    from minid.restore.report import check_result_folder

    check_result_folder(folder, inputs, overwrite=overwrite, what="save_intermediates")


# an attention mask covering more or less of the image than this says little about where the words
# are: the maps did not pick a region out
MASK_COVERAGE = (0.02, 0.95)


def _coverage_note(mask: torch.Tensor, what: str, flag: str) -> list[str]:
    """A note when a mask taken from the cross-attention maps covers (nearly) all or none of the
    image, else none."""
    share = float(mask.float().mean())
    low, high = MASK_COVERAGE
    if low <= share <= high:
        return []
    much = "nearly all" if share > high else "nearly none"
    return [
        f"the {what} mask from the cross-attention maps covers {much} of the image "
        f"({share:.0%}, expected {low:.0%}-{high:.0%}): the maps did not pick the words' region "
        f"out; give the mask ({flag} FILE) or other words"
    ]
