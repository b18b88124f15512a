"""Faces: detection, landmarks and ArcFace embeddings (insightface's model packs), and the geometry around them.

EditedID needs faces for three things: ArcFace embeddings to measure identity (the paper's ID-Sim), landmarks
for face masks, and square crops around each face for multi-person images (paper A.16): detect the faces of
both images, pair them by position, crop a square patch around each pair, restore the patches, paste them back
with a feathered mask.

The networks are insightface's ONNX model packs (default "buffalo_l"): a SCRFD detector (det_10g.onnx), a
106-point landmark regressor (2d106det.onnx) and an ArcFace recogniser (w600k_r50.onnx). The code around the
ONNX sessions is minid's own and mirrors insightface's FaceAnalysis step for step, so a real pack and the tiny
ONNX graphs the tests build go through the same lines:

    image (RGB) ─ letterbox resize to det_size, (x − 127.5)/128 ─ SCRFD ─ decode anchors ─ NMS ─ boxes, 5 kps
        ├─ square crop of 1.5 × box side, 192² ─ landmark net ─ 106 points
        └─ 5-point similarity to the ArcFace template, 112² ─ ArcFace (batched) ─ L2-normalised 512-d embedding

Conventions:
- Images are RGB. The analyzer takes a PIL image, a uint8 array (H, W, 3) or a float tensor (3, H, W) in [0, 1];
  the geometry (`warp`, `crop_square`, `paste_back`) takes float tensors (C, H, W) or (B, C, H, W) of any range.
- Points and 2×3 affines are float64 numpy arrays in pixel-index coordinates (pixel (i, j) is the point
  x = j, y = i), the convention of cv2.warpAffine and of insightface's keypoints. Boxes are (x0, y0, x1, y1)
  in pixel-edge coordinates (the box (0, 0, W, H) is the whole image).
- An affine maps source coordinates to destination coordinates: `warp(img, A, size)[y, x] = img[A⁻¹(x, y)]`.

onnxruntime (and onnx, to read the input normalisation of a pack's models) are an optional extra:
`pip install minid[faces]`. They are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# The five ArcFace reference points in a 112×112 crop: left eye, right eye, nose tip, left and right mouth
# corner (the template every insightface recogniser was trained on; "left" is the image's left).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

INSTALL_HINT = "pip install 'minid[faces]'  (or: pip install insightface onnx onnxruntime-gpu)"
ROOT_ENV = "MINID_INSIGHTFACE_ROOT"


# ----------------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class FaceAnalyzerConfig:
    pack: str = "buffalo_l"  # insightface model pack: a folder <root>/models/<pack> of .onnx files
    root: str | None = None  # folder holding models/<pack>; None: $MINID_INSIGHTFACE_ROOT, else ~/.insightface
    det_size: int = 640  # side of the square detector input; the image is letterboxed into it
    det_threshold: float = 0.5  # minimum detector score of a face (insightface's default)
    nms_threshold: float = 0.4  # boxes overlapping a better one by more IoU than this are dropped
    max_batch: int = 32  # crops per ONNX run for the landmark and ArcFace networks
    landmarks: bool = True  # run the 106-point landmark network when the pack has one
    embeddings: bool = True  # run ArcFace


@dataclass
class Face:
    """One detected face, in the coordinates of the image it was found in."""

    box: np.ndarray  # (4,) x0, y0, x1, y1
    score: float  # detector confidence in [0, 1]
    kps: np.ndarray  # (5, 2) eyes, nose tip, mouth corners
    landmarks_106: np.ndarray | None = None  # (106, 2) or None when no landmark network ran
    embedding: np.ndarray | None = None  # (512,) L2-normalised ArcFace embedding, or None

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


# ----------------------------------------------------------------------------------------------------------
# Geometry: similarity transforms, warps, crops and paste-back


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity transform (rotation, uniform scale, translation) that best maps `src` onto `dst`.

    Least squares in closed form (Umeyama 1991, Eq. 40-42): with centred point sets and the cross-covariance
    Σ = dstᵀ src / N = U D Vᵀ, the rotation is R = U S Vᵀ (S flips the last axis when det Σ < 0, so R is never a
    reflection), the scale c = tr(D S) / σ²_src and the translation t = μ_dst − c R μ_src.
    Returns the 2×3 matrix [cR | t]. Exact (to rounding) when dst is a similarity image of src.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"faces.estimate_similarity: expected two (N, 2) point sets with N ≥ 2, found {src.shape} and {dst.shape}")
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = (src_c**2).sum() / len(src)
    if var_src <= 1e-12:
        raise ValueError("faces.estimate_similarity: the source points all coincide; a similarity is undefined")
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

    Sizes that are multiples of 128 use insightface's 128-grid variant: the 112 template scaled by size/128 and
    shifted right by 8·size/128, which keeps the face centred in the wider crop.
    """
    if size % 112 == 0:
        template = ARCFACE_TEMPLATE * (size / 112)
    elif size % 128 == 0:
        template = ARCFACE_TEMPLATE * (size / 128) + np.array([8.0 * size / 128, 0.0])
    else:
        raise ValueError(f"faces.arcface_affine: crop size must be a multiple of 112 or 128, found {size}")
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise ValueError(f"faces.arcface_affine: expected 5 keypoints of shape (5, 2), found {kps.shape}")
    return estimate_similarity(kps, template)


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def warp(
    image: torch.Tensor,
    affine: np.ndarray,
    size: int | Sequence[int],
    border: Literal["zeros", "replicate"] = "zeros",
) -> torch.Tensor:
    """Resample `image` (C, H, W) or (B, C, H, W) through a 2×3 affine into an output of `size` (h, w).

    out[y, x] = bilinear sample of image at A⁻¹(x, y). Outside the image the sample is 0 ("zeros") or the
    nearest edge pixel ("replicate"). Source coordinates are computed in float64 and snapped to an integer
    when within 1e-6 of one, so a map that is an integer translation copies pixels exactly.
    """
    squeeze = image.dim() == 3
    if squeeze:
        image = image[None]
    if image.dim() != 4:
        raise ValueError(f"faces.warp: expected an image (C, H, W) or (B, C, H, W), found shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    out_h, out_w = _size2(size)
    device = image.device
    inv = torch.as_tensor(invert_affine(affine), dtype=torch.float64, device=device)
    ys, xs = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64, device=device),
        torch.arange(out_w, dtype=torch.float64, device=device),
        indexing="ij",
    )
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]  # (out_h, out_w) source x of every output pixel
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
                raise ValueError(f"faces.warp: border must be 'zeros' or 'replicate', found {border!r}")
            xi, yi = xi.clamp(0, width - 1), yi.clamp(0, height - 1)
            # Skip exact-zero weights so a value far outside (or a NaN) never leaks in through 0·v.
            term = image[:, :, yi, xi] * weight.to(image.dtype)
            out = out + torch.where(weight != 0, term, torch.zeros_like(term))
    return out[0] if squeeze else out


def align_face(image: torch.Tensor, kps: np.ndarray, size: int = 112) -> tuple[torch.Tensor, np.ndarray]:
    """The ArcFace-aligned crop of one face: (patch (C, size, size), affine image → patch)."""
    affine = arcface_affine(kps, size)
    return warp(image, affine, size), affine


def square_around(box: Sequence[float], scale: float = 1.5) -> tuple[float, float, float]:
    """(left, top, side) of the square centred on `box` whose side is `scale` × the box's longer side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * scale
    if side <= 0:
        raise ValueError(f"faces.square_around: the box {tuple(box)} is empty (x1 ≤ x0 and y1 ≤ y0)")
    return (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2, side


def crop_square(
    image: torch.Tensor,
    box: Sequence[float],
    scale: float = 1.5,
    size: int = 512,
    border: Literal["zeros", "replicate"] = "replicate",
) -> tuple[torch.Tensor, np.ndarray]:
    """A square patch (C, size, size) around `box` and the affine image → patch that made it.

    The square is centred on the box with side `scale` × the longer box side (faces need context: hair,
    chin, the edit around them). Parts outside the image repeat the edge ("replicate") so the diffusion
    model does not see black borders. Pass the returned affine to `paste_back`.
    """
    left, top, side = square_around(box, scale)
    s = size / side
    # Pixel-edge coordinates X map to s·(X − left); pixel centres sit at index + 0.5 on both sides, so the
    # index-coordinate map is u = s·x + s·(0.5 − left) − 0.5 (an integer shift when s = 1 and left is whole).
    affine = np.array(
        [[s, 0.0, s * (0.5 - left) - 0.5], [0.0, s, s * (0.5 - top) - 0.5]], dtype=np.float64
    )
    return warp(image, affine, size, border=border), affine


def border_ramp(size: int, width: float) -> torch.Tensor:
    """A (size, size) mask that is 1 inside and falls smoothly to 0 over `width` pixels at the edges.

    The default paste-back mask: the seam of a restored patch disappears in the ramp. Smoothstep of the
    distance to the nearest edge, so the mask has no kink where the ramp meets the plateau.
    """
    idx = torch.arange(size, dtype=torch.float32)
    dist = torch.minimum(idx + 0.5, size - 0.5 - idx)  # distance of each pixel centre to the nearer edge
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
    """Put a (restored) patch back into the image it was cropped from with `crop_square` / `align_face`.

    image (C, H, W) or (B, C, H, W); patch (C, s, s) or (B, C, s, s); affine: image → patch.
    mask (s, s) in [0, 1] in patch coordinates; default a square with a `feather`-pixel smooth border.
    The patch and mask are warped back with the inverse affine and blended: out = image·(1 − m) + patch·m.
    Where m = 0 (everywhere outside the patch) the image is returned unchanged bit for bit.
    """
    height, width = image.shape[-2:]
    if mask is None:
        mask = border_ramp(patch.shape[-1], feather)
    if tuple(mask.shape[-2:]) != tuple(patch.shape[-2:]):
        raise ValueError(
            f"faces.paste_back: the mask is {tuple(mask.shape[-2:])} but the patch is {tuple(patch.shape[-2:])}; "
            "give a mask in patch coordinates"
        )
    back_affine = invert_affine(affine)
    back = warp(patch.to(image.dtype), back_affine, (height, width), border="zeros")
    m = warp(mask.reshape(1, *mask.shape[-2:]).to(image.dtype), back_affine, (height, width), border="zeros")
    m = m.clamp(0, 1)  # (1, H, W), broadcasts over channels (and batch)
    return image * (1 - m) + back * m


# ----------------------------------------------------------------------------------------------------------
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
    """IoU of every box in a (N, 4) with every box in b (M, 4) → (N, M); boxes in edge coordinates."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
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

    The pair with the highest IoU is taken first, then the best among the remaining faces, and so on while
    the IoU is at least `min_iou`; faces left over are reported unpaired. Greedy equals the optimal
    (Hungarian) assignment whenever every face overlaps at most one face of the other image, the usual case.
    size_a/size_b: (width, height) of the two images; when given, boxes are compared in coordinates relative
    to their image, so a resized edit still pairs. `pairs` overrides the matching with explicit indices.
    """
    boxes_a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    boxes_b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    n_a, n_b = len(boxes_a), len(boxes_b)
    if pairs is not None:
        chosen = [(int(i), int(j)) for i, j in pairs]
        for i, j in chosen:
            if not (0 <= i < n_a and 0 <= j < n_b):
                raise ValueError(f"faces.pair_faces: pair ({i}, {j}) is out of range; the images have {n_a} and {n_b} faces")
        if len({i for i, _ in chosen}) != len(chosen) or len({j for _, j in chosen}) != len(chosen):
            raise ValueError(f"faces.pair_faces: a face appears in two pairs of {chosen}; give each face once")
    else:
        if size_a is not None and size_b is not None:
            boxes_a = boxes_a / np.array([size_a[0], size_a[1], size_a[0], size_a[1]], dtype=np.float64)
            boxes_b = boxes_b / np.array([size_b[0], size_b[1], size_b[0], size_b[1]], dtype=np.float64)
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


# ----------------------------------------------------------------------------------------------------------
# ONNX plumbing: providers, the model pack, running sessions in batches


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"minid.faces needs onnxruntime, which is not installed; {INSTALL_HINT}") from None
    return onnxruntime


def choose_providers(available: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime execution providers: CUDA first when this onnxruntime build offers it, then CPU.

    `available` defaults to `onnxruntime.get_available_providers()` (onnxruntime-gpu lists CUDA; the CPU
    wheel does not). CPU is always last so every model runs even where a CUDA kernel is missing.
    """
    if available is None:
        available = _import_onnxruntime().get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def model_root(root: str | os.PathLike | None = None) -> Path:
    """Where model packs live: `root`, else $MINID_INSIGHTFACE_ROOT, else ~/.insightface (insightface's own)."""
    if root is None:
        root = os.environ.get(ROOT_ENV) or "~/.insightface"
    return Path(root).expanduser()


def find_model_pack(pack: str = "buffalo_l", root: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The folder <root>/models/<pack> with the pack's .onnx files; a folder path for `pack` is used as is."""
    direct = Path(pack).expanduser()
    folder = direct if direct.is_dir() else model_root(root) / "models" / pack
    if not any(folder.glob("*.onnx")) and download:
        try:
            from insightface.utils.storage import ensure_available
        except ImportError:
            raise ImportError(f"downloading a model pack needs insightface; {INSTALL_HINT}") from None
        ensure_available("models", pack, root=str(model_root(root)))
    if not any(folder.glob("*.onnx")):
        raise FileNotFoundError(
            f"faces: no .onnx files for the insightface model pack {pack!r} in {folder}. Get the pack with "
            f"`FaceAnalyzer.from_pack({pack!r}, download=True)` (insightface downloads {pack}.zip from its "
            f"model-zoo release), or unzip {pack}.zip into {folder} yourself; set ${ROOT_ENV} or `root` "
            "to use another folder."
        )
    return folder


def input_normalisation(model_path: str | os.PathLike, default: tuple[float, float]) -> tuple[float, float]:
    """(mean, std) the model expects its 0-255 input normalised with.

    Models converted from MXNet carry the normalisation in the graph (their first nodes are named Sub…/Mul…
    or _minus…/_mul…, or bn_data): they take raw pixels, mean 0 and std 1. Others take (x − mean)/std with the
    network's default. This is insightface's rule, read from the graph's first 8 nodes.
    """
    try:
        import onnx
    except ImportError:
        raise ImportError(f"reading {model_path} needs the onnx package; {INSTALL_HINT}") from None
    graph = onnx.load(str(model_path), load_external_data=False).graph
    has_sub = has_mul = False
    for position, node in enumerate(graph.node[:8]):
        has_sub |= node.name.startswith(("Sub", "_minus"))
        has_mul |= node.name.startswith(("Mul", "_mul"))
        if position < 3 and node.name == "bn_data":
            has_sub = has_mul = True
    return (0.0, 1.0) if has_sub and has_mul else default


def _run_batched(session: Any, blob: np.ndarray, max_batch: int) -> list[np.ndarray]:
    """Run a single-input session over the first axis of `blob` in chunks; outputs concatenated per output."""
    spec = session.get_inputs()[0]
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    step = fixed or max(1, max_batch)
    names = [o.name for o in session.get_outputs()]
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(blob), step):
        chunks.append(session.run(names, {spec.name: np.ascontiguousarray(blob[start : start + step], dtype=np.float32)}))
    return [np.concatenate([c[k] for c in chunks], axis=0) for k in range(len(names))]


def as_pixels(image: Any) -> torch.Tensor:
    """An RGB image as a float32 tensor (3, H, W) with values 0-255.

    Takes a PIL image, a uint8 array (H, W, 3) / (H, W) / (H, W, 4) or a float tensor (3, H, W) in [0, 1].
    """
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"faces: expected an image tensor (3, H, W) in [0, 1], found shape {tuple(image.shape)}")
        return image.detach().float().cpu() * 255.0
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"faces: expected an RGB image (H, W, 3), found an array of shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array[:, :, :3])).permute(2, 0, 1).float()


# ----------------------------------------------------------------------------------------------------------
# The three networks


def distance_to_boxes(centers: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """SCRFD box decoding: distances (left, top, right, bottom) from each anchor centre → (x0, y0, x1, y1)."""
    return np.concatenate([centers - distances[:, 0:2], centers + distances[:, 2:4]], axis=1)


def distance_to_points(centers: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """SCRFD keypoint decoding: (K, 2P) offsets from each anchor centre → (K, P, 2) points."""
    return centers[:, None, :] + offsets.reshape(len(offsets), offsets.shape[1] // 2, 2)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first (ties keep the earlier box)."""
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    while order:
        best = order.pop(0)
        keep.append(int(best))
        if order:
            overlap = box_iou(boxes[best], boxes[order])[0]
            order = [k for k, o in zip(order, overlap) if o <= iou_threshold]
    return keep


class SCRFD:
    """The SCRFD face detector of insightface's packs around an onnxruntime session.

    Outputs come in groups of F feature levels (strides 8, 16, 32 with 2 anchors per cell, or strides 8…128
    with 1): F score maps (K, 1), F box-distance maps (K, 4) and, in the 9/15-output variants, F keypoint maps
    (K, 10), where K = (H/stride)·(W/stride)·anchors, cells in row-major order, anchors of a cell adjacent.
    Distances are in units of the stride and measured from the cell's top-left corner (x·stride, y·stride).
    """

    mean, std = 127.5, 128.0  # the detector's input normalisation, (x − 127.5)/128

    def __init__(self, session: Any, det_size: int = 640, threshold: float = 0.5, nms_threshold: float = 0.4):
        self.session = session
        self.det_size = det_size
        self.threshold = threshold
        self.nms_threshold = nms_threshold
        n_out = len(session.get_outputs())
        if n_out in (6, 9):
            self.strides, self.anchors = (8, 16, 32), 2
        elif n_out in (10, 15):
            self.strides, self.anchors = (8, 16, 32, 64, 128), 1
        else:
            raise ValueError(f"faces.SCRFD: a SCRFD detector has 6, 9, 10 or 15 outputs, this model has {n_out}")
        self.use_kps = n_out in (9, 15)

    def preprocess(self, pixels: torch.Tensor) -> tuple[np.ndarray, float]:
        """Letterbox: resize keeping the aspect ratio so the image fits det_size², pad right/bottom with 0."""
        height, width = pixels.shape[-2:]
        side = self.det_size
        im_ratio = height / width
        if im_ratio > 1.0:
            new_h, new_w = side, int(side / im_ratio)
        else:
            new_w, new_h = side, int(side * im_ratio)
        det_scale = new_h / height
        resized = F.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear", align_corners=False)
        canvas = torch.zeros(1, 3, side, side)
        canvas[:, :, :new_h, :new_w] = resized
        return ((canvas - self.mean) / self.std).numpy(), det_scale

    def decode(self, outputs: list[np.ndarray], input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw outputs → (boxes (K, 4), scores (K,), kps (K, 5, 2)) above the threshold, in input coordinates."""
        levels = len(self.strides)
        boxes, scores, kps = [], [], []
        for level, stride in enumerate(self.strides):
            score = outputs[level].reshape(-1)  # batched graphs add a leading 1
            dist = outputs[level + levels].reshape(-1, 4) * stride
            grid_h, grid_w = input_hw[0] // stride, input_hw[1] // stride
            ys, xs = np.mgrid[:grid_h, :grid_w]
            centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float64) * stride  # (cells, 2)
            centers = np.repeat(centers, self.anchors, axis=0)  # (K, 2): the anchors of a cell share a centre
            if len(score) != len(centers):
                raise ValueError(
                    f"faces.SCRFD: stride {stride} output has {len(score)} scores, expected {len(centers)} "
                    f"for a {input_hw[1]}×{input_hw[0]} input with {self.anchors} anchor(s)"
                )
            hit = score >= self.threshold
            boxes.append(distance_to_boxes(centers[hit], dist[hit]))
            scores.append(score[hit])
            if self.use_kps:
                offsets = outputs[level + 2 * levels].reshape(len(score), -1) * stride
                kps.append(distance_to_points(centers[hit], offsets[hit]))
            else:
                kps.append(np.zeros((int(hit.sum()), 5, 2)))
        return np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps)

    def detect(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Faces in an image (3, H, W) 0-255 → (boxes (N, 4), scores (N,), kps (N, 5, 2)), best first."""
        blob, det_scale = self.preprocess(pixels)
        spec = self.session.get_inputs()[0]
        outputs = self.session.run([o.name for o in self.session.get_outputs()], {spec.name: blob})
        boxes, scores, kps = self.decode(outputs, blob.shape[-2:])
        keep = nms(boxes, scores, self.nms_threshold)
        return boxes[keep] / det_scale, scores[keep], kps[keep] / det_scale


class Landmark106:
    """The 2d106det landmark network: a 192² crop of 1.5 × the box side around the box centre → 106 points.

    The network predicts points in [−1, 1] crop coordinates; (p + 1)·96 gives crop pixels.
    """

    def __init__(self, session: Any, mean: float = 0.0, std: float = 1.0, max_batch: int = 32):
        self.session, self.mean, self.std, self.max_batch = session, mean, std, max_batch
        self.size = int(session.get_inputs()[0].shape[-1])

    def crop_affine(self, box: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = (float(v) for v in box)
        s = self.size / (max(x1 - x0, y1 - y0) * 1.5)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return np.array([[s, 0, self.size / 2 - s * cx], [0, s, self.size / 2 - s * cy]], dtype=np.float64)

    def predict(self, pixels: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        """(N, 106, 2) landmarks in image coordinates for N boxes."""
        if len(boxes) == 0:
            return np.zeros((0, 106, 2))
        affines = [self.crop_affine(b) for b in boxes]
        crops = torch.stack([warp(pixels, a, self.size) for a in affines])  # (N, 3, 192, 192)
        pred = _run_batched(self.session, ((crops - self.mean) / self.std).numpy(), self.max_batch)[0]
        pred = pred.reshape(len(boxes), -1, 2).astype(np.float64)
        pred = (pred + 1) * (self.size // 2)
        return np.stack([apply_affine(p, invert_affine(a)) for p, a in zip(pred, affines)])


class ArcFace:
    """The ArcFace recogniser: 5-point aligned 112² crops → 512-d embeddings, L2-normalised here."""

    def __init__(self, session: Any, mean: float = 127.5, std: float = 127.5, max_batch: int = 32):
        self.session, self.mean, self.std, self.max_batch = session, mean, std, max_batch
        self.size = int(session.get_inputs()[0].shape[-1])

    def embed_crops(self, crops: torch.Tensor) -> np.ndarray:
        """(N, 3, size, size) aligned crops with values 0-255 → (N, 512) unit vectors."""
        feats = _run_batched(self.session, ((crops - self.mean) / self.std).numpy(), self.max_batch)[0]
        feats = feats.reshape(len(crops), -1).astype(np.float64)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        return feats / np.where(norms > 0, norms, 1.0)

    def embed(self, pixels: torch.Tensor, kps: Sequence[np.ndarray]) -> np.ndarray:
        if len(kps) == 0:
            return np.zeros((0, 512))
        crops = torch.stack([align_face(pixels, k, self.size)[0] for k in kps])
        return self.embed_crops(crops)


def _identify(session: Any) -> str | None:
    """Which network of a pack a session is, from its input and output shapes (insightface's routing)."""
    outputs = session.get_outputs()
    shape = session.get_inputs()[0].shape
    if len(outputs) >= 5:
        return "detector"
    side = shape[-1] if isinstance(shape[-1], int) else None
    width = outputs[0].shape[-1] if isinstance(outputs[0].shape[-1], int) else None
    if side == 112 and width == 512:
        return "arcface"
    if side == 192 and width == 212:
        return "landmark_106"
    return None


class FaceAnalyzer:
    """Detection, 106-point landmarks and ArcFace embeddings: insightface's FaceAnalysis, in minid's code.

    Build it from a model pack with `FaceAnalyzer.from_pack()`, or from the three networks directly (the
    tests pass tiny ONNX graphs). `analyze(image)` returns every face, best detector score first.
    """

    def __init__(self, detector: SCRFD, arcface: ArcFace | None = None, landmark: Landmark106 | None = None):
        self.detector, self.arcface, self.landmark = detector, arcface, landmark

    @classmethod
    def from_pack(
        cls,
        pack: str | None = None,
        root: str | os.PathLike | None = None,
        config: FaceAnalyzerConfig = FaceAnalyzerConfig(),
        providers: Sequence[str] | None = None,
        download: bool = False,
    ) -> "FaceAnalyzer":
        ort = _import_onnxruntime()
        folder = find_model_pack(pack or config.pack, root if root is not None else config.root, download)
        providers = list(providers) if providers is not None else choose_providers()
        found: dict[str, tuple[Any, Path]] = {}
        for path in sorted(folder.glob("*.onnx")):
            session = ort.InferenceSession(str(path), providers=providers)
            role = _identify(session)
            if role is not None and role not in found:
                found[role] = (session, path)
        if "detector" not in found:
            raise FileNotFoundError(f"faces: no SCRFD detector (a model with 6-15 outputs) among the .onnx files in {folder}")
        detector = SCRFD(found["detector"][0], config.det_size, config.det_threshold, config.nms_threshold)
        arcface = landmark = None
        if config.embeddings:
            if "arcface" not in found:
                raise FileNotFoundError(f"faces: no ArcFace model (112² input, 512 outputs) among the .onnx files in {folder}")
            session, path = found["arcface"]
            arcface = ArcFace(session, *input_normalisation(path, (127.5, 127.5)), max_batch=config.max_batch)
        if config.landmarks and "landmark_106" in found:
            session, path = found["landmark_106"]
            landmark = Landmark106(session, *input_normalisation(path, (127.5, 128.0)), max_batch=config.max_batch)
        return cls(detector, arcface, landmark)

    def analyze(self, image: Any) -> list[Face]:
        """Every face in the image, best detector score first (an empty list when there is none)."""
        pixels = as_pixels(image)
        boxes, scores, kps = self.detector.detect(pixels)
        landmarks = self.landmark.predict(pixels, boxes) if self.landmark is not None else None
        embeddings = self.arcface.embed(pixels, list(kps)) if self.arcface is not None else None
        return [
            Face(
                box=boxes[i].astype(np.float64),
                score=float(scores[i]),
                kps=kps[i].astype(np.float64),
                landmarks_106=None if landmarks is None else landmarks[i],
                embedding=None if embeddings is None else embeddings[i],
            )
            for i in range(len(boxes))
        ]

    def largest_face(self, image: Any, name: str = "the image") -> Face:
        """The largest face; `name` (a file name) is used in the error raised when there is no face."""
        faces = self.analyze(image)
        if not faces:
            raise ValueError(
                f"faces: no face found in {name} (detector threshold {self.detector.threshold}); "
                "check that the face is visible and not tiny, or lower FaceAnalyzerConfig.det_threshold"
            )
        return max(faces, key=lambda f: f.area)
