"""Evaluation: identity similarity (the paper's ID-Sim), PSNR, and a folder evaluation for `minid eval`.

ID-Sim is the cosine similarity of ArcFace embeddings (insightface's w600k_r50 in the buffalo_l pack), as in
the EditedID paper, which counts ID-Sim ≥ 0.5 as the same person and reports 0.73 on average for its results.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

SAME_PERSON_THRESHOLD = 0.5  # ID-Sim at or above which the paper counts two faces as one person
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ROLES = ("original", "edited", "result")


def id_similarity(emb_a: Any, emb_b: Any) -> float | np.ndarray:
    """Cosine similarity of ArcFace embeddings: (512,) and (512,) → float; (N, 512) and (N, 512) → (N,).

    The embeddings need not be normalised; a zero vector raises (it carries no identity).
    """
    a = np.asarray(emb_a.detach().cpu() if isinstance(emb_a, torch.Tensor) else emb_a, dtype=np.float64)
    b = np.asarray(emb_b.detach().cpu() if isinstance(emb_b, torch.Tensor) else emb_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"metrics.id_similarity: embeddings differ in shape, {a.shape} and {b.shape}")
    norm_a, norm_b = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    if np.any(norm_a == 0) or np.any(norm_b == 0):
        raise ValueError("metrics.id_similarity: an embedding is all zeros; was the face found?")
    cos = (a * b).sum(-1) / (norm_a * norm_b)
    return float(cos) if cos.ndim == 0 else cos


def id_similarities(analyzer: Any, original: Any, others: dict[str, Any]) -> tuple[dict[str, float | None], list[str]]:
    """ID-Sim of the original's largest face with the largest face of each image of `others` ({name: image},
    anything `analyzer.analyze` takes: PIL images, uint8 arrays): {name: cosine, or None where either face
    or its embedding is missing}, and one note per image without a face or an embedding."""
    faces = {}
    for name, image in {"original": original, **others}.items():
        found = analyzer.analyze(image)
        faces[name] = max(found, key=lambda f: f.area) if found else None
    missing = [n for n, f in faces.items() if f is None or f.embedding is None]
    sims = {name: None if {"original", name} & set(missing) else
            float(id_similarity(faces["original"].embedding, faces[name].embedding)) for name in others}
    return sims, [f"ID-Sim: no face or no embedding in the {n} image" for n in missing]


def psnr(a: Any, b: Any, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB over all elements: 10·log10(data_range² / MSE); inf when a == b.

    data_range is the span of the values: 255 for uint8 images, 1 for [0, 1], 2 for [−1, 1].
    """
    ta = a.detach().double().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a, dtype=np.float64))
    tb = b.detach().double().cpu() if isinstance(b, torch.Tensor) else torch.from_numpy(np.array(b, dtype=np.float64))
    if ta.shape != tb.shape:
        raise ValueError(f"metrics.psnr: images differ in shape, {tuple(ta.shape)} and {tuple(tb.shape)}")
    mse = float(((ta - tb) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Structural similarity per pixel (Wang et al. 2004): Gaussian window σ = 1.5 (11 px), C1 = (0.01·L)²,
    C2 = (0.03·L)², L = data_range; a, b (C, H, W), averaged over channels → (H, W). The border repeats."""
    import torch.nn.functional as F

    x, y = a.double()[None], b.double()[None]  # (1, C, H, W)
    g = torch.exp(-0.5 * (torch.arange(11, dtype=torch.float64) - 5) ** 2 / 1.5 ** 2)
    g = (g / g.sum())
    channels = x.shape[1]

    def blur(t):
        t = F.pad(t, (5, 5, 5, 5), mode="replicate")
        t = F.conv2d(t, g.view(1, 1, 1, 11).expand(channels, 1, 1, 11), groups=channels)
        return F.conv2d(t, g.view(1, 1, 11, 1).expand(channels, 1, 11, 1), groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s[0].mean(0)  # (H, W)


def masked_scores(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, data_range: float) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of two images (C, H, W) inside a mask (H, W) in [0, 1], weighted by the mask."""
    w = mask.double()
    total = float(w.sum())
    if total <= 0:
        return math.nan, math.nan
    mse = float((((a.double() - b.double()) ** 2).mean(0) * w).sum() / total)
    value = math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)
    return value, float((ssim_map(a, b, data_range) * w).sum() / total)


REGION_NAMES = ("eyes", "brows", "nose", "mouth", "skin")


def _region_columns(images: dict[str, np.ndarray], faces_original: list) -> dict[str, float | None]:
    """Per region (eyes, brows, nose, mouth, skin) PSNR and SSIM of the result against the original in the
    aligned frame of the original's largest face (`regions.region_scores`; ConsistentID's fine-grained
    score); None where there is no face or the two images differ in size."""
    empty = {f"{r}_{s}": None for r in REGION_NAMES for s in ("psnr", "ssim")}
    if not faces_original or images["original"].shape != images["result"].shape:
        return empty
    from minid.regions import region_scores

    face = max(faces_original, key=lambda f: f.area)
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)  # noqa: E731
    try:
        scores = region_scores(as_tensor(images["original"]), as_tensor(images["result"]), face.kps,
                               face.landmarks_106)
    except ValueError:  # keypoints that define no face frame (coinciding points): nothing to measure
        return empty
    return {f"{r}_{s}": scores[r][s] for r in REGION_NAMES for s in ("psnr", "ssim")}


def find_triples(folder: str | Path,
                 roles: tuple[str, ...] = ROLES) -> tuple[list[tuple[str, dict[str, Path]]], list[str]]:
    """The (original, edited, result) image triples of an evaluation folder, and what is missing.

    Layout: three sub-folders `original/`, `edited/` and `result/` holding images with the same stem
    (`original/0001.png`, `edited/0001.jpg`, `result/0001.png` form the triple "0001"); the stems of the
    first role's folder drive the evaluation. `roles` names other sub-folders: ("original", "edited") gives
    the pairs `minid validate` reads. Returns [(stem, {role: path})] sorted by stem, and one message per
    stem that lacks an image of another role.
    """
    folder = Path(folder)
    found: dict[str, dict[str, Path]] = {role: {} for role in roles}
    for role in roles:
        sub = folder / role
        if not sub.is_dir():
            raise FileNotFoundError(
                f"{sub} does not exist; the folder {folder} must hold {', '.join(r + '/' for r in roles)} with "
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


def column_stats(values: Sequence) -> dict:
    """n, mean and median of the finite values of a table's column (None and NaN/inf left out; None when empty)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {"n": len(finite), "mean": statistics.fmean(finite) if finite else None,
            "median": statistics.median(finite) if finite else None}


def _mean(values: Sequence[float]) -> float | None:
    return column_stats(values)["mean"]


def evaluate_folder(
    folder: str | Path,
    analyzer: Any,
    out_dir: str | Path | None = None,
    min_iou: float = 0.3,
    progress: bool = True,
) -> dict[str, Any]:
    """ID-Sim and PSNR over the (original, edited, result) triples of `folder` (layout: see `find_triples`).

    For each triple the faces of the three images are found with `analyzer` (a `minid.faces.FaceAnalyzer`,
    or anything with `analyze(image) -> list[Face]` whose faces carry embeddings) and paired with the
    original's faces by position. Per image:
      id_sim_edited   mean ArcFace cosine, edited vs original, over the paired faces (how far the edit drifted)
      id_sim_result   the same for result vs original (how much identity the restoration brought back)
      psnr_result_edited  PSNR in dB of result vs edited on 0-255 pixels (how much of the edited image is kept)
    Writes metrics.csv (one row per image) and metrics.json (summary and rows) to `out_dir` (default
    `folder`) and returns the summary.
    """
    from tqdm.auto import tqdm

    from minid.crops import pair_faces
    from minid.images import open_image, to_rgb

    folder = Path(folder)
    out_dir = Path(out_dir) if out_dir is not None else folder
    triples, missing = find_triples(folder)
    rows = []
    for stem, paths in tqdm(triples, desc="minid eval", unit="image", disable=not progress):
        images = {role: np.asarray(to_rgb(open_image(paths[role])[0])) for role in ROLES}  # clear errors
        faces = {role: analyzer.analyze(images[role]) for role in ROLES}
        row: dict[str, Any] = {"name": stem, "faces_original": len(faces["original"]), "note": ""}
        notes = [] if faces["original"] else ["no face in original"]
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
                sims = [id_similarity(faces["original"][i].embedding, faces[role][j].embedding) for i, j in pairing.pairs]
                if pairing.unpaired_a:
                    notes.append(f"{len(pairing.unpaired_a)} original face(s) without a matching {role} face")
            row[f"id_sim_{role}"] = _mean(sims)
        if images["result"].shape == images["edited"].shape:
            row["psnr_result_edited"] = psnr(images["result"], images["edited"], 255.0)
        else:
            row["psnr_result_edited"] = None
            notes.append(f"result is {images['result'].shape[1::-1]}, edited {images['edited'].shape[1::-1]}: no PSNR")
        row.update(_region_columns(images, faces["original"]))
        row["note"] = "; ".join(notes)
        rows.append(row)

    result_sims = [r["id_sim_result"] for r in rows if r["id_sim_result"] is not None]
    summary = {
        "folder": str(folder),
        "images": len(rows),
        "images_with_faces": sum(1 for r in rows if r["id_sim_edited"] is not None or r["id_sim_result"] is not None),
        "mean_id_sim_edited": _mean([r["id_sim_edited"] for r in rows]),
        "mean_id_sim_result": _mean(result_sims),
        "same_person_rate_result": (
            float(np.mean([s >= SAME_PERSON_THRESHOLD for s in result_sims])) if result_sims else None
        ),
        # inf (identical images) is left out of the mean, which would otherwise be inf.
        "mean_psnr_result_edited": _mean([r["psnr_result_edited"] for r in rows]),
        "missing": missing,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["name", "faces_original", "id_sim_edited", "id_sim_result", "psnr_result_edited"]
    columns += [f"{region}_{score}" for region in REGION_NAMES for score in ("psnr", "ssim")] + ["note"]
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})

    def _json_safe(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    payload = {"summary": summary, "rows": [{k: _json_safe(v) for k, v in r.items()} for r in rows]}
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    return summary
