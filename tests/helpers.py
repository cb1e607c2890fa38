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


def ddim_reference(folder):
    """diffusers' StableDiffusionPipeline on the folder, its scheduler config read as DDIMScheduler, no
    safety checker and no progress bar: the reference the loop's DDIM images are compared with."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    ref.set_progress_bar_config(disable=True)
    return ref


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


def run_bounded(args, memory: int, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Runs the command `args` from the repository root with its address space limited to `memory` bytes
    (RLIMIT_AS): a process that would grow without bound fails there with a MemoryError instead of
    taking the machine with it. `timeout` only keeps a hang from stalling the suite."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return subprocess.run(args, preexec_fn=limit, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1], **kwargs)
