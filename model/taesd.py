"""TAESD, the tiny autoencoder for Stable Diffusion's latent space, written from scratch.

Source: Ollin Boer Bohan (madebyollin), "TAESD: Tiny AutoEncoder for Stable Diffusion",
https://github.com/madebyollin/taesd (taesd.py); diffusers ships it as AutoencoderTiny. It is
distilled from SD's KL VAE (model/vae.py) to read and write the same latents, with about 1.2M
parameters per half against the VAE's 34M (encoder) and 49M (decoder): no normalization, no
attention, only 3x3 convolutions 64 channels wide with ReLUs, in residual blocks. Its images are a
little softer than the VAE's, which is why interfaces use it for live previews.

    image [-1, 1] --(x + 1) / 2--> TAESDEncoder --> latents        (the UNet's, already scaled)
    latents --tanh clamp--> TAESDDecoder --> [0, 1] --2x - 1--> image [-1, 1]

It was trained on the latents the UNet sees, that is the VAE's latents times the VAE's scaling factor
(0.18215 for SD1/SD2), so its own scaling_factor is 1.0. `TAESD.encode` and `decode` follow
AutoencoderKL's convention: they take and give scaled latents and images in about [-1, 1], so TAESD
can stand in for the VAE's `decode`. This matches how diffusers' pipelines use AutoencoderTiny:
`vae.decode(latents / vae.config.scaling_factor)`, whose DecoderTiny maps its [0, 1] output to
[-1, 1], and EncoderTiny maps [-1, 1] images to [0, 1] first.

Module and parameter names mirror diffusers' AutoencoderTiny (encoder.layers.N..., decoder.layers.N...,
each block's conv.0/conv.2/conv.4), so its state dict loads as is. madebyollin's own files number the
same nn.Sequential from his Clamp module, one index ahead in the decoder; checkpoint/taesd.py maps them.
AutoencoderTiny's latent_magnitude and latent_shift only store latents as 8-bit images
(`scale_latents`); they play no part in encode or decode, so they are not here.
"""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TAESDConfig:
    in_channels: int = 3  # image channels (RGB)
    out_channels: int = 3
    latent_channels: int = 4
    encoder_width: int = 64  # channels of every encoder block (AutoencoderTiny's encoder_block_out_channels)
    decoder_width: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # blocks per stage; every stage after the first halves H, W
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # every stage but the last doubles H, W
    # latents the model takes and gives = scaling_factor * latents it was trained on (1.0: TAESD
    # was trained on the UNet's latents, already scaled)
    scaling_factor: float = 1.0
    encoder: bool = True  # False: a decoder alone, as madebyollin's taesd_decoder file holds; enough for previews


SD = TAESDConfig()  # madebyollin/taesd: SD 1.x and 2.x share one latent space
SDXL = TAESDConfig()  # madebyollin/taesdxl: the same network, trained on SDXL's VAE latents


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class TAESDBlock(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + x): three 3x3 convs and a skip, at one width.
    (madebyollin: Block; diffusers: AutoencoderTinyBlock, whose `skip` is an Identity at one width.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESDEncoder(nn.Module):
    """Image [B, 3, H, W] in [0, 1] -> latents [B, 4, H/8, W/8] (ceil for sizes not divisible by 8).
    One nn.Sequential, so that its indices are diffusers' EncoderTiny's and madebyollin's."""

    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        w = cfg.encoder_width
        layers = []
        for stage, blocks in enumerate(cfg.encoder_blocks):
            # the first stage lifts RGB to w channels; the others halve H and W (a stride-2 conv, no bias)
            layers.append(_conv(cfg.in_channels, w) if stage == 0 else _conv(w, w, stride=2, bias=False))
            layers += [TAESDBlock(w) for _ in range(blocks)]
        layers.append(_conv(w, cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # SD: [B, 3, H, W] -> [B, 64, H, W] -> [B, 64, H/2, W/2] -> [B, 64, H/4, W/4] -> [B, 64, H/8, W/8]
        return self.layers(images)  # [B, 4, H/8, W/8]


class TAESDDecoder(nn.Module):
    """Latents [B, 4, h, w] -> image [B, 3, 8h, 8w] in about [0, 1] (not clamped).
    The latents are first soft-clamped to (-3, 3) by 3 tanh(z / 3), which leaves the UNet's latents
    of about unit variance nearly as they are (1 -> 0.97) and bounds outliers. madebyollin's Decoder
    does it in a Clamp module at index 0, diffusers' DecoderTiny in its forward, as here."""

    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        w, last = cfg.decoder_width, len(cfg.decoder_blocks) - 1
        layers = [_conv(cfg.latent_channels, w), nn.ReLU()]
        for stage, blocks in enumerate(cfg.decoder_blocks):
            layers += [TAESDBlock(w) for _ in range(blocks)]
            if stage < last:  # double H and W, then a conv without bias
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(w, w, bias=False)]
        layers.append(_conv(w, cfg.out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(latents / 3) * 3  # [B, 4, h, w], inside (-3, 3)
        # SD: [B, 64, h, w] -> [B, 64, 2h, 2w] -> [B, 64, 4h, 4w] -> [B, 64, 8h, 8w]
        return self.layers(x)  # [B, 3, 8h, 8w]


class TAESD(nn.Module):
    """madebyollin's tiny autoencoder, with AutoencoderKL's encode/decode convention: scaled latents
    in and out, images in about [-1, 1]. As there, `encode` and `decode` are the one place where
    latents are scaled and pixel ranges mapped; `encoder` and `decoder` are madebyollin's networks,
    on images in [0, 1]."""

    def __init__(self, cfg: TAESDConfig = SD):
        super().__init__()
        self.config = cfg
        self.encoder = TAESDEncoder(cfg) if cfg.encoder else None
        self.decoder = TAESDDecoder(cfg)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8]. Deterministic: TAESD's
        encoder gives latents, not a distribution."""
        if self.encoder is None:
            raise RuntimeError("this TAESD has no encoder (it was loaded from a decoder file alone); "
                               "load the encoder file next to it, or a diffusers AutoencoderTiny folder")
        return self.config.scaling_factor * self.encoder((images + 1) / 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w], in about [-1, 1] but NOT clamped,
        as AutoencoderKL.decode; map to [0, 1] with `(images / 2 + 0.5).clamp(0, 1)`."""
        return self.decoder(latents / self.config.scaling_factor) * 2 - 1
