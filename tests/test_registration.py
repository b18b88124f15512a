"""Registration of the edited image's face onto the original's (minid.restore.registration).

The real-photo tests use the dlib backend on scikit-image's astronaut (read where scikit-image
installed it); they skip without dlib. The bound's logic is also tested on hand-made faces.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from minid.faces.analyzer import Face
from minid.imaging.crops import ARCFACE_TEMPLATE, apply_affine, invert_affine, warp
from minid.restore import registration
from minid.restore.registration import MAX_RESIDUAL, register, register_faces

needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None
    or importlib.util.find_spec("face_recognition_models") is None,
    reason="dlib or face_recognition_models is not installed (pip install -e '.[test]')",
)


def _similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)) * scale, math.sin(math.radians(degrees)) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


def _face(kps: np.ndarray, score: float = 0.9) -> Face:
    kps = np.asarray(kps, dtype=np.float64)
    lo, hi = kps.min(0) - 20, kps.max(0) + 20
    return Face(box=np.concatenate([lo, hi]), score=score, kps=kps)


class _Faces:
    """An analyzer that returns given faces per image (keyed by the image's id)."""

    def __init__(self, faces: dict[int, list[Face]]):
        self.faces = faces

    def analyze(self, image):
        return self.faces[id(image)]


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photo")
    return torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255  # (3, 512, 512)


@pytest.fixture(scope="module")
def dlib_analyzer():
    from minid.faces.dlib_backend import DlibFaceAnalyzer

    return DlibFaceAnalyzer(embeddings=False)


def test_an_exact_similarity_of_the_keypoints_registers_with_no_residual():
    kps_o = ARCFACE_TEMPLATE * 3 + [100, 50]
    move = _similarity(0.7, 20, -30, 44)  # original → edited
    found = register(_face(kps_o), _face(apply_affine(kps_o, move)))
    np.testing.assert_allclose(found.affine, invert_affine(move), atol=1e-9)
    assert found.residual_px < 1e-9 and found.backend == "insightface"
    assert found.points == "5 keypoints"
    assert math.isclose(found.scale, 1 / 0.7) and math.isclose(found.rotation_deg, -20)
    json.dumps(found.to_dict())  # summary.json-ready


def test_a_turned_face_is_one_clear_error():
    kps_o = ARCFACE_TEMPLATE * 3
    turned = kps_o.copy()
    eyes = np.linalg.norm(kps_o[1] - kps_o[0])
    turned[2, 0] += 0.35 * eyes  # a head turned ~35°: the nose slides sideways against the eyes
    turned[3:, 0] += 0.15 * eyes
    original, edited = object(), object()
    analyzer = _Faces({id(original): [_face(kps_o)], id(edited): [_face(turned)]})
    with pytest.raises(ValueError) as error:
        register_faces(original, edited, analyzer, names=("o.png", "e.png"))
    text = str(error.value)
    assert "\n" not in text
    for word in ("e.png", "o.png", "--face-mask", "--pairs", "--no-registration-check"):
        assert word in text, (word, text)
    # max_residual=None: measured, not checked
    found = register_faces(original, edited, analyzer, max_residual=None)
    assert found.relative_residual > MAX_RESIDUAL


def test_the_most_confident_face_is_registered():
    kps = ARCFACE_TEMPLATE * 2
    weak_big = _face(ARCFACE_TEMPLATE * 4 + 300, score=0.55)
    chosen = registration.main_face([weak_big, _face(kps, score=0.9)], "x.png")
    np.testing.assert_array_equal(chosen.kps, kps)


@needs_dlib
@pytest.mark.parametrize(
    "scale, degrees, tx, ty, size",
    [(0.8, 12, 60, -20, (420, 600)), (1.3, -8, -120, -30, (500, 380))],
)
def test_registration_recovers_a_similarity_warp_recrop_and_aspect_change(
    astronaut, dlib_analyzer, scale, degrees, tx, ty, size
):
    warp_o_to_e = _similarity(scale, degrees, tx, ty)
    # the edit: the astronaut warped and re-cropped to a canvas of another size and aspect ratio
    edited = warp(astronaut, warp_o_to_e, size, border="replicate")
    found = register_faces(astronaut, edited, dlib_analyzer, names=("astronaut", "warped"))
    assert found.backend == "dlib" and found.points == "dlib's 5 measured points"
    truth = invert_affine(warp_o_to_e)  # edited → original
    # where the edit's face (its box corners and centre) lands in the original, estimated vs truth
    x0, y0, x1, y1 = found.box_edited
    probe = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1], [(x0 + x1) / 2, (y0 + y1) / 2]])
    error = np.linalg.norm(apply_affine(probe, found.affine) - apply_affine(probe, truth), axis=1)
    assert error.max() < 2.0, error  # px; measured ≤ 1.0
    assert found.residual_px < 2.0 and found.relative_residual < MAX_RESIDUAL
    assert abs(found.scale - 1 / scale) < 0.03 and abs(found.rotation_deg + degrees) < 1.5


@needs_dlib
def test_a_picture_without_a_face_is_one_clear_error(astronaut, dlib_analyzer):
    data = pytest.importorskip("skimage.data")
    coffee = data.coffee()  # a cup of coffee: no face
    with pytest.raises(ValueError) as error:
        register_faces(astronaut, coffee, dlib_analyzer, names=("astronaut.png", "coffee.png"))
    text = str(error.value)
    assert "\n" not in text and "coffee.png" in text and "--face-mask" in text
