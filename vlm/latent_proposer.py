"""A proposer that reads the sampler's x0 latents: a small network distilled from a VLM's (or CLIP's)
own answers, so that VL-DNP's queries need no decode and no server.

The paper (Chang, Kim, Choi 2025, arXiv 2510.26052) names lightweight VLMs or distillation as the way
to cut its runtime. Here the student is a multi-label classifier over the task's concepts (vlm/tasks.py),
fed x0, the clean latents the sampler predicts at a query step, and that step's timestep t (early x0 are
blurred and large; the network has to know how early it is looking):

    p(concept | x0, t) = sigmoid(head([mean(h), max(h)])),  h = convolutions of x0, FiLM-modulated by t

A concept is found when p exceeds its threshold, chosen on the training prompts for agreement with the
teacher. distill.py collects the teacher's answers (distillation/collect.py) and trains it
(distillation/train.py); what it found goes through the task's mapping and the three-branch guidance
exactly as a VLM's answer does.

The file is safetensors: the network's tensors, and a card, JSON in the header's metadata under
CARD_KEY, which says what the network reads and how well it agreed with its teacher: the task and its
concepts, the model family and latent space it was trained on (a proposer made for SD 1.x latents reads
noise in SDXL's), its width, the teacher, the data counts, and per concept the threshold with the
held-out AUC and agreement. It loads strictly: no pickle, every tensor and card field as written here,
every tensor finite and the std above 0 (else every score would be NaN).
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save

from checkpoint.tensors import CheckpointError, load_strict, read_safetensors, safetensors_header
from files import printable, sha256_file, write_atomic
from model.unet import TimestepEmbedding, timestep_embedding
from vlm.base import Latents, Reply, score_error

CARD_KEY = "vl-dnp latent proposer"
FORMAT = 1  # the card's layout; a file of another format is refused


@dataclass(frozen=True)
class NetworkConfig:
    channels: int  # the model family's latent channels, 4 in SD 1.x, 2.x and SDXL
    concepts: int  # outputs, one per concept of the task
    width: int = 32  # channels of the first convolution; the others have twice as many
    frequencies: int = 32  # sinusoidal features of t


class LatentNetwork(nn.Module):
    """(x0 [B, C, h, w], t [B]) -> one logit per concept [B, n]. Three 3×3 convolutions, the last two
    halving the size; t, as the UNet embeds it, scales and shifts the features between the second and
    the third (FiLM); the mean and the max over positions (a concept anywhere in the image counts) go
    to a linear head. `mean` and `std` standardize each latent channel, as measured on the training
    data. Any latent size fits."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config, w = config, config.width
        self.register_buffer("mean", torch.zeros(config.channels))
        self.register_buffer("std", torch.ones(config.channels))
        self.conv_in = nn.Conv2d(config.channels, w, 3, padding=1)
        self.down_1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.time = TimestepEmbedding(config.frequencies, 4 * w)
        self.down_2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * w, config.concepts)

    def forward(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = (x0 - self.mean[:, None, None]) / self.std[:, None, None]  # [B, C, h, w]
        h = F.silu(self.conv_in(h))  # [B, w, h, w]
        h = F.silu(self.down_1(h))  # [B, 2w, h/2, w/2]
        scale, shift = self.time(timestep_embedding(t, self.config.frequencies)).chunk(2, dim=1)  # [B, 2w] each
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = F.silu(self.down_2(h))  # [B, 2w, h/4, w/4]
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))  # [B, n]


def latent_space(pipe) -> dict:
    """What a latent proposer must have been trained on to read this pipeline's x0: the model family
    (its UNet's x0 distribution), and the VAE's latent channels and scaling factor (its latent space)."""
    return {"family": pipe.family, "latent_channels": pipe.vae.config.latent_channels,
            "scaling_factor": pipe.vae.config.scaling_factor}


def save_latent_proposer(network: LatentNetwork, card: dict, path) -> Path:
    """Writes the network's tensors and `card` (made JSON under CARD_KEY) to `path`, atomically."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in network.state_dict().items()}
    data = save(state, metadata={"format": "pt", CARD_KEY: json.dumps({"format": FORMAT, **card}, allow_nan=False)})
    return write_atomic(path, data)


def read_card(path) -> dict:
    """The card of a latent proposer file; a CheckpointError (one line) for a file that has none or a
    card that is not this format's."""
    text = safetensors_header(Path(path))[1].get(CARD_KEY)
    if text is None:
        raise CheckpointError(f"{path}: not a latent proposer (no {CARD_KEY!r} card in its metadata); make one "
                              "with distill.py train")
    try:
        card = json.loads(text)
        problem = _card_problem(card)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:  # RecursionError: nested too deep
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem:
        raise CheckpointError(f"{path}: its latent proposer card is {problem}")
    return card


def _card_problem(card: dict) -> str | None:
    if card.get("format") != FORMAT:
        return f"format {card.get('format')!r}, and this version reads format {FORMAT}"
    concepts, model, network = card["concepts"], card["model"], card["network"]
    names = [c["name"] for c in concepts]
    texts = all(isinstance(n, str) and n and printable(n) == n for n in names)  # a name may be a negative, in the PNG
    if not names or not texts or len(set(names)) != len(names):
        return "without a list of distinct concept names in printable text"
    thresholds = [c["threshold"] for c in concepts]
    if not all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in thresholds):
        return "holding a threshold outside [0, 1]"
    if not isinstance(card["task"], str) or not isinstance(model["family"], str):
        return "without its task or model family"
    sizes = [model["latent_channels"], network["width"], network["frequencies"]]
    if not all(isinstance(n, int) and 0 < n <= 4096 for n in sizes) or network["frequencies"] % 2:
        return "holding a latent channel count or network width that is no positive integer"
    if not isinstance(model["scaling_factor"], (int, float)) or not math.isfinite(model["scaling_factor"]):
        return "without the latent space's scaling factor"
    return None


def tensor_problem(network: LatentNetwork) -> str | None:
    """Why the network would score NaN whatever it is shown (NaN or inf in a tensor, a std not above 0), or None."""
    for name, tensor in network.state_dict().items():
        if not torch.isfinite(tensor).all():
            return f"its tensor {name!r} holds NaN or inf"
    if not (network.std > 0).all():
        return "its tensor 'std' holds a value at or below 0, which no standard deviation is"
    return None


def network_config(card: dict) -> NetworkConfig:
    return NetworkConfig(card["model"]["latent_channels"], len(card["concepts"]), card["network"]["width"],
                         card["network"]["frequencies"])


class LatentProposer:
    """Proposer (vlm/base.py) that scores one image's x0 latents with a distilled LatentNetwork and
    reports the concepts above their thresholds; its Reply.raw holds every concept's score, as JSON,
    for the trace. Scores that are not finite are a failed query (vlm/base.py:score_error). Runs in fp32
    on `device`, whatever the model's dtype. The prompt is not used."""
    wants = "latents"

    def __init__(self, network: LatentNetwork, card: dict, name: str = "?", sha256: str = ""):
        self.network, self.card, self.name, self.sha256 = network, card, name, sha256
        self.concepts = [c["name"] for c in card["concepts"]]
        device = network.mean.device
        self.thresholds = torch.tensor([float(c["threshold"]) for c in card["concepts"]], device=device)  # [n]

    @classmethod
    def load(cls, path, device="cpu") -> "LatentProposer":
        """Reads a file save_latent_proposer wrote; a CheckpointError (one line) for anything else."""
        path = Path(path)
        card = read_card(path)
        state = read_safetensors(path, device, torch.float32)
        network = load_strict(LatentNetwork, network_config(card), state, str(path),
                              "the file's tensors do not match its card")
        if problem := tensor_problem(network):
            raise CheckpointError(f"{path}: {problem}; make it again with distill.py train")
        return cls(network, card, path.name, sha256_file(path))

    def __repr__(self):
        return f"LatentProposer({self.name!r}, sha256={self.sha256!r}, task={self.card['task']!r})"

    @property
    def task(self) -> str:
        return self.card["task"]

    @property
    def origin(self) -> str:
        """The file it came from, for the PNG text."""
        return f"{self.name} sha256 {self.sha256}"

    def mismatch(self, pipe) -> str | None:
        """Why it cannot read this pipeline's x0 latents, in one line; None if it can."""
        made, here = {k: self.card["model"][k] for k in latent_space(pipe)}, latent_space(pipe)
        if made == here:
            return None
        say = lambda s: f"{s['family']} latents ({s['latent_channels']} channels, scaling factor {s['scaling_factor']:g})"
        return (f"--latent-proposer {self.name}: made for {say(made)}, and {pipe.name} makes {say(here)}; "
                "distil one for this model with distill.py")

    @torch.no_grad()
    def score(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 [B, C, h, w] and t [B] -> p(concept) [B, n]."""
        device = self.thresholds.device
        return torch.sigmoid(self.network(x0.to(device, torch.float32), t.to(device, torch.float32)))

    def __call__(self, latents: Latents, prompt: str, step: int) -> Reply:
        start = time.perf_counter()
        p = self.score(latents.x0[None], torch.tensor([float(latents.t)]))[0]  # [n]
        if error := score_error(p):  # a failed query, as CLIP's: never "nothing found"
            return Reply([], "", f"latent proposer {self.name}: {error}", time.perf_counter() - start)
        items = [c for c, found in zip(self.concepts, (p > self.thresholds).tolist()) if found]
        raw = json.dumps({c: round(s, 4) for c, s in zip(self.concepts, p.tolist())})
        return Reply(items, raw, latency=time.perf_counter() - start)
