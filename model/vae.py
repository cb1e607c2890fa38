"""The Stable Diffusion KL autoencoder (VAE), written from scratch.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3.1) runs the diffusion process not on pixels but on the latent
space of an autoencoder trained with a perceptual + adversarial loss and a small KL
penalty towards N(0, I). For SD 1.x and 2.x the encoder maps an RGB image [B, 3, H, W]
to a diagonal Gaussian over latents [B, 4, H/8, W/8]; the decoder maps latents back.

    image --VAEEncoder--> (mean, logvar) --quant_conv--> z ~ N(mean, exp(logvar))
    z --post_quant_conv--> VAEDecoder --> image

Module and parameter names mirror diffusers' AutoencoderKL, so a diffusers VAE state dict
loads with `load_state_dict(sd, strict=True)`. The resnet block, attention and upsampler are the
UNet's (the resnet block without a time embedding).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.unet import ResnetBlock, Upsample, attention


@dataclass
class VAEConfig:
    in_channels: int = 3                                # image channels (RGB)
    out_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)   # per resolution level; H/2 per level
    layers_per_block: int = 2                           # resnets per encoder level (decoder: +1)
    norm_groups: int = 32
    norm_eps: float = 1e-6
    # 1 / std of the latents over training data, so the diffusion model sees roughly
    # unit-variance inputs (Rombach et al. 2022, Sec. 4.3.2). Applied only in
    # AutoencoderKL.encode / decode.
    scaling_factor: float = 0.18215
    # Per channel, taken out of z before that scaling where an SDXL VAE's config says (Playground v2.5's)
    latents_mean: tuple[float, ...] = (0.0,)
    latents_std: tuple[float, ...] = (1.0,)


SD = VAEConfig()  # SD 1.x and SD 2.x share the same VAE


def _group_norm(channels: int, cfg: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)


def _resnets(in_channels: int, out_channels: int, num_layers: int, cfg: VAEConfig) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, cfg.norm_groups,
                                     cfg.norm_eps) for i in range(num_layers))


class VAEAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.
    Used once, in the bottleneck. q/k/v/out are Linear layers over channels (the
    original LDM checkpoints store them as 1x1 convs; same numbers, other shape)."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.group_norm = _group_norm(channels, cfg)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only for the name `to_out.0`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        h = attention(self.to_q(h), self.to_k(h), self.to_v(h), num_heads=1)  # softmax(q k^T / sqrt(C)) v
        h = self.to_out[0](h)  # [B, H*W, C]
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class VAEDownsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. The input is zero-padded on the right and
    bottom only, by one pixel (as in the original LDM code), rather than symmetrically."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H/2, W/2]


class DownBlock(nn.Module):
    """One encoder level: `num_layers` resnets, then a VAEDownsample unless it is the last
    level. (diffusers: DownEncoderBlock2D.)"""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, downsample: bool, cfg: VAEConfig):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, cfg)
        self.downsamplers = nn.ModuleList([VAEDownsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # [B, out_channels, H, W]
        for downsampler in self.downsamplers:
            x = downsampler(x)  # [B, out_channels, H/2, W/2]
        return x


class UpBlock(nn.Module):
    """One decoder level: `num_layers` resnets, then an Upsample unless it is the last
    level. (diffusers: UpDecoderBlock2D.)"""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, upsample: bool, cfg: VAEConfig):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_layers, cfg)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # [B, out_channels, H, W]
        for upsampler in self.upsamplers:
            x = upsampler(x, (2 * x.shape[-2], 2 * x.shape[-1]))  # [B, C, 2H, 2W]
        return x


class VAEMidBlock(nn.Module):
    """The bottleneck at H/8: resnet, attention, resnet. (diffusers: UNetMidBlock2D.)"""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.resnets = _resnets(channels, channels, 2, cfg)
        self.attentions = nn.ModuleList([VAEAttention(channels, cfg)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class VAEEncoder(nn.Module):
    """Image [B, 3, H, W] -> Gaussian parameters [B, 2*latent, H/f, W/f], f = 2^(levels-1),
    stacked as (mean, logvar) along channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, downsample=i < len(ch) - 1, cfg=cfg)
            for i in range(len(ch))
        )
        self.mid_block = VAEMidBlock(ch[-1], cfg)
        self.conv_norm_out = _group_norm(ch[-1], cfg)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # [B, 128, H, W]
        for block in self.down_blocks:
            x = block(x)  # SD: [B, 128, H/2, W/2], [B, 256, H/4, W/4], [B, 512, H/8, W/8] x2
        x = self.mid_block(x)  # [B, 512, H/8, W/8]
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, 8, H/8, W/8]


class VAEDecoder(nn.Module):
    """Latents [B, latent, h, w] -> image [B, 3, h*f, w*f]. Mirrors the encoder, with one
    more resnet per level. up_blocks[0] is the deepest (lowest-resolution) level."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels[::-1]  # deepest level first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], cfg)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, upsample=i < len(ch) - 1, cfg=cfg)
            for i in range(len(ch))
        )
        self.conv_norm_out = _group_norm(ch[-1], cfg)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)  # [B, 512, h, w]
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)  # SD: [B, 512, 2h, 2w], [B, 512, 4h, 4w], [B, 256, 8h, 8w], [B, 128, 8h, 8w]
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, 3, 8h, 8w]


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1).

    This class is the ONE place where latents are scaled: `encode` returns `scaling_factor * (z - mean) / std`
    and `decode` inverts it, so everything outside the VAE (UNet, sampler, pipeline) only ever sees scaled latents.
    """

    def __init__(self, cfg: VAEConfig = SD):
        super().__init__()
        self.config = cfg
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8].

        Returns `scaling_factor * (z - mean) / std` (the config's latents_mean and latents_std:
        0 and 1 in SD), where z is the posterior mean if `generator` is None,
        else a sample `mean + std * eps`. eps ~ N(0, I) is drawn on the generator's device
        in the latents' dtype and then moved to the latents' device, with logvar clamped
        to [-30, 20] first: the same draw as diffusers' DiagonalGaussianDistribution.sample,
        so the same seed gives the same latents.
        """
        moments = self.quant_conv(self.encoder(images))  # [B, 8, H/8, W/8]
        mean, logvar = moments.chunk(2, dim=1)  # [B, 4, H/8, W/8] each
        z = mean
        if generator is not None:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + std * eps.to(mean.device)
        shift, spread = self.latent_stats(z)  # [1, C, 1, 1] each
        return (z - shift) * self.config.scaling_factor / spread

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w].

        Values are roughly in [-1, 1] but NOT clamped; map to [0, 1] with
        `(images / 2 + 0.5).clamp(0, 1)` when converting to pixels. The latents are cast to the
        VAE's dtype, which may be wider than the UNet's (SDXL's VAE decodes in fp32).
        """
        return self.decoder(self.post_quant_conv(self.unscale(latents)))

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> z in the VAE's dtype: `encode`'s scaling undone."""
        z = latents.to(self.post_quant_conv.weight.dtype)
        shift, spread = self.latent_stats(z)  # [1, C, 1, 1] each
        return z * spread / self.config.scaling_factor + shift

    def latent_stats(self, like: torch.Tensor) -> list[torch.Tensor]:
        """The config's latents_mean and latents_std as [1, C, 1, 1] tensors like `like` (SD's: [0] and [1])."""
        return [like.new_tensor(v).view(1, -1, 1, 1) for v in (self.config.latents_mean, self.config.latents_std)]
