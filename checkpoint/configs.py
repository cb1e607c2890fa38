"""diffusers' and transformers' config.json files, read into our model configs.

Each parser rejects what the model code does not implement, so an unsupported checkpoint fails here
with its config named, not later with a tensor shape. `read_config` turns every failure into one
CheckpointError line that names the file; every config is `bounded` before anything is built from it.
"""
from pathlib import Path

from checkpoint.tensors import CheckpointError, read_json
from leaves import Leaves
from model.clip import ACTIVATIONS, CLIPTextConfig
from model.unet import UNetConfig
from model.vae import VAEConfig

GUARDS = Leaves("guard", {"bounds": "checkpoint.bounds:check"})


def read_config(file: Path, parse, needed: str = ""):
    """parse(the config in `file`). A config of another kind, or one that lacks a key the model
    needs or has a value of the wrong type, is a one-line CheckpointError naming the file."""
    c = read_json(file, needed)
    try:
        if not isinstance(c, dict):
            raise CheckpointError("holds no JSON object")
        return parse(c)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{file}: no {e.args[0]!r}, which the model needs (a config of another model?)") from None
    except (TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{file}: a value of the wrong type ({e})") from None


def bounded(config, where="", *against):
    """`config`, held to the sizes real models are far inside (a tokenizer: to the text encoder's config
    `against`), checkpoint/bounds.py; as it is in a fork that deleted that guard, trusting its files."""
    return GUARDS["bounds"](config, where, *against) if GUARDS.present("bounds") else config


def unet_config_from_diffusers(c: dict) -> UNetConfig:
    """UNetConfig from a diffusers unet/config.json. Rejects what SD1/SD2/SDXL do not use."""
    if c.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"holds a {c['_class_name']}, not the UNet2DConditionModel of SD1/SD2/SDXL")
    added = c.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise CheckpointError(f"addition_embed_type={added!r} is not supported; only SDXL's 'text_time' is")
    if added and not (c.get("addition_time_embed_dim") and c.get("projection_class_embeddings_input_dim")):
        raise CheckpointError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim (SDXL: 256 and 2816)")
    for key, ok in [("class_embed_type", None), ("encoder_hid_dim_type", None), ("timestep_post_act", None),
                    ("time_cond_proj_dim", None), ("dual_cross_attention", False), ("only_cross_attention", False),
                    ("resnet_time_scale_shift", "default"), ("act_fn", "silu"), ("time_embedding_type", "positional"),
                    ("flip_sin_to_cos", True), ("freq_shift", 0), ("center_input_sample", False),
                    ("conv_in_kernel", 3), ("conv_out_kernel", 3), ("attention_type", "default"),
                    ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("resnet_out_scale_factor", 1.0),
                    ("mid_block_scale_factor", 1), ("time_embedding_act_fn", None), ("downsample_padding", 1)]:
        if c.get(key, ok) != ok:
            raise CheckpointError(f"{key}={c[key]!r} is not supported; only SD1/SD2/SDXL UNets are")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    attention = []
    for d, u in zip(down, reversed(up)):
        if (d, u) not in [("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"), ("DownBlock2D", "UpBlock2D")]:
            raise CheckpointError(f"block types {d}/{u} are not supported (SD1/SD2/SDXL use "
                                  "CrossAttnDownBlock2D/CrossAttnUpBlock2D and DownBlock2D/UpBlock2D)")
        attention.append(d == "CrossAttnDownBlock2D")
    n = len(down)
    per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
    # diffusers' "attention_head_dim" holds the number of heads when num_attention_heads is unset.
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    layers = set(per_level(c.get("layers_per_block", 2)))  # one count for every level
    if len(layers) != 1:
        raise CheckpointError("a different layers_per_block per level is not supported")
    depth = per_level(c.get("transformer_layers_per_block", 1))
    if any(isinstance(d, (list, tuple)) for d in depth):
        raise CheckpointError("per-block transformer depths are not supported")
    return bounded(UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
        channels=tuple(c["block_out_channels"]), layers_per_block=layers.pop(), attention=tuple(attention),
        num_heads=per_level(heads), transformer_depth=depth, context_dim=c["cross_attention_dim"],
        linear_proj=c.get("use_linear_projection", False), norm_groups=c.get("norm_num_groups", 32),
        norm_eps=c.get("norm_eps", 1e-5), upcast_attention=c.get("upcast_attention") or False,
        sample_size=c.get("sample_size") or 64, addition_time_embed_dim=c["addition_time_embed_dim"] if added else 0,
        projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"] if added else 0,
    ))


def check_text_to_image(unet: UNetConfig, where: str):
    """A UNet takes the latents, or (inpainting, sampler/edit.py) the latents, the mask and the masked
    image's latents; instruct-pix2pix and depth UNets take other inputs besides."""
    if unet.in_channels not in (unet.out_channels, 2 * unet.out_channels + 1):
        raise CheckpointError(f"{where}: the UNet takes {unet.in_channels} input channels, not {unet.out_channels} "
                              f"or {2 * unet.out_channels + 1} (8: instruct-pix2pix, 5: depth); only text-to-image "
                              "and inpainting SD1/SD2/SDXL models are supported")


def vae_config_from_diffusers(c: dict) -> VAEConfig:
    if c.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"holds a {c['_class_name']}, not the AutoencoderKL of SD1/SD2")
    if any(t != "DownEncoderBlock2D" for t in c.get("down_block_types", [])):
        raise CheckpointError("only the SD1/SD2 KL autoencoder is supported")
    for key, ok in [("use_quant_conv", True), ("use_post_quant_conv", True), ("mid_block_add_attention", True),
                    ("act_fn", "silu")]:  # SD3/Flux VAEs drop parts; another act_fn computes another function
        if c.get(key, ok) != ok:
            raise CheckpointError(f"{key}={c[key]!r} is not supported; SD's VAE has {key}={ok!r}")
    return bounded(VAEConfig(
        in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3),
        latent_channels=c.get("latent_channels", 4), channels=tuple(c["block_out_channels"]),
        layers_per_block=c.get("layers_per_block", 2), norm_groups=c.get("norm_num_groups", 32),
        scaling_factor=c.get("scaling_factor", 0.18215)))


# transformers' defaults for the keys a CLIP text config may leave out. An SD text_encoder/config.json
# holds every size (transformers writes them all at the top level), so there a missing size is an error.
TEXT_DEFAULTS = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def value_or_default(c: dict, key: str, defaults: dict):
    """c[key], or its default; a key with no default is required (KeyError)."""
    if c.get(key) is None:
        return defaults[key] if key in defaults else c[key]
    return c[key]


def tower_fields(c: dict, defaults: dict, where: str = "") -> dict:
    """The fields both CLIP towers share."""
    get = lambda key: value_or_default(c, key, defaults)
    if get("hidden_act") not in ACTIVATIONS:
        raise CheckpointError(f"{where}hidden_act {get('hidden_act')!r} is not supported; only {'/'.join(ACTIVATIONS)}")
    return dict(width=get("hidden_size"), num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                mlp_dim=get("intermediate_size"), act=get("hidden_act"), eps=get("layer_norm_eps"))


def text_config_from_transformers(c: dict, defaults: dict = TEXT_DEFAULTS, where: str = "") -> CLIPTextConfig:
    """CLIPTextConfig from a transformers CLIPTextModel config (SD's text_encoder/config.json), or
    from the text_config of a two-tower CLIPModel config."""
    c = c.get("text_config", c)
    if c.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise CheckpointError(f"model_type {c['model_type']!r} is not a CLIP text model (SD1/SD2 use CLIPTextModel)")
    get = lambda key: value_or_default(c, key, defaults)
    eos = c.get("eos_token_id", 49407)  # transformers' default; 2 is its legacy "pool at the largest id"
    return bounded(CLIPTextConfig(**tower_fields(c, defaults, where), vocab_size=get("vocab_size"),
                                  max_positions=get("max_position_embeddings"),
                                  eos_id=None if eos == 2 else eos), where)
