"""A tiny random Stable Diffusion stack: SD1.4's structure at toy width, for a first run and tests.

The networks have SD1.4's structure at toy width (`UNetConfig.tiny()`, `VAEConfig.tiny()`, a
two-layer CLIP) and random weights from a fixed seed; the tokenizer is the real CLIP vocabulary
(49,408 tokens) that ships with minid, so word → token positions behave as with the real model.
Images are 64×64 (latents 8×8), which is enough to have a face region, an element region and a
background.

Its pictures are noise: the weights are random. What it shows is that every stage runs, in seconds
on a CPU: `minid demo --tiny` (a newcomer's first run, and a smoke test of an install) and minid's
own end-to-end tests use it.
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
    """The three configs: CLIP 2 layers × 32 wide (SD1.4's vocabulary), `UNetConfig.tiny()` (its
    cross-attention width 32 = the CLIP's), `VAEConfig.tiny()`."""
    clip = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    return clip, UNetConfig.tiny(), VAEConfig.tiny()


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
