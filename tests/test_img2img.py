"""img2img (sampler/edit.py) against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionXLImg2ImgPipeline on random-weight SD1, SD2-v and SDXL folders, for every sampler:
the same timesteps, the same draws, the same image for a seed. Then generate.py --init-image and the
bad input it refuses in one line, every method on an edit, and evaluate.py's init_image column."""
import json
import os
import threading

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

import evaluate
import generate
import png
import png_reader
from checkpoints import NORMALISED_VAE
from helpers import (assert_same_image, box_mask, inflating_png, picture, pipeline_images, reference_pipeline,
                     run, scheduler_classes, to_pil, with_settings)
from sampler.base import SAMPLERS
from sampler.edit import first_step, mask_from_image
from sampler.loop import generate as sample
from sampler.schedule import SchedulerConfig
from weights import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLER_NAMES = list(scheduler_classes())


def reference(cls, folder, sampler, prompt, image, *, steps, strength, guidance_scale=7.5, seed=0, **kwargs):
    return pipeline_images(reference_pipeline(cls, folder, sampler), prompt, seed=seed, image=to_pil(image),
                           strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale, **kwargs)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_the_chain_takes_diffusers_timesteps(sampler, spacing):
    """diffusers' get_timesteps: ⌊N·s⌋ steps, the last ones of the N-step layout."""
    config = SchedulerConfig(timestep_spacing=spacing)
    for steps, strength in [(10, 0.5), (7, 0.3), (50, 0.75), (4, 1.0), (3, 0.34), (25, 0.999)]:
        ref = scheduler_classes()[sampler](beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           steps_offset=1, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        start = first_step(steps, strength)
        expected = ref.timesteps[start * ref.order:]
        ours = SAMPLERS[sampler](config, steps, start).timesteps
        assert len(ours) == int(steps * strength) and torch.equal(ours.to(expected.dtype), expected)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_sd1_matches_diffusers(sd1, sampler):
    image = picture(24, 32)
    ours = sample(load_pipeline(sd1), "a watercolor cat", steps=5, init_image=image, strength=0.6, sampler=sampler,
                  progress=False)
    assert_same_image(ours, reference(StableDiffusionImg2ImgPipeline, sd1, sampler, "a watercolor cat", image,
                                      steps=5, strength=0.6))


def test_sd1_batch_negative_eta_and_full_strength_match_diffusers(sd1):
    """One image for two prompts x 2: diffusers encodes it once and repeats its latents."""
    image, pipe = picture(32, 24, seed=1), load_pipeline(sd1)
    kw = dict(negative_prompt=["blurry", "dark"], steps=6, guidance_scale=5.0, seed=3)
    ours = sample(pipe, ["a red house", "a boat"], **kw, batch=2, init_image=image, strength=0.7, eta=0.5,
                  progress=False)
    ref = reference_pipeline(StableDiffusionImg2ImgPipeline, sd1, "ddim")
    expected = pipeline_images(ref, ["a red house", "a boat"], seed=3, image=to_pil(image), strength=0.7,
                               negative_prompt=["blurry", "dark"], num_inference_steps=6, guidance_scale=5.0,
                               num_images_per_prompt=2, eta=0.5)
    assert_same_image(ours, expected)
    # strength 1: the image noised to the first step (not pure noise, as text to image would start)
    ours = sample(pipe, "a red house", steps=4, init_image=image, strength=1.0, sampler="euler-a", progress=False)
    assert_same_image(ours, reference(StableDiffusionImg2ImgPipeline, sd1, "euler-a", "a red house", image, steps=4,
                                      strength=1.0))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_sd2_v_prediction_matches_diffusers(sd2v, sampler):
    image = picture(32, 32, seed=2)
    ours = sample(load_pipeline(sd2v), "a mountain lake", steps=5, init_image=image, strength=0.8, sampler=sampler,
                  progress=False)
    assert_same_image(ours, reference(StableDiffusionImg2ImgPipeline, sd2v, sampler, "a mountain lake", image,
                                      steps=5, strength=0.8))


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_sdxl_matches_diffusers(sdxl, sampler):
    """SDXL's VAE encodes in fp32 as diffusers' force_upcast; its size ids are the image's."""
    image = picture(32, 24, seed=4)
    ours = sample(load_pipeline(sdxl), "a castle", steps=5, init_image=image, strength=0.6, sampler=sampler,
                  progress=False)
    assert_same_image(ours, reference(StableDiffusionXLImg2ImgPipeline, sdxl, sampler, "a castle", image, steps=5,
                                      strength=0.6))


def test_sdxl_with_a_normalised_vae_matches_diffusers(sdxl, tmp_path):
    """A VAE config with latents_mean and latents_std (Playground v2.5's): StableDiffusionXLImg2ImgPipeline
    encodes the image to (z − mean)·scaling_factor/std, and decodes back."""
    folder, image = with_settings(sdxl, tmp_path, "vae/config.json", **NORMALISED_VAE), picture(32, 24, seed=4)
    ours = sample(load_pipeline(folder), "a castle", steps=5, init_image=image, strength=0.6, progress=False)
    assert_same_image(ours, reference(StableDiffusionXLImg2ImgPipeline, folder, "ddim", "a castle", image, steps=5,
                                      strength=0.6))


def test_the_edit_starts_from_the_image(sd1):
    """A small strength keeps the image's layout: the edit is nearer its image than another image's edit."""
    pipe, a, b = load_pipeline(sd1), picture(32, 32, seed=5), picture(32, 32, seed=6).flip(1)
    edit = lambda image: sample(pipe, "a cat", steps=10, init_image=image, strength=0.3, progress=False)[0].float()
    assert (edit(a) - a.float()).abs().mean() < (edit(b) - a.float()).abs().mean()


@pytest.mark.parametrize("kwargs,message", [
    (dict(strength=0.0), "strength 0: must be more than 0 and at most 1"),
    (dict(strength=1.5), "strength 1.5: must be more than 0 and at most 1"),
    (dict(strength=0.1), "runs no step of 5"),
    (dict(height=24), "the image is 32x32; the edit has its size"),
])
def test_bad_edits_are_one_line(sd1, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(load_pipeline(sd1), "a cat", steps=5, init_image=picture(32, 32), progress=False, **kwargs)


def test_sizes_and_strength_without_an_image_are_refused(sd1):
    pipe = load_pipeline(sd1)
    with pytest.raises(ValueError, match=f"the image is 32x31; its sides must be multiples of {pipe.vae_scale}"):
        sample(pipe, "a cat", steps=3, init_image=picture(31, 32), progress=False)
    with pytest.raises(ValueError, match="give the image"):
        sample(pipe, "a cat", steps=3, height=16, width=16, strength=0.5, progress=False)


# ---------------------------------------------------------------------------------------------
# generate.py --init-image

FAST = ["--steps", "4", "--device", "cpu", "--proposer", "none", "--quiet", "--seed", "7"]


def test_generate_py_edits_an_image(sd1, tmp_path, capsys):
    image = picture(24, 32, seed=8)
    png.write_png(tmp_path / "in.png", image)
    code, out, err = run(generate.main, capsys, "a cat", "--model", sd1, *FAST, "--init-image", tmp_path / "in.png",
                         "--strength", "0.75", "--out", tmp_path / "edit")
    assert code == 0, err
    written, text = png_reader.read_png(tmp_path / "edit.png")
    expected = sample(load_pipeline(sd1), "a cat", steps=4, seed=7, init_image=image, strength=0.75, progress=False)
    assert torch.equal(written, expected[0])
    assert "Denoising strength: 0.75" in text["parameters"] and "Size: 32x24" in text["parameters"]


@pytest.mark.parametrize("args,message", [
    (["--strength", "0"], "--strength 0.0: must be more than 0 and at most 1"),
    (["--strength", "1.01"], "--strength 1.01: must be more than 0 and at most 1"),
    (["--strength", "0.2"], "--strength 0.2 runs no step of 4"),
    (["--height", "32"], "in.png: the image is 32x24; the edit has its size (leave out the height and width"),
    (["--init-image", "{tmp}/missing.png"], "missing.png: cannot read it"),
    (["--init-image", "{tmp}/photo.jpg"], "photo.jpg: a JPEG; only PNG images are read"),
    (["--init-image", "{tmp}/odd.png"], "odd.png: the image is 30x24; its sides must be multiples of 8"),
    # smaller than the VAE's scale: resized "e.g. to 0x0" before
    (["--init-image", "{tmp}/dot.png"], "dot.png: the image is 1x1; its sides must be multiples of 8 (the VAE's scale), "
                                        "at least 8: crop or resize it, e.g. to 8x8"),
    (["--init-image", "{tmp}/strip.png"], "strip.png: the image is 20x4; its sides must be multiples of 8 (the VAE's "
                                          "scale), at least 8: crop or resize it, e.g. to 16x8"),
    # what is no file: a named pipe (opened, it waited for a writer for ever), a folder, a device
    (["--init-image", "{tmp}/pipe.png"], "pipe.png: not a regular file"), (["--mask", "{tmp}/pipe.png"], "pipe.png: not"),
    (["--init-image", "{tmp}"], "cannot read it (Is a directory)"),
    (["--init-image", "/dev/null"], "/dev/null: not a regular file"),
])
def test_generate_py_refuses_bad_edits(sd1, tmp_path, capsys, monkeypatch, args, message):
    png.write_png(tmp_path / "in.png", picture(24, 32))
    png.write_png(tmp_path / "odd.png", picture(24, 30))
    png.write_png(tmp_path / "dot.png", picture(1, 1))
    png.write_png(tmp_path / "strip.png", picture(4, 20))
    to_pil(picture(24, 32)).save(tmp_path / "photo.jpg")
    os.mkfifo(tmp_path / "pipe.png")  # a reader still waiting on it after 20 s gets a writer, reads nothing and fails
    writer = threading.Timer(20, lambda: os.close(os.open(tmp_path / "pipe.png", os.O_WRONLY | os.O_NONBLOCK)))
    writer.start()
    monkeypatch.setattr("weights.load_pipeline", lambda *a, **k: pytest.fail("bad input must stop before loading"))
    args = [a.format(tmp=tmp_path) for a in args]
    image = [] if "--init-image" in args else ["--init-image", tmp_path / "in.png"]
    try:
        code, out, err = run(generate.main, capsys, "a cat", "--model", sd1, *FAST, *image, *args)
    finally:
        writer.cancel()
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("flag", ["--strength", "--mask"])
def test_edit_options_need_an_image(sd1, tmp_path, capsys, flag):
    png.write_png(tmp_path / "mask.png", picture(16, 16))
    code, out, err = run(generate.main, capsys, "a cat", "--model", sd1, *FAST, flag, "0.5" if flag == "--strength" else
                         tmp_path / "mask.png")
    assert code == 2 and err == [f"error: {flag} edits an image: give the image with --init-image"]


# ---------------------------------------------------------------------------------------------
# Every method on an edit: the arguments flow through generate(), the steps count the chain's

METHODS = {"sd": [], "negative": [], "static": [], "sld-max": [], "safree": [], "dng": ["--sampler", "euler-a"]}


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_edits_the_image(sd1, tmp_path, capsys, method):
    image = picture(32, 32, seed=5)
    png.write_png(tmp_path / "in.png", image)
    common = ["a person on a beach", "--model", sd1, "--steps", "10", "--device", "cpu", "--quiet", "--seed", "2",
              *METHODS[method]]
    code, _, err = run(generate.main, capsys, *common, "--method", method, "--init-image", tmp_path / "in.png",
                       "--strength", "0.4", "--out", tmp_path / "edit")
    assert code == 0, err
    edited, text = png_reader.read_png(tmp_path / "edit.png")
    assert f"Method: {method}" in text["parameters"] and "Denoising strength: 0.4" in text["parameters"]
    code, _, err = run(generate.main, capsys, *common, "--method", method, "--height", "32", "--width", "32", "--out",
                       tmp_path / "t2i")
    assert code == 0, err
    assert distance(edited, image) < distance(png_reader.read_png(tmp_path / "t2i.png")[0], image)
    if method != "sd":  # the method acted on the edit
        code, _, _ = run(generate.main, capsys, *common, "--method", "sd", "--init-image", tmp_path / "in.png",
                         "--strength", "0.4", "--out", tmp_path / "sd")
        assert code == 0 and not torch.equal(edited, png_reader.read_png(tmp_path / "sd.png")[0])


def test_vldnp_queries_within_the_edit_and_sees_the_edited_image(sd1, tmp_path, capsys, server):
    image = picture(32, 32, seed=5)
    png.write_png(tmp_path / "in.png", image)
    vlm = server("none", "feet", "none")  # the first answers the check before loading
    common = ["a person on a beach", "--model", sd1, "--steps", "10", "--device", "cpu", "--quiet", "--seed", "2",
              "--init-image", tmp_path / "in.png", "--strength", "0.5", "--vlm-url", vlm.url]
    code, _, err = run(generate.main, capsys, *common, "--vlm-steps", "0,3", "--trace", tmp_path / "t.json", "--out",
                       tmp_path / "v")
    assert code == 0, err
    assert "VL-DNP steps: 0 3" in png_reader.read_png(tmp_path / "v.png")[1]["parameters"] and len(vlm.requests) == 3
    code, _, err = run(generate.main, capsys, *common, "--vlm-steps", "2,5")
    assert code == 2 and err == ["error: --vlm-steps count the steps the edit takes, 5 of 10: query steps '2,5': "
                                 "step 5 is out of range for 5 steps (0 to 4)"]


def test_evaluate_refuses_query_steps_past_an_edit_as_generate_does(sd1, tmp_path, capsys, server):
    """A query step the edit never reaches would leave the image unguarded while its PNG and record read
    as if the VLM had looked and seen nothing: evaluate.py refuses it up front, in generate.py's words."""
    png.write_png(tmp_path / "in.png", picture(32, 32, seed=5))
    (tmp_path / "p.csv").write_text("prompt,init_image\na person on a beach,in.png\n")
    argv = [tmp_path / "p.csv", "--out", tmp_path / "run", "--model", sd1, "--steps", "10", "--device", "cpu",
            "--quiet", "--methods", "vldnp", "--metrics", "none", "--no-report", "--vlm-url", server("none").url]
    for more, taken in [(["--strength", "0.5", "--vlm-steps", "2,5"], 5), (["--vlm-steps", "2,9"], 8)]:
        code, _, err = run(evaluate.main, capsys, *argv, *more)
        step = more[-1].split(",")[-1]
        assert code == 2 and err == [f"error: --vlm-steps count the steps the edit takes, {taken} of 10: query steps "
                                     f"'{more[-1]}': step {step} is out of range for {taken} steps (0 to {taken - 1})"]


class Recorder:
    """A proposer that keeps the x0 previews it is shown and finds nothing."""
    needs_image = True

    def __init__(self):
        self.images = []

    def __call__(self, image, prompt, step):
        from vlm.base import Reply
        self.images.append(image)
        return Reply([], "none")


def test_the_x0_previews_show_the_edited_image(sd1):
    """VL-DNP's proposer sees the image being edited (as the random VAE renders its posterior sample,
    the one generate() draws first for seed 0), and the paper's query steps are rescaled to the steps
    the edit takes."""
    from methods.vldnp import VLDNP, default_query_steps
    from sampler.edit import encode
    pipe, image = load_pipeline(sd1), picture(32, 32, seed=5)
    with torch.no_grad():
        latents = encode(pipe, image, torch.Generator().manual_seed(0))
        rendered = ((pipe.vae.decode(latents)[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255)
    previews = {}
    for edit in ({}, {"init_image": image, "strength": 0.04}):  # one step, at t = 1: x0 is near the image
        recorder = Recorder()
        plan = VLDNP(query_steps=(0,), proposer=recorder).plan(pipe, "a cat")
        sample(pipe, plan.prompt, steps=30, height=32, width=32, progress=False, **edit, **plan.arguments)
        plan.finish()
        previews[bool(edit)] = ((recorder.images[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255)
    assert distance(previews[True], rendered) < distance(previews[False], rendered) / 3
    plan = VLDNP(query_steps=tuple(default_query_steps(30)), proposer=Recorder(), paper_steps=True).plan(pipe, "a cat")
    sample(pipe, plan.prompt, steps=30, init_image=image, strength=0.6, progress=False, **plan.arguments)
    plan.finish()
    assert plan.hook.query_steps == default_query_steps(18)


# ---------------------------------------------------------------------------------------------
# evaluate.py: init_image and mask columns

def test_evaluate_edits_the_rows_that_give_an_image(sd1, tmp_path, capsys):
    png.write_png(tmp_path / "a.png", picture(16, 24, seed=1))
    png.write_png(tmp_path / "m.png", box_mask(16, 24))
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not read")
    (tmp_path / "p.csv").write_text("case_number,prompt,evaluation_seed,init_image,mask\n"
                                    "1,a cat,5,a.png,\n2,a dog,6,a.png,m.png\n3,a bird,7,,\n4,a fish,8,gone.png,\n"
                                    "5,a cow,9,,m.png\n6,a fox,10,photo.jpg,\n")
    argv = [tmp_path / "p.csv", "--out", tmp_path / "run", "--model", sd1, "--steps", "4", "--device", "cpu",
            "--quiet", "--methods", "sd,static", "--metrics", "none", "--no-report", "--strength", "0.75"]
    code, _, err = run(evaluate.main, capsys, *argv)
    assert code == 1, err  # the JPEG's jobs failed (exit 1: re-run to retry them); the rest were made
    assert any("line 5: init_image 'gone.png': no such file" in line for line in err)  # bad rows skipped, named
    assert any("line 6: a mask without an init_image to repaint" in line for line in err)
    records = {r["key"]: r for r in map(json.loads, (tmp_path / "run" / "records.jsonl").read_text().splitlines())}
    assert sorted(records) == [f"{case}_{method}" for case in (1, 2, 3, 6) for method in ("sd", "static_w7.5")]
    assert records["6_sd"]["status"] == "failed" and "a JPEG" in records["6_sd"]["error"]  # fails alone
    pipe, image, mask = load_pipeline(sd1), picture(16, 24, seed=1), mask_from_image(box_mask(16, 24))
    edits = {1: dict(init_image=image, strength=0.75), 2: dict(init_image=image, mask=mask, strength=0.75),
             3: dict(height=16, width=16)}
    for case, kwargs in edits.items():
        written, text = png_reader.read_png(tmp_path / "run" / records[f"{case}_sd"]["image"])
        expected = sample(pipe, records[f"{case}_sd"]["prompt"], steps=4, seed=4 + case, sampler="dpm++2m",
                          progress=False, **kwargs)[0]
        assert torch.equal(written, expected)
        assert ("Denoising strength: 0.75" in text["parameters"]) == (case != 3)
    assert records["2_sd"]["mask"].endswith("m.png") and "init_image" not in records["3_sd"]
    # a rerun resumes: the images made are not made again, the failed jobs are retried
    (tmp_path / "photo.jpg").unlink()
    png.write_png(tmp_path / "photo.jpg", picture(16, 24, seed=2))  # a PNG by another name is read
    code, out, err = run(evaluate.main, capsys, *argv)
    assert code == 0 and "8 images (4 prompts x 2 methods): 6 done before, 2 to make" in out, err
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    # fixing the skipped row makes its images; a row that no longer inpaints is made again; the rest is kept
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "images").iterdir()}
    (tmp_path / "p.csv").write_text((tmp_path / "p.csv").read_text().replace("gone.png", "a.png")
                                    .replace("a.png,m.png", "a.png,"))
    code, out, err = run(evaluate.main, capsys, *argv)
    assert code == 0 and "10 images (5 prompts x 2 methods): 6 done before, 4 to make (2 whose row changed)" in out, err
    records = {r["key"]: r for r in map(json.loads, (tmp_path / "run" / "records.jsonl").read_text().splitlines())}
    assert len(records) == 10 and records["4_sd"]["init_image"].endswith("a.png") and records["2_sd"]["mask"] is None
    remade = {p.name for p in (tmp_path / "run" / "images").iterdir() if stamps.get(p.name) != p.stat().st_mtime_ns}
    assert remade == {"2_sd.png", "2_static_w7.5.png", "4_sd.png", "4_static_w7.5.png"}
    # --strength without a row that edits is refused
    (tmp_path / "plain.csv").write_text("prompt\na cat\n")
    code, _, err = run(evaluate.main, capsys, tmp_path / "plain.csv", *argv[1:5], "--strength", "0.5", "--metrics",
                       "none")
    assert code == 2 and err == [f"error: --strength: no row of {tmp_path / 'plain.csv'} edits an image (an "
                                 "init_image column)"], err


def test_evaluate_fails_a_decompression_bomb_alone(sd1, tmp_path, capsys):
    """An init_image whose 16 KB of rows inflate to 16 MiB fails its own job in one line (exit 1, as a
    JPEG does), without inflating it; the rows around it are made."""
    png.write_png(tmp_path / "a.png", picture(16, 16, seed=1))
    inflating_png(tmp_path / "bomb.png", 2**24)
    (tmp_path / "p.csv").write_text("case_number,prompt,evaluation_seed,init_image\n"
                                    "1,a cat,5,a.png\n2,a dog,6,bomb.png\n3,a bird,7,\n")
    code, _, err = run(evaluate.main, capsys, tmp_path / "p.csv", "--out", tmp_path / "run", "--model", sd1, "--steps",
                       "2", "--device", "cpu", "--quiet", "--methods", "sd", "--metrics", "none", "--no-report",
                       "--height", "16", "--width", "16")
    assert code == 1, err
    records = {r["key"]: r for r in map(json.loads, (tmp_path / "run" / "records.jsonl").read_text().splitlines())}
    assert {key: r["status"] for key, r in records.items()} == {"1_sd": "ok", "2_sd": "failed", "3_sd": "ok"}
    assert "inflates past the 16x16 pixels the header gives" in records["2_sd"]["error"]
    assert "\n" not in records["2_sd"]["error"]
