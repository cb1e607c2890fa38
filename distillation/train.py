"""distill.py train: fits a latent proposer (vlm/latent_proposer.py) to a data folder's verdicts.

The prompts, not the images, are split into training and held-out sets: the images of one prompt
look alike, so a split by image would score the network on near-copies of what it learned from.
Each concept is a binary label (multi-label, binary cross-entropy, AdamW; each batch shows half its
examples mirrored left to right, as an image and its mirror hold the same things); its threshold is the one that
agrees best with the teacher on the training prompts, and the card reports, on the held-out prompts
alone, each concept's AUC (the chance that a random image the teacher said holds it scores above one
it said does not; 0.5 is chance) and agreement with the teacher at that threshold.
"""
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from distillation.data import SETTINGS_FILE, DataError, Examples, check_training_data, read_examples, read_settings
from evaluation.run_folder import skipped_warning
from files import printable
from vlm.latent_proposer import LatentNetwork, NetworkConfig, save_latent_proposer, tensor_problem


@dataclass(frozen=True)
class Training:
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    width: int = 32
    held_out: float = 0.2  # the fraction of prompts held out
    seed: int = 0


def split_by_prompt(prompts: list[str], fraction: float, seed: int) -> torch.Tensor:
    """A bool per example, True where its prompt is held out: round(fraction × prompts) distinct
    prompts (at least one, and at least one left to train on), drawn with `seed`."""
    distinct = sorted(set(prompts))
    if len(distinct) < 2:
        raise DataError(f"the data hold {len(distinct)} distinct prompt; a held-out split by prompt needs at least 2")
    random.Random(seed).shuffle(distinct)
    held = set(distinct[:min(len(distinct) - 1, max(1, round(fraction * len(distinct))))])
    return torch.tensor([p in held for p in prompts])


def fit(examples: Examples, train: torch.Tensor, settings: Training, device="cpu") -> LatentNetwork:
    """Trains a LatentNetwork on the examples where `train` is True."""
    torch.manual_seed(settings.seed)
    x0, t, labels = examples.x0[train], examples.t[train], examples.labels[train]
    network = LatentNetwork(NetworkConfig(x0.shape[1], labels.shape[1], settings.width)).to(device)
    as_float = x0.float()
    network.mean.copy_(as_float.mean((0, 2, 3)))
    network.std.copy_(as_float.std((0, 2, 3)).clamp_min(1e-6))
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(t), generator=generator).split(settings.batch_size):
            x = x0[batch].to(device, torch.float32)  # [b, C, h, w]
            mirrored = (torch.rand(len(batch), generator=generator) < 0.5).to(device)
            x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)  # what an image holds, its mirror holds
            logits = network(x, t[batch].to(device, torch.float32))  # [b, n]
            loss = F.binary_cross_entropy_with_logits(logits, labels[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return network.requires_grad_(False).eval()


@torch.no_grad()
def scores(network: LatentNetwork, examples: Examples, rows: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """p(concept) [N, n] for the examples where `rows` is True."""
    device = network.mean.device
    x0, t = examples.x0[rows], examples.t[rows]
    return torch.cat([torch.sigmoid(network(x0[i:i + batch_size].to(device, torch.float32),
                                            t[i:i + batch_size].to(device, torch.float32))).cpu()
                      for i in range(0, len(t), batch_size)])


def best_threshold(p: torch.Tensor, y: torch.Tensor) -> float:
    """The threshold θ in [0, 1] at which `p > θ` agrees most often with the labels `y`: the midpoint
    of two neighbouring distinct scores, 0 (everything found) or 1 (nothing found). Ties go to the
    lower threshold, which finds more."""
    order = torch.argsort(p)
    p, y = p[order].double(), y[order].double()
    zero = y.new_zeros(1)
    # calling the k lowest scores negative and the rest positive, for k = 0 ... N
    agree = torch.cat([zero, torch.cumsum(1 - y, 0)]) + y.sum() - torch.cat([zero, torch.cumsum(y, 0)])  # [N + 1]
    edge = torch.tensor([True])
    agree[~torch.cat([edge, p[1:] > p[:-1], edge])] = -1  # no threshold falls between equal scores
    k = int(torch.argmax(agree))  # the first best: the lowest threshold
    return 0.0 if k == 0 else 1.0 if k == len(p) else float((p[k - 1] + p[k]) / 2)


def auc(p: torch.Tensor, y: torch.Tensor) -> float | None:
    """The area under the ROC curve, by the Mann-Whitney U statistic with tied scores counted half;
    None when the labels hold only one class."""
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if not positives or not negatives:
        return None
    ranks = average_ranks(p.double())
    return float((ranks[y.bool()].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 1, tied values sharing the mean of their ranks."""
    order = torch.argsort(values)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype)
    unique, inverse = torch.unique(values, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=values.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=values.dtype).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def train(folder: Path, out: Path, settings: Training, device="cpu", report=print) -> dict:
    """Fits a latent proposer to the data folder `folder` and writes it, with its card, to `out`;
    returns the card. `report` gets a line per concept. Raises DataError."""
    data = read_settings(folder)
    check_training_data(data, Path(folder) / SETTINGS_FILE)
    concepts, space = data["concepts"], data["latent_space"]
    bad = []  # records and shards that are not as collect writes them
    examples = read_examples(folder, concepts, space["latent_channels"], bad)
    if bad:
        print(skipped_warning(bad, "its examples are left out of training"), file=sys.stderr, flush=True)
    held = split_by_prompt(examples.prompts, settings.held_out, settings.seed)
    train_rows = ~held
    network = fit(examples, train_rows, settings, device)
    if problem := tensor_problem(network):  # finite data can still overflow (x0 of 1e38) or diverge
        raise DataError(f"{folder}: training made a network that would score NaN ({problem}); no file written")
    p_train, p_held = scores(network, examples, train_rows), scores(network, examples, held)
    y_train, y_held = examples.labels[train_rows], examples.labels[held]
    rows = []
    for j, concept in enumerate(concepts):
        threshold = best_threshold(p_train[:, j], y_train[:, j])
        agreement = lambda p, y: round(float(((p > threshold).double() == y).double().mean()), 4)
        held_auc = auc(p_held[:, j], y_held[:, j])
        rows.append({"name": concept, "threshold": threshold,
                     "held_out": {"auc": None if held_auc is None else round(held_auc, 4),
                                  "agreement": agreement(p_held[:, j], y_held[:, j]),
                                  "positives": int(y_held[:, j].sum())},
                     "train": {"agreement": agreement(p_train[:, j], y_train[:, j]),
                               "positives": int(y_train[:, j].sum())}})
    method = data["settings"]["method"]
    sampling = {k: data["settings"][k] for k in ("sampler", "steps", "guidance", "height", "width")}
    prompts = lambda rows: len({p for p, r in zip(examples.prompts, rows) if r})
    card = {
        "task": method["task"], "concepts": rows,
        "model": {**space, "name": data["settings"]["model"]},
        "network": {"width": network.config.width, "frequencies": network.config.frequencies},
        "teacher": method["proposer"],
        "sampling": {**sampling, "query_steps": method["query_steps"], "negative_scale": method.get("scale")},
        "data": {"folder": Path(folder).name, "prompts": len(set(examples.prompts)), "images": examples.images,
                 "examples": len(examples.prompts), "failed_queries_left_out": examples.failed,
                 "train": {"prompts": prompts(train_rows), "examples": int(train_rows.sum())},
                 "held_out": {"prompts": prompts(held), "examples": int(held.sum())}},
        "training": {"epochs": settings.epochs, "batch_size": settings.batch_size,
                     "learning_rate": settings.learning_rate, "held_out_fraction": settings.held_out,
                     "seed": settings.seed},
    }
    save_latent_proposer(network.cpu(), card, out)
    for row in rows:
        held_out = row["held_out"]
        report(printable(f"{row['name']}: threshold {row['threshold']:.3f}, held-out AUC "
               f"{'n/a (one class)' if held_out['auc'] is None else format(held_out['auc'], '.3f')}, agreement "
               f"{held_out['agreement']:.3f} ({held_out['positives']} of {card['data']['held_out']['examples']} "
               f"held-out examples found by the teacher)"))
    return card
