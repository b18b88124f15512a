"""The key map between the two published SD1.4 layouts: hub (diffusers) names -> single-file (LDM)
names.

minid's module names ARE the hub key names. The original single-file LDM (CompVis) layout names the
same tensors `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.text_model.*` (CLIP, same names under the prefix); its full-EMA file
adds `model_ema.*`, an EMA copy of the UNet with the dots taken out of the names. The UNet and VAE
names follow from the hub names through short prefix tables computed from the architecture config
(`ldm_unet_prefixes`, `ldm_vae_prefixes`; print them with `minid keymap`), renamed by the longest
prefix.

minid.loading.checkpoint reads single files through `ldm_key_map`.
"""

from __future__ import annotations

from typing import Iterable

from minid.models.config import CLIPTextConfig, UNetConfig, VAEConfig

# LDM key prefix of each component inside the single file.
LDM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}


def _resnet(table: dict[str, str], hub: str, ldm: str, names: dict[str, str]) -> None:
    """Add one ResNet block: its sub-module names differ between the layouts (`names`: hub ->
    LDM)."""
    for hub_name, ldm_name in names.items():
        table[f"{hub}.{hub_name}"] = f"{ldm}.{ldm_name}"


# UNet ResNet block: LDM keeps nn.Sequential indices (GroupNorm, SiLU, Conv = in_layers.0/.2, SiLU,
# Linear = emb_layers.1, GroupNorm, SiLU, Dropout, Conv = out_layers.0/.3).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# VAE mid-block attention; LDM's q/k/v/proj_out are 1×1 convolutions, hub's are Linear layers.
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def ldm_unet_prefixes(cfg: UNetConfig) -> dict[str, str]:
    """Hub module prefix -> LDM module prefix (under `model.diffusion_model.`) for every UNet
    module.

    LDM numbers the down path as one flat list `input_blocks` (0 = conv_in, then per level
    `layers_per_block` ResNet[+transformer] entries and one downsampler), the up path as
    `output_blocks` (per level `layers_per_block + 1` entries, the last one also holding the
    upsampler); inside an entry, `.0` is the ResNet, `.1` the transformer (and `.1`/`.2` the
    upsampler). Transformer internals have the same names.
    """
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    table = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(n):
            entry = 1 + i * (n + 1) + j
            _resnet(table, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{entry}.0", UNET_RESNET)
            if kind.startswith("CrossAttn"):
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{entry}.1"
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (
                f"input_blocks.{1 + i * (n + 1) + n}.0.op"
            )
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
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (
                f"output_blocks.{i * (n + 1) + n}.{2 if attention else 1}.conv"
            )
    return table


def ldm_vae_prefixes(cfg: VAEConfig) -> dict[str, str]:
    """Hub module prefix -> LDM module prefix (under `first_stage_model.`) for every VAE module.

    The LDM decoder numbers its levels by resolution, `up.0` being the full-resolution one that runs
    last, so hub `decoder.up_blocks.i` is LDM `decoder.up.{levels-1-i}`.
    """
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        table.update(
            {
                f"{part}.conv_in": f"{part}.conv_in",
                f"{part}.conv_out": f"{part}.conv_out",
                f"{part}.conv_norm_out": f"{part}.norm_out",
            }
        )
        _resnet(table, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET)
        _resnet(table, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)
        _resnet(table, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
    for i in range(levels):
        for j in range(n):
            _resnet(
                table,
                f"encoder.down_blocks.{i}.resnets.{j}",
                f"encoder.down.{i}.block.{j}",
                VAE_RESNET,
            )
        for j in range(n + 1):
            _resnet(
                table,
                f"decoder.up_blocks.{i}.resnets.{j}",
                f"decoder.up.{levels - 1 - i}.block.{j}",
                VAE_RESNET,
            )
        if i < levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
                f"encoder.down.{i}.downsample.conv"
            )
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (
                f"decoder.up.{levels - 1 - i}.upsample.conv"
            )
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
    """The full-EMA file's copy of a UNet weight: `model_ema.` + the name without `model.` and
    without dots (the LDM EMA module stores its shadow weights as buffers, and buffer names cannot
    contain dots)."""
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
    lines = [
        "# hub (diffusers) module prefix -> single-file (LDM) module prefix; longest prefix wins",
        "# text_encoder: text_model.* -> cond_stage_model.transformer.text_model.* (same names)",
        "# full-EMA UNet copy: model_ema.<LDM name without 'model.' and without dots>",
    ]
    for title, prefix, table in (
        ("unet", LDM_PREFIX["unet"], ldm_unet_prefixes(unet_cfg)),
        ("vae", LDM_PREFIX["vae"], ldm_vae_prefixes(vae_cfg)),
    ):
        lines.append(f"\n[{title}]  LDM names start with {prefix!r}")
        width = max(map(len, table))
        lines += [f"{hub:<{width}}  ->  {ldm}" for hub, ldm in table.items()]
    return "\n".join(lines)
