"""TAESD weights (model/taesd.py): a hub repo id, a diffusers AutoencoderTiny folder, or madebyollin's
own single files, loaded strictly.

    madebyollin/taesd                 the hub repo: only config.json and the safetensors weights are fetched
    path/to/folder                    config.json + diffusion_pytorch_model.safetensors (AutoencoderTiny)
    path/to/taesd_decoder.safetensors madebyollin's decoder; taesd_encoder.safetensors next to it is loaded too

madebyollin's files hold his bare nn.Sequential, keyed by index ("1.weight", "3.conv.0.weight", ...).
His encoder's indices are ours; his decoder starts with a Clamp module that holds no tensors, so each
of its indices is ours plus one. The tables below are built from our model's keys.
"""
import re
from dataclasses import replace
from pathlib import Path

import torch

from checkpoint import looks_like_repo_id
from checkpoint.bounds import check_taesd
from checkpoint.configs import read_config
from checkpoint.hub import download_files
from checkpoint.tensors import CheckpointError, load_strict, read_safetensors, safetensors_header, to_dtype
from model.taesd import SD, TAESD, TAESDConfig, TAESDDecoder, TAESDEncoder

# madebyollin's TAESDs on the hub by the name --preview-decoder gives them, and the model families
# whose latents each was trained to decode: the networks are the same, the latent spaces are not.
REPOS = {"taesd": "madebyollin/taesd", "taesdxl": "madebyollin/taesdxl"}
DECODES = {"taesd": ("sd1", "sd2"), "taesdxl": ("sdxl",)}
REPO = REPOS["taesd"]
TAESD_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
HUB_FILES = ["config.json", TAESD_WEIGHTS_FILE]


def load_taesd(source, device="cpu", dtype=torch.float32) -> TAESD:
    """TAESD from a hub repo id, an AutoencoderTiny folder, or madebyollin's decoder file (with his
    encoder file when it lies next to it). Anything that does not fit is one CheckpointError line."""
    device, dtype = torch.device(device), to_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_file():
        return load_taesd_file(path, device, dtype)
    if path.is_dir():
        return load_taesd_folder(path, device, dtype)
    if looks_like_repo_id(str(source)):
        return load_taesd_folder(download_files(str(source), HUB_FILES), device, dtype)
    raise CheckpointError(f"{source}: no such file or folder, and not a Hugging Face repo id (org/name)")


def taesd_config_from_diffusers(c: dict) -> TAESDConfig:
    """TAESDConfig from an AutoencoderTiny config.json; missing keys take diffusers' defaults, as
    from_pretrained gives them. Rejects what AutoencoderTiny allows but TAESD does not use."""
    cls = c.get("_class_name", "AutoencoderTiny")
    if cls != "AutoencoderTiny":
        what = " (the full VAE)" if cls == "AutoencoderKL" else ""
        raise CheckpointError(f"holds a {cls}{what}, not TAESD's AutoencoderTiny")
    for key, ok in [("act_fn", "relu"), ("upsample_fn", "nearest"), ("upsampling_scaling_factor", 2),
                    ("shift_factor", 0.0)]:
        if c.get(key, ok) != ok:
            raise CheckpointError(f"{key}={c[key]!r} is not supported (TAESD's is {ok!r})")
    widths = {}
    for part, default in [("encoder", (1, 3, 3, 3)), ("decoder", (3, 3, 3, 1))]:
        blocks = tuple(c.get(f"num_{part}_blocks", default))
        channels = tuple(c.get(f"{part}_block_out_channels", (64,) * len(blocks)))
        if len(channels) != len(blocks) or len(set(channels)) != 1:
            raise CheckpointError(f"{part}_block_out_channels={list(channels)} with num_{part}_blocks="
                                  f"{list(blocks)}: TAESD needs one width per stage, the same for every stage")
        widths[part] = (channels[0], blocks)
    return check_taesd(TAESDConfig(
        in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3),
        latent_channels=c.get("latent_channels", 4),
        encoder_width=widths["encoder"][0], encoder_blocks=widths["encoder"][1],
        decoder_width=widths["decoder"][0], decoder_blocks=widths["decoder"][1],
        scaling_factor=float(c.get("scaling_factor", 1.0)),
    ))


def load_taesd_folder(path: Path, device, dtype) -> TAESD:
    """A diffusers AutoencoderTiny folder: its state dict is ours, key for key."""
    if (path / "model_index.json").is_file():
        raise CheckpointError(f"{path}: a whole pipeline folder, not a TAESD (AutoencoderTiny) folder")
    cfg = read_config(path / "config.json", taesd_config_from_diffusers,
                      f"a TAESD folder holds config.json and {TAESD_WEIGHTS_FILE}")
    if not (path / TAESD_WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path / TAESD_WEIGHTS_FILE}: missing "
                              f"(a TAESD folder holds config.json and {TAESD_WEIGHTS_FILE})")
    state = read_safetensors(path / TAESD_WEIGHTS_FILE, device, dtype)
    return load_strict(TAESD, cfg, state, str(path / TAESD_WEIGHTS_FILE),
                       hint="the weights do not fit config.json, or are not AutoencoderTiny's")


def decoder_table(cfg: TAESDConfig) -> dict[str, str]:
    """Our decoder keys -> madebyollin's: `decoder.layers.N.rest` -> `N+1.rest` (his Clamp is index 0)."""
    with torch.device("meta"):
        keys = TAESDDecoder(cfg).state_dict().keys()
    table = {}
    for key in keys:
        index, rest = key.removeprefix("layers.").split(".", 1)
        table[f"decoder.{key}"] = f"{int(index) + 1}.{rest}"
    return table


def encoder_table(cfg: TAESDConfig) -> dict[str, str]:
    """Our encoder keys -> madebyollin's: `encoder.layers.N.rest` -> `N.rest`."""
    with torch.device("meta"):
        keys = TAESDEncoder(cfg).state_dict().keys()
    return {f"encoder.{key}": key.removeprefix("layers.") for key in keys}


def file_kind(path: Path) -> str:
    """'decoder' or 'encoder' for madebyollin's files, told apart by index 0, which only his
    encoder's first conv fills; else a CheckpointError saying what the file seems to be."""
    keys, _ = safetensors_header(path)
    if keys and all(re.fullmatch(r"\d+\.[\w.]+", k) for k in keys):
        return "encoder" if "0.weight" in keys else "decoder"
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):
        raise CheckpointError(f"{path}: a diffusers AutoencoderTiny weights file; pass the folder that holds it "
                              "and its config.json")
    if any(k.startswith(("first_stage_model.", "encoder.conv_in.", "decoder.conv_in.", "model.diffusion_model."))
           for k in keys):
        raise CheckpointError(f"{path}: a Stable Diffusion checkpoint or its full VAE, not TAESD")
    first = next(iter(keys), None)
    raise CheckpointError(f"{path}: not a TAESD file (madebyollin's files have keys like '1.weight', "
                          f"'3.conv.0.weight'; this one has {repr(first) if first else 'none'})")


def encoder_beside(decoder: Path) -> Path | None:
    """taesd_encoder.safetensors for taesd_decoder.safetensors: the last "decoder" in the name
    becomes "encoder". None if the name has no "decoder"."""
    head, found, tail = decoder.name.rpartition("decoder")
    return decoder.with_name(head + "encoder" + tail) if found else None


def load_taesd_file(path: Path, device, dtype) -> TAESD:
    """madebyollin's taesd_decoder.safetensors, and taesd_encoder.safetensors when it lies next to it
    (a decoder alone is enough for previews). The architecture is TAESD's: his files hold no config."""
    if file_kind(path) == "encoder":
        raise CheckpointError(f"{path}: TAESD's encoder alone; pass its decoder file (the encoder next to it "
                              "is loaded too)")
    sibling = encoder_beside(path)
    has_encoder = sibling is not None and sibling.is_file()
    if has_encoder and file_kind(sibling) != "encoder":
        raise CheckpointError(f"{sibling}: next to the decoder file, but not TAESD's encoder")
    cfg = replace(SD, encoder=has_encoder)
    parts = [(path, decoder_table(cfg))] + ([(sibling, encoder_table(cfg))] if has_encoder else [])
    state, names = {}, {}
    for file, table in parts:
        stored = read_safetensors(file, device, dtype)
        used = set(table.values())
        for ours, theirs in table.items():
            names[ours] = f"{file.name}:{theirs}"
            if theirs in stored:
                state[ours] = stored[theirs]
        state.update({f"{file.name}:{k}": v for k, v in stored.items() if k not in used})
    where = str(path) + (f" (+ {sibling.name})" if has_encoder else "")
    return load_strict(TAESD, cfg, state, where, names=names,
                       hint="madebyollin's single files are read as taesd/taesdxl (4 latent channels, 64 wide)")
