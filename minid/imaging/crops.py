"""Crops: the geometry around faces — similarity transforms, affines, warps, crops, paste-back — and
face pairing.

EditedID restores faces in patches: the ArcFace-aligned 112² crop that identity is measured on
(`align_face`), and for multi-person images (paper A.16) a square patch around each face
(`crop_square`) that is restored and put back with a feathered mask (`paste_back`); the faces of the
original and the edit are matched by position first (`pair_faces`). This module is that geometry,
with no network in it; the detector, landmark and ArcFace networks that find the faces are in
`minid.faces.analyzer`.

Conventions:
- The geometry (`warp`, `crop_square`, `paste_back`) takes float tensors (C, H, W) or (B, C, H, W)
  of any range.
- Points and 2×3 affines are float64 numpy arrays in pixel-index coordinates (pixel (i, j) is the
  point x = j, y = i), the convention of cv2.warpAffine and of insightface's keypoints. Boxes are
  (x0, y0, x1, y1) in pixel-edge coordinates (the box (0, 0, W, H) is the whole image).
- An affine maps source coordinates to destination coordinates: `warp(img, A, size)[y, x] =
  img[A⁻¹(x, y)]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

# The five ArcFace reference points in a 112×112 crop: left eye, right eye, nose tip, left and right
# mouth corner (the template every insightface recogniser was trained on; "left" is the image's
# left).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


# --------------------------------------------------------------------------------------------------
# Geometry: similarity transforms, warps, crops and paste-back


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity transform (rotation, uniform scale, translation) that best maps `src` onto
    `dst`.

    Least squares in closed form (Umeyama 1991, Eq. 40-42): with centred point sets and the
    cross-covariance Σ = dstᵀ src / N = U D Vᵀ, the rotation is R = U S Vᵀ (S flips the last axis
    when det Σ < 0, so R is never a reflection), the scale c = tr(D S) / σ²_src and the translation
    t = μ_dst − c R μ_src. Returns the 2×3 matrix [cR | t]. Exact (to rounding) when dst is a
    similarity image of src.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(
            f"crops.estimate_similarity: expected two (N, 2) point sets with N ≥ 2, found "
            f"{src.shape} and {dst.shape}"
        )
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = (src_c**2).sum() / len(src)
    if var_src <= 1e-12:
        raise ValueError(
            "crops.estimate_similarity: the source points all coincide; a similarity is undefined"
        )
    cov = dst_c.T @ src_c / len(src)  # (2, 2)
    u, d, vt = np.linalg.svd(cov)
    s = np.ones(2)
    if np.linalg.det(cov) < 0:
        s[-1] = -1.0
    rotation = u @ np.diag(s) @ vt
    scale = (d * s).sum() / var_src
    translation = mu_dst - scale * rotation @ mu_src
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (N, 2) points with a 2×3 affine."""
    points = np.asarray(points, dtype=np.float64)
    return points @ affine[:, :2].T + affine[:, 2]


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """The 2×3 inverse of a 2×3 affine."""
    affine = np.asarray(affine, dtype=np.float64)
    linear_inv = np.linalg.inv(affine[:, :2])
    return np.concatenate([linear_inv, -(linear_inv @ affine[:, 2])[:, None]], axis=1)


def arcface_affine(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The similarity that maps the 5 keypoints onto the ArcFace template scaled to a `size`² crop.

    Sizes that are multiples of 128 use insightface's 128-grid variant: the 112 template scaled by
    size/128 and shifted right by 8·size/128, which keeps the face centred in the wider crop.
    """
    if size % 112 == 0:
        template = ARCFACE_TEMPLATE * (size / 112)
    elif size % 128 == 0:
        template = ARCFACE_TEMPLATE * (size / 128) + np.array([8.0 * size / 128, 0.0])
    else:
        raise ValueError(
            f"crops.arcface_affine: crop size must be a multiple of 112 or 128, found {size}"
        )
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(
            f"crops.arcface_affine: expected 5 keypoints of shape (5, 2), found {kps.shape}"
        )
    return estimate_similarity(kps, template)


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    return (
        (int(size), int(size))
        if isinstance(size, (int, np.integer))
        else (int(size[0]), int(size[1]))
    )


def warp(
    image: torch.Tensor,
    affine: np.ndarray,
    size: int | Sequence[int],
    border: Literal["zeros", "replicate"] = "zeros",
) -> torch.Tensor:
    """Resample `image` (C, H, W) or (B, C, H, W) through a 2×3 affine into an output of `size` (h,
    w).

    out[y, x] = bilinear sample of image at A⁻¹(x, y). Outside the image the sample is 0 ("zeros")
    or the nearest edge pixel ("replicate"). Source coordinates are computed in float64 and snapped
    to an integer when within 1e-6 of one, so a map that is an integer translation copies pixels
    exactly.
    """
    squeeze = image.dim() == 3
    if squeeze:
        image = image[None]
    if image.dim() != 4:
        raise ValueError(
            f"crops.warp: expected an image (C, H, W) or (B, C, H, W), found shape "
            f"{tuple(image.shape)}"
        )
    height, width = image.shape[-2:]
    out_h, out_w = _size2(size)
    device = image.device
    inv = torch.as_tensor(invert_affine(affine), dtype=torch.float64, device=device)
    ys, xs = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64, device=device),
        torch.arange(out_w, dtype=torch.float64, device=device),
        indexing="ij",
    )
    # (out_h, out_w) source x of every output pixel
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    sx = torch.where((sx - sx.round()).abs() < 1e-6, sx.round(), sx)
    sy = torch.where((sy - sy.round()).abs() < 1e-6, sy.round(), sy)
    x0, y0 = sx.floor(), sy.floor()
    fx, fy = sx - x0, sy - y0
    out = torch.zeros(*image.shape[:2], out_h, out_w, dtype=image.dtype, device=device)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = (x0 + dx).long(), (y0 + dy).long()
            weight = wx * wy
            if border == "zeros":
                inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                weight = torch.where(inside, weight, torch.zeros_like(weight))
            elif border != "replicate":
                raise ValueError(
                    f"crops.warp: border must be 'zeros' or 'replicate', found {border!r}"
                )
            xi, yi = xi.clamp(0, width - 1), yi.clamp(0, height - 1)
            # Skip exact-zero weights so a value far outside (or a NaN) never leaks in through 0·v.
            term = image[:, :, yi, xi] * weight.to(image.dtype)
            out = out + torch.where(weight != 0, term, torch.zeros_like(term))
    return out[0] if squeeze else out


def align_face(
    image: torch.Tensor, kps: np.ndarray, size: int = 112
) -> tuple[torch.Tensor, np.ndarray]:
    """The ArcFace-aligned crop of one face: (patch (C, size, size), affine image → patch)."""
    affine = arcface_affine(kps, size)
    return warp(image, affine, size), affine


def square_around(box: Sequence[float], scale: float = 1.5) -> tuple[float, float, float]:
    """(left, top, side) of the square centred on `box` whose side is `scale` × the box's longer
    side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * scale
    if side <= 0:
        raise ValueError(
            f"crops.square_around: the box {tuple(box)} is empty (x1 ≤ x0 and y1 ≤ y0)"
        )
    return (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2, side


def crop_square(
    image: torch.Tensor,
    box: Sequence[float],
    scale: float = 1.5,
    size: int = 512,
    border: Literal["zeros", "replicate"] = "replicate",
) -> tuple[torch.Tensor, np.ndarray]:
    """A square patch (C, size, size) around `box` and the affine image → patch that made it.

    The square is centred on the box with side `scale` × the longer box side (faces need context:
    hair, chin, the edit around them). Parts outside the image repeat the edge ("replicate") so the
    diffusion model does not see black borders. Pass the returned affine to `paste_back`.
    """
    left, top, side = square_around(box, scale)
    affine = square_affine(left, top, side, size)
    return warp(image, affine, size, border=border), affine


def square_affine(left: float, top: float, side: float, size: int) -> np.ndarray:
    """The 2×3 affine image → patch of the square (left, top, side) resized to size×size.

    Pixel-edge coordinates X map to s·(X − left), s = size/side; pixel centres sit at index + 0.5 on
    both sides, so the index-coordinate map is u = s·x + s·(0.5 − left) − 0.5 (an integer shift when
    s = 1 and left is whole).
    """
    s = size / side
    return np.array(
        [[s, 0.0, s * (0.5 - left) - 0.5], [0.0, s, s * (0.5 - top) - 0.5]], dtype=np.float64
    )


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2×3 affine of `inner` followed by `outer` (x ↦ outer(inner(x)))."""
    outer, inner = np.asarray(outer, np.float64), np.asarray(inner, np.float64)
    return np.concatenate(
        [outer[:, :2] @ inner[:, :2], (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]], axis=1
    )


def shift_affine(affine: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """The affine (image → patch) of the sub-image whose pixel (0, 0) is the image's (x0, y0)."""
    return compose_affine(affine, np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]))


def affine_scale(affine: np.ndarray) -> float:
    """How many destination px one source px becomes (√|det| of the linear part)."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(affine, np.float64)[:, :2]))))


def patch_box(affine: np.ndarray, side: int) -> tuple[float, float, float, float]:
    """The box (pixel edges) around a side×side patch made through `affine` (image → patch), in
    the image's coordinates."""
    corners = np.array([[-0.5, -0.5], [side - 0.5, -0.5], [-0.5, side - 0.5], [side - 0.5] * 2])
    pts = apply_affine(corners, invert_affine(affine)) + 0.5
    return (
        float(pts[:, 0].min()),
        float(pts[:, 1].min()),
        float(pts[:, 0].max()),
        float(pts[:, 1].max()),
    )


def footprint(
    affine: np.ndarray, side: int, size: tuple[int, int], margin: float = 2.0
) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) of an image of `size` (h, w) that holds every pixel a
    side×side patch made through `affine` (image → patch) reads, `margin` px wider, clipped to the
    image (at least one pixel). Warping or pasting through this box only gives what the whole image
    gives, at the cost of the box."""
    h, w = size
    left, top, right, bottom = patch_box(affine, side)  # pixel edges: index = edge − 0.5
    x0 = min(max(int(np.floor(left - 0.5 - margin)), 0), w - 1)
    y0 = min(max(int(np.floor(top - 0.5 - margin)), 0), h - 1)
    x1 = max(min(int(np.ceil(right - 0.5 + margin)) + 1, w), x0 + 1)
    y1 = max(min(int(np.ceil(bottom - 0.5 + margin)) + 1, h), y0 + 1)
    return x0, y0, x1, y1


def border_ramp(size: int, width: float) -> torch.Tensor:
    """A (size, size) mask that is 1 inside and falls smoothly to 0 over `width` pixels at the
    edges.

    The default paste-back mask: the seam of a restored patch disappears in the ramp. Smoothstep of
    the distance to the nearest edge, so the mask has no kink where the ramp meets the plateau.
    """
    idx = torch.arange(size, dtype=torch.float32)
    # distance of each pixel centre to the nearer edge
    dist = torch.minimum(idx + 0.5, size - 0.5 - idx)
    d = torch.minimum(dist[:, None], dist[None, :])  # (size, size)
    t = (d / max(width, 1e-6)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def paste_back(
    image: torch.Tensor,
    patch: torch.Tensor,
    affine: np.ndarray,
    mask: torch.Tensor | None = None,
    feather: float = 16.0,
) -> torch.Tensor:
    """Put a (restored) patch back into the image it was cropped from with `crop_square` /
    `align_face`.

    image (C, H, W) or (B, C, H, W); patch (C, s, s) or (B, C, s, s); affine: image → patch.
    mask (s, s) in [0, 1] in patch coordinates; default a square with a `feather`-pixel smooth
    border. The patch and mask are warped back with the inverse affine and blended: out = image·(1 −
    m) + patch·m. Where m = 0 (everywhere outside the patch) the image is returned unchanged bit for
    bit.
    """
    height, width = image.shape[-2:]
    if mask is None:
        mask = border_ramp(patch.shape[-1], feather)
    if tuple(mask.shape[-2:]) != tuple(patch.shape[-2:]):
        raise ValueError(
            f"crops.paste_back: the mask is {tuple(mask.shape[-2:])} but the patch is "
            f"{tuple(patch.shape[-2:])}; "
            "give a mask in patch coordinates"
        )
    back_affine = invert_affine(affine)
    # The patch's edge repeats outward, so the mask alone decides how much of it shows where a pixel
    # straddles the patch's border (zeros there would darken the edge twice: once in the patch, once
    # in the mask).
    back = warp(patch.to(image.dtype), back_affine, (height, width), border="replicate")
    m = warp(
        mask.reshape(1, *mask.shape[-2:]).to(image.dtype),
        back_affine,
        (height, width),
        border="replicate",
    )
    # (1, H, W): broadcasts
    m = m.clamp(0, 1) * _covered(affine, (height, width), patch.shape[-1]).to(m)
    #   over channels (and batch); a pixel counts when its centre falls on the patch's area, so the
    # patch's edge   is sharp and a square touching the image's border fills it to the last row
    return image * (1 - m) + back * m


def _covered(affine: np.ndarray, size: tuple[int, int], side: int) -> torch.Tensor:
    """(H, W) 1 where a pixel centre of the image maps (through `affine`, image → patch) onto the
    side×side patch's area [−0.5, side − 0.5]², else 0."""
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64)
    u = affine[0, 0] * xs + affine[0, 1] * ys + affine[0, 2]
    v = affine[1, 0] * xs + affine[1, 1] * ys + affine[1, 2]
    eps = 1e-9
    inside = (
        (u >= -0.5 - eps) & (u <= side - 0.5 + eps) & (v >= -0.5 - eps) & (v <= side - 0.5 + eps)
    )
    return torch.from_numpy(inside.astype(np.float32))


# --------------------------------------------------------------------------------------------------
# Pairing the faces of two images


@dataclass
class FacePairing:
    pairs: list[tuple[int, int]]  # (index in a, index in b)
    unpaired_a: list[int] = field(default_factory=list)
    unpaired_b: list[int] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{len(self.pairs)} face pair(s) {self.pairs}"
        if self.unpaired_a:
            text += f"; unpaired in the first image: {self.unpaired_a}"
        if self.unpaired_b:
            text += f"; unpaired in the second image: {self.unpaired_b}"
        return text


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4) → (N, M); boxes in edge
    coordinates."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.clip(
        np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None
    )
    h = np.clip(
        np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None
    )
    inter = w * h
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def pair_faces(
    boxes_a: np.ndarray,
    boxes_b: np.ndarray,
    min_iou: float = 0.3,
    pairs: Sequence[tuple[int, int]] | None = None,
    size_a: tuple[int, int] | None = None,
    size_b: tuple[int, int] | None = None,
) -> FacePairing:
    """Pair the faces of two images by position: greedy assignment on box IoU.

    The pair with the highest IoU is taken first, then the best among the remaining faces, and so on
    while the IoU is at least `min_iou`; faces left over are reported unpaired. Greedy equals the
    optimal (Hungarian) assignment whenever every face overlaps at most one face of the other image,
    the usual case. size_a/size_b: (width, height) of the two images; when given, boxes are compared
    in coordinates relative to their image, so a resized edit still pairs. `pairs` overrides the
    matching with explicit indices.
    """
    boxes_a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    boxes_b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    n_a, n_b = len(boxes_a), len(boxes_b)
    if pairs is not None:
        chosen = [(int(i), int(j)) for i, j in pairs]
        for i, j in chosen:
            if not (0 <= i < n_a and 0 <= j < n_b):
                raise ValueError(
                    f"crops.pair_faces: pair ({i}, {j}) is out of range; the images have {n_a} and "
                    f"{n_b} faces"
                )
        if len({i for i, _ in chosen}) != len(chosen) or len({j for _, j in chosen}) != len(chosen):
            raise ValueError(
                f"crops.pair_faces: a face appears in two pairs of {chosen}; give each face once"
            )
    else:
        if size_a is not None and size_b is not None:
            boxes_a = boxes_a / np.array(
                [size_a[0], size_a[1], size_a[0], size_a[1]], dtype=np.float64
            )
            boxes_b = boxes_b / np.array(
                [size_b[0], size_b[1], size_b[0], size_b[1]], dtype=np.float64
            )
        iou = box_iou(boxes_a, boxes_b)
        chosen = []
        used_a, used_b = set(), set()
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            i, j = divmod(int(flat), n_b)
            if iou[i, j] < min_iou or iou[i, j] <= 0:
                break
            if i not in used_a and j not in used_b:
                chosen.append((i, j))
                used_a.add(i)
                used_b.add(j)
        chosen.sort()
    paired_a = {i for i, _ in chosen}
    paired_b = {j for _, j in chosen}
    return FacePairing(
        pairs=chosen,
        unpaired_a=[i for i in range(n_a) if i not in paired_a],
        unpaired_b=[j for j in range(n_b) if j not in paired_b],
    )
