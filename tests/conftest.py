"""Shared test helpers: randomized weights, a relative-error check, images from a diffusers
pipeline, and a scripted VLM server."""
import math

import numpy as np
import pytest
import torch

from fake_vlm import ScriptedVLM


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with random values, norms and biases included,
    so that a swapped, transposed or missing tensor changes the output.

    Matrices get N(0, 1/fan_in); 1-D gains (``*.weight``) get N(1, 0.1);
    everything else (biases, class embeddings) N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                std = 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close_rel(a, b, tol=1e-4):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


def pipeline_images(ref, prompt, *, seed=0, **kwargs) -> torch.Tensor:
    """Runs the diffusers pipeline `ref` with a CPU generator seeded `seed`, as generate() draws;
    uint8 [B, H, W, 3], rounded as diffusers' numpy_to_pil rounds."""
    out = ref(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images
    return torch.from_numpy((out * 255).round().astype(np.uint8))


def assert_same_image(ours, expected):
    assert ours.shape == expected.shape and ours.dtype == torch.uint8
    # Random weights saturate easily; make sure the comparison is about real pixel values.
    assert ((expected > 0) & (expected < 255)).float().mean() > 0.2, "reference image is saturated"
    assert (ours.int() - expected.int()).abs().max() <= 2


@pytest.fixture
def server():
    """server(*script) starts a ScriptedVLM on 127.0.0.1; all are closed after the test."""
    servers = []
    yield lambda *script: servers.append(ScriptedVLM(script)) or servers[-1]
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """At the tests' tiny sizes one intra-op thread is faster than two, and far faster on a busy
    machine, where two spinning threads can make a 16x16 image take seconds. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
