"""Masks: loading, face masks from landmarks, feathering, dilation, resizing, union."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from minid.imaging import masks
from minid.imaging.crops import ARCFACE_TEMPLATE


def test_load_mask_any_mode_to_target_size(tmp_path):
    grey = np.zeros((40, 60), np.uint8)
    grey[10:30, 20:40] = 255
    Image.fromarray(grey).save(tmp_path / "grey.png")
    m = masks.load_mask(tmp_path / "grey.png", (40, 60))
    assert m.shape == (40, 60) and m.dtype == torch.float32
    assert float(m[20, 30]) == 1.0 and float(m[0, 0]) == 0.0

    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    assert torch.equal(masks.load_mask(tmp_path / "rgb.png"), m)

    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 3] = grey  # a cut-out: the alpha channel is the mask, the colour is irrelevant
    rgba[..., :3] = 255
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    assert torch.equal(masks.load_mask(tmp_path / "alpha.png"), m)

    Image.fromarray(grey > 0).save(tmp_path / "bits.png")  # mode "1"
    assert torch.equal(masks.load_mask(tmp_path / "bits.png"), m)

    with pytest.warns(UserWarning, match="resized to 30×20"):
        small = masks.load_mask(tmp_path / "grey.png", (20, 30))
    assert small.shape == (20, 30) and 0 <= float(small.min()) and float(small.max()) <= 1
    assert float(small[10, 15]) == 1.0


def test_load_mask_errors(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="empty"):
        masks.load_mask(tmp_path / "empty.png")
    assert float(masks.load_mask(tmp_path / "empty.png", required=False).sum()) == 0
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        masks.load_mask(tmp_path / "nothing.png")


def test_face_mask_from_106_landmarks_is_their_convex_hull():
    rng = np.random.default_rng(0)
    points = rng.uniform(20, 80, size=(106, 2))
    m = masks.face_mask((100, 100), landmarks_106=points)
    spatial = pytest.importorskip(
        "scipy.spatial", reason="scipy gives the independent inside-the-hull check"
    )
    ys, xs = np.mgrid[:100, :100]
    inside = spatial.Delaunay(points).find_simplex(np.stack([xs.ravel(), ys.ravel()], 1)) >= 0
    assert np.array_equal(m.numpy().ravel() == 1, inside), (
        f"{int((m.numpy().ravel() == 1).sum())} vs {int(inside.sum())} pixels"
    )
    square = masks.polygon_mask(
        np.array([[10, 10], [30, 10], [30, 20], [10, 20], [20, 15]]), (40, 40)
    )
    assert float(square.sum()) == 21 * 11, f"area {float(square.sum())}"


def test_face_mask_from_5_points_and_parts():
    kps = ARCFACE_TEMPLATE * 2 + [20, 10]  # a 224-px face
    face = masks.face_mask((260, 260), kps=kps)
    eyes = masks.face_mask((260, 260), kps=kps, part="eyes")
    nose = masks.face_mask((260, 260), kps=kps, part="nose")
    mouth = masks.face_mask((260, 260), kps=kps, part="mouth")
    for name, part in (("eyes", eyes), ("nose", nose), ("mouth", mouth)):
        assert float((part * (1 - face)).sum()) == 0, (
            f"the {name} region sticks out of the face ellipse"
        )
    for k in kps.round().astype(int):
        assert face[k[1], k[0]] == 1
    assert (
        eyes[int(round(kps[0, 1])), int(round(kps[0, 0]))] == 1
        and eyes[int(round(kps[2, 1])), int(round(kps[2, 0]))] == 0
    )
    assert nose[int(round(kps[2, 1])), int(round(kps[2, 0]))] == 1
    assert float(face[0].sum()) == 0 and float(face[:, 0].sum()) == 0, (
        "ellipse reaches the image edge"
    )
    with pytest.raises(ValueError, match="empty"):
        masks.face_mask((50, 50), kps=kps + 1000)


@settings(max_examples=20, deadline=None)
@given(
    sigma=st.floats(0.5, 6),
    x0=st.integers(0, 40),
    y0=st.integers(0, 40),
    w=st.integers(1, 40),
    h=st.integers(1, 40),
)
def test_feather_stays_in_0_1_and_is_exact_deep_inside_and_outside(sigma, x0, y0, w, h):
    m = torch.zeros(64, 64)
    m[y0 : y0 + h, x0 : x0 + w] = 1
    f = masks.feather(m, sigma)
    assert float(f.min()) >= 0 and float(f.max()) <= 1
    r = int(np.ceil(3 * sigma))
    deep = masks.erode(m, r) == 1
    far = masks.dilate(m, r) == 0
    assert torch.all(f[deep] == 1), "feathered mask not exactly 1 deep inside"
    assert torch.all(f[far] == 0), "feathered mask not exactly 0 far outside"
    edge = (m == 1) & ~deep
    if edge.any():
        assert float(f[edge].min()) < 1, "feathering changed nothing at the edge"


def test_dilate_erode_and_union():
    m = torch.zeros(1, 20, 20)
    m[0, 8:12, 8:12] = 1
    d = masks.dilate(m, 2)
    assert (
        d.shape == m.shape
        and float(d.sum()) == 64
        and float(d[0, 6, 6]) == 1
        and float(d[0, 5, 5]) == 0
    )
    assert torch.equal(masks.erode(d, 2), m)
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    a[0, 0], b[3, 3], b[0, 0] = 0.3, 1.0, 0.7
    u = masks.union(a, b)
    assert (
        float(u[0, 0]) == pytest.approx(0.7)
        and float(u[3, 3]) == 1
        and float(u.sum()) == pytest.approx(1.7)
    )
    with pytest.raises(ValueError, match="differ in shape"):
        masks.union(a, torch.zeros(5, 5))


def test_to_resolution_averages_area_and_keeps_batches():
    m = torch.zeros(512, 512)
    m[:256, :128] = 1
    for side in (64, 32, 16, 8):
        r = masks.to_resolution(m, side)
        assert r.shape == (side, side)
        assert float(r.mean()) == pytest.approx(float(m.mean())), f"coverage changed at {side}²"
    assert (
        float(masks.to_resolution(m, 8)[0, 1]) == 1.0
        and float(masks.to_resolution(m, 8)[0, 2]) == 0.0
    )
    batch = torch.stack([m, 1 - m])[:, None]  # (2, 1, 512, 512)
    r = masks.to_resolution(batch, (16, 32))
    assert r.shape == (2, 1, 16, 32) and torch.allclose(r[0] + r[1], torch.ones(1, 16, 32))
    up = masks.to_resolution(masks.to_resolution(m, 8), 64)
    assert up.shape == (64, 64) and 0 <= float(up.min()) and float(up.max()) <= 1


def test_require_nonempty_names_the_mask():
    with pytest.raises(ValueError, match="face mask"):
        masks.require_nonempty(torch.zeros(3, 3), "face mask")
