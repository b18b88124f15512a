"""minid.models.vae.VAE against diffusers.AutoencoderKL on the same random weights (fp32, CPU), the
posterior's clamping and sampling, the latent scale, and the state-dict layout of the published fp16
file."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_parity import assert_matches_layout, compare, fullsize_pair, minid_from, randomize_

from minid.models.config import VAEConfig
from minid.models.vae import VAE, DiagonalGaussian

diffusers = pytest.importorskip("diffusers")

# Parity bound: reference_parity.REL_TOL on max|minid - diffusers| / max|diffusers| (measured ~1e-6:
# rounding only).


def reference_vae(cfg: VAEConfig) -> "diffusers.AutoencoderKL":
    """The diffusers model with the architecture `cfg` describes (uninitialised: call
    `randomize_`)."""
    levels = len(cfg.block_out_channels)
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            latent_channels=cfg.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            sample_size=cfg.sample_size,
            scaling_factor=cfg.scaling_factor,
        )
    return ref.to_empty(device="cpu").eval()


@torch.no_grad()
def check_against(model: VAE, ref, x: torch.Tensor, label: str) -> None:
    """encode (mean, std, a seeded sample), decode, and the scaled-latent round trip, all against
    diffusers."""
    sf = model.cfg.scaling_factor
    with torch.no_grad():
        ours, theirs = model.encode(x), ref.encode(x).latent_dist
        compare(f"{label} posterior mean", ours.mean, theirs.mean)
        compare(f"{label} posterior std", ours.std, theirs.std)
        compare(
            f"{label} posterior sample",
            ours.sample(torch.Generator().manual_seed(7)),
            theirs.sample(torch.Generator().manual_seed(7)),
        )
        compare(f"{label} encode_latent", model.encode_latent(x), sf * theirs.mean)
        latent = torch.randn_like(ours.mean)
        compare(f"{label} decode", model.decode(latent), ref.decode(latent).sample)
        compare(
            f"{label} decode_latent", model.decode_latent(latent), ref.decode(latent / sf).sample
        )


@settings(max_examples=5, deadline=None)
@given(
    batch=st.integers(1, 2),
    height=st.sampled_from([8, 16, 24, 32]),
    width=st.sampled_from([8, 16, 24]),
    base=st.sampled_from([16, 32]),
    layers=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_tiny_matches_diffusers(batch, height, width, base, layers, seed):
    cfg = VAEConfig(
        block_out_channels=(base, base, 2 * base, 2 * base),
        layers_per_block=layers,
        norm_num_groups=8,
        sample_size=64,
    )
    ref = randomize_(reference_vae(cfg), seed)
    model = minid_from(ref, VAE, cfg)
    x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    check_against(model, ref, x, f"tiny vae {tuple(x.shape)}")


def test_posterior_clamps_logvar_and_samples():
    mean = torch.randn(2, 4, 3, 5)
    logvar = torch.full_like(mean, -100.0)
    logvar[:, :, 0] = 100.0  # outside [-30, 20] on both sides
    logvar[:, :, 1] = 0.5
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(post.mean, mean)
    torch.testing.assert_close(
        post.std[:, :, 0], torch.full_like(mean[:, :, 0], torch.exp(torch.tensor(10.0)))
    )
    torch.testing.assert_close(
        post.std[:, :, 1], torch.full_like(mean[:, :, 1], torch.exp(torch.tensor(0.25)))
    )
    torch.testing.assert_close(
        post.std[:, :, 2], torch.full_like(mean[:, :, 2], torch.exp(torch.tensor(-15.0)))
    )
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b), "the same generator seed must give the same sample"
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, mean + post.std * eps)


def test_encode_rejects_sizes_not_divisible_by_8():
    model = VAE(VAEConfig.tiny()).eval()
    with pytest.raises(ValueError, match="not a multiple of 8"):
        model.encode(torch.zeros(1, 3, 20, 16))


def test_state_dict_matches_published_layout(sd14_reference):
    """Key names and shapes of the full-size model equal the tensors of
    vae/diffusion_pytorch_model.fp16.safetensors."""
    layout = json.loads((sd14_reference / "layouts.json").read_text())
    cfg = VAEConfig.from_dict(
        json.loads((sd14_reference / "hub" / "vae" / "config.json").read_text())
    )
    assert cfg == VAEConfig(), (
        f"SD1.4's vae/config.json gives {cfg}, expected the defaults {VAEConfig()}"
    )
    with torch.device("meta"):
        assert_matches_layout(VAE(cfg), layout, "vae/diffusion_pytorch_model.fp16.safetensors")


@pytest.fixture(scope="module")
def sd14_vaes(sd14_reference):
    """Full-size SD1.4 VAEs (diffusers from the published config.json, minid sharing its random
    weights)."""
    config = json.loads((sd14_reference / "hub" / "vae" / "config.json").read_text())
    return fullsize_pair(diffusers.AutoencoderKL, VAE, VAEConfig, config)


@pytest.mark.fullsize
def test_fullsize_matches_diffusers(sd14_vaes):
    model, ref = sd14_vaes
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    check_against(model, ref, x, "SD1.4 vae 1×3×64×64")
