"""The seeds' two related ideas on the tiny stack: IdGlow's identity schedule and mask-free mode,
ConsistentID's fine-grained regions (masks from built landmark sets, region sources, localised
tokens), as exact properties."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny_models import IMAGE_SIZE, random_image

from minid.faces import analyzer as faces
from minid.faces.regions import (
    GROUPS_106,
    face_frame,
    landmark_groups,
    parse_regions,
    region_masks,
    region_scores,
)
from minid.imaging import masks
from minid.method import editedid
from minid.method.control import AttentionStore, BatchLayout
from minid.method.editedid import Disentanglement, EditedIDConfig, Tokens
from minid.method.gating import (
    EditedIDGating,
    GatingConfig,
    IdentitySchedule,
    LocalTokens,
    noise_progress,
)
from minid.method.null_text import NullTextConfig
from minid.models.attention import Site, at_step, default_attention
from minid.restore.config import RestoreConfig
from minid.restore.pipeline import EditedID
from minid.sampling.hybrid import HybridSchedule
from minid.sampling.plans import ddim_plan
from minid.sampling.schedule import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

P_O = "a photo of a man"
P_E = "a photo of a man wearing black glasses"
METHOD = EditedIDConfig(null_text=NullTextConfig(inner_steps=2))
PLAN = METHOD.plan(NoiseSchedule.scaled_linear())
LATENT = IMAGE_SIZE // 8


# ---- IdGlow: the identity schedule ---------------------------------------------------------------


def test_identity_schedules_parse_and_give_their_values():
    assert IdentitySchedule().values(6) == [1.0] * 6
    assert IdentitySchedule("decay-steps:1:0.5").values(6) == pytest.approx(
        [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    )
    assert IdentitySchedule("window-steps:2:4:1:0").values(6) == [0, 1, 1, 0, 0, 0], (
        "steps 1-based, the window [A, B)"
    )
    assert IdentitySchedule("decay-steps:1:0*window-steps:1:3:1:0.5").values(3) == pytest.approx(
        [1.0, 0.5, 0.0]
    )
    progress = noise_progress(PLAN)
    assert IdentitySchedule("decay:1:0.5").values(PLAN) == pytest.approx(
        [1 - 0.5 * p for p in progress]
    ), "decay is linear in the noise progress p, S_START at p = 0 (noise), S_END at p = 1"
    assert IdentitySchedule("window:0.2:0.5:1:0").values(PLAN) == [
        1.0 if 0.2 <= p < 0.5 else 0.0 for p in progress
    ]
    with pytest.raises(ValueError, match="noise level"):
        IdentitySchedule("decay:1:0").values(6)
    for bad in (
        "linear",
        "decay:1",
        "window-steps:3:2:1:0",
        "window:0.6:0.2:1:0",
        "window:0:2:1:0",
        "decay:2:0",
        "window-steps:1.5:3:1:0",
        "decay:a:b",
    ):
        with pytest.raises(ValueError, match="identity schedule"):
            IdentitySchedule(bad)


def test_a_noise_level_schedule_means_the_same_at_any_n_and_plan():
    schedule = NoiseSchedule.scaled_linear()
    spec = IdentitySchedule("decay:1:0.2*window:0:0.5:1:0.3")
    plans = [EditedIDConfig(solver=HybridSchedule(num_steps=n)).plan(schedule) for n in (6, 20)] + [
        ddim_plan(schedule, 6),
        ddim_plan(schedule, 12),
        ddim_plan(schedule, 12, "trailing"),
    ]
    at_t = {}
    for plan in plans:
        for step, p, s in zip(plan.steps, noise_progress(plan), spec.values(plan)):
            sigma, alpha = schedule.sigma(step.t), schedule.alpha(step.t)
            assert p == pytest.approx(alpha / (alpha + sigma)), "p = 1 − σ/(α + σ)"
            assert s == pytest.approx((1 - 0.8 * p) * (1.0 if p < 0.5 else 0.3))
            at_t.setdefault(step.t, []).append(s)
    shared = {t: v for t, v in at_t.items() if len(v) > 1}
    assert len(shared) >= 3 and all(max(v) == min(v) for v in shared.values()), (
        f"one noise level, one s, whatever the plan: {shared}"
    )
    for plan in plans:  # the window covers the same noise interval, a different count of steps
        inside = [p < 0.5 for p in noise_progress(plan)]
        assert inside == sorted(inside, reverse=True) and any(inside) and not all(inside)
    by_steps = IdentitySchedule("window-steps:1:4:1:0")
    assert by_steps.values(plans[0]) == by_steps.values(6), "the step forms count steps"


def _stage3(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ctx = sd.text_encoder(sd.tokenizer(["", P_O, P_E]))
    nulls = [ctx[0:1] + 0.1 * torch.randn(ctx[0:1].shape, generator=g) for _ in range(6)]
    z_T = torch.randn(1, 4, LATENT, LATENT, generator=g)
    d = Disentanglement(
        null_o=nulls,
        null_e=[n + 0.05 for n in nulls],
        z_T_o=z_T,
        z_T_e=z_T.clone(),
        z0=torch.zeros(2, 4, LATENT, LATENT),
        store=AttentionStore(),
        steps=[],
    )
    return d, ctx[1:2], ctx[2:3]


def _entangle(sd, method, d, c_o, c_e, mask_o, mask_e, tokens, **kw):
    return editedid.entangle(sd.unet, PLAN, method, d, c_o, c_e, mask_o, mask_e, [tokens], **kw)


def _id_tokens(sd):
    pos_o, pos_t = sd.tokenizer.align_tokens(P_O, P_E, "man")
    return list(zip(pos_t, pos_o))


def _face_square():
    m = torch.zeros(1, 1, LATENT, LATENT)
    m[..., 2:6, 2:6] = 1
    return m


def test_schedule_one_is_the_papers_gating_and_zero_leaves_t_as_e(tiny_sd):
    d, c_o, c_e = _stage3(tiny_sd)
    face, empty = _face_square(), torch.zeros(1, 1, LATENT, LATENT)
    tokens = Tokens(_id_tokens(tiny_sd))
    paper = _entangle(tiny_sd, METHOD, d, c_o, c_e, face, empty, tokens)
    ones = replace(METHOD, gating=GatingConfig(identity=IdentitySchedule("decay:1:1")))
    assert torch.equal(_entangle(tiny_sd, ones, d, c_o, c_e, face, empty, tokens), paper), (
        "s ≡ 1 must be bit for bit"
    )
    zeros = replace(METHOD, gating=GatingConfig(identity=IdentitySchedule("decay:0:0")))
    z = _entangle(tiny_sd, zeros, d, c_o, c_e, face, empty, tokens)
    assert torch.equal(z[2], z[1]), "s ≡ 0: T is its ungated branch, which equals E"
    assert not torch.equal(paper[2], paper[1]), "with s = 1 the gating changes T"


def test_the_result_moves_monotonically_with_s_in_the_gated_region(tiny_sd):
    d, c_o, c_e = _stage3(tiny_sd, seed=1)
    face, empty = _face_square(), torch.zeros(1, 1, LATENT, LATENT)
    tokens = Tokens(_id_tokens(tiny_sd))
    inside = face[0, 0].bool()
    latents = {}
    for s in (0.0, 0.25, 0.5, 0.75, 1.0):
        method = replace(METHOD, gating=GatingConfig(identity=IdentitySchedule(f"decay:{s}:{s}")))
        latents[s] = _entangle(tiny_sd, method, d, c_o, c_e, face, empty, tokens)[2][:, inside]
    distance = [float((latents[s] - latents[0.0]).norm()) for s in sorted(latents)]
    assert distance[0] == 0 and all(b > a for a, b in zip(distance, distance[1:])), (
        f"distance of T from s = 0 in the gated region, by s: {distance}"
    )


def _with_s(method, s):
    return replace(method, gating=GatingConfig(identity=IdentitySchedule(f"decay:{s}:{s}")))


def test_mask_free_at_schedule_zero_is_the_edit_bit_for_bit(tiny_sd):
    d, c_o, c_e = _stage3(tiny_sd, seed=2)
    full = torch.ones(1, 1, LATENT, LATENT)
    free = replace(METHOD, mask_free=True)
    tokens = Tokens(_id_tokens(tiny_sd))
    z = _entangle(tiny_sd, _with_s(free, 0), d, c_o, c_e, full, full, tokens)
    assert torch.equal(z[2], z[1]), "s ≡ 0: no mask, no blend, no O: T is E bit for bit"
    z = _entangle(tiny_sd, free, d, c_o, c_e, full, full, Tokens())
    assert not torch.equal(z[2], z[1]), "s ≡ 1 without tokens: O reaches T through self-attention"


class _Features:
    """The gating, recording at each gated self-attention site the distance of T's output rows from
    O's (conditional half): the features T takes from the attention."""

    def __init__(self, gating):
        self.gating, self.distances = gating, []

    def __call__(self, q, k, v, site, step=0):
        out = self.gating(q, k, v, site, step=step)
        if not site.is_cross and site.block in ("down", "mid"):
            out_ = default_attention(q, k, v) if out is None else out
            lay = self.gating.layout
            o, t = lay.row(0, True), lay.row(2, True)
            self.distances.append(float((out_[t] - out_[o]).norm() / out_[o].norm()))
        return out


def _t_feature_distance(sd, s, d, ctx, roll=None):
    """Mean relative distance of T's self-attention outputs from O's over the gated sites in one
    UNet call of Stage 3's first step, mask-free with O's share s; `roll` shifts O's latent."""
    lay = BatchLayout(3, cfg=True)
    z_o = d.z_T_o if roll is None else torch.roll(d.z_T_o, roll, (-2, -1))
    z = torch.cat([z_o, d.z_T_e, d.z_T_e])
    c_o, c_e = ctx
    cond = torch.cat([d.null_o[0], d.null_e[0], d.null_e[0], c_o, c_e, c_e])
    empty = torch.zeros(1, 1, LATENT, LATENT)
    gating = EditedIDGating(
        lay, empty, empty, config=_with_s(METHOD, s).gating, mutual=True, identity_values=[s]
    )
    rec = _Features(gating)
    with torch.no_grad():
        sd.unet(torch.cat([z, z]), PLAN.steps[0].timestep, cond, controller=at_step(rec, 0))
    return sum(rec.distances) / len(rec.distances)


def test_mask_free_moves_t_features_toward_o(tiny_sd):
    d, c_o, c_e = _stage3(tiny_sd, seed=2)
    g = torch.Generator().manual_seed(7)
    d.z_T_o = torch.randn(d.z_T_o.shape, generator=g)  # O another picture than E
    by_s = [_t_feature_distance(tiny_sd, s, d, (c_o, c_e)) for s in (0.0, 0.5, 1.0)]
    assert by_s[0] > by_s[1] > by_s[2] and by_s[2] < 0.8 * by_s[0], (
        f"T's self-attention features must come toward O's as s grows: {by_s}"
    )


def test_mask_free_face_comes_closer_to_the_original_as_s_grows(tiny_sd):
    x_o, x_e = random_image(3), random_image(4)
    face = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    face[..., 16:48, 16:48] = 1
    inside = face.bool().expand(1, 3, -1, -1)

    def rms(a, b):
        return float((a - b)[inside].pow(2).mean().sqrt())

    to_o, to_recon = [], []
    for s in (0.0, 0.5, 1.0):
        method = _with_s(replace(METHOD, mask_free=True), s)
        r = EditedID(tiny_sd, RestoreConfig(method, image_size=IMAGE_SIZE)).restore(
            x_o, x_e, P_O, P_E, ["man"], ["glasses"], progress=False
        )
        to_o.append(rms(r.image, x_o))
        to_recon.append(rms(r.image, r.reconstructions["original"]))
    assert to_o[0] > to_o[1] > to_o[2], f"face RMS to the original by s = 0, ½, 1: {to_o}"
    assert to_recon[0] > to_recon[1] > to_recon[2] and to_recon[2] < 0.97 * to_recon[0], (
        f"face RMS to O's reconstruction by s = 0, ½, 1: {to_recon}"
    )


def test_mask_free_identity_needs_no_position_alignment(tiny_sd):
    """O's keys and values are a set: moving O's features to other rows changes nothing T gets,
    where the masks' rows take O at T's own positions."""
    side = 4
    site = Site("down", 0, 0, "self", side, side)
    lay = BatchLayout(3, cfg=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(lay.size, 2, side * side, 8, generator=g) for _ in range(3))
    shift = torch.roll(torch.arange(side * side), 5)  # O's rows moved: O's face elsewhere
    moved = [x.clone() for x in (q, k, v)]
    for x in moved:
        for cond in (True, False):
            o = lay.row(0, cond)
            x[o] = x[o][:, shift]
    full, empty = torch.ones(1, 1, side, side), torch.zeros(1, 1, side, side)
    mutual = EditedIDGating(lay, empty, empty, mutual=True)
    masked = EditedIDGating(lay, full, empty)
    t = lay.row(2)
    a, b = mutual(q, k, v, site), mutual(*moved, site)
    assert torch.allclose(a[t], b[t], atol=1e-6), "mutual attention depends on where O's rows lie"
    a, b = masked(q, k, v, site), masked(*moved, site)
    assert not torch.allclose(a[t], b[t], atol=1e-3), "masked rows must follow O's positions"
    # through the UNet: O's latent shifted by 3 × 2 latent pixels still moves T's features to O's
    d, c_o, c_e = _stage3(tiny_sd, seed=2)
    d.z_T_o = torch.randn(d.z_T_o.shape, generator=torch.Generator().manual_seed(7))
    by_s = [_t_feature_distance(tiny_sd, s, d, (c_o, c_e), roll=(3, 2)) for s in (0.0, 1.0)]
    assert by_s[1] < 0.8 * by_s[0], f"shifted O: T's feature distance by s = 0, 1: {by_s}"


# ---- ConsistentID: regions -----------------------------------------------------------------------


def built_face(cx=32.0, cy=30.0, d_eye=20.0, swap: tuple[str, str] | None = None) -> faces.Face:
    """A face whose 106 landmarks lie where the groups of `GROUPS_106` say, drawn in the face frame
    (eyes at (±0.5, 0), eye distance 1) around its five keypoints; `swap` exchanges the points of
    two groups."""
    kps = np.array(
        [
            [cx - d_eye / 2, cy],
            [cx + d_eye / 2, cy],
            [cx, cy + 0.45 * d_eye],
            [cx - 0.35 * d_eye, cy + 0.9 * d_eye],
            [cx + 0.35 * d_eye, cy + 0.9 * d_eye],
        ]
    )
    ring = lambda n, c, rx, ry: [
        (c[0] + rx * math.cos(a), c[1] + ry * math.sin(a))  # noqa: E731
        for a in np.linspace(0, 2 * math.pi, n, endpoint=False)
    ]
    local = {
        "jaw": [
            (math.cos(a) * 1.0, 0.3 + math.sin(a) * 1.0)
            for a in np.linspace(0.1, math.pi - 0.1, 33)
        ],
        "eye_a": ring(10, (-0.5, 0.0), 0.15, 0.07),
        "eye_b": ring(10, (0.5, 0.0), 0.15, 0.07),
        "brow_a": [(-0.75 + 0.5 * t, -0.3) for t in np.linspace(0, 1, 9)],
        "brow_b": [(0.25 + 0.5 * t, -0.3) for t in np.linspace(0, 1, 9)],
        "mouth": ring(20, (0.0, 0.9), 0.38, 0.1),
        "nose": [
            (0.15 * math.cos(a), 0.1 + 0.45 * (i / 14)) for i, a in enumerate(np.linspace(0, 6, 15))
        ],
    }
    if swap:
        a, b = swap
        local[a], local[b] = (
            (local[b] + local[b])[: len(local[a])],
            (local[a] + local[a])[: len(local[b])],
        )
    frame = face_frame(kps)
    back = np.linalg.inv(np.vstack([frame, [0, 0, 1]]))[:2]
    pts = np.zeros((106, 2))
    for name, idx in GROUPS_106.items():
        pts[list(idx)] = np.asarray(local[name]) @ back[:, :2].T + back[:, 2]
    box = np.array([cx - d_eye, cy - d_eye, cx + d_eye, cy + 1.5 * d_eye])
    return faces.Face(box=box, score=0.9, kps=kps, landmarks_106=pts)


def test_the_landmark_check_accepts_the_layout_and_rejects_swapped_groups():
    face = built_face()
    groups, why = landmark_groups(face.landmarks_106, face.kps)
    assert groups is not None and why == "", why
    for swap in (("nose", "mouth"), ("eye_a", "brow_a"), ("mouth", "jaw")):
        bad = built_face(swap=swap)
        groups, why = landmark_groups(bad.landmarks_106, bad.kps)
        assert groups is None and why, f"swapped {swap} passed the check"
        _, note = region_masks(IMAGE_SIZE, bad.kps, bad.landmarks_106)
        assert "5 keypoints" in note and why in note, f"the fallback must say why: {note}"


@pytest.mark.parametrize("swap", [None, ("nose", "mouth")])
def test_region_masks_lie_in_the_face_and_do_not_overlap_beyond_their_feathering(swap):
    face = built_face(swap=swap)
    hard, _ = region_masks(IMAGE_SIZE, face.kps, face.landmarks_106)
    union = sum(hard.values())
    assert float(union.max()) <= 1.0, "the regions overlap before feathering"
    landmarks = None if swap else face.landmarks_106
    face_mask = masks.face_mask(IMAGE_SIZE, kps=face.kps, landmarks_106=landmarks)
    for name, m in hard.items():
        assert float(m.sum()) > 0, f"{name} is empty"
        assert bool((m <= face_mask).all()), f"{name} leaves the face mask"
    sigma = 1.5
    soft, _ = region_masks(IMAGE_SIZE, face.kps, face.landmarks_106, feather=sigma)
    band = math.ceil(3 * sigma)
    for a in hard:
        for b in hard:
            if a < b:
                overlap = (soft[a] > 0) & (soft[b] > 0)
                near = (masks.dilate(hard[a], band) > 0) & (masks.dilate(hard[b], band) > 0)
                assert bool((~overlap | near).all()), f"{a} and {b} overlap beyond their feathering"


def test_regions_parse_and_refuse_clear_mistakes(tmp_path):
    choices = parse_regions("eyes=original,mouth=edited:0.7")
    assert choices["eyes"].source == "original" and choices["mouth"].lambda_o == 0.7
    (tmp_path / "r.json").write_text(
        '{"nose": {"source": "original", "lambda": 0.2}, "skin": "edited"}'
    )
    assert parse_regions(tmp_path / "r.json")["nose"].lambda_o == 0.2
    for bad, match in (
        ("ears=original", "unknown region"),
        ("eyes=both", "source"),
        ("eyes=edited:2", "λ"),
        ("eyes", "REGION=SOURCE"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_regions(bad)


class OneFace:
    def __init__(self, face):
        self.face = face

    def analyze(self, image):
        return [self.face]


def test_an_original_region_alone_is_todays_method_on_that_mask(tiny_sd):
    face = built_face()
    pipe = EditedID(tiny_sd, RestoreConfig(METHOD, image_size=IMAGE_SIZE))
    x_o, x_e = random_image(3), random_image(4)
    by_region = pipe.restore(
        x_o,
        x_e,
        P_O,
        P_E,
        ["man"],
        ["glasses"],
        regions="nose=original",
        analyzer=OneFace(face),
        progress=False,
    )
    s = IMAGE_SIZE
    nose, _ = region_masks(s, face.kps, face.landmarks_106, pipe.config.face_mask_feather * s)
    by_mask = pipe.restore(
        x_o, x_e, P_O, P_E, ["man"], ["glasses"], face_mask=nose["nose"], progress=False
    )
    assert torch.equal(by_region.image, by_mask.image), (
        "regions=nose:original must be the method on the nose mask"
    )
    assert set(by_region.regions) == {"eyes", "brows", "nose", "mouth", "skin"}


def test_an_edited_region_keeps_e_exactly(tiny_sd):
    d, c_o, c_e = _stage3(tiny_sd, seed=3)
    d.z_T_e = d.z_T_o + 0.5  # T starts elsewhere than E: only the blend can make T's latents E's
    face = torch.ones(1, 1, LATENT, LATENT)
    keep = torch.zeros(1, 1, LATENT, LATENT)
    keep[..., 5:7, 3:5] = 1  # e.g. the mouth, kept from the edit
    z = _entangle(
        tiny_sd,
        METHOD,
        d,
        c_o,
        c_e,
        face,
        torch.zeros_like(face),
        Tokens(_id_tokens(tiny_sd)),
        keep_e=keep,
    )
    region = keep[0, 0].bool()
    assert torch.equal(z[2][:, region], z[1][:, region]), (
        "a region kept from the edit must be E's latent exactly"
    )
    assert not torch.equal(z[2][:, ~region], z[1][:, ~region]), "the rest of the face is restored"


def test_localised_token_replacement_changes_no_row_outside_its_region():
    side = 4
    site = Site("down", 0, 0, "cross", side, side)
    lay = BatchLayout(3, cfg=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(lay.size, 2, n, 8, generator=g) for n in (side * side, 77, 77))
    region = torch.zeros(1, 1, side, side)
    region[..., 1:3, 0:2] = 1
    empty = torch.zeros(1, 1, side, side)
    plain = EditedIDGating(lay, empty, empty, id_tokens=[(5, 5)])
    local = EditedIDGating(
        lay, empty, empty, id_tokens=[(5, 5)], local_tokens=[LocalTokens([(7, 6)], 0, region)]
    )
    a, b = plain(q, k, v, site), local(q, k, v, site)
    t = lay.row(2)
    inside = region.reshape(-1).bool()
    assert torch.equal(a[t][:, ~inside], b[t][:, ~inside]), "rows outside the region changed"
    assert not torch.equal(a[t][:, inside], b[t][:, inside]), (
        "rows inside the region were not edited"
    )
    assert torch.equal(a[:t], b[:t]) and torch.equal(a[t + 1 :], b[t + 1 :]), (
        "only T's conditional row is edited"
    )


def test_localised_tokens_move_the_sources_values_inside_the_region_only():
    """Same word, same map: swapping map columns is nearly nothing; the word's values from the
    source change the region's rows by P[:, j]·(V_src[j] − V_T[j]) and no row outside."""
    side = 4
    site = Site("down", 0, 0, "cross", side, side)
    lay = BatchLayout(3, cfg=True)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(lay.size, 2, n, 8, generator=g) for n in (side * side, 77, 77))
    o, t = lay.row(0), lay.row(2)
    q[o], k[o] = q[t], k[t]  # O's map of the word equals T's: only the values differ
    region = torch.zeros(1, 1, side, side)
    region[..., 1:3, 0:2] = 1
    empty = torch.zeros(1, 1, side, side)
    inside = region.reshape(-1).bool()
    base = EditedIDGating(lay, empty, empty)(q, k, v, site)
    base = default_attention(q, k, v) if base is None else base
    changes = {}
    for move in (False, True):
        local = [LocalTokens([(7, 7)], 0, region, move_values=move)]
        out = EditedIDGating(lay, empty, empty, local_tokens=local)(q, k, v, site)
        assert torch.equal(out[t][:, ~inside], base[t][:, ~inside]), "a row outside changed"
        changes[move] = float((out[t][:, inside] - base[t][:, inside]).norm())
    p = torch.softmax(q[t] @ k[t].transpose(-1, -2) / 8**0.5, -1)[:, inside, 7:8]
    expected = p * (v[o][:, 7:8] - v[t][:, 7:8])
    assert changes[False] < 1e-5, f"maps alone, the same map: {changes}"
    assert changes[True] == pytest.approx(float(expected.norm()), rel=1e-4), changes


def test_localised_region_words_change_their_region_most_through_the_whole_unet(tiny_sd):
    """End to end on the tiny models: a region word in both prompts ("eyes") has its columns taken
    from the original inside the eyes only. Against the same restore without the localisation, z_0^T
    moves most inside the eyes, less in the rest of the restored region (the later layers' attention
    spreads it), and not at all outside the blended region; moving the word's values moves the eyes
    more than swapping its maps alone. (Measured at 128², mean |Δz|: eyes 0.0018, the rest of the
    blended region 0.0005, outside it 0; maps alone, eyes 0.0013.)"""
    import copy

    from minid.restore.inputs import RestorePair, check_pair, face_masks

    s = 128
    pipe = EditedID(tiny_sd, RestoreConfig(METHOD, image_size=s))
    face = built_face(64.0, 56.0, 44.0)
    element = torch.zeros(s, s)
    element[100:120, 10:30] = 1  # far from the face
    pair = RestorePair(
        random_image(3, s),
        random_image(4, s),
        "a photo of a man with blue eyes",
        "a photo of a man with brown eyes wearing black glasses",
        ["man"],
        ["glasses"],
        element_mask=element,
        regions="eyes=original",
    )
    job = check_pair(pair, tiny_sd.tokenizer, pipe.config)
    face_masks(job, OneFace(face), pipe.config, tiny_sd.tokenizer, "the original")
    assert len(job.text.tokens.local) == 1, "the region word 'eyes' is localised"
    plain, maps = copy.deepcopy(job), copy.deepcopy(job)
    plain.text.tokens.local.clear()
    maps.text.tokens.local[0].move_values = False
    z = {
        name: pipe.restore_checked(j, progress=False).latent
        for name, j in (("values", job), ("plain", plain), ("maps", maps))
    }
    eyes = region_masks(s, face.kps, face.landmarks_106, pipe.config.face_mask_feather * s)[0]
    eyes = masks.to_resolution(eyes["eyes"][None, None].float(), s // 8, how="area")[0, 0] > 0.5
    blend = pipe.restore_checked(copy.deepcopy(plain), progress=False).masks["blend"][0, 0] > 0
    change = {k: (z[k] - z["plain"]).abs().mean(1)[0] for k in ("values", "maps")}
    inside, rest = change["values"][eyes].mean(), change["values"][blend & ~eyes].mean()
    assert bool(eyes.any()) and bool((~blend).any()) and bool((blend & ~eyes).any())
    assert float(change["values"][~blend].abs().max()) == 0.0, "a latent outside the blend moved"
    assert inside > 2 * rest > 0, (float(inside), float(rest))
    assert inside > 1.1 * change["maps"][eyes].mean(), "the values move the region more"


def test_region_scores_of_identical_images_are_perfect():
    face = built_face()
    x = random_image(5)[0]
    scores = region_scores(x, x, face.kps, face.landmarks_106, size=128)
    assert set(scores) == {"eyes", "brows", "nose", "mouth", "skin"}
    for name, s in scores.items():
        assert s["psnr"] == math.inf and abs(s["ssim"] - 1) < 1e-9, f"{name}: {s}"
    other = region_scores(x, random_image(6)[0], face.kps, face.landmarks_106, size=128)
    assert all(s["psnr"] < 40 and s["ssim"] < 1 for s in other.values()), other


def test_each_region_is_scored_against_its_own_source():
    face = built_face()
    x_o, x_e = random_image(5)[0], random_image(6)[0]
    sources = {"eyes": "original", "mouth": "edited"}
    kept = region_scores(x_o, x_e, face.kps, face.landmarks_106, 128, edited=x_e, sources=sources)
    assert kept["mouth"]["against"] == "edited" and kept["mouth"]["psnr"] == math.inf, kept
    assert kept["eyes"]["against"] == "original" and kept["eyes"]["psnr"] < 40, kept
    restored = region_scores(
        x_o, x_o, face.kps, face.landmarks_106, 128, edited=x_e, sources=sources
    )
    assert restored["eyes"]["psnr"] == math.inf and restored["mouth"]["psnr"] < 40, restored


def test_eval_reports_each_region(tmp_path):
    import json

    from PIL import Image

    from minid.app.evaluate import evaluate_folder

    face = built_face(cx=64, cy=60, d_eye=40)
    face.embedding = np.ones(512)
    pixels = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    for role in ("original", "edited", "result"):
        (tmp_path / role).mkdir()
        Image.fromarray(pixels).save(tmp_path / role / "same.png")
    evaluate_folder(tmp_path, OneFace(face), progress=False)
    row = json.loads((tmp_path / "metrics.json").read_text())["rows"][0]
    for region in ("eyes", "brows", "nose", "mouth", "skin"):
        assert row[f"{region}_psnr"] == "inf" and row[f"{region}_ssim"] == pytest.approx(1.0), (
            f"{region}: identical images give PSNR inf ('inf' in JSON, as in the CSV) and SSIM 1, "
            f"got {row}"
        )


def test_the_schedule_and_the_regions_are_saved_with_the_intermediates(tiny_sd, tmp_path):
    import json

    face = built_face()
    method = replace(
        METHOD, gating=GatingConfig(identity=IdentitySchedule("window-steps:1:4:1:0.5"))
    )
    pipe = EditedID(tiny_sd, RestoreConfig(method, image_size=IMAGE_SIZE))
    result = pipe.restore(
        random_image(3),
        random_image(4),
        P_O,
        P_E,
        ["man"],
        ["glasses"],
        regions="eyes=original,mouth=edited:0.3",
        analyzer=OneFace(face),
        progress=False,
        save_intermediates=tmp_path,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["identity_schedule"] == [1, 1, 1, 0.5, 0.5, 0.5] == result.identity_schedule
    assert set(summary["regions"]) == {"eyes", "brows", "nose", "mouth", "skin"}
    against = {r: v["against"] for r, v in summary["regions"].items()}
    assert against == {
        "eyes": "original",
        "mouth": "edited",
        "brows": "edited",
        "nose": "edited",
        "skin": "edited",
    }, "a region restored from the original is scored against it; the others against the edit"
    assert (tmp_path / "identity_schedule.png").is_file()
    assert any("regions eyes=original, mouth=edited:0.3" in n for n in result.notes), result.notes
