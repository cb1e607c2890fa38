"""The Pipeline: the parts of one Stable Diffusion model, as `weights.load_pipeline` returns them."""
from dataclasses import dataclass, field

import torch

from model.clip import CLIPTextModel
from model.tokenizer import Tokenizer
from model.unet import UNet
from model.vae import AutoencoderKL
from sampler.loop import Embedded
from sampler.schedule import SchedulerConfig


@dataclass
class Pipeline:
    tokenizer: Tokenizer  # list[str] -> LongTensor[B, 77] (its max_length)
    text_encoder: CLIPTextModel  # ids -> [B, 77, D]
    unet: UNet  # (latents[B, 4, h, w], t, context[B, 77, D], pooled=None, time_ids=None) -> [B, 4, h, w]
    vae: AutoencoderKL  # decode(latents) -> images in [-1, 1]; encode(images) -> latents
    scheduler: SchedulerConfig
    family: str  # "sd1", "sd2" or "sdxl"
    name: str  # where it came from, for image metadata
    # SDXL: the second tokenizer and text encoder (OpenCLIP ViT-bigG), whose pooled output the UNet
    # also takes; and its repos' rule that the unconditional branch of a generation without a negative
    # prompt sees zeros, not the encoded empty text (`unconditional`).
    tokenizer_2: Tokenizer | None = None
    text_encoder_2: CLIPTextModel | None = None
    force_zeros_for_empty_prompt: bool = False
    loras: list = field(default_factory=list)  # the LoRAs merged into it, in order (checkpoint/lora.py's LoraInfo)

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's conditioning for each text, "" included: the hidden states [N, 77, D] it cross-attends to, and the
        pooled embedding [N, P] of models with added conditioning (None for SD 1.x/2.x).

        SDXL (Podell et al. 2023, sec. 2.1): both encoders' states side by side (768 + 1280 = 2048),
        and bigG's projected pooled output."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        hidden = self.text_encoder(self.tokenizer(texts).to(self.device))  # [N, 77, D]
        if self.text_encoder_2 is None:
            return hidden, None
        hidden_2, pooled = self.text_encoder_2.encode(self.tokenizer_2(texts).to(self.device))
        hidden = torch.cat([hidden, hidden_2.to(hidden.dtype)], dim=-1)  # [N, 77, 768 + 1280]
        return hidden, pooled  # [N, 77, 2048], [N, 1280]

    @property
    def unconditional(self) -> str | Embedded:
        """What the unconditional branch sees when no negative prompt is given: the empty text; for SDXL
        with `force_zeros_for_empty_prompt` (its repos set it), zeros for the hidden states and the pooled
        embedding, as diffusers' StableDiffusionXLPipeline conditions it when negative_prompt is None. An
        empty prompt, or a negative prompt given as "", is encoded like any text."""
        if not self.force_zeros_for_empty_prompt:
            return ""
        encoder = self.text_encoder_2
        zeros = lambda *shape: torch.zeros(shape, device=self.device, dtype=self.dtype)
        return Embedded(zeros(self.tokenizer.max_length, self.unet.config.context_dim),  # [77, 2048]
                        zeros(encoder.config.projection_dim or encoder.config.width), text="")  # [1280]

    def time_ids(self, height: int, width: int, original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None
                 ) -> torch.Tensor | None:
        """SDXL's size and crop micro-conditioning [6] (Podell et al. 2023, sec. 2.2): the original
        image size, the crop's top-left corner and the target size, each (height, width); the sizes
        default to the image's, as in diffusers. None for models without it (SD 1.x/2.x)."""
        if not self.unet.config.addition_time_embed_dim:
            return None
        values = [*(original_size or (height, width)), *crop_top_left, *(target_size or (height, width))]
        return torch.tensor(values, dtype=self.dtype, device=self.device)  # [6]

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet: it takes the mask and the masked image's latents beside x_t (9 input
        channels; sampler/edit.py)."""
        return self.unet.config.in_channels != self.unet.config.out_channels

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
