"""Image metrics: identity similarity (the paper's ID-Sim), PSNR, SSIM, and column statistics.

ID-Sim is the cosine similarity of ArcFace embeddings (insightface's w600k_r50 in the buffalo_l
pack), as in the EditedID paper, which counts ID-Sim ≥ 0.70 as the same person (Table 13) and
reports
0.73 on average for its results.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import numpy as np
import torch

# ID-Sim at or above which the paper counts two faces as one person: Table 13's "ID-Sim ≥ 0.70"
# (the number of its metric definition, Eq. 15, is lost in the text; docs/editedid.md)
SAME_PERSON_THRESHOLD = 0.70


def id_similarity(emb_a: Any, emb_b: Any) -> float | np.ndarray:
    """Cosine similarity of ArcFace embeddings: (512,) and (512,) → float; (N, 512) and (N, 512) →
    (N,).

    The embeddings need not be normalised; a zero vector raises (it carries no identity).
    """
    a = np.asarray(
        emb_a.detach().cpu() if isinstance(emb_a, torch.Tensor) else emb_a, dtype=np.float64
    )
    b = np.asarray(
        emb_b.detach().cpu() if isinstance(emb_b, torch.Tensor) else emb_b, dtype=np.float64
    )
    if a.shape != b.shape:
        raise ValueError(
            f"metrics.id_similarity: embeddings differ in shape, {a.shape} and {b.shape}"
        )
    norm_a, norm_b = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    if np.any(norm_a == 0) or np.any(norm_b == 0):
        raise ValueError("metrics.id_similarity: an embedding is all zeros; was the face found?")
    cos = (a * b).sum(-1) / (norm_a * norm_b)
    return float(cos) if cos.ndim == 0 else cos


def id_similarities(
    analyzer: Any, original: Any, others: dict[str, Any]
) -> tuple[dict[str, float | None], list[str]]:
    """ID-Sim of the original's largest face with the largest face of each image of `others` ({name:
    image}, anything `analyzer.analyze` takes: PIL images, uint8 arrays): {name: cosine, or None
    where either face or its embedding is missing}, and one note per image without a face or an
    embedding."""
    faces = {}
    for name, image in {"original": original, **others}.items():
        found = analyzer.analyze(image)
        faces[name] = max(found, key=lambda f: f.area) if found else None
    missing = [n for n, f in faces.items() if f is None or f.embedding is None]
    sims = {
        name: None
        if {"original", name} & set(missing)
        else float(id_similarity(faces["original"].embedding, faces[name].embedding))
        for name in others
    }
    return sims, [f"ID-Sim: no face or no embedding in the {n} image" for n in missing]


def psnr(a: Any, b: Any, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB over all elements: 10·log10(data_range² / MSE); inf when a
    == b.

    data_range is the span of the values: 255 for uint8 images, 1 for [0, 1], 2 for [−1, 1].
    """
    ta = (
        a.detach().double().cpu()
        if isinstance(a, torch.Tensor)
        else torch.from_numpy(np.array(a, dtype=np.float64))
    )
    tb = (
        b.detach().double().cpu()
        if isinstance(b, torch.Tensor)
        else torch.from_numpy(np.array(b, dtype=np.float64))
    )
    if ta.shape != tb.shape:
        raise ValueError(
            f"metrics.psnr: images differ in shape, {tuple(ta.shape)} and {tuple(tb.shape)}"
        )
    mse = float(((ta - tb) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Structural similarity per pixel (Wang et al. 2004): Gaussian window σ = 1.5 (11 px), C1 =
    (0.01·L)², C2 = (0.03·L)², L = data_range; a, b (C, H, W), averaged over channels → (H, W). The
    border repeats."""
    import torch.nn.functional as F

    x, y = a.double()[None], b.double()[None]  # (1, C, H, W)
    g = torch.exp(-0.5 * (torch.arange(11, dtype=torch.float64) - 5) ** 2 / 1.5**2)
    g = g / g.sum()
    channels = x.shape[1]

    def blur(t):
        t = F.pad(t, (5, 5, 5, 5), mode="replicate")
        t = F.conv2d(t, g.view(1, 1, 1, 11).expand(channels, 1, 1, 11), groups=channels)
        return F.conv2d(t, g.view(1, 1, 11, 1).expand(channels, 1, 11, 1), groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s[0].mean(0)  # (H, W)


def masked_scores(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, data_range: float
) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of two images (C, H, W) inside a mask (H, W) in [0, 1], weighted by the
    mask."""
    w = mask.double()
    total = float(w.sum())
    if total <= 0:
        return math.nan, math.nan
    mse = float((((a.double() - b.double()) ** 2).mean(0) * w).sum() / total)
    value = math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
    return value, float((ssim_map(a, b, data_range) * w).sum() / total)


def column_stats(values: Sequence) -> dict:
    """n, mean and median of the finite values of a table's column (None and NaN/inf left out; None
    when empty)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {
        "n": len(finite),
        "mean": statistics.fmean(finite) if finite else None,
        "median": statistics.median(finite) if finite else None,
    }
