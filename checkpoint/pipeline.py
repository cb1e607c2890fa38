"""The Pipeline: the parts of one Stable Diffusion model, as `weights.load_pipeline` returns them."""
from dataclasses import dataclass

import torch

from model.clip import CLIPTextModel
from model.tokenizer import Tokenizer
from model.unet import UNet
from model.vae import AutoencoderKL
from sampler.schedule import SchedulerConfig


@dataclass
class Pipeline:
    tokenizer: Tokenizer  # list[str] -> LongTensor[B, 77] (its max_length)
    text_encoder: CLIPTextModel  # ids -> [B, 77, D]
    unet: UNet  # (latents[B, 4, h, w], t, context[B, 77, D]) -> [B, 4, h, w]
    vae: AutoencoderKL  # decode(latents) -> images in [-1, 1]; encode(images) -> latents
    scheduler: SchedulerConfig
    family: str  # "sd1" or "sd2"
    name: str  # where it came from, for image metadata

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's conditioning for each text: the hidden states [N, 77, D] it cross-attends to,
        and the pooled embedding [N, P] of models with added conditioning (None for SD 1.x/2.x)."""
        ids = self.tokenizer(texts).to(self.device)  # [N, 77]
        return self.text_encoder(ids), None

    def time_ids(self, height: int, width: int) -> torch.Tensor | None:
        """The size and crop micro-conditioning [6] of models that take it; None for SD 1.x/2.x."""
        return None

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel: 8 in SD."""
        return 2 ** (len(self.vae.config.channels) - 1)

    @property
    def default_size(self) -> int:
        return self.vae_scale * self.unet.config.sample_size

    @property
    def device(self) -> torch.device:
        return self.unet.time_embedding.linear_1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.time_embedding.linear_1.weight.dtype
