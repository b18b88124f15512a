"""The face-patch path (minid.restore.multiface): registration of a re-framed edit, one patch per
face for 1..K faces, pictures read and written by region only, EXIF turns, and the memory check.

The restores run on the tiny random stack with the stub analyzer of test_multiface (faces known in
advance); the multi-person pairing runs dlib on insightface's t1.jpg (six people) and a warped,
re-cropped copy of it, read where insightface installed it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_inputs import _bomb
from test_multiface import P_E, P_O, StubAnalyzer, fast, make_face, smooth_image
from tiny_models import IMAGE_SIZE

from minid.app import cli
from minid.faces import analyzer as faces
from minid.imaging import crops, images
from minid.imaging.images import tensor_to_pil
from minid.loading import checkpoint, files
from minid.restore.config import RestoreConfig
from minid.restore.multiface import map_face, plan_faces, restore_faces
from minid.restore.pipeline import EditedID

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--device", "cpu", "--dtype", "fp32", "--seed", "0"]
FAST = ["--steps", "2", "--dpm-start", "2", "--dpm-end", "2", "--null-inner-steps", "1"]


def _similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)) * scale, math.sin(math.radians(degrees)) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


# the original: 96×160 with one face; the edit: it rescaled, turned and re-framed on a 120×140
# canvas, as a multimodal editor returns it
WARP = _similarity(1.2, 6.0, -30.0, 10.0)  # original px → edited px
EDIT_SIZE = (120, 140)  # (h, w)
FACE = (70.0, 48.0, 30.0)  # centre x, y and side of the original's face


def _pair():
    x_o = smooth_image(5)
    x_e = crops.warp(x_o[0], WARP, EDIT_SIZE, border="replicate")[None]
    face_o = make_face(*FACE)
    face_e = map_face(face_o, WARP)
    return x_o, x_e, face_o, face_e


# ----------------------------------------------------------------------------------------------
# Pictures by region


def test_warp_and_paste_on_the_footprint_equal_the_whole_image():
    x = smooth_image(3, 90, 130)
    affine = crops.square_affine(20.5, 10.25, 50.0, 40) @ np.array(
        [[1.0, 0.1, 0], [-0.1, 1.0, 0], [0, 0, 1]]
    )
    assert torch.allclose(
        images.warp_picture(x, affine, 40),
        crops.warp(x, affine, 40, border="replicate"),
        atol=1e-6,
    )
    pil = tensor_to_pil(x)
    as_float = images.pil_to_tensor(pil)
    assert torch.allclose(
        images.warp_picture(pil, affine, 40),
        crops.warp(as_float, affine, 40, border="replicate"),
        atol=1e-6,
    )
    patch = smooth_image(4, 40, 40)[0]
    mask = crops.border_ramp(40, 4.0)
    whole = crops.paste_back(x[0], patch, affine, mask=mask)
    for rows in (7, 256):
        banded = images.paste_into_picture(x, patch, affine, mask, rows=rows)
        assert torch.allclose(banded[0], whole, atol=1e-6), f"rows={rows}"
    # 8-bit: the paste of the 8-bit picture, rounded; untouched pixels keep their bytes
    got = np.asarray(images.paste_into_picture(pil, patch, affine, mask, rows=16)).astype(int)
    want = np.asarray(tensor_to_pil(crops.paste_back(as_float[0], patch, affine, mask=mask)))
    assert np.abs(got - want).max() <= 1
    untouched = crops.paste_back(torch.zeros(1, 90, 130), torch.ones(1, 40, 40), affine, mask)
    same = (untouched[0] == 0).numpy()
    assert (got[same] == np.asarray(pil)[same]).all(), "a pixel outside the paste changed"


def test_a_large_face_is_shrunk_with_a_filter_not_aliased():
    """A face 3× the patch: its 1-px stripes average to near grey, as a filtered resize gives; a
    bare bilinear warp lands on every third stripe and keeps their full contrast (moiré)."""
    stripes = torch.ones(1, 3, 150, 150)
    stripes[..., :, 1::2] = -1
    affine = crops.square_affine(0.0, 0.0, 150.0, 50)
    filtered = images.warp_picture(stripes, affine, 50)
    aliased = crops.warp(stripes, affine, 50, border="replicate")
    assert float(filtered[..., 2:-2, 2:-2].abs().max()) < 0.12  # measured 0.11
    assert float(aliased.abs().mean()) > 0.99
    # an 8-bit picture is shrunk in 8 bits by PIL's filter, to the same grey
    from_pil = images.warp_picture(tensor_to_pil(stripes), affine, 50)
    assert float(from_pil[..., 2:-2, 2:-2].abs().max()) < 0.12


# ----------------------------------------------------------------------------------------------
# Registration and the patch


def test_a_reframed_edit_is_registered_and_only_its_face_region_changes(tiny_sd):
    x_o, x_e, face_o, face_e = _pair()
    pipe = EditedID(tiny_sd, fast())
    stub = StubAnalyzer([(x_o, [face_o]), (x_e, [face_e])])
    result = restore_faces(
        pipe, x_o, x_e, stub, P_O, P_E, ["man"], ["glasses"], faces="main", progress=False
    )
    (face,) = result.faces
    truth = crops.invert_affine(WARP)  # edited → original
    assert np.abs(face.registration.affine - truth).max() < 1e-6, face.registration.affine
    assert face.registration.residual_px < 1e-6
    # one frame: O's face and E's face land on the same patch points
    affine_o = crops.compose_affine(face.affine, WARP)
    assert np.allclose(
        crops.apply_affine(face_o.kps, affine_o), crops.apply_affine(face_e.kps, face.affine)
    )
    assert result.image.shape == x_e.shape, "the result has the edited image's size"
    x0, y0, x1, y1 = face.box_edited
    keep = torch.ones(EDIT_SIZE, dtype=torch.bool)
    keep[max(int(y0) - 1, 0) : int(math.ceil(y1)) + 1, max(int(x0) - 1, 0) : int(x1) + 2] = False
    assert torch.equal(result.image[..., keep], x_e[..., keep]), "a pixel outside the patch moved"
    changed = (result.image != x_e).any(1)[0]
    assert bool(changed.any()) and not bool(changed[keep].any())
    # the face mask is the original's landmark hull in the shared frame
    assert float(face.result.masks["face"].mean()) > 0.05
    assert face.result.registration == face.registration.to_dict()


def _restore_argv(tmp_path, tiny_hub, x_o, x_e, *extra):
    original = tmp_path / "o.png"
    edited = tmp_path / "e.png"
    tensor_to_pil(x_o).save(original)
    tensor_to_pil(x_e).save(edited)
    return [
        "restore",
        "--original", str(original),
        "--edited", str(edited),
        "--prompt-original", P_O,
        "--prompt-edited", P_E,
        "--id-words", "man",
        "--element-words", "glasses",
        "--out", str(tmp_path / "r.png"),
        "--weights", str(tiny_hub),
        "--image-size", str(IMAGE_SIZE),
        *FAST, *COMMON, *map(str, extra),
    ]  # fmt: skip


def test_restore_records_the_registration_and_keeps_the_edit_outside_the_patch(
    tiny_hub, tmp_path, monkeypatch, capsys
):
    x_o, x_e, face_o, face_e = _pair()
    stub = StubAnalyzer([(x_o, [face_o]), (x_e, [face_e])])
    monkeypatch.setattr(faces.FaceAnalyzer, "from_pack", classmethod(lambda cls, *a, **k: stub))
    argv = _restore_argv(tmp_path, tiny_hub, x_o, x_e, "--save-intermediates", tmp_path / "run")
    assert cli.main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "registered" in err and "scale 0.833" in err, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    recorded = summary["registration"]
    assert (
        np.abs(np.array(recorded["affine_edited_to_original"]) - crops.invert_affine(WARP)).max()
        < 0.02
    )
    assert recorded["backend"] == "insightface" and recorded["residual_px"] < 0.5
    assert len(recorded["box_original"]) == 4 and len(recorded["box_edited"]) == 4
    out = np.asarray(Image.open(tmp_path / "r.png"))
    edited = np.asarray(Image.open(tmp_path / "e.png"))
    assert out.shape == edited.shape
    x0, y0, x1, y1 = map_face(face_e, np.eye(2, 3)).box  # the face, in the edit
    far = np.ones(EDIT_SIZE, dtype=bool)
    far[max(int(y0) - 30, 0) : int(y1) + 30, max(int(x0) - 30, 0) : int(x1) + 30] = False
    assert (out[far] == edited[far]).all(), "pixels far from the face changed"


def test_a_face_that_does_not_line_up_stops_before_the_models_load(
    tiny_hub, tmp_path, monkeypatch, capsys
):
    x_o, x_e, face_o, face_e = _pair()
    turned = map_face(face_e, np.eye(2, 3))
    turned.kps = turned.kps.copy()
    turned.kps[2, 0] += 9.0  # the nose moves against the eyes: another pose
    stub = StubAnalyzer([(x_o, [face_o]), (x_e, [turned])])
    monkeypatch.setattr(faces.FaceAnalyzer, "from_pack", classmethod(lambda cls, *a, **k: stub))
    loaded = []
    real = checkpoint.load_stable_diffusion
    monkeypatch.setattr(
        checkpoint, "load_stable_diffusion", lambda *a, **k: (loaded.append(1), real(*a, **k))[1]
    )
    argv = _restore_argv(tmp_path, tiny_hub, x_o, x_e)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not line up" in err and "--no-registration-check" in err
    assert "e.png" in err and not loaded and not (tmp_path / "r.png").exists()
    assert cli.main(argv + ["--no-registration-check"]) == 0, capsys.readouterr().err
    assert loaded and (tmp_path / "r.png").is_file()


# ----------------------------------------------------------------------------------------------
# Several faces of a real photo, re-framed


needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None
    or importlib.util.find_spec("face_recognition_models") is None,
    reason="dlib or face_recognition_models is not installed (pip install -e '.[test]')",
)


@needs_dlib
def test_multi_face_pairs_the_six_faces_of_t1_with_a_reframed_copy(tiny_sd):
    from test_dlib_faces import _insightface_image

    from minid.faces.dlib_backend import DlibFaceAnalyzer

    photo = Image.open(_insightface_image("t1.jpg")).convert("RGB")
    x_o = images.pil_to_tensor(photo)
    warp_o_to_e = _similarity(0.9, -4.0, -40.0, 25.0)
    size = (int(photo.height * 0.8), int(photo.width * 0.95))  # another aspect ratio, cropped
    x_e = crops.warp(x_o[0], warp_o_to_e, size, border="replicate")[None]
    analyzer = DlibFaceAnalyzer(embeddings=False)
    config = RestoreConfig(fast().method, image_size=IMAGE_SIZE)
    plan = plan_faces(x_o, x_e, analyzer, config, tiny_sd.tokenizer, P_O, P_E, ["man"], ["glasses"])
    centres_o = [(f.box[:2] + f.box[2:]) / 2 for f in plan.faces_original]
    centres_e = [(f.box[:2] + f.box[2:]) / 2 for f in plan.faces_edited]
    inside = [
        i
        for i, c in enumerate(centres_o)
        if 0 < crops.apply_affine(c[None], warp_o_to_e)[0, 0] < size[1]
        and 0 < crops.apply_affine(c[None], warp_o_to_e)[0, 1] < size[0]
    ]
    assert len(plan.faces_original) == 6 and len(inside) >= 5, (len(plan.faces_original), inside)
    assert len(plan.pairing.pairs) == len(plan.faces_edited) >= 5, plan.pairing
    for k, (i, j) in enumerate(plan.pairing.pairs):
        moved = crops.apply_affine(centres_o[i][None], warp_o_to_e)[0]
        distances = [np.linalg.norm(moved - c) for c in centres_e]
        side = plan.faces_edited[j].box[2] - plan.faces_edited[j].box[0]
        # the face it became, up to the detector's box steps (measured: ≤ 7 px on ~80-px faces)
        assert int(np.argmin(distances)) == j and distances[j] < 0.15 * side, (i, j, distances)
        registered = plan.registrations[k]
        assert abs(registered.scale - 1 / 0.9) < 0.08 and abs(registered.rotation_deg - 4.0) < 3


# ----------------------------------------------------------------------------------------------
# EXIF, large pictures, memory


def _turned_jpeg(path, array: np.ndarray, orientation: int = 6):
    """A JPEG whose EXIF says the camera was turned (6: the viewer rotates it 90° clockwise)."""
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    Image.fromarray(array).save(path, exif=exif.tobytes(), quality=100)
    return path


def test_every_input_of_the_patch_path_honours_exif(tmp_path):
    from minid.restore.multiface import _element_mask

    array = np.zeros((40, 60, 3), np.uint8)
    array[:, :10] = 255  # a bright left band: after the turn, the top band
    path = _turned_jpeg(tmp_path / "turned.jpg", array)
    picture, _ = images.read_picture(path, "original")
    assert picture.size == (40, 60) == images.check_image_file(path)
    top = np.asarray(picture)[:10].mean()
    assert top > 200 and np.asarray(picture)[20:].mean() < 30
    mask = _element_mask(path, (40, 60), "")
    assert tuple(mask.shape[-2:]) == (60, 40) and float(mask[..., :10, :].mean()) > 0.8


def test_a_large_picture_gives_minids_note_not_pils_warning(tmp_path):
    big = tmp_path / "big.png"
    side = int(math.sqrt(Image.MAX_IMAGE_PIXELS)) + 10  # past PIL's warning, short of its error
    _bomb(big, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images.check_image_file(big)
        assert images.check_image_file(big) == (side, side)
    note = images.memory_note({"the edited image": (side, side)})
    assert f"{side}×{side}" in note and "8 bits" in note
    assert images.memory_note({"a": (512, 512)}) == ""
    # 3 bytes a pixel of each, 3 of the edited image's copy, 4 while one decodes
    assert images.picture_memory([(100, 10), (20, 10)]) == 3 * 1200 + 3 * 200 + 4 * 1000


def test_a_restore_that_cannot_fit_is_refused_before_anything_loads(
    tiny_hub, tmp_path, monkeypatch, capsys
):
    x_o, x_e, _, _ = _pair()
    monkeypatch.setattr(files, "available_memory", lambda: 2**30)  # 1 GiB free
    big = _bomb(tmp_path / "big.png", 9000)
    argv = _restore_argv(tmp_path, tiny_hub, x_o, x_e, "--mask-source", "attention")
    argv[argv.index("--edited") + 1] = str(big)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--no-memory-check" in err and "9000×9000" in err, err
    assert "GiB" in err and "big.png" in err
    # with the flag the check is skipped: the fake file then fails to decode, naming itself
    assert cli.main(argv + ["--no-memory-check"]) == 2
    assert "big.png" in capsys.readouterr().err


def test_memory_is_read_from_the_machine():
    have = files.available_memory()
    assert have is None or have > 2**24
    files.check_memory(10, "x", "--flag", available=100)
    with pytest.raises(MemoryError, match="--flag"):
        files.check_memory(2**31, "x", "--flag", available=2**30)
