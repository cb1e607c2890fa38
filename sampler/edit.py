"""Editing an image instead of drawing one: img2img and inpainting, where the sampling chain starts.

img2img (SDEdit, Meng et al. 2022): the image is encoded by the VAE, noised to the step that the
strength s selects, and the sampler runs the remaining ⌊N·s⌋ of its N steps. s = 1 starts from
almost pure noise, a small s keeps the image and changes its details.

    x_k = α_k·E(image) + σ_k·ε,   k = N − ⌊N·s⌋

Inpainting repaints where the mask is set (white) and keeps the rest. An inpainting UNet (9 input
channels: SD1.5/SD2/SDXL inpainting) sees, beside x_t, the mask and the latents of the image with
the masked region blanked, at every step. An ordinary 4-channel UNet sees only x_t, and after each
step the latents outside the mask are put back: the image's, noised to the next step's level (at
the last step, the image's own).

Both follow diffusers' StableDiffusion(XL)Img2ImgPipeline and StableDiffusion(XL)InpaintPipeline,
draw for draw, so a seed gives their image: the VAE's posterior sample of the image, then the noise,
then (inpainting) the posterior sample of the masked image, then the sampler's own noise. As there,
inpainting at s = 1 starts from pure noise, and img2img at s = 1 from the image noised to the first
step. The steps a hook counts are those the chain takes (StepState.i from 0, num_steps ⌊N·s⌋).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sampler.schedule import randn

IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.8, 1.0  # diffusers' defaults (StableDiffusionImg2Img/InpaintPipeline)


def first_step(num_steps: int, strength: float) -> int:
    """The step an edit of `strength` starts at among num_steps: diffusers' get_timesteps, which
    runs ⌊N·s⌋ steps. ValueError for a strength outside (0, 1] or one that runs no step."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength {strength:g}: must be more than 0 and at most 1")
    taken = min(int(num_steps * strength), num_steps)
    if taken < 1:
        raise ValueError(f"strength {strength:g} runs no step of {num_steps} (⌊{num_steps}·{strength:g}⌋ = 0); "
                         f"raise it to at least {1 / num_steps:.3g} or take more steps")
    return num_steps - taken


def check_edit(pipe, image: torch.Tensor | None, mask: torch.Tensor | None, strength: float | None, height,
               width) -> tuple[int | None, int | None, float | None]:
    """(height, width, strength) of a generation that edits `image` (or, image None, draws with a
    model that allows it): the image's size and the strength given or the default. ValueError, one
    line, for an edit the model or the sizes do not allow. With pipe None (a command line, before
    any model loads), the sizes alone, for SD's VAE scale of 8."""
    if image is None:
        if mask is not None:
            raise ValueError("a mask needs the image it masks (init_image)")
        if strength is not None:
            raise ValueError("strength is how much of an image an edit changes; give the image (init_image)")
        if pipe.inpainting:
            raise ValueError(f"{pipe.name} is an inpainting model ({pipe.unet.config.in_channels} input channels): "
                             "give it an image and a mask")
        return height, width, None
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"init_image: expected uint8 [H, W, 3] RGB, got {image.dtype} {list(image.shape)}")
    H, W = image.shape[:2]
    if (height or H, width or W) != (H, W):
        raise ValueError(f"the image is {W}x{H}; the edit has its size (leave out the height and width, or give "
                         f"{H} and {W})")
    scale = 8 if pipe is None else pipe.vae_scale
    if H % scale or W % scale:  # a side shorter than the scale: resized up to it, not down to 0
        raise ValueError(f"the image is {W}x{H}; its sides must be multiples of {scale} (the VAE's scale), at least "
                         f"{scale}: crop or resize it, e.g. to {max(W - W % scale, scale)}x{max(H - H % scale, scale)}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (H, W)):
        what = f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2 else f"{mask.dtype} {list(mask.shape)}"
        raise ValueError(f"the mask is {what}; it must be a bool [H, W] of the image's size, {W}x{H}")
    if pipe is not None and pipe.inpainting and mask is None:
        raise ValueError(f"{pipe.name} is an inpainting model ({pipe.unet.config.in_channels} input channels): "
                         "give it a mask with the image")
    if strength is None:
        strength = IMG2IMG_STRENGTH if mask is None else INPAINT_STRENGTH
    return H, W, strength


def mask_from_image(image: torch.Tensor) -> torch.Tensor:
    """A mask image uint8 [H, W, 3] -> bool [H, W], True where it is repainted: its grey level
    (PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16) at least 128, as diffusers'
    mask processor binarises it."""
    r, g, b = image.int().unbind(-1)
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16 >= 128


def encode(pipe, image: torch.Tensor, generator) -> torch.Tensor:
    """uint8 [H, W, 3] (or float [1, 3, H, W] in [-1, 1]) -> a sample of the VAE's posterior,
    scaled, [1, 4, h, w] in the model's dtype."""
    pixels = image if image.is_floating_point() else to_pixels(image)
    vae_dtype = pipe.vae.quant_conv.weight.dtype  # SDXL's VAE may be fp32 beside an fp16 UNet
    latents = pipe.vae.encode(pixels.to(pipe.device, pipe.dtype).to(vae_dtype), generator)
    return latents.to(pipe.dtype)


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1], as diffusers' image processor scales it."""
    return (image.permute(2, 0, 1)[None].float() / 255) * 2 - 1


@dataclass
class Known:
    """What an inpainting run keeps of the image. `mask` [1, 1, h, w] is 1 where it is repainted,
    the image's mask at the latents' size. `extra` [B, 5, h, w] is what a 9-channel UNet takes beside
    x_t: the mask and the latents of the image with that region blanked (None for a 4-channel UNet).
    A 4-channel UNet's x is blended instead: `latents` [B, 4, h, w], the image's, where the mask is
    0, noised with `noise` to each step's level."""
    mask: torch.Tensor
    extra: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    def blend(self, solver, x: torch.Tensor, i: int) -> torch.Tensor:
        """x after step i, the image put back outside the mask (4-channel UNets; else x as it is)."""
        if self.latents is None:
            return x
        return (1 - self.mask) * solver.add_noise(self.latents, self.noise, i + 1) + self.mask * x


def start(pipe, solver, image, mask, strength: float, shape, generator) -> tuple[torch.Tensor, Known | None]:
    """x at the chain's first step, [B, 4, h, w] = `shape`, and for inpainting what it keeps of the
    image; drawn from `generator` as diffusers draws them."""
    B, _, h, w = shape
    pixels = to_pixels(image)  # [1, 3, H, W]
    latents = None  # the image's, [B, 4, h, w]: diffusers encodes it only where it is used
    if mask is None or not pipe.inpainting or strength < 1:
        latents = encode(pipe, pixels, generator).expand(B, -1, -1, -1)
    noise = randn(shape, generator, pipe.device, pipe.dtype)  # [B, 4, h, w]
    if mask is not None and strength == 1:  # inpainting at full strength starts from pure noise
        x = noise * solver.init_noise_scale
    else:
        x = solver.add_noise(latents, noise, 0)
    if mask is None:
        return x, None
    repaint = F.interpolate(mask[None, None].float(), size=(h, w)).to(pipe.device, pipe.dtype)  # [1, 1, h, w]
    if pipe.inpainting:
        masked = encode(pipe, pixels * ~mask[None, None], generator)  # [1, 4, h, w]: the repainted region grey
        return x, Known(repaint, extra=torch.cat([repaint, masked], dim=1).expand(B, -1, -1, -1))
    # diffusers encodes the masked image here too, which a 4-channel UNet never reads: its posterior
    # sample is drawn all the same, so that the sampler's noise after it is diffusers'
    randn((1, *shape[1:]), generator, pipe.device, pipe.vae.quant_conv.weight.dtype)
    return x, Known(repaint, latents=latents, noise=noise)
