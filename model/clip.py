"""CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"), Stable Diffusion's text encoder: the UNet is conditioned on its hidden states.

`CLIPEncoder` is the pre-LN transformer both of CLIP's towers share; the image tower and the two-tower model, which the
CLIP proposer and the CLIP score use, are in model/clip_vision.py. State-dict names equal transformers' CLIP names.
"""
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
    eos_id: int | None = None  # the pooled output's token (its first one); None: the largest id (see at_eos)


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
        return self.token_embedding(ids) + self.position_embedding.weight[:ids.shape[1]]  # [B, T, width]


class CLIPTextModel(nn.Module):
    """CLIP text tower: token + learned position embeddings, a causal transformer, a final LayerNorm. No padding mask:
    SD pipelines pass none, so pad tokens are attended to (only by later positions, because of the causal mask).

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

    def at_eos(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The hidden state [B, width] at the first `eos_id` (position 0 if absent), as transformers pools;
        without one (configs with its legacy eos_token_id 2: the SD hub files), at the first largest id,
        which is the first EOS: 49407 is the largest id of CLIP's vocabulary."""
        at = ids.argmax(-1) if self.config.eos_id is None else (ids == self.config.eos_id).int().argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), at]
