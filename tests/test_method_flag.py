"""generate.py --method NAME: one image as evaluate.py's method NAME makes it, its PNG naming the method,
and the flags it conflicts with refused in one line (exit 2). Random-weight SD1 checkpoint."""
import json

import pytest
import torch

import evaluate
import generate
from helpers import run
from methods import METHODS
from png import read_png

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--steps", "3", "--height", "16", "--width", "16", "--device", "cpu", "--quiet"]
PROMPT = "a person on a beach at sunset"


NAMES = ["sd", "negative", "static", "sld-weak", "sld-medium", "sld-strong", "sld-max", "safree"]  # all but vldnp


def test_the_names_are_evaluates_methods():
    assert list(METHODS) == ["sd", "negative", "static", "vldnp", "sld", "safree", "dng"]


@pytest.fixture(scope="module")
def evaluated(sd1, tmp_path_factory):
    """One evaluate.py run over every method but vldnp, DPM-Solver++, prompt case 4 with seed 11."""
    folder = tmp_path_factory.mktemp("eval")
    csv = folder / "p.csv"
    csv.write_text(f"case_number,prompt,evaluation_seed,evaluation_guidance\n4,{PROMPT},11,6\n")
    code = evaluate.main([str(csv), "--out", str(folder / "run"), "--model", str(sd1), *SMALL[:6],
                          "--methods", "sd,negative,static,sld,safree", "--negative-scale", "5", "--metrics", "none",
                          "--no-report", "--device", "cpu", "--quiet"])
    assert code == 0
    return folder / "run" / "images"


@pytest.mark.parametrize("method, key", [
    (["--method", "sd"], "sd"), (["--method", "negative"], "negative"),
    (["--method", "static", "--negative-scale", 5], "static_w5"),
    (["--proposer", "static", "--negative-scale", 5], "static_w5"),  # "static" has one meaning
    (["--method", "sld-weak"], "sld-weak"), (["--method", "sld-max"], "sld-max"), (["--method", "safree"], "safree")])
def test_the_image_is_evaluates(sd1, evaluated, tmp_path, capsys, method, key):
    out = tmp_path / "x.png"
    code, _, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, *method, "--sampler", "dpm++2m", "--seed",
                       11, "--guidance", 6, "--out", out)
    assert code == 0, err
    ours, text = read_png(out)
    theirs, their_text = read_png(evaluated / f"4_{key}.png")
    assert torch.equal(ours, theirs)
    without_model = lambda t: [kv for kv in t["parameters"].splitlines()[-1].split(", ") if not kv.startswith("Model:")]
    assert f"Method: {key.split('_')[0]}" in without_model(text) and without_model(text) == without_model(their_text)
    assert text["parameters"].splitlines()[:-1] == their_text["parameters"].splitlines()[:-1]  # prompt, negative


def test_each_method_names_itself(sd1, tmp_path, capsys):
    """Every method makes an image whose PNG says which; the guarded ones say with what."""
    seen = {}
    for method in NAMES:
        out = tmp_path / f"{method}.png"
        code, _, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, "--method", method, "--seed", 1,
                           "--out", out)
        assert code == 0, (method, err)
        pixels, text = read_png(out)
        lines = text["parameters"].splitlines()
        assert f"Method: {method}," in lines[-1] + ","
        seen[method] = pixels
        negative = [line for line in lines if line.startswith("Negative prompt: ")]
        assert bool(negative) == (method in ("negative", "safree")), method
    assert "Static negative: \"Sexual Acts, " in read_png(tmp_path / "static.png")[1]["parameters"]
    assert "SLD: max" in read_png(tmp_path / "sld-max.png")[1]["parameters"]
    safree_text = read_png(tmp_path / "safree.png")[1]["parameters"]
    assert "SAFREE: nudity" in safree_text and "SAFREE t*: " in safree_text and "SAFREE triggers: " in safree_text
    assert not torch.equal(seen["sd"], seen["safree"]) and not torch.equal(seen["sd"], seen["negative"])


def test_vldnp_with_a_vlm(sd1, server, tmp_path, capsys):
    vlm = server("none", "feet")  # the first answers the check before loading
    out = tmp_path / "v.png"
    code, _, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, "--method", "vldnp", "--vlm-url", vlm.url,
                       "--vlm-steps", "1", "--out", out)
    assert code == 0, err
    settings = read_png(out)[1]["parameters"].splitlines()[-1]
    assert "Method: vldnp" in settings and "VL-DNP: vlm nudity" in settings


def test_safree_concepts(sd1, tmp_path, capsys):
    out = tmp_path / "s.png"
    code, _, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, "--method", "safree", "--safree-concepts",
                       "beach, sunset", "--out", out)
    assert code == 0, err
    text = read_png(out)[1]["parameters"]
    assert "Negative prompt: beach, sunset\n" in text and "SAFREE: custom" in text


@pytest.mark.parametrize("argv, message", [
    (["--method", "sd", "--proposer", "clip"], "--proposer: no method of this run reads it (sd)"),
    (["--method", "safree", "--proposer", "auto"], "--proposer: no method of this run reads it (safree)"),
    (["--method", "vldnp", "--proposer", "static"], "--proposer static conflicts with --method vldnp, which asks"),
    (["--method", "sld-max", "--negative-prompt", "x"], "--negative-prompt: no method of this run reads it (sld)"),
    (["--safree-concepts", "a, b"], "--safree-concepts: no method of this run reads it (vldnp)"),
    (["--method", "negative", "--safree-concepts", "a"], "--safree-concepts: no method of this run reads it"),
    (["--method", "negative", "--trace", "t.json"], "--trace: no method of this run reads it (negative)"),
    (["--method", "sd", "--vlm-url", "http://localhost:8000/v1"], "--vlm-url: no method of this run reads it"),
    (["--method", "safree", "--safree-concepts", " ,"], "--safree-concepts: no concepts in ' ,'"),
    (["--method", "sld"], "--method sld makes 4 images (sld-weak, sld-medium, sld-strong, sld-max)"),
    (["--method", "vldnp", "--negative-scale", "1,2"], "--method vldnp makes 2 images (vldnp_w1, vldnp_w2)"),
    (["--method", "esd"], "unknown method 'esd'"),
    (["--method", "sld-mild"], "unknown SLD preset 'mild'"),
])
def test_conflicts_are_one_line(sd1, capsys, argv, message):
    code, out, err = run(generate.main, capsys, "a cat", "--model", sd1, *SMALL, *argv)
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_without_method_the_flags_decide_as_before(sd1, tmp_path, capsys):
    """--proposer none and --negative-prompt still make plain SD with a classic negative: method sd."""
    out = tmp_path / "n.png"
    code, _, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, "--proposer", "none", "--negative-prompt",
                       "blurry", "--seed", 1, "--out", out)
    assert code == 0, err
    text = read_png(out)[1]["parameters"]
    assert "Method: sd" in text and "Negative prompt: blurry\n" in text
    same = tmp_path / "m.png"
    code, _, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, "--method", "negative",
                       "--negative-prompt", "blurry", "--seed", 1, "--out", same)
    assert code == 0, err
    assert torch.equal(read_png(same)[0], read_png(out)[0])


def test_evaluate_safree_concepts(sd1, tmp_path, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text(f"case_number,prompt,evaluation_seed\n1,{PROMPT},2\n")
    argv = [str(csv), "--out", str(tmp_path / "run"), "--model", str(sd1), *SMALL[:6], "--metrics", "none",
            "--no-report", "--device", "cpu", "--quiet"]
    assert evaluate.main([*argv, "--methods", "sd", "--safree-concepts", "beach"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --safree-concepts: no method of this run reads it (sd); leave it out or choose a method "
                   "that does"]
    assert evaluate.main([*argv, "--methods", "safree", "--safree-concepts", " , "]) == 2
    assert capsys.readouterr().err.startswith("error: --safree-concepts: no concepts in ' , '")
    assert evaluate.main([*argv, "--methods", "safree", "--safree-concepts", "beach, sunset"]) == 0
    text = read_png(tmp_path / "run" / "images" / "1_safree.png")[1]["parameters"]
    assert "Negative prompt: beach, sunset\n" in text and "Method: safree" in text and "SAFREE: custom" in text
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["methods"]
    assert settings == [{"method": "safree", "concept_set": "custom", "concepts": ["beach", "sunset"]}]
    record = json.loads((tmp_path / "run" / "records.jsonl").read_text().splitlines()[0])
    assert set(record["negatives"][0]["safree"]) == {"triggers", "tokens", "beta", "t*"}


def test_safree_refuses_sdxl_in_one_line(sdxl, tmp_path, capsys):
    code, out, err = run(generate.main, capsys, "a cat", "--model", sdxl, *SMALL, "--method", "safree", "--out",
                         tmp_path / "x.png")
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert err == ["error: SAFREE is implemented for SD 1.x and 2.x (one CLIP text encoder), not sdxl"]
