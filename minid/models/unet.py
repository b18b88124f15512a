"""The Stable Diffusion 1.x denoising UNet: eps = UNet(z_t, t, context).

Layout (SD1.4 numbers, latent 64×64 for a 512² image):

    t ──sinusoid(320)── time_embedding ── temb (B, 1280), added inside every ResNet block
    z_t (B, 4, 64, 64) ── conv_in ── (B, 320, 64, 64)
      down_blocks.0  64²  [resnet, transformer] × 2, downsample      320 ch   transformer blocks 0,
      1
      down_blocks.1  32²  [resnet, transformer] × 2, downsample      640 ch   2, 3
      down_blocks.2  16²  [resnet, transformer] × 2, downsample     1280 ch   4, 5
      down_blocks.3   8²  resnet × 2                                1280 ch
      mid_block       8²  resnet, transformer, resnet               1280 ch   6
      up_blocks.0     8²  resnet × 3, upsample                      1280 ch
      up_blocks.1    16²  [resnet, transformer] × 3, upsample       1280 ch   7, 8, 9
      up_blocks.2    32²  [resnet, transformer] × 3, upsample        640 ch   10, 11, 12
      up_blocks.3    64²  [resnet, transformer] × 3                  320 ch   13, 14, 15
    ── GroupNorm, SiLU, conv_out ── eps (B, 4, 64, 64)

Every output of the down path (conv_in's included) is kept as a skip connection; each up-path ResNet
block concatenates one of them, last in first out, onto its input along the channels.

Module names equal the key names of the published diffusers
`unet/diffusion_pytorch_model*.safetensors` files, so those state dicts load with `load_state_dict`
and no renaming. Each transformer block's two attention calls (self, then cross to the text) go
through `minid.models.attention.attention` with a `Site`, so a controller passed to `UNet.forward`
sees and may replace all 32 of them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from minid.models.attention import AttentionController, Site, attention
from minid.models.config import UNetConfig

# The transformer's input GroupNorm uses a smaller epsilon than the ResNet blocks (cfg.norm_eps);
# the value is fixed in the original LDM code (SpatialTransformer's Normalize) rather than stored in
# the config.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
# The LayerNorms inside a transformer block use PyTorch's default epsilon, as the original code
# does.
LAYER_NORM_EPS = 1e-5
# The time MLP is four times as wide as the first level's channels (320 → 1280), as in DDPM.
TIME_EMBED_MULT = 4
# GEGLU's hidden width is four times the block width (each of its two projections).
FF_MULT = 4


def timestep_embedding(
    t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim), as in DDPM /
    Transformers.

    Frequencies ω_i = max_period^(-i / (dim/2 - freq_shift)), i = 0 … dim/2-1; the embedding is
    [sin(t ω), cos(t ω)], or [cos(t ω), sin(t ω)] with `flip_sin_to_cos` (SD1.x's convention).
    """
    half = dim // 2
    exponent = (
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / (half - freq_shift)
    )
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """The time MLP: Linear → SiLU → Linear, from the sinusoid to the width every ResNet block
    reads."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv → (+ projected time embedding) → GroupNorm → SiLU → conv, plus the
    skip.

    The time embedding is added per channel, broadcast over the feature map. When the channel count
    changes, the skip path is a 1×1 conv (`conv_shortcut`). SD was trained with dropout 0, so there
    is none.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, out_ch, 1, 1) broadcast
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention of a transformer block: self-attention (attn1) or cross-attention to the
    text (attn2, whose keys and values come from the 768-d context). q/k/v projections have no bias.

    The module knows its static `Site`; the caller supplies the query grid's height and width, so
    the controller learns the resolution of each call.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, site: Site):
        super().__init__()
        self.heads = heads
        self.site = site
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        # A list of one so that the key is `to_out.0.weight`, as published: diffusers' `to_out` is
        # [Linear, Dropout], and the dropout (p = 0 in SD) has no weights, so only index 0 reaches
        # the file.
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        height: int,
        width: int,
        controller: AttentionController | None,
    ) -> torch.Tensor:
        B, N, C = x.shape  # N = height·width query positions
        context = x if context is None else context
        # (B, N, C) -> (B, N, heads, d) -> (B, heads, N, d); views, no copies: SDPA takes the
        # strides.
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)
        # (B, heads, Nk, d)
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        out = attention(q, k, v, self.site.at(height, width), controller)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, heads·d)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection to 2× width, split into value and
    gate."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, hidden) each; value first, as trained
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4× width, then a Linear back: the transformer block's MLP."""

    def __init__(self, dim: int):
        super().__init__()
        # The published keys are `net.0.proj.*` (GEGLU) and `net.2.*` (output Linear): diffusers'
        # `net` is the list [GEGLU, Dropout, Linear], and the dropout (p = 0 in SD) has no weights,
        # so index 1 never appears. A dict keyed "0" and "2" gives those names without a placeholder
        # module for index 1.
        self.net = nn.ModuleDict(
            {"0": GEGLU(dim, FF_MULT * dim), "2": nn.Linear(FF_MULT * dim, dim)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))  # (B, N, dim) -> (B, N, 4·dim) -> (B, N, dim)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block on the flattened feature map: self-attention, cross-attention,
    GEGLU MLP.

    `site` names the block (its `kind` is set here: attn1 is "self", attn2 is "cross")."""

    def __init__(self, dim: int, context_dim: int, heads: int, site: Site):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, dim, heads, dataclasses.replace(site, kind="self"))
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, context_dim, heads, dataclasses.replace(site, kind="cross"))
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        height: int,
        width: int,
        controller: AttentionController | None,
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), None, height, width, controller)  # (B, HW, C)
        x = x + self.attn2(self.norm2(x), context, height, width, controller)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """The LDM SpatialTransformer: GroupNorm → 1×1 conv → transformer block on the H·W tokens → 1×1
    conv, added to the input. SD1.x has one transformer block per instance (depth 1)."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int, site: Site):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, context_dim, heads, site)]
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, controller: AttentionController | None
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        # (B, C, H, W) -> (B, HW, C), row-major tokens
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context, H, W, controller)
        h = h.view(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # (B, HW, C) -> (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3×3 conv: halves height and width (rounding up)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (2× the input, or the size of the skip connection it
    meets when the latent side was odd at some level), then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownLevel(nn.Module):
    """One resolution level of the down path (diffusers' CrossAttnDownBlock2D / DownBlock2D): ResNet
    blocks (each followed by a transformer on CrossAttn levels), then a stride-2 downsample. Every
    output is pushed onto `skips` for the up path."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        with_attention: bool,
        with_downsample: bool,
        sites: list[Site],
    ):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(
            ResnetBlock(
                in_ch if i == 0 else out_ch, out_ch, temb_dim, cfg.norm_num_groups, cfg.norm_eps
            )
            for i in range(n)
        )
        self.attentions = (
            nn.ModuleList(
                Transformer2D(
                    out_ch, cfg.cross_attention_dim, cfg.num_heads, cfg.norm_num_groups, site
                )
                for site in sites
            )
            if with_attention
            else None
        )
        self.downsamplers = (
            nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)]) if with_downsample else None
        )

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        controller: AttentionController | None,
        skips: list[torch.Tensor],
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, controller)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """resnet → transformer → resnet at the lowest resolution (diffusers'
    UNetMidBlock2DCrossAttn)."""

    def __init__(self, cfg: UNetConfig, ch: int, temb_dim: int, site: Site):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.attentions = nn.ModuleList(
            [Transformer2D(ch, cfg.cross_attention_dim, cfg.num_heads, g, site)]
        )
        self.resnets = nn.ModuleList(
            [ResnetBlock(ch, ch, temb_dim, g, eps), ResnetBlock(ch, ch, temb_dim, g, eps)]
        )

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        controller: AttentionController | None,
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, controller)
        return self.resnets[1](x, temb)


class UpLevel(nn.Module):
    """One resolution level of the up path (diffusers' CrossAttnUpBlock2D / UpBlock2D):
    layers_per_block+1 ResNet blocks, each fed its input concatenated with one skip connection."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_ch: int,
        out_ch: int,
        prev_out_ch: int,
        temb_dim: int,
        with_attention: bool,
        with_upsample: bool,
        sites: list[Site],
    ):
        super().__init__()
        n = cfg.layers_per_block + 1
        resnets = []
        for i in range(n):
            # Skips arrive last in first out: the first n-1 are the outputs of the down level of the
            # same resolution (out_ch channels); the last is that down level's input (in_ch
            # channels).
            skip_ch = in_ch if i == n - 1 else out_ch
            res_in = prev_out_ch if i == 0 else out_ch
            resnets.append(
                ResnetBlock(res_in + skip_ch, out_ch, temb_dim, cfg.norm_num_groups, cfg.norm_eps)
            )
        self.resnets = nn.ModuleList(resnets)
        self.attentions = (
            nn.ModuleList(
                Transformer2D(
                    out_ch, cfg.cross_attention_dim, cfg.num_heads, cfg.norm_num_groups, site
                )
                for site in sites
            )
            if with_attention
            else None
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if with_upsample else None

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        controller: AttentionController | None,
        skips: list[torch.Tensor],
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            # (B, C + C_skip, H, W) -> (B, out_ch, H, W)
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, controller)
        if self.upsamplers is not None:
            # the next level's resolution
            x = self.upsamplers[0](x, size=tuple(skips[-1].shape[-2:]))
        return x


def _is_cross_attn(block_type: str) -> bool:
    if block_type.startswith("CrossAttn"):
        return True
    if block_type in ("DownBlock2D", "UpBlock2D"):
        return False
    raise ValueError(
        f"unknown block type {block_type!r} in UNetConfig; expected "
        f"CrossAttnDownBlock2D, DownBlock2D, CrossAttnUpBlock2D or UpBlock2D"
    )


class UNet(nn.Module):
    """eps-prediction UNet of SD1.x. `forward(sample, timestep, context, controller=None) ->
    eps`."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        levels = len(ch)
        if len(cfg.down_block_types) != levels or len(cfg.up_block_types) != levels:
            raise ValueError(
                f"UNetConfig has {levels} block_out_channels but "
                f"{len(cfg.down_block_types)} down and {len(cfg.up_block_types)} up block types; "
                f"give one block type per level"
            )
        temb_dim = TIME_EMBED_MULT * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)

        # Transformer blocks are numbered in forward order: down path, mid, up path.
        index = 0

        def sites(block: str, level: int, count: int) -> list[Site]:
            nonlocal index
            out = [
                Site(block, level, index + i, "self")  # type: ignore[arg-type]
                for i in range(count)
            ]
            index += count
            return out

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(cfg.down_block_types):
            attn = _is_cross_attn(block_type)
            self.down_blocks.append(
                DownLevel(
                    cfg,
                    ch[i - 1] if i > 0 else ch[0],
                    ch[i],
                    temb_dim,
                    attn,
                    with_downsample=i < levels - 1,
                    sites=sites("down", i, cfg.layers_per_block) if attn else [],
                )
            )
        self.mid_block = MidBlock(cfg, ch[-1], temb_dim, sites("mid", 0, 1)[0])
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        for i, block_type in enumerate(cfg.up_block_types):
            attn = _is_cross_attn(block_type)
            self.up_blocks.append(
                UpLevel(
                    cfg,
                    in_ch=rev[min(i + 1, levels - 1)],
                    out_ch=rev[i],
                    prev_out_ch=rev[max(i - 1, 0)],
                    temb_dim=temb_dim,
                    with_attention=attn,
                    with_upsample=i < levels - 1,
                    sites=sites("up", i, cfg.layers_per_block + 1) if attn else [],
                )
            )

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _timesteps(
        self, timestep: int | float | torch.Tensor, batch: int, device: torch.device
    ) -> torch.Tensor:
        """int, float, 0-d or (1,) tensor (shared by the batch), or (B,) tensor -> (B,) on
        `device`."""
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0 or t.shape == (1,):
            return t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"timestep has shape {tuple(t.shape)}, expected () or ({batch},) "
                f"for a batch of {batch}; pass one timestep or one per sample"
            )
        return t

    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | float | torch.Tensor,
        context: torch.Tensor,
        controller: AttentionController | None = None,
    ) -> torch.Tensor:
        """(B, 4, h, w) noisy latent, timestep(s), (B, 77, 768) text context -> (B, 4, h, w)
        predicted noise."""
        t = self._timesteps(timestep, sample.shape[0], sample.device)
        t_freq = timestep_embedding(
            t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos, self.cfg.freq_shift
        )
        temb = self.time_embedding(t_freq.to(sample.dtype))  # (B, 4·C0)

        x = self.conv_in(sample)  # (B, C0, h, w)
        skips = [x]
        for level in self.down_blocks:
            x = level(x, temb, context, controller, skips)
        x = self.mid_block(x, temb, context, controller)
        for level in self.up_blocks:
            x = level(x, temb, context, controller, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 4, h, w)
