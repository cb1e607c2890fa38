"""The proposers --proposer names and the x0 preview decoders --preview-decoder names, made from a
command line's options (methods/vldnp_cli.py); the one place that imports them, so each is a leaf a
fork may delete (its file and its line in LEAVES):

    vlm    a vision-language model behind an OpenAI-compatible server (vlm/client.py), retried on
           transient faults (vlm/retry.py, a leaf of its own)
    clip   CLIP ViT scores the image against the task's concepts (vlm/clip_proposer.py)
    latent a network distilled from a teacher's answers scores x0 latents, undecoded (vlm/latent_proposer.py)
    taesd  the tiny autoencoder for cheaper previews (checkpoint/taesd.py)
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import torch

from checkpoint.tensors import CheckpointError
from files import printable, sha256_file
from leaves import Leaves
from vlm.tasks import Task


def make_vlm(args, task: Task, device, dtype):
    client = LEAVES["vlm"](args.vlm_url, args.vlm_model, task, timeout=args.vlm_timeout)
    host = urlsplit(client.url).hostname
    if client.api_key and client.url.startswith("http:") and not LEAVES["vlm client"].is_loopback(host):
        print(f"warning: the API key goes to {printable(host)} unencrypted (http://); an https:// URL keeps it secret",
              file=sys.stderr, flush=True)
    if not LEAVES.present("retry"):  # a fork without vlm/retry.py asks once
        return client
    return LEAVES["retry"](client, retries=args.vlm_retries, max_in_flight=args.vlm_max_in_flight)


def make_clip(args, task: Task, device, dtype):
    try:
        model, tokenizer = LEAVES["clip weights"].load_clip(args.clip_model, device, dtype)
    except CheckpointError as e:  # offline, say
        raise CheckpointError(f"the CLIP proposer of VL-DNP needs CLIP weights: {e}. Give a local CLIP folder with "
                              "--clip-model DIR, ask a VLM with --vlm-url URL, or choose a method that does not look "
                              "(generate.py --proposer none)") from None
    return LEAVES["clip"](model, tokenizer, list(task.concepts), threshold=args.clip_threshold, task=task.name,
                          name=args.clip_model)


def make_latent(args, task: Task, device, dtype):
    proposer = LEAVES["latent"].load(args.latent_proposer, device)
    if proposer.task != task.name:
        raise CheckpointError(f"--latent-proposer {args.latent_proposer}: made for the {proposer.task} task, and this "
                              f"run asks {task.name}; give --vlm-task {proposer.task}, or distil one for {task.name}")
    return proposer


def describe_latent(args) -> dict:
    """The latent proposer's file, by name and contents: a run folder resumes only with the same file."""
    return {"file": Path(args.latent_proposer).name, "sha256": sha256_file(args.latent_proposer)}


@dataclass(frozen=True)
class Kind:
    """A proposer --proposer can name: how to make it, the options it reads, those of them that decide
    its answers (for run.json; a server's URL does not), and the leaves it needs. `describe` adds what
    else decides its answers (a file's sha256), and `previews` says whether it is shown decoded x0
    (so that --preview-decoder and --full-decode apply)."""
    make: Callable
    flags: tuple[str, ...]
    recorded: tuple[str, ...]
    leaves: tuple[str, ...]
    describe: Callable | None = None
    previews: bool = True


LEAVES = Leaves("proposer", {"vlm": "vlm.client:VLMClient", "vlm client": "vlm.client",
                             "retry": "vlm.retry:RetryingProposer",
                             "clip": "vlm.clip_proposer:CLIPProposer", "clip weights": "checkpoint.clip",
                             "latent": "vlm.latent_proposer:LatentProposer"})
PREVIEWS = Leaves("preview decoder", {"taesd": "checkpoint.taesd", "decoder": "vlm.preview:Preview"})
PROPOSERS = {
    "vlm": Kind(make_vlm, ("vlm_url", "vlm_model", "vlm_timeout", "vlm_retries", "vlm_max_in_flight"), ("vlm_model",),
                ("vlm",)),
    "clip": Kind(make_clip, ("clip_model", "clip_threshold"), ("clip_model", "clip_threshold"), ("clip", "clip weights")),
    "latent": Kind(make_latent, ("latent_proposer",), (), ("latent",), describe_latent, previews=False),
}


class ProposerSource:
    """The proposer and the x0 preview decoder a command line names, made once by `make(device,
    dtype)`, before the diffusion model loads, and shared by the variants of a method (its w_neg
    values), so that CLIP loads once. `description` is what run.json records of it."""

    def __init__(self, args, task: Task):
        self.kind, self.args, self.task = PROPOSERS[args.proposer], args, task
        for leaf in self.kind.leaves:  # a leaf this copy lacks is said now, before anything loads
            LEAVES[leaf]
        self.description = {"name": args.proposer, **{f.removeprefix(f"{args.proposer}_"): getattr(args, f)
                                                      for f in self.kind.recorded},
                            **(self.kind.describe(args) if self.kind.describe else {})}
        self.preview_choice = args.preview_decoder
        self.proposer = self.preview = None

    def make(self, device, dtype) -> tuple:
        """(the proposer, the preview decoder or None for the VAE); the first call makes them, raising a one-line
        CheckpointError for one that cannot load."""
        if self.proposer is None:
            self.preview = make_preview(self.preview_choice, device, dtype)
            self.proposer = self.kind.make(self.args, self.task, device, dtype)
        return self.proposer, self.preview

    def check(self) -> str | None:
        """Asks a VLM once, without retries, about a grey image: why it does not answer, or None. A
        proposer that runs here (CLIP) needs no asking."""
        if self.args.proposer != "vlm":
            return None
        return check_proposer(getattr(self.proposer, "proposer", self.proposer))


def check_proposer(proposer) -> str | None:
    """Asks `proposer` about a plain grey image once; returns its error, or None when it answered.
    Run before a model loads, it finds a VLM server that is down while that costs nothing."""
    image = torch.zeros(3, 64, 64)  # grey, in [-1, 1]
    return proposer(image if getattr(proposer, "needs_image", True) else None, "", 0).error


CHOICES = "vae, taesd, taesdxl, a TAESD folder or a taesd_decoder.safetensors file"


def check_preview_decoder(choice: str):
    """A --preview-decoder that names nothing loadable (vae, taesd, taesdxl, or an existing folder or
    .safetensors file) is a ValueError, before anything loads."""
    if choice == "vae" or choice in PREVIEWS["taesd"].REPOS:
        return
    path = Path(choice).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
        return
    what = "not a .safetensors file" if path.is_file() else "no such file or folder"
    raise ValueError(f"--preview-decoder {choice}: {what}; use {CHOICES}")


def make_preview(choice: str, device=None, dtype=None):
    """The x0 preview decoder --preview-decoder names: None for the model's VAE, or a Preview (vlm/preview.py)
    of TAESD (madebyollin/taesd or taesdxl, or a folder or file) loaded on `device` in `dtype`. TAESD that
    cannot be had (offline and not cached, a damaged file) is a ValueError line naming the way out. It
    loads before the diffusion model, so whether it fits the model is checked after that (Preview.mismatch)."""
    if choice == "vae":
        return None
    taesd, preview = PREVIEWS["taesd"], PREVIEWS["decoder"]
    source = taesd.REPOS.get(choice, choice)
    try:
        model = taesd.load_taesd(source, device or "cpu", dtype or "fp32")
    except CheckpointError as e:
        raise CheckpointError(f"--preview-decoder {choice}: {e} (or decode the previews with the model's VAE: "
                              "--preview-decoder vae)") from None
    if choice in taesd.REPOS:
        return preview(model.decode, f"{choice} ({source})", taesd.DECODES[choice])
    return preview(model.decode, choice)
