"""Reading and writing Stable Diffusion checkpoints; `weights.py` is the public front.

    tensors.py      safetensors in, strict loading into models built on the meta device, the error type
    configs.py      diffusers' and transformers' config.json files -> our model configs
    folder.py       diffusers folders (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    sdxl.py         what SDXL's add: a second text encoder and tokenizer, the VAE decoding in fp32
    original.py     original single files: the original-name tables, and the architecture read off shapes
    single_file.py  loading and writing original single files with those tables
    prediction.py   what a single file says about its prediction type (ε or v), which its shapes cannot
    hub.py          Hugging Face hub downloads, every failure one line
    clip.py         the two-tower CLIP that the CLIP proposer and the CLIP score use
    pipeline.py     the Pipeline: what a loaded model is
    bounds.py, lora.py, taesd.py  the sizes a config may ask for (a guard), LoRA files, TAESD weights
"""
import re


def looks_like_repo_id(source: str) -> bool:
    """Whether `source` names a Hugging Face repo ("org/name") rather than a path."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None and not source.startswith((".", "/"))
