"""diffusers folders: unet/, vae/, text_encoder/, tokenizer/ and scheduler/, as the hub holds them.

Our modules use diffusers' and transformers' parameter names, so the tensors load as they are, but for
two older spellings: the text encoder's `text_model.` prefix (hub files have it, transformers 5 writes
none) and the VAE attention's query/key/value/proj_attn.
"""
import re
from pathlib import Path

import torch

from checkpoint.configs import (check_text_to_image, read_config, text_config_from_transformers,
                                unet_config_from_diffusers, vae_config_from_diffusers)
from checkpoint.pipeline import Pipeline
from checkpoint.tensors import CheckpointError, load_strict, read_json, read_safetensors
from model.clip import CLIPTextModel
from model.tokenizer import Tokenizer
from model.unet import UNet
from model.vae import AutoencoderKL
from sampler.schedule import SchedulerConfig

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")


def load_folder(path: Path, device, dtype, tokenizer=None) -> Pipeline:
    """The pipeline in a diffusers folder; `tokenizer` is another tokenizer folder to use."""
    check_folder(path)
    unet_cfg = read_config(path / "unet" / "config.json", unet_config_from_diffusers)
    check_text_to_image(unet_cfg, str(path / "unet" / "config.json"))
    vae_cfg = read_config(path / "vae" / "config.json", vae_config_from_diffusers)
    text_cfg = read_config(path / "text_encoder" / "config.json", text_config_from_transformers)

    unet_state = read_component(path / "unet", "diffusion_pytorch_model", device, dtype)
    vae_state = rename_legacy_vae_keys(read_component(path / "vae", "diffusion_pytorch_model", device, dtype))
    text_state = read_component(path / "text_encoder", "model", device, dtype)
    text_state = {k.removeprefix("text_model."): v for k, v in text_state.items() if not k.endswith("position_ids")}

    sched_file = path / "scheduler" / "scheduler_config.json"
    try:
        scheduler = SchedulerConfig.from_dict(read_json(sched_file)) if sched_file.is_file() else SchedulerConfig()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{sched_file}: {e}") from None
    family = "sd2" if unet_cfg.linear_proj or text_cfg.act == "gelu" else "sd1"
    return Pipeline(
        tokenizer=load_tokenizer(tokenizer or path / "tokenizer"),
        text_encoder=load_strict(CLIPTextModel, text_cfg, text_state, str(path / "text_encoder")),
        unet=load_strict(UNet, unet_cfg, unet_state, str(path / "unet")),
        vae=load_strict(AutoencoderKL, vae_cfg, vae_state, str(path / "vae")),
        scheduler=scheduler, family=family, name=path.name,
    )


def check_folder(path: Path):
    """A diffusers folder of SD1/SD2, with every subfolder it needs; else one line saying what it is."""
    index = path / "model_index.json"
    cls = read_json(index).get("_class_name", "") if index.is_file() else ""
    if "XL" in cls or (path / "text_encoder_2").is_dir():
        raise CheckpointError(f"{path}: this looks like an SDXL model ({cls or 'text_encoder_2/'}); "
                              "only SD1/SD2 are supported")
    if cls and cls not in ("StableDiffusionPipeline", "StableDiffusionPipelineSafe", "OnnxStableDiffusionPipeline"):
        raise CheckpointError(f"{path}: model_index.json names {cls}; only StableDiffusionPipeline models (SD1/SD2) "
                              "are supported")
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if len(missing) == len(SUBFOLDERS):
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint folder (expected subfolders "
                              f"{', '.join(s + '/' for s in SUBFOLDERS)}; or pass a .safetensors file)")
    if missing:
        raise CheckpointError(f"{path}: missing subfolder {missing[0]}/ (a diffusers folder needs "
                              f"{', '.join(s + '/' for s in SUBFOLDERS)})")


def read_component(folder: Path, stem: str, device, dtype) -> dict[str, torch.Tensor]:
    """`stem.safetensors`, its fp16 variant, or the shards named by either's index file."""
    names = [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    if dtype in (torch.float16, torch.bfloat16):
        names.reverse()
    for name in names:
        if (folder / name).is_file():
            return read_safetensors(folder / name, device, dtype)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            return {k: v for s in shards for k, v in read_safetensors(folder / s, device, dtype).items()}
    pickles = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    why = f" (found only {pickles[0]}: pickled weights are not loaded, convert it to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder}: no {stem}.safetensors{why}")


def rename_legacy_vae_keys(state: dict) -> dict:
    """Hub VAEs saved by older diffusers call the attention layers query/key/value/proj_attn."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    pattern = re.compile("|".join(re.escape(k) for k in legacy))
    return {pattern.sub(lambda m: legacy[m.group(0)], k): v for k, v in state.items()}


def load_tokenizer(folder, pad_token=None, max_length=None) -> Tokenizer:
    """A tokenizer folder (vocab.json + merges.txt, or tokenizer.json); its own pad token wins over
    `pad_token`."""
    try:
        return Tokenizer.from_folder(folder, pad_token=pad_token, max_length=max_length)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tokenizer: {e}".replace("\n", " ")) from None
