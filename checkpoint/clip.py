"""The two-tower CLIP (text and vision) from transformers' CLIPModel files: the CLIP proposer's model
and the CLIP score's."""
from pathlib import Path

import torch

from checkpoint.configs import clip_config_from_transformers, read_config
from checkpoint.folder import load_tokenizer, read_component
from checkpoint import looks_like_repo_id
from checkpoint.hub import download_files
from checkpoint.tensors import CheckpointError, load_strict, to_dtype
from model.clip_vision import CLIPModel
from model.tokenizer import Tokenizer

# What transformers' CLIPModel.save_pretrained and CLIPTokenizer.save_pretrained write, minus
# pickles: the only files load_clip fetches from the hub.
CLIP_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt",
              "special_tokens_map.json", "tokenizer_config.json"]


def load_clip(source: str = "openai/clip-vit-large-patch14", device="cpu",
              dtype=torch.float32) -> tuple[CLIPModel, Tokenizer]:
    """A CLIP two-tower model and its tokenizer from a hub repo id or a local folder holding
    config.json, model.safetensors, vocab.json and merges.txt. Every failure is a one-line
    CheckpointError."""
    device, dtype = torch.device(device), to_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        raise CheckpointError(f"{source}: a CLIP model is a folder (config.json, model.safetensors, "
                              "vocab.json, merges.txt) or a hub repo id, not a file")
    elif looks_like_repo_id(str(source)):
        folder = download_files(str(source), CLIP_FILES)
    else:
        raise CheckpointError(f"{source}: no such folder, and not a Hugging Face repo id (org/name)")

    config = read_config(folder / "config.json", clip_config_from_transformers,
                         needed=f"a CLIP folder needs {', '.join(CLIP_FILES[:4])}")
    tokenizer = load_tokenizer(folder, max_length=config.text.max_positions)
    if tokenizer.vocab_size > config.text.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the text tower "
                              f"only {config.text.vocab_size}; they come from different models")
    state = read_component(folder, "model", device, dtype)
    # Older transformers saved the position_ids buffers (arange); ours are slices, not buffers.
    state = {k.replace("pre_layrnorm", "pre_layernorm"): v for k, v in state.items()
             if not k.endswith("position_ids")}
    model = load_strict(CLIPModel, config, state, str(folder),
                        hint="expected the weights of a transformers CLIPModel (both towers)")
    return model, tokenizer
