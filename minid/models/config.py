"""Architecture configs for the three networks of Stable Diffusion 1.x.

Every field has the SD1.4 value as its default and a comment that says what it is. The published
`config.json` files of a diffusers-layout folder map onto these dataclasses with `from_dict`, so
other SD1.x-architecture checkpoints (and the tiny models the tests build) load through the same
code. Keys minid has no field for are listed per config, with the reason it can drop them; a key not
listed warns. `tiny()` gives a small model of the same structure for fast CPU tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "tuple[int, ...]": "a list of integers",
    "tuple[str, ...]": "a list of strings",
}


def _json_kind(value) -> str:
    """What a config.json value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _fits(value, annotation: str) -> bool:
    """Whether a config.json value has the type of a field annotated `annotation` (an integer
    serves as a float; true/false is no number)."""
    if annotation.startswith("tuple["):
        item = annotation.removeprefix("tuple[").split(",")[0]
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if annotation == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    kinds = {"int": (int,), "float": (int, float), "str": (str,)}.get(annotation)
    return kinds is None or isinstance(value, kinds)


def _from_dict(
    cls: type[T],
    d: dict[str, Any],
    renames: dict[str, str],
    ignored: frozenset[str],
    fixed: dict[str, Any],
    source: str | Path | None = None,
) -> T:
    """Build `cls` from a config.json dict.

    Keys that are fields of `cls` are taken (renamed where the file's name differs). Keys in
    `ignored` are dropped silently: bookkeeping, or settings that do not change what inference
    computes. Keys in `fixed` are options of the diffusers/transformers class that minid does not
    make configurable: it builds the SD1.x value in, so they are dropped silently when they hold
    that value. Anything else (a typo, another architecture's field, a `fixed` key with another
    value) is dropped with a warning naming it, since the model built may not be the one the file
    describes. A value of the wrong type is a ValueError naming `source` (the file), the key, the
    type expected and the type found.
    """
    if not isinstance(d, dict):
        raise ValueError(
            f"{source or cls.__name__}: expected a JSON object of settings, found {_json_kind(d)}"
        )
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs, unknown, other = {}, [], []
    for key, value in d.items():
        name = renames.get(key, key)
        if name in fields:
            if not _fits(value, fields[name]):
                raise ValueError(
                    f"{source or cls.__name__}: {key!r} must be {_EXPECTED[fields[name]]}, found "
                    f"{_json_kind(value)} {json.dumps(value)[:40]}; fix the file or download the "
                    "weights again"
                )
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        elif key in fixed:
            if value != fixed[key]:
                other.append(
                    f"{key}={value!r} (minid builds {key}={fixed[key]!r}, the SD1.x value)"
                )
        elif key not in ignored:
            unknown.append(repr(key))
    if unknown or other:
        what = ([f"unknown keys {', '.join(unknown)}"] if unknown else []) + (
            [f"settings minid does not implement: {'; '.join(other)}"] if other else []
        )
        warnings.warn(
            f"{cls.__name__}.from_dict: {' and '.join(what)}; they are ignored. Fix a "
            f"misspelt key; a config of another architecture does not describe the model minid "
            f"builds.",
            stacklevel=3,
        )
    return cls(**kwargs)


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# Keys of text_encoder/config.json that minid reads no field from, dropped silently. Bookkeeping of
# transformers; dropout rates and initialisation scales (training only); the special-token ids (the
# tokenizer's business: minid returns all 77 states and pools none at an <|endoftext|> id); and
# `projection_dim`, the width of the projection head that CLIPTextModelWithProjection adds and
# CLIPTextModel, SD's, does not have.
CLIP_IGNORED_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "dropout",
        "attention_dropout",
        "initializer_factor",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "projection_dim",
    }
)


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP ViT-L/14 text tower, as `text_encoder/config.json` describes it."""

    # BPE vocabulary size (tokens 49406/49407 are <|startoftext|>/<|endoftext|>)
    vocab_size: int = 49408
    hidden_size: int = 768  # width of the residual stream; SD's context dimension
    intermediate_size: int = 3072  # MLP hidden width (4 × hidden_size)
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 12  # heads per layer (head size 64)
    max_position_embeddings: int = 77  # context length: bos + 75 content tokens + eos
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
    hidden_act: str = "quick_gelu"  # x·sigmoid(1.702x), the activation CLIP was trained with

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> "CLIPTextConfig":
        return _from_dict(cls, d, {}, CLIP_IGNORED_KEYS, {}, source)

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        return cls(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        )


# Keys of unet/config.json that minid reads no field from. Ignored whatever their value: diffusers'
# bookkeeping, and the dropout rate (training only).
UNET_IGNORED_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "dropout"})
# Options of diffusers' UNet2DConditionModel that minid builds in with the SD1.x value (the value
# the SD1.4 file or diffusers' default gives): the other values select other models (SD2's linear
# projections, SDXL's added embeddings, class-conditioned or LCM UNets, ...), which these modules do
# not implement.
UNET_FIXED_KEYS = {
    "act_fn": "silu",
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "mid_block_only_cross_attention": None,
    # SD1.x gives heads as `attention_head_dim` (see UNetConfig.num_heads)
    "num_attention_heads": None,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "use_linear_projection": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "upcast_attention": False,
    "attention_type": "default",
    "cross_attention_norm": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
}


@dataclass(frozen=True)
class UNetConfig:
    """The SD1.x denoising UNet, as `unet/config.json` describes it."""

    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted noise channels out
    # channels of each resolution level
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # ResNet blocks per down level (up levels have one more)
    # Which levels carry transformer blocks. SD1.x: the three highest resolutions down, the three
    # lowest up.
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
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
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> "UNetConfig":
        return _from_dict(
            cls, d, {"attention_head_dim": "num_heads"}, UNET_IGNORED_KEYS, UNET_FIXED_KEYS, source
        )

    @classmethod
    def tiny(cls) -> "UNetConfig":
        return cls(
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=1,
            num_heads=2,
            cross_attention_dim=32,
            norm_num_groups=8,
            sample_size=16,
        )


# Keys of vae/config.json that minid reads no field from. Ignored whatever their value: diffusers'
# bookkeeping; the per-level block types (every level of AutoencoderKL is
# DownEncoderBlock2D/UpDecoderBlock2D, the only blocks it has); and `force_upcast`, diffusers'
# advice to decode in fp32 (a run-time choice here).
VAE_IGNORED_KEYS = frozenset(
    {
        "_class_name",
        "_diffusers_version",
        "_name_or_path",
        "down_block_types",
        "up_block_types",
        "force_upcast",
    }
)
# Options of diffusers' AutoencoderKL that minid builds in with the SD1.x value; the others belong
# to other autoencoders (SD3's and FLUX's latent shift and per-channel statistics, variants without
# the 1×1 convs).
VAE_FIXED_KEYS = {
    "act_fn": "silu",
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


@dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL (KL-f8) of SD1.x, as `vae/config.json` describes it."""

    in_channels: int = 3  # RGB in
    out_channels: int = 3  # RGB out
    latent_channels: int = 4  # channels of the latent z
    # channels per level; 3 downsamplings = f8
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # ResNet blocks per encoder level (decoder levels have one more)
    norm_num_groups: int = 32  # GroupNorm groups
    # Latents are multiplied by this after encoding (and divided before decoding) so that they have
    # roughly unit variance; the constant was measured by the SD authors on their training set and
    # is not stored in the checkpoint.
    scaling_factor: float = 0.18215
    sample_size: int = 512  # image side the model was trained at (informational)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> "VAEConfig":
        return _from_dict(cls, d, {}, VAE_IGNORED_KEYS, VAE_FIXED_KEYS, source)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        return cls(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )


def number_problem(value, kind: type, low, high, low_open: bool) -> str | None:
    """What is wrong with `value` against one row of NUMBER_LIMITS, in words ("must be a number in
    [0, 0.5]"), or None when it fits. NaN and infinities never fit."""
    if kind is int:
        words = (
            f"an integer from {low} to {high}"
            if high is not None
            else f"an integer of at least {low}"
        )
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        words = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
            if high is not None
            else f"a finite number {'>' if low_open else '≥'} {low:g}"
        )
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    return None if ok else f"must be {words}"
