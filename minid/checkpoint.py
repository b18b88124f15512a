"""Reading the published Stable Diffusion 1.4 weights into minid's models.

Two layouts are read, both only as `.safetensors` (a pickle checkpoint is refused: loading one runs code):

- the diffusers "hub" folder of CompVis/stable-diffusion-v1-4: `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  each weight file in the variants fp32 (`diffusion_pytorch_model.safetensors`, `model.safetensors`),
  fp16 (`*.fp16.safetensors`) and, for the UNet only, non_ema (`*.non_ema.safetensors`). minid's module names
  ARE these key names, so a hub file needs only two fixes: the fp32 VAE file's old mid-attention names
  (`query/key/value/proj_attn`, renamed to `to_q/to_k/to_v/to_out.0`) and the text encoder's
  `position_ids` (dropped: the model makes it as `arange(77)`).
- the original single-file LDM (CompVis) layout: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
  `cond_stage_model.transformer.text_model.*` (CLIP), 12 noise-schedule buffers (ignored: minid computes the
  schedule), and in the full-EMA file `model_ema.*`, an EMA copy of the UNet with the dots taken out of the
  names. Its names follow from the hub names through the short prefix tables of `ldm_unet_prefixes` and
  `ldm_vae_prefixes` (print them with `python -m minid.checkpoint keymap`).

Every load checks every name and shape before reading a byte of data and reports all problems in one error.
Tensors are read one by one from a memory-mapped file straight into the target dtype and device, into a model
built on the meta device (no random weights are allocated first), so peak memory stays near the model's size.

Also here: `download` (hub files through `huggingface_hub`, verified against `weights/manifest.json`) and
`convert` (a pickle checkpoint to safetensors, once, with `torch.load(weights_only=True)`).

Command line: `python -m minid.checkpoint {download,convert,keymap,manifest} --help`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from minid.config import CLIPTextConfig, UNetConfig, VAEConfig, load_json

REPO_ID = "CompVis/stable-diffusion-v1-4"
# The commit whose files weights/manifest.json describes; pinning it keeps every download verifiable.
REVISION = "133a221b8aa7292a167afc5127cb63fb5005638b"
ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "weights" / "manifest.json"
DEFAULT_WEIGHTS = ROOT / "weights" / "sd-v1-4"

# Source bytes read through one mapping of the file before it is closed. Pages of a mapping that were read
# count towards the process's resident memory until the mapping is closed, so reading a whole 3.4 GB fp32 file
# through one mapping would hold it all resident beside the converted copy; closing and reopening every
# 256 MiB bounds that overhead to 256 MiB (≈ 0.15 × the fp16 UNet) at no measurable cost.
MAPPED_WINDOW_BYTES = 256 * 2**20

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
COMPONENTS = ("unet", "vae", "text_encoder")

# Hub weight files: component -> variant -> file name inside the component's folder.
HUB_WEIGHT_NAMES = {
    "unet": {"fp32": "diffusion_pytorch_model.safetensors", "fp16": "diffusion_pytorch_model.fp16.safetensors",
             "non_ema": "diffusion_pytorch_model.non_ema.safetensors"},
    "vae": {"fp32": "diffusion_pytorch_model.safetensors", "fp16": "diffusion_pytorch_model.fp16.safetensors"},
    "text_encoder": {"fp32": "model.safetensors", "fp16": "model.fp16.safetensors"},
}
# The small files of a hub folder that the loader and the pipeline read.
HUB_SMALL_FILES = (
    "model_index.json", "scheduler/scheduler_config.json",
    "unet/config.json", "vae/config.json", "text_encoder/config.json",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
)

# LDM key prefix of each component inside the single file.
LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "text_encoder": "cond_stage_model.transformer."}
# The DDPM schedule the LDM training code stored beside the weights; minid recomputes it (schedule.py).
LDM_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
})
# Bookkeeping scalars of the EMA (its decay and step count), not weights.
LDM_EMA_SCALARS = frozenset({"model_ema.decay", "model_ema.num_updates"})
# The fp32 hub VAE was saved by an older diffusers that named the mid-block attention's projections so.
OLD_VAE_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
POSITION_IDS = "text_model.embeddings.position_ids"


class CheckpointError(ValueError):
    """A weight file that cannot be loaded as asked; the message says which file, what is wrong, what to do."""


# ----------------------------------------------------------------------------------------------------------
# The LDM key map, as prefix tables computed from the architecture config


def _resnet(table: dict[str, str], hub: str, ldm: str, names: dict[str, str]) -> None:
    """Add one ResNet block: its sub-module names differ between the layouts (`names`: hub -> LDM)."""
    for hub_name, ldm_name in names.items():
        table[f"{hub}.{hub_name}"] = f"{ldm}.{ldm_name}"


# UNet ResNet block: LDM keeps nn.Sequential indices (GroupNorm, SiLU, Conv = in_layers.0/.2, SiLU, Linear =
# emb_layers.1, GroupNorm, SiLU, Dropout, Conv = out_layers.0/.3).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
# VAE mid-block attention; LDM's q/k/v/proj_out are 1×1 convolutions, hub's are Linear layers.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_prefixes(cfg: UNetConfig) -> dict[str, str]:
    """Hub module prefix -> LDM module prefix (under `model.diffusion_model.`) for every UNet module.

    LDM numbers the down path as one flat list `input_blocks` (0 = conv_in, then per level `layers_per_block`
    ResNet[+transformer] entries and one downsampler), the up path as `output_blocks` (per level
    `layers_per_block + 1` entries, the last one also holding the upsampler); inside an entry, `.0` is the
    ResNet, `.1` the transformer (and `.1`/`.2` the upsampler). Transformer internals have the same names.
    """
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    table = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(n):
            entry = 1 + i * (n + 1) + j
            _resnet(table, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{entry}.0", UNET_RESNET)
            if kind.startswith("CrossAttn"):
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{entry}.1"
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{1 + i * (n + 1) + n}.0.op"
    _resnet(table, "mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    table["mid_block.attentions.0"] = "middle_block.1"
    _resnet(table, "mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    for i, kind in enumerate(cfg.up_block_types):
        attention = kind.startswith("CrossAttn")
        for j in range(n + 1):
            entry = i * (n + 1) + j
            _resnet(table, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{entry}.0", UNET_RESNET)
            if attention:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{entry}.1"
        if i < levels - 1:
            table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (n + 1) + n}.{2 if attention else 1}.conv"
    return table


def ldm_vae_prefixes(cfg: VAEConfig) -> dict[str, str]:
    """Hub module prefix -> LDM module prefix (under `first_stage_model.`) for every VAE module.

    The LDM decoder numbers its levels by resolution, `up.0` being the full-resolution one that runs last,
    so hub `decoder.up_blocks.i` is LDM `decoder.up.{levels-1-i}`.
    """
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        table.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                      f"{part}.conv_norm_out": f"{part}.norm_out"})
        _resnet(table, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET)
        _resnet(table, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)
        _resnet(table, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
    for i in range(levels):
        for j in range(n):
            _resnet(table, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
        for j in range(n + 1):
            _resnet(table, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}",
                    VAE_RESNET)
        if i < levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
    return table


def _rename(key: str, table: dict[str, str]) -> str:
    """Rename `key` by the longest prefix of whole name components found in `table`."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in table:
            return ".".join([table[prefix], *parts[n:]])
    return key  # CLIP names, and names the table does not cover: unchanged


def ldm_name(component: str, hub_key: str, cfg: UNetConfig | VAEConfig | CLIPTextConfig) -> str:
    """The single-file (LDM) name of one hub key of `component`."""
    if component == "unet":
        return LDM_PREFIX["unet"] + _rename(hub_key, ldm_unet_prefixes(cfg))
    if component == "vae":
        return LDM_PREFIX["vae"] + _rename(hub_key, ldm_vae_prefixes(cfg))
    return LDM_PREFIX["text_encoder"] + hub_key


def ldm_ema_name(ldm_unet_key: str) -> str:
    """The full-EMA file's copy of a UNet weight: `model_ema.` + the name without `model.` and without dots
    (the LDM EMA module stores its shadow weights as buffers, and buffer names cannot contain dots)."""
    return "model_ema." + ldm_unet_key.removeprefix("model.").replace(".", "")


def ldm_key_map(component: str, hub_keys: Iterable[str], cfg, ema: bool = False) -> dict[str, str]:
    """hub key -> single-file key for the given hub keys (e.g. a model's `state_dict()` keys)."""
    out = {}
    for k in hub_keys:
        name = ldm_name(component, k, cfg)
        out[k] = ldm_ema_name(name) if ema else name
    return out


def format_key_map(unet_cfg: UNetConfig = UNetConfig(), vae_cfg: VAEConfig = VAEConfig()) -> str:
    """The prefix tables as text: every hub prefix and its LDM prefix (what `keymap` prints)."""
    lines = ["# hub (diffusers) module prefix -> single-file (LDM) module prefix; longest prefix wins",
             "# text_encoder: text_model.* -> cond_stage_model.transformer.text_model.* (same names)",
             "# full-EMA UNet copy: model_ema.<LDM name without 'model.' and without dots>"]
    for title, prefix, table in (("unet", LDM_PREFIX["unet"], ldm_unet_prefixes(unet_cfg)),
                                 ("vae", LDM_PREFIX["vae"], ldm_vae_prefixes(vae_cfg))):
        lines.append(f"\n[{title}]  LDM names start with {prefix!r}")
        width = max(map(len, table))
        lines += [f"{hub:<{width}}  ->  {ldm}" for hub, ldm in table.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Reading safetensors files

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors' spelling: F32, F16, BF16, I64, ...


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a .safetensors file, checking that the file holds every byte its header
    describes (a cut-off download is the usual reason it does not).

    Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, data.
    """
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a .safetensors file; delete it and "
                                  "download or convert it again")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not a .safetensors file (header of {n} bytes, file of "
                                  f"{size} bytes); delete it and download or convert it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a .safetensors file (header is not JSON: {e})") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: {size} bytes, but its header describes {8 + n + end} bytes "
                              "(an interrupted download?); delete it and download it again "
                              "(python -m minid.checkpoint download)")
    return {name: TensorInfo(tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items()}


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: a pickle checkpoint. Loading a pickle can run arbitrary code, so minid reads only "
            f".safetensors files. Convert it once (the conversion reads tensors only, with "
            f"torch.load(weights_only=True)):\n    minid convert {path} {path.with_suffix('.safetensors')}\n"
            f"(or: python -m minid.checkpoint convert {path} {path.with_suffix('.safetensors')})")


def read_tensors(path: str | Path, names: dict[str, str], dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", shapes: dict[str, tuple[int, ...]] | None = None,
                 window_bytes: int = MAPPED_WINDOW_BYTES) -> dict[str, torch.Tensor]:
    """Read tensors from a memory-mapped .safetensors file: `names` maps the key to return -> the file's key.

    Each tensor is copied into fresh memory of `dtype` (None: the file's dtype) on `device` and reshaped to
    `shapes[key]` when given (a 1×1 conv weight read into a Linear weight). The result never aliases the
    file, so it stays valid if the file is replaced. The file is reopened every `window_bytes` of source data
    (see MAPPED_WINDOW_BYTES).
    """
    from safetensors import safe_open  # imported here: `download` and `convert` do not need it

    items = list(names.items())
    out: dict[str, torch.Tensor] = {}
    i = 0
    while i < len(items):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            read = 0
            while i < len(items) and read < window_bytes:
                key, file_key = items[i]
                src = f.get_tensor(file_key)
                read += src.numel() * src.element_size()
                shape = shapes[key] if shapes is not None else src.shape
                dst = torch.empty(shape, dtype=dtype or src.dtype, device=device)
                dst.copy_(src.reshape(shape))  # converts dtype (and moves to the device) in one copy
                out[key] = dst
                del src
                i += 1
    return out


# ----------------------------------------------------------------------------------------------------------
# Matching a file's tensors to a model's state dict


def _model_class(component: str) -> type[nn.Module]:
    # Imported on use: download/convert/keymap work without building (or even importing) the networks.
    if component == "unet":
        from minid.unet import UNet
        return UNet
    if component == "vae":
        from minid.vae import VAE
        return VAE
    if component == "text_encoder":
        from minid.clip import CLIPTextModel
        return CLIPTextModel
    raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


def _is_ldm(header: dict[str, TensorInfo]) -> bool:
    return any(k.startswith(tuple(LDM_PREFIX.values())) for k in header)


def _hub_file_key(component: str, key: str, header: dict[str, TensorInfo]) -> str:
    """The name of a model key in a hub file: itself, or the old VAE attention name when the file uses it,
    or for the text encoder the name without `text_model.` (files saved by transformers 5 drop that prefix)."""
    if component == "text_encoder" and key not in header and key.removeprefix("text_model.") in header:
        return key.removeprefix("text_model.")
    if component == "vae" and key not in header:
        parts = key.split(".")
        # (encoder|decoder).mid_block.attentions.0.<to_q|to_k|to_v|to_out.0>.<weight|bias>
        if len(parts) >= 6 and parts[1] == "mid_block" and parts[2] == "attentions":
            new = ".".join(parts[4:-1])
            for old, name in OLD_VAE_ATTENTION_NAMES.items():
                if new == name:
                    return ".".join([*parts[:4], old, parts[-1]])
    return key


def _shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def _match(component: str, path: Path, header: dict[str, TensorInfo], expected: dict[str, torch.Size],
           cfg, ema: bool | None) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Pair every model key with its file key, check every shape, and raise ONE error listing every missing,
    mis-shaped and unexpected tensor. Returns (model key -> file key, model key -> shape to read into)."""
    ldm = _is_ldm(header)
    if ldm:
        has_ema = any(k.startswith("model_ema.") and k not in LDM_EMA_SCALARS for k in header)
        if component == "unet" and ema and not has_ema:
            raise CheckpointError(f"{path}: ema=True, but the file has no EMA copy of the UNet (model_ema.*); "
                                  "load with ema=None or ema=False")
        # Default for a full-EMA file: the EMA weights. They are what the LDM code samples with (its
        # `ema_scope`), what the pruned sd-v1-4 file and the hub's main unet file hold; the plain
        # `model.diffusion_model.*` weights of that file are the raw training weights (the hub's non_ema file).
        use_ema = component == "unet" and has_ema and ema is not False
        names = ldm_key_map(component, expected, cfg, ema=use_ema)
        # The tensors this load reads; with EMA, `model.diffusion_model.*` is the unused alternative.
        own = ("model_ema.",) if use_ema else (LDM_PREFIX[component],)
        ignored = (LDM_SCHEDULE_BUFFERS | LDM_EMA_SCALARS
                   | {LDM_PREFIX["text_encoder"] + POSITION_IDS})

        def is_unexpected(k: str) -> bool:
            if k in ignored or k in used:
                return False
            if k.startswith(own):
                return True
            # Keys of the other components belong to their loads; anything outside every known part is reported.
            return not k.startswith(tuple(LDM_PREFIX.values()) + ("model_ema.",))
    else:
        if ema is True and component == "unet" and path.name.endswith(".non_ema.safetensors"):
            raise CheckpointError(f"{path}: ema=True, but this is the hub's non-EMA UNet file; load the main "
                                  "unet file (variant=None, 'fp32' or 'fp16') for the EMA weights")
        names = {k: _hub_file_key(component, k, header) for k in expected}

        def is_unexpected(k: str) -> bool:
            return k not in used and k not in (POSITION_IDS, POSITION_IDS.removeprefix("text_model."))

    used = set(names.values())
    missing, wrong, shapes = [], [], {}
    for key, file_key in names.items():
        want = tuple(expected[key])
        info = header.get(file_key)
        if info is None:
            missing.append(f"  {file_key}  (expected shape {_shape(want)})")
        elif info.shape == want or (ldm and component == "vae" and info.shape == (*want, 1, 1)
                                    and ".mid.attn_1." in file_key):
            shapes[key] = want  # (LDM stores the VAE attention projections as 1×1 convs: read them as Linear)
        else:
            wrong.append(f"  {file_key}  expected {_shape(want)}, found {_shape(info.shape)}")
    unexpected = [f"  {k}  {_shape(info.shape)}" for k, info in header.items() if is_unexpected(k)]
    if missing or wrong or unexpected:
        what = [f"{path}: does not match the {component} architecture "
                f"({'single-file LDM' if ldm else 'hub'} layout):"]
        for title, rows in (("missing", missing), ("wrong shape", wrong), ("unexpected", unexpected)):
            if rows:
                what.append(f"{len(rows)} {title}:")
                what += rows[:25] + ([f"  ... and {len(rows) - 25} more"] if len(rows) > 25 else [])
        what.append("What to do: if the file is damaged or incomplete, download it again; if it is another "
                    "architecture, pass the matching config (a folder with config.json); a checkpoint that is "
                    "not SD1.x cannot be loaded into these models.")
        raise CheckpointError("\n".join(what))
    return names, shapes


def _materialize_buffers(model: nn.Module, cls: type[nn.Module], cfg, device) -> None:
    """Buffers outside the state dict (non-persistent) are still on the meta device after loading: fill them.
    CLIP's `position_ids` is `arange`; any other is taken from a model built for real (costly but rare)."""
    pending = [(name, buf) for name, buf in model.named_buffers() if buf.is_meta]
    reference = None
    for name, buf in pending:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr == "position_ids":
            value = torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone()
        else:
            if reference is None:
                reference = cls(cfg)
            value = reference.get_buffer(name).to(device)
        module.register_buffer(attr, value, persistent=False)


def _load_component(component: str, path: str | Path, cfg, dtype: torch.dtype, device, ema: bool | None):
    path = Path(path)
    cls = _model_class(component)
    with torch.device("meta"):
        model = cls(cfg)  # shapes only; no memory, no random init
    expected = {k: v.shape for k, v in model.state_dict().items()}
    header = read_header(path)
    names, shapes = _match(component, path, header, expected, cfg, ema)
    state = read_tensors(path, names, dtype=dtype, device=device, shapes=shapes)
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model, cls, cfg, device)
    # Pretrained inference weights: frozen and in eval mode (call requires_grad_(True) to fine-tune).
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# Finding files and configs


def _config_class(component: str):
    return {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}[component]


def _component_folder(path: Path, component: str) -> Path:
    """The folder with `component`'s files: `path/component` in a hub folder, or `path` itself."""
    return path / component if (path / component).is_dir() else path


def _hub_weight_file(folder: Path, component: str, variant: str | None, dtype: torch.dtype,
                     ema: bool | None) -> Path:
    names = HUB_WEIGHT_NAMES[component]
    if variant is not None and variant not in ("fp32", "fp16", "non_ema"):
        raise ValueError(f"variant must be None, 'fp32', 'fp16' or 'non_ema'; got {variant!r}")
    if component == "unet" and (variant == "non_ema" or (variant is None and ema is False)):
        order = ["non_ema"]  # the hub's only non-EMA weights; ema=False asks for them
    elif variant in ("fp32", "fp16"):
        order = [variant]
    else:  # None: the file nearest the asked dtype first, the other precision next
        order = ["fp16", "fp32"] if dtype in (torch.float16, torch.bfloat16) else ["fp32", "fp16"]
    for v in order:
        if (folder / names[v]).is_file():
            return folder / names[v]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"{folder}: no {component} weight file {' or '.join(names[v] for v in order)} "
        f"(folder holds: {', '.join(present) or 'nothing'}). Download it with\n"
        f"    python -m minid.checkpoint download --dest {folder.parent if folder.name == component else folder}"
        f" --precision {'fp32' if order[0] != 'fp16' else 'fp16'}")


def _resolve(component: str, path: str | Path, variant, dtype, ema, config, config_folder):
    """(weight file, config) for a component from a hub folder, a component folder or a weight file."""
    path = Path(path)
    _refuse_pickle(path)
    if path.is_dir():
        folder = _component_folder(path, component)
        weights = _hub_weight_file(folder, component, variant, dtype, ema)
        config_folder = config_folder or folder
    elif path.is_file():
        weights = path
    else:
        raise CheckpointError(f"{path}: not found (expected a hub folder with {component}/, a {component} folder "
                              "or a .safetensors file); download with python -m minid.checkpoint download")
    if config is None:
        config = _config_class(component)()  # SD1.4 defaults
        if config_folder is not None:
            cfg_file = _component_folder(Path(config_folder), component) / "config.json"
            if cfg_file.is_file():
                config = _config_class(component).from_dict(load_json(cfg_file))
    return weights, config


def load_unet(path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
              variant: str | None = None, ema: bool | None = None, config: UNetConfig | None = None,
              config_folder: str | Path | None = None):
    """A `minid.unet.UNet` from a hub folder, its `unet/` folder, a hub unet file or a single LDM file.

    variant: None (fp16 file for fp16/bf16, else fp32, whichever exists), 'fp32', 'fp16' or 'non_ema'.
    ema: for a full-EMA single file, True (default) reads `model_ema.*`, False the raw `model.diffusion_model.*`;
    for a hub folder, False selects the non_ema file.
    config: the architecture; default: `config.json` beside the weights (or in `config_folder`), else SD1.4.
    """
    weights, cfg = _resolve("unet", path, variant, dtype, ema, config, config_folder)
    return _load_component("unet", weights, cfg, dtype, device, ema)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
             variant: str | None = None, config: VAEConfig | None = None,
             config_folder: str | Path | None = None):
    """A `minid.vae.VAE`; arguments as `load_unet` (the VAE has no EMA copy)."""
    weights, cfg = _resolve("vae", path, variant, dtype, None, config, config_folder)
    return _load_component("vae", weights, cfg, dtype, device, None)


def load_text_encoder(path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                      variant: str | None = None, config: CLIPTextConfig | None = None,
                      config_folder: str | Path | None = None):
    """A `minid.clip.CLIPTextModel`; arguments as `load_unet`."""
    weights, cfg = _resolve("text_encoder", path, variant, dtype, None, config, config_folder)
    return _load_component("text_encoder", weights, cfg, dtype, device, None)


@dataclass(frozen=True)
class StableDiffusion:
    """The four parts of SD1.4 that minid runs (the scheduler is math in minid.schedule, not weights)."""

    tokenizer: Any  # minid.tokenizer.CLIPTokenizer
    text_encoder: nn.Module  # minid.clip.CLIPTextModel
    unet: nn.Module  # minid.unet.UNet
    vae: nn.Module  # minid.vae.VAE


def load_stable_diffusion(source: str | Path = DEFAULT_WEIGHTS, dtype: torch.dtype = torch.float16,
                          device: str | torch.device = "cpu", variant: str | None = None,
                          ema: bool | None = None, config_folder: str | Path | None = None,
                          tokenizer_folder: str | Path | None = None) -> StableDiffusion:
    """Load tokenizer, text encoder, UNet and VAE from a hub folder or a single LDM `.safetensors` file.

    A hub folder supplies its own config.json files and tokenizer/. For a single file, the architecture comes
    from `config_folder` (a hub folder's configs) when given, else the SD1.4 defaults; the tokenizer from
    `tokenizer_folder`, else `config_folder/tokenizer`, else weights/sd-v1-4/tokenizer.
    """
    source = Path(source)
    _refuse_pickle(source)
    if source.is_dir():
        tokenizer_folder = tokenizer_folder or source / "tokenizer"
    elif source.is_file():
        candidates = [Path(tokenizer_folder)] if tokenizer_folder else []
        if config_folder is not None:
            candidates.append(Path(config_folder) / "tokenizer")
        candidates.append(DEFAULT_WEIGHTS / "tokenizer")
        tokenizer_folder = next((c for c in candidates if (c / "vocab.json").is_file()), candidates[0])
    else:
        raise CheckpointError(f"{source}: not found. Download SD1.4 with: python -m minid.checkpoint download "
                              f"--dest {DEFAULT_WEIGHTS} (or pass a hub folder or a single .safetensors file)")
    if not ((Path(tokenizer_folder) / "vocab.json").is_file() and (Path(tokenizer_folder) / "merges.txt").is_file()):
        raise CheckpointError(f"{tokenizer_folder}: CLIP tokenizer files vocab.json and merges.txt not found. "
                              "A single-file checkpoint carries no tokenizer: pass tokenizer_folder=<a folder with "
                              "them> or download them with python -m minid.checkpoint download")
    from minid.tokenizer import CLIPTokenizer

    kw = dict(dtype=dtype, device=device, variant=variant, config_folder=config_folder)
    return StableDiffusion(tokenizer=CLIPTokenizer.from_folder(tokenizer_folder),
                           text_encoder=load_text_encoder(source, **kw),
                           unet=load_unet(source, ema=ema, **kw),
                           vae=load_vae(source, **kw))


# ----------------------------------------------------------------------------------------------------------
# Download and verification


def sha256_file(path: str | Path, block: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(path: str | Path = MANIFEST) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: manifest not found (it ships in the repository's weights/ folder)")
    return json.loads(path.read_text())


def hub_files(precision: str = "fp16", components: Iterable[str] = COMPONENTS) -> list[str]:
    """The hub files a minid run needs: the small files and each component's weights in `precision`."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32'; got {precision!r}")
    return list(HUB_SMALL_FILES) + [f"{c}/{HUB_WEIGHT_NAMES[c][precision]}" for c in components]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def verify_file(path: str | Path, expected: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """Check a file's size and sha256 against the manifest entry; raise CheckpointError when they differ.

    A `<file>.verified` sidecar remembers size, mtime and hash, so a file checked once is not hashed again.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    st = path.stat()
    mark = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected["sha256"]}
    side = _sidecar(path)
    if side.is_file():
        try:
            if json.loads(side.read_text()) == mark:
                return
        except json.JSONDecodeError:
            pass
    if st.st_size != expected["bytes"]:
        raise CheckpointError(f"{path}: {st.st_size} bytes, expected {expected['bytes']} "
                              f"({'truncated: an interrupted download?' if st.st_size < expected['bytes'] else 'not the published file'})")
    log(f"verifying {path.name} ({st.st_size / 2**20:.0f} MiB) ...")
    digest = sha256_file(path)
    if digest != expected["sha256"]:
        raise CheckpointError(f"{path}: sha256 {digest}, expected {expected['sha256']} (damaged or not the "
                              "published file)")
    side.write_text(json.dumps(mark))


def download(dest: str | Path = DEFAULT_WEIGHTS, precision: str = "fp16", repo: str = REPO_ID,
             revision: str = REVISION, components: Iterable[str] = COMPONENTS,
             manifest: str | Path | dict = MANIFEST, fetch: Callable[..., str] | None = None,
             log: Callable[[str], None] = print) -> Path:
    """Fetch the SD1.4 hub files minid needs into `dest` and verify each against the manifest.

    Files already present and verified are kept (no network needed: works with HF_HUB_OFFLINE=1); a present
    file that fails verification is fetched again. `fetch` defaults to `huggingface_hub.hf_hub_download`
    (which shows progress and resumes interrupted downloads); tests pass their own. Returns `dest`.
    """
    import huggingface_hub

    dest = Path(dest)
    entries = manifest if isinstance(manifest, dict) else load_manifest(manifest)
    entries = entries.get("files", entries)
    if fetch is None:
        fetch = huggingface_hub.hf_hub_download  # looked up now, so it can be replaced in tests
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    again = f"python -m minid.checkpoint download --dest {dest} --precision {precision}"
    for name in hub_files(precision, components):
        if name not in entries:
            raise CheckpointError(f"{name}: not in the manifest {manifest if not isinstance(manifest, dict) else ''}"
                                  "; it cannot be verified")
        local = dest / name
        if local.is_file():
            try:
                verify_file(local, entries[name], log)
                continue
            except CheckpointError as e:
                if offline:
                    raise CheckpointError(f"{e}\nHF_HUB_OFFLINE is set, so it cannot be fetched again: delete "
                                          f"it and run, online:\n    {again}") from None
                log(f"{e}; fetching it again")
                local.unlink()
                _sidecar(local).unlink(missing_ok=True)
        elif offline:
            raise CheckpointError(f"{local}: missing, and HF_HUB_OFFLINE is set. Run, online:\n    {again}\n"
                                  f"or copy the file {name} of {repo} (revision {revision}) there.")
        log(f"fetching {name} from {repo}@{revision[:8]}")
        try:
            got = Path(fetch(repo_id=repo, filename=name, revision=revision, local_dir=str(dest)))
        except Exception as e:  # network, authentication, missing file: all end here with the same advice
            raise CheckpointError(f"{name}: download from {repo} failed ({type(e).__name__}: {e}). Check the "
                                  f"network (or HF_ENDPOINT), then run again:\n    {again}\n"
                                  f"(files already fetched are kept; an interrupted file resumes)") from e
        if got.resolve() != local.resolve():
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, local)
        try:
            verify_file(local, entries[name], log)
        except CheckpointError as e:
            raise CheckpointError(f"{e}\nThe downloaded file does not match the manifest; it was left in place for "
                                  f"inspection. Delete it and run again:\n    {again}") from None
    return dest


def build_manifest(layouts: str | Path, hub_folder: str | Path) -> dict[str, Any]:
    """The manifest: bytes and sha256 of every weight file (from layouts.json, which records the hub's LFS
    pointers) and of every small file (hashed from a folder holding the hub's small files)."""
    lay = json.loads(Path(layouts).read_text())
    files = {name: {"bytes": entry["bytes"], "sha256": entry["sha256"]} for name, entry in lay["hub_files"].items()}
    for name in HUB_SMALL_FILES:
        p = Path(hub_folder) / name
        files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return {"repo": REPO_ID, "revision": REVISION, "files": dict(sorted(files.items()))}


# ----------------------------------------------------------------------------------------------------------
# Converting a pickle checkpoint


@dataclass
class ConvertSummary:
    src: Path
    dst: Path
    tensors: int
    bytes: int
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensor count
    skipped: list[str] = field(default_factory=list)  # entries that are not tensors (step counters, ...)

    def __str__(self) -> str:
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(self.dtypes.items()))
        text = (f"{self.src} -> {self.dst}: {self.tensors} tensors ({dtypes}), {self.bytes / 2**20:.1f} MiB")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} non-tensor entries: {', '.join(self.skipped[:10])}"
        return text


def convert(src: str | Path, dst: str | Path | None = None, overwrite: bool = False,
            log: Callable[[str], None] = print) -> ConvertSummary:
    """Convert a pickle checkpoint (.ckpt/.bin/.pt/.pth) to .safetensors, keeping its names.

    Read with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers only and refuses
    anything that would run code. A top-level `state_dict` entry (Lightning checkpoints) is unwrapped;
    entries that are not tensors are skipped and listed. The output is written to a temporary file and renamed,
    so an interrupted conversion never leaves a partial `dst`; an existing `dst` is kept unless `overwrite`.
    """
    from safetensors.torch import save_file

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists; pass overwrite=True (--overwrite) to replace it")
    if not src.is_file():
        raise CheckpointError(f"{src}: not found")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # old (non-zip) pickle files cannot be memory-mapped: read them whole
            raise
        obj = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{src}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors, skipped, seen = {}, [], set()
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            skipped.append(str(name))
            continue
        # safetensors stores each tensor on its own: views sharing storage (tied weights) are copied apart.
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        if ptr in seen or not value.is_contiguous():
            value = value.contiguous().clone()
        seen.add(ptr)
        tensors[str(name)] = value
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    summary = ConvertSummary(src=src, dst=dst, tensors=len(tensors),
                             bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                             dtypes=dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
                             skipped=skipped)
    log(str(summary))
    return summary


# ----------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minid.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="fetch and verify the SD1.4 hub files")
    p.add_argument("--dest", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--repo", default=REPO_ID)
    p.add_argument("--revision", default=REVISION)
    p = sub.add_parser("convert", help="convert a pickle checkpoint to .safetensors")
    p.add_argument("src")
    p.add_argument("dst", nargs="?")
    p.add_argument("--overwrite", action="store_true")
    sub.add_parser("keymap", help="print the hub -> single-file (LDM) key map of SD1.4")
    p = sub.add_parser("manifest", help="print the manifest JSON from layouts.json and the hub's small files")
    p.add_argument("layouts")
    p.add_argument("hub_folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download(args.dest, args.precision, args.repo, args.revision)
        elif args.command == "convert":
            convert(args.src, args.dst, args.overwrite)
        elif args.command == "keymap":
            print(format_key_map())
        else:
            print(json.dumps(build_manifest(args.layouts, args.hub_folder), indent=2))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
