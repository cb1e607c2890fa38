"""The two-tower CLIP (text and vision) from transformers' CLIPModel files, config and weights: the CLIP
proposer's model and the CLIP score's."""
from pathlib import Path

import torch

from checkpoint import looks_like_repo_id
from checkpoint.bounds import MOST, check_vision, whole
from checkpoint.configs import TEXT_DEFAULTS, read_config, text_config_from_transformers, tower_fields, value_or_default
from checkpoint.folder import load_tokenizer, read_component
from checkpoint.hub import download_files
from checkpoint.tensors import CheckpointError, load_strict, to_dtype
from model.clip_vision import CLIPConfig, CLIPModel, CLIPVisionConfig
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
    tokenizer = load_tokenizer(folder, config.text, max_length=config.text.max_positions)
    state = read_component(folder, "model", device, dtype)
    # Older transformers saved the position_ids buffers (arange); ours are slices, not buffers.
    state = {k.replace("pre_layrnorm", "pre_layernorm"): v for k, v in state.items()
             if not k.endswith("position_ids")}
    model = load_strict(CLIPModel, config, state, str(folder),
                        hint="expected the weights of a transformers CLIPModel (both towers)")
    return model, tokenizer


# Inside a two-tower CLIPModel config, transformers writes only what differs from its defaults.
TEXT_TOWER_DEFAULTS = dict(TEXT_DEFAULTS, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                           intermediate_size=2048)
VISION_TOWER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5, image_size=224, patch_size=32, num_channels=3)


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
    if value_or_default(vision, "num_channels", VISION_TOWER_DEFAULTS) != 3:
        raise CheckpointError("vision_config.num_channels must be 3 (RGB)")
    get = lambda key: value_or_default(vision, key, VISION_TOWER_DEFAULTS)
    return CLIPConfig(
        text=text_config_from_transformers(text, TEXT_TOWER_DEFAULTS, "text_config: "),
        vision=check_vision(CLIPVisionConfig(**tower_fields(vision, VISION_TOWER_DEFAULTS, "vision_config: "),
                                             image_size=get("image_size"), patch_size=get("patch_size")),
                            "vision_config: "),
        projection_dim=whole("projection_dim", value_or_default(c, "projection_dim", {"projection_dim": 512}), 1,
                             MOST["width"]),
        logit_scale_init=value_or_default(c, "logit_scale_init_value", {"logit_scale_init_value": 2.6592}),
    )
