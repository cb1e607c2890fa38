"""What SDXL's checkpoints add to SD's (Podell et al. 2023, sec. 2.1): a second text encoder, OpenCLIP
ViT-bigG with a projection of its pooled output, and its own tokenizer; both encoders read at their
penultimate layer; and a VAE that decodes in fp32 beside an fp16 UNet. SDXL's UNet, VAE, first text
encoder and Pipeline are SD's classes with other config values. A leaf (checkpoint/folder.py:FAMILIES):
without it, SD 1.x/2.x alone load."""
import dataclasses
import math
from pathlib import Path

import torch

from checkpoint.configs import (bounded, read_config, text_config_from_transformers, vae_config_from_diffusers,
                                value_or_default)
from checkpoint.folder import load_text_encoder, load_tokenizer
from checkpoint.tensors import CheckpointError, read_json
from model.clip import CLIPTextConfig
from model.vae import VAEConfig


def text_config_with_projection(c: dict) -> CLIPTextConfig:
    """CLIPTextConfig from a transformers CLIPTextModelWithProjection config (SDXL's text_encoder_2/config.json):
    the text tower and its projection of the pooled output (transformers' default width 512 when unset)."""
    projection = value_or_default(c, "projection_dim", {"projection_dim": 512})
    return bounded(dataclasses.replace(text_config_from_transformers(c), projection_dim=projection))


def penultimate(cfg: CLIPTextConfig) -> CLIPTextConfig:
    """SDXL reads both encoders at their penultimate layer, without the final LayerNorm (the hub configs
    are plain transformers configs and do not say so)."""
    return dataclasses.replace(cfg, context_layer=-2, context_norm=False)


def folder_parts(path: Path, text_cfg: CLIPTextConfig, tokenizer, index: dict, device, dtype):
    """Of a diffusers SDXL folder: (the first text encoder's config as SDXL reads it, the first tokenizer's
    folder, the Pipeline's SDXL fields)."""
    text_cfg_2 = read_config(path / "text_encoder_2" / "config.json", text_config_with_projection)
    tokenizer, tokenizer_2 = tokenizers(tokenizer or path)
    return penultimate(text_cfg), tokenizer, dict(
        tokenizer_2=load_tokenizer(tokenizer_2, text_cfg_2),
        text_encoder_2=load_text_encoder(path / "text_encoder_2", penultimate(text_cfg_2), device, dtype),
        force_zeros_for_empty_prompt=switch(index, "force_zeros_for_empty_prompt", path / "model_index.json"))


def switch(config: dict, key: str, file: Path) -> bool:
    """config[key], true when unset as in diffusers' SDXL; a CheckpointError naming `file` unless it is true
    or false (a string "false" would be true, and diffusers reads 0 as false)."""
    value = config.get(key, True)
    if not isinstance(value, bool):
        raise CheckpointError(f"{file}: {key}={value!r} is not true or false")
    return value


def tokenizers(folder) -> tuple[Path, Path]:
    """SDXL's two tokenizer folders: tokenizer/ and tokenizer_2/ of a diffusers SDXL folder."""
    folder = Path(folder)
    if not (folder / "tokenizer_2").is_dir():
        raise CheckpointError(f"tokenizer: {folder} has no tokenizer_2/; SDXL needs two tokenizers, pass a diffusers "
                              "SDXL folder holding tokenizer/ and tokenizer_2/")
    return folder / "tokenizer", folder / "tokenizer_2"


def vae_config(c: dict) -> VAEConfig:
    """VAEConfig from an SDXL folder's vae/config.json, with the latents_mean and latents_std per channel that
    StableDiffusionXLPipeline takes out of the latents where the config gives both (SD's pipeline ignores them)."""
    cfg, moments = vae_config_from_diffusers(c), [c.get("latents_mean"), c.get("latents_std")]
    if None in moments:
        return cfg
    if not all(isinstance(m, list) and len(m) == cfg.latent_channels and all(
            type(v) in (int, float) and math.isfinite(v) for v in m) for m in moments) or min(moments[1]) <= 0:
        raise CheckpointError(f"latents_mean and latents_std must be {cfg.latent_channels} finite numbers each, "
                              "the std above 0")
    return dataclasses.replace(cfg, latents_mean=tuple(moments[0]), latents_std=tuple(moments[1]))


def vae_dtype(folder: Path, dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in fp16: diffusers decodes it in fp32 unless its config says it is safe
    (force_upcast false, as in madebyollin/sdxl-vae-fp16-fix)."""
    upcast = switch(read_json(folder / "config.json"), "force_upcast", folder / "config.json")
    return torch.float32 if upcast and dtype == torch.float16 else dtype


def check_added_conditioning(pipe, source):
    """The UNet's added embedding must take bigG's pooled width plus the 6 size ids."""
    unet, encoder = pipe.unet.config, (pipe.text_encoder_2 or pipe.text_encoder).config
    pooled = encoder.projection_dim or encoder.width
    if (unet.projection_class_embeddings_input_dim - pooled) / unet.addition_time_embed_dim != 6:
        raise CheckpointError(
            f"{source}: the UNet's added embedding takes {unet.projection_class_embeddings_input_dim} inputs, not "
            f"the pooled text width {pooled} + 6 size ids x {unet.addition_time_embed_dim}; the parts come from "
            "different models")
