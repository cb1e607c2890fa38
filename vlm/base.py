"""What every proposer is: (x0 image, prompt, step) -> what it sees, as a Reply, or for a proposer
that reads latents (x0 latents and their timestep, prompt, step) -> Reply; and the text and image
helpers every proposer and the VL-DNP hook share (scores checked, server text made printable, x0 as uint8)."""
import re
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from files import printable
from sampler.loop import to_uint8


@dataclass(frozen=True)
class Latents:
    """What a proposer with `wants = "latents"` is shown in place of a decoded image: one image's x0
    prediction as the sampler made it, and the training timestep of the step that made it."""
    x0: torch.Tensor  # [C, h, w], the scaled latents the UNet works in
    t: int | float


@dataclass
class Reply:
    items: list[str]  # the concepts found (task-cleaned); [] when nothing was found or on error
    raw: str  # the proposer's raw answer (VLM text, or CLIP's scores as text), for the trace
    error: str | None = None  # one line, when the query failed
    latency: float = 0.0  # seconds


class Proposer(Protocol):
    """A proposer whose answer ignores the image may set a class attribute `needs_image = False`:
    the VL-DNP hook then skips decoding x0 and passes image=None. A proposer that reads latents sets
    `wants = "latents"`: it is passed a `Latents` in place of the image, and nothing is decoded.

    A proposer that shrinks the image first may have `input_scale(height, width) -> float`, the
    factor it scales an image of that size by: the VL-DNP hook then decodes a smaller x0 preview
    (StepState.decode_x0), still at least that large, instead of every pixel."""

    def __call__(self, image: torch.Tensor, prompt: str, step: int) -> Reply:
        """image: [3, H, W] in [-1, 1], the decoded x0 prediction of one image of the batch."""
        ...


def score_error(scores: torch.Tensor) -> str | None:
    """Why a proposer's scores are no verdict (NaN or inf: a corrupt network or x0), or None: a failed query."""
    return None if torch.isfinite(scores).all() else "non-finite scores (NaN or inf): is its network or the x0 corrupt?"


def valid_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD. JSON can carry one ("\\ud83d") but UTF-8
    cannot, so a reply holding one could be written to no file or PNG."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def one_line(text: str, limit: int = 300) -> str:
    """`text` on one line (each run of white space one space), `printable`, cut to `limit` characters."""
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def prepare_image(image: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """[3, H, W] in [-1, 1] -> uint8 [h, w, 3], scaled (bicubic, antialiased) so that its longer side is `size`, which
    keeps the aspect ratio; at size None or the image's own size, exactly `to_uint8` of the image."""
    H, W = image.shape[-2:]
    if size is None or max(H, W) == size:
        return to_uint8(image[None])[0]
    h, w = max(1, round(H * size / max(H, W))), max(1, round(W * size / max(H, W)))
    x = (image[None].float() * 0.5 + 0.5).clamp(0, 1)
    x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (x[0].permute(1, 2, 0).cpu() * 255).round().to(torch.uint8)

