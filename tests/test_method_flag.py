"""generate.py --method NAME: one image as evaluate.py's method NAME makes it, its PNG naming the method,
and the flags it conflicts with refused in one line (exit 2). Random-weight SD1 checkpoint; on the SDXL one,
VL-DNP with each proposer (static, CLIP, a VLM server), its hook, trace and filmstrip, the classic negative
and Safe Latent Diffusion, and SAFREE refused in one line."""
import json

import pytest
import torch

import evaluate
import generate
from helpers import parameters, pixels, run
from methods import METHODS
from png_reader import read_png
from vlm.tasks import get_task

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


@pytest.mark.parametrize("method", ["sld-max", "negative", "safree"])
@pytest.mark.parametrize("guidance", ["1", "0.5", "0"])
def test_a_guard_that_acts_through_the_unconditional_branch_refuses_a_guidance_that_skips_it(sd1, capsys, tmp_path,
                                                                                             method, guidance):
    """At g <= 1 there is no unconditional branch (ε = ε_c, as diffusers): SLD, a classic negative and
    SAFREE's would be off, in an image whose PNG names them."""
    code, out, err = run(generate.main, capsys, "a cat", "--model", sd1, *SMALL, "--method", method,
                         "--guidance", guidance, "--out", tmp_path / "x.png")
    assert code == 2 and out == [] and not (tmp_path / "x.png").exists(), err
    assert err == [f"error: --guidance {float(guidance)}: must be above 1 for {method.removesuffix('-max')} (a guard "
                   "that acts through the unconditional branch, which g <= 1 skips, as in diffusers)"], err
    (tmp_path / "p.csv").write_text("prompt\na cat\n")
    code, out, err = run(evaluate.main, capsys, tmp_path / "p.csv", "--out", tmp_path / "run", "--model", sd1,
                         *SMALL[:6], "--methods", method, "--guidance", guidance, "--metrics", "none", "--quiet")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --guidance {float(guidance)}: must be above 1"), err


def test_evaluate_fails_the_rows_whose_guidance_skips_the_guard(sd1, capsys, tmp_path):
    """A prompt file's own CFG scale of 1 or less: those rows' images fail, the others are made."""
    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt,evaluation_guidance\n1,a cat,1\n2,a dog,6\n")
    code, _, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", sd1, *SMALL[:6],
                       "--methods", "sd,sld,negative,safree", "--sld-presets", "max", "--metrics", "none",
                       "--no-report", "--quiet")
    records = {r["key"]: r for r in map(json.loads, (tmp_path / "run" / "records.jsonl").read_text().splitlines())}
    assert code == 1 and {k for k, r in records.items() if r["status"] != "ok"} == {
        "1_sld-max", "1_negative", "1_safree"}, err
    assert "needs a CFG scale above 1" in records["1_sld-max"]["error"]
    assert not (tmp_path / "run" / "images" / "1_sld-max.png").exists()


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


# ---------------------------------------------------------------- SDXL

RUN = ["a person on a beach", "--steps", "4", "--height", "32", "--width", "32", "--seed", "3", "--device", "cpu",
       "--quiet"]


@pytest.fixture(scope="module")
def plain(sdxl, tmp_path_factory):
    """generate.py's plain SDXL image at RUN's settings."""
    out = tmp_path_factory.mktemp("plain") / "plain.png"
    assert generate.main([*RUN, "--model", str(sdxl), "--proposer", "none", "--out", str(out)]) == 0
    return out


def test_clip_proposer_on_sdxl_hook_trace_and_filmstrip(sdxl, clip_folder, plain, tmp_path, capsys):
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


def test_sld_method_on_sdxl_says_so(sdxl, plain, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, *RUN, "--model", sdxl, "--method", "sld-max", "--out",
                       tmp_path / "sld.png")
    assert code == 0, err
    text = parameters(tmp_path / "sld.png")
    assert "Method: sld-max" in text and "SLD: max" in text and "Model: sdxl" in text
    assert (pixels(tmp_path / "sld.png").int() - pixels(plain).int()).abs().max() > 2
