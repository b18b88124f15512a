"""Attention controllers against explicit float64 maps, on random q, k, v (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch

from minid.method.control import AttentionStore, BatchLayout, Chain, word_mask
from minid.method.gating import EditedIDGating, GatingConfig, gating_weights
from minid.method.prompt_to_prompt import PromptToPrompt, prompt_alignment
from minid.models.attention import Site, at_step, default_attention
from minid.models.tokenizer import CLIPTokenizer

SIDE = 4  # a 4×4 query grid
N = SIDE * SIDE
HEADS, D = 2, 8
DOWN_SELF = Site("down", 0, 0, "self", SIDE, SIDE)
UP_SELF = Site("up", 1, 5, "self", SIDE, SIDE)
DOWN_CROSS = Site("down", 0, 0, "cross", SIDE, SIDE)


def probs(q, k):
    q, k = q.double(), k.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, Nq, Nk)


def qkv(batch, n_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, HEADS, N, D, generator=g),
        torch.randn(batch, HEADS, n_k, D, generator=g),
        torch.randn(batch, HEADS, n_k, D, generator=g),
    )


def half_masks():
    mask_o = torch.zeros(1, 1, SIDE, SIDE)
    mask_o[..., :, : SIDE // 2] = 1  # left half: the face
    mask_e = torch.zeros(1, 1, SIDE, SIDE)
    mask_e[..., 1:3, 1:3] = 1  # a centre square, overlapping the face in one column
    return mask_o, mask_e


def test_batch_layout_rows():
    lay = BatchLayout(3, cfg=True)
    assert [lay.row(b, cond=False) for b in range(3)] == [0, 1, 2]
    assert [lay.row(b) for b in range(3)] == [3, 4, 5]
    assert BatchLayout(2, cfg=False).row(1) == 1
    with pytest.raises(ValueError, match="branch 3"):
        lay.row(3)


def test_gating_weights_follow_eq_8():
    mask_o, mask_e = half_masks()
    w = gating_weights(mask_o, mask_e, 0.3, 0.7, (SIDE, SIDE)).reshape(3, SIDE, SIDE)
    mo, me = mask_o[0, 0].bool(), mask_e[0, 0].bool()
    assert torch.equal(w[0][mo & ~me], torch.ones(int((mo & ~me).sum()))), (
        "exclusive M_O rows must be O's"
    )
    assert torch.equal(w[1][me & ~mo], torch.ones(int((me & ~mo).sum()))), (
        "exclusive M_E rows must be E's"
    )
    assert torch.allclose(w[0][mo & me], torch.tensor(0.3)) and torch.allclose(
        w[1][mo & me], torch.tensor(0.7)
    )
    assert torch.equal(w[2][~mo & ~me], torch.ones(int((~mo & ~me).sum()))), (
        "rows outside both masks stay T's"
    )
    assert torch.allclose(w.sum(0), torch.ones(SIDE, SIDE)), "each row's weights must sum to 1"
    with pytest.raises(ValueError, match="λ_O"):
        GatingConfig(lambda_o=1.5)
    assert GatingConfig(lambda_o=0.3).lambda_e == 0.7, (
        "λ_E = 1 − λ_O keeps every row's weights summing to 1"
    )


@pytest.mark.parametrize("mode", ["output", "map"])
def test_gating_self_attention_mixes_rows_as_eq_7(mode):
    mask_o, mask_e = half_masks()
    lay = BatchLayout(3, cfg=True)
    q, k, v = qkv(lay.size, N)
    ctrl = EditedIDGating(lay, mask_o, mask_e, config=GatingConfig(lambda_o=0.4, mode=mode))
    out = ctrl(q, k, v, DOWN_SELF)
    w = gating_weights(mask_o, mask_e, 0.4, 0.6, (SIDE, SIDE)).double()  # (3, Nq)
    for cond in (False, True):
        o, e, t = (lay.row(b, cond) for b in range(3))
        vs = [v[r] for r in (o, e, t)] if mode == "output" else [v[t]] * 3
        ref = sum(
            w[s][None, :, None] * (probs(q[r], k[r]) @ vs[s].double())
            for s, r in enumerate((o, e, t))
        )
        err = (out[t].double() - ref).abs().max().item()
        assert err < 1e-5, f"{mode}, cond={cond}: gated rows differ from Eq. 7 by {err}"
    for r in (0, 1, 3, 4):  # O and E are never edited
        assert torch.allclose(
            out[r], default_attention(q[r : r + 1], k[r : r + 1], v[r : r + 1])[0], atol=1e-6
        )
    assert ctrl(q, k, v, UP_SELF) is None, "up blocks are not gated by default"
    windowed = EditedIDGating(
        lay, mask_o, mask_e, config=GatingConfig(lambda_o=0.4, mode=mode, self_steps=(0, 2))
    )
    assert windowed(q, k, v, DOWN_SELF, step=3) is None, "outside the step window nothing is gated"
    assert torch.equal(at_step(windowed, 1)(q, k, v, DOWN_SELF), out), (
        "inside the window: the same gating"
    )


def test_gating_cross_attention_takes_token_columns_from_o_and_e():
    lay = BatchLayout(3, cfg=True)
    q, k, v = qkv(lay.size, 77, seed=1)
    mask = torch.zeros(1, 1, SIDE, SIDE)
    ctrl = EditedIDGating(lay, mask, mask, id_tokens=[(5, 4)], element_tokens=[(7, 7), (8, 9)])
    out = ctrl(q, k, v, DOWN_CROSS)
    o, e, t = lay.row(0), lay.row(1), lay.row(2)
    p = probs(q[t], k[t]).clone()
    p[..., 5] = probs(q[o], k[o])[..., 4]
    p[..., 7] = probs(q[e], k[e])[..., 7]
    p[..., 8] = probs(q[e], k[e])[..., 9]
    err = (out[t].double() - p @ v[t].double()).abs().max().item()
    assert err < 1e-5, f"token-selective replacement differs from Eq. 9 by {err}"
    uncond_t = lay.row(2, cond=False)
    assert torch.allclose(out[uncond_t], default_attention(q, k, v)[uncond_t], atol=1e-6), (
        "the unconditional row has no words: its cross-attention must not be edited"
    )
    empty = EditedIDGating(lay, mask, mask)
    assert empty(q, k, v, DOWN_CROSS) is None and empty(q, k, v, DOWN_SELF) is None


def test_attention_store_keeps_head_averaged_cross_maps():
    q, k, v = qkv(2, 77, seed=2)
    store = AttentionStore(rows=[1])
    out = store(q, k, v, DOWN_CROSS)
    store(q, k, v, DOWN_CROSS)
    assert store(q, k, v, DOWN_SELF) is None, "self-attention is not stored"
    assert torch.allclose(out, default_attention(q, k, v), atol=1e-5)
    key = next(iter(store.maps))
    assert store.counts[key] == 2
    ref = probs(q[1:2], k[1:2]).mean(1)  # (1, Nq, 77)
    assert torch.allclose(store.mean(key).double(), ref, atol=1e-6)


def test_word_mask_finds_the_attended_region():
    store = AttentionStore()
    amap = torch.full((1, 64, 77), 0.01)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:5, 3:6] = True
    amap[0, region.flatten(), 6] = 1.0
    site = Site("down", 1, 2, "cross", 8, 8)
    store.maps[("down", 1, 2, "cross")] = amap
    store.counts[("down", 1, 2, "cross")] = 1
    store.sites[("down", 1, 2, "cross")] = site
    m = word_mask(store, 0, [6], (16, 16), map_factors=(2,), pool=1, threshold=0.5)
    assert m.shape == (1, 1, 16, 16)
    up = region.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert bool(m[0, 0][up[:, :]].float().mean() > 0.7), "the attended region is not in the mask"
    assert float(m[0, 0][~up].mean()) < 0.2, "the mask spills over the unattended region"
    with pytest.raises(ValueError, match="no stored cross-attention maps"):
        word_mask(store, 0, [6], (16, 16), map_factors=(4,))


@pytest.mark.parametrize("n", [6, 10, 50])
def test_prompt_to_prompt_windows_round_as_the_authors_code(n):
    p2p = PromptToPrompt(
        BatchLayout(2),
        [torch.arange(77)],
        cross_window=(0.0, 0.8),
        self_window=(0.0, 0.4),
        num_steps=n,
    )
    cross = [i for i in range(n) if p2p.cross_active(i)]
    self_ = [i for i in range(n) if p2p.self_active(i)]
    assert cross == list(range(int(0.8 * (n + 1)))), f"N={n}: cross window {cross}"
    assert self_ == list(range(int(0.4 * n))), f"N={n}: self window {self_}"
    if n == 6:
        assert len(self_) == 2 and len(cross) == 5, (
            "at N = 6: 2 self-injection steps, 5 cross-replacement steps"
        )


def test_reweight_acts_only_inside_the_cross_window_unless_asked_for_every_step():
    lay = BatchLayout(2, cfg=True)
    q, k, v = qkv(lay.size, 77, seed=6)
    reweight = [{3: 2.0}]
    p2p = PromptToPrompt(lay, [torch.arange(77)], reweight=reweight, num_steps=10)
    outside = 9  # int(0.8·11) = 8: steps 0-7 replace, 8-9 do not
    assert not p2p.cross_active(outside) and p2p(q, k, v, DOWN_CROSS, step=outside) is None, (
        "outside the cross window the reweighted attention must be left untouched"
    )
    every = PromptToPrompt(
        lay, [torch.arange(77)], reweight=reweight, num_steps=10, reweight_every_step=True
    )
    out = every(q, k, v, DOWN_CROSS, step=outside)
    tgt = lay.row(1)
    p = probs(q[tgt], k[tgt]).clone()  # the target's own map (no replacement), column 3 scaled
    p[..., 3] *= 2.0
    err = (out[tgt].double() - p @ v[tgt].double()).abs().max().item()
    assert err < 1e-5, f"reweight at every step differs from the explicit map by {err}"


def test_prompt_to_prompt_self_injection_and_reweight():
    lay = BatchLayout(2, cfg=True)
    q, k, v = qkv(lay.size, N, seed=3)
    ident = torch.arange(77)
    p2p = PromptToPrompt(
        lay, [ident], reweight=[{3: 2.0}], self_window=(0.0, 0.5), self_max_side=SIDE, num_steps=10
    )
    out = p2p(q, k, v, DOWN_SELF)
    src, tgt = lay.row(0), lay.row(1)
    err = (out[tgt].double() - probs(q[src], k[src]) @ v[tgt].double()).abs().max().item()
    assert err < 1e-5, f"self-attention injection is not P_src V_tgt (error {err})"
    assert p2p(q, k, v, DOWN_SELF, step=6) is None, "self injection must stop after its window"
    qc, kc, vc = qkv(lay.size, 77, seed=4)
    out = p2p(qc, kc, vc, DOWN_CROSS, step=6)  # step 6 of 10: inside the cross window (0, 0.8)
    p = probs(qc[src], kc[src]).clone()  # identity alignment: every column from the source
    p[..., 3] *= 2.0
    err = (out[tgt].double() - p @ vc[tgt].double()).abs().max().item()
    assert err < 1e-5, f"replace + reweight differs from the explicit map by {err}"


# The authors' aligner (prompt-to-prompt's seq_aligner.get_mapper) on these pairs, written out by
# hand: each target position's source position, -1 for a target token of its own. Tokens: "a photo
# of a cat in a forest" is bos a photo of a cat in a forest eos (positions 0-9), then padding
# (10-76), which maps to itself.
REFINE_TABLES = {
    ("a photo of a cat", "a photo of a cat in a forest"): [0, 1, 2, 3, 4, 5, -1, -1, -1, 6, 10, 11],
    ("a photo of a man", "a photo of a man wearing black glasses"): [
        0,
        1,
        2,
        3,
        4,
        5,
        -1,
        -1,
        -1,
        6,
        10,
        11,
    ],
    # equal scores: "photo" pairs with the source's "photo", "a cat" stays the target's own
    ("a cat in a photo", "a photo of a cat"): [0, 1, 5, -1, -1, -1, 6, 7, 8, 9, 10, 11],
    ("a dog", "a big dog"): [0, 1, -1, 2, 3, 5, 6, 7, 8, 9, 10, 11],
}


@pytest.mark.parametrize("pair", sorted(REFINE_TABLES))
def test_refine_alignment_is_the_authors_aligner(pair):
    tok = CLIPTokenizer.default()
    m = prompt_alignment(tok, *pair, "refine")
    assert m[:12].tolist() == REFINE_TABLES[pair], f"{pair}: {m[:12].tolist()}"
    assert m[12:].tolist() == list(range(12, 77)), (
        "padding takes the source's column at its own position"
    )


def test_prompt_alignment(sd14_reference):
    tok = CLIPTokenizer.from_folder(sd14_reference / "hub" / "tokenizer")
    src, tgt = "a photo of a man", "a photo of a man wearing black glasses"
    r = prompt_alignment(tok, "a photo of a man", "a photo of a woman", "replace")
    assert r[:6].tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="as many words"):
        prompt_alignment(tok, src, tgt, "replace")


def test_a_chain_uses_its_editors_output_and_lets_observers_see_the_same_call():
    lay = BatchLayout(2, cfg=True)
    q, k, v = qkv(lay.size, 77, seed=5)
    p2p = PromptToPrompt(lay, [torch.arange(77)], num_steps=10)
    store = AttentionStore()
    out = Chain(p2p, store)(q, k, v, DOWN_CROSS, step=2)
    assert torch.equal(out, p2p(q, k, v, DOWN_CROSS, step=2)), (
        "the chain's output must be the editor's"
    )
    key = (DOWN_CROSS.block, DOWN_CROSS.level, DOWN_CROSS.index, DOWN_CROSS.kind)
    assert store.counts[key] == 1 and torch.allclose(
        store.maps[key], probs(q, k).mean(1).float(), atol=1e-6
    ), "the observer must store the unedited maps of the same call"
    assert Chain(p2p, store)(q, k, v, DOWN_CROSS, step=9) is None, (
        "outside the editor's window: no edit"
    )
