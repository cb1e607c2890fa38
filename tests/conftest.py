"""Fixtures shared by the tests: the random-weight checkpoints (one per kind, made once per session), a
scripted VLM server, a fixed torch seed, one CPU thread. Plain helper functions live in helpers.py."""
import pytest
import torch

from checkpoints import make_sd_folder
from fake_vlm import ScriptedVLM


@pytest.fixture(scope="session")
def sd1(tmp_path_factory):
    """A small random-weight SD 1.x diffusers folder, as the hub holds one."""
    return make_sd_folder(tmp_path_factory.mktemp("sd1") / "sd1", "sd1")


@pytest.fixture
def server():
    """server(*script, host="127.0.0.1") starts a ScriptedVLM; all are closed after the test."""
    servers = []
    yield lambda *script, **kwargs: servers.append(ScriptedVLM(script, **kwargs)) or servers[-1]
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
