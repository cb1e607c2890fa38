"""Shared test helpers: randomized weights, a relative-error check, and images from a diffusers
pipeline compared with ours, a hub cache laid out by hand, a command run in bounded memory."""
import resource
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from benchmarks.random_weights import randomize_  # noqa: F401  the benchmarks randomize models the same way


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


def pipeline_images(ref, prompt, *, seed=0, **kwargs) -> torch.Tensor:
    """Runs the diffusers pipeline `ref` with a CPU generator seeded `seed`, as generate() draws;
    uint8 [B, H, W, 3], rounded as diffusers' numpy_to_pil rounds."""
    out = ref(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images
    return torch.from_numpy((out * 255).round().astype(np.uint8))


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


def ddim_reference(folder):
    """diffusers' StableDiffusionPipeline on the folder with DDIM: the reference the loop's DDIM images
    are compared with."""
    from diffusers import StableDiffusionPipeline
    return reference_pipeline(StableDiffusionPipeline, folder, "ddim")


def assert_same_image(ours, expected):
    """uint8 images within 2 levels of each other, the reference neither saturated nor flat: random
    weights saturate easily, and a comparison of flat or clipped pixels would prove little."""
    assert ours.shape == expected.shape and ours.dtype == torch.uint8
    assert ((expected > 0) & (expected < 255)).float().mean() > 0.2, "reference image is saturated"
    assert expected.float().std() > 10, "reference image is flat"
    diff = (ours.int() - expected.int()).abs().max().item()
    assert diff <= 2, f"pixels differ by up to {diff} levels"


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
