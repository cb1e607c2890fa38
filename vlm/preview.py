"""A decoder other than the model's VAE for VL-DNP's x0 previews (what a proposer sees, and the filmstrip
shows), a leaf (vlm/proposers.py:PREVIEWS): methods/vldnp.py decodes with the VAE when given none.

The paper (Chang, Kim, Choi 2025, arXiv 2510.26052) decodes x0 with the model's own VAE. A `Preview`
built around another decoder, such as TAESD (model/taesd.py, the tiny autoencoder SD interfaces use
for live previews), makes the same image more cheaply and a little softer. Any decoder with the VAE's
convention fits: scaled latents [B, 4, h, w] in, images [B, 3, 8h, 8w] in about [-1, 1] out.
vlm/proposers.py:make_preview builds the one --preview-decoder names.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from sampler.loop import pool_latents


@dataclass(frozen=True)
class Preview:
    """`decode`: scaled latents -> images in [-1, 1] at the VAE's 8x scale. `name` says which decoder it
    is, for the trace and the PNG text: "taesd (madebyollin/taesd)", a path. `families`: the model
    families (Pipeline.family) whose latents it decodes, or None when that is not known (a decoder
    from a path)."""
    decode: Callable[[torch.Tensor], torch.Tensor]
    name: str
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
        return self.decode(pool_latents(state.x0, factor))
