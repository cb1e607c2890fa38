"""Whether the images asked of generate() fit in the device's memory, asked before sampling: a size
or batch that cannot fit is one line naming one that does (TooLargeError), not an allocator's
traceback after minutes of work, nor a machine swapping to a halt.

The weights are loaded by then, so the memory the device has left is what the activations may
use. Their peak is the larger of two moments, each estimated from the configs:

- a UNet call over every row at once (a row is one branch of one image: unconditional, prompt,
  negative): per latent position, the skip maps the down path keeps for the up path, plus the
  working set of the largest block;
- the VAE's decode of every image at once, whose peak is at full resolution, where the
  upsampled maps of the second level meet the last level's first resnet.

The working sets count the tensors alive at once in the forward code, in multiples of a level's
width, with room for the convolutions' reordered copies and the allocators' slack; docs/performance.md
holds the peaks they were checked against. The attention's score matrices are counted only where
scaled_dot_product_attention materialises them (not on the CPU or CUDA, whose kernels work in tiles).
"""
import math
import os
from pathlib import Path

import torch

GiB = 2**30
# Tensors alive at once, in widths (channels) of the level they run at:
RESNET_WIDTHS = 16  # a resnet on the up path: its input with the skip (3 widths), normalised, activated,
#                     the convolution's reordered copy, and its output, with room for scratch
TRANSFORMER_WIDTHS = 32  # a transformer block's feed-forward: GEGLU's 8-wide projection, its gate and
#                          product (4 each), the block's input, residual and the map around it (20), with
#                          room for the attention kernel's scratch and the convolutions' reordered weights
VAE_WIDTHS = 5  # at full resolution: input, normalised, activated, the convolution's reordered copy, output


class TooLargeError(ValueError):
    """The images asked for need more memory than the device has left."""


def unet_bytes(cfg, rows: int, h: int, w: int, itemsize: int, scores: bool = False) -> int:
    """The UNet's activations over `rows` rows of h x w latents: the skip maps held for the up
    path and the largest block's working set, per level l at (h / 2^l) x (w / 2^l) positions."""
    skips, largest = cfg.channels[0] * h * w, 0  # conv_in's output is the first skip
    for level, width in enumerate(cfg.channels):
        n = math.ceil(h / 2**level) * math.ceil(w / 2**level)
        skips += cfg.layers_per_block * width * n + (width * n // 4 if level < len(cfg.channels) - 1 else 0)
        block = (TRANSFORMER_WIDTHS if cfg.attention[level] else RESNET_WIDTHS) * width * n
        if scores and cfg.attention[level]:
            block += cfg.num_heads[level] * n * n  # softmax(q k^T) of one self-attention
        largest = max(largest, block)
    return rows * (skips + largest) * itemsize


def vae_bytes(cfg, images: int, height: int, width: int, itemsize: int, scores: bool = False) -> int:
    """The VAE decoder's activations for `images` images of height x width pixels."""
    widest = max(cfg.channels[:2])  # the second level's maps are upsampled to full resolution
    scale = 2 ** (len(cfg.channels) - 1)
    n = (height // scale) * (width // scale)  # latent positions, all of them in the middle block's attention
    return images * (VAE_WIDTHS * widest * height * width + (n * n if scores else 0)) * itemsize


def peak_bytes(pipe, rows: int, images: int, height: int, width: int) -> tuple[int, str]:
    """(bytes, what needs them): the larger of the UNet call's and the VAE decode's activations."""
    scores = pipe.device.type not in ("cpu", "cuda")
    scale = pipe.vae_scale
    unet = unet_bytes(pipe.unet.config, rows, height // scale, width // scale, pipe.dtype.itemsize, scores)
    vae = vae_bytes(pipe.vae.config, images, height, width, _dtype_of(pipe.vae, pipe.dtype).itemsize, scores)
    return (unet, "the UNet") if unet >= vae else (vae, "the VAE's decode")


def _dtype_of(module, default: torch.dtype) -> torch.dtype:
    """The dtype of `module`'s weights (SDXL's VAE may be wider than the UNet); `default` for a
    wrapper without weights of its own."""
    return next((p.dtype for p in module.parameters()), default) if isinstance(module, torch.nn.Module) else default


def available_bytes(device: torch.device) -> int | None:
    """What the device can still allocate, or None where that is unknown. CUDA: the free memory
    and what torch's allocator holds unused; MPS: its recommended limit less what is allocated;
    CPU: the available RAM and free swap (/proc/meminfo, else sysconf), where a run that swaps is
    slow but runs, and the page cache, mmapped weights included, counts as free: the check errs
    towards running."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    if device.type != "cpu":
        return None
    try:
        info = {k: int(v.split()[0]) * 1024 for k, v in
                (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())}
        available = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES
            return None
    return available


def check_memory(pipe, guidance, height: int, width: int, hooks, available: int | None = None) -> None:
    """Raises TooLargeError, naming a batch or size that fits, when the images of `guidance` need
    more memory than pipe.device has left (`available` bytes; by default, what available_bytes
    says). Each image counts three rows where it may have a negative (one given, or a hook that
    may add one), else two (one at CFG scale 1 or below)."""
    available = available_bytes(pipe.device) if available is None else available
    images = len(guidance.prompt)
    rows = 3 if hooks or any(n is not None for n in guidance.negative) else 2 if guidance.scale > 1 else 1
    need, what = peak_bytes(pipe, rows * images, images, height, width)
    if available is None or need <= available:
        return
    fits = lambda k, h, w: peak_bytes(pipe, rows * k, k, h, w)[0] <= available
    step = 8 * pipe.vae_scale  # sizes in multiples of 8 latents, 64 pixels in SD
    sides = lambda k: scaled(height, width, k * step, step)  # the longer side k steps
    if images > 1 and fits(1, height, width):
        advice = f"at most {largest(lambda k: fits(k, height, width), images - 1)} at once fit"
    elif k := largest(lambda k: fits(1, *sides(k)), max(height, width) // step):
        advice = "at most {}x{} fits, one at a time".format(*sides(k))
    else:
        advice = "not even the smallest image fits beside the weights"
    asked = f"{images} images of {height}x{width} need" if images > 1 else f"an image of {height}x{width} needs"
    raise TooLargeError(f"{asked} about {need / GiB:.1f} GiB for {what}, and {pipe.device} has "
                        f"{available / GiB:.1f} GiB free; {advice}")


def largest(fits, high: int) -> int:
    """The largest k in 1..high for which fits(k), which holds up to some k and not beyond; 0 if none."""
    low = 0
    while low < high:
        k = (low + high + 1) // 2
        low, high = (k, high) if fits(k) else (low, k - 1)
    return low


def scaled(height: int, width: int, longer: int, step: int) -> tuple[int, int]:
    """height x width scaled so that its longer side is `longer`, each side a multiple of `step`."""
    scale = longer / max(height, width)
    return max(step, int(height * scale) // step * step), max(step, int(width * scale) // step * step)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: MemoryError, CUDA's OutOfMemoryError, or the
    RuntimeError of MPS ("MPS backend out of memory") or of the CPU allocator ("DefaultCPUAllocator:
    can't allocate memory", "not enough memory" on Windows)."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(
        sign in str(exc) for sign in ("out of memory", "DefaultCPUAllocator", "can't allocate memory"))
