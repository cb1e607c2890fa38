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

import torch
import torch.nn.functional as F

from model.clip_vision import CLIPModel, preprocess
from model.tokenizer import Tokenizer
from vlm.base import Reply, score_error

DEFAULT_TEMPLATE = "a photo of {}"
TEMPLATES = {"nudity": "a photo of bare {}"}  # the task asks about *bare* body parts
DEFAULT_ANCHOR = "a photo"
DEFAULT_THRESHOLD = 0.5


class CLIPProposer:
    """Proposer that reports the concepts whose caption CLIP prefers to a neutral anchor
    caption (the rule is in the module docstring). The captions are encoded once, here; each
    call encodes only the image. Runs on the model's device and dtype; scores are fp32.

    The prompt and step of a query are not used: CLIP judges the image alone."""

    def __init__(self, model: CLIPModel, tokenizer: Tokenizer, concepts: list[str],
                 threshold: float = DEFAULT_THRESHOLD, template: str | None = None,
                 task: str | None = None, anchor: str = DEFAULT_ANCHOR, top_k: int = 5, name: str | None = None):
        """`template` turns a concept into its caption ("a photo of {}"); without one, the
        task's entry in TEMPLATES or DEFAULT_TEMPLATE. `top_k` scores go into Reply.raw. `name`,
        the repo id or folder the model came from, names it in the trace."""
        template = template or TEMPLATES.get(task, DEFAULT_TEMPLATE)
        if not concepts:
            raise ValueError("CLIPProposer needs at least one concept")
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no {{}} for the concept")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold} is a probability, in [0, 1]")
        self.model, self.concepts, self.threshold = model, list(concepts), float(threshold)
        self.anchor, self.top_k, self.task, self.name = anchor, top_k, task, name
        self.captions = [template.format(c) for c in self.concepts]
        device = model.logit_scale.device
        with torch.no_grad():
            ids = tokenizer([anchor, *self.captions]).to(device)                      # [1 + n, 77]
            self.text_embeds = F.normalize(model.encode_text(ids).float(), dim=-1)   # [1 + n, D]
            self.scale = model.logit_scale.float().exp()

    def __repr__(self):
        name = "" if self.name is None else f"{self.name!r}, "
        return f"CLIPProposer({name}threshold={self.threshold!r}, task={self.task!r})"

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
            if error := score_error(p):
                raise ValueError(error)
        except Exception as e:  # a failed query must never stop the generation
            message = f"CLIP proposer: {type(e).__name__}: {e}".splitlines()[0]
            return Reply(items=[], raw="", error=message, latency=time.perf_counter() - start)
        ranked = sorted(zip(p.tolist(), self.concepts), key=lambda sc: -sc[0])  # stable on ties
        items = [concept for s, concept in ranked if s > self.threshold]
        raw = f"p vs {self.anchor!r}: " + ", ".join(f"{c} {s:.3f}" for s, c in ranked[:self.top_k])
        return Reply(items=items, raw=raw, latency=time.perf_counter() - start)
