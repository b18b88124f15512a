"""Face geometry and pairing (minid.imaging.crops) and the ONNX plumbing of minid.faces.analyzer.

The ONNX tests run the tiny graphs of tests/tiny_faces.py (the `onnx_models` fixture), which have
the input/output names and shapes of insightface's buffalo_l models: a "detector" that fires where
the image is red, so decoding and NMS must recover a box and keypoints we can compute by hand; an
"ArcFace" that is a fixed linear map of 16×16-pooled pixels; a "landmark" net with a constant
output.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_faces import (
    BOX_DIST,
    DET_SIZE,
    KPS_OFFSETS,
    LANDMARK_RAW,
    PACK,
    red_squares,
    write_face_pack,
)

from minid.faces import analyzer as faces
from minid.faces.analyzer import (
    SCRFD,
    ArcFace,
    FaceAnalyzer,
    FaceAnalyzerConfig,
    Landmark106,
    choose_providers,
    nms,
)
from minid.imaging import crops
from minid.imaging.crops import (
    ARCFACE_TEMPLATE,
    apply_affine,
    arcface_affine,
    box_iou,
    crop_square,
    estimate_similarity,
    invert_affine,
    pair_faces,
    paste_back,
    square_around,
)


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


# ----------------------------------------------------------------------------------------------
# geometry


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(0.05, 20),
    angle=st.floats(-math.pi, math.pi),
    tx=st.floats(-500, 500),
    ty=st.floats(-500, 500),
    seed=st.integers(0, 2**31 - 1),
)
def test_estimate_similarity_recovers_a_random_similarity(scale, angle, tx, ty, seed):
    src = np.random.default_rng(seed).uniform(0, 200, size=(5, 2))
    src[1] += [30, 0]  # keep the points apart so the fit is well conditioned
    truth = similarity(scale, angle, tx, ty)
    found = estimate_similarity(src, apply_affine(src, truth))
    err = np.abs(found - truth).max()
    assert err < 1e-7 * max(1.0, scale, abs(tx), abs(ty)), f"max |estimate − truth| = {err}"


def test_estimate_similarity_is_never_a_reflection():
    src = np.array([[0.0, 0], [10, 0], [0, 10], [10, 10], [5, 3]])
    mirrored = src * [-1, 1]
    a = estimate_similarity(src, mirrored)
    assert np.linalg.det(a[:, :2]) > 0, f"det of the linear part = {np.linalg.det(a[:, :2])}"


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(0.2, 5),
    angle=st.floats(-1.0, 1.0),
    tx=st.floats(-300, 300),
    ty=st.floats(-300, 300),
)
def test_alignment_maps_keypoints_to_the_template_and_back(scale, angle, tx, ty):
    # Keypoints that are an exact similarity image of the template align onto it with zero residual.
    kps = apply_affine(ARCFACE_TEMPLATE, similarity(scale, angle, tx, ty))
    affine = arcface_affine(kps, 112)
    assert np.abs(apply_affine(kps, affine) - ARCFACE_TEMPLATE).max() < 1e-8
    back = invert_affine(affine)
    assert np.abs(apply_affine(ARCFACE_TEMPLATE, back) - kps).max() < 1e-7 * max(
        1, scale, abs(tx), abs(ty)
    )
    # 224 is 2 × 112: the template scales with the crop.
    assert np.abs(apply_affine(kps, arcface_affine(kps, 224)) - 2 * ARCFACE_TEMPLATE).max() < 1e-8


def test_align_face_of_a_template_placed_face_is_a_translation_crop():
    image = torch.rand(3, 150, 160)
    kps = ARCFACE_TEMPLATE + [17, 9]  # the face sits at an integer offset, unscaled
    patch, _ = crops.align_face(image, kps, 112)
    assert torch.equal(patch, image[:, 9 : 9 + 112, 17 : 17 + 112]), (
        "aligned crop differs from the image region"
    )


@settings(max_examples=30, deadline=None)
@given(
    height=st.integers(20, 70),
    width=st.integers(20, 70),
    left=st.integers(-15, 60),
    top=st.integers(-15, 60),
    size=st.integers(4, 40),
    seed=st.integers(0, 1000),
)
def test_crop_then_paste_back_with_a_full_mask_is_exact(height, width, left, top, size, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g)
    # square box, scale 1: the crop is a pure integer shift
    box = (left, top, left + size, top + size)
    patch, affine = crop_square(image, box, scale=1.0, size=size, border="zeros")
    edited = patch * 2 + 1
    out = paste_back(image, edited, affine, mask=torch.ones(size, size))
    y0, y1, x0, x1 = max(top, 0), min(top + size, height), max(left, 0), min(left + size, width)
    inside = torch.zeros(height, width, dtype=torch.bool)
    if y1 > y0 and x1 > x0:
        inside[y0:y1, x0:x1] = True
        assert torch.equal(
            out[:, y0:y1, x0:x1], edited[:, y0 - top : y1 - top, x0 - left : x1 - left]
        )
        assert torch.equal(
            patch[:, y0 - top : y1 - top, x0 - left : x1 - left], image[:, y0:y1, x0:x1]
        )
    assert torch.equal(out[:, ~inside], image[:, ~inside]), (
        "a pixel outside the pasted square changed"
    )


@settings(max_examples=20, deadline=None)
@given(
    cx=st.floats(10, 90),
    cy=st.floats(10, 90),
    half=st.floats(4, 30),
    scale=st.floats(1.0, 2.0),
    size=st.sampled_from([16, 32, 64]),
)
def test_paste_back_of_a_scaled_crop_fills_its_square_and_nothing_else(cx, cy, half, scale, size):
    image = torch.rand(3, 100, 110)
    box = (cx - half, cy - half * 0.8, cx + half, cy + half * 0.8)
    _, affine = crop_square(image, box, scale=scale, size=size)
    out = paste_back(image, torch.full((3, size, size), 7.0), affine, mask=torch.ones(size, size))
    left, top, side = square_around(box, scale)
    ys, xs = torch.meshgrid(torch.arange(100.0), torch.arange(110.0), indexing="ij")
    # pixel centres at index + 0.5 in edge coordinates; one patch pixel of margin for the bilinear
    # edge
    margin = side / size + 0.5
    deep = (
        (xs + 0.5 > left + margin)
        & (xs + 0.5 < left + side - margin)
        & (ys + 0.5 > top + margin)
        & (ys + 0.5 < top + side - margin)
    )
    outside = (
        (xs + 0.5 < left - margin)
        | (xs + 0.5 > left + side + margin)
        | (ys + 0.5 < top - margin)
        | (ys + 0.5 > top + side + margin)
    )
    assert torch.allclose(out[:, deep], torch.tensor(7.0), atol=1e-5), (
        "square interior is not the pasted value"
    )
    assert torch.equal(out[:, outside], image[:, outside]), "a pixel outside the square changed"


def test_default_paste_mask_is_feathered_and_one_inside():
    ramp = crops.border_ramp(64, 8)
    assert float(ramp.min()) >= 0 and float(ramp.max()) <= 1
    assert torch.all(ramp[10:54, 10:54] == 1), "ramp not 1 inside the feather band"
    assert float(ramp[0, 32]) < 0.05 and 0 < float(ramp[3, 32]) < 1, (
        f"edge values {ramp[0, 32]}, {ramp[3, 32]}"
    )


# ----------------------------------------------------------------------------------------------
# pairing


def _boxes(rng, n):
    corners = rng.uniform(0, 800, size=(n, 2))
    return np.concatenate([corners, corners + rng.uniform(60, 120, size=(n, 2))], axis=1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_pairing_recovers_a_shuffle_of_jittered_boxes(n, seed):
    rng = np.random.default_rng(seed)
    # faces side by side, as in a group photo
    a = np.array([[i * 150.0, 40, i * 150 + 100, 160] for i in range(n)])
    perm = rng.permutation(n)
    b = a[perm] + rng.uniform(-8, 8, size=(n, 4))
    pairing = pair_faces(a, b)
    expected = sorted((int(perm[j]), j) for j in range(n))
    assert pairing.pairs == expected, f"pairs {pairing.pairs}, expected {expected}"
    assert pairing.unpaired_a == [] and pairing.unpaired_b == []


def test_pairing_of_overlapping_faces_and_missing_faces():
    # 0 and 1 overlap
    a = np.array([[100.0, 100, 200, 220], [170, 110, 270, 230], [500, 100, 600, 220]])
    # no match for a[2]
    b = np.array([[172.0, 108, 268, 232], [98, 102, 203, 218], [900, 900, 950, 950]])
    pairing = pair_faces(a, b)
    assert pairing.pairs == [(0, 1), (1, 0)], f"pairs {pairing.pairs}"
    assert pairing.unpaired_a == [2] and pairing.unpaired_b == [2]
    assert "unpaired" in pairing.describe()


def test_pairing_uses_relative_positions_when_the_images_differ_in_size():
    a = np.array([[100.0, 100, 200, 200], [300, 100, 400, 200]])
    b = a[::-1] * 2  # the second image is twice as large, faces listed in the other order
    assert pair_faces(a, b).pairs != [(0, 1), (1, 0)]
    assert pair_faces(a, b, size_a=(500, 300), size_b=(1000, 600)).pairs == [(0, 1), (1, 0)]


def test_pairing_with_explicit_indices():
    a, b = _boxes(np.random.default_rng(0), 3), _boxes(np.random.default_rng(1), 2)
    pairing = pair_faces(a, b, pairs=[(2, 0)])
    assert pairing.pairs == [(2, 0)] and pairing.unpaired_a == [0, 1] and pairing.unpaired_b == [1]
    with pytest.raises(ValueError, match="out of range"):
        pair_faces(a, b, pairs=[(3, 0)])
    with pytest.raises(ValueError, match="two pairs"):
        pair_faces(a, b, pairs=[(0, 0), (1, 0)])


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]])
    scores = np.array([0.8, 0.9, 0.7, 0.8])
    assert nms(boxes, scores, 0.4) == [1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.4) == []


def _greedy_nms(boxes, scores, threshold):
    """Textbook greedy NMS: each box in score order is kept unless a kept box overlaps it."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if not keep or (box_iou(boxes[i], boxes[keep])[0] <= threshold).all():
            keep.append(i)
    return keep


def test_nms_equals_the_pairwise_greedy_rule_on_crowded_detections():
    """A detector firing on thousands of anchors: the vectorised NMS keeps exactly the boxes the
    pairwise rule keeps (repeated scores included)."""
    rng = np.random.default_rng(3)
    for n in (1, 7, 300):
        xy = rng.uniform(0, 100, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], axis=1)
        scores = rng.choice([0.5, 0.6, 0.7, 0.8, 0.9], n)  # many ties
        for threshold in (0.0, 0.4, 0.9):
            assert nms(boxes, scores, threshold) == _greedy_nms(boxes, scores, threshold)
    n = 20000  # a whole 640² detector output above threshold: one pass over arrays per kept box
    xy = rng.uniform(0, 600, (n, 2))
    boxes = np.concatenate([xy, xy + 40], axis=1)
    keep = nms(boxes, rng.uniform(size=n), 0.4)
    iou = box_iou(boxes[keep], boxes[keep])
    assert (iou[~np.eye(len(keep), dtype=bool)] <= 0.4).all() and len(keep) > 50


# ----------------------------------------------------------------------------------------------
# providers, pack


def test_choose_providers_prefers_cuda_when_offered():
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers(["TensorrtExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert choose_providers([]) == ["CPUExecutionProvider"]


def test_missing_model_pack_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        faces.find_model_pack("buffalo_l", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "models" / "buffalo_l") in message and "download=True" in message


def test_model_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(faces.ROOT_ENV, str(tmp_path))
    assert faces.model_root() == tmp_path
    assert faces.model_root("/elsewhere") == Path("/elsewhere")


# ----------------------------------------------------------------------------------------------
# tiny ONNX models


def _session(model):
    import onnxruntime

    return onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def test_detector_decoding_recovers_box_and_keypoints(onnx_models):
    detector = SCRFD(_session(onnx_models["detector"]), det_size=DET_SIZE)
    # 128×96 image → letterboxed at scale 0.5 into 64×64; each 16² red square covers one stride-8
    # cell.
    image = red_squares(96, 128, [(80, 32, 16), (16, 64, 16)])
    boxes, scores, kps = detector.detect(faces.as_pixels(image))
    assert len(boxes) == 2, (
        f"found {len(boxes)} faces, expected 2 (NMS must merge the two anchors of a cell)"
    )
    expected_score = (255 - 127.5) / 128
    assert np.allclose(scores, expected_score, atol=1e-6), f"scores {scores}"
    for (x, y, _), box, points in zip([(80, 32, 16), (16, 64, 16)], boxes, kps):
        anchor = np.array([x, y]) / 2  # the cell's top-left corner in detector input pixels
        want_box = np.concatenate([anchor - BOX_DIST[:2] * 8, anchor + BOX_DIST[2:] * 8]) * 2
        want_kps = (anchor + KPS_OFFSETS.reshape(5, 2) * 8) * 2
        assert np.abs(box - want_box).max() < 1e-4, f"box {box}, expected {want_box}"
        assert np.abs(points - want_kps).max() < 1e-4, f"kps {points}, expected {want_kps}"


def test_detector_reads_rgb_not_bgr(onnx_models):
    detector = SCRFD(_session(onnx_models["detector"]), det_size=DET_SIZE)
    image = red_squares(64, 64, [(8, 8, 8)])[:, :, ::-1]  # the square is now blue
    boxes, _, _ = detector.detect(faces.as_pixels(image))
    assert len(boxes) == 0, "a blue square was detected: channel order is wrong"


def test_arcface_embedding_is_the_linear_map_of_the_normalised_crop(onnx_models):
    weight = onnx_models["arcface_weight"].astype(np.float64)
    colours = np.array([[200, 30, 90], [10, 250, 128]], dtype=np.float64)
    image = np.zeros((128, 256, 3), np.uint8)
    image[:, :128], image[:, 128:] = colours[0], colours[1]
    # each aligned crop lies in one half
    kps = [ARCFACE_TEMPLATE + [8, 8], ARCFACE_TEMPLATE + [136, 8]]
    want = []
    for c in colours:
        # pooled normalised channels, flattened channel-major
        feature = np.repeat((c - 127.5) / 127.5, 49)
        e = feature @ weight
        want.append(e / np.linalg.norm(e))
    for max_batch in (1, 32):
        arcface = ArcFace(_session(onnx_models["arcface"]), max_batch=max_batch)
        got = arcface.embed(faces.as_pixels(image), kps)
        assert got.shape == (2, 512)
        assert np.abs(got - np.array(want)).max() < 1e-5, (
            f"max error {np.abs(got - np.array(want)).max()} (batch {max_batch})"
        )


def test_landmarks_map_back_from_the_crop(onnx_models):
    landmark = Landmark106(_session(onnx_models["landmark"]))
    boxes = np.array([[40.0, 30, 100, 110], [150, 20, 190, 60]])
    got = landmark.predict(torch.zeros(3, 128, 256), boxes)
    for box, points in zip(boxes, got):
        s = 192 / (1.5 * max(box[2] - box[0], box[3] - box[1]))
        center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        want = center + ((LANDMARK_RAW + 1) * 96 - 96) / s
        assert np.abs(points - want).max() < 1e-3, f"max error {np.abs(points - want).max()}"


def test_face_analyzer_from_a_pack_folder(onnx_models, tmp_path):
    pack = write_face_pack(onnx_models, tmp_path)
    assert faces.input_normalisation(pack / "lmk.onnx", (127.5, 128.0)) == (0.0, 1.0)
    assert faces.input_normalisation(pack / "rec.onnx", (127.5, 127.5)) == (127.5, 127.5)

    config = FaceAnalyzerConfig(pack=PACK, root=str(tmp_path), det_size=DET_SIZE)
    analyzer = FaceAnalyzer.from_pack(config=config, providers=["CPUExecutionProvider"])
    assert analyzer.landmark is not None and (analyzer.landmark.mean, analyzer.landmark.std) == (
        0.0,
        1.0,
    )
    image = red_squares(96, 128, [(80, 32, 16), (16, 64, 16)])
    found = analyzer.analyze(image)
    assert len(found) == 2
    pixels = faces.as_pixels(image)
    for face in found:
        assert face.kps.shape == (5, 2) and face.landmarks_106.shape == (106, 2)
        assert abs(np.linalg.norm(face.embedding) - 1) < 1e-6
        alone = analyzer.arcface.embed(pixels, [face.kps])[0]
        assert np.abs(face.embedding - alone).max() < 1e-6, (
            "batched embedding differs from a single run"
        )
    assert analyzer.largest_face(image).area == max(f.area for f in found)
    with pytest.raises(ValueError, match="no face found in blank.png"):
        analyzer.largest_face(np.zeros((64, 64, 3), np.uint8), name="blank.png")
    assert found.detected == 2 and found.dropped == 0


def test_face_analyzer_caps_the_faces_per_image(onnx_models, tmp_path):
    """Landmarks and ArcFace run on the `max_faces` best-scored faces only; `detected` counts the
    rest, and `minid eval` notes the cap in the image's row."""
    from minid.app.evaluate import evaluate_folder

    write_face_pack(onnx_models, tmp_path)
    config = FaceAnalyzerConfig(pack=PACK, root=str(tmp_path), det_size=DET_SIZE, max_faces=1)
    analyzer = FaceAnalyzer.from_pack(config=config, providers=["CPUExecutionProvider"])
    image = red_squares(96, 128, [(80, 32, 16), (16, 64, 16)])
    everything = FaceAnalyzer(analyzer.detector, analyzer.arcface, analyzer.landmark, None)
    all_faces = everything.analyze(image)
    found = analyzer.analyze(image)
    assert (len(found), found.detected, found.dropped) == (1, 2, 1)
    assert np.allclose(found[0].box, all_faces[0].box)  # the best-scored one is kept
    assert np.allclose(found[0].embedding, all_faces[0].embedding)
    with pytest.raises(ValueError, match="max_faces must be at least 1"):
        FaceAnalyzer(analyzer.detector, max_faces=0)

    folder = tmp_path / "eval"
    for role in ("original", "edited", "result"):
        (folder / role).mkdir(parents=True)
        Image.fromarray(image).save(folder / role / "a.png")
    evaluate_folder(folder, analyzer, progress=False)
    row = json.loads((folder / "metrics.json").read_text())["rows"][0]
    assert "2 faces detected in original, the 1 best-scored measured (--max-faces)" in row["note"]
    assert row["id_sim_result"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# real model pack

BUFFALO = faces.model_root() / "models" / "buffalo_l"


@pytest.mark.skipif(
    not (BUFFALO / "det_10g.onnx").is_file(),
    reason=f"insightface buffalo_l pack not found in {BUFFALO}",
)
def test_real_pack_embeds_a_face_consistently():
    pytest.importorskip("onnxruntime")
    from PIL import Image

    analyzer = FaceAnalyzer.from_pack("buffalo_l")
    sample = os.environ.get("MINID_FACE_IMAGE")
    if not sample:
        pytest.skip("set MINID_FACE_IMAGE to a photo with a face to run the real-pack check")
    image = np.asarray(Image.open(sample).convert("RGB"))
    face = analyzer.largest_face(image, name=sample)
    shifted = np.ascontiguousarray(np.pad(image, ((10, 0), (7, 0), (0, 0)), mode="edge"))
    again = analyzer.largest_face(shifted, name=sample)
    from minid.imaging.metrics import id_similarity

    assert id_similarity(face.embedding, again.embedding) > 0.9


def test_detection_and_embedding_match_insightface(onnx_models, tmp_path):
    """The same tiny models through insightface's own SCRFD / ArcFaceONNX (cv2, BGR) give the same
    answer."""
    pytest.importorskip(
        "insightface", reason="insightface is not installed (the parity check needs it)"
    )
    import onnx
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD as InsightSCRFD
    from insightface.utils import face_align

    onnx.save(onnx_models["detector"], str(tmp_path / "det.onnx"))
    onnx.save(onnx_models["arcface"], str(tmp_path / "rec.onnx"))
    rng = np.random.default_rng(0)
    image = red_squares(150, 100, [(20, 30, 24), (50, 90, 30)])
    image = np.clip(image.astype(int) + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)
    reference = InsightSCRFD(model_file=str(tmp_path / "det.onnx"))
    reference.prepare(-1, input_size=(DET_SIZE, DET_SIZE))
    ref_det, ref_kps = reference.detect(image[:, :, ::-1].copy(), input_size=(DET_SIZE, DET_SIZE))
    boxes, scores, kps = SCRFD(_session(onnx_models["detector"]), det_size=DET_SIZE).detect(
        faces.as_pixels(image)
    )
    assert len(boxes) == len(ref_det) == 2
    assert np.abs(boxes - ref_det[:, :4]).max() < 1e-3 and np.abs(kps - ref_kps).max() < 1e-3
    # insightface resizes uint8 images (rounding); minid resizes floats: scores agree to ~1e-4
    assert np.abs(scores - ref_det[:, 4]).max() < 1e-3, f"scores {scores} vs {ref_det[:, 4]}"

    kps5 = ARCFACE_TEMPLATE * 1.3 + [5.3, 12.7]
    noise = rng.integers(0, 255, (200, 200, 3)).astype(np.uint8)
    assert np.abs(face_align.estimate_norm(kps5) - arcface_affine(kps5)).max() < 1e-4
    ref = ArcFaceONNX(model_file=str(tmp_path / "rec.onnx")).get_feat(
        face_align.norm_crop(noise[:, :, ::-1].copy(), kps5)
    )[0]
    ours = ArcFace(_session(onnx_models["arcface"])).embed(faces.as_pixels(noise), [kps5])[0]
    cosine = float(ours @ ref / np.linalg.norm(ref))
    assert cosine > 0.9999, f"cosine to insightface's embedding {cosine}"
