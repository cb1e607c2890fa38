"""Original single files (CompVis / Stability key names): one table per model from our key to the
original's, built with loops from the model's config, and the architecture read off the tensor shapes.

Each table maps our key to the original key, plus how the tensor is stored there: `to_ours` and
`to_original` are the only places where tensors are reshaped (1x1 conv <-> Linear) or split
(OpenCLIP's fused q/k/v). The loader and the exporter use the same tables, one each way.
"""
import re
from dataclasses import dataclass

import torch

from checkpoint.configs import bounded, check_text_to_image
from checkpoint.tensors import CheckpointError, meta_model
from model.clip import SD2_TEXT, CLIPTextConfig, CLIPTextModel
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig


@dataclass(frozen=True)
class Original:
    key: str
    part: int | None = None  # OpenCLIP fuses q, k, v into one in_proj: this is chunk `part` of 3
    conv: bool = False  # stored as a 1x1 conv where we have a Linear (the VAE's attention)
    transpose: bool = False  # stored transposed (OpenCLIP's text_projection)


def to_ours(stored: torch.Tensor, o: Original) -> torch.Tensor:
    """The one place where original tensors are reshaped into ours."""
    if o.part is not None:
        stored = stored.chunk(3, dim=0)[o.part]
    if o.conv:
        stored = stored.flatten(1)
    return stored.t() if o.transpose else stored


def to_original(ours: list[torch.Tensor], o: Original) -> torch.Tensor:
    """The inverse of to_ours; `ours` holds the 3 parts when the original fuses them."""
    t = torch.cat(ours, dim=0) if o.part is not None else ours[0]
    if o.conv:
        t = t[:, :, None, None]
    return t.t() if o.transpose else t


def _prefixes_to_keys(model_keys, prefixes: list[tuple[str, str]]) -> dict[str, Original]:
    """Expands (our module prefix, original module prefix) pairs into a full key table by
    longest-prefix match over the model's keys."""
    prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
    table = {}
    for key in model_keys:
        ours, orig = next(((a, b) for a, b in prefixes if key == a or key.startswith(a + ".")), (key, key))
        table[key] = Original(orig + key[len(ours):])
    return table


RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_table(cfg: UNetConfig) -> dict[str, Original]:
    """Ours -> CompVis openaimodel.py names (after `model.diffusion_model.`)."""
    L, n = cfg.layers_per_block, len(cfg.channels)
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
             ("mid_block.attentions.0", "middle_block.1"),
             ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
    resnets = [("mid_block.resnets.0", "middle_block.0"), ("mid_block.resnets.1", "middle_block.2")]
    for i in range(n):
        for j in range(L):
            resnets.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{1 + i * (L + 1) + j}.0"))
            pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{1 + i * (L + 1) + j}.1"))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (L + 1)}.0.op"))
        level = n - 1 - i  # up_blocks run from the deepest level back up
        for j in range(L + 1):
            resnets.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * (L + 1) + j}.0"))
            pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{i * (L + 1) + j}.1"))
        pairs.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{i * (L + 1) + L}.{2 if cfg.attention[level] else 1}"))
    pairs += [(f"{a}.{x}", f"{b}.{y}") for a, b in resnets for x, y in RESNET]
    keys = meta_model(UNet, cfg).state_dict().keys()
    return _prefixes_to_keys(keys, pairs)


def vae_table(cfg: VAEConfig) -> dict[str, Original]:
    """Ours -> CompVis ldm/modules/diffusionmodules/model.py names (after `first_stage_model.`)."""
    n = len(cfg.channels)
    pairs = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_norm_out", f"{part}.norm_out"),
                  (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1"),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2"),
                  (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1")]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block"),
                  (f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample"),
                  (f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n - 1 - i}.block"),
                  (f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{n - 1 - i}.upsample")]
    keys = meta_model(AutoencoderKL, cfg).state_dict().keys()
    table = _prefixes_to_keys(keys, pairs)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, o in table.items():
        for ours, orig in attn.items():
            if f".attn_1.{ours}." in o.key:
                table[key] = Original(o.key.replace(f".attn_1.{ours}.", f".attn_1.{orig}."),
                                      conv=ours != "group_norm" and key.endswith("weight"))
        if ".conv_shortcut." in o.key:
            table[key] = Original(o.key.replace(".conv_shortcut.", ".nin_shortcut."))
    return table


OPENCLIP = [("embeddings.token_embedding.weight", "token_embedding.weight"),
            ("embeddings.position_embedding.weight", "positional_embedding"),
            ("final_layer_norm", "ln_final"), ("encoder.layers", "transformer.resblocks")]
OPENCLIP_LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                  ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def text_table(cfg: CLIPTextConfig, family: str) -> dict[str, Original]:
    """Ours -> the single file's text encoder names: transformers' CLIP names for SD1 and SDXL's first
    encoder ("sd1", "sdxl_l"), OpenCLIP's for SD2 and SDXL's bigG ("sd2", "sdxl_g"; q, k, v fused
    into one in_proj, and the projection stored transposed)."""
    keys = meta_model(CLIPTextModel, cfg).state_dict().keys()
    if family in ("sd1", "sdxl_l"):
        return {k: Original(k) for k in keys}
    pairs = list(OPENCLIP)
    for i in range(cfg.num_layers):
        pairs += [(f"encoder.layers.{i}.{a}", f"transformer.resblocks.{i}.{b}") for a, b in OPENCLIP_LAYER]
    table = _prefixes_to_keys(keys, pairs)
    for key in keys:
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
        if m:
            table[key] = Original(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", part="qkv".index(m[2]))
    if cfg.projection_dim:
        table["text_projection.weight"] = Original("text_projection", transpose=True)  # [width, projection]
    return table


PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model.",
          "sdxl_l": "conditioner.embedders.0.transformer.text_model.", "sdxl_g": "conditioner.embedders.1.model."}
# The text encoders of each family, by their PREFIX names.
TEXT_ENCODERS = {"sd1": ("sd1",), "sd2": ("sd2",), "sdxl": ("sdxl_l", "sdxl_g")}

# What real single files carry besides the three models. Nothing else is skipped.
IGNORED = re.compile("|".join([
    r"model_ema\..*",  # the EMA copy of the UNet (emaonly files already hold EMA weights)
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar)",  # DDPM buffers
    # arange(77), sometimes float
    r"(cond_stage_model|conditioner\.embedders\.0)\.transformer\.text_model\.embeddings\.position_ids",
    r"cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)",  # OpenCLIP parts SD2 does not use
    r"conditioner\.embedders\.1\.model\.(logit_scale|attn_mask)",  # nor SDXL
]))

FOREIGN = [("conditioner.embedders.0.model.", "the SDXL refiner (not supported)"),
           ("model.diffusion_model.joint_blocks", "an SD3 checkpoint"), ("double_blocks", "a Flux checkpoint"),
           ("model.diffusion_model.double_blocks", "a Flux checkpoint"), ("lora_", "a LoRA, not a full model"),
           ("encoder.down.0.block", "a VAE alone, not a full model"), ("text_model.encoder", "a text encoder alone")]


class Shapes(dict):
    """The shapes of the tensors under `prefix` in a single file, keyed without it. Looking up a
    tensor the file lacks is a CheckpointError naming it."""

    def __init__(self, shapes: dict[str, tuple], prefix: str, where: str):
        super().__init__({k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)})
        self.prefix, self.where = prefix, where

    def __missing__(self, key):
        raise CheckpointError(f"{self.where}: no {self.prefix}{key}; not a complete SD1/SD2/SDXL single file")

    def dim(self, key: str, axis: int) -> int:
        """The size of axis `axis` of tensor `key`; a tensor with fewer axes is a CheckpointError naming it."""
        shape = self[key]
        if len(shape) <= axis:
            raise CheckpointError(f"{self.where}: {self.prefix}{key} has shape {list(shape)}, not the shape of "
                                  "that SD1/SD2/SDXL weight")
        return shape[axis]

    def count(self, blocks: str) -> int:
        """How many blocks `blocks.0.*`, `blocks.1.*`, ... there are. Real files number them from 0 without a
        gap, so the count is bounded by the file's keys: a key whose index is past the count is a
        CheckpointError naming it, not a layout of that many blocks."""
        found = {int(m[1]) for k in self if (m := re.match(rf"{re.escape(blocks)}\.([0-9]+)\.", k))}
        run = next(i for i in range(len(found) + 1) if i not in found)  # blocks 0 .. run - 1 are there
        if run < len(found):
            odd = min(i for i in found if i > run)
            key = next(k for k in self if re.match(rf"{re.escape(blocks)}\.0*{odd}\.", k))
            raise CheckpointError(f"{self.where}: unexpected {self.prefix}{key}: there is no {self.prefix}{blocks}."
                                  f"{run}.* before it (blocks are numbered from 0 without gaps); not an SD1/SD2/SDXL "
                                  "single file")
        return run


def inspect_single_file(shapes: dict[str, tuple], where: str):
    """Reads the architecture off the tensor shapes: (family, UNetConfig, VAEConfig, CLIPTextConfig,
    and SDXL's second CLIPTextConfig or None)."""
    for marker, what in FOREIGN:
        if any(k.startswith(marker) for k in shapes):
            raise CheckpointError(f"{where}: this looks like {what}; only SD1/SD2/SDXL single files are supported")
    if f"{PREFIX['unet']}input_blocks.0.0.weight" not in shapes:
        found = sorted({k.split(".")[0] + ".*" for k in shapes})[:3]
        raise CheckpointError(f"{where}: no UNet ({PREFIX['unet']}*), only {', '.join(found) or 'nothing'}; "
                              "not a full SD1/SD2/SDXL single file")
    sdxl = any(k.startswith(("conditioner.embedders.", f"{PREFIX['unet']}label_emb.")) for k in shapes)
    family = "sdxl" if sdxl else "sd2" if any(k.startswith(PREFIX["sd2"]) for k in shapes) else "sd1"
    for name in TEXT_ENCODERS[family]:
        if not any(k.startswith(PREFIX[name]) for k in shapes):
            expected = f"{PREFIX[name]}*" if sdxl else f"{PREFIX['sd1']}* or {PREFIX['sd2']}*"
            raise CheckpointError(f"{where}: no text encoder ({expected}){' of an SDXL file' if sdxl else ''}")
    if not any(k.startswith(PREFIX["vae"]) for k in shapes):
        raise CheckpointError(f"{where}: no VAE ({PREFIX['vae']}*)")
    texts = [text_config_from_shapes(Shapes(shapes, PREFIX[name], where), name) for name in TEXT_ENCODERS[family]]

    u = Shapes(shapes, PREFIX["unet"], where)
    inputs = u.count("input_blocks")  # conv_in, then each level's res blocks and its downsampler
    downsamplers = [i for i in range(1, inputs) if f"input_blocks.{i}.0.op.weight" in u]
    L = (downsamplers[0] if downsamplers else inputs) - 1  # res blocks per level
    n = inputs // (L + 1)
    first = [1 + i * (L + 1) for i in range(n)]  # first res block of each level
    channels = tuple(u.dim(f"input_blocks.{b}.0.out_layers.3.weight", 0) for b in first)
    attention = tuple(any(k.startswith(f"input_blocks.{b}.1.") for k in u) for b in first)
    depth = tuple(u.count(f"input_blocks.{b}.1.transformer_blocks") or 1 for b in first)
    attn_keys = [k for k in u if k.endswith("attn2.to_k.weight")]
    if not attn_keys:
        raise CheckpointError(f"{where}: no cross-attention ({PREFIX['unet']}*.attn2.to_k.weight); "
                              "not an SD1/SD2/SDXL UNet")
    proj = next((s for k, s in u.items() if k.endswith(("proj_in.weight", "proj_out.weight"))), (0, 0, 1, 1))
    # SD1 uses 8 heads everywhere; SD2 and SDXL use 64 channels per head.
    heads = (8,) * n if family == "sd1" else tuple(max(c // 64, 1) for c in channels)
    added = {}
    if sdxl:  # the pooled output and six size ids, each in the same number of sinusoids
        inputs_added, pooled = u.dim("label_emb.0.0.weight", 1), texts[-1].projection_dim
        added = dict(addition_time_embed_dim=(inputs_added - pooled) // 6,
                     projection_class_embeddings_input_dim=inputs_added)
    unet = UNetConfig(
        in_channels=u.dim("input_blocks.0.0.weight", 1), out_channels=u.dim("out.2.weight", 0), channels=channels,
        layers_per_block=L, attention=attention, num_heads=heads,
        transformer_depth=tuple(d if a else 1 for d, a in zip(depth, attention)),
        context_dim=u.dim(attn_keys[0], 1), linear_proj=len(proj) == 2, sample_size=128 if sdxl else 64, **added,
    )
    checked(unet, where)
    check_text_to_image(unet, where)

    v = Shapes(shapes, PREFIX["vae"], where)
    # with no encoder.down.* at all, the lookups of level 0 below name what is missing
    levels = v.count("encoder.down") or 1
    vae = VAEConfig(
        in_channels=v.dim("encoder.conv_in.weight", 1), out_channels=v.dim("decoder.conv_out.weight", 0),
        latent_channels=v.dim("post_quant_conv.weight", 0),
        channels=tuple(v.dim(f"encoder.down.{i}.block.0.conv1.weight", 0) for i in range(levels)),
        layers_per_block=v.count("encoder.down.0.block"),
        scaling_factor=0.13025 if sdxl else VAEConfig.scaling_factor,
    )
    checked(vae, where)
    return family, unet, vae, texts[0], texts[1] if sdxl else None


def checked(config, where: str):
    """`config`, bounded (checkpoint/configs.py), its CheckpointError naming the file."""
    try:
        return bounded(config)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e} (read off the tensor shapes)") from None


def text_config_from_shapes(t: Shapes, name: str) -> CLIPTextConfig:
    """A text encoder's config from its tensors' shapes; `name` is its PREFIX name."""
    if name in ("sd1", "sdxl_l"):  # transformers' CLIP names
        embedding, layers, mlp, positions = ("embeddings.token_embedding.weight", "encoder.layers",
                                             "encoder.layers.0.mlp.fc1.weight", "embeddings.position_embedding.weight")
    else:  # OpenCLIP's
        embedding, layers, mlp, positions = ("token_embedding.weight", "transformer.resblocks",
                                             "transformer.resblocks.0.mlp.c_fc.weight", "positional_embedding")
    vocab, width, layers_in_file = t.dim(embedding, 0), t.dim(embedding, 1), t.count(layers)
    mlp, positions = t.dim(mlp, 0), t.dim(positions, 0)
    num_layers = layers_in_file
    if name == "sd2":
        # SD2 uses the penultimate layer of OpenCLIP: its last layer is never run. Real files hold all 24
        # layers of ViT-H, a few only the 23 run (diffusers runs 23 either way); at other sizes the file is
        # taken to hold the unused layer too, as export_single_file writes it.
        num_layers = SD2_TEXT.num_layers if width == SD2_TEXT.width else layers_in_file - 1
    # SDXL reads both encoders' penultimate layer, unnormed; bigG's last layer still makes the pooled output.
    sdxl = dict(context_layer=-2, context_norm=False) if name.startswith("sdxl") else {}
    if name == "sdxl_g":
        sdxl["projection_dim"] = t.dim("text_projection", 1)
    config = CLIPTextConfig(vocab_size=vocab, max_positions=positions, width=width, num_layers=num_layers,
                            num_heads=max(width // 64, 1), mlp_dim=mlp,
                            act="quick_gelu" if name in ("sd1", "sdxl_l") else "gelu", **sdxl)
    return checked(config, t.where)
