"""EditedID, the method: restore the original's face identity in an edited image, keeping the edit.

Paper: "Optimizing ID Consistency in Multimodal Large Models: Facial Restoration via Alignment,
Entanglement, and Disentanglement" (ICLR 2026). Every formula, default and reading:
docs/editedid.md.

Everything here works on latents and text embeddings (files, checks, batches of pairs and report
pictures live in restore.py; several faces in one photo in multiface.py):

    z_0^O, z_0^E (VAE latents of the original I_O and the edited I_E)
      Stage 1, alignment      `align`: adaptive-mixing inversion of both (guidance 1)
                              ─▶ pivots^O, pivots^E and one shared z_T                       (Eq.
                              1-3)
      Stage 2, disentangling  `disentangle`: dual null-text optimisation along the pivots with the
                              hybrid solver ─▶ ∅_O,i, ∅_E,i, and the cross-attention maps of the
                              words  (Eq. 4-6)
      masks                   M_O, M_E given, or from those maps (`attention_mask`, P2P's local
                              blend)
      Stage 3, entangling     `entangle`: three branches (O, E, T) from z_T with attentional gating,
                              and blending outside the dilated mask union ─▶ z_0^T
                              (Eq. 7-9)

`run` chains the stages for K pairs in one batch (2K latents in Stages 1-2, 3K branches in Stage 3).
The ablations of the paper's Table 7 are one switch, `EditedIDConfig.ablation`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Literal, get_args

import torch

from minid.imaging import masks
from minid.method.control import AttentionStore, BatchLayout, word_mask
from minid.method.gating import EditedIDGating, GatingConfig, GatingGroup, LocalTokens
from minid.method.mixing import AlignmentResult, MixingConfig, adaptive_mixing_inversion
from minid.method.null_text import NullTextConfig, NullTextStep, null_text_optimization
from minid.models.attention import at_step
from minid.models.config import number_problem
from minid.sampling.guided import MAX_GUIDANCE, reconstruct
from minid.sampling.hybrid import HybridSchedule, hybrid_plan
from minid.sampling.plans import Plan, ddim_plan
from minid.sampling.schedule import NoiseSchedule, max_num_steps

Ablation = Literal["none", "baseline", "no_alignment", "no_disentanglement", "no_entanglement"]
ABLATIONS = get_args(Ablation)
Inversion = Literal["null-text", "direct", "negative-prompt"]

# The numbers of EditedIDConfig a user may set: field path -> (kind, low, high, low excluded), None
# = no bound. EditedIDConfig checks them; the command line checks its flags against the same limits,
# in the flags' words.
# The most steps SD1.4's schedule has timesteps for: 998, where the hybrid's DPM-Solver++ "leading"
# times with steps_offset 1 reach timestep 999 (schedule.max_num_steps; no spacing allows fewer)
MAX_STEPS = max_num_steps(NoiseSchedule.scaled_linear(), "leading", "leading")
NUMBER_LIMITS = {
    # one model call per step, on the schedule's timesteps
    "solver.num_steps": (int, 1, MAX_STEPS, False),
    # 1-based from noise, or negative from the end (−1: step N)
    "solver.dpm_start": (int, -1000, 1000, False),
    "solver.dpm_end": (int, -1000, 1000, False),
    "solver.clip_sample_range": (float, 0.0, None, True),
    # s > 0; 1 is the conditional prediction alone; far past SD's 1-20 ε̃ overflows
    "guidance": (float, 0.0, MAX_GUIDANCE, True),
    "mixing.w0": (float, 0.0, 0.5, False),  # Eq. 2 mixes w·O + (1 − w)·E; past 0.5 the roles swap
    "mixing.lr": (float, 0.0, None, False),
    "mixing.iterations": (int, 0, None, False),
    "mixing.forced_steps": (int, 1, None, False),
    "mixing.w_max": (float, 0.0, 0.5, False),
    "null_text.inner_steps": (int, 0, None, False),
    "null_text.lr": (float, 0.0, None, True),
    "null_text.loss_scale": (float, 0.0, None, True),
    "gating.lambda_o": (float, 0.0, 1.0, False),
}


INVERSIONS = get_args(Inversion)


@dataclass(frozen=True)
class AttentionMaskConfig:
    """A region from the cross-attention maps of some words, as prompt-to-prompt's local blend makes
    it."""

    map_factors: tuple[int, ...] = (2, 4)  # latent side / map side: the 32² and 16² layers at 512²
    pool: int = 3  # max-pool window
    threshold: float = 0.3  # of the normalised map


@dataclass(frozen=True)
class EditedIDConfig:
    """The method's settings, one concept per nested config (docs/editedid.md, "Defaults and
    readings")."""

    # The ablations of Table 7: "baseline" = independent null-text inversions (DDIM) +
    # prompt-to-prompt cross-attention fusion starting from z_T^O; "no_alignment" = no mixing, two
    # separate inversions (T starts from z_T^E); "no_disentanglement" = DDIM only, no hybrid solver;
    # "no_entanglement" = no self-attention gating, cross-attention tokens only.
    ablation: Ablation = "none"
    # Hybrid solver (Eq. 5-6): N steps, DPM-Solver++ on reconstruction steps τ_s..τ_e (1-based from
    # noise, negative from the end: the last third by default), DDIM on the others, global timestep
    # pre-setting; inversion mirrors it.
    solver: HybridSchedule = HybridSchedule()
    guidance: float = 7.5  # classifier-free guidance s of reconstruction (Stages 2 and 3)
    mixing: MixingConfig = MixingConfig()  # Stage 1 (Eq. 1-3)
    # Stage 2's way of making guided reconstruction follow the pivots (docs/editedid.md, "Stage 2"):
    # "null-text": the paper's dual null-text optimisation (Eq. 4); "direct": no optimisation, each
    # source branch is put back on its pivot after every step and T gets E's correction (Ju et al.
    # 2024, "PnP Inversion"); "negative-prompt": no optimisation, ∅ = the prompt's own embedding
    # (Miyake et al. 2023).
    inversion: Inversion = "null-text"
    null_text: NullTextConfig = NullTextConfig()  # Stage 2 (Eq. 4, Mokady et al. 2023)
    gating: GatingConfig = GatingConfig()  # Stage 3 (Eq. 7-9)
    # T's prompt and null-text: E's (default) or O's
    target: Literal["edited", "original"] = "edited"
    # IdGlow's mask-free mode (seed 002): no spatial mask at all — no mask-selective gating and no
    # latent blending; at the gated self-attention sites T's queries attend over T's and O's keys
    # and values together (mutual self-attention), O's share gating.identity's s_i, and the
    # identity tokens' columns follow the same schedule
    mask_free: bool = False
    blend: bool = True  # Blended-Diffusion step: keep E's latent outside the dilated mask union
    blend_dilation: int = 1  # latent pixels the mask union grows by before blending
    # masks from cross-attention, when not given
    attention_masks: AttentionMaskConfig = AttentionMaskConfig()

    def __post_init__(self):
        if self.ablation not in ABLATIONS:
            raise ValueError(
                f"EditedIDConfig.ablation={self.ablation!r}; expected one of {', '.join(ABLATIONS)}"
            )
        if self.inversion not in INVERSIONS:
            raise ValueError(
                f"EditedIDConfig.inversion={self.inversion!r}; expected one of "
                f"{', '.join(INVERSIONS)}"
            )
        if self.target not in ("edited", "original"):
            raise ValueError(
                f"EditedIDConfig.target={self.target!r}; expected 'edited' or 'original'"
            )
        for path, limits in NUMBER_LIMITS.items():
            value = self
            for name in path.split("."):
                value = getattr(value, name)
            # η from N (MixingConfig.step_size); the DPM-Solver++ window's start from N
            if value is None and path in ("mixing.lr", "solver.dpm_start"):
                continue
            problem = number_problem(value, *limits)
            if problem:
                raise ValueError(f"EditedIDConfig.{path} {problem}, got {value!r}")
        s = self.solver
        start, end = s.window()
        if not 1 <= start <= end <= s.num_steps:
            raise ValueError(
                f"EditedIDConfig.solver: the DPM-Solver++ steps must satisfy 1 ≤ dpm_start ≤ "
                f"dpm_end ≤ "
                f"num_steps, counting a negative value from the end (−1 = num_steps); got "
                f"dpm_start "
                f"{s.dpm_start}, dpm_end {s.dpm_end}, num_steps {s.num_steps}"
            )

    @property
    def num_steps(self) -> int:
        return self.solver.num_steps

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

    def plan(self, schedule: NoiseSchedule) -> Plan:
        """The solver and times of every reconstruction step (the inversion walks them
        backwards)."""
        if self.uses_hybrid:
            return hybrid_plan(schedule, self.solver)
        return ddim_plan(
            schedule,
            self.solver.num_steps,
            self.solver.ddim_spacing,
            clip_sample=self.solver.clip_sample,
            clip_sample_range=self.solver.clip_sample_range,
        )


# --------------------------------------------------------------------------------------------------
# The stages


def align(
    unet,
    plan: Plan,
    config: EditedIDConfig,
    z0_o,
    z0_e,
    cond_o,
    cond_e,
    progress: Callable | None = None,
) -> AlignmentResult:
    """Stage 1: adaptive-mixing inversion of K pairs (K, 4, h, w) in one batch (Eq. 1-3); separate
    inversions when alignment is ablated."""
    mixing = config.mixing if config.uses_alignment else None
    return adaptive_mixing_inversion(
        unet, plan, z0_o, z0_e, cond_o, cond_e, mixing, progress=progress
    )


@dataclass
class Disentanglement:
    """Stage 2's result for K pairs."""

    null_o: list[torch.Tensor]  # per step (K, 77, D)
    null_e: list[torch.Tensor]
    z_T_o: torch.Tensor  # (K, 4, h, w)
    z_T_e: torch.Tensor
    z0: torch.Tensor  # (2K, 4, h, w): the reconstructions of O_1 … O_K, then E_1 … E_K
    store: AttentionStore  # cross-attention maps of the conditional calls, rows as z0
    # per step, the null-text statistics of the 2K images (null-text only)
    steps: list[NullTextStep]
    # direct inversion: Stage 1's pivots z_0 … z_N, (2K, 4, h, w) each
    pivots: list[torch.Tensor] | None = None


def disentangle(
    unet,
    plan: Plan,
    config: EditedIDConfig,
    alignment: AlignmentResult,
    cond_o,
    cond_e,
    uncond,
    progress: Callable | None = None,
    maps: bool = True,
) -> Disentanglement:
    """Stage 2 for K pairs in one batch, by `config.inversion`:

    - "null-text": dual null-text optimisation of every O and E (Eq. 4) with the hybrid solver;
    - "direct": no optimisation (∅ = the embedding of ""); Stage 3 puts O and E back on their pivots
      after every step and gives T the correction of E (`entangle`), so here only the conditional
      maps are gathered, one UNet call per step at the pivots (none when `maps` is False: every mask
      is given), and the reconstructions are the pivots themselves;
    - "negative-prompt": no optimisation, ∅_i = the prompt's own embedding, which makes ε̃ = ε(c)
      for any guidance; the reconstruction from z_T is run with the conditional prediction alone.
    """
    k_pairs = alignment.pivots_o[0].shape[0]
    # (2K, 4, h, w)
    pivots = [torch.cat([a, b]) for a, b in zip(alignment.pivots_o, alignment.pivots_e)]
    cond = torch.cat([cond_o, cond_e])
    store = AttentionStore()
    common = dict(z_T_o=alignment.pivots_o[-1], z_T_e=alignment.pivots_e[-1], store=store)
    if config.inversion == "null-text":
        res = null_text_optimization(
            unet,
            plan,
            pivots,
            cond,
            uncond,
            config.guidance,
            config.null_text,
            observer=store,
            progress=progress,
        )
        return Disentanglement(
            null_o=[n[:k_pairs] for n in res.null_embeddings],
            null_e=[n[k_pairs:] for n in res.null_embeddings],
            z0=res.z0,
            steps=res.steps,
            **common,
        )
    n = len(plan.steps)
    if config.inversion == "direct":
        with torch.no_grad():
            # the conditional maps along Stage 3's path
            for i, step in enumerate(plan.steps if maps else ()):
                unet(pivots[n - i], step.timestep, cond, controller=at_step(store, i))
                if progress:
                    progress()
        null = uncond.expand(k_pairs, -1, -1)
        return Disentanglement(
            null_o=[null] * n, null_e=[null] * n, z0=pivots[0], steps=[], pivots=pivots, **common
        )

    def tick(i, z):
        if progress:
            progress()
        return z

    # ε̃ = ε(c)
    z0 = reconstruct(unet, plan, pivots[-1], cond, None, 1.0, controller=store, on_step=tick)[-1]
    return Disentanglement(null_o=[cond_o] * n, null_e=[cond_e] * n, z0=z0, steps=[], **common)


def attention_mask(
    store: AttentionStore,
    row: int,
    positions: list[int],
    size: int,
    latent_side: int,
    config: AttentionMaskConfig = AttentionMaskConfig(),
) -> torch.Tensor:
    """M_O or M_E from the cross-attention maps of some token positions in batch row `row` of the
    store (P2P's local blend, `control.word_mask`), at latent resolution, brought to image size (1,
    1, S, S)."""
    m = word_mask(
        store,
        row,
        positions,
        (latent_side, latent_side),
        config.map_factors,
        config.pool,
        config.threshold,
    )
    return masks.to_resolution(m, size, how="nearest")


def blend_mask(
    mask_o: torch.Tensor,
    mask_e: torch.Tensor,
    latent_side: int,
    dilation: int,
    keep_e: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dilated union of M_O and M_E at latent resolution, (K, 1, h, w), 1 inside: a latent cell
    that the region touches counts as inside (max), then the union grows by `dilation` cells. Cells
    that `keep_e` touches (regions kept from the edit) are left out, so there T's latent is E's
    exactly."""
    side = (latent_side, latent_side)
    union = masks.union(
        masks.to_resolution(mask_o, side, how="max"), masks.to_resolution(mask_e, side, how="max")
    )
    union = masks.dilate(union, dilation)
    return union if keep_e is None else union * (1 - masks.to_resolution(keep_e, side, how="max"))


@dataclass
class Tokens:
    """A pair's token pairs for the token-selective cross-attention replacement (Eq. 9): (T
    position, source position), the source being O for identity words and E for element words."""

    identity: list[tuple[int, int]] = field(default_factory=list)
    element: list[tuple[int, int]] = field(default_factory=list)
    # region words, replaced inside their region only
    local: list[LocalTokens] = field(default_factory=list)


@torch.no_grad()
def entangle(
    unet,
    plan: Plan,
    config: EditedIDConfig,
    d: Disentanglement,
    cond_o,
    cond_e,
    mask_o,
    mask_e,
    tokens: list[Tokens],
    gatings: list[GatingConfig] | None = None,
    backend: str = "auto",
    progress: Callable | None = None,
    keep_e: torch.Tensor | None = None,
    lambda_maps: list | None = None,
) -> torch.Tensor:
    """Stage 3: K triples (O, E, T) from the start latents with attentional gating (Eq. 7-9) and
    blending; returns z_0 (3K, 4, h, w), rows O_1 … O_K, E_1 … E_K, T_1 … T_K.

    mask_o, mask_e: (K, 1, H, W) in [0, 1] at image or latent resolution; tokens: one `Tokens` per
    triple; gatings: one `GatingConfig` per triple (default `config.gating` for all; a pair may have
    its own λ). T's start: the shared z_T (aligned), z_T^O (baseline, or T = O's prompt) or z_T^E
    (no alignment). backend: the fused attention edits' implementation ("auto", "triton", "torch").
    keep_e: (K, 1, H, W) regions kept from E exactly (left out of the blend); lambda_maps: per
    triple a (1, 1, H, W) λ_O map or None. Mask-free (`config.mask_free`): no masks and no blending;
    T's self-attention at the gated sites runs over [K_T; K_O], [V_T; V_O] with O's share s_i.
    """
    k_pairs = d.z_T_o.shape[0]
    if len(tokens) != k_pairs:
        raise ValueError(
            f"editedid.entangle: {len(tokens)} token sets for {k_pairs} pairs; give one per pair"
        )
    gatings = gatings or [config.gating] * k_pairs
    side = d.z_T_o.shape[-1]
    m_o, m_e = masks.to_resolution(mask_o, side), masks.to_resolution(mask_e, side)  # (K, 1, h, w)
    use_o = config.target == "original"
    z_t_start = d.z_T_o if (config.ablation == "baseline" or use_o) else d.z_T_e
    z = torch.cat([d.z_T_o, d.z_T_e, z_t_start])  # (3K, 4, h, w): rows O_1..O_K, E_1..E_K, T_1..T_K
    cond = torch.cat([cond_o, cond_e, cond_o if use_o else cond_e])
    # T's null-texts are its prompt's; the baseline (Table 7) runs P2P's fusion from z_T^O with O's
    # null-texts
    t_null_o = use_o or config.ablation == "baseline"
    nulls = [torch.cat([no, ne, no if t_null_o else ne]) for no, ne in zip(d.null_o, d.null_e)]
    # guidance 1 is ε(c) alone: one UNet row per branch, no unconditional half (`guided_eps`)
    layout = BatchLayout(3 * k_pairs, cfg=config.guidance != 1.0)
    lambda_maps = lambda_maps or [None] * k_pairs
    controller = GatingGroup(
        [
            EditedIDGating(
                layout,
                m_o[k : k + 1].to(z.device),
                m_e[k : k + 1].to(z.device),
                id_tokens=tokens[k].identity,
                element_tokens=tokens[k].element,
                config=gatings[k],
                self_gating=config.uses_self_gating,
                mutual=config.mask_free,
                backend=backend,
                branch_o=k,
                branch_e=k_pairs + k,
                branch_t=2 * k_pairs + k,
                identity_values=gatings[k].identity.values(plan),
                lambda_map=lambda_maps[k],
                local_tokens=tokens[k].local,
            )
            for k in range(k_pairs)
        ]
    )
    m = None
    # the baseline has no blending
    if config.blend and not config.mask_free and config.ablation != "baseline":
        m = blend_mask(mask_o, mask_e, side, config.blend_dilation, keep_e).to(z.device, z.dtype)

    n, k = len(plan.steps), k_pairs

    def on_step(i, z):
        if progress:
            progress()
        # direct inversion: O and E back on their pivots, T corrected as its prompt's
        if d.pivots is not None:
            pivot = d.pivots[n - i - 1]  # (2K, 4, h, w): O_1 … O_K, E_1 … E_K
            rows = slice(0, k) if use_o else slice(k, 2 * k)
            # T + (pivot − source) written as pivot + (T − source): exactly the pivot where T equals
            # its source
            z = torch.cat([pivot, pivot[rows] + (z[2 * k :] - z[rows])])
        if m is None:
            return z
        # Blended Diffusion: E's latent outside the region
        zt = m * z[2 * k :] + (1 - m) * z[k : 2 * k]
        return torch.cat([z[: 2 * k], zt])

    return reconstruct(
        unet, plan, z, cond, nulls, config.guidance, controller=controller, on_step=on_step
    )[-1]


# --------------------------------------------------------------------------------------------------
# The chain


@dataclass
class PairText:
    """What the method needs of one pair's prompts: the token positions whose cross-attention maps
    give a missing mask, and the token pairs of Stage 3."""

    id_positions: list[int]  # identity words in the original's prompt (M_O from attention)
    element_positions: list[int]  # element words in the edited prompt (M_E from attention)
    tokens: Tokens


@dataclass
class Outcome:
    """Everything `run` computed for K pairs."""

    alignment: AlignmentResult
    disentanglement: Disentanglement
    mask_o: torch.Tensor  # (K, 1, S, S) M_O at image size, given or from attention
    mask_e: torch.Tensor  # (K, 1, S, S) M_E
    # per pair: (M_O, M_E) came from the cross-attention maps
    from_attention: list[tuple[bool, bool]]
    keep_e: torch.Tensor | None  # (K, 1, S, S) regions kept from E exactly, or None
    z0: torch.Tensor  # (3K, 4, h, w): Stage 3's rows O_1 … O_K, E_1 … E_K, T_1 … T_K


def run(
    unet,
    plan: Plan,
    config: EditedIDConfig,
    z0_o,
    z0_e,
    cond_o,
    cond_e,
    uncond,
    texts: list[PairText],
    masks_o: list,
    masks_e: list,
    size: int,
    gatings: list[GatingConfig] | None = None,
    backend: str = "auto",
    stage: Callable = lambda name: contextlib.nullcontext(),
    progress: bool = False,
    keeps_e: list | None = None,
    lambda_maps: list | None = None,
) -> Outcome:
    """The three stages for K pairs in one batch, from two latents and the prompts' embeddings to
    z_0.

    z0_o, z0_e: (K, 4, h, w); cond_o, cond_e: (K, 77, D); uncond: (1, 77, D), the embedding of "".
    masks_o / masks_e: per pair a (1, 1, S, S) mask at image size `size`, or None to take it from
    the cross-attention maps of Stage 2 (zeros in the mask-free mode). keeps_e / lambda_maps: per
    pair a (1, 1, S, S) mask of regions kept from E, a λ_O map, or None. `stage(name)` is entered
    around each stage (timing, memory); `progress` shows a bar per stage.
    """
    k_pairs = z0_o.shape[0]
    n = config.num_steps
    with stage("align"), progress_bar(progress, n, "EditedID 1/3 align") as bar:
        alignment = align(unet, plan, config, z0_o, z0_e, cond_o, cond_e, progress=bar)
    with stage("disentangle"), progress_bar(progress, n, "EditedID 2/3 disentangle") as bar:
        maps = not config.mask_free and any(m is None for m in (*masks_o, *masks_e))
        d = disentangle(
            unet, plan, config, alignment, cond_o, cond_e, uncond, progress=bar, maps=maps
        )
    latent_side = z0_o.shape[-1]
    from_attention, all_o, all_e = [], [], []
    for k, text in enumerate(texts):
        m_o, m_e = masks_o[k], masks_e[k]
        if config.mask_free:  # no spatial mask at all: identity through the tokens only
            m_o = m_e = torch.zeros(1, 1, size, size)
        from_attention.append((m_o is None, m_e is None))
        if m_o is None:
            m_o = attention_mask(
                d.store, k, text.id_positions, size, latent_side, config.attention_masks
            )
        if m_e is None:
            m_e = attention_mask(
                d.store,
                k_pairs + k,
                text.element_positions,
                size,
                latent_side,
                config.attention_masks,
            )
        all_o.append(m_o.float())
        all_e.append(m_e.float())
    mask_o, mask_e = torch.cat(all_o), torch.cat(all_e)  # (K, 1, S, S)
    with stage("entangle"), progress_bar(progress, n, "EditedID 3/3 entangle") as bar:
        device = z0_o.device
        keep_e = None
        if keeps_e is not None and any(m is not None for m in keeps_e):
            keep_e = torch.cat(
                [torch.zeros(1, 1, size, size) if m is None else m.float() for m in keeps_e]
            )
        z0 = entangle(
            unet,
            plan,
            config,
            d,
            cond_o,
            cond_e,
            mask_o.to(device),
            mask_e.to(device),
            [t.tokens for t in texts],
            gatings,
            backend,
            progress=bar,
            keep_e=None if keep_e is None else keep_e.to(device),
            lambda_maps=lambda_maps,
        )
    return Outcome(alignment, d, mask_o, mask_e, from_attention, keep_e, z0)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar's update function when enabled (tqdm is imported only then), else None."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
