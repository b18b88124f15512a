"""Architecture configs for the three networks of Stable Diffusion 1.x.

Every field has the SD1.4 value as its default and a comment that says what it is. The published
`config.json` files of a diffusers-layout folder map onto these dataclasses with `from_dict`, so other
SD1.x-architecture checkpoints (and the tiny models the tests build) load through the same code.
`tiny()` gives a small model of the same structure for fast CPU tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _from_dict(cls: type[T], d: dict[str, Any], renames: dict[str, str]) -> T:
    """Build `cls` from a config.json dict: known keys are taken (renamed where the file's name differs),
    unknown keys are ignored (the published files carry bookkeeping such as `_class_name`)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        name = renames.get(key, key)
        if name in fields:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP ViT-L/14 text tower, as `text_encoder/config.json` describes it."""

    vocab_size: int = 49408  # BPE vocabulary size (tokens 49406/49407 are <|startoftext|>/<|endoftext|>)
    hidden_size: int = 768  # width of the residual stream; SD's context dimension
    intermediate_size: int = 3072  # MLP hidden width (4 × hidden_size)
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 12  # heads per layer (head size 64)
    max_position_embeddings: int = 77  # context length: bos + 75 content tokens + eos
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
    hidden_act: str = "quick_gelu"  # x·sigmoid(1.702x), the activation CLIP was trained with

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPTextConfig":
        return _from_dict(cls, d, {})

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        return cls(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4)


@dataclass(frozen=True)
class UNetConfig:
    """The SD1.x denoising UNet, as `unet/config.json` describes it."""

    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted noise channels out
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels of each resolution level
    layers_per_block: int = 2  # ResNet blocks per down level (up levels have one more)
    # Which levels carry transformer blocks. SD1.x: the three highest resolutions down, the three lowest up.
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    # Named `attention_head_dim` in the published config, but SD1.x uses it as the NUMBER of heads
    # (head sizes 40, 80, 160 at 320, 640, 1280 channels).
    num_heads: int = 8
    cross_attention_dim: int = 768  # width of the text context (CLIP hidden size)
    norm_num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm epsilon
    flip_sin_to_cos: bool = True  # timestep embedding is [cos, sin] rather than [sin, cos]
    freq_shift: int = 0  # shift of the frequency exponent's denominator
    downsample_padding: int = 1  # padding of the stride-2 downsampling convs
    sample_size: int = 64  # latent side at 512² pixels (informational)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        return _from_dict(cls, d, {"attention_head_dim": "num_heads"})

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls(block_out_channels=(32, 64, 64, 64), layers_per_block=1, num_heads=2,
                   cross_attention_dim=32, norm_num_groups=8, sample_size=16)


@dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL (KL-f8) of SD1.x, as `vae/config.json` describes it."""

    in_channels: int = 3  # RGB in
    out_channels: int = 3  # RGB out
    latent_channels: int = 4  # channels of the latent z
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # channels per level; 3 downsamplings = f8
    layers_per_block: int = 2  # ResNet blocks per encoder level (decoder levels have one more)
    norm_num_groups: int = 32  # GroupNorm groups
    # Latents are multiplied by this after encoding (and divided before decoding) so that they have
    # roughly unit variance; the constant was measured by the SD authors on their training set and is not
    # stored in the checkpoint.
    scaling_factor: float = 0.18215
    sample_size: int = 512  # image side the model was trained at (informational)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        return _from_dict(cls, d, {})

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                   sample_size=64)
