"""CLIP text and vision transformers (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision").

Stable Diffusion conditions its UNet on the text tower's last hidden state; the full
two-tower model is used for CLIP scores. Both towers are the same pre-LN transformer
(`CLIPEncoder`); they differ only in how they embed their input and what they read out.
State-dict names equal transformers' CLIP names, except that transformers' typo
`pre_layrnorm` is spelled `pre_layernorm` here.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CLIPTextConfig:
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    vocab_size: int = 49408
    max_positions: int = 77
    act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (exact; OpenCLIP)
    eps: float = 1e-5
    # What the UNet cross-attends to: the hidden state after layer `num_layers + 1 + context_layer`
    # (-1: the last layer, -2: the penultimate, as SDXL reads both of its encoders), with the final
    # LayerNorm applied or not.
    context_layer: int = -1
    context_norm: bool = True
    projection_dim: int = 0  # a text_projection of the pooled output (SDXL's bigG: 1280); 0: none


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


# SD1: OpenAI CLIP ViT-L/14 text tower, all 12 layers.
SD1_TEXT = CLIPTextConfig(width=768, num_layers=12, num_heads=12, mlp_dim=3072, act="quick_gelu")
# SD2: OpenCLIP ViT-H/14 text tower. SD2 reads the penultimate layer and then applies the
# final LayerNorm, which is the same as keeping only the first 23 of its 24 layers.
SD2_TEXT = CLIPTextConfig(width=1024, num_layers=23, num_heads=16, mlp_dim=4096, act="gelu")
# SDXL (Podell et al. 2023, sec. 2.1): both encoders' penultimate hidden states, without the final
# LayerNorm, concatenated to 768 + 1280 = 2048 per token; and OpenCLIP ViT-bigG/14's pooled output,
# its final-LayerNormed EOS token of the last layer through its text projection.
SDXL_TEXT_L = CLIPTextConfig(width=768, num_layers=12, num_heads=12, mlp_dim=3072, act="quick_gelu",
                             context_layer=-2, context_norm=False)
SDXL_TEXT_G = CLIPTextConfig(width=1280, num_layers=32, num_heads=20, mlp_dim=5120, act="gelu",
                             context_layer=-2, context_norm=False, projection_dim=1280)

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


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


# ---------------------------------------------------------------- shared transformer

class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (all with bias)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)  # [B, heads, T, C/heads]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)       # [B, heads, T, C/heads]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))            # [B, T, C]


class MLP(nn.Module):
    """Position-wise feed-forward: width -> mlp_dim -> width."""

    def __init__(self, width: int, mlp_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = ACTIVATIONS[act]
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: "CLIPTextConfig | CLIPVisionConfig"):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.self_attn = CLIPAttention(config.width, config.num_heads)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = MLP(config.width, config.mlp_dim, config.act)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of `num_layers` pre-LN blocks both towers share."""

    def __init__(self, config: "CLIPTextConfig | CLIPVisionConfig"):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_layers))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal)
        return x


# ---------------------------------------------------------------- text tower

class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned embedding per position (0..76)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        return self.token_embedding(ids) + self.position_embedding.weight[:T]  # [B, T, width]


class CLIPTextModel(nn.Module):
    """CLIP text tower: token + learned position embeddings, a causal transformer, a final
    LayerNorm. No padding mask: SD pipelines pass none, so pad tokens are attended to (only
    by later positions, because of the causal mask).

    `forward` gives the states the UNet reads (the config's `context_layer` and `context_norm`);
    `encode` gives them together with the pooled output, projected when the config has a
    `projection_dim` (transformers' CLIPTextModelWithProjection.text_embeds)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.eps)
        if config.projection_dim:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._run(ids, with_pooled=False)[0]  # [B, 77, width]

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, 77, width], pooled [B, projection_dim or width]). The pooled output is the
        final-LayerNormed last layer at the EOS token, whatever layer the context comes from."""
        return self._run(ids, with_pooled=True)

    def _run(self, ids: torch.Tensor, with_pooled: bool):
        cfg = self.config
        read = cfg.num_layers + 1 + cfg.context_layer  # layers run before the context is read
        layers = self.encoder.layers if with_pooled else self.encoder.layers[:read]
        x = self.embeddings(ids)                # [B, 77, width]
        context = x if read == 0 else None
        for i, layer in enumerate(layers, 1):
            x = layer(x, causal=True)           # [B, 77, width]
            if i == read:
                context = x
        if cfg.context_norm:
            context = self.final_layer_norm(context)
        if not with_pooled:
            return context, None
        out = self.at_eos(self.final_layer_norm(x), ids)  # [B, width]
        return context, self.text_projection(out) if cfg.projection_dim else out

    @staticmethod
    def at_eos(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The hidden state at the EOS token, [B, width].

        EOS (49407) is the largest id in CLIP's vocabulary and `argmax` returns the first
        maximum, so this is the first EOS even when the padding is EOS too (SD1). That is
        what transformers does for configs with the legacy `eos_token_id == 2` (the SD and
        openai hub files), and equals its newer "first `eos_token_id`" rule whenever every
        sequence contains EOS and no id above it (no tokens added to the vocabulary)."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), ids.argmax(-1)]


# ---------------------------------------------------------------- vision tower

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
