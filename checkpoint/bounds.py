"""The sizes a model config may ask for: every config, read from a file or off a single file's shapes,
decides what is built before any weight is read, so a broken or hostile one is refused here in one
line instead of building a model that exhausts memory. Real models are far inside these bounds.

A guard (checkpoint/configs.py:bounded): a fork that loads only files it trusts may delete this file.
"""
import dataclasses
import math
from pathlib import Path

import torch

from checkpoint.tensors import CheckpointError
from model.clip import CLIPTextConfig
from model.tokenizer import Tokenizer
from model.unet import UNetConfig
from model.vae import VAEConfig
from sampler.schedule import SchedulerConfig, make_betas


# The most a config may ask for. SD1/SD2/SDXL are far inside: UNets of 3 or 4 levels of at most 1280
# channels, 2 res blocks a level and at most 70 transformer blocks in all (SDXL: 10 deep at its last two
# levels), 2048-wide text states; VAEs of 4 levels of at most 512; text encoders of at most 32 layers 1280
# wide (OpenCLIP bigG) and 77 positions; CLIP vision towers of at most 48 layers (ViT-bigG); schedules
# of 1000 training timesteps.
MOST = dict(image_channels=64, levels=8, channels=8192, layers_per_block=8, transformer_depth=32,
            transformer_blocks=256, width=16384, layers=128, mlp=65536, vocab=1_000_000, positions=4096,
            sample_size=512, image_size=4096, taesd_blocks=16, train_timesteps=100_000)
# float16's largest value: a VAE scaling factor outside (1/F16_MAX, F16_MAX) makes latents of unit size overflow
# half precision when divided by it (to decode) or multiplied by it (to encode). SD's are 0.18215 and 0.13025.
F16_MAX = 65504.0


def whole(name: str, value, least: int, most: int) -> int:
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
    return tuple(whole(f"{name}[{i}]", v, least, most) for i, v in enumerate(values))


def _positive(name: str, value, least: float = 0, most: float = math.inf) -> float:
    """`value` if it is a finite number in (least, most), by default above 0, else a CheckpointError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not least < value < most:
        which = f"in ({least:.3g}, {most:g})" if (least, most) != (0, math.inf) else "positive and finite"
        raise CheckpointError(f"{name}={value!r} is not a number {which}")
    return value


def _flag(name: str, value):
    """`value` if it is true, false or null (diffusers' unset: false here), else a CheckpointError naming it:
    a string such as "false" would be true."""
    if value is not None and not isinstance(value, bool):
        raise CheckpointError(f"{name}={value!r} is not true or false")
    return value


def _divides(name: str, divisor: int, of: str, value: int):
    """A CheckpointError unless `divisor` (heads, norm groups) divides `value` (a width)."""
    if value % divisor:
        raise CheckpointError(f"{name}={divisor} does not divide {of}={value}")


def check_unet(c: UNetConfig) -> UNetConfig:
    """`c`, if its sizes are within MOST and fit together; else a CheckpointError naming the value by its
    diffusers config key."""
    n = whole("len(block_out_channels)", len(c.channels), 1, MOST["levels"])
    channels = _per_level("block_out_channels", c.channels, n, 1, MOST["channels"])
    heads = _per_level("attention_head_dim", c.num_heads, n, 1, MOST["channels"])
    depth = _per_level("transformer_layers_per_block", c.transformer_depth, n, 1, MOST["transformer_depth"])
    if len(c.attention) != n:
        raise CheckpointError(f"down_block_types must hold one block type for each of the {n} levels")
    for key in ("in_channels", "out_channels"):
        whole(key, getattr(c, key), 1, MOST["image_channels"])
    layers = whole("layers_per_block", c.layers_per_block, 1, MOST["layers_per_block"])
    whole("cross_attention_dim", c.context_dim, 1, MOST["width"])
    groups = whole("norm_num_groups", c.norm_groups, 1, MOST["channels"])
    whole("sample_size", c.sample_size, 1, MOST["sample_size"])
    whole("addition_time_embed_dim", c.addition_time_embed_dim, 0, MOST["width"])
    whole("projection_class_embeddings_input_dim", c.projection_class_embeddings_input_dim, 0, MOST["mlp"])
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
    n = whole("len(block_out_channels)", len(c.channels), 1, MOST["levels"])
    channels = _per_level("block_out_channels", c.channels, n, 1, MOST["channels"])
    for key in ("in_channels", "out_channels", "latent_channels"):
        whole(key, getattr(c, key), 1, MOST["image_channels"])
    whole("layers_per_block", c.layers_per_block, 1, MOST["layers_per_block"])
    groups = whole("norm_num_groups", c.norm_groups, 1, MOST["channels"])
    for level, width in enumerate(channels):
        _divides("norm_num_groups", groups, f"block_out_channels[{level}]", width)
    _positive("norm_eps", c.norm_eps)
    _positive("scaling_factor", c.scaling_factor, 1 / F16_MAX, F16_MAX)
    return c


def _check_tower(c, where: str):
    """What text and vision towers share, by transformers' config keys."""
    width = whole(f"{where}hidden_size", c.width, 1, MOST["width"])
    whole(f"{where}num_hidden_layers", c.num_layers, 1, MOST["layers"])
    _divides(f"{where}num_attention_heads", whole(f"{where}num_attention_heads", c.num_heads, 1, width),
             "hidden_size", width)
    whole(f"{where}intermediate_size", c.mlp_dim, 1, MOST["mlp"])
    _positive(f"{where}layer_norm_eps", c.eps)


def check_text(c: CLIPTextConfig, where: str = "") -> CLIPTextConfig:
    """`c`, if its sizes are within MOST; else a CheckpointError naming the value by its transformers key."""
    _check_tower(c, where)
    whole(f"{where}vocab_size", c.vocab_size, 1, MOST["vocab"])
    whole(f"{where}max_position_embeddings", c.max_positions, 1, MOST["positions"])
    whole(f"{where}projection_dim", c.projection_dim, 0, MOST["width"])
    if c.eos_id is not None:
        whole(f"{where}eos_token_id", c.eos_id, 0, MOST["vocab"])
    return c


def check_vision(c, where: str = ""):
    """`c`, a CLIPVisionConfig, if its sizes are within MOST and its patches fit its images; else a CheckpointError."""
    _check_tower(c, where)
    size = whole(f"{where}image_size", c.image_size, 1, MOST["image_size"])
    if whole(f"{where}patch_size", c.patch_size, 1, MOST["image_size"]) > size:
        raise CheckpointError(f"{where}patch_size={c.patch_size} is larger than image_size={size}")
    return c


def check_scheduler(c: SchedulerConfig) -> SchedulerConfig:
    """`c`, if its schedule is within MOST (the samplers build tables of num_train_timesteps values), its
    settings of the types the samplers compute with, and its ᾱ_t above 0 in float32 at every t: at ᾱ_t = 0
    (β ≥ 1, or a product of 1 − β that underflows) x0 = (x − √(1−ᾱ)·ε)/√ᾱ divides by zero: NaN images."""
    steps = whole("num_train_timesteps", c.num_train_timesteps, 1, MOST["train_timesteps"])
    whole("steps_offset", c.steps_offset, 0, steps - 1)
    for key in ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr"):
        _flag(key, getattr(c, key))
    if c.clip_sample:
        _positive("clip_sample_range", c.clip_sample_range)
    _positive("beta_start", c.beta_start, 0, 1)
    _positive("beta_end", c.beta_end, 0, 1)
    trained = torch.cumprod(1 - make_betas(dataclasses.replace(c, rescale_betas_zero_snr=False)), 0)  # ᾱ_t [T]
    if not trained[-1] > 0:
        raise CheckpointError(f"beta_start={c.beta_start} and beta_end={c.beta_end} ({c.beta_schedule}, {steps} "
                              f"timesteps) make ᾱ_t reach 0 in float32 by t={int((trained > 0).sum())}; sampling "
                              "would divide by it")
    return c


def check_tokenizer(tokenizer: Tokenizer, folder, encoder: CLIPTextConfig) -> Tokenizer:
    """`tokenizer`, read from `folder`, if what it makes fits its text encoder's config `encoder`: ids below
    vocab_size (an embedding row each), and prompts of at least max_position_embeddings ids. A shorter
    model_max_length cuts prompt and negative short (at 2, to nothing), which diffusers does in silence."""
    if tokenizer.max_length < encoder.max_positions:
        raise CheckpointError(f"{Path(folder) / 'tokenizer_config.json'}: model_max_length={tokenizer.max_length} is "
                              f"shorter than the text encoder's max_position_embeddings={encoder.max_positions}; "
                              "prompts and negative prompts would be cut to fewer tokens than it reads")
    token, top = max(tokenizer.vocab.items(), key=lambda item: item[1])
    if top >= encoder.vocab_size:
        file = Path(folder) / ("tokenizer.json" if (Path(folder) / "tokenizer.json").is_file() else "vocab.json")
        raise CheckpointError(f"{file}: the token {token!r} has id {top}, past the text encoder's vocab_size="
                              f"{encoder.vocab_size}; the tokenizer is another model's")
    return tokenizer


def check_taesd(c):
    """`c`, a TAESDConfig, if its sizes are within MOST; else a CheckpointError naming the value by its
    diffusers key."""
    for key in ("in_channels", "out_channels", "latent_channels"):
        whole(key, getattr(c, key), 1, MOST["image_channels"])
    for part in ("encoder", "decoder"):
        whole(f"{part}_block_out_channels", getattr(c, f"{part}_width"), 1, MOST["channels"])
        blocks = getattr(c, f"{part}_blocks")
        whole(f"len(num_{part}_blocks)", len(blocks), 1, MOST["levels"])
        _per_level(f"num_{part}_blocks", blocks, len(blocks), 0, MOST["taesd_blocks"])
    _positive("scaling_factor", c.scaling_factor, 1 / F16_MAX, F16_MAX)
    return c


def check(config, where="", *against):
    """`config` (a UNet's, VAE's, text encoder's or scheduler's, or a tokenizer read from the folder `where`
    for the text encoder of config `against`), if it is within the bounds; else a CheckpointError naming
    the value."""
    if isinstance(config, UNetConfig):
        return check_unet(config)
    if isinstance(config, VAEConfig):
        return check_vae(config)
    if isinstance(config, CLIPTextConfig):
        return check_text(config, where)
    if isinstance(config, SchedulerConfig):
        return check_scheduler(config)
    if isinstance(config, Tokenizer):
        return check_tokenizer(config, where, *against)
    raise TypeError(f"no bounds for a {type(config).__name__}")
