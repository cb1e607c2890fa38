"""diffusers' and transformers' config.json files, read into our model configs.

Each parser rejects what the model code does not implement, so an unsupported checkpoint fails here
with its config named, not later with a tensor shape. `read_config` turns every failure into one
CheckpointError line that names the file.

A config decides what is built before any weight is read, so the `check_*` functions hold every config,
read from a file or off a single file's shapes, to sizes that real models are far inside: a broken or
hostile one is refused in one line instead of building a model that exhausts memory.
"""
import dataclasses
from pathlib import Path

from checkpoint.tensors import CheckpointError, read_json
from model.clip import ACTIVATIONS, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from model.taesd import TAESDConfig
from model.unet import UNetConfig
from model.vae import VAEConfig
from sampler.schedule import SchedulerConfig


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


# The most a config may ask for. SD1/SD2/SDXL are far inside: UNets of 3 or 4 levels of at most 1280
# channels, 2 res blocks a level and at most 70 transformer blocks in all (SDXL: 10 deep at its last two
# levels), 2048-wide text states; VAEs of 4 levels of at most 512; text encoders of at most 32 layers 1280
# wide (OpenCLIP bigG) and 77 positions; CLIP vision towers of at most 48 layers (ViT-bigG); schedules
# of 1000 training timesteps.
MOST = dict(image_channels=64, levels=8, channels=8192, layers_per_block=8, transformer_depth=32,
            transformer_blocks=256, width=16384, layers=128, mlp=65536, vocab=1_000_000, positions=4096,
            sample_size=512, image_size=4096, taesd_blocks=16, train_timesteps=100_000)


def _whole(name: str, value, least: int, most: int) -> int:
    """`value` if it is a whole number in least..most, else a CheckpointError naming it by `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{name}={value!r} is not a whole number")
    if not least <= value <= most:
        raise CheckpointError(f"{name}={value} is outside {least}..{most}, beyond any SD1/SD2/SDXL model")
    return value


def _per_level(name: str, values, levels: int, least: int, most: int) -> tuple:
    """One whole number in least..most for each of `levels` levels."""
    if not isinstance(values, (list, tuple)) or len(values) != levels:
        raise CheckpointError(f"{name} must hold one value for each of the {levels} levels")
    return tuple(_whole(f"{name}[{i}]", v, least, most) for i, v in enumerate(values))


def _positive(name: str, value) -> float:
    """`value` if it is a number above 0, else a CheckpointError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CheckpointError(f"{name}={value!r} is not a positive number")
    return value


def _divides(name: str, divisor: int, of: str, value: int):
    """A CheckpointError unless `divisor` (heads, norm groups) divides `value` (a width)."""
    if value % divisor:
        raise CheckpointError(f"{name}={divisor} does not divide {of}={value}")


def check_unet(c: UNetConfig) -> UNetConfig:
    """`c`, if its sizes are within MOST and fit together; else a CheckpointError naming the value by its
    diffusers config key."""
    n = _whole("len(block_out_channels)", len(c.channels), 1, MOST["levels"])
    channels = _per_level("block_out_channels", c.channels, n, 1, MOST["channels"])
    heads = _per_level("attention_head_dim", c.num_heads, n, 1, MOST["channels"])
    depth = _per_level("transformer_layers_per_block", c.transformer_depth, n, 1, MOST["transformer_depth"])
    if len(c.attention) != n:
        raise CheckpointError(f"down_block_types must hold one block type for each of the {n} levels")
    for key in ("in_channels", "out_channels"):
        _whole(key, getattr(c, key), 1, MOST["image_channels"])
    layers = _whole("layers_per_block", c.layers_per_block, 1, MOST["layers_per_block"])
    _whole("cross_attention_dim", c.context_dim, 1, MOST["width"])
    groups = _whole("norm_num_groups", c.norm_groups, 1, MOST["channels"])
    _whole("sample_size", c.sample_size, 1, MOST["sample_size"])
    _whole("addition_time_embed_dim", c.addition_time_embed_dim, 0, MOST["width"])
    _whole("projection_class_embeddings_input_dim", c.projection_class_embeddings_input_dim, 0, MOST["mlp"])
    _positive("norm_eps", c.norm_eps)
    for level, width in enumerate(channels):
        _divides("norm_num_groups", groups, f"block_out_channels[{level}]", width)
        if c.attention[level] or level == n - 1:  # the middle block attends at the last level's width
            _divides(f"attention_head_dim[{level}]", heads[level], f"block_out_channels[{level}]", width)
    # down: L per attention level, up: L + 1, and the middle block's at the last level's depth
    blocks = sum(d for d, a in zip(depth, c.attention) if a) * (2 * layers + 1) + depth[-1]
    if blocks > MOST["transformer_blocks"]:
        raise CheckpointError(f"transformer_layers_per_block={list(depth)} with layers_per_block={layers} makes "
                              f"{blocks} transformer blocks, more than {MOST['transformer_blocks']}")
    return c


def check_vae(c: VAEConfig) -> VAEConfig:
    """`c`, if its sizes are within MOST and fit together; else a CheckpointError naming the value."""
    n = _whole("len(block_out_channels)", len(c.channels), 1, MOST["levels"])
    channels = _per_level("block_out_channels", c.channels, n, 1, MOST["channels"])
    for key in ("in_channels", "out_channels", "latent_channels"):
        _whole(key, getattr(c, key), 1, MOST["image_channels"])
    _whole("layers_per_block", c.layers_per_block, 1, MOST["layers_per_block"])
    groups = _whole("norm_num_groups", c.norm_groups, 1, MOST["channels"])
    for level, width in enumerate(channels):
        _divides("norm_num_groups", groups, f"block_out_channels[{level}]", width)
    _positive("norm_eps", c.norm_eps)
    _positive("scaling_factor", c.scaling_factor)
    return c


def _check_tower(c, where: str):
    """What text and vision towers share, by transformers' config keys."""
    width = _whole(f"{where}hidden_size", c.width, 1, MOST["width"])
    _whole(f"{where}num_hidden_layers", c.num_layers, 1, MOST["layers"])
    _divides(f"{where}num_attention_heads", _whole(f"{where}num_attention_heads", c.num_heads, 1, width),
             "hidden_size", width)
    _whole(f"{where}intermediate_size", c.mlp_dim, 1, MOST["mlp"])
    _positive(f"{where}layer_norm_eps", c.eps)


def check_text(c: CLIPTextConfig, where: str = "") -> CLIPTextConfig:
    """`c`, if its sizes are within MOST; else a CheckpointError naming the value by its transformers key."""
    _check_tower(c, where)
    _whole(f"{where}vocab_size", c.vocab_size, 1, MOST["vocab"])
    _whole(f"{where}max_position_embeddings", c.max_positions, 1, MOST["positions"])
    _whole(f"{where}projection_dim", c.projection_dim, 0, MOST["width"])
    return c


def check_vision(c: CLIPVisionConfig, where: str = "") -> CLIPVisionConfig:
    """`c`, if its sizes are within MOST and its patches fit its images; else a CheckpointError."""
    _check_tower(c, where)
    size = _whole(f"{where}image_size", c.image_size, 1, MOST["image_size"])
    if _whole(f"{where}patch_size", c.patch_size, 1, MOST["image_size"]) > size:
        raise CheckpointError(f"{where}patch_size={c.patch_size} is larger than image_size={size}")
    return c


def check_scheduler(c: SchedulerConfig) -> SchedulerConfig:
    """`c`, if its schedule is within MOST (the samplers build tables of num_train_timesteps values)."""
    _whole("num_train_timesteps", c.num_train_timesteps, 1, MOST["train_timesteps"])
    _positive("beta_start", c.beta_start)
    _positive("beta_end", c.beta_end)
    return c


def check_taesd(c: TAESDConfig) -> TAESDConfig:
    """`c`, if its sizes are within MOST; else a CheckpointError naming the value by its diffusers key."""
    for key in ("in_channels", "out_channels", "latent_channels"):
        _whole(key, getattr(c, key), 1, MOST["image_channels"])
    for part in ("encoder", "decoder"):
        _whole(f"{part}_block_out_channels", getattr(c, f"{part}_width"), 1, MOST["channels"])
        blocks = getattr(c, f"{part}_blocks")
        _whole(f"len(num_{part}_blocks)", len(blocks), 1, MOST["levels"])
        _per_level(f"num_{part}_blocks", blocks, len(blocks), 0, MOST["taesd_blocks"])
    _positive("scaling_factor", c.scaling_factor)
    return c


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
    for key, ok in [("class_embed_type", None), ("encoder_hid_dim_type", None),
                    ("time_cond_proj_dim", None), ("dual_cross_attention", False), ("only_cross_attention", False),
                    ("resnet_time_scale_shift", "default"), ("act_fn", "silu"), ("time_embedding_type", "positional"),
                    ("flip_sin_to_cos", True), ("freq_shift", 0), ("center_input_sample", False),
                    ("conv_in_kernel", 3), ("conv_out_kernel", 3), ("attention_type", "default"),
                    ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("resnet_out_scale_factor", 1.0),
                    ("mid_block_scale_factor", 1)]:
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
    layers = c.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise CheckpointError("a different layers_per_block per level is not supported")
        layers = layers[0]
    depth = per_level(c.get("transformer_layers_per_block", 1))
    if any(isinstance(d, (list, tuple)) for d in depth):
        raise CheckpointError("per-block transformer depths are not supported")
    return check_unet(UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
        channels=tuple(c["block_out_channels"]), layers_per_block=layers, attention=tuple(attention),
        num_heads=per_level(heads), transformer_depth=depth, context_dim=c["cross_attention_dim"],
        linear_proj=c.get("use_linear_projection", False), norm_groups=c.get("norm_num_groups", 32),
        norm_eps=c.get("norm_eps", 1e-5), upcast_attention=c.get("upcast_attention") or False,
        sample_size=c.get("sample_size") or 64,
        addition_time_embed_dim=c["addition_time_embed_dim"] if added else 0,
        projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"] if added else 0,
    ))


def check_text_to_image(unet: UNetConfig, where: str):
    """Inpainting, instruct-pix2pix and depth UNets take more input channels than the latents."""
    if unet.in_channels != unet.out_channels:
        raise CheckpointError(f"{where}: the UNet takes {unet.in_channels} input channels, not {unet.out_channels} "
                              "(9: inpainting, 8: instruct-pix2pix, 5: depth); only text-to-image SD1/SD2 models "
                              "are supported")


def vae_config_from_diffusers(c: dict) -> VAEConfig:
    if c.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"holds a {c['_class_name']}, not the AutoencoderKL of SD1/SD2")
    if any(t != "DownEncoderBlock2D" for t in c.get("down_block_types", [])) or c.get("use_quant_conv") is False:
        raise CheckpointError("only the SD1/SD2 KL autoencoder is supported")
    return check_vae(VAEConfig(
        in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3),
        latent_channels=c.get("latent_channels", 4), channels=tuple(c["block_out_channels"]),
        layers_per_block=c.get("layers_per_block", 2), norm_groups=c.get("norm_num_groups", 32),
        scaling_factor=c.get("scaling_factor", 0.18215),
    ))


# transformers' defaults for the keys a CLIP config may leave out. An SD text_encoder/config.json
# holds every size (transformers writes them all at the top level), so there a missing size is an
# error; inside a two-tower CLIPModel config, transformers writes only what differs from these.
TEXT_DEFAULTS = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT_TOWER_DEFAULTS = dict(TEXT_DEFAULTS, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                           intermediate_size=2048)
VISION_TOWER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5, image_size=224, patch_size=32, num_channels=3)


def _value(c: dict, key: str, defaults: dict):
    """c[key], or its default; a key with no default is required (KeyError)."""
    if c.get(key) is None:
        return defaults[key] if key in defaults else c[key]
    return c[key]


def _tower(c: dict, defaults: dict, where: str = "") -> dict:
    """The fields both CLIP towers share."""
    get = lambda key: _value(c, key, defaults)
    if get("hidden_act") not in ACTIVATIONS:
        raise CheckpointError(f"{where}hidden_act {get('hidden_act')!r} is not supported (only {', '.join(ACTIVATIONS)})")
    return dict(width=get("hidden_size"), num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                mlp_dim=get("intermediate_size"), act=get("hidden_act"), eps=get("layer_norm_eps"))


def text_config_from_transformers(c: dict, defaults: dict = TEXT_DEFAULTS, where: str = "") -> CLIPTextConfig:
    """CLIPTextConfig from a transformers CLIPTextModel config (SD's text_encoder/config.json), or
    from the text_config of a two-tower CLIPModel config."""
    c = c.get("text_config", c)
    if c.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise CheckpointError(f"model_type {c['model_type']!r} is not a CLIP text model (SD1/SD2 use CLIPTextModel)")
    return check_text(CLIPTextConfig(**_tower(c, defaults, where), vocab_size=_value(c, "vocab_size", defaults),
                                     max_positions=_value(c, "max_position_embeddings", defaults)), where)


def text_config_with_projection(c: dict) -> CLIPTextConfig:
    """CLIPTextConfig from a transformers CLIPTextModelWithProjection config (SDXL's text_encoder_2/config.json):
    the text tower and its projection of the pooled output (transformers' default width 512 when unset)."""
    projection = _value(c, "projection_dim", {"projection_dim": 512})
    return check_text(dataclasses.replace(text_config_from_transformers(c), projection_dim=projection))


def clip_config_from_transformers(c: dict) -> CLIPConfig:
    """Our CLIPConfig from a transformers CLIPModel config.json (text_config, vision_config,
    projection_dim)."""
    # Some old configs hold the towers in text_config_dict / vision_config_dict only.
    text = c.get("text_config") or c.get("text_config_dict")
    vision = c.get("vision_config") or c.get("vision_config_dict")
    model_type = c.get("model_type")
    if model_type not in (None, "clip") or not isinstance(text, dict) or not isinstance(vision, dict):
        what = f"a {model_type!r} model" if model_type else "no text_config and vision_config"
        raise CheckpointError(f"config.json holds {what}, not a CLIP two-tower model "
                              "(transformers' CLIPModel, model_type 'clip')")
    if _value(vision, "num_channels", VISION_TOWER_DEFAULTS) != 3:
        raise CheckpointError("vision_config.num_channels must be 3 (RGB)")
    get = lambda key: _value(vision, key, VISION_TOWER_DEFAULTS)
    return CLIPConfig(
        text=text_config_from_transformers(text, TEXT_TOWER_DEFAULTS, "text_config: "),
        vision=check_vision(CLIPVisionConfig(**_tower(vision, VISION_TOWER_DEFAULTS, "vision_config: "),
                                             image_size=get("image_size"), patch_size=get("patch_size")),
                            "vision_config: "),
        projection_dim=_whole("projection_dim", _value(c, "projection_dim", {"projection_dim": 512}), 1,
                              MOST["width"]),
        logit_scale_init=_value(c, "logit_scale_init_value", {"logit_scale_init_value": 2.6592}),
    )
