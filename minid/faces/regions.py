"""Fine-grained facial regions (ConsistentID's idea, seed 003, at inference): eyes, brows, nose,
mouth and skin, each from the face's 106 landmarks, each taken from the original or kept from the
edit, with words whose cross-attention acts only inside their region (docs/editedid.md, "IdGlow and
ConsistentID").

The index layout of insightface's 2d106det landmarks is documented only as a picture; the groups
below are how independent public code reads it. They are not trusted blindly: `landmark_groups`
checks each group against the five detected keypoints (in the face's own frame, eye distance = 1)
and, when a check fails, the regions come from the keypoints instead, with a note saying which group
failed.

Coordinates: (x, y) pixel indices, as in minid.imaging.crops. Masks: float (S, S) in [0, 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minid.imaging import masks

REGIONS = ("eyes", "brows", "nose", "mouth", "skin")
SOURCES = ("original", "edited")
# The 106-point groups as public code reads them (checked at run time: `landmark_groups`).
GROUPS_106 = {
    "jaw": range(0, 33),
    "eye_a": range(33, 43),
    "eye_b": range(87, 97),
    "brow_a": range(43, 52),
    "brow_b": range(97, 106),
    "mouth": range(52, 72),
    "nose": range(72, 87),
}
# Words of a prompt that name a region; their cross-attention columns are replaced inside the region
# only.
REGION_WORDS = {
    "eyes": ("eyes", "eye"),
    "brows": ("eyebrows", "eyebrow", "brows", "brow"),
    "nose": ("nose",),
    "mouth": ("mouth", "lips", "lip", "smile", "teeth"),
    "skin": ("skin",),
}


@dataclass(frozen=True)
class RegionChoice:
    source: str  # "original": the region is restored from O; "edited": kept from E exactly
    lambda_o: float | None = None  # λ_O where the region overlaps an element; None: the config's


def parse_regions(spec: str | dict | Path) -> dict[str, RegionChoice]:
    """`eyes=original,nose=original,mouth=edited:0.7`, a dict of the same, or a JSON file of it
    ({"eyes": "original", "mouth": "edited:0.7"} or {"mouth": {"source": "edited", "lambda":
    0.7}})."""
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".json")):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"regions file {path} not found; give a JSON file or eyes=original,…"
            )
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"regions file {path} is not valid JSON ({e})") from None
    if isinstance(spec, str):
        items = [item.split("=", 1) for item in spec.split(",") if item.strip()]
        if any(len(item) != 2 for item in items):
            raise ValueError(
                f"regions {spec!r}: write REGION=SOURCE[:λ] joined by commas, e.g. "
                "eyes=original,mouth=edited:0.7"
            )
        spec = {k.strip(): v.strip() for k, v in items}
    if not isinstance(spec, dict) or not spec:
        raise ValueError(
            f"regions must name at least one region of {', '.join(REGIONS)}; got {spec!r}"
        )
    out = {}
    for region, choice in spec.items():
        if region not in REGIONS:
            raise ValueError(
                f"regions: unknown region {region!r}; the regions are {', '.join(REGIONS)}"
            )
        if isinstance(choice, dict):
            source, lam = choice.get("source"), choice.get("lambda")
        else:
            source, _, lam_text = str(choice).partition(":")
            try:
                lam = float(lam_text) if lam_text else None
            except ValueError:
                raise ValueError(
                    f"regions: {region}={choice!r}: λ must be a number in [0, 1]"
                ) from None
        if source not in SOURCES:
            raise ValueError(
                f"regions: {region}={choice!r}: the source must be 'original' or 'edited'"
            )
        if lam is not None and not 0 <= float(lam) <= 1:
            raise ValueError(f"regions: {region}={choice!r}: λ must lie in [0, 1], got {lam}")
        out[region] = RegionChoice(source, None if lam is None else float(lam))
    return out


# --------------------------------------------------------------------------------------------------
# Region masks from landmarks


def face_frame(kps: np.ndarray) -> np.ndarray:
    """The 2×3 affine image → face frame: eye midpoint at the origin, x along the eye line, eye
    distance 1."""
    kps = np.asarray(kps, dtype=np.float64)
    left, right = kps[0], kps[1]
    d = right - left
    scale = float(np.hypot(*d))
    c, s = d / scale
    rot = np.array([[c, s], [-s, c]]) / scale
    return np.concatenate([rot, (-rot @ ((left + right) / 2))[:, None]], axis=1)


def landmark_groups(
    landmarks_106: np.ndarray, kps: np.ndarray
) -> tuple[dict[str, np.ndarray] | None, str]:
    """The 106 landmarks split into eyes, brows, nose and mouth, each checked against the keypoints
    in the face frame (eyes 1 apart on y = 0): an eye group's centre within 0.3 of its eye, the nose
    tip inside the nose group's box (grown by 0.15), the mouth group's centre within 0.3 of the
    mouth corners' midpoint and spanning half the distance between them, each brow group's centre
    above the eyes (−0.9 < y < −0.05). Returns (groups, "") or (None, the failed check)."""
    pts = np.asarray(landmarks_106, dtype=np.float64)
    if pts.shape != (106, 2):
        return None, f"expected (106, 2) landmarks, found {pts.shape}"
    frame = face_frame(kps)
    local = pts @ frame[:, :2].T + frame[:, 2]
    key = np.asarray(kps, dtype=np.float64) @ frame[:, :2].T + frame[:, 2]
    g = {name: local[list(idx)] for name, idx in GROUPS_106.items()}
    for name in ("eye_a", "eye_b"):
        centre = g[name].mean(0)
        if min(np.hypot(*(centre - key[0])), np.hypot(*(centre - key[1]))) > 0.3:
            return (
                None,
                f"landmarks {GROUPS_106[name].start}-{GROUPS_106[name].stop - 1} are not around an "
                f"eye",
            )
    eye_of = [
        int(np.hypot(*(g[n].mean(0) - key[1])) < np.hypot(*(g[n].mean(0) - key[0])))
        for n in ("eye_a", "eye_b")
    ]
    if eye_of[0] == eye_of[1]:
        return None, "both eye groups lie around the same eye"
    lo, hi = g["nose"].min(0) - 0.15, g["nose"].max(0) + 0.15
    if not (np.all(key[2] >= lo) and np.all(key[2] <= hi)):
        return None, "landmarks 72-86 are not around the nose tip"
    mouth_mid, corners = (key[3] + key[4]) / 2, abs(key[4][0] - key[3][0])
    if (
        np.hypot(*(g["mouth"].mean(0) - mouth_mid)) > 0.3
        or np.ptp(g["mouth"][:, 0]) < 0.5 * corners
    ):
        return None, "landmarks 52-71 are not between the mouth corners"
    for name in ("brow_a", "brow_b"):
        if not -0.9 < g[name].mean(0)[1] < -0.05:
            return (
                None,
                f"landmarks {GROUPS_106[name].start}-{GROUPS_106[name].stop - 1} are not above the "
                f"eyes",
            )
    return {
        "eyes": np.concatenate([pts[list(GROUPS_106["eye_a"])], pts[list(GROUPS_106["eye_b"])]]),
        "eye_a": pts[list(GROUPS_106["eye_a"])],
        "eye_b": pts[list(GROUPS_106["eye_b"])],
        "brow_a": pts[list(GROUPS_106["brow_a"])],
        "brow_b": pts[list(GROUPS_106["brow_b"])],
        "nose": pts[list(GROUPS_106["nose"])],
        "mouth": pts[list(GROUPS_106["mouth"])],
    }, ""


def region_masks(
    size: int, kps: np.ndarray, landmarks_106: np.ndarray | None, feather: float = 0.0
) -> tuple[dict[str, torch.Tensor], str]:
    """Masks (S, S) of eyes, brows, nose, mouth and skin (the face minus the others), disjoint
    before a feathering of σ = `feather` px. From the 106 landmarks when their groups pass
    `landmark_groups`, else from the five keypoints; the note says which."""
    kps = np.asarray(kps, dtype=np.float64)
    d_eye = float(np.hypot(*(kps[1] - kps[0])))
    # the eye and brow outlines hug the features: grow them a little
    grow = max(1, int(round(0.08 * d_eye)))
    groups, why = (
        (None, "no 106 landmarks") if landmarks_106 is None else landmark_groups(landmarks_106, kps)
    )
    if groups is not None:
        hull = lambda pts: _outline(pts, size, grow)  # noqa: E731
        parts = {
            "eyes": masks.dilate(masks.union(hull(groups["eye_a"]), hull(groups["eye_b"])), grow),
            "brows": masks.dilate(
                masks.union(hull(groups["brow_a"]), hull(groups["brow_b"])), grow
            ),
            "nose": hull(groups["nose"]),
            "mouth": hull(groups["mouth"]),
        }
        face = masks.face_mask(size, kps=kps, landmarks_106=landmarks_106)
        note = "regions from the 106 landmarks"
    else:
        parts = {
            part: masks.face_mask(size, kps=kps, part=part) for part in ("eyes", "nose", "mouth")
        }
        inverse = np.linalg.inv(np.vstack([face_frame(kps), [0, 0, 1]]))[:2]  # face frame → image
        brows = [inverse[:, :2] @ np.array([x, -0.35]) + inverse[:, 2] for x in (-0.5, 0.5)]
        angle = float(np.arctan2(kps[1, 1] - kps[0, 1], kps[1, 0] - kps[0, 0]))
        parts["brows"] = masks.union(
            *(masks.ellipse_mask(c, (0.35 * d_eye, 0.12 * d_eye), angle, size) for c in brows)
        )
        face = masks.face_mask(size, kps=kps)
        note = f"regions from the 5 keypoints ({why})"
    taken = torch.zeros_like(face)
    out = {}
    # disjoint, in this order of precedence, inside the face
    for name in ("eyes", "brows", "nose", "mouth"):
        out[name] = parts[name] * face * (1 - taken)
        taken = torch.maximum(taken, out[name])
    out["skin"] = face * (1 - taken)
    return {name: masks.feather(m, feather) for name, m in out.items()}, note


def _outline(points: np.ndarray, size: int, thickness: int) -> torch.Tensor:
    """The convex hull of a landmark group, or, for a group whose hull covers no pixel centre (a
    brow predicted as a line), the segment through it grown by `thickness` px."""
    try:
        hull = masks.polygon_mask(points, size)
    except ValueError:
        hull = None
    if hull is not None and float(hull.sum()) > 0:
        return hull
    centre = points.mean(0)
    direction = points[np.argmax(np.hypot(*(points - centre).T))] - centre
    angle = float(np.arctan2(direction[1], direction[0]))
    half = float(np.hypot(*direction))
    return masks.ellipse_mask(centre, (half + thickness, thickness), angle, size)


# --------------------------------------------------------------------------------------------------
# From choices to what Stage 3 uses


@dataclass
class RegionEdits:
    """One pair's regions as Stage 3 takes them (all (1, 1, S, S) in [0, 1])."""

    face: torch.Tensor  # M_O: the union of the regions restored from the original
    keep: torch.Tensor | None  # regions kept from the edit exactly: out of the blend
    lambda_o: torch.Tensor | None  # λ_O per pixel where a region sets its own
    # (word, source, region mask) of the region words found
    local: list[tuple[str, str, torch.Tensor]]


def region_edits(
    region_mask: dict[str, torch.Tensor],
    choices: dict[str, RegionChoice],
    default_lambda: float,
    prompts: tuple[str, str],
    tokenizer,
) -> RegionEdits:
    """M_O, the kept-from-E mask, the λ_O map and the region words of one pair from its region masks
    and the user's choices; `prompts` = (original's, edited's): a word of an original region must be
    in both."""
    original = [region_mask[r] for r, c in choices.items() if c.source == "original"]
    edited = [region_mask[r] for r, c in choices.items() if c.source == "edited"]
    face = (
        masks.union(*original) if original else torch.zeros_like(next(iter(region_mask.values())))
    )
    keep = masks.union(*edited) if edited else None
    lam = None
    if any(c.lambda_o is not None for c in choices.values()):
        lam = torch.full_like(face, default_lambda)
        for r, c in choices.items():
            if c.lambda_o is not None:
                lam = lam + region_mask[r] * (c.lambda_o - lam)
    local = []
    for r, c in choices.items():
        for word in REGION_WORDS[r]:
            in_prompts = [_has(tokenizer, p, word) for p in prompts]
            if in_prompts[1] and (c.source == "edited" or in_prompts[0]):
                local.append((word, c.source, region_mask[r]))
    as4d = lambda m: None if m is None else m[None, None]  # noqa: E731
    return RegionEdits(
        as4d(face), as4d(keep), as4d(lam), [(w, s, m[None, None]) for w, s, m in local]
    )


def _has(tokenizer, prompt: str, word: str) -> bool:
    try:
        return bool(tokenizer.token_positions(prompt, word))
    except ValueError:
        return False


def region_scores(
    original: torch.Tensor,
    result: torch.Tensor,
    kps: np.ndarray,
    landmarks_106: np.ndarray | None,
    size: int = 256,
    edited: torch.Tensor | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, dict[str, float | str]]:
    """Per region, PSNR (dB) and SSIM of the result against the region's own source in the aligned
    face frame (all images warped with the original face's ArcFace alignment to size², the regions
    drawn there): ConsistentID's fine-grained identity score, read as how much of each region the
    result keeps of what it should. `sources` (region -> "original" or "edited", with `edited`
    given): a region restored from the original is scored against the original, one kept from the
    edit against the edited image; without them every region is scored against the original.
    Each entry is {"psnr", "ssim", "against"}. Images (3, H, W) in [-1, 1] of one size; kps /
    landmarks_106 in their coordinates."""
    from minid.imaging import crops, metrics

    a, affine = crops.align_face(original.float(), kps, size)
    b = crops.warp(result.float(), affine, size)
    e = None if edited is None else crops.warp(edited.float(), affine, size)
    moved = None if landmarks_106 is None else crops.apply_affine(landmarks_106, affine)
    region_mask, _ = region_masks(size, crops.apply_affine(kps, affine), moved)
    out = {}
    for name, m in region_mask.items():
        against = (sources or {}).get(name, "original") if e is not None else "original"
        p, s = metrics.masked_scores(a if against == "original" else e, b, m, 2.0)
        out[name] = {"psnr": p, "ssim": s, "against": against}
    return out
