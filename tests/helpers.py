"""Shared test helpers: randomized weights, a relative-error check, the prompts SDXL's text side is
checked on, a stand-in UNet for the samplers, the reference models' outputs on a folder, a loading error's
one line, images from a diffusers pipeline (and TAESD decodes) to compare with ours, a file written in one
call, a PNG's pixels and settings, a hub cache laid out by hand, a PNG that inflates to any size, a command
run in bounded memory."""
import json
import os
import resource
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.random_weights import randomize_  # noqa: F401  the benchmarks randomize models the same way

# What SDXL's two tokenizers and text encoders are checked on: plain, punctuation and "!" (the second
# tokenizer's pad), empty, and longer than the 77 positions.
SDXL_PROMPTS = ["a photo of a cat", "A castle on a hill, highly detailed, 8k!!", "", "wow! " * 40]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close_rel(a, b, tol=1e-4):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


def clip_features(out) -> torch.Tensor:
    """transformers' CLIPModel.get_*_features returns a tensor in transformers 4, an output object in 5."""
    return out if torch.is_tensor(out) else out.pooler_output


def fake_model(x, t):
    """A fixed, nonlinear stand-in for the UNet: depends on x and on t."""
    return torch.sin(1.3 * x + t / 97.0) + 0.2 * x


def pipeline_images(ref, prompt, *, seed=0, **kwargs) -> torch.Tensor:
    """Runs the diffusers pipeline `ref` with a CPU generator seeded `seed`, as generate() draws;
    uint8 [B, H, W, 3], rounded as diffusers' numpy_to_pil rounds."""
    out = ref(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images
    return torch.from_numpy((out * 255).round().astype(np.uint8))


def images_with_scheduler(folder, scheduler_class, prompt, negative_prompt=None, steps=5, guidance_scale=7.5,
                          height=32, width=32, batch=1, seed=0) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline on `folder` with `scheduler_class.from_config(pipe.scheduler.config)`,
    as diffusers' docs swap a scheduler in: its images, as `pipeline_images` gives them."""
    from diffusers import StableDiffusionPipeline
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = scheduler_class.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return pipeline_images(ref, prompt, seed=seed, negative_prompt=negative_prompt, num_inference_steps=steps,
                           guidance_scale=guidance_scale, height=height, width=width, num_images_per_prompt=batch)


def scheduler_classes() -> dict:
    """Our samplers' names -> the diffusers scheduler classes they match."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)
    return {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
            "euler-a": EulerAncestralDiscreteScheduler}


def reference_pipeline(cls, folder, sampler: str):
    """diffusers pipeline `cls` from `folder`, with the scheduler our `sampler` matches, from the folder's config."""
    extra = {} if "XL" in cls.__name__ else dict(safety_checker=None, requires_safety_checker=False)
    ref = cls.from_pretrained(folder, **extra)
    ref.scheduler = scheduler_classes()[sampler].from_pretrained(folder, subfolder="scheduler")
    ref.set_progress_bar_config(disable=True)
    return ref


def sdxl_reference(folder, sampler):
    """diffusers' StableDiffusionXLPipeline on the folder, its scheduler config read as the diffusers
    scheduler our `sampler` follows, no progress bar: the reference of the loop's SDXL images."""
    from diffusers import StableDiffusionXLPipeline
    return reference_pipeline(StableDiffusionXLPipeline, folder, sampler)


def reference_outputs(folder):
    """The three models' outputs on fixed inputs, computed by diffusers and transformers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text.config.vocab_size, (2, 77), generator=g)
    x, z = torch.randn(2, 4, 8, 12, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    images = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        context = text(ids).last_hidden_state
        sf = vae.config.scaling_factor
        return dict(ids=ids, x=x, z=z, images=images, context=context,
                    eps=unet(x, torch.tensor([999, 1]), encoder_hidden_states=context).sample,
                    decoded=vae.decode(z / sf).sample, encoded=vae.encode(images).latent_dist.mean * sf)


def assert_matches(pipe, ref):
    """A loaded SD1/SD2 pipeline's text encoder, UNet and VAE give `ref`, the reference_outputs of its source."""
    with torch.no_grad():
        assert_close_rel(pipe.text_encoder(ref["ids"]), ref["context"])
        assert_close_rel(pipe.unet(ref["x"], torch.tensor([999, 1]), ref["context"]), ref["eps"])
        assert_close_rel(pipe.vae.decode(ref["z"]), ref["decoded"])
        assert_close_rel(pipe.vae.encode(ref["images"]), ref["encoded"])


def tiny_reference_decode(ref, latents):
    """What diffusers' pipelines do with an AutoencoderTiny `ref` (TAESD): unscale, decode; images in [-1, 1]."""
    with torch.no_grad():
        return ref.decode(latents / ref.config.scaling_factor).sample


def error_of(source, load=None, **kw) -> str:
    """The message of the CheckpointError that `load(source, **kw)` (by default weights.load_pipeline)
    raises, checked to be one line."""
    from weights import CheckpointError, load_pipeline

    with pytest.raises(CheckpointError) as info:
        (load or load_pipeline)(source, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def ddim_reference(folder):
    """diffusers' StableDiffusionPipeline on the folder with DDIM: the reference the loop's DDIM images
    are compared with."""
    from diffusers import StableDiffusionPipeline
    return reference_pipeline(StableDiffusionPipeline, folder, "ddim")


def with_settings(folder, root, config="scheduler/scheduler_config.json", **settings):
    """A copy of `folder` (its weights linked) whose scheduler_config.json (or another `config`) has `settings`
    changed."""
    copy = root / folder.name
    shutil.copytree(folder, copy, copy_function=os.link)
    file = copy / config
    file.unlink()  # linked: write a new file, not into the original's
    file.write_text(json.dumps({**json.loads((folder / config).read_text()), **settings}))
    return copy


def assert_same_image(ours, expected):
    """uint8 images within 2 levels of each other, the reference neither saturated nor flat: random
    weights saturate easily, and a comparison of flat or clipped pixels would prove little."""
    assert ours.shape == expected.shape and ours.dtype == torch.uint8
    assert ((expected > 0) & (expected < 255)).float().mean() > 0.2, "reference image is saturated"
    assert expected.float().std() > 10, "reference image is flat"
    diff = max_diff(ours, expected)
    assert diff <= 2, f"pixels differ by up to {diff} levels"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest difference between two uint8 images, in levels."""
    return (a.int() - b.int()).abs().max().item()


def write(path: Path, text: str | bytes, encoding: str = "utf-8") -> Path:
    """Writes `text` (encoded in `encoding`) or bytes to `path`; returns the path."""
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def pixels(path) -> torch.Tensor:
    """The pixels of a PNG, uint8 [H, W, 3]."""
    from png_reader import read_png
    return read_png(path)[0]


def parameters(path) -> str:
    """The settings text ("parameters") a PNG written by generate.py or evaluate.py holds."""
    from png_reader import read_png
    return read_png(path)[1]["parameters"]


def run(main, capsys, *argv, **kwargs):
    """A script's main(argv, **kwargs) in process, every argument as a string: (exit code, stdout lines,
    stderr lines)."""
    code = main([str(a) for a in argv], **kwargs)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def hub_cache(home: Path, repo: str, folder: Path):
    """Lays `folder` out as huggingface_hub's cache holds a downloaded snapshot of `repo`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


class FixedProposer:
    """A proposer that always proposes the same items and never looks (`needs_image` False), for tests
    of the VL-DNP hook's timing and bookkeeping."""
    needs_image = False

    def __init__(self, items):
        self.items = list(items)

    def __repr__(self):
        return f"FixedProposer({self.items!r})"

    def __call__(self, image, prompt: str, step: int):
        from vlm.base import Reply
        return Reply(list(self.items), ", ".join(self.items))


def picture(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """An image to edit, uint8 [H, W, 3]: a colour ramp with noise, neither flat nor saturated."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 150, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None] * [1, -1, 0.5]
    return torch.from_numpy((ramp + 40 + rng.integers(0, 60, (height, width, 3))).clip(0, 255).astype(np.uint8))


def box_mask(height: int, width: int) -> torch.Tensor:
    """A mask image uint8 [H, W, 3], white (repaint) over a box in the middle, black elsewhere."""
    mask = torch.zeros(height, width, 3, dtype=torch.uint8)
    mask[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
    return mask


def inflating_png(path: Path, inflated: int, width: int = 16, height: int = 16) -> Path:
    """A PNG whose IHDR gives width x height RGB pixels and whose IDAT holds zlib data of `inflated` zero
    bytes, compressed about 1000 to 1: a decompression bomb when `inflated` is far past the image's rows."""
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    z = zlib.compressobj(9)
    data = b"".join(z.compress(bytes(min(2**20, inflated - i))) for i in range(0, inflated, 2**20)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def to_pil(image: torch.Tensor):
    from PIL import Image
    return Image.fromarray(image.numpy())


def run_bounded(args, memory: int, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Runs the command `args` from the repository root with its address space limited to `memory` bytes
    (RLIMIT_AS): a process that would grow without bound fails there with a MemoryError instead of
    taking the machine with it. `timeout` only keeps a hang from stalling the suite."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return subprocess.run(args, preexec_fn=limit, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1], **kwargs)
