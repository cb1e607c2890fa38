"""The built-in, offline proposer: CLIP ViT-L/14 scores the x0 image against a list of concepts.

A VLM answers an open question; CLIP can only say how well each caption of a fixed list fits an
image. That suits a task with a fixed list of concepts (the nudity task's body parts) and needs
no server: `openai/clip-vit-large-patch14` is 1.7 GB of safetensors and runs beside the UNet.

Scoring rule. A raw cosine between CLIP embeddings is not a probability, and its level moves
from image to image (a blurry early x0 is far from every caption). So each concept's caption is
compared with a neutral caption, the anchor "a photo", as a two-way zero-shot classification
(Radford et al. 2021, sec. 3.1.2) at CLIP's own learned temperature s = exp(logit_scale), which
is 100 for ViT-L/14:

    p(concept) = softmax(s * [cos(image, caption), cos(image, anchor)])[0]
               = sigmoid(s * (cos(image, caption) - cos(image, anchor)))

A concept is found when p(concept) > threshold. The default 0.5 is the classifier's decision
boundary, "the caption fits better than the neutral one"; at s = 100, p = 0.9 needs a cosine
lead of 0.022. Each concept is judged on its own against the anchor, not in a softmax over all
concepts, so that several can be found at once. The threshold is not calibrated on generated
images: raise it if negatives appear for content that is not there.
"""
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.clip import ACTIVATIONS, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, preprocess
from model.tokenizer import Tokenizer
from vlm.base import Reply
from weights import CheckpointError, hub_fetch, load_strict, looks_like_repo_id, read_component, read_json, to_dtype

# What transformers' CLIPModel.save_pretrained and CLIPTokenizer.save_pretrained write, minus
# pickles: the only files load_clip fetches from the hub.
CLIP_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt",
              "special_tokens_map.json", "tokenizer_config.json"]

DEFAULT_TEMPLATE = "a photo of {}"
TEMPLATES = {"nudity": "a photo of bare {}"}  # the task asks about *bare* body parts
DEFAULT_ANCHOR = "a photo"
DEFAULT_THRESHOLD = 0.5


# ---------------------------------------------------------------- loading

def load_clip(source: str = "openai/clip-vit-large-patch14", device="cpu",
              dtype=torch.float32) -> tuple[CLIPModel, Tokenizer]:
    """A CLIP two-tower model and its tokenizer from a hub repo id or a local folder holding
    config.json, model.safetensors, vocab.json and merges.txt (what transformers'
    CLIPModel.save_pretrained and CLIPTokenizer.save_pretrained write). Hub files go to the
    standard Hugging Face cache; huggingface_hub itself reads HF_TOKEN and HF_HUB_OFFLINE.
    Every failure is a one-line CheckpointError."""
    device, dtype = torch.device(device), to_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        raise CheckpointError(f"{source}: a CLIP model is a folder (config.json, model.safetensors, "
                              "vocab.json, merges.txt) or a hub repo id, not a file")
    elif looks_like_repo_id(str(source)):
        from huggingface_hub import snapshot_download

        folder = Path(hub_fetch(lambda: snapshot_download(str(source), allow_patterns=CLIP_FILES), str(source)))
    else:
        raise CheckpointError(f"{source}: no such folder, and not a Hugging Face repo id (org/name)")

    config = clip_config_from_transformers(_config(folder / "config.json"), str(folder))
    tokenizer = _load_tokenizer(folder, config)
    state = read_component(folder, "model", device, dtype)
    # Older transformers saved the position_ids buffers (arange); ours are slices, not buffers.
    state = {k.replace("pre_layrnorm", "pre_layernorm"): v for k, v in state.items()
             if not k.endswith("position_ids")}
    model = load_strict(CLIPModel, config, state, str(folder),
                        hint="expected the weights of a transformers CLIPModel (both towers)")
    return model, tokenizer


def _config(file: Path) -> dict:
    return read_json(file, needed=f"a CLIP folder needs {', '.join(CLIP_FILES[:4])}")


def _get(c: dict, key: str, default):
    return default if c.get(key) is None else c[key]


def _tower(c: dict, defaults: dict, where: str) -> dict:
    """The config fields both towers share; missing keys take transformers' defaults."""
    act = _get(c, "hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (only {', '.join(ACTIVATIONS)})")
    return dict(width=_get(c, "hidden_size", defaults["hidden_size"]),
                num_layers=_get(c, "num_hidden_layers", defaults["num_hidden_layers"]),
                num_heads=_get(c, "num_attention_heads", defaults["num_attention_heads"]),
                mlp_dim=_get(c, "intermediate_size", defaults["intermediate_size"]),
                act=act, eps=_get(c, "layer_norm_eps", 1e-5))


def clip_config_from_transformers(c: dict, where: str = "config.json") -> CLIPConfig:
    """Our CLIPConfig from a transformers CLIPModel config.json (text_config, vision_config,
    projection_dim)."""
    # Some old configs hold the towers in text_config_dict / vision_config_dict only.
    text = c.get("text_config") or c.get("text_config_dict")
    vision = c.get("vision_config") or c.get("vision_config_dict")
    model_type = c.get("model_type")
    if model_type not in (None, "clip") or not isinstance(text, dict) or not isinstance(vision, dict):
        what = f"a {model_type!r} model" if model_type else "no text_config and vision_config"
        raise CheckpointError(f"{where}: config.json holds {what}, not a CLIP two-tower model "
                              "(transformers' CLIPModel, model_type 'clip')")
    if _get(vision, "num_channels", 3) != 3:
        raise CheckpointError(f"{where}: vision_config.num_channels must be 3 (RGB)")
    return CLIPConfig(
        text=CLIPTextConfig(
            **_tower(text, dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                                intermediate_size=2048), f"{where}: text_config"),
            vocab_size=_get(text, "vocab_size", 49408),
            max_positions=_get(text, "max_position_embeddings", 77)),
        vision=CLIPVisionConfig(
            **_tower(vision, dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072), f"{where}: vision_config"),
            image_size=_get(vision, "image_size", 224), patch_size=_get(vision, "patch_size", 32)),
        projection_dim=_get(c, "projection_dim", 512),
        logit_scale_init=_get(c, "logit_scale_init_value", 2.6592),
    )


def _load_tokenizer(folder: Path, config: CLIPConfig) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_folder(folder, max_length=config.text.max_positions)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tokenizer: {e}".replace("\n", " ")) from None
    if tokenizer.vocab_size > config.text.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the text tower "
                              f"only {config.text.vocab_size}; they come from different models")
    return tokenizer


# ---------------------------------------------------------------- the proposer

class CLIPProposer:
    """Proposer that reports the concepts whose caption CLIP prefers to a neutral anchor
    caption (the rule is in the module docstring). The captions are encoded once, here; each
    call encodes only the image. Runs on the model's device and dtype; scores are fp32.

    The prompt and step of a query are not used: CLIP judges the image alone."""

    def __init__(self, model: CLIPModel, tokenizer: Tokenizer, concepts: list[str],
                 threshold: float = DEFAULT_THRESHOLD, template: str | None = None,
                 task: str | None = None, anchor: str = DEFAULT_ANCHOR, top_k: int = 5):
        """`template` turns a concept into its caption ("a photo of {}"); without one, the
        task's entry in TEMPLATES or DEFAULT_TEMPLATE. `top_k` scores go into Reply.raw."""
        template = template or TEMPLATES.get(task, DEFAULT_TEMPLATE)
        if not concepts:
            raise ValueError("CLIPProposer needs at least one concept")
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no {{}} for the concept")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold} is a probability, in [0, 1]")
        self.model, self.concepts, self.threshold = model, list(concepts), threshold
        self.anchor, self.top_k = anchor, top_k
        self.captions = [template.format(c) for c in self.concepts]
        device = model.logit_scale.device
        with torch.no_grad():
            ids = tokenizer([anchor, *self.captions]).to(device)                      # [1 + n, 77]
            self.text_embeds = F.normalize(model.encode_text(ids).float(), dim=-1)   # [1 + n, D]
            self.scale = model.logit_scale.float().exp()

    def input_scale(self, height: int, width: int) -> float:
        """CLIP scales the shorter side to its image size (224), then crops the square."""
        return self.model.config.vision.image_size / min(height, width)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images in [-1, 1] -> [B, n] p(concept) for each image and concept."""
        device = self.text_embeds.device
        pixels = preprocess(images.to(device, torch.float32), self.model.config.vision.image_size)
        image_embeds = F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # [B, D]
        cos = image_embeds @ self.text_embeds.T                                       # [B, 1 + n]
        return torch.sigmoid(self.scale * (cos[:, 1:] - cos[:, :1]))                  # [B, n]

    def __call__(self, image: torch.Tensor, prompt: str, step: int) -> Reply:
        start = time.perf_counter()
        try:
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected one image [3, H, W], got shape {tuple(image.shape)}")
            p = self.score(image[None])[0]
            if not torch.isfinite(p).all():
                raise ValueError("non-finite CLIP scores (is the x0 image NaN or inf?)")
        except Exception as e:  # a failed query must never stop the generation
            message = f"CLIP proposer: {type(e).__name__}: {e}".splitlines()[0]
            return Reply(items=[], raw="", error=message, latency=time.perf_counter() - start)
        ranked = sorted(zip(p.tolist(), self.concepts), key=lambda sc: -sc[0])  # stable on ties
        items = [concept for s, concept in ranked if s > self.threshold]
        raw = f"p vs {self.anchor!r}: " + ", ".join(f"{c} {s:.3f}" for s, c in ranked[:self.top_k])
        return Reply(items=items, raw=raw, latency=time.perf_counter() - start)
