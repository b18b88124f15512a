"""minid.models.unet.UNet against diffusers.UNet2DConditionModel on the same random weights (fp32,
CPU), the attention seam (sites, pass-through, replacement), and the state-dict layout of the
published file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_parity import assert_matches_layout, compare, fullsize_pair, minid_from, randomize_

from minid.models.attention import Site, default_attention
from minid.models.config import UNetConfig
from minid.models.unet import UNet

diffusers = pytest.importorskip("diffusers")

# Parity bound (reference_parity.REL_TOL) on max|minid - diffusers| / max|diffusers|: the two
# compute the same operations in the same order, so the measured error is 0 or float rounding
# (~1e-7).


def reference_unet(cfg: UNetConfig) -> "diffusers.UNet2DConditionModel":
    """The diffusers model with the architecture `cfg` describes (uninitialised: call
    `randomize_`)."""
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(
            sample_size=cfg.sample_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            down_block_types=cfg.down_block_types,
            up_block_types=cfg.up_block_types,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            attention_head_dim=cfg.num_heads,  # SD1.x: this field is the number of heads
            cross_attention_dim=cfg.cross_attention_dim,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=cfg.norm_eps,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
            downsample_padding=cfg.downsample_padding,
        )
    return ref.to_empty(device="cpu").eval()


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    height=st.sampled_from([8, 16, 24, 12, 9]),
    width=st.sampled_from([8, 16, 24, 20]),
    base=st.sampled_from([16, 32]),
    heads=st.sampled_from([1, 2, 4]),
    layers=st.integers(1, 2),
    per_sample_t=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_tiny_matches_diffusers(batch, height, width, base, heads, layers, per_sample_t, seed):
    cfg = UNetConfig(
        block_out_channels=(base, 2 * base, 2 * base, 2 * base),
        layers_per_block=layers,
        num_heads=heads,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=16,
    )
    ref = randomize_(reference_unet(cfg), seed)
    model = minid_from(ref, UNet, cfg)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, height, width, generator=g)
    context = torch.randn(batch, 77, 32, generator=g)
    t = (
        torch.randint(0, 1000, (batch,), generator=g)
        if per_sample_t
        else int(torch.randint(0, 1000, (), generator=g))
    )
    with torch.no_grad():
        compare(
            f"tiny unet {tuple(sample.shape)} t={t}",
            model(sample, t, context),
            ref(sample, t, context).sample,
        )


def test_timestep_forms_agree():
    """int, 0-d tensor, (1,) and (B,) timesteps mean the same thing; per-sample timesteps act per
    sample."""
    cfg = UNetConfig.tiny()
    model = minid_from(randomize_(reference_unet(cfg)), UNet, cfg)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        outs = [
            model(sample, t, context)
            for t in (500, torch.tensor(500), torch.tensor([500]), torch.tensor([500, 500]), 500.0)
        ]
        for out in outs[1:]:
            assert torch.equal(out, outs[0]), "every way of passing t=500 must give the same output"
        mixed = model(sample, torch.tensor([10, 900]), context)
        first = model(sample[:1], 10, context[:1])
        second = model(sample[1:], 900, context[1:])
    torch.testing.assert_close(mixed, torch.cat([first, second]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1]), "different timesteps must give different outputs"
    with pytest.raises(ValueError, match="timestep has shape"):
        model(sample, torch.tensor([1, 2, 3]), context)


class Recorder:
    """A controller that only observes: records each call's site and shapes, returns None."""

    def __init__(self):
        self.calls: list[tuple[Site, tuple, tuple]] = []

    def __call__(self, q, k, v, site):
        self.calls.append((site, tuple(q.shape), tuple(k.shape)))
        return None


@pytest.fixture(scope="module")
def sd14_layout_tiny():
    """A tiny UNet with SD1.4's layout (block types, 2 layers per block: 16 transformer blocks)."""
    cfg = dataclasses.replace(UNetConfig.tiny(), layers_per_block=2)
    ref = randomize_(reference_unet(cfg))
    return minid_from(ref, UNet, cfg), ref


def test_seam_sees_32_sites_in_forward_order(sd14_layout_tiny):
    model, _ = sd14_layout_tiny
    h, w = 16, 24  # non-square, so height and width cannot be confused
    rec = Recorder()
    with torch.no_grad():
        model(torch.randn(1, 4, h, w), 1, torch.randn(1, 77, 32), controller=rec)
    # (block, level, grid divisor) for the 16 transformer blocks of SD1.4 in forward order
    layout = (
        [("down", 0, 1)] * 2
        + [("down", 1, 2)] * 2
        + [("down", 2, 4)] * 2
        + [("mid", 0, 8)]
        + [("up", 1, 4)] * 3
        + [("up", 2, 2)] * 3
        + [("up", 3, 1)] * 3
    )
    expected = [
        Site(block, level, i, kind, h // div, w // div)
        for i, (block, level, div) in enumerate(layout)
        for kind in ("self", "cross")
    ]
    sites = [site for site, _, _ in rec.calls]
    assert len(sites) == 32, f"expected 32 attention calls per forward, got {len(sites)}"
    assert sites == expected, f"sites {sites} != expected {expected}"
    ch = model.cfg.block_out_channels
    channels_at = {
        "down": lambda level: ch[level],
        "mid": lambda level: ch[-1],
        "up": lambda level: ch[len(ch) - 1 - level],
    }
    heads = model.cfg.num_heads
    for site, q_shape, k_shape in rec.calls:
        channels = channels_at[site.block](site.level)
        assert q_shape == (1, heads, site.height * site.width, channels // heads), (
            f"{site}: q {q_shape}"
        )
        assert k_shape[2] == (77 if site.is_cross else site.height * site.width), (
            f"{site}: k {k_shape}"
        )


def test_seam_replacement(sd14_layout_tiny):
    model, _ = sd14_layout_tiny
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)

    def zero_cross(q, k, v, site):
        return torch.zeros_like(q) if site.is_cross else None

    with torch.no_grad():
        plain = model(sample, 300, context)
        passthrough = model(
            sample, 300, context, controller=lambda q, k, v, site: default_attention(q, k, v)
        )
        zeros = model(sample, 300, context, controller=lambda q, k, v, site: torch.zeros_like(q))
        only_cross_zero = model(sample, 300, context, controller=zero_cross)
    assert torch.equal(passthrough, plain), (
        "returning default_attention's output must change nothing"
    )
    diff = (zeros - plain).abs().max().item()
    assert diff > 1e-3, f"zeroing every attention output changed the output by only {diff}"
    # With cross-attention zeroed the text cannot matter.
    with torch.no_grad():
        other = model(sample, 300, torch.randn(2, 77, 32), controller=zero_cross)
    assert torch.equal(other, only_cross_zero), (
        "with cross-attention outputs zeroed, the context must not matter"
    )


def test_state_dict_matches_published_layout(sd14_reference):
    """Key names and shapes of the full-size model equal the tensors of
    unet/diffusion_pytorch_model.fp16.safetensors."""
    layout = json.loads((sd14_reference / "layouts.json").read_text())
    cfg = UNetConfig.from_dict(
        json.loads((sd14_reference / "hub" / "unet" / "config.json").read_text())
    )
    assert cfg == UNetConfig(), (
        f"SD1.4's unet/config.json gives {cfg}, expected the defaults {UNetConfig()}"
    )
    with torch.device("meta"):
        assert_matches_layout(UNet(cfg), layout, "unet/diffusion_pytorch_model.fp16.safetensors")


@pytest.fixture(scope="module")
def sd14_unets(sd14_reference):
    """Full-size SD1.4 UNets (diffusers from the published config.json, minid sharing its random
    weights)."""
    config = json.loads((sd14_reference / "hub" / "unet" / "config.json").read_text())
    return fullsize_pair(diffusers.UNet2DConditionModel, UNet, UNetConfig, config)


@pytest.mark.fullsize
def test_fullsize_matches_diffusers(sd14_unets):
    model, ref = sd14_unets
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([981, 21])
    with torch.inference_mode():
        compare("SD1.4 unet 2×4×16×16", model(sample, t, context), ref(sample, t, context).sample)
