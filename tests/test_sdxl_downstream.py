"""Everything downstream of the loop on SDXL, unchanged: VL-DNP with each proposer (static, CLIP, a VLM
server), its hook, trace and filmstrip; the classic and three-branch negatives; Safe Latent Diffusion,
which diffusers has no SDXL pipeline for, so its rule's invariants; and evaluate.py with every method
but SAFREE, which it refuses in one line. On the small random SDXL folder of tests/checkpoints.py."""
import json

import pytest
import torch

import evaluate
import generate
from helpers import run
from png import read_png
from sampler.loop import generate as sample
from methods.sld import PRESETS, SLD, SafeLatentDiffusion
from vlm.tasks import get_task
from weights import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["a person on a beach", "--steps", "4", "--height", "32", "--width", "32", "--seed", "3", "--device", "cpu",
       "--quiet"]


def pixels(path):
    return read_png(path)[0]


def parameters(path):
    return read_png(path)[1]["parameters"]


@pytest.fixture(scope="module")
def plain(sdxl, tmp_path_factory):
    """generate.py's plain SDXL image at RUN's settings."""
    out = tmp_path_factory.mktemp("plain") / "plain.png"
    assert generate.main([*RUN, "--model", str(sdxl), "--proposer", "none", "--out", str(out)]) == 0
    return out


def test_clip_proposer_hook_trace_and_filmstrip(sdxl, clip_folder, plain, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, *RUN, "--model", sdxl, "--clip-model", clip_folder, "--clip-threshold", 0,
                       "--vlm-steps", "1", "--trace", tmp_path / "t.json", "--out", tmp_path / "clip.png")
    assert code == 0, err
    trace = json.loads((tmp_path / "t.json").read_text())
    (query,) = trace["images"][0]["queries"]
    assert query["error"] is None and query["negative"].startswith("Nudity, Sexual, ") and query["took_effect"] == 1
    assert (tmp_path / trace["filmstrip"]).is_file()
    text = parameters(tmp_path / "clip.png")
    assert "VL-DNP: clip nudity" in text and "Model: sdxl" in text and "Size: 32x32" in text
    assert (pixels(tmp_path / "clip.png").int() - pixels(plain).int()).abs().max() > 2


def test_vlm_proposer_on_sdxl(sdxl, plain, tmp_path, capsys, server):
    vlm = server("none", "I can see feet and a belly.")  # the first answers the check before loading
    code, _, err = run(generate.main, capsys, *RUN, "--model", sdxl, "--vlm-url", vlm.url, "--vlm-steps", "1",
                       "--trace", tmp_path / "t.json", "--out", tmp_path / "vlm.png")
    assert code == 0 and err == [], err
    (query,) = json.loads((tmp_path / "t.json").read_text())["images"][0]["queries"]
    assert query["negative"] == "Nudity, Sexual, feet, belly." and query["took_effect"] == 1
    assert 'Dynamic negative: "Nudity, Sexual, feet, belly."' in parameters(tmp_path / "vlm.png")
    assert (pixels(tmp_path / "vlm.png").int() - pixels(plain).int()).abs().max() > 2


def test_static_and_negative_on_sdxl(sdxl, plain, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, *RUN, "--model", sdxl, "--proposer", "static", "--trace",
                       tmp_path / "s.json", "--out", tmp_path / "static.png")
    assert code == 0, err
    static = get_task("nudity").static_negative
    (query,) = json.loads((tmp_path / "s.json").read_text())["images"][0]["queries"]
    assert query["step"] == 0 and query["negative"] == static
    assert f"Static negative: {json.dumps(static)}" in parameters(tmp_path / "static.png")
    code, _, err = run(generate.main, capsys, *RUN, "--model", sdxl, "--method", "negative", "--out",
                       tmp_path / "negative.png")
    assert code == 0, err
    assert "Method: negative" in parameters(tmp_path / "negative.png")
    images = [pixels(tmp_path / f) for f in ("static.png", "negative.png")] + [pixels(plain)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert (images[a].int() - images[b].int()).abs().max() > 2


def test_the_negative_fits_both_sdxl_tokenizers(sdxl):
    """The task's negative is cut to what the text encoders read: 75 tokens of each SDXL tokenizer."""
    pipe = load_pipeline(sdxl)
    text = get_task("creative").negative([f"item{i} with many words" for i in range(60)], pipe.tokenizer)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert len(tokenizer.encode(text)) <= tokenizer.max_length - 2


def test_sld_rule_invariants_on_sdxl(sdxl):
    """diffusers has no SDXL SLD pipeline, so SLD's rule is checked on SDXL by what it must do: max
    (no warm-up) steers the image from the first step; medium leaves it plain while its 10 warm-up
    steps last, and steers it after; a safety scale of 1 or less is plain classifier-free guidance."""
    import dataclasses

    pipe = load_pipeline(sdxl)

    def image(steps, preset=None):
        rule = {} if preset is None else SLD(preset).plan(pipe, "").arguments
        return sample(pipe, "a person on a beach", steps=steps, height=32, width=32, seed=3, progress=False,
                      **rule).int()

    plain4, plain12 = image(4), image(12)
    assert (image(4, "max") - plain4).abs().max() > 2
    assert (image(4, "medium") - plain4).abs().max() <= 1
    assert (image(12, "medium") - plain12).abs().max() > 0  # steps 10 and 11 only: a small change
    assert (image(4, dataclasses.replace(PRESETS["max"], scale=1.0)) - plain4).abs().max() <= 1
    assert isinstance(SLD("max").plan(pipe, "").arguments["rule"], SafeLatentDiffusion)


def test_sld_method_on_sdxl_says_so(sdxl, plain, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, *RUN, "--model", sdxl, "--method", "sld-max", "--out",
                       tmp_path / "sld.png")
    assert code == 0, err
    text = parameters(tmp_path / "sld.png")
    assert "Method: sld-max" in text and "SLD: max" in text and "Model: sdxl" in text
    assert (pixels(tmp_path / "sld.png").int() - pixels(plain).int()).abs().max() > 2


def csv(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n1,a person on a beach,5,7.5\n")
    return path


EVAL = ["--steps", "3", "--height", "32", "--width", "32", "--device", "cpu", "--quiet", "--metrics", "none"]


def test_evaluate_every_method_but_safree_on_sdxl(sdxl, clip_folder, tmp_path, capsys):
    methods = "sd,negative,static,vldnp,sld-weak,sld-max"
    out = tmp_path / "run"
    code = evaluate.main([str(csv(tmp_path)), "--out", str(out), "--model", str(sdxl), *EVAL, "--methods",
                          "sd,negative,static,vldnp,sld", "--sld-presets", "weak,max",
                          "--clip-model", str(clip_folder), "--clip-threshold", "0", "--vlm-steps", "1"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == sorted(methods.split(","))
    assert all(r["status"] == "ok" for r in records)
    images = {r["method"]: pixels(out / r["image"]).int() for r in records}
    for r in records:
        assert f"Method: {r['method']}" in parameters(out / r["image"]) and "Model: " in parameters(out / r["image"])
    for method in images.keys() - {"sd", "sld-weak"}:
        assert (images[method] - images["sd"]).abs().max() > 2, method
    assert (images["sld-weak"] - images["sd"]).abs().max() <= 1  # its 15 warm-up steps outlast the 3 here


def test_evaluate_refuses_safree_on_sdxl_in_one_line(sdxl, tmp_path, capsys):
    out = tmp_path / "run"
    code = evaluate.main([str(csv(tmp_path)), "--out", str(out), "--model", str(sdxl), *EVAL, "--methods", "sd,safree"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err == ["error: SAFREE is implemented for SD 1.x and 2.x (one CLIP text encoder), not sdxl"], err
    assert not (out / "records.jsonl").exists() and not any((out / "images").iterdir())
