"""The proposers --proposer names, made from a command line's settings; the one place that imports
them, so each is a leaf a fork may delete (its file and its line in PROPOSERS):

    vlm    a vision-language model behind an OpenAI-compatible server (vlm/client.py), retried on
           transient faults (vlm/retry.py, a leaf of its own)
    clip   CLIP ViT scores the image against the task's concepts (vlm/clip_proposer.py)
"""
from dataclasses import dataclass
from typing import Callable

from checkpoint.tensors import CheckpointError
from leaves import Leaves
from vlm.base import check_proposer
from vlm.preview import make_preview
from vlm.tasks import Task


def make_vlm(args, task: Task, device, dtype):
    client = LEAVES["vlm"](args.vlm_url, args.vlm_model, task, timeout=args.vlm_timeout)
    if not LEAVES.present("retry"):  # a fork without vlm/retry.py asks once
        return client
    return LEAVES["retry"](client, retries=args.vlm_retries, max_in_flight=args.vlm_max_in_flight)


def make_clip(args, task: Task, device, dtype):
    from checkpoint.clip import load_clip
    try:
        model, tokenizer = load_clip(args.clip_model, device, dtype)
    except CheckpointError as e:  # offline, say
        raise CheckpointError(f"the CLIP proposer of VL-DNP needs CLIP weights: {e}. Give a local CLIP folder with "
                              "--clip-model DIR, ask a VLM with --vlm-url URL, or choose a method that does not look "
                              "(generate.py --proposer none)") from None
    return LEAVES["clip"](model, tokenizer, list(task.concepts), threshold=args.clip_threshold, task=task.name,
                          name=args.clip_model)


@dataclass(frozen=True)
class Kind:
    """A proposer --proposer can name: how to make it, the options it reads, and those of them that
    decide its answers (for run.json; a server's URL does not)."""
    make: Callable
    flags: tuple[str, ...]
    recorded: tuple[str, ...]


LEAVES = Leaves("proposer", {"vlm": "vlm.client:VLMClient", "retry": "vlm.retry:RetryingProposer",
                             "clip": "vlm.clip_proposer:CLIPProposer"})
PROPOSERS = {
    "vlm": Kind(make_vlm, ("vlm_url", "vlm_model", "vlm_timeout", "vlm_retries", "vlm_max_in_flight"), ("vlm_model",)),
    "clip": Kind(make_clip, ("clip_model", "clip_threshold"), ("clip_model", "clip_threshold")),
}


class ProposerSource:
    """The proposer and the x0 preview decoder a command line names, made once by `make(device,
    dtype)`, before the diffusion model loads, and shared by the variants of a method (its w_neg
    values), so that CLIP loads once. `description` is what run.json records of it."""

    def __init__(self, args, task: Task):
        self.kind, self.args, self.task = PROPOSERS[args.proposer], args, task
        self.description = {"name": args.proposer, **{f.removeprefix(f"{args.proposer}_"): getattr(args, f)
                                                      for f in self.kind.recorded}}
        self.preview_choice = args.preview_decoder
        self.proposer = self.preview = None

    def make(self, device, dtype):
        """The proposer; the first call makes it and the preview decoder, raising ValueError (one line)
        for one that cannot load."""
        if self.proposer is None:
            self.preview = make_preview(self.preview_choice, device, dtype)
            self.proposer = self.kind.make(self.args, self.task, device, dtype)
        return self.proposer

    def check(self) -> str | None:
        """Asks the proposer once, without retries, about a grey image: why it does not answer, or None."""
        return check_proposer(getattr(self.proposer, "proposer", self.proposer))
