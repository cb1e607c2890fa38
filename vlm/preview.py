"""Which decoder turns VL-DNP's x0 prediction into the image a proposer sees (and the filmstrip shows).

The paper (Chang, Kim, Choi 2025, arXiv 2510.26052) decodes x0 with the model's own VAE; that is
`VAE_PREVIEW`, the default. A `Preview` built around another decoder, such as TAESD (model/taesd.py,
the tiny autoencoder SD interfaces use for live previews), makes the same image more cheaply and a
little softer. Any decoder with the VAE's convention fits: scaled latents [B, 4, h, w] in, images
[B, 3, 8h, 8w] in about [-1, 1] out. `make_preview` builds the one --preview-decoder names; TAESD is
a leaf (checkpoint/taesd.py), imported only when asked for.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from checkpoint.tensors import CheckpointError
from sampler.loop import pool_latents


@dataclass(frozen=True)
class Preview:
    """`decode`: scaled latents -> images in [-1, 1] at the VAE's 8x scale; None for the pipeline's
    own VAE (StepState.decode_x0). `name` says which decoder it is, for the trace and the PNG text:
    "vae", "taesd (madebyollin/taesd)", a path. `families`: the model families (Pipeline.family)
    whose latents it decodes, or None when that is not known (the VAE, which is the model's own;
    a decoder from a path)."""
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    name: str = "vae"
    families: tuple[str, ...] | None = None

    def mismatch(self, family: str) -> str | None:
        """Why this decoder cannot make previews of a `family` model's latents, in one line; None if it can."""
        if self.families is None or family in self.families:
            return None
        return (f"--preview-decoder: {self.name} decodes {'/'.join(self.families)} latents, and this is an "
                f"{family} model; use taesdxl for SDXL, taesd for SD 1.x/2.x, or vae")

    def __call__(self, state, factor: int = 1) -> torch.Tensor:
        """state.x0 as images [B, 3, H/k, W/k] in [-1, 1]: with k = `factor` > 1, decoded from x0
        average-pooled over k×k latents, as StepState.decode_x0(k) does for the VAE."""
        if self.decode is None:
            return state.decode_x0(factor)
        return self.decode(pool_latents(state.x0, factor))


VAE_PREVIEW = Preview()

CHOICES = "vae, taesd, taesdxl, a TAESD folder or a taesd_decoder.safetensors file"


def check_preview_decoder(choice: str):
    """A --preview-decoder that names nothing loadable (vae, taesd, taesdxl, or an existing folder or
    .safetensors file) is a ValueError, before anything loads."""
    if choice == "vae" or choice in taesd_repos():
        return
    path = Path(choice).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
        return
    what = "not a .safetensors file" if path.is_file() else "no such file or folder"
    raise ValueError(f"--preview-decoder {choice}: {what}; use {CHOICES}")


def make_preview(choice: str, device=None, dtype=None) -> Preview:
    """The x0 preview decoder --preview-decoder names: the model's VAE, or TAESD (madebyollin/taesd
    or taesdxl, or a folder or file) loaded on `device` in `dtype`. TAESD that cannot be had (offline
    and not cached, a damaged file) is a ValueError line naming the way out. It loads before the
    diffusion model, so whether it fits the model is checked after that (Preview.mismatch)."""
    if choice == "vae":
        return VAE_PREVIEW
    from checkpoint.taesd import FAMILIES, load_taesd  # a leaf: only here
    repos = taesd_repos()
    source = repos.get(choice, choice)
    try:
        model = load_taesd(source, device or "cpu", dtype or "fp32")
    except CheckpointError as e:
        raise CheckpointError(f"--preview-decoder {choice}: {e} (or decode the previews with the model's VAE: "
                         "--preview-decoder vae)") from None
    if choice in repos:
        return Preview(model.decode, f"{choice} ({source})", FAMILIES[choice])
    return Preview(model.decode, choice)


def taesd_repos() -> dict[str, str]:
    """The hub TAESDs by name (checkpoint/taesd.py's REPOS, the one table of them)."""
    from checkpoint.taesd import REPOS
    return REPOS

