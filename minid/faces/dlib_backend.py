"""A second face backend: dlib's detector, 5-point shape predictor and ResNet face descriptor.

`DlibFaceAnalyzer.analyze(image)` returns the same `Face` records as
`minid.faces.analyzer.FaceAnalyzer` (boxes, five keypoints in ArcFace order, an embedding), from
models that are independent of insightface's packs, so a result can be checked against a second
opinion, and registration (`minid.restore.registration`) can run without insightface.

The models (dlib's, all trained by Davis King and released with dlib under CC0 / the Boost
licence) come from the `face_recognition_models` package:

- `dlib.get_frontal_face_detector()`: HOG + linear SVM (built into dlib, no file), or
  `mmod_human_face_detector.dat`: dlib's CNN (MMOD) detector, slower on a CPU, finds more poses;
- `shape_predictor_5_face_landmarks.dat`: 5 points per face, the two corners of each eye and the
  base of the nose (not the 68-point model, whose iBUG training data is non-commercial only);
- `dlib_face_recognition_resnet_model_v1.dat`: a 128-d face descriptor (a ResNet-29), whose identity
  measure is the Euclidean distance: below 0.6 is the same person (dlib's threshold, 99.38% on LFW).

The descriptor is not ArcFace and its distance is not ID-Sim (a cosine of ArcFace embeddings): it is
reported as "dlib distance" (`DISTANCE_NAME`), lower is more alike.

Keypoints. dlib's five points are measured; ArcFace's five (eyes, nose tip, mouth corners) are
derived from them:
- eye centres: the mean of each eye's two corners (measured);
- nose tip: the measured nose base moved up the face by the tip-to-base offset of dlib's mean face
  (points 30 and 33 of its 68-point mean shape), scaled and rotated with the face;
- mouth corners: NOT measured by the 5-point model: they are the mean face's mouth corners (points
  48 and 54) mapped into the image by the similarity fitted from the mean face's five points onto
  the measured ones. They follow the face's position, size and roll, not its expression or yaw.
`DlibFace.parts` keeps the five measured points (dlib's order) for code that wants only those.

Conventions are `minid.faces.analyzer`'s: RGB input (a PIL image, a uint8 array (H, W, 3) or a
float tensor (3, H, W) in [0, 1]); points in pixel-index coordinates; boxes (x0, y0, x1, y1) in
pixel-edge coordinates.

dlib (`pip install dlib-bin`, a prebuilt wheel) and the model files (`pip install
face-recognition-models`) are optional: `pip install -e ".[faces]"`. They are imported inside the
functions that need them.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from minid.faces.analyzer import Face, FaceAnalyzerConfig, FoundFaces, as_pixels
from minid.imaging.crops import apply_affine, estimate_similarity

INSTALL_HINT = (
    'install the faces extra: pip install -e ".[faces]" in the minid checkout (or: pip install '
    "dlib-bin face-recognition-models)"
)
BACKEND_NAME = "dlib"
DISTANCE_NAME = "dlib distance"  # Euclidean distance of 128-d dlib descriptors; never "ID-Sim"
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold: a distance below it is the same person
SHAPE_MODEL = "shape_predictor_5_face_landmarks.dat"
CNN_DETECTOR_MODEL = "mmod_human_face_detector.dat"
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"

# dlib's mean face on the unit square (dlib/image_transforms/interpolation.h,
# get_face_chip_details): the five points of the 5-point model in its order, the outer and inner
# corner of the image-right eye, the outer and inner corner of the image-left eye, the nose base.
MEAN_FACE_PARTS = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)
# Points of the same mean face (its 68-point mean shape, the same source): nose tip (30), left and
# right mouth corner (48, 54). Numbers only: no part of the 68-point model is used.
MEAN_FACE_NOSE_TIP = np.array([0.490127, 0.515625])
MEAN_FACE_MOUTH = np.array([[0.254149, 0.780233], [0.726104, 0.780233]])


def _import_dlib():
    try:
        import dlib
    except ImportError:
        raise ImportError(
            f"the dlib face backend needs dlib, which is not installed; {INSTALL_HINT}"
        ) from None
    return dlib


def model_folder() -> Path:
    """The folder of face_recognition_models' .dat files, found without importing the package.

    (`import face_recognition_models` fails on current setuptools: it imports pkg_resources.)
    """
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "models"
        if (folder / SHAPE_MODEL).is_file():
            return folder
    raise FileNotFoundError(
        f"the dlib face backend needs dlib's model files ({SHAPE_MODEL}, {DESCRIPTOR_MODEL}), "
        f"which come with the face_recognition_models package; {INSTALL_HINT}"
    )


@dataclass
class DlibFace(Face):
    """A `Face` from dlib; `embedding` is the 128-d descriptor (compare with `dlib_distance`)."""

    parts: np.ndarray | None = None  # (5, 2) dlib's measured points, in its order (see above)


def keypoints_from_parts(parts: np.ndarray) -> np.ndarray:
    """dlib's five measured points → the five ArcFace keypoints (left eye, right eye, nose tip, left
    and right mouth corner, "left" the image's left); see the module docstring for how each is
    derived."""
    parts = np.asarray(parts, dtype=np.float64)
    if parts.shape != (5, 2):
        raise ValueError(f"dlib_backend: expected dlib's 5 points (5, 2), found {parts.shape}")
    to_image = estimate_similarity(MEAN_FACE_PARTS, parts)  # mean face → this face
    left_eye = (parts[2] + parts[3]) / 2
    right_eye = (parts[0] + parts[1]) / 2
    nose_tip = parts[4] + to_image[:, :2] @ (MEAN_FACE_NOSE_TIP - MEAN_FACE_PARTS[4])
    mouth = apply_affine(MEAN_FACE_MOUTH, to_image)
    return np.stack([left_eye, right_eye, nose_tip, mouth[0], mouth[1]])


def dlib_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Euclidean distance of two 128-d dlib descriptors (below `SAME_PERSON_DISTANCE`: the same
    person)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != (128,) or b.shape != (128,):
        raise ValueError(
            f"dlib_distance: expected two 128-d dlib descriptors, found {a.shape} and {b.shape}"
        )
    return float(np.linalg.norm(a - b))


def _score(margin: float) -> float:
    """A detector's margin (HOG: SVM score; CNN: MMOD confidence) squashed into [0, 1] by a
    logistic: `Face.score`'s range, the order of the faces kept."""
    return 1.0 / (1.0 + math.exp(-float(margin)))


class DlibFaceAnalyzer:
    """Detection, dlib's 5 points and 128-d descriptors, with `FaceAnalyzer.analyze`'s interface.

    detector: "hog" (fast, frontal faces) or "cnn" (the MMOD CNN: more poses, seconds per image on
    a CPU). upsample: how many times the detector doubles the image first (finds faces down to
    about 80 / 2^upsample px). embeddings: compute the descriptors (False: boxes and keypoints
    only). num_jitters: dlib's test-time augmentation of the descriptor (0: none). max_faces: the
    best-scored faces kept per image; points and descriptors are computed for these only (None:
    all).
    """

    name = BACKEND_NAME
    distance_name = DISTANCE_NAME

    def __init__(
        self,
        detector: Literal["hog", "cnn"] = "hog",
        upsample: int = 1,
        embeddings: bool = True,
        num_jitters: int = 0,
        folder: str | Path | None = None,
        max_faces: int | None = FaceAnalyzerConfig.max_faces,
    ):
        if max_faces is not None and max_faces < 1:
            raise ValueError(
                f"dlib_backend: max_faces must be at least 1 or None, found {max_faces}"
            )
        self.max_faces = max_faces
        dlib = _import_dlib()
        folder = Path(folder) if folder is not None else model_folder()
        if detector == "hog":
            self._detector = dlib.get_frontal_face_detector()
        elif detector == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(str(folder / CNN_DETECTOR_MODEL))
        else:
            raise ValueError(f"dlib_backend: detector must be 'hog' or 'cnn', found {detector!r}")
        self.detector_kind, self.upsample, self.num_jitters = detector, int(upsample), num_jitters
        self._shape = dlib.shape_predictor(str(folder / SHAPE_MODEL))
        self._descriptor = (
            dlib.face_recognition_model_v1(str(folder / DESCRIPTOR_MODEL)) if embeddings else None
        )
        self._dlib = dlib

    @staticmethod
    def _array(image: Any) -> np.ndarray:
        pixels = as_pixels(image).round().clamp(0, 255).to(torch.uint8)
        return np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())

    def _detect(self, array: np.ndarray) -> list[tuple[Any, float]]:
        if self.detector_kind == "cnn":
            return [(d.rect, d.confidence) for d in self._detector(array, self.upsample)]
        rects, margins, _ = self._detector.run(array, self.upsample, 0.0)
        return list(zip(rects, margins))

    def _face(self, array: np.ndarray, rect: Any, score: float) -> DlibFace:
        shape = self._shape(array, rect)
        parts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        embedding = None
        if self._descriptor is not None:
            embedding = np.array(
                self._descriptor.compute_face_descriptor(array, shape, self.num_jitters),
                dtype=np.float64,
            )
        # dlib's rectangles include their right and bottom pixel: +1 gives pixel-edge coordinates
        box = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], float)
        return DlibFace(
            box=box,
            score=score,
            kps=keypoints_from_parts(parts),
            landmarks_106=None,
            embedding=embedding,
            parts=parts,
        )

    def analyze(self, image: Any) -> FoundFaces:
        """The faces in the image, best detector score first, at most `max_faces` of them (an empty
        list when there is none); `.detected` on the result counts them before the cap."""
        array = self._array(image)
        found = sorted(self._detect(array), key=lambda rm: -float(rm[1]))
        kept = found if self.max_faces is None else found[: self.max_faces]
        faces = [self._face(array, rect, _score(margin)) for rect, margin in kept]
        return FoundFaces(faces, detected=len(found))

    def faces_in_boxes(self, image: Any, boxes: Sequence[Sequence[float]]) -> list[Face]:
        """The points and descriptors of faces whose boxes are known (no detection): e.g. a whole
        image that is one face crop. Boxes in pixel-edge coordinates; score 1."""
        array = self._array(image)
        out = []
        for x0, y0, x1, y1 in boxes:
            rect = self._dlib.rectangle(
                int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1
            )
            out.append(self._face(array, rect, 1.0))
        return out

    def largest_face(self, image: Any, name: str = "the image") -> Face:
        """The largest face; `name` (a file name) is used in the error raised when there is no
        face."""
        faces = self.analyze(image)
        if not faces:
            raise ValueError(
                f"faces: no face found in {name} by dlib's {self.detector_kind} detector; check "
                "that the face is visible, frontal and not tiny (--face-backend insightface finds "
                "more poses)"
            )
        return max(faces, key=lambda f: f.area)
