"""The Stable Diffusion denoiser: a UNet over latents, conditioned on the timestep
and, through cross-attention, on the text encoder's hidden states.

Ronneberger et al. 2015 (the UNet), Ho et al. 2020 (its use as a noise predictor ε_θ(x_t, t)),
Rombach et al. 2022 (latent diffusion, cross-attention conditioning; the architecture here is
their openaimodel.py UNet with SpatialTransformer blocks). SDXL (Podell et al. 2023) is the same
code with another config: per-level transformer depths, no attention at the top level, and the
pooled text embedding and size/crop ids added to the time embedding.

Parameter names follow diffusers' UNet2DConditionModel, so a diffusers state dict loads as is;
checkpoint/original.py maps the original CompVis/Stability names onto these.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # per resolution level
    layers_per_block: int = 2  # res blocks per level on the way down; one more on the way up
    attention: tuple[bool, ...] = (True, True, True, False)  # cross-attention at this level?
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # per level; the middle block uses the last
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # transformer blocks per attention, per level
    context_dim: int = 768  # width of the text encoder's hidden states
    linear_proj: bool = False  # proj_in/proj_out: 1x1 conv (SD1) or Linear (SD2)
    norm_groups: int = 32
    norm_eps: float = 1e-5
    upcast_attention: bool = False  # compute attention in fp32 (SD2.1 needs it in fp16)
    sample_size: int = 64  # latent size the model was trained at (image size / 8)
    # SDXL's added conditioning (Podell et al. 2023, sec. 2.2): the pooled text embedding and the
    # size/crop ids, each id embedded like a timestep in `addition_time_embed_dim` sinusoids, go
    # through one MLP of `projection_class_embeddings_input_dim` inputs into the time embedding.
    addition_time_embed_dim: int = 0  # 256 in SDXL; 0: no added conditioning
    projection_class_embeddings_input_dim: int = 0  # pooled width + 6 ids x 256 = 2816 in SDXL

    @property
    def time_dim(self) -> int:
        return 4 * self.channels[0]


SD15 = UNetConfig()
SD21 = UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, upcast_attention=True, sample_size=96)
SD21_BASE = UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, sample_size=64)
# SDXL base 1.0: three levels, no attention at the top one, 64 channels per head, 10 transformer
# blocks at the deepest level (and in the middle block).
SDXL = UNetConfig(channels=(320, 640, 1280), attention=(False, True, True), num_heads=(5, 10, 20),
                  transformer_depth=(1, 2, 10), context_dim=2048, linear_proj=True, sample_size=128,
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017, sec. 3.5), cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # [B, dim/2]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # [B, dim]


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))  # [B, in_dim] -> [B, dim]


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the (optional) time embedding added between the convs
    and a 1x1 conv on the skip path when the channel count changes. Shared with the VAE."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))  # [B, out, H, W]
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


def attention(q, k, v, num_heads: int, upcast: bool = False):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1) over [B, N, C] tensors."""
    B, N, C = q.shape
    dtype = q.dtype
    q, k, v = (z.unflatten(-1, (num_heads, -1)).transpose(1, 2) for z in (q, k, v))  # [B, heads, N, C/heads]
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2).to(dtype)  # [B, N, C]


class CrossAttention(nn.Module):
    """Multi-head attention from the feature map's positions to a context: the text states
    (cross-attention, attn2), or with context=None the positions themselves (self-attention, attn1).
    CompVis' name for it; diffusers calls it Attention."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.num_heads, self.upcast = num_heads, upcast
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None):
        context = x if context is None else context  # [B, M, context_dim]; x: [B, N, dim]
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.num_heads, self.upcast)
        return self.to_out[0](out)  # [B, N, dim]


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection to twice the width, half gates the other."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)  # [B, N, hidden] each
        return x * F.gelu(gate)  # [B, N, hidden]


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, num_heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, num_heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the H*W positions of a feature map, as a residual.
    proj_in/proj_out are 1x1 convs in SD1 and Linear layers in SD2 (the same map)."""

    def __init__(self, ch: int, num_heads: int, depth: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)
        self.linear_proj = cfg.linear_proj
        proj = (lambda: nn.Linear(ch, ch)) if cfg.linear_proj else (lambda: nn.Conv2d(ch, ch, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(ch, num_heads, cfg.context_dim, cfg.upcast_attention) for _ in range(depth)
        )
        self.proj_out = proj()

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_proj:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.linear_proj:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h)
        h = h.transpose(1, 2).unflatten(2, (H, W))  # [B, C, H, W]
        if not self.linear_proj:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # [B, C, H, W] -> [B, C, ⌈H/2⌉, ⌈W/2⌉]


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        # Nearest-neighbour to the skip connection's size: x2, or one less where a downsample rounded up.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # [B, C, *size]


class Block(nn.Module):
    """One resolution level: res blocks, each optionally followed by a spatial transformer,
    then an optional resampler (a Downsample or an Upsample). Down blocks push their outputs
    onto the skip stack; up blocks pop one skip per res block and concatenate it to their input."""

    def __init__(self, resnets, attentions, resampler=None, up=False):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        if resampler is not None:
            setattr(self, "upsamplers" if up else "downsamplers", nn.ModuleList([resampler]))
        self.up = up

    def forward(self, x, temb, context, skips):
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attn in zip(self.resnets, attentions):
            if self.up:
                x = torch.cat([x, skips.pop()], dim=1)  # [B, C + C_skip, H, W]
            x = resnet(x, temb)  # [B, C_out, H, W]
            if attn is not None:
                x = attn(x, context)
            if not self.up:
                skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)  # [B, C_out, H/2, W/2]
            skips.append(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, skips[-1].shape[-2:])  # [B, C_out, ~2H, ~2W]: the next skip's size
        return x


class MidBlock(nn.Module):
    def __init__(self, ch: int, num_heads: int, depth: int, cfg: UNetConfig):
        super().__init__()
        res = lambda: ResnetBlock(ch, ch, cfg.time_dim, cfg.norm_groups, cfg.norm_eps)
        self.resnets = nn.ModuleList([res(), res()])
        self.attentions = nn.ModuleList([SpatialTransformer(ch, num_heads, depth, cfg)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    """ε_θ(x_t, t, c): predicts the noise (or v, for v-models) in latents x_t at timestep t
    given text states c. Channels per level come from the config; nothing is hard-coded."""

    def __init__(self, cfg: UNetConfig = SD15):
        super().__init__()
        self.config = cfg
        chs, n = cfg.channels, len(cfg.channels)
        res = lambda i, o: ResnetBlock(i, o, cfg.time_dim, cfg.norm_groups, cfg.norm_eps)
        attn = lambda level, ch: SpatialTransformer(ch, cfg.num_heads[level], cfg.transformer_depth[level], cfg)

        self.time_embedding = TimestepEmbedding(chs[0], cfg.time_dim)
        if cfg.addition_time_embed_dim:
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)

        skip_chs, ch = [chs[0]], chs[0]
        self.down_blocks = nn.ModuleList()
        for level, out in enumerate(chs):
            resnets, attentions = [], []
            for _ in range(cfg.layers_per_block):
                resnets.append(res(ch, out))
                ch = out
                if cfg.attention[level]:
                    attentions.append(attn(level, ch))
                skip_chs.append(ch)
            last = level == n - 1
            if not last:
                skip_chs.append(ch)
            self.down_blocks.append(Block(resnets, attentions, None if last else Downsample(ch)))

        self.mid_block = MidBlock(ch, cfg.num_heads[-1], cfg.transformer_depth[-1], cfg)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(n)):
            out = chs[level]
            resnets, attentions = [], []
            for _ in range(cfg.layers_per_block + 1):
                resnets.append(res(ch + skip_chs.pop(), out))
                ch = out
                if cfg.attention[level]:
                    attentions.append(attn(level, ch))
            self.up_blocks.append(Block(resnets, attentions, Upsample(ch) if level > 0 else None, up=True))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`pooled` [B, P] and `time_ids` [B, 6] (or [6] for every row) are SDXL's added conditioning;
        models without it ignore them."""
        B = x.shape[0]
        # A number (the sampling loop's t) becomes a tensor by torch.full, which torch.compile traces
        # with t symbolic; through torch.as_tensor it would trace the UNet again for every timestep.
        if isinstance(t, (int, float)):
            t = torch.full((B,), t, device=x.device)  # [B]
        else:
            t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # [B]
        temb = self.time_embedding(timestep_embedding(t, self.config.channels[0]).to(x.dtype))  # [B, 4*320]
        if self.config.addition_time_embed_dim:
            temb = temb + self.added_embedding(pooled, time_ids, x.shape[0])

        x = self.conv_in(x)  # [B, 320, H/8, W/8]
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, context, skips)  # [B, 1280, H/64, W/64] after the last
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            x = block(x, temb, context, skips)  # [B, 320, H/8, W/8] after the last
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, 4, H/8, W/8]

    def added_embedding(self, pooled, time_ids, batch: int) -> torch.Tensor:
        """SDXL's added conditioning (Podell et al. 2023, sec. 2.2): MLP(pooled ‖ sinusoids of each id)."""
        if pooled is None or time_ids is None:
            raise ValueError("this UNet (SDXL) needs the pooled text embedding and the size/crop time_ids: "
                             "call it as unet(x, t, context, pooled=..., time_ids=...)")
        time_ids = torch.as_tensor(time_ids, device=pooled.device)
        time_ids = time_ids.expand(batch, -1) if time_ids.dim() == 1 else time_ids  # [B, 6]
        ids = timestep_embedding(time_ids.flatten(), self.config.addition_time_embed_dim)  # [B*6, 256]
        added = torch.cat([pooled.float(), ids.reshape(batch, -1)], dim=-1)  # [B, P + 6*256]
        return self.add_embedding(added.to(self.add_embedding.linear_1.weight.dtype))  # [B, 4*320]
