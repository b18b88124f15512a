"""Faces: detection, landmarks and ArcFace embeddings (insightface's model packs).

EditedID needs faces for three things: ArcFace embeddings to measure identity (the paper's ID-Sim),
landmarks for face masks, and square crops around each face for multi-person images (paper A.16):
detect the faces of both images, pair them by position, crop a square patch around each pair,
restore the patches, paste them back with a feathered mask. This module finds the faces; the
geometry around them (alignment, crops, paste-back) and the pairing are in `minid.imaging.crops`.

The networks are insightface's ONNX model packs (default "buffalo_l"): a SCRFD detector
(det_10g.onnx), a 106-point landmark regressor (2d106det.onnx) and an ArcFace recogniser
(w600k_r50.onnx). The code around the ONNX sessions is minid's own and mirrors insightface's
FaceAnalysis step for step, so a real pack and the tiny ONNX graphs the tests build go through the
same lines:

    image (RGB) ─ letterbox resize to det_size, (x − 127.5)/128 ─ SCRFD ─ decode anchors ─ NMS ─
    boxes, 5 kps
        ├─ square crop of 1.5 × box side, 192² ─ landmark net ─ 106 points
        └─ 5-point similarity to the ArcFace template, 112² ─ ArcFace (batched) ─ L2-normalised
        512-d embedding

Conventions:
- Images are RGB. The analyzer takes a PIL image, a uint8 array (H, W, 3) or a float tensor (3, H,
  W) in [0, 1].
- Points (a Face's kps and landmarks) are float64 numpy arrays in pixel-index coordinates (pixel (i,
  j) is the point x = j, y = i), the convention of cv2.warpAffine and of insightface's keypoints.
  Boxes are (x0, y0, x1, y1) in pixel-edge coordinates (the box (0, 0, W, H) is the whole image).
  See `minid.imaging.crops`.

onnxruntime (and onnx, to read the input normalisation of a pack's models) are an optional extra:
`pip install minid[faces]`. They are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from minid.imaging.crops import align_face, apply_affine, box_iou, invert_affine, warp

INSTALL_HINT = (
    'install the faces extra: pip install -e ".[faces]" in the minid checkout (or: pip install '
    "insightface "
    "onnx onnxruntime, onnxruntime-gpu on a CUDA machine)"
)
ROOT_ENV = "MINID_INSIGHTFACE_ROOT"


# --------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class FaceAnalyzerConfig:
    pack: str = "buffalo_l"  # insightface model pack: a folder <root>/models/<pack> of .onnx files
    # folder holding models/<pack>; None: $MINID_INSIGHTFACE_ROOT, else ~/.insightface
    root: str | None = None
    det_size: int = 640  # side of the square detector input; the image is letterboxed into it
    det_threshold: float = 0.5  # minimum detector score of a face (insightface's default)
    nms_threshold: float = 0.4  # boxes overlapping a better one by more IoU than this are dropped
    max_batch: int = 32  # crops per ONNX run for the landmark and ArcFace networks
    # the best-scored faces kept per image; landmarks and ArcFace run on these only (None: all)
    max_faces: int | None = 64
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


# --------------------------------------------------------------------------------------------------
# ONNX plumbing: providers, the model pack, running sessions in batches


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            f"minid.faces.analyzer needs onnxruntime, which is not installed; {INSTALL_HINT}"
        ) from None
    return onnxruntime


def choose_providers(available: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime execution providers: CUDA first when this onnxruntime build offers it, then CPU.

    `available` defaults to `onnxruntime.get_available_providers()` (onnxruntime-gpu lists CUDA; the
    CPU wheel does not). CPU is always last so every model runs even where a CUDA kernel is missing.
    """
    if available is None:
        available = _import_onnxruntime().get_available_providers()
        # a GPU build of onnxruntime lists CUDA even where there is no GPU, then logs an error at
        # every session and falls back: offer CUDA only where PyTorch sees a GPU too
        if not torch.cuda.is_available():
            available = [p for p in available if p != "CUDAExecutionProvider"]
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + [
        "CPUExecutionProvider"
    ]


def model_root(root: str | os.PathLike | None = None) -> Path:
    """Where model packs live: `root`, else $MINID_INSIGHTFACE_ROOT, else ~/.insightface
    (insightface's own)."""
    if root is None:
        root = os.environ.get(ROOT_ENV) or "~/.insightface"
    return Path(root).expanduser()


def find_model_pack(
    pack: str = "buffalo_l", root: str | os.PathLike | None = None, download: bool = False
) -> Path:
    """The folder <root>/models/<pack> with the pack's .onnx files; a folder path for `pack` is used
    as is."""
    direct = Path(pack).expanduser()
    folder = direct if direct.is_dir() else model_root(root) / "models" / pack
    if not any(folder.glob("*.onnx")) and download:
        try:
            from insightface.utils.storage import ensure_available
        except ImportError:
            raise ImportError(
                f"downloading a model pack needs insightface; {INSTALL_HINT}"
            ) from None
        try:
            ensure_available("models", pack, root=str(model_root(root)))
        except Exception as e:  # network errors come from requests and urllib, with pages of detail
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise ConnectionError(
                f"downloading the insightface model pack {pack!r} failed ({type(e).__name__}: "
                f"{first}); check the network, or unzip {pack}.zip from insightface's model-zoo "
                f"release into {folder} yourself"
            ) from None
    if not any(folder.glob("*.onnx")):
        raise FileNotFoundError(
            f"no .onnx files for the insightface model pack {pack!r} in {folder}. Get the pack "
            f"with "
            f"--download-faces (Python: FaceAnalyzer.from_pack({pack!r}, download=True)), or unzip "
            f"{pack}.zip "
            f"into {folder} yourself (--face-root or ${ROOT_ENV} for another folder)"
        )
    return folder


def input_normalisation(
    model_path: str | os.PathLike, default: tuple[float, float]
) -> tuple[float, float]:
    """(mean, std) the model expects its 0-255 input normalised with.

    Models converted from MXNet carry the normalisation in the graph (their first nodes are named
    Sub…/Mul… or _minus…/_mul…, or bn_data): they take raw pixels, mean 0 and std 1. Others take (x
    − mean)/std with the network's default. This is insightface's rule, read from the graph's first
    8 nodes.
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
    """Run a single-input session over the first axis of `blob` in chunks; outputs concatenated per
    output."""
    spec = session.get_inputs()[0]
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    step = fixed or max(1, max_batch)
    names = [o.name for o in session.get_outputs()]
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(blob), step):
        chunks.append(
            session.run(
                names,
                {spec.name: np.ascontiguousarray(blob[start : start + step], dtype=np.float32)},
            )
        )
    return [np.concatenate([c[k] for c in chunks], axis=0) for k in range(len(names))]


def as_pixels(image: Any) -> torch.Tensor:
    """An RGB image as a float32 tensor (3, H, W) with values 0-255.

    Takes a PIL image, a uint8 array (H, W, 3) / (H, W) / (H, W, 4) or a float tensor (3, H, W) in
    [0, 1].
    """
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"faces: expected an image tensor (3, H, W) in [0, 1], found shape "
                f"{tuple(image.shape)}"
            )
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
        raise ValueError(
            f"faces: expected an RGB image (H, W, 3), found an array of shape {array.shape}"
        )
    return torch.from_numpy(np.array(array[:, :, :3])).permute(2, 0, 1).float()  # a writable copy


# --------------------------------------------------------------------------------------------------
# The three networks


def distance_to_boxes(centers: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """SCRFD box decoding: distances (left, top, right, bottom) from each anchor centre → (x0, y0,
    x1, y1)."""
    return np.concatenate([centers - distances[:, 0:2], centers + distances[:, 2:4]], axis=1)


def distance_to_points(centers: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """SCRFD keypoint decoding: (K, 2P) offsets from each anchor centre → (K, P, 2) points."""
    return centers[:, None, :] + offsets.reshape(len(offsets), offsets.shape[1] // 2, 2)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first (ties keep the earlier
    box).

    Each kept box removes, in one array operation, every remaining box that overlaps it by more
    IoU than the threshold: O(kept · N) arithmetic and `kept` Python steps, so a detector firing
    on thousands of anchors costs milliseconds, not minutes.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    keep: list[int] = []
    while len(order):
        best, order = order[0], order[1:]
        keep.append(int(best))
        if len(order):
            order = order[box_iou(boxes[best], boxes[order])[0] <= iou_threshold]
    return keep


class FoundFaces(list):
    """The faces of an image, best detector score first, at most a cap of them: `detected` is how
    many the detector found before the cap (equal to len() when nothing was dropped)."""

    def __init__(self, faces=(), detected: int | None = None):
        super().__init__(faces)
        self.detected = len(self) if detected is None else int(detected)

    @property
    def dropped(self) -> int:
        """How many detected faces the cap left out."""
        return self.detected - len(self)


class SCRFD:
    """The SCRFD face detector of insightface's packs around an onnxruntime session.

    Outputs come in groups of F feature levels (strides 8, 16, 32 with 2 anchors per cell, or
    strides 8…128 with 1): F score maps (K, 1), F box-distance maps (K, 4) and, in the 9/15-output
    variants, F keypoint maps (K, 10), where K = (H/stride)·(W/stride)·anchors, cells in row-major
    order, anchors of a cell adjacent. Distances are in units of the stride and measured from the
    cell's top-left corner (x·stride, y·stride).
    """

    mean, std = 127.5, 128.0  # the detector's input normalisation, (x − 127.5)/128

    def __init__(
        self, session: Any, det_size: int = 640, threshold: float = 0.5, nms_threshold: float = 0.4
    ):
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
            raise ValueError(
                f"faces.SCRFD: a SCRFD detector has 6, 9, 10 or 15 outputs, this model has {n_out}"
            )
        self.use_kps = n_out in (9, 15)

    def preprocess(self, pixels: torch.Tensor) -> tuple[np.ndarray, float]:
        """Letterbox: resize keeping the aspect ratio so the image fits det_size², pad right/bottom
        with 0."""
        height, width = pixels.shape[-2:]
        side = self.det_size
        im_ratio = height / width
        if im_ratio > 1.0:
            new_h, new_w = side, int(side / im_ratio)
        else:
            new_w, new_h = side, int(side * im_ratio)
        det_scale = new_h / height
        resized = F.interpolate(
            pixels[None], size=(new_h, new_w), mode="bilinear", align_corners=False
        )
        canvas = torch.zeros(1, 3, side, side)
        canvas[:, :, :new_h, :new_w] = resized
        return ((canvas - self.mean) / self.std).numpy(), det_scale

    def decode(
        self, outputs: list[np.ndarray], input_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw outputs → (boxes (K, 4), scores (K,), kps (K, 5, 2)) above the threshold, in input
        coordinates."""
        levels = len(self.strides)
        boxes, scores, kps = [], [], []
        for level, stride in enumerate(self.strides):
            score = outputs[level].reshape(-1)  # batched graphs add a leading 1
            dist = outputs[level + levels].reshape(-1, 4) * stride
            grid_h, grid_w = input_hw[0] // stride, input_hw[1] // stride
            ys, xs = np.mgrid[:grid_h, :grid_w]
            # (cells, 2)
            centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float64) * stride
            # (K, 2): the anchors of a cell share a centre
            centers = np.repeat(centers, self.anchors, axis=0)
            if len(score) != len(centers):
                raise ValueError(
                    f"faces.SCRFD: stride {stride} output has {len(score)} scores, expected "
                    f"{len(centers)} "
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
        """Faces in an image (3, H, W) 0-255 → (boxes (N, 4), scores (N,), kps (N, 5, 2)), best
        first."""
        blob, det_scale = self.preprocess(pixels)
        spec = self.session.get_inputs()[0]
        outputs = self.session.run([o.name for o in self.session.get_outputs()], {spec.name: blob})
        boxes, scores, kps = self.decode(outputs, blob.shape[-2:])
        keep = nms(boxes, scores, self.nms_threshold)
        return boxes[keep] / det_scale, scores[keep], kps[keep] / det_scale


class Landmark106:
    """The 2d106det landmark network: a 192² crop of 1.5 × the box side around the box centre → 106
    points.

    The network predicts points in [−1, 1] crop coordinates; (p + 1)·96 gives crop pixels.
    """

    def __init__(self, session: Any, mean: float = 0.0, std: float = 1.0, max_batch: int = 32):
        self.session, self.mean, self.std, self.max_batch = session, mean, std, max_batch
        self.size = int(session.get_inputs()[0].shape[-1])

    def crop_affine(self, box: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = (float(v) for v in box)
        s = self.size / (max(x1 - x0, y1 - y0) * 1.5)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return np.array(
            [[s, 0, self.size / 2 - s * cx], [0, s, self.size / 2 - s * cy]], dtype=np.float64
        )

    def predict(self, pixels: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        """(N, 106, 2) landmarks in image coordinates for N boxes."""
        if len(boxes) == 0:
            return np.zeros((0, 106, 2))
        affines = [self.crop_affine(b) for b in boxes]
        crops = torch.stack([warp(pixels, a, self.size) for a in affines])  # (N, 3, 192, 192)
        pred = _run_batched(self.session, ((crops - self.mean) / self.std).numpy(), self.max_batch)[
            0
        ]
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
        feats = _run_batched(
            self.session, ((crops - self.mean) / self.std).numpy(), self.max_batch
        )[0]
        feats = feats.reshape(len(crops), -1).astype(np.float64)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        return feats / np.where(norms > 0, norms, 1.0)

    def embed(self, pixels: torch.Tensor, kps: Sequence[np.ndarray]) -> np.ndarray:
        if len(kps) == 0:
            return np.zeros((0, 512))
        crops = torch.stack([align_face(pixels, k, self.size)[0] for k in kps])
        return self.embed_crops(crops)


def _identify(session: Any) -> str | None:
    """Which network of a pack a session is, from its input and output shapes (insightface's
    routing)."""
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
    """Detection, 106-point landmarks and ArcFace embeddings: insightface's FaceAnalysis, in minid's
    code.

    Build it from a model pack with `FaceAnalyzer.from_pack()`, or from the three networks directly
    (the tests pass tiny ONNX graphs). `analyze(image)` returns every face, best detector score
    first.
    """

    def __init__(
        self,
        detector: SCRFD,
        arcface: ArcFace | None = None,
        landmark: Landmark106 | None = None,
        max_faces: int | None = FaceAnalyzerConfig.max_faces,
    ):
        if max_faces is not None and max_faces < 1:
            raise ValueError(f"faces: max_faces must be at least 1 or None, found {max_faces}")
        self.detector, self.arcface, self.landmark = detector, arcface, landmark
        self.max_faces = max_faces

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
        folder = find_model_pack(
            pack or config.pack, root if root is not None else config.root, download
        )
        providers = list(providers) if providers is not None else choose_providers()
        found: dict[str, tuple[Any, Path]] = {}
        options = ort.SessionOptions()
        # errors only: no provider fallback chatter for providers not asked for
        options.log_severity_level = 3
        for path in sorted(folder.glob("*.onnx")):
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            role = _identify(session)
            if role is not None and role not in found:
                found[role] = (session, path)
        if "detector" not in found:
            raise FileNotFoundError(
                f"faces: no SCRFD detector (a model with 6-15 outputs) among the .onnx files in "
                f"{folder}"
            )
        detector = SCRFD(
            found["detector"][0], config.det_size, config.det_threshold, config.nms_threshold
        )
        arcface = landmark = None
        if config.embeddings:
            if "arcface" not in found:
                raise FileNotFoundError(
                    f"faces: no ArcFace model (112² input, 512 outputs) among the .onnx files in "
                    f"{folder}"
                )
            session, path = found["arcface"]
            arcface = ArcFace(
                session, *input_normalisation(path, (127.5, 127.5)), max_batch=config.max_batch
            )
        if config.landmarks and "landmark_106" in found:
            session, path = found["landmark_106"]
            landmark = Landmark106(
                session, *input_normalisation(path, (127.5, 128.0)), max_batch=config.max_batch
            )
        return cls(detector, arcface, landmark, max_faces=config.max_faces)

    def analyze(self, image: Any) -> FoundFaces:
        """The faces in the image, best detector score first, at most `max_faces` of them (an empty
        list when there is none); `.detected` on the result counts them before the cap."""
        pixels = as_pixels(image)
        boxes, scores, kps = self.detector.detect(pixels)
        detected = len(boxes)
        if self.max_faces is not None:
            boxes, scores, kps = (a[: self.max_faces] for a in (boxes, scores, kps))
        landmarks = self.landmark.predict(pixels, boxes) if self.landmark is not None else None
        embeddings = self.arcface.embed(pixels, list(kps)) if self.arcface is not None else None
        faces = [
            Face(
                box=boxes[i].astype(np.float64),
                score=float(scores[i]),
                kps=kps[i].astype(np.float64),
                landmarks_106=None if landmarks is None else landmarks[i],
                embedding=None if embeddings is None else embeddings[i],
            )
            for i in range(len(boxes))
        ]
        return FoundFaces(faces, detected=detected)

    def largest_face(self, image: Any, name: str = "the image") -> Face:
        """The largest face; `name` (a file name) is used in the error raised when there is no
        face."""
        faces = self.analyze(image)
        if not faces:
            raise ValueError(
                f"faces: no face found in {name} (detector threshold {self.detector.threshold}); "
                "check that the face is visible and not tiny, or lower "
                "FaceAnalyzerConfig.det_threshold"
            )
        return max(faces, key=lambda f: f.area)
