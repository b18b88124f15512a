"""Batched and multi-person restoration on the tiny random stack, with a stub face analyzer (no
ONNX).

The stub knows the faces of the images it was told about (boxes, 5 keypoints, 106 landmarks) and
returns them for the registered image nearest to what it is shown; its "embedding" is the face box's
pixels pooled to 4×4, so an identity measure moves when the face's pixels do.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMAGE_SIZE, random_image

from minid.faces import analyzer as faces
from minid.imaging import crops, masks
from minid.method.control import BatchLayout
from minid.method.editedid import EditedIDConfig
from minid.method.gating import EditedIDGating, GatingConfig, GatingGroup
from minid.method.null_text import NullTextConfig
from minid.models.attention import Site
from minid.restore.config import RestoreConfig
from minid.restore.inputs import RestorePair, landmark_face_mask
from minid.restore.multiface import FacePatchConfig, map_face, plan_faces, restore_faces
from minid.restore.pipeline import EditedID
from minid.sampling.hybrid import HybridSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

P_O = "a photo of a man"
P_E = "a photo of a man wearing black glasses"
# Three steps, one null-text update: every stage runs, in a fraction of the default's time.
STEPS = 3


def fast(inner_steps: int = 1, **image_side) -> RestoreConfig:
    """Tiny images, 3 steps (DPM-Solver++ on the last), few null-text updates."""
    method = EditedIDConfig(
        solver=HybridSchedule(num_steps=STEPS, dpm_start=3, dpm_end=3),
        null_text=NullTextConfig(inner_steps=inner_steps),
    )
    return RestoreConfig(method, image_size=IMAGE_SIZE, **image_side)


HEIGHT, WIDTH = 96, 160
CENTRES = [(30.0, 40.0), (80.0, 50.0), (130.0, 45.0)]  # (x, y) of three faces, 24 px wide
FACE_SIDE = 24.0


def make_face(cx: float, cy: float, side: float = FACE_SIDE, dense: bool = True) -> faces.Face:
    """A face at (cx, cy): its box, 5 keypoints where a face has them, 106 points on an oval."""
    s = side
    kps = np.array(
        [
            [cx - 0.2 * s, cy - 0.1 * s],
            [cx + 0.2 * s, cy - 0.1 * s],
            [cx, cy + 0.05 * s],
            [cx - 0.15 * s, cy + 0.25 * s],
            [cx + 0.15 * s, cy + 0.25 * s],
        ]
    )
    angles = np.linspace(0, 2 * math.pi, 106, endpoint=False)
    oval = np.stack(
        [cx + 0.4 * s * np.cos(angles), cy + 0.05 * s + 0.45 * s * np.sin(angles)], axis=1
    )
    return faces.Face(
        box=np.array([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]),
        score=0.9,
        kps=kps,
        landmarks_106=oval if dense else None,
    )


def smooth_image(seed: int, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, height // 8, width // 8, generator=g) * 2 - 1
    # (1, 3, H, W)
    return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)


class StubAnalyzer:
    """`analyze(image)` returns the faces registered for the nearest known image, with pixel
    embeddings."""

    def __init__(self, known: list[tuple[torch.Tensor, list[faces.Face]]]):
        # as the pipeline shows images
        self.known = [(((x[0] + 1) / 2).clamp(0, 1), f) for x, f in known]
        self.calls = 0

    def analyze(self, image: torch.Tensor) -> list[faces.Face]:
        self.calls += 1
        dist = [
            float((image - ref).abs().mean()) if ref.shape == image.shape else math.inf
            for ref, _ in self.known
        ]
        found = copy.deepcopy(self.known[int(np.argmin(dist))][1])
        for face in found:
            x0, y0, x1, y1 = (int(round(v)) for v in face.box)
            pooled = (
                F.adaptive_avg_pool2d(image[:, max(y0, 0) : y1, max(x0, 0) : x1], 4)
                .flatten()
                .double()
            )
            face.embedding = (pooled - pooled.mean()).numpy()
        return found


class BatchSizes:
    """Records the batch size of every UNet call."""

    def __init__(self, unet):
        self.unet, self.sizes = unet, []
        self.forward = unet.forward

    def __enter__(self):
        self.unet.forward = lambda sample, *a, **k: (
            self.sizes.append(sample.shape[0]) or self.forward(sample, *a, **k)
        )
        return self

    def __exit__(self, *exc):
        self.unet.forward = self.forward


def outside_squares(boxes, height=HEIGHT, width=WIDTH, margin=1) -> torch.Tensor:
    """(H, W) True for pixels farther than `margin` from every square (left, top, right, bottom)."""
    keep = torch.ones(height, width, dtype=torch.bool)
    for left, top, right, bottom in boxes:
        y0, x0 = max(int(math.floor(top)) - margin, 0), max(int(math.floor(left)) - margin, 0)
        y1, x1 = int(math.ceil(bottom)) + margin, int(math.ceil(right)) + margin
        keep[y0:y1, x0:x1] = False
    return keep


@pytest.fixture(scope="module")
def photos():
    return smooth_image(21), smooth_image(22)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_n_faces_are_restored_in_one_batch_and_nothing_else_changes(tiny_sd, photos, n):
    original, edited = photos
    face_list = [make_face(*c) for c in CENTRES[:n]]
    analyzer = StubAnalyzer([(original, face_list), (edited, face_list)])
    pipe = EditedID(tiny_sd, fast())
    with BatchSizes(tiny_sd.unet) as seen:
        result = restore_faces(
            pipe, original, edited, analyzer, P_O, P_E, ["man"], ["glasses"], progress=False
        )
    assert set(seen.sizes) == {2 * n, 6 * n}, (
        f"UNet batch sizes {sorted(set(seen.sizes))}, expected 2N and 6N for N={n}"
    )
    assert seen.sizes.count(6 * n) == STEPS, "Stage 3 must run all faces in one call per step"
    assert [f.pair for f in result.faces] == [(k, k) for k in range(n)]
    assert result.image.shape == edited.shape
    keep = outside_squares([f.box_edited for f in result.faces])
    assert torch.equal(result.image[..., keep], edited[..., keep]), (
        "a pixel outside the pasted patches changed"
    )
    pasted = torch.zeros(HEIGHT, WIDTH)  # the union of the paste masks, in image coordinates
    for f in result.faces:
        x0, y0, x1, y1 = (int(v) for v in f.box)
        changed = (result.image[..., y0:y1, x0:x1] != edited[..., y0:y1, x0:x1]).any(1)
        assert bool(changed.any()), f"the patch {f.box} of pair {f.pair} was not pasted"
        # (H, W)
        pasted += crops.warp(f.paste_mask[None], crops.invert_affine(f.affine), (HEIGHT, WIDTH))[0]
    assert torch.equal(result.image[..., pasted == 0], edited[..., pasted == 0]), (
        "a pixel where every paste mask is 0 changed"
    )
    assert 0 < int((pasted > 0).sum()) < int((~keep).sum()), (
        "the paste masks should cover part of the squares"
    )
    for f in result.faces:
        assert (
            f.id_sim_before is not None and f.id_sim_after is not None and -1 <= f.id_sim_after <= 1
        )
        assert set(f.psnr) == {"original", "edited"}
        expected_mask, _ = landmark_face_mask(face_list[f.pair[0]], pipe.config, f.affine)
        assert torch.equal(f.result.masks["face"], expected_mask), (
            "the face mask is not the original's landmark hull"
        )


def test_pairing_follows_positions_when_faces_are_shuffled_or_missing(tiny_sd, photos):
    original, edited = photos
    faces_o = [make_face(*c) for c in CENTRES]
    # the edit lists its faces in another order, one face is gone and the others moved by 2 px
    faces_e = [
        make_face(CENTRES[2][0] + 2, CENTRES[2][1]),
        make_face(CENTRES[0][0], CENTRES[0][1] - 2),
    ]
    analyzer = StubAnalyzer([(original, faces_o), (edited, faces_e)])
    pipe = EditedID(tiny_sd, fast())
    with BatchSizes(tiny_sd.unet) as seen:
        result = restore_faces(
            pipe, original, edited, analyzer, P_O, P_E, ["man"], ["glasses"], progress=False
        )
    assert result.pairing.pairs == [(0, 1), (2, 0)], f"pairs {result.pairing.pairs}"
    assert result.pairing.unpaired_a == [1] and result.pairing.unpaired_b == []
    assert any("unpaired in the first image: [1]" in n for n in result.notes), result.notes
    assert set(seen.sizes) == {4, 12}
    for f in result.faces:
        i, j = f.pair
        # the edit's face registered onto the original's: the 2-px shift is undone
        shift = np.array(faces_o[i].kps[0]) - np.array(faces_e[j].kps[0])
        assert np.allclose(f.registration.affine, [[1, 0, shift[0]], [0, 1, shift[1]]])
        mapped = map_face(faces_e[j], f.registration.affine)
        union = np.concatenate(
            [
                np.minimum(faces_o[i].box[:2], mapped.box[:2]),
                np.maximum(faces_o[i].box[2:], mapped.box[2:]),
            ]
        )
        left, top, side = crops.square_around(union, FacePatchConfig().scale)
        assert np.allclose(f.box, (left, top, left + side, top + side)), (
            "the square is not around the pair's registered boxes"
        )
        assert np.allclose(f.box_edited, np.array(f.box) - np.tile(shift, 2)), (
            "in the edited image the patch lies where its face is"
        )
    keep = outside_squares([f.box_edited for f in result.faces])
    assert torch.equal(result.image[..., keep], edited[..., keep])
    cx, cy = CENTRES[1]
    assert bool(keep[int(cy), int(cx)]), "the unpaired face lies outside every pasted patch"


def test_user_picked_pairs_are_the_only_ones_restored(tiny_sd, photos):
    original, edited = photos
    face_list = [make_face(*c) for c in CENTRES]
    analyzer = StubAnalyzer([(original, face_list), (edited, face_list)])
    pipe = EditedID(tiny_sd, fast())
    with BatchSizes(tiny_sd.unet) as seen:
        result = restore_faces(
            pipe,
            original,
            edited,
            analyzer,
            [P_O],
            [P_E],
            [["man"]],
            [["glasses"]],
            pairs=[(1, 1)],
            progress=False,
        )
    assert [f.pair for f in result.faces] == [(1, 1)] and set(seen.sizes) == {2, 6}
    keep = outside_squares([result.faces[0].box])
    assert torch.equal(result.image[..., keep], edited[..., keep]), (
        "faces 0 and 2 were not picked but changed"
    )
    with pytest.raises(ValueError, match="out of range"):
        restore_faces(
            pipe,
            original,
            edited,
            analyzer,
            P_O,
            P_E,
            ["man"],
            ["glasses"],
            pairs=[(0, 5)],
            progress=False,
        )
    with pytest.raises(ValueError, match="2 entries for 1 face pairs"):
        restore_faces(
            pipe,
            original,
            edited,
            analyzer,
            [P_O, P_O],
            P_E,
            ["man"],
            ["glasses"],
            pairs=[(0, 0)],
            progress=False,
        )


def test_a_single_restore_uses_the_landmark_mask_when_given_an_analyzer(tiny_sd):
    original, edited = random_image(31), random_image(32)
    pipe = EditedID(tiny_sd, fast(inner_steps=0))
    for dense in (True, False):
        face = make_face(30.0, 28.0, side=30.0, dense=dense)
        result = pipe.restore(
            original,
            edited,
            P_O,
            P_E,
            ["man"],
            ["glasses"],
            progress=False,
            analyzer=StubAnalyzer([(original, [face])]),
        )
        kind = masks.face_mask(IMAGE_SIZE, kps=face.kps, landmarks_106=face.landmarks_106)
        expected = masks.feather(kind, pipe.config.face_mask_feather * IMAGE_SIZE)[None, None]
        assert torch.equal(result.masks["face"], expected), (
            f"dense={dense}: M_O is not the feathered landmark mask"
        )
        assert 0 < float(expected.mean()) < 1 and float(expected.max()) == 1
        assert any(("106 landmarks" if dense else "5 keypoints") in n for n in result.notes), (
            result.notes
        )
        assert not any(
            n.startswith("face mask taken from the cross-attention") for n in result.notes
        )
    plain = pipe.restore(original, edited, P_O, P_E, ["man"], ["glasses"], progress=False)
    assert any(n.startswith("face mask taken from the cross-attention") for n in plain.notes), (
        "without an analyzer the face mask must come from the cross-attention maps"
    )


def test_no_face_fails_early_naming_the_image(tiny_sd, photos, tmp_path):
    original, edited = photos
    pipe = EditedID(tiny_sd, fast())
    nobody = StubAnalyzer([(original, []), (edited, [make_face(*CENTRES[0])])])
    with BatchSizes(tiny_sd.unet) as seen:
        with pytest.raises(ValueError, match="no face in the original image"):
            restore_faces(
                pipe, original, edited, nobody, P_O, P_E, ["man"], ["glasses"], progress=False
            )
        only_original = StubAnalyzer([(original, [make_face(*CENTRES[0])]), (edited, [])])
        with pytest.raises(ValueError, match="no face in the edited image"):
            restore_faces(
                pipe,
                original,
                edited,
                only_original,
                P_O,
                P_E,
                ["man"],
                ["glasses"],
                progress=False,
            )
        far = StubAnalyzer(
            [(original, [make_face(*CENTRES[0])]), (edited, [make_face(*CENTRES[2])])]
        )
        # a face the edit moved far is the same face re-framed: paired and registered, not refused
        plan = plan_faces(
            original, edited, far, pipe.config, tiny_sd.tokenizer, P_O, P_E, ["man"], ["glasses"]
        )
        shift = np.array(CENTRES[0]) - np.array(CENTRES[2])
        assert plan.pairing.pairs == [(0, 0)]
        assert np.allclose(plan.registrations[0].affine, [[1, 0, shift[0]], [0, 1, shift[1]]])
        square = random_image(33)
        from minid.imaging.images import save_image

        path = save_image(square, tmp_path / "portrait.png")
        with pytest.raises(ValueError, match="no face in the original image .*portrait.png"):
            pipe.restore(
                path,
                random_image(34),
                P_O,
                P_E,
                ["man"],
                ["glasses"],
                progress=False,
                analyzer=StubAnalyzer([(square, [])]),
            )
    assert seen.sizes == [], "the UNet ran before the faces were checked"


def test_k_pairs_in_one_batch_equal_k_single_restores(tiny_sd):
    face = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    face[8:40, 8:40] = 1
    pairs = [
        RestorePair(
            random_image(1), random_image(2), P_O, P_E, ["man"], ["glasses"], lambda_o=0.3, seed=1
        ),
        RestorePair(
            random_image(3),
            random_image(4),
            "a photo of a woman",
            "a photo of a woman wearing a red hat",
            ["woman"],
            ["hat"],
            face_mask=face,
            seed=2,
        ),
        RestorePair(
            random_image(5),
            random_image(6),
            "a portrait of a smiling man",
            "a portrait of a smiling man with a beard",
            ["man"],
            ["beard"],
            lambda_o=0.7,
            seed=3,
        ),
    ]
    pipe = EditedID(tiny_sd, fast(sample_posterior=True))
    with BatchSizes(tiny_sd.unet) as seen:
        batch = pipe.restore_batch(pairs, progress=False)
    assert set(seen.sizes) == {6, 18}, f"batch sizes {sorted(set(seen.sizes))}"
    for k, (pair, b) in enumerate(zip(pairs, batch)):
        single = (
            pipe.restore(
                pair.original,
                pair.edited,
                pair.prompt_original,
                pair.prompt_edited,
                pair.id_words,
                pair.element_words,
                face_mask=pair.face_mask,
                seed=pair.seed,
                progress=False,
            )
            if pair.lambda_o is None
            else pipe.restore_batch([pair], progress=False)[0]
        )
        # Batched and single UNet calls round differently (~1e-7); null-text's Adam amplifies that a
        # little.
        err = (b.image - single.image).abs().max().item()
        assert err < 2e-3, f"pair {k}: batched and single restores differ by {err}"
        assert all(torch.equal(b.masks[m], single.masks[m]) for m in ("face", "element")), (
            f"pair {k}: masks differ"
        )
        assert np.allclose(b.w_schedule, single.w_schedule, atol=1e-6), (
            f"pair {k}: {b.w_schedule} vs {single.w_schedule}"
        )
        assert all(abs(b.psnr[r] - single.psnr[r]) < 1e-2 for r in b.psnr), (
            f"pair {k}: {b.psnr} vs {single.psnr}"
        )
    assert (batch[0].image - batch[2].image).abs().max().item() > 1e-2, (
        "different pairs gave the same image"
    )


def test_a_gating_group_edits_each_triple_as_its_gating_alone():
    g = torch.Generator().manual_seed(0)
    k_pairs, heads, n, d = 2, 2, 16, 8
    lay = BatchLayout(3 * k_pairs, cfg=True)
    q, k, v = (torch.randn(lay.size, heads, n, d, generator=g) for _ in range(3))
    mask_a, mask_b = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    mask_a[..., :2, :] = 1
    mask_b[..., :, 2:] = 1
    gatings = [
        EditedIDGating(
            lay,
            mask_a,
            mask_b,
            config=GatingConfig(lambda_o=0.3),
            branch_o=0,
            branch_e=2,
            branch_t=4,
        ),
        EditedIDGating(
            lay,
            mask_b,
            mask_a,
            config=GatingConfig(lambda_o=0.6),
            branch_o=1,
            branch_e=3,
            branch_t=5,
        ),
    ]
    site = Site(block="down", level=0, index=0, kind="self", height=4, width=4)
    out = GatingGroup(gatings)(q, k, v, site)
    for p, gating in enumerate(gatings):
        # this triple's rows
        rows = [lay.row(b, c) for c in (False, True) for b in (p, 2 + p, 4 + p)]
        alone = EditedIDGating(BatchLayout(3), gating.mask_o, gating.mask_e, config=gating.config)(
            q[rows], k[rows], v[rows], site
        )
        err = (out[rows] - alone).abs().max().item()
        assert err < 1e-6, f"triple {p} differs from its gating alone by {err}"
    with pytest.raises(ValueError, match="same T branch"):
        GatingGroup([gatings[0], gatings[0]])
