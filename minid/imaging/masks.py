"""Masks: where an edit may act. Float tensors in [0, 1], 1 = inside.

EditedID restores the face of the original inside a face mask M_O and keeps the edited elements
inside M_E (docs/editedid.md, "Masks"). The masks come from a PNG the user gives, from face
landmarks, or from attention maps; they are then softened (feathering), grown (dilation), combined
(union) and resized to the resolution of each latent or attention layer (64, 32, 16, 8 for a 512²
image).

Shapes: a mask is (H, W); the functions that filter or resize also take (..., H, W) and keep the
leading axes. Points are (x, y) in pixel-index coordinates (pixel (i, j) is the point x = j, y = i),
the convention of `minid.imaging.crops`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (
        (int(size), int(size))
        if isinstance(size, (int, np.integer))
        else (int(size[0]), int(size[1]))
    )


def _as_4d(mask: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(..., H, W) → (N, 1, H, W) and the leading shape to restore."""
    if mask.dim() < 2:
        raise ValueError(f"masks: expected a mask (..., H, W), found shape {tuple(mask.shape)}")
    lead = tuple(mask.shape[:-2])
    return mask.reshape(-1, 1, *mask.shape[-2:]).float(), lead


def require_nonempty(mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
    """Raise when a mask that must select something is empty (all zero)."""
    if not bool((mask > 0).any()):
        raise ValueError(
            f"masks: the {what} is empty (all {mask.numel()} values are 0); give a mask that "
            f"covers the region "
            "to edit (check the PNG, or that the face was found)"
        )
    return mask


# --------------------------------------------------------------------------------------------------
# From a file


def load_mask(
    source: str | Path | torch.Tensor,
    size: int | Sequence[int] | None = None,
    frame=None,
    required: bool = True,
) -> torch.Tensor:
    """A mask from an image file or a tensor → float (H, W) in [0, 1].

    File: any mode. The alpha channel is the mask when the image has a non-trivial one (a cut-out);
    otherwise the grey level is (white = 1); 16-bit and float masks by their bit depth.
    With `frame` (the `images.CropFrame` of the image the mask belongs to) the mask goes through
    that image's crop: a mask of another size than its image is stretched onto it first (with a
    warning naming both sizes), the frame's square is cut out and resized to the frame's working
    size. Without a frame, a mask of another size than `size` (h, w) is resized bilinearly, with a
    warning naming both sizes. Tensor: (H, W), (1, H, W) or (1, 1, H, W) with values in [0, 1],
    resized like a file. `required`: raise when the mask is empty.
    """
    name = "mask tensor" if isinstance(source, torch.Tensor) else str(source)
    mask = _tensor_mask(source) if isinstance(source, torch.Tensor) else _file_mask(Path(source))
    if frame is not None:
        width, height = frame.original_size
        mask = _resized(mask, (height, width), name, "its image")
        left, top, right, bottom = frame.box
        mask = _resized(mask[top:bottom, left:right], (frame.size, frame.size), name, None)
    elif size is not None:
        mask = _resized(mask, _hw(size), name, "the working size")
    if required:
        require_nonempty(mask, f"mask {name}")
    return mask


def _file_mask(path: Path) -> torch.Tensor:
    from PIL import ImageOps

    from minid.imaging.images import WIDE_GREY_MODES, open_image, wide_grey_levels

    image, _ = open_image(path)
    image = ImageOps.exif_transpose(image)  # the pixels a viewer shows, as for the image itself
    alpha = None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
        if alpha.min() == 255:
            alpha = None
    if alpha is not None:
        values = alpha.astype(np.float32) / 255.0
    elif image.mode in WIDE_GREY_MODES:  # 16-bit or float masks: by the bit depth
        values = wide_grey_levels(image)
    else:
        values = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(values)).clamp(0, 1)


def _tensor_mask(mask: torch.Tensor) -> torch.Tensor:
    m = mask.detach().float().cpu()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise ValueError(
            f"a mask tensor must be (H, W), (1, H, W) or (1, 1, H, W), found {tuple(mask.shape)}"
        )
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError(
            f"a mask tensor must have finite values in [0, 1]; found "
            f"[{float(m.min()):.3g}, {float(m.max()):.3g}]"
        )
    return m


def _resized(
    mask: torch.Tensor, target: tuple[int, int], name: str, what: str | None
) -> torch.Tensor:
    """Bilinear resize of an (H, W) mask; a warning names both sizes unless `what` is None."""
    if tuple(mask.shape) == target:
        return mask
    if what is not None:
        warnings.warn(
            f"mask {name} is {mask.shape[1]}×{mask.shape[0]} (w×h); resized to "
            f"{target[1]}×{target[0]}, "
            f"the size of {what}",
            stacklevel=3,
        )
    return F.interpolate(mask[None, None], size=target, mode="bilinear", align_corners=False)[
        0, 0
    ].clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# From face landmarks


@dataclass(frozen=True)
class FaceMaskConfig:
    """Proportions of the masks drawn from the 5 keypoints, in units of the eye distance d_eye
    (between the eye centres) and of the eye-mouth distance d_em (between the eyes' and the mouth
    corners' midpoints). The defaults cover the face from the eyebrows to the chin on the ArcFace
    template."""

    # face-ellipse centre: this fraction of the way from the eyes to the mouth
    ellipse_center: float = 0.4
    ellipse_half_width: float = 1.05  # half of the ellipse's width, in d_eye
    ellipse_half_height: float = 1.15  # half of the ellipse's height, in d_em
    eye_radius: float = 0.3  # radius of each eye disc, in d_eye
    nose_radius: float = 0.3  # radius of the nose disc, in d_eye
    # half-width of the mouth ellipse, in the distance between the mouth corners
    mouth_half_width: float = 0.75
    mouth_half_height: float = 0.3  # half-height of the mouth ellipse, in d_em


def _pixel_grid(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(size[0], dtype=torch.float64),
        torch.arange(size[1], dtype=torch.float64),
        indexing="ij",
    )
    return xs, ys


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Vertices of the convex hull of (N, 2) points, counter-clockwise in a y-up frame (monotone
    chain)."""
    pts = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).tolist())))
    if len(pts) < 3:
        return np.asarray(pts, dtype=np.float64).reshape(-1, 2)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)


def polygon_mask(points: np.ndarray, size: int | Sequence[int]) -> torch.Tensor:
    """Binary (H, W) mask of the convex hull of `points`: pixels whose centre is inside or on an
    edge."""
    size = _hw(size)
    hull = convex_hull(points)
    if len(hull) < 3:
        raise ValueError(
            f"masks.polygon_mask: the {len(np.asarray(points))} points span no area (all on one "
            f"line)"
        )
    xs, ys = _pixel_grid(size)
    inside = torch.ones(size, dtype=torch.bool)
    # Counter-clockwise hull: a point is inside when it is left of (or on) every edge.
    for (x0, y0), (x1, y1) in zip(hull, np.roll(hull, -1, axis=0)):
        inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= -1e-9
    return inside.float()


def ellipse_mask(
    center: Sequence[float], half_axes: Sequence[float], angle: float, size: int | Sequence[int]
) -> torch.Tensor:
    """Binary (H, W) mask of an ellipse; `angle` (radians) turns its first axis from the x axis
    towards y."""
    xs, ys = _pixel_grid(_hw(size))
    dx, dy = xs - center[0], ys - center[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # coordinates along the ellipse's own axes
    a, b = max(half_axes[0], 1e-9), max(half_axes[1], 1e-9)
    return ((u / a) ** 2 + (v / b) ** 2 <= 1.0).float()


def face_mask(
    size: int | Sequence[int],
    kps: np.ndarray | None = None,
    landmarks_106: np.ndarray | None = None,
    part: Literal["face", "eyes", "nose", "mouth"] = "face",
    config: FaceMaskConfig = FaceMaskConfig(),
) -> torch.Tensor:
    """A binary (H, W) mask of a face or a part of it, from insightface's landmarks.

    part "face": the convex hull of the 106 landmarks when given (jaw line to eyebrows), else an
    ellipse fitted to the 5 keypoints (tilted with the eye line, see FaceMaskConfig). "eyes",
    "nose", "mouth": discs and an ellipse around the 5 keypoints (eyes, nose tip, mouth corners).
    Raises when the mask comes out empty (the face lies outside the image).
    """
    size = _hw(size)
    if part == "face" and landmarks_106 is not None:
        mask = polygon_mask(np.asarray(landmarks_106, dtype=np.float64), size)
        return require_nonempty(mask, "face mask from 106 landmarks")
    if kps is None:
        raise ValueError(
            f"masks.face_mask: part {part!r} needs the 5 keypoints (kps); none were given"
        )
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(
            f"masks.face_mask: expected 5 keypoints of shape (5, 2), found {kps.shape}"
        )
    eyes = (kps[0] + kps[1]) / 2
    mouth = (kps[3] + kps[4]) / 2
    d_eye = float(np.linalg.norm(kps[1] - kps[0]))
    d_em = float(np.linalg.norm(mouth - eyes))
    angle = math.atan2(kps[1, 1] - kps[0, 1], kps[1, 0] - kps[0, 0])  # tilt of the eye line
    c = config
    if part == "face":
        center = eyes + c.ellipse_center * (mouth - eyes)
        mask = ellipse_mask(
            center, (c.ellipse_half_width * d_eye, c.ellipse_half_height * d_em), angle, size
        )
    elif part == "eyes":
        r = c.eye_radius * d_eye
        mask = union(
            ellipse_mask(kps[0], (r, r), 0.0, size), ellipse_mask(kps[1], (r, r), 0.0, size)
        )
    elif part == "nose":
        r = c.nose_radius * d_eye
        mask = ellipse_mask(kps[2], (r, r), 0.0, size)
    elif part == "mouth":
        d_mouth = float(np.linalg.norm(kps[4] - kps[3]))
        mouth_angle = math.atan2(kps[4, 1] - kps[3, 1], kps[4, 0] - kps[3, 0])
        mask = ellipse_mask(
            mouth, (c.mouth_half_width * d_mouth, c.mouth_half_height * d_em), mouth_angle, size
        )
    else:
        raise ValueError(
            f"masks.face_mask: part must be 'face', 'eyes', 'nose' or 'mouth', found {part!r}"
        )
    return require_nonempty(mask, f"{part} mask from 5 keypoints")


# --------------------------------------------------------------------------------------------------
# Filters, resizing, combination


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))  # ±3σ holds 99.7 % of the weight
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow a mask by `pixels` in every direction (grey dilation with a (2p+1)² square: a max
    filter)."""
    if pixels <= 0:
        return mask.float()
    m, lead = _as_4d(mask)
    out = F.max_pool2d(m, kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    return out.reshape(*lead, *out.shape[-2:])


def erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Shrink a mask by `pixels` (a min filter over a (2p+1)² square). Beyond the image border the
    edge value repeats, so a mask that touches the border does not shrink away from it."""
    if pixels <= 0:
        return mask.float()
    m, lead = _as_4d(mask)
    padded = F.pad(m, (pixels,) * 4, mode="replicate")
    out = -F.max_pool2d(-padded, kernel_size=2 * pixels + 1, stride=1)
    return out.reshape(*lead, *out.shape[-2:])


def feather(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soften a mask's edge with a Gaussian blur of std `sigma` pixels; stays in [0, 1].

    Pixels whose whole blur window is 1 stay exactly 1 and pixels whose window is all 0 stay exactly
    0 (a plain blur gives 1 − ε there, which would leak a trace of the other image into a paste).
    The blur window reaches ⌈3σ⌉ pixels; edges of the image repeat the border value.
    """
    if sigma <= 0:
        return mask.float().clamp(0, 1)
    m, lead = _as_4d(mask)
    m = m.clamp(0, 1)
    k = _gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    blurred = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    blurred = F.conv2d(F.pad(blurred, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    full = erode(m, r) >= 1.0  # whole window inside
    empty = dilate(m, r) <= 0.0  # whole window outside
    out = torch.where(
        full,
        torch.ones_like(blurred),
        torch.where(empty, torch.zeros_like(blurred), blurred.clamp(0, 1)),
    )
    return out.reshape(*lead, *out.shape[-2:])


def to_resolution(
    mask: torch.Tensor, side: int | Sequence[int], how: Literal["area", "max", "nearest"] = "area"
) -> torch.Tensor:
    """Resize a mask (..., H, W) to a latent or attention grid: `side` (square) or (h, w).

    "area" (default): shrinking averages each target cell's area (a 512² mask at 64² is the fraction
    of each 8×8 block inside), so thin structures survive as partial values; enlarging is bilinear.
    "max": a target cell takes the largest value it covers (a cell touched by the region is inside:
    what blending needs, so that nothing of the region is left out). "nearest": nearest neighbour (a
    binary mask stays binary).
    """
    target = _hw(side)
    m, lead = _as_4d(mask)
    if how == "max":
        out = F.adaptive_max_pool2d(m, target)
    elif how == "nearest":
        out = F.interpolate(m, size=target, mode="nearest")
    elif how != "area":
        raise ValueError(
            f"masks.to_resolution: how must be 'area', 'max' or 'nearest', found {how!r}"
        )
    elif target[0] <= m.shape[-2] and target[1] <= m.shape[-1]:
        out = F.adaptive_avg_pool2d(m, target)
    else:
        out = F.interpolate(m, size=target, mode="bilinear", align_corners=False)
    return out.clamp(0, 1).reshape(*lead, *target)


def union(*masks: torch.Tensor) -> torch.Tensor:
    """Pixelwise maximum of masks of the same shape."""
    if not masks:
        raise ValueError("masks.union: give at least one mask")
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) != 1:
        raise ValueError(
            f"masks.union: masks differ in shape {sorted(shapes)}; resize them with to_resolution "
            f"first"
        )
    out = masks[0].float()
    for m in masks[1:]:
        out = torch.maximum(out, m.float())
    return out
