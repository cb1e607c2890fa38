"""Fixtures shared by the tests: the random-weight checkpoints (one per kind, made once per session), a
scripted VLM server, a fixed torch seed, one CPU thread. Plain helper functions live in helpers.py."""
import pytest
import torch

from checkpoints import make_clip_folder, make_clip_reference, make_sd_folder, make_sdxl_folder
from fake_vlm import ScriptedVLM


@pytest.fixture(scope="session")
def sd1(tmp_path_factory):
    """A small random-weight SD 1.x diffusers folder, as the hub holds one."""
    return make_sd_folder(tmp_path_factory.mktemp("sd1") / "sd1", "sd1")


@pytest.fixture(scope="session")
def sd1_file(sd1, tmp_path_factory):
    """`sd1` exported as an original single file (Stability's key names), as most fine-tunes are shared."""
    from weights import export_single_file
    return export_single_file(sd1, tmp_path_factory.mktemp("sd1-file") / "tiny-sd1.safetensors")


@pytest.fixture(scope="session")
def sd2v(tmp_path_factory):
    """A small random-weight SD 2.x v-prediction folder (as SD 2.x 768-v); its scheduler config states
    timestep_spacing "leading"."""
    return make_sd_folder(tmp_path_factory.mktemp("sd2v") / "sd2v", "sd2", seed=3, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def pipe(sd1):
    """`sd1` loaded by weights.load_pipeline, once per test module (a module's tests may change it)."""
    import weights
    return weights.load_pipeline(sd1)


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    """A small random-weight SDXL diffusers folder, written by StableDiffusionXLPipeline.save_pretrained."""
    return make_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def sdxl_file(sdxl, tmp_path_factory):
    """`sdxl` exported as an original single file (Stability's sgm key names)."""
    from weights import export_single_file
    return export_single_file(sdxl, tmp_path_factory.mktemp("sdxl-file") / "sdxl.safetensors")


@pytest.fixture(scope="session")
def sdxl_pair(sdxl):
    """`sdxl` loaded by weights.load_pipeline and by diffusers' StableDiffusionXLPipeline: (ours, ref)."""
    from diffusers import StableDiffusionXLPipeline
    from weights import load_pipeline
    return load_pipeline(sdxl), StableDiffusionXLPipeline.from_pretrained(sdxl)


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A small random-weight two-tower CLIPModel folder, for the CLIP proposer and the CLIP score."""
    return make_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="session")
def clip_reference(tmp_path_factory):
    """A small random-weight CLIPModel folder and the transformers model it holds: (folder, model)."""
    return make_clip_reference(tmp_path_factory.mktemp("clip-reference"))


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
