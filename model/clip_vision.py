"""CLIP's image tower and the two-tower model (Radford et al. 2021), for the CLIP proposer
(vlm/clip_proposer.py) and the CLIP score (evaluation/metrics.py): a ViT over the same pre-LN
transformer as the text tower (model/clip.py's `CLIPEncoder`). State-dict names equal transformers'
CLIP names, except that transformers' typo `pre_layrnorm` is spelled `pre_layernorm` here.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.clip import SD1_TEXT, CLIPEncoder, CLIPTextConfig, CLIPTextModel


@dataclass
class CLIPVisionConfig:
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    image_size: int = 224
    patch_size: int = 14
    act: str = "quick_gelu"
    eps: float = 1e-5


@dataclass
class CLIPConfig:
    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 768
    logit_scale_init: float = math.log(1 / 0.07)


# openai/clip-vit-large-patch14 (SD1's text encoder is its text tower).
VIT_L14 = CLIPConfig(
    text=SD1_TEXT,
    vision=CLIPVisionConfig(width=1024, num_layers=24, num_heads=16, mlp_dim=4096, patch_size=14),
    projection_dim=768,
)
# openai/clip-vit-base-patch32 (used for CLIP scores).
VIT_B32 = CLIPConfig(
    text=CLIPTextConfig(width=512, num_layers=12, num_heads=8, mlp_dim=2048),
    vision=CLIPVisionConfig(width=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=32),
    projection_dim=512,
)



class CLIPVisionEmbeddings(nn.Module):
    """ViT input (Dosovitskiy et al. 2020): non-overlapping patches projected by a strided
    conv, a learned class token prepended, learned position embeddings added."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        num_patches = (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(config.width))
        self.patch_embedding = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(num_patches + 1, config.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels)                  # [B, width, S/p, S/p]
        x = x.flatten(2).transpose(1, 2)                  # [B, N, width]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)                    # [B, 1 + N, width]
        return x + self.position_embedding.weight


class CLIPVisionModel(nn.Module):
    """CLIP vision tower: a ViT with an extra LayerNorm before the transformer; the pooled
    output is the LayerNormed class token."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.width, eps=config.eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, S, S] from `preprocess`; returns the last hidden state (no post-LN)."""
        pixels = pixels.to(self.embeddings.patch_embedding.weight.dtype)
        x = self.pre_layernorm(self.embeddings(pixels))   # [B, 1 + N, width]
        return self.encoder(x, causal=False)              # [B, 1 + N, width]

    def class_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LayerNormed class token, [B, width]: the tower's pooled output."""
        return self.post_layernorm(hidden[:, 0])          # [B, width]


# ---------------------------------------------------------------- two towers

class CLIPModel(nn.Module):
    """Both towers plus linear projections into the shared embedding space. The contrastive
    logits are cos(text, image) * exp(logit_scale)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(config.text)
        self.vision_model = CLIPVisionModel(config.vision)
        self.text_projection = nn.Linear(config.text.width, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision.width, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, 77] ids -> [B, projection_dim], NOT L2-normalized (normalize before cosines)."""
        pooled = self.text_model.at_eos(self.text_model(ids), ids)
        return self.text_projection(pooled)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] pixels from `preprocess` -> [B, projection_dim], NOT L2-normalized."""
        pooled = self.vision_model.class_token(self.vision_model(pixels))
        return self.visual_projection(pooled)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """[B, 3, H, W] images in [-1, 1] -> [B, 3, S, S] CLIP pixel values: resize the short side
    to S (bicubic, antialiased), center-crop, normalize with CLIP's mean/std. Like
    CLIPImageProcessor, but on float tensors instead of 8-bit images."""
    H, W = images.shape[-2:]
    short, long = min(H, W), max(H, W)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if H <= W else (new_long, image_size)
    x = (images + 1) / 2
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)  # bicubic overshoots; an 8-bit pipeline would clip here too
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    x = x[..., top:top + image_size, left:left + image_size]  # [B, 3, S, S]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std
