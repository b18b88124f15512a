"""Checking a set of weights on real pairs (`minid validate`): Stage 2's reconstruction against the
paper's bar, Stage 1's w schedule, the solver's round trip (Table 11's metrics), and ID-Sim, per
(original, edited) pair.

EditedID (Dong, Dai and Ye, ICLR 2026, arXiv 2602.18752) counts a reconstruction consistent at ≥ 25
dB PSNR (Fig. 4(2), A.8; docs/editedid.md, Stage 2 "Check"), and measures its hybrid solver's
stability in A.13, Table 11, by inverting clean latents and reconstructing them with the same plan.
Every pair goes through `EditedID.restore_batch` (Stages 1-3, not re-implemented here); per pair the
table holds:

- the reconstruction PSNR of both images after Stage 2 (`RestoreResult.psnr`), pass or fail against
  the bar;
- Stage 1's mixing weights w and D = mean((ẑ^O − ẑ^E)²) per inversion step
  (`RestoreResult.w_schedule`, `.w_differences`);
- Table 11's metrics on each image's latent (the VAE posterior mean): inversion, then reconstruction
  with the method's plan, guidance 1 with the image's prompt, no null-text (`round_trip`,
  `trajectory_metrics`), so what is measured is what Stage 2 has to absorb;
- ID-Sim (ArcFace cosine, `metrics.id_similarities`) of edited vs original (before) and restored vs
  original (after; the restored square at the working size), with a face analyzer.

`trajectory_metrics` is also what bench/solver_stability.py measures on the exact-score toy
(minid/sampling/toy.py). Layout of the pairs folder: `original/` and `edited/` with images of the
same stem (`evaluate.find_triples`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch

from minid.app.evaluate import find_triples
from minid.imaging import images, metrics
from minid.loading.files import write_text_atomic
from minid.restore.inputs import CheckedPair, RestorePair, analyze, check_pair
from minid.sampling.guided import guided_eps
from minid.sampling.plans import Plan
from minid.sampling.samplers import ModelFn, invert_loop, sample_loop

MIN_PSNR = 25.0  # dB: the paper's bar for a consistent reconstruction (Fig. 4(2), A.8)
DEFAULT_PROMPT = "a photo of a person"
ROLES = ("original", "edited")
# what `write_report` writes
VALIDATE_FILES = ("validate.csv", "validate.json", "validate.md", "validate.png")
METRICS = ("cum_mse", "max_jump", "final_l2", "latent_psnr")  # Table 11's columns, per image


# --------------------------------------------------------------------------------------------------
# Table 11: the round trip of a latent


def round_trip(
    model_fn: ModelFn, plan: Plan, z0: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inversion z_0 → z_N of the clean latents z0, then reconstruction ẑ_N → ẑ_0 from z_N with the
    same plan; both lists indexed by level j = 0 … N (j = N the plan's first time, where ẑ_N =
    z_N)."""
    inverted = [z0]
    z_T = invert_loop(model_fn, z0, plan, callback=lambda i, t, z, x0: inverted.append(z))
    reconstructed = [z_T]
    sample_loop(model_fn, z_T, plan, callback=lambda i, t, z, x0: reconstructed.append(z))
    return inverted, reconstructed[::-1]


def trajectory_metrics(
    inverted: list[torch.Tensor], reconstructed: list[torch.Tensor], data_range: float | None = None
) -> dict[str, list[float]]:
    """Table 11's metrics (paper A.13) of a round trip (`round_trip`'s lists of (B, …) latents), per
    latent:

    - cum_mse: Σ_j mean((ẑ_j − z_j)²) over the levels j = 0 … N−1, in units of 1e-3 (the shared
      start j = N adds 0);
    - max_jump: the largest per-step change RMS(ẑ_j − ẑ_{j+1}) along the reconstruction;
    - final_l2: ‖ẑ_0 − z_0‖₂ over the latent's values;
    - latent_psnr: of ẑ_0 against z_0 (`metrics.psnr`) over `data_range`; None: 6 sd of each latent
      z_0 (±3 sd, the span minid.sampling.toy gives its data).
    """
    x0 = inverted[0]
    n, b = len(inverted) - 1, x0.shape[0]
    flat = lambda z: z.reshape(b, -1).double()  # noqa: E731  (B, values)
    cum = sum(((flat(reconstructed[j]) - flat(inverted[j])) ** 2).mean(1) for j in range(n))  # (B,)
    jumps = torch.stack(
        [
            ((flat(reconstructed[j]) - flat(reconstructed[j + 1])) ** 2).mean(1).sqrt()
            for j in range(n)
        ]
    )  # (N, B)
    spans = [
        data_range if data_range is not None else 6.0 * float(flat(x0)[k].std()) for k in range(b)
    ]
    return {
        "cum_mse": (1e3 * cum).tolist(),
        "max_jump": jumps.max(0).values.tolist(),
        "final_l2": (flat(reconstructed[0]) - flat(x0)).norm(dim=1).tolist(),
        "latent_psnr": [metrics.psnr(reconstructed[0][k], x0[k], spans[k]) for k in range(b)],
    }


@torch.no_grad()
def latent_round_trip(method, x: torch.Tensor, prompt: str) -> dict[str, float]:
    """Table 11's metrics of one image (1, 3, S, S) in [-1, 1] through `method` (an `EditedID`): its
    latent inverted and reconstructed with `method.plan`, guidance 1 with `prompt`'s embedding, no
    null-text."""
    z0 = method.sd.vae.encode_latent(x.to(method.device, method.dtype))  # (1, 4, S/8, S/8)
    cond = method.encode_text([prompt])

    def model(z, t, i, land):
        return guided_eps(method.sd.unet, z, t, cond, None, 1.0)

    inverted, reconstructed = round_trip(model, method.plan, z0)
    return {name: values[0] for name, values in trajectory_metrics(inverted, reconstructed).items()}


# --------------------------------------------------------------------------------------------------
# The pairs


def find_pairs(folder: str | Path) -> tuple[list[tuple[str, dict[str, Path]]], list[str]]:
    """[(stem, {"original": path, "edited": path})] of `folder` (`evaluate.find_triples` with two
    roles) and one message per original without an edited image; a ValueError when there is no
    pair."""
    found, missing = find_triples(folder, ROLES)
    if not found:
        raise ValueError(
            f"no pairs in {folder}: original/ and edited/ hold no images of the same name "
            f"(e.g. original/0001.png and edited/0001.png)"
        )
    return found, missing


def read_pairs(
    folder: str | Path,
    tokenizer,
    config,
    prompt_original: str = DEFAULT_PROMPT,
    prompt_edited: str = DEFAULT_PROMPT,
    id_words=("person",),
    element_words=(),
    seed: int = 0,
) -> tuple[list[tuple[str, CheckedPair]], list[str]]:
    """The (original, edited) pairs of `folder`, each checked once (`check_pair`: images, prompts,
    words) into the `CheckedPair` the restore takes, and one message per original without an edited
    image. No element words: the element region is the whole image (M_E = 1) and λ_O = 1, so the
    gating (Eq. 7-8) takes the face from the original and everything else from the edit."""
    found, missing = find_pairs(folder)
    for _, paths in found:
        for path in paths.values():
            images.check_image_file(path)
    s = config.image_size
    element_mask, lambda_o = (None, None) if element_words else (torch.ones(s, s), 1.0)
    pairs = []
    for stem, paths in found:
        pair = RestorePair(
            paths["original"],
            paths["edited"],
            prompt_original,
            prompt_edited,
            list(id_words),
            list(element_words),
            element_mask=element_mask,
            lambda_o=lambda_o,
            seed=seed,
        )
        pairs.append((stem, check_pair(pair, tokenizer, config, f"pair {stem}: ")))
    return pairs, missing


def validate_pairs(
    method,
    folder: str | Path,
    prompt_original: str = DEFAULT_PROMPT,
    prompt_edited: str = DEFAULT_PROMPT,
    id_words=("person",),
    element_words=(),
    analyzer=None,
    mask_source: str = "landmarks",
    min_psnr: float = MIN_PSNR,
    seed: int = 0,
    notes=(),
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Every pair of `folder` (`read_pairs`) through `method` (an `EditedID`): one row per pair (the
    module docstring's columns) and a summary. The face mask comes from the original's landmarks
    when `analyzer` is given and `mask_source` is "landmarks" (from the cross-attention maps of
    `id_words` otherwise, and where the analyzer finds no face); ID-Sim needs `analyzer`. `notes` go
    into the summary."""
    from tqdm.auto import tqdm

    pairs, missing = read_pairs(
        folder,
        method.sd.tokenizer,
        method.config,
        prompt_original,
        prompt_edited,
        id_words,
        element_words,
        seed,
    )
    rows = [
        _validate_pair(method, stem, pair, analyzer, mask_source, min_psnr)
        for stem, pair in tqdm(pairs, desc="minid validate", unit="pair", disable=not progress)
    ]
    return rows, summarize(
        rows, min_psnr, method, list(notes) + folder_notes(missing, element_words)
    )


def folder_notes(missing: list[str], element_words) -> list[str]:
    """What a run says of its pairs as a whole: the originals skipped, and the element region
    without words."""
    notes = [f"skipped {m}" for m in missing]
    if not element_words:
        notes.append(
            "no element words: the element region is the whole image and λ_O = 1 (the face from "
            "the "
            "original, the rest from the edit)"
        )
    return notes


def _validate_pair(
    method, stem: str, job: CheckedPair, analyzer, mask_source: str, min_psnr: float
) -> dict:
    pair, x_o, x_e = job.pair, job.x_o, job.x_e
    notes, landmarks = [], analyzer is not None and mask_source == "landmarks"
    if landmarks:
        try:
            analyze(analyzer, x_o, "the original")  # as restore will look for it
        except ValueError:
            landmarks = False
            notes.append("no face found in the original: face mask from the cross-attention maps")
    result = method.restore_batch([job], progress=False, analyzer=analyzer if landmarks else None)[
        0
    ]
    row = {
        "pair": stem,
        "original": str(pair.original),
        "edited": str(pair.edited),
        "psnr_original": result.psnr["original"],
        "psnr_edited": result.psnr["edited"],
        "passes": min(result.psnr.values()) >= min_psnr,
    }
    for name, x, prompt in (
        ("original", x_o, pair.prompt_original),
        ("edited", x_e, pair.prompt_edited),
    ):
        row.update({f"{k}_{name}": v for k, v in latent_round_trip(method, x, prompt).items()})
    row["id_sim_before"] = row["id_sim_after"] = None
    if analyzer is not None:
        frame_o, frame_e = job.frames
        sims, sim_notes = metrics.id_similarities(
            analyzer, frame_o.picture, {"edited": frame_e.picture, "restored": result.pil}
        )
        row["id_sim_before"], row["id_sim_after"] = sims["edited"], sims["restored"]
        notes += sim_notes
    row["w_schedule"] = [float(w) for w in result.w_schedule]
    row["w_differences"] = [float(d) for d in result.w_differences]
    row["notes"] = "; ".join(result.notes + notes)
    return row


def summarize(rows: list[dict], min_psnr: float, method, notes: list[str]) -> dict:
    """Counts against the bar; n, mean and median of each column over the pairs (finite values)."""
    columns = ["psnr_original", "psnr_edited", "id_sim_before", "id_sim_after"]
    columns += [f"{m}_{r}" for m in METRICS for r in ROLES]
    return {
        "pairs": len(rows),
        "passing": sum(r["passes"] for r in rows),
        "min_psnr": min_psnr,
        "steps": method.config.method.num_steps,
        "inversion": method.config.method.inversion,
        "plan": [s.timestep for s in method.plan.steps],
        **{c: metrics.column_stats([r[c] for r in rows]) for c in columns},
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------------
# The report


CSV_COLUMNS = (
    "pair",
    "psnr_original",
    "psnr_edited",
    "passes",
    *[f"{m}_{r}" for r in ROLES for m in METRICS],
    "id_sim_before",
    "id_sim_after",
    "w_schedule",
    "w_differences",
    "notes",
    "original",
    "edited",
)


def _cell(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return " ".join(f"{x:.{digits}g}" for x in v)
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict], min_psnr: float = MIN_PSNR) -> str:
    """The rows as a Markdown table (what `minid validate` prints and writes to validate.md); "O /
    E" cells hold the original's and the edited image's values."""

    def both(r, k, d=2):
        return f"{_cell(r[f'{k}_original'], d)} / {_cell(r[f'{k}_edited'], d)}"

    lines = [
        f"| pair | reconstruction PSNR O / E (dB) | ≥ {min_psnr:g} dB | cum. MSE (1e-3) O / E | "
        "max jump O / E | final latent L2 O / E | latent PSNR O / E (dB) | ID-Sim before → after | "
        "w per step | D per step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sims = (
            ""
            if r["id_sim_before"] is None and r["id_sim_after"] is None
            else f"{_cell(r['id_sim_before'])} → {_cell(r['id_sim_after'])}"
        )
        lines.append(
            f"| {r['pair']} | {both(r, 'psnr')} | {'pass' if r['passes'] else 'FAIL'} | "
            f"{both(r, 'cum_mse')} | {both(r, 'max_jump', 3)} | {both(r, 'final_l2')} | "
            f"{both(r, 'latent_psnr')} | {sims} | {_cell(r['w_schedule'])} | "
            f"{_cell(r['w_differences'])} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], min_psnr: float = MIN_PSNR):
    """Two plots side by side: each pair's lower reconstruction PSNR against the bar, and the mean w
    schedule."""
    from minid.restore.report import plot_series

    lows = [min(r["psnr_original"], r["psnr_edited"]) for r in rows]
    # 50 dB, 10 a tick
    top = 50 * math.ceil(max([min_psnr] + [v for v in lows if math.isfinite(v)]) * 1.1 / 50)
    psnr_plot = plot_series(
        lows,
        f"Stage 2: lower reconstruction PSNR per pair (bar {min_psnr:g} dB)",
        "dB",
        top,
        "pair (in the table's order)",
        bar=min_psnr,
    )
    n = len(rows[0]["w_schedule"])
    mean_w = [sum(r["w_schedule"][i] for r in rows) / len(rows) for i in range(n)]
    w_plot = plot_series(
        mean_w,
        f"Stage 1: w per inversion step, mean of {len(rows)} pair(s)",
        "w",
        0.5,
        "inversion step (1 = from the image, N = towards noise)",
    )
    return images.side_by_side([psnr_plot, w_plot])


def write_report(rows: list[dict], summary: dict, out: str | Path, inputs=()) -> dict[str, Path]:
    """validate.csv, validate.json (summary and rows; an infinite PSNR as "inf"), validate.md and
    validate.png into `out`, never over a file of `inputs`."""
    from minid.loading.files import json_safe
    from minid.restore.report import check_result_folder

    out = Path(out)
    check_result_folder(out, inputs, overwrite=True, what="the report folder", names=VALIDATE_FILES)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                k: _cell(r[k], 6) if isinstance(r[k], list) else ("" if r[k] is None else r[k])
                for k in CSV_COLUMNS
            }
        )
    payload = {"summary": summary, "rows": [json_safe(r) for r in rows]}
    return {
        "csv": write_text_atomic(out / "validate.csv", buffer.getvalue()),
        "json": write_text_atomic(out / "validate.json", json.dumps(payload, indent=1)),
        "md": write_text_atomic(
            out / "validate.md", format_table(rows, summary["min_psnr"]) + "\n"
        ),
        "plot": images.save_image(plot(rows, summary["min_psnr"]), out / "validate.png", inputs),
    }
