"""Registration: where the edited image's face lies in the original's pixels, and whether it fits.

EditedID restores a pair that shows the same face in the same place: the original O and the edit E
are inverted and denoised together, their attention mixed position by position. An edit from
another tool is often re-cropped, rescaled, rotated or of another aspect ratio, or shows the face in
another pose; mixing such a pair blends two faces. Registration finds the face of both images,
fits the similarity transform (rotation, uniform scale, translation) E → O that maps the edit's five
keypoints onto the original's (`minid.imaging.crops.estimate_similarity`, least squares), and
measures what it leaves: the landmark residual, the distance in px of the original's pixels between
the original's points and the edit's points mapped by the transform.

A residual of a few px is a detector's noise; a larger one means the faces differ in pose (a
profile against a frontal face), expression, or are not the same face at all, and no similarity
lines them up. Above `MAX_RESIDUAL` (a fraction of the original's eye distance, so that it holds at
every face size) `register_faces` raises one ValueError naming both images and what to do,
before any diffusion model loads.

The points: the five ArcFace keypoints of each face (`Face.kps`), or, when both faces come from
the dlib backend, dlib's five measured points (eye corners and nose base), since two of dlib's
ArcFace keypoints (the mouth corners) are estimated, not measured.

The face of each image: the detector's most confident face (a portrait's face; a large false
detection with a low score does not win).

Coordinates are `minid.imaging.crops`' conventions: pixel-index coordinates for points and affines,
pixel-edge coordinates for boxes, each in the coordinates of its own input image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from minid.faces.analyzer import Face
from minid.imaging.crops import apply_affine, estimate_similarity

# The largest RMS landmark residual accepted, as a fraction of the original's eye distance (the
# distance of its two eye keypoints). A face re-detected after a similarity warp lands within about
# 0.02 (2 px at 100 px between the eyes); a face turned by 30-45° moves its nose by 0.2-0.4 of the
# eye distance against its eyes, which no similarity undoes. 0.1 lies between: 5 px for a face
# with 50 px between the eyes (a 512² portrait's face), 10 px at 100 px.
MAX_RESIDUAL = 0.1

GO_ON_FLAG = "--no-registration-check"


@dataclass
class Registration:
    """The edited image's face registered onto the original's (see the module docstring)."""

    affine: np.ndarray  # (2, 3) edited-image pixels → original-image pixels (index coordinates)
    residual_px: float  # RMS distance of the registered points, in the original's px
    max_residual_px: float  # the largest point distance, px
    eye_distance_px: float  # the original face's eye distance, px (residual_px / this: relative)
    box_original: np.ndarray  # (4,) the original's face box, in the original's pixels
    box_edited: np.ndarray  # (4,) the edited image's face box, in the edited image's pixels
    backend: str  # the face analyzer: "insightface" or "dlib"
    points: str  # which points were registered

    @property
    def relative_residual(self) -> float:
        return self.residual_px / self.eye_distance_px

    @property
    def scale(self) -> float:
        """How many original px one edited px is."""
        return float(math.sqrt(abs(np.linalg.det(self.affine[:, :2]))))

    @property
    def rotation_deg(self) -> float:
        return float(math.degrees(math.atan2(self.affine[1, 0], self.affine[0, 0])))

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready numbers (summary.json's `registration`)."""
        return {
            "affine_edited_to_original": [[float(v) for v in row] for row in self.affine],
            "scale": self.scale,
            "rotation_deg": self.rotation_deg,
            "residual_px": float(self.residual_px),
            "max_residual_px": float(self.max_residual_px),
            "eye_distance_px": float(self.eye_distance_px),
            "relative_residual": float(self.relative_residual),
            "max_relative_residual": MAX_RESIDUAL,
            "box_original": [float(v) for v in self.box_original],
            "box_edited": [float(v) for v in self.box_edited],
            "backend": self.backend,
            "points": self.points,
        }


def backend_name(analyzer: Any) -> str:
    """The analyzer's backend: its `name` (the dlib backend's is "dlib"), else "insightface"."""
    return str(getattr(analyzer, "name", "insightface"))


def main_face(faces: list[Face], name: str) -> Face:
    """The most confident face of a detection; one clear error when there is none."""
    if not faces:
        raise ValueError(
            f"registration: no face found in {name}, so the edit cannot be registered onto the "
            f"original; give --face-mask FILE to restore without face detection, or check that "
            f"the face is visible and not tiny"
        )
    return max(faces, key=lambda f: f.score)


def registration_points(original: Face, edited: Face) -> tuple[np.ndarray, np.ndarray, str]:
    """The two point sets to register and their description (see the module docstring)."""
    parts_o, parts_e = getattr(original, "parts", None), getattr(edited, "parts", None)
    if parts_o is not None and parts_e is not None:
        return np.asarray(parts_o, float), np.asarray(parts_e, float), "dlib's 5 measured points"
    return np.asarray(original.kps, float), np.asarray(edited.kps, float), "5 keypoints"


def register(original: Face, edited: Face, backend: str = "insightface") -> Registration:
    """The similarity edited → original from two detected faces, and its residual."""
    points_o, points_e, which = registration_points(original, edited)
    affine = estimate_similarity(points_e, points_o)
    distances = np.linalg.norm(apply_affine(points_e, affine) - points_o, axis=1)
    eyes = float(np.linalg.norm(np.asarray(original.kps)[1] - np.asarray(original.kps)[0]))
    return Registration(
        affine=affine,
        residual_px=float(np.sqrt((distances**2).mean())),
        max_residual_px=float(distances.max()),
        eye_distance_px=max(eyes, 1e-6),
        box_original=np.asarray(original.box, dtype=np.float64),
        box_edited=np.asarray(edited.box, dtype=np.float64),
        backend=backend,
        points=which,
    )


def check_registration(
    registration: Registration,
    names: tuple[str, str] = ("the original", "the edited image"),
    max_residual: float = MAX_RESIDUAL,
) -> None:
    """Raise one ValueError when the registered faces do not line up (residual above the bound)."""
    if registration.relative_residual <= max_residual:
        return
    raise ValueError(
        f"registration: the face of {names[1]} does not line up with the face of {names[0]}: "
        f"after the best similarity (scale {registration.scale:.2f}, rotation "
        f"{registration.rotation_deg:.1f}°) its landmarks are {registration.residual_px:.1f} px "
        f"apart (RMS, {registration.relative_residual:.2f} of the eye distance; the bound is "
        f"{max_residual:g}): another pose or another face. Give --face-mask FILE for the face "
        f"to restore, --pairs I:J (with --multi-face) to pair other faces, or {GO_ON_FLAG} "
        "to go on anyway"
    )


def register_faces(
    original: Any,
    edited: Any,
    analyzer: Any,
    names: tuple[str, str] = ("the original", "the edited image"),
    max_residual: float | None = MAX_RESIDUAL,
) -> Registration:
    """Detect the face of both images (anything `analyzer.analyze` takes) and register the edit's
    onto the original's: the 2×3 affine edited → original in the pixels of the two inputs, the
    residual, both boxes, the backend. `names` (file names) go into the errors; max_residual: the
    bound checked (`check_registration`), None to check nothing."""
    face_o = main_face(analyzer.analyze(original), names[0])
    face_e = main_face(analyzer.analyze(edited), names[1])
    registration = register(face_o, face_e, backend_name(analyzer))
    if max_residual is not None:
        check_registration(registration, names, max_residual)
    return registration
