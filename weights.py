"""Loading Stable Diffusion 1.x / 2.x / XL weights from safetensors, strictly, and exporting them.

    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")   # a Hugging Face repo id
    pipe = load_pipeline("path/to/diffusers-folder")                        # unet/, vae/, text_encoder/, ...
    pipe = load_pipeline("v1-5-pruned-emaonly.safetensors")                 # an original single file
    load_lora(pipe, "my-style.safetensors", 0.8)                            # a LoRA, merged into the weights

This is the public front; checkpoint/ holds the parts (its __init__ lists them), the optional ones
leaves (`LEAVES`, leaves.py). Loading is strict: every tensor of the file used and every tensor of the
model filled, each of its shape; a failure is one CheckpointError line naming the file and what to do.

Command line: `python weights.py export SOURCE OUT.safetensors [--dtype fp16]` writes a single file.
"""
import sys
from pathlib import Path

import torch

from checkpoint import looks_like_repo_id
from checkpoint.folder import FAMILIES, load_folder
from checkpoint.pipeline import Pipeline
from checkpoint.tensors import CheckpointError, to_dtype
from leaves import Leaves

LEAVES = Leaves("loader", {"single file": "checkpoint.single_file:load_single_file",
                           "export": "checkpoint.single_file:write_single_file",
                           "export command": "checkpoint.single_file:main",
                           "hub": "checkpoint.hub:download", "packing": "model.packing:pack_pipeline",
                           "lora": "checkpoint.lora:load_lora"})

__all__ = ["CheckpointError", "Pipeline", "export_single_file", "load_lora", "load_pipeline", "pack_for_cpu"]


def load_pipeline(source, device="cpu", dtype=torch.float32, tokenizer=None, prediction_type=None,
                  pack: bool = True) -> Pipeline:
    """Loads a repo id, a diffusers folder or an original single .safetensors file.

    `tokenizer` is a tokenizer folder (vocab.json + merges.txt, or tokenizer.json); single files need
    one, and without it the matching text encoder's tokenizer is downloaded. `prediction_type`
    ("epsilon" or "v") overrides the scheduler's, or what a single file says of it; an SD2 file
    that says nothing is taken as epsilon, with a warning on stderr (checkpoint/prediction.py). `pack` packs the
    convolution weights for the CPU in fp32 (model/packing.py); `pack=False` keeps plain nn.Conv2d weights."""
    device, dtype = torch.device(device), to_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_file():
        pipe = LEAVES["single file"](path, device, dtype, tokenizer, prediction_type)
    elif path.is_dir():
        pipe = load_folder(path, device, dtype, tokenizer)
    elif looks_like_repo_id(str(source)):
        pipe = load_folder(LEAVES["hub"](str(source), dtype), device, dtype, tokenizer)
        pipe.name = str(source)
    else:
        raise CheckpointError(f"{source}: no such file or folder, and not a Hugging Face repo id (org/name)")
    if prediction_type is not None:
        pipe.scheduler.prediction_type = {"v": "v_prediction", "eps": "epsilon"}.get(prediction_type, prediction_type)
    check_widths(pipe, source)
    return pack_for_cpu(pipe) if pack else pipe


def load_lora(pipe: Pipeline, path, scale: float = 1.0):
    """Merges a LoRA file (kohya/A1111 or diffusers/PEFT safetensors) into `pipe`'s weights at
    `scale`, strictly: a key that names no layer of this model is a one-line CheckpointError. Returns
    a handle whose remove() puts the weights back; pipe.loras records it (checkpoint/lora.py)."""
    return LEAVES["lora"](pipe, path, scale)


def check_widths(pipe: Pipeline, source):
    """The text encoders' outputs must be what the UNet takes: their widths side by side its cross-attention width, and
    (SDXL, checkpoint/sdxl.py) the pooled width plus the size ids its added embedding's inputs."""
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    width, unet = sum(e.config.width for e in encoders), pipe.unet.config
    if width != unet.context_dim:
        raise CheckpointError(
            f"{source}: the text encoder's width {' + '.join(str(e.config.width) for e in encoders)} does not match "
            f"the UNet's cross-attention width {unet.context_dim}; the parts come from different models")
    if unet.addition_time_embed_dim:
        FAMILIES["sdxl"].check_added_conditioning(pipe, source)


def pack_for_cpu(pipe: Pipeline) -> Pipeline:
    """Packs the convolution weights of a pipeline in fp32 on the CPU for oneDNN (model/packing.py, a
    leaf: without it, nothing is packed), in place; elsewhere it leaves the pipeline as it is."""
    if pipe.device.type == "cpu" and pipe.dtype == torch.float32 and LEAVES.present("packing"):
        LEAVES["packing"](pipe)
    return pipe


def export_single_file(source, out, dtype=None) -> Path:
    """Writes an original-layout single file (CompVis / Stability key names) that diffusers' and
    other tools' single-file loaders read, from a Pipeline or anything load_pipeline takes."""
    pipe = source if isinstance(source, Pipeline) else load_pipeline(source, dtype=dtype or torch.float32)
    return LEAVES["export"](pipe, Path(out), dtype)


if __name__ == "__main__":  # the export command line, checkpoint/single_file.py's
    sys.exit(LEAVES["export command"](sys.argv[1:], export_single_file))
