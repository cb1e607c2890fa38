"""--preview-decoder: which decoder makes VL-DNP's x0 previews (vlm/preview.py). The TAESD previews are
checked against diffusers' AutoencoderTiny decoding the same x0; the choice reaches the hook, the trace,
the PNG text and evaluate.py's records; a decoder that cannot be had is one line before the model loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

import evaluate
import generate
from checkpoint.tensors import CheckpointError
from helpers import hub_cache, randomize_, tiny_reference_decode
from methods.vldnp import DynamicNegatives
from png_reader import read_png
from sampler.loop import generate as sample
from vlm.base import Reply
from vlm.proposers import make_preview
from vlm.trace import trace_dict
from vlm.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
RUN = ["a person on a beach", "--steps", "3", "--height", "16", "--width", "16", "--seed", "3", "--device", "cpu",
       "--quiet"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref():
    """A small AutoencoderTiny at the test VAE's 2x scale (two stages), with a scaling factor, so that
    a decoder that skipped it would show."""
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), scaling_factor=0.7)
    return randomize_(tiny, 5).eval()


@pytest.fixture(scope="module")
def taesd(ref, tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd") / "tiny"
    ref.save_pretrained(folder)
    return folder


class Recorder:
    """A proposer that keeps the images it is shown and finds feet; `scale` makes it look at a
    scaled-down image (vlm/base.py's input_scale), as CLIP does."""

    def __init__(self, scale=None):
        self.images = []
        if scale is not None:
            self.input_scale = lambda height, width: scale

    def __call__(self, image, prompt, step):
        self.images.append(image)
        return Reply(["feet"], "feet")


def previews(pipe, preview, scale=None):
    """(images the proposer saw at step 1, x0 at step 1, the hook)."""
    x0 = []
    proposer = Recorder(scale)
    hook = DynamicNegatives(proposer, get_task("nudity"), [1], preview=preview)
    keep = lambda state: x0.append(state.x0.clone()) if state.i == 1 else None
    sample(pipe, "a cat", steps=3, height=16, width=16, seed=1, hooks=[keep, hook], progress=False)
    hook.close()
    return torch.stack(proposer.images), x0[0], hook


@pytest.mark.parametrize("scale, k", [(None, 1), (0.5, 2)])
def test_taesd_previews_are_autoencoder_tinys_decode_of_x0(pipe, ref, taesd, scale, k):
    seen, x0, hook = previews(pipe, make_preview(str(taesd)), scale)
    expected = tiny_reference_decode(ref, F.avg_pool2d(x0, k) if k > 1 else x0)  # [1, 3, 16/k, 16/k]
    assert seen.shape == expected.shape == (1, 3, 16 // k, 16 // k)
    assert (seen - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert hook.decode_factor == k and trace_dict(hook)["preview_decoder"] == str(taesd)


def test_taesd_previews_differ_from_the_vaes(pipe, taesd):
    vae, x0, hook = previews(pipe, None)
    assert torch.equal(vae, pipe.vae.decode(x0).float())  # the paper's: the model's own VAE
    assert trace_dict(hook)["preview_decoder"] == "vae"
    tiny, x0_again, _ = previews(pipe, make_preview(str(taesd)))
    assert torch.equal(x0, x0_again)  # the same x0, decoded two ways
    assert (tiny - vae).abs().mean() > 0.05 * vae.abs().mean()


def run_generate(capsys, *argv):
    code = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_generate_traces_and_labels_the_preview_decoder(sd1, taesd, tmp_path, capsys, server):
    frames = {}
    for name, flags in [("vae", []), ("taesd", ["--preview-decoder", taesd])]:
        vlm = server("none", "I can see feet.")
        trace = tmp_path / f"{name}.json"
        code, _, err = run_generate(capsys, *RUN, "--model", sd1, "--vlm-url", vlm.url, "--vlm-steps", "1", *flags,
                                    "--trace", trace, "--out", tmp_path / f"{name}.png")
        assert code == 0 and err == [], err
        data = json.loads(trace.read_text())
        label = str(taesd) if flags else "vae"
        assert data["preview_decoder"] == label and data["decode_factor"] == 1
        assert f"VL-DNP previews: {label}" in read_png(tmp_path / f"{name}.png")[1]["parameters"]
        frames[name] = read_png(tmp_path / data["filmstrip"])[0]
    assert frames["vae"].shape == frames["taesd"].shape and not torch.equal(frames["vae"], frames["taesd"])

    # nothing decoded, nothing named: no query steps; and the static baseline, which never looks, refuses one
    vlm = server("none")
    code, _, err = run_generate(capsys, *RUN, "--model", sd1, "--vlm-url", vlm.url, "--vlm-steps", "none",
                                "--preview-decoder", taesd, "--trace", tmp_path / "none.json",
                                "--out", tmp_path / "none.png")
    assert code == 0 and json.loads((tmp_path / "none.json").read_text())["preview_decoder"] is None, err
    assert "VL-DNP previews" not in read_png(tmp_path / "none.png")[1]["parameters"]
    code, _, err = run_generate(capsys, *RUN, "--model", sd1, "--proposer", "static", "--preview-decoder", taesd,
                                "--out", tmp_path / "static.png")
    assert code == 2 and err == ["error: --preview-decoder: no method of this run reads it (static); leave it out or "
                                 "choose a method that does"]


@pytest.mark.parametrize("bad, message", [
    ("no-such-taesd", "no such file or folder"),
    ("notes.txt", "not a .safetensors file"),
    ("vae.safetensors", "not TAESD"),  # the SD VAE's weights
    ("sd-folder", "a whole pipeline folder"),
])
def test_a_bad_preview_decoder_is_one_line_before_the_model_loads(sd1, tmp_path, capsys, bad, message):
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "vae.safetensors").write_bytes((sd1 / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    (tmp_path / "sd-folder").symlink_to(sd1)
    empty = tmp_path / "empty-model"  # loading it would fail with another message
    empty.mkdir()
    code, out, err = run_generate(capsys, *RUN, "--model", empty, "--preview-decoder", tmp_path / bad,
                                  "--out", tmp_path / "x.png")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --preview-decoder {tmp_path / bad}"), err
    assert message in err[0]
    assert not (tmp_path / "x.png").exists()


def _generate_offline(home: Path, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=home)


def test_taesd_offline_uncached_is_one_line_naming_vae_and_the_default_needs_no_taesd(tmp_path, server):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = _generate_offline(tmp_path, *RUN, "--model", empty, "--preview-decoder", "taesd", "--out", tmp_path / "x")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --preview-decoder taesd: ") and "madebyollin/taesd" in lines[0]
    assert "--preview-decoder vae" in lines[0]
    # the default decodes with the model's VAE: it gets as far as the model, whatever the TAESD cache holds
    result = _generate_offline(tmp_path, *RUN, "--model", empty, "--vlm-url", server("none").url,
                               "--out", tmp_path / "x")
    assert result.returncode == 2 and "not a Stable Diffusion checkpoint folder" in result.stderr
    assert "--preview-decoder" not in result.stderr and "madebyollin" not in result.stderr


def test_taesd_is_read_from_the_hub_cache_offline(sd1, taesd, tmp_path, server):
    hub_cache(tmp_path / "home", "madebyollin/taesd", taesd)
    vlm = server("none", "I can see feet.")
    result = _generate_offline(tmp_path / "home", *RUN, "--model", sd1, "--vlm-url", vlm.url, "--vlm-steps", "1",
                               "--preview-decoder", "taesd", "--trace", tmp_path / "t.json", "--out", tmp_path / "x")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "t.json").read_text())["preview_decoder"] == "taesd (madebyollin/taesd)"


def test_make_preview_errors_name_the_flag_and_the_way_out(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match=r"^--preview-decoder .*--preview-decoder vae"):
        make_preview(str(tmp_path / "weights.safetensors"))
    assert make_preview("vae") is None


def test_evaluate_takes_the_preview_decoder(sd1, taesd, tmp_path, capsys, server):
    vlm = server("none", "I can see feet.")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,evaluation_seed\na person on a beach,5\n")
    out = tmp_path / "run"
    code = evaluate.main([str(a) for a in [csv, "--out", out, "--model", sd1, "--steps", "2", "--height", "16",
                                           "--width", "16", "--device", "cpu", "--quiet", "--methods", "vldnp",
                                           "--vlm-url", vlm.url, "--vlm-steps", "1", "--metrics", "none",
                                           "--no-report", "--preview-decoder", taesd]])
    err = capsys.readouterr().err
    assert code == 0, err
    (record,) = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["negatives"][0]["negative"] == "Nudity, Sexual, feet."
    assert f"VL-DNP previews: {taesd}" in read_png(out / record["image"])[1]["parameters"]
    (method,) = json.loads((out / "run.json").read_text())["settings"]["methods"]
    assert method["preview_decoder"] == str(taesd)

    code = evaluate.main([str(a) for a in [csv, "--out", tmp_path / "bad", "--model", sd1, "--methods", "vldnp",
                                           "--vlm-url", vlm.url, "--preview-decoder", tmp_path / "nothing-here"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --preview-decoder"), err


def test_the_cost_benchmark_keeps_the_papers_query_density():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vldnp_cost import paper_density_steps
    from methods.vldnp import PAPER_STEPS

    assert paper_density_steps(50) == list(PAPER_STEPS)
    assert paper_density_steps(10) == [1, 8] and paper_density_steps(5) == [1]  # one query per 5 steps
    assert paper_density_steps(25) == [3, 5, 8, 14, 21]


def test_taesd_and_taesdxl_each_decode_their_own_familys_latents(sd1, sdxl, taesd, tmp_path, server):
    """The two TAESDs are the same network for different latent spaces: the hub name says which, and
    a mismatch is one line and exit 2 after the model loads, with nothing written."""
    home = tmp_path / "home"
    hub_cache(home, "madebyollin/taesd", taesd)
    hub_cache(home, "madebyollin/taesdxl", taesd)  # any TAESD weights; what is checked is the name
    vlm = server("none", "I can see feet.", "none", "I can see feet.")
    common = [*RUN, "--vlm-url", vlm.url, "--vlm-steps", "1"]
    result = _generate_offline(home, *common, "--model", sdxl, "--preview-decoder", "taesdxl", "--trace",
                               tmp_path / "t.json", "--out", tmp_path / "xl")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "t.json").read_text())["preview_decoder"] == "taesdxl (madebyollin/taesdxl)"
    for model, choice, family in [(sdxl, "taesd", "sdxl"), (sd1, "taesdxl", "sd1")]:
        out = tmp_path / f"{choice}-on-{family}"
        result = _generate_offline(home, *common, "--model", model, "--preview-decoder", choice, "--out", out)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: --preview-decoder: {choice} (madebyollin/{choice}) decodes ")
        assert f"this is an {family} model" in lines[0] and not out.exists()


def test_evaluate_refuses_a_taesd_of_another_family_before_any_image(sdxl, taesd, tmp_path, capsys, server):
    hub = tmp_path / "home"
    hub_cache(hub, "madebyollin/taesd", taesd)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,evaluation_seed\na person on a beach,5\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(hub), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, [
        csv, "--out", tmp_path / "run", "--model", sdxl, "--steps", "2", "--height", "16", "--width", "16",
        "--device", "cpu", "--quiet", "--methods", "vldnp", "--vlm-url", server("none").url, "--vlm-steps", "1",
        "--metrics", "none", "--no-report", "--preview-decoder", "taesd"])], env=env, capture_output=True, text=True,
        timeout=300, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "this is an sdxl model" in lines[0], result.stderr
    assert not list((tmp_path / "run").glob("**/*.png"))
