"""What every proposer is: (x0 image, prompt, step) -> what it sees, as a Reply."""
import re
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Reply:
    items: list[str]  # the concepts found (task-cleaned); [] when nothing was found or on error
    raw: str  # the proposer's raw answer (VLM text, or CLIP's scores as text), for the trace
    error: str | None = None  # one line, when the query failed
    latency: float = 0.0  # seconds


class Proposer(Protocol):
    """A proposer whose answer ignores the image may set a class attribute `needs_image = False`:
    the sampler then skips decoding x0 and passes image=None.

    A proposer that shrinks the image before looking at it may have a method
    `input_scale(height, width) -> float`, the factor it scales an image of that size by. The
    VL-DNP hook then decodes a smaller x0 preview (StepState.decode_x0) that is still at least
    that large, instead of decoding every pixel to throw most away."""

    def __call__(self, image: torch.Tensor, prompt: str, step: int) -> Reply:
        """image: [3, H, W] in [-1, 1], the decoded x0 prediction of one image of the batch."""
        ...


def valid_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD. JSON can carry one ("\\ud83d") but UTF-8
    cannot, so a reply holding one could be written to no file or PNG."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def check_proposer(proposer) -> str | None:
    """Asks `proposer` about a plain grey image once; returns its error, or None when it answered.
    Run before a model loads, it finds a VLM server that is down while that costs nothing."""
    image = torch.zeros(3, 64, 64)  # grey, in [-1, 1]
    return proposer(image if getattr(proposer, "needs_image", True) else None, "", 0).error
