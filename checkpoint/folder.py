"""diffusers folders: unet/, vae/, text_encoder/, tokenizer/ and scheduler/, as the hub holds them;
SDXL's also text_encoder_2/ and tokenizer_2/.

Our modules use diffusers' and transformers' parameter names, so the tensors load as they are, but for
two older spellings: the text encoder's `text_model.` prefix (hub files have it, transformers 5 writes
none) and the VAE attention's query/key/value/proj_attn.
"""
import re
from pathlib import Path

import torch

from checkpoint.configs import (bounded, check_text_to_image, read_config, text_config_from_transformers,
                                unet_config_from_diffusers, vae_config_from_diffusers)
from checkpoint.pipeline import Pipeline
from checkpoint.tensors import CheckpointError, load_strict, read_json, read_safetensors
from leaves import Leaves
from model.clip import CLIPTextModel
from model.tokenizer import Tokenizer
from model.unet import UNet
from model.vae import AutoencoderKL
from sampler.schedule import SchedulerConfig

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")
SDXL_SUBFOLDERS = SUBFOLDERS + ("text_encoder_2", "tokenizer_2")
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionPipelineSafe", "OnnxStableDiffusionPipeline",
                "StableDiffusionInpaintPipeline")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline")
# SDXL's second text encoder and tokenizer, and its VAE's fp32 decoding: read by every loader, from here.
FAMILIES = Leaves("model family", {"sdxl": "checkpoint.sdxl"})


def load_folder(path: Path, device, dtype, tokenizer=None) -> Pipeline:
    """The pipeline in a diffusers folder; `tokenizer` is another tokenizer folder to use (for SDXL,
    a pipeline folder whose tokenizer/ and tokenizer_2/ are used)."""
    index = check_folder(path)
    unet_cfg = read_config(path / "unet" / "config.json", unet_config_from_diffusers)
    check_text_to_image(unet_cfg, str(path / "unet" / "config.json"))
    sdxl = FAMILIES["sdxl"] if unet_cfg.addition_time_embed_dim else None
    if (sdxl is not None) != ((path / "text_encoder_2").is_dir() or index.get("_class_name") in SDXL_PIPELINES):
        raise CheckpointError(f"{path}: the UNet {'takes' if sdxl else 'takes no'} SDXL's added conditioning but "
                              f"the folder {'has no' if sdxl else 'has a'} second text encoder (text_encoder_2/)")
    vae_cfg = read_config(path / "vae" / "config.json", sdxl.vae_config if sdxl else vae_config_from_diffusers)
    text_cfg = read_config(path / "text_encoder" / "config.json", text_config_from_transformers)

    unet_state = read_component(path / "unet", "diffusion_pytorch_model", device, dtype)
    vae_dtype = dtype if sdxl is None else sdxl.vae_dtype(path / "vae", dtype)
    vae_state = rename_legacy_vae_keys(read_component(path / "vae", "diffusion_pytorch_model", device, vae_dtype))

    sched_file = path / "scheduler" / "scheduler_config.json"
    settings = read_json(sched_file) if sched_file.is_file() else {}
    try:  # StableDiffusionPipeline's rewrite of SD 1.x/2.x hub configs; SDXL's pipeline reads them as written
        sd_rewrite = {} if sdxl else {"steps_offset": 1, "clip_sample": False}
        scheduler = bounded(SchedulerConfig.from_dict({**settings, **sd_rewrite}))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{sched_file}: {e}") from None
    extra = {}
    if sdxl is not None:  # the first encoder as SDXL reads it, its tokenizer's folder, and the second encoder
        text_cfg, tokenizer, extra = sdxl.folder_parts(path, text_cfg, tokenizer, index, device, dtype)
    family = "sdxl" if sdxl is not None else "sd2" if unet_cfg.linear_proj or text_cfg.act == "gelu" else "sd1"
    return Pipeline(
        tokenizer=load_tokenizer(tokenizer or path / "tokenizer", text_cfg),
        text_encoder=load_text_encoder(path / "text_encoder", text_cfg, device, dtype),
        unet=load_strict(UNet, unet_cfg, unet_state, str(path / "unet")),
        vae=load_strict(AutoencoderKL, vae_cfg, vae_state, str(path / "vae")),
        scheduler=scheduler, family=family, name=path.name, **extra,
    )


def load_text_encoder(folder: Path, cfg, device, dtype) -> CLIPTextModel:
    """A transformers CLIPTextModel (or ...WithProjection) folder, with or without the hub files'
    `text_model.` prefix."""
    stored = read_component(folder, "model", device, dtype)
    names = {k.removeprefix("text_model."): k for k in stored if not k.endswith("position_ids")}
    return load_strict(CLIPTextModel, cfg, {k: stored[n] for k, n in names.items()}, str(folder), names=names)


def check_folder(path: Path) -> dict:
    """A diffusers folder of SD1/SD2/SDXL, with every subfolder it needs; else one line saying what it
    is. Returns its model_index.json ({} when it has none)."""
    file = path / "model_index.json"
    index = read_json(file) if file.is_file() else {}
    if not isinstance(index, dict):
        raise CheckpointError(f"{file}: holds no JSON object")
    cls = index.get("_class_name", "")
    if cls and cls not in SD_PIPELINES + SDXL_PIPELINES:
        hint = " (the SDXL refiner is not supported)" if "Img2Img" in str(cls) and "XL" in str(cls) else ""
        raise CheckpointError(f"{file}: its _class_name names {cls}; only StableDiffusionPipeline (SD1/SD2), "
                              f"StableDiffusionXLPipeline and their Inpaint models are supported{hint}")
    sdxl = cls in SDXL_PIPELINES or (path / "text_encoder_2").is_dir()
    needed = SDXL_SUBFOLDERS if sdxl else SUBFOLDERS
    missing = [s for s in needed if not (path / s).is_dir()]
    if len(missing) == len(SUBFOLDERS):
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint folder (expected subfolders "
                              f"{', '.join(s + '/' for s in SUBFOLDERS)}; or pass a .safetensors file)")
    if missing:
        raise CheckpointError(f"{path}: missing subfolder {missing[0]}/ (a diffusers folder{' of SDXL' if sdxl else ''}"
                              f" needs {', '.join(s + '/' for s in needed)})")
    return index


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
            return {k: v for s in shards(index) for k, v in read_safetensors(folder / s, device, dtype).items()}
    pickles = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    why = f" (found only {pickles[0]}: pickled weights are not loaded, convert it to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder}: no {stem}.safetensors{why}")


def shards(index: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` names in its weight_map (tensor name -> file), each once.
    They lie beside it: a name with a folder in it is a CheckpointError, as is an index without a weight_map."""
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map (tensor name -> shard file); not a shard index")
    for file in weight_map.values():
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise CheckpointError(f"{index}: its weight_map names {file!r}, not a file beside it")
    return sorted(set(weight_map.values()))


def rename_legacy_vae_keys(state: dict) -> dict:
    """Hub VAEs saved by older diffusers call the attention layers query/key/value/proj_attn."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    pattern = re.compile("|".join(re.escape(k) for k in legacy))
    return {pattern.sub(lambda m: legacy[m.group(0)], k): v for k, v in state.items()}


def load_tokenizer(folder, encoder=None, pad_token=None, max_length=None) -> Tokenizer:
    """A tokenizer folder (vocab.json + merges.txt, or tokenizer.json), or a diffusers pipeline folder holding one
    as tokenizer/; its own pad token wins over `pad_token`. Its max_length is cut to its text encoder's (`encoder`)."""
    folder = Path(folder)
    if (folder / "tokenizer").is_dir() and not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        folder = folder / "tokenizer"
    try:
        tokenizer = Tokenizer.from_folder(folder, pad_token=pad_token, max_length=max_length)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tokenizer: {e}".replace("\n", " ")) from None
    if encoder is not None:
        tokenizer.max_length = min(bounded(tokenizer, folder, encoder).max_length, encoder.max_positions)
    return tokenizer
