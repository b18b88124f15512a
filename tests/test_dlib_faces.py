"""The dlib face backend (minid.faces.dlib_backend) on real photos from installed packages.

The photos are read where their packages installed them, never copied into the repository:
scikit-image's astronaut (Eileen Collins, NASA, public domain) and its LFW subset (100 faces of
25×25 px), insightface's t1.jpg (six people) and Tom_Hanks_54745.png (a 112² ArcFace-aligned
crop). The identity measure is dlib's: the Euclidean distance of 128-d descriptors, below 0.6 the
same person ("dlib distance", not ID-Sim).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from minid.faces import dlib_backend
from minid.faces.dlib_backend import (
    MEAN_FACE_MOUTH,
    MEAN_FACE_NOSE_TIP,
    MEAN_FACE_PARTS,
    SAME_PERSON_DISTANCE,
    keypoints_from_parts,
)
from minid.imaging.crops import ARCFACE_TEMPLATE, apply_affine

Image = pytest.importorskip("PIL.Image")

HAS_DLIB = importlib.util.find_spec("dlib") is not None
HAS_MODELS = importlib.util.find_spec("face_recognition_models") is not None
needs_dlib = pytest.mark.skipif(
    not (HAS_DLIB and HAS_MODELS),
    reason="dlib or face_recognition_models is not installed (pip install -e '.[test]')",
)

# The LFW subset's repeated person: faces 0, 36 and 90 are George W. Bush (identified by eye; LFW
# holds hundreds of his photos). The others among faces 1-39 are other people.
LFW_SAME = (0, 36, 90)
LFW_OTHERS = tuple(i for i in range(1, 40) if i not in LFW_SAME)


def _insightface_image(name: str) -> Path:
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface is not installed: its sample photos are the test images")
    path = Path(spec.submodule_search_locations[0]) / "data" / "images" / name
    if not path.is_file():
        pytest.skip(f"insightface's sample photo {name} is not in this install")
    return path


def _skimage_data():
    return pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")


@pytest.fixture(scope="module")
def analyzer():
    return dlib_backend.DlibFaceAnalyzer()


def _rotation(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def test_keypoints_of_the_mean_face_and_their_equivariance():
    # on dlib's mean face itself, the derived points are the mean face's own
    kps = keypoints_from_parts(MEAN_FACE_PARTS * 100)
    np.testing.assert_allclose(kps[0], (MEAN_FACE_PARTS[2] + MEAN_FACE_PARTS[3]) * 50)
    np.testing.assert_allclose(kps[1], (MEAN_FACE_PARTS[0] + MEAN_FACE_PARTS[1]) * 50)
    np.testing.assert_allclose(kps[2], MEAN_FACE_NOSE_TIP * 100, atol=1e-9)
    np.testing.assert_allclose(kps[3:], MEAN_FACE_MOUTH * 100, atol=1e-9)
    # a similarity of the measured points moves every derived point with it
    move = _rotation(1.7, 0.4, 30.0, -12.0)
    parts = MEAN_FACE_PARTS * 100 + np.random.default_rng(0).normal(0, 2, (5, 2))
    np.testing.assert_allclose(
        keypoints_from_parts(apply_affine(parts, move)),
        apply_affine(keypoints_from_parts(parts), move),
        atol=1e-9,
    )


def test_only_the_permitted_models_are_named():
    source = Path(dlib_backend.__file__).read_text()
    assert "68_face_landmarks" not in source  # the 68-point model's data is non-commercial


@needs_dlib
def test_model_files_are_found_without_importing_the_package():
    folder = dlib_backend.model_folder()
    for name in (
        dlib_backend.SHAPE_MODEL,
        dlib_backend.DESCRIPTOR_MODEL,
        dlib_backend.CNN_DETECTOR_MODEL,
    ):
        assert (folder / name).is_file()


@needs_dlib
def test_keypoints_on_an_arcface_aligned_crop_lie_on_the_template(analyzer):
    crop = Image.open(_insightface_image("Tom_Hanks_54745.png")).convert("RGB")
    assert crop.size == (112, 112)
    faces = analyzer.analyze(crop)
    assert len(faces) == 1
    face = faces[0]
    assert face.landmarks_106 is None and face.embedding.shape == (128,)
    error = np.linalg.norm(face.kps - ARCFACE_TEMPLATE, axis=1)  # px at 112
    # measured: eyes ≈ 2.5-2.9 px, nose tip ≈ 4.8, mouth corners (estimated) ≈ 1.7 and 3.8
    assert error.max() < 6.0, error
    assert error.mean() < 4.0, error


@needs_dlib
def test_astronaut_is_closer_to_her_altered_copies_than_to_other_people(analyzer):
    from PIL import ImageEnhance

    astronaut = Image.fromarray(_skimage_data().astronaut())
    faces = analyzer.analyze(astronaut)
    reference = faces[0]  # best score first
    left_eye, right_eye = reference.kps[0], reference.kps[1]
    assert left_eye[0] < right_eye[0]  # ArcFace order: the image's left eye first
    assert 175 <= reference.box[0] <= 190 and 70 <= reference.box[1] <= 110

    altered = {
        "flipped": astronaut.transpose(Image.FLIP_LEFT_RIGHT),
        "rotated 15°": astronaut.rotate(15, resample=Image.BICUBIC),
        "rescaled to 300 px": astronaut.resize((300, 300), Image.LANCZOS),
        "brightened ×1.4": ImageEnhance.Brightness(astronaut).enhance(1.4),
    }
    same = {}
    for what, image in altered.items():
        found = analyzer.analyze(image)
        assert found, f"no face in the {what} astronaut"
        same[what] = min(
            dlib_backend.dlib_distance(reference.embedding, f.embedding) for f in found
        )
    others = analyzer.analyze(Image.open(_insightface_image("t1.jpg")).convert("RGB"))
    others += analyzer.analyze(Image.open(_insightface_image("Tom_Hanks_54745.png")))
    assert len(others) == 7
    different = [dlib_backend.dlib_distance(reference.embedding, f.embedding) for f in others]
    # measured: same 0.06-0.22, different 0.72-0.83
    assert max(same.values()) < SAME_PERSON_DISTANCE, same
    assert min(different) > SAME_PERSON_DISTANCE, different
    assert max(same.values()) < min(different) - 0.3


@needs_dlib
def test_lfw_subset_repeated_person_is_closer_than_the_others(analyzer):
    lfw = _skimage_data().lfw_subset()  # (200, 25, 25) grey in [0, 1]: 100 faces, 100 non-faces
    side = 150  # dlib's descriptor chip; the 25 px crops are upscaled, each crop is one face
    descriptors = {}
    for index in LFW_SAME + LFW_OTHERS:
        grey = Image.fromarray(np.round(lfw[index] * 255).astype(np.uint8))
        image = grey.resize((side, side), Image.BICUBIC).convert("RGB")
        (face,) = analyzer.faces_in_boxes(image, [(0, 0, side, side)])
        descriptors[index] = face.embedding

    def distance(i: int, j: int) -> float:
        return dlib_backend.dlib_distance(descriptors[i], descriptors[j])

    within = [distance(i, j) for i in LFW_SAME for j in LFW_SAME if i < j]
    between = [distance(i, j) for i in LFW_SAME for j in LFW_OTHERS]
    for i in LFW_SAME:
        nearest = min((j for j in descriptors if j != i), key=lambda j: distance(i, j))
        assert nearest in LFW_SAME, (i, nearest)
    # measured on 25 px faces: within 0.38-0.52 (mean 0.45), between mean ≈ 0.72
    assert np.mean(within) < SAME_PERSON_DISTANCE < np.mean(between)
    assert np.mean(within) < np.mean(between) - 0.15


def test_face_backend_flag_defaults_to_insightface():
    from minid.app.cli import build_parser

    for command in ("restore", "validate", "eval", "calibrate"):
        parser = build_parser(command)
        action = next(
            a
            for a in parser._subparsers._group_actions[0].choices[command]._actions
            if a.dest == "face_backend"
        )
        assert action.default == "insightface" and action.choices == ("insightface", "dlib")


@needs_dlib
def test_face_backend_dlib_gives_geometry_only_and_eval_refuses_it(tmp_path):
    import argparse

    from minid.app import cli

    args = argparse.Namespace(command="restore", face_backend="dlib")
    found = cli._face_analyzer(args)
    assert isinstance(found, dlib_backend.DlibFaceAnalyzer)
    face = found.analyze(_skimage_data().astronaut())[0]
    assert face.kps.shape == (5, 2) and face.embedding is None  # never reported as ID-Sim
    with pytest.raises(ValueError, match="ID-Sim"):
        cli._face_analyzer(argparse.Namespace(command="eval", face_backend="dlib"))
