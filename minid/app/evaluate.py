"""`minid eval`: ID similarity (the paper's ID-Sim), PSNR and per-region scores over a folder of
(original, edited, result) triples.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from minid.faces.regions import REGIONS
from minid.imaging.images import IMAGE_SUFFIXES
from minid.imaging.metrics import SAME_PERSON_THRESHOLD, column_stats, id_similarity, psnr
from minid.loading.files import json_safe

ROLES = ("original", "edited", "result")


def _region_columns(images: dict[str, np.ndarray], faces_original: list) -> dict[str, float | None]:
    """Per region (eyes, brows, nose, mouth, skin) PSNR and SSIM of the result against the original
    in the aligned frame of the original's largest face (`regions.region_scores`; ConsistentID's
    fine-grained score); None where there is no face or the two images differ in size."""
    empty = {f"{r}_{s}": None for r in REGIONS for s in ("psnr", "ssim")}
    if not faces_original or images["original"].shape != images["result"].shape:
        return empty
    from minid.faces.regions import region_scores

    face = max(faces_original, key=lambda f: f.area)

    def as_tensor(a):
        return torch.from_numpy(a.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)

    try:
        scores = region_scores(
            as_tensor(images["original"]), as_tensor(images["result"]), face.kps, face.landmarks_106
        )
    # keypoints that define no face frame (coinciding points): nothing to measure
    except ValueError:
        return empty
    return {f"{r}_{s}": scores[r][s] for r in REGIONS for s in ("psnr", "ssim")}


def find_triples(
    folder: str | Path, roles: tuple[str, ...] = ROLES
) -> tuple[list[tuple[str, dict[str, Path]]], list[str]]:
    """The (original, edited, result) image triples of an evaluation folder, and what is missing.

    Layout: three sub-folders `original/`, `edited/` and `result/` holding images with the same stem
    (`original/0001.png`, `edited/0001.jpg`, `result/0001.png` form the triple "0001"); the stems of
    the first role's folder drive the evaluation. `roles` names other sub-folders: ("original",
    "edited") gives the pairs `minid validate` reads. Returns [(stem, {role: path})] sorted by stem,
    and one message per stem that lacks an image of another role.
    """
    folder = Path(folder)
    found: dict[str, dict[str, Path]] = {role: {} for role in roles}
    for role in roles:
        sub = folder / role
        if not sub.is_dir():
            raise FileNotFoundError(
                f"{sub} does not exist; the folder {folder} must hold "
                f"{', '.join(r + '/' for r in roles)} with "
                "images of the same name in each"
            )
        for path in sorted(sub.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found[role][path.stem] = path
    triples, missing = [], []
    for stem in sorted(found[roles[0]]):
        lacking = [role for role in roles[1:] if stem not in found[role]]
        if lacking:
            missing.append(f"{stem}: no {' or '.join(lacking)} image")
        else:
            triples.append((stem, {role: found[role][stem] for role in roles}))
    return triples, missing


def _mean(values: Sequence[float]) -> float | None:
    return column_stats(values)["mean"]


def evaluate_folder(
    folder: str | Path,
    analyzer: Any,
    out_dir: str | Path | None = None,
    min_iou: float = 0.3,
    progress: bool = True,
) -> dict[str, Any]:
    """ID-Sim and PSNR over the (original, edited, result) triples of `folder` (layout: see
    `find_triples`).

    For each triple the faces of the three images are found with `analyzer` (a
    `minid.faces.analyzer.FaceAnalyzer`, or anything with `analyze(image) -> list[Face]` whose faces
    carry embeddings) and paired with the original's faces by position. Per image:
      id_sim_edited   mean ArcFace cosine, edited vs original, over the paired faces (how far the
                      edit drifted)
      id_sim_result   the same for result vs original (how much identity the restoration brought
                      back)
      psnr_result_edited  PSNR in dB of result vs edited on 0-255 pixels (how much of the edited
                          image is kept)
    Writes metrics.csv (one row per image) and metrics.json (summary and rows) to `out_dir` (default
    `folder`) and returns the summary.
    """
    from tqdm.auto import tqdm

    from minid.imaging.crops import pair_faces
    from minid.imaging.images import open_image, to_rgb

    folder = Path(folder)
    out_dir = Path(out_dir) if out_dir is not None else folder
    triples, missing = find_triples(folder)
    rows = []
    for stem, paths in tqdm(triples, desc="minid eval", unit="image", disable=not progress):
        # clear errors
        images = {role: np.asarray(to_rgb(open_image(paths[role])[0])) for role in ROLES}
        faces = {role: analyzer.analyze(images[role]) for role in ROLES}
        row: dict[str, Any] = {"name": stem, "faces_original": len(faces["original"]), "note": ""}
        notes = [] if faces["original"] else ["no face in original"]
        for role in ROLES:
            dropped = getattr(faces[role], "dropped", 0)
            if dropped:
                notes.append(
                    f"{faces[role].detected} faces detected in {role}, the "
                    f"{len(faces[role])} best-scored measured (--max-faces)"
                )
        for role in ("edited", "result"):
            sims = []
            if faces["original"] and not faces[role]:
                notes.append(f"no face in {role}")
            elif faces["original"]:
                pairing = pair_faces(
                    np.array([f.box for f in faces["original"]]),
                    np.array([f.box for f in faces[role]]),
                    min_iou=min_iou,
                    size_a=images["original"].shape[1::-1],  # (width, height)
                    size_b=images[role].shape[1::-1],
                )
                sims = [
                    id_similarity(faces["original"][i].embedding, faces[role][j].embedding)
                    for i, j in pairing.pairs
                ]
                if pairing.unpaired_a:
                    notes.append(
                        f"{len(pairing.unpaired_a)} original face(s) without a matching {role} face"
                    )
            row[f"id_sim_{role}"] = _mean(sims)
        if images["result"].shape == images["edited"].shape:
            row["psnr_result_edited"] = psnr(images["result"], images["edited"], 255.0)
        else:
            row["psnr_result_edited"] = None
            notes.append(
                f"result is {images['result'].shape[1::-1]}, edited "
                f"{images['edited'].shape[1::-1]}: no PSNR"
            )
        row.update(_region_columns(images, faces["original"]))
        row["note"] = "; ".join(notes)
        rows.append(row)

    result_sims = [r["id_sim_result"] for r in rows if r["id_sim_result"] is not None]
    summary = {
        "folder": str(folder),
        "images": len(rows),
        "images_with_faces": sum(
            1 for r in rows if r["id_sim_edited"] is not None or r["id_sim_result"] is not None
        ),
        "mean_id_sim_edited": _mean([r["id_sim_edited"] for r in rows]),
        "mean_id_sim_result": _mean(result_sims),
        "same_person_rate_result": (
            float(np.mean([s >= SAME_PERSON_THRESHOLD for s in result_sims]))
            if result_sims
            else None
        ),
        # inf (identical images) is left out of the mean, which would otherwise be inf.
        "mean_psnr_result_edited": _mean([r["psnr_result_edited"] for r in rows]),
        "missing": missing,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["name", "faces_original", "id_sim_edited", "id_sim_result", "psnr_result_edited"]
    columns += [f"{region}_{score}" for region in REGIONS for score in ("psnr", "ssim")] + ["note"]
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})

    payload = {"summary": summary, "rows": [json_safe(r) for r in rows]}
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    return summary


# the summary's numbers as `minid eval` prints them: key -> label
SUMMARY_LABELS = {
    "images": "images",
    "images_with_faces": "images with faces",
    "mean_id_sim_edited": "mean ID-Sim, edited vs original",
    "mean_id_sim_result": "mean ID-Sim, result vs original",
    "same_person_rate_result": f"same person (ID-Sim ≥ {SAME_PERSON_THRESHOLD:g}), result",
    "mean_psnr_result_edited": "mean PSNR, result vs edited (dB)",
}


def format_summary(summary: dict[str, Any]) -> str:
    """`evaluate_folder`'s summary as a Markdown table of two columns (empty where not measured)."""
    lines = [f"| {summary.get('folder', 'folder')} | |", "|---|---|"]
    for key, label in SUMMARY_LABELS.items():
        value = summary.get(key)
        cell = "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {label} | {cell} |")
    return "\n".join(lines)
