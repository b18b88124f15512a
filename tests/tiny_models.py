"""A tiny random Stable Diffusion stack for end-to-end tests of the pipeline on CPU.

The networks have SD1.4's structure at toy width (`UNetConfig.tiny()`, `VAEConfig.tiny()`, a
two-layer CLIP) and random weights from a fixed seed; the tokenizer is the real CLIP vocabulary
(49,408 tokens) that ships with minid, so word → token positions behave as with the real model.
Images are 64×64 (latents 8×8), which is enough to have a face region, an element region and a
background.

Use the session-scoped `tiny_sd` fixture of conftest.py, or `build_tiny_sd(seed)` for a stack of
your own.
"""

from __future__ import annotations

import torch

from minid.loading.checkpoint import StableDiffusion
from minid.models.clip import CLIPTextModel
from minid.models.config import CLIPTextConfig, UNetConfig, VAEConfig
from minid.models.tokenizer import CLIPTokenizer
from minid.models.unet import UNet
from minid.models.vae import VAE

IMAGE_SIZE = 64  # pixels; the tiny VAE downsamples by 8 like SD's, so latents are 8×8


def tiny_configs() -> tuple[CLIPTextConfig, UNetConfig, VAEConfig]:
    clip = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    unet = UNetConfig.tiny()  # cross_attention_dim 32 = the tiny CLIP's width
    vae = VAEConfig.tiny()
    return clip, unet, vae


@torch.no_grad()
def build_tiny_sd(seed: int = 0) -> StableDiffusion:
    """SD1.4's tokenizer (`CLIPTokenizer.default()`), random tiny networks from `seed`, eval mode,
    fp32."""
    clip_cfg, unet_cfg, vae_cfg = tiny_configs()
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.default()
    text_encoder = CLIPTextModel(clip_cfg).eval()
    unet = UNet(unet_cfg).eval()
    vae = VAE(vae_cfg).eval()
    for model in (text_encoder, unet, vae):
        model.requires_grad_(False)
    return StableDiffusion(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae)


def random_image(seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A smooth random picture (1, 3, size, size) in [-1, 1]: low-frequency noise, upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(
        low, size=(size, size), mode="bilinear", align_corners=False
    )
