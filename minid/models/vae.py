"""The KL-regularised autoencoder (AutoencoderKL, "KL-f8") of Stable Diffusion 1.x.

    x (B, 3, H, W) in [-1, 1]
      encoder: conv_in → down_blocks (ResNet blocks, stride-2 downsample on all but the last level)
               → mid_block (resnet, single-head attention, resnet) → GroupNorm, SiLU → conv_out (2·4
               channels)
      quant_conv (1×1) → moments (B, 8, H/8, W/8) = [mean, logvar] of a diagonal Gaussian posterior
    z (B, 4, H/8, W/8)
      post_quant_conv (1×1) → decoder: conv_in → mid_block → up_blocks (layers_per_block+1 ResNet
      blocks,
               nearest 2× upsample + conv on all but the last level) → GroupNorm, SiLU → conv_out
    x̂ (B, 3, H, W)

The diffusion model works on `latent = scaling_factor · z` (0.18215 for SD1.x), which has roughly
unit variance; `encode_latent` / `decode_latent` apply and undo that scale.

Module names equal the key names of the published diffusers
`vae/diffusion_pytorch_model.fp16.safetensors` (the fp32 file's older `query/key/value/proj_attn`
attention names are renamed by the checkpoint loader). No time embedding here, and the attention is
not a seam: nothing edits the autoencoder's attention.

The building blocks carry a `VAE` prefix (or say which half they build) because minid.models.unet
has blocks of the same roles that behave differently: its ResNet blocks add a time embedding, its
downsampling pads symmetrically, its upsampling meets the size of a skip connection, and its mid
block cross-attends to text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minid.models.config import VAEConfig

# Every GroupNorm of the autoencoder uses this epsilon (fixed in the original LDM code, not in the
# config).
GROUP_NORM_EPS = 1e-6
# The smallest image side minid takes: the VAE downsamples by 8, and masks taken from attention come
# from maps a quarter of the latent side (64 px -> 8² latents -> 2² maps).
MIN_SIDE = 64
# DiagonalGaussian clamps log σ² to this range, as LDM does, so exp() neither overflows nor
# underflows.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(std²)), from moments (B, 2·C, h, w) = [mean,
    logvar]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(
        self, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """z = mean + std · ε, ε ~ N(0, I) drawn from `generator` (on the generator's device, then
        moved).

        A list gives one generator per batch row, the rows drawn in order: a row's sample then
        depends on its own seed only, not on the batch it is in (a generator listed twice serves two
        rows in turn).
        """
        if isinstance(generator, (list, tuple)):
            if len(generator) != self.mean.shape[0]:
                raise ValueError(
                    f"{len(generator)} generators for a batch of {self.mean.shape[0]}; "
                    "give one per row"
                )
            eps = torch.cat(
                [
                    torch.randn(
                        (1, *self.mean.shape[1:]),
                        generator=g,
                        device=g.device,
                        dtype=self.mean.dtype,
                    ).to(self.mean.device)
                    for g in generator
                ]
            )
            return self.mean + self.std * eps
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class VAEResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv → GroupNorm → SiLU → conv, plus the skip (a 1×1 conv when channels
    change).

    The UNet's block of the same shape also adds a projected time embedding; the autoencoder has no
    time."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all h·w positions with a residual, in the mid blocks.

    The head size is the full channel count (512), so this is softmax(q kᵀ / sqrt(512)) v.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A list of one so that the key is `to_out.0.weight`, as published: diffusers' `to_out` is
        # [Linear, Dropout], and the dropout has no weights, so only index 0 reaches the file.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        q = self.to_q(h)[:, None]  # (B, 1, HW, C): one head
        k = self.to_k(h)[:, None]
        v = self.to_v(h)[:, None]
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W)
        return x + h


class VAEDownsample(nn.Module):
    """Stride-2 3×3 conv after padding ONE row at the bottom and ONE column at the right only.

    Why asymmetric: the original (taming-transformers / LDM) code pads (left 0, right 1, top 0,
    bottom 1) by hand, so the 3×3 windows cover rows/columns 2i … 2i+2, centred on the odd pixels.
    The usual symmetric padding=1 gives the same output size but windows centred on the even pixels:
    a one-pixel shift the trained weights never saw. We reproduce the checkpoint's convention
    exactly.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2) for even H, W


class VAEUpsample(nn.Module):
    """Nearest-neighbour 2× upsampling, then a 3×3 conv. Always exactly 2×: the decoder has no skip
    connections whose size it must meet."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderLevel(nn.Module):
    """One resolution level of the encoder (diffusers' DownEncoderBlock2D): ResNet blocks, then a
    downsample (except on the last level)."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, with_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            VAEResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([VAEDownsample(out_ch)]) if with_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderLevel(nn.Module):
    """One resolution level of the decoder (diffusers' UpDecoderBlock2D): ResNet blocks, then an
    upsample (except on the last level)."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, with_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            VAEResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([VAEUpsample(out_ch)]) if with_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class VAEMidBlock(nn.Module):
    """resnet → single-head self-attention → resnet at the lowest resolution (no text: nothing to
    cross-attend)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(ch, groups)])
        self.resnets = nn.ModuleList(
            [VAEResnetBlock(ch, ch, groups), VAEResnetBlock(ch, ch, groups)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderLevel(
                ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, with_downsample=i < len(ch) - 1
            )
            for i in range(len(ch))
        )
        self.mid_block = VAEMidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for level in self.down_blocks:
            h = level(h)  # ... -> (B, C_last, H/8, W/8)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2·latent, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], g)
        self.up_blocks = nn.ModuleList(
            DecoderLevel(
                rev[max(i - 1, 0)],
                rev[i],
                cfg.layers_per_block + 1,
                g,
                with_upsample=i < len(rev) - 1,
            )
            for i in range(len(rev))
        )
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for level in self.up_blocks:
            h = level(h)  # ... -> (B, C0, 8h, 8w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, 8h, 8w)


class VAE(nn.Module):
    """AutoencoderKL. `encode(x) -> DiagonalGaussian`, `decode(z) -> x`; the *_latent methods apply
    the latent scale so their latents are what the UNet sees."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """(B, 3, H, W) image in [-1, 1], H and W multiples of 8 -> posterior over unscaled z (B, 4,
        H/8, W/8)."""
        factor = 2 ** (len(self.cfg.block_out_channels) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not a multiple of {factor}; "
                f"crop or pad the image so that height and width divide by {factor}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled z (B, 4, h, w) -> image (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def encode_latent(
        self,
        x: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Image -> the UNet's latent: scaling_factor · (posterior mean, or a sample when `sample`;
        `generator` as `DiagonalGaussian.sample` takes it, one per row when a list)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mean
        return self.cfg.scaling_factor * z

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """The UNet's latent -> image: undo the scale, then decode."""
        return self.decode(latent / self.cfg.scaling_factor)
