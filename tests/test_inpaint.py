"""Inpainting (sampler/edit.py) against diffusers' StableDiffusionInpaintPipeline and
StableDiffusionXLInpaintPipeline on random-weight folders: 9-channel inpainting UNets (the latents,
the mask and the masked image's latents) and ordinary 4-channel ones (the image blended back outside
the mask after every step), SD1, SD2 and SDXL, every sampler, full and partial strength. Then
loading inpainting models, generate.py --mask, and the bad input refused in one line."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

import generate
import png
import png_reader
from checkpoints import make_sd_folder, make_sdxl_folder
from helpers import (assert_same_image, box_mask, picture, pipeline_images, reference_pipeline, run,
                     scheduler_classes, to_pil)
from sampler.edit import mask_from_image
from sampler.loop import generate as sample
from weights import export_single_file, load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLER_NAMES = list(scheduler_classes())


@pytest.fixture(scope="module")
def sd1_inpainting(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("sd1i") / "sd1-inpainting", "sd1", seed=5, inpainting=True)


@pytest.fixture(scope="module")
def sd2_inpainting(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("sd2i") / "sd2-inpainting", "sd2", seed=6, inpainting=True)


@pytest.fixture(scope="module")
def sdxl_inpainting(tmp_path_factory):
    return make_sdxl_folder(tmp_path_factory.mktemp("sdxli"), seed=7, inpainting=True)


def compare(folder, sampler, *, strength, height=24, width=32, steps=5, prompt="a red apple", seed=0, **kwargs):
    """Our inpainting of a picture against diffusers' on the same folder; the mask is box_mask."""
    image, mask = picture(height, width, seed=seed), box_mask(height, width)
    pipe = load_pipeline(folder)
    ours = sample(pipe, prompt, steps=steps, init_image=image, mask=mask_from_image(mask), strength=strength,
                  sampler=sampler, seed=seed, progress=False, **kwargs)
    cls = StableDiffusionXLInpaintPipeline if pipe.family == "sdxl" else StableDiffusionInpaintPipeline
    ref = reference_pipeline(cls, folder, sampler)
    expected = pipeline_images(ref, prompt, seed=seed, image=to_pil(image), mask_image=to_pil(mask), height=height,
                               width=width, strength=strength, num_inference_steps=steps,
                               **{"num_images_per_prompt" if k == "batch" else k: v for k, v in kwargs.items()})
    assert_same_image(ours, expected)
    return ours


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_sd1_inpainting_model_matches_diffusers(sd1_inpainting, sampler):
    compare(sd1_inpainting, sampler, strength=1.0)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_sd1_ordinary_model_blends_as_diffusers(sd1, sampler):
    compare(sd1, sampler, strength=1.0)


@pytest.mark.parametrize("folder", ["sd1", "sd1_inpainting"])
def test_partial_strength_batch_and_eta_match_diffusers(request, folder):
    """The image's posterior sample, the noise, then the masked image's, then DDIM's noise: in order."""
    compare(request.getfixturevalue(folder), "ddim", strength=0.6, eta=0.7, batch=2, negative_prompt="blurry",
            guidance_scale=5.0, seed=2)


def test_sd2_matches_diffusers(sd2_inpainting, sd2v):
    compare(sd2_inpainting, "dpm++2m", strength=1.0, height=32, width=32)
    compare(sd2v, "euler", strength=0.8, height=32, width=32)


@pytest.mark.parametrize("sampler", ["euler", "euler-a"])
def test_sdxl_matches_diffusers(sdxl_inpainting, sdxl, sampler):
    compare(sdxl_inpainting, sampler, strength=1.0, height=32, width=24)
    compare(sdxl, sampler, strength=0.7, height=32, width=24)


def test_an_inpainting_single_file_loads_and_inpaints_the_same(sd1_inpainting, tmp_path):
    file = export_single_file(sd1_inpainting, tmp_path / "inpainting.safetensors")
    pipe = load_pipeline(file, tokenizer=sd1_inpainting / "tokenizer")
    assert pipe.inpainting and pipe.unet.config.in_channels == 9
    image, mask = picture(24, 32), mask_from_image(box_mask(24, 32))
    kw = dict(steps=4, init_image=image, mask=mask, progress=False)
    assert torch.equal(sample(pipe, "a cat", **kw), sample(load_pipeline(sd1_inpainting), "a cat", **kw))


def test_the_mask_is_diffusers_binarised_grey():
    """PIL's convert("L") grey level, at least 128: mid-grey and coloured pixels fall on either side."""
    image = picture(8, 8, seed=9)
    image[0, :4] = torch.tensor([[128, 128, 128], [127, 127, 127], [255, 0, 0], [0, 255, 0]], dtype=torch.uint8)
    grey = torch.from_numpy(np.array(to_pil(image).convert("L")))
    assert torch.equal(mask_from_image(image), grey >= 128)
    assert mask_from_image(image)[0, :4].tolist() == [True, False, False, True]


def test_bad_inpainting_input_is_one_line(sd1, sd1_inpainting):
    image = picture(24, 32)
    with pytest.raises(ValueError, match="the mask is 16x24; it must be a bool"):
        sample(load_pipeline(sd1), "a cat", steps=3, init_image=image, mask=torch.ones(24, 16, dtype=torch.bool),
               progress=False)
    with pytest.raises(ValueError, match="a mask needs the image it masks"):
        sample(load_pipeline(sd1), "a cat", steps=3, mask=torch.ones(24, 32, dtype=torch.bool), progress=False)
    pipe = load_pipeline(sd1_inpainting)
    with pytest.raises(ValueError, match="is an inpainting model .9 input channels.: give it an image and a mask"):
        sample(pipe, "a cat", steps=3, height=16, width=16, progress=False)
    with pytest.raises(ValueError, match="give it a mask with the image"):
        sample(pipe, "a cat", steps=3, init_image=image, progress=False)


# ---------------------------------------------------------------------------------------------
# generate.py --mask

FAST = ["--steps", "4", "--device", "cpu", "--proposer", "none", "--quiet", "--seed", "5"]


def test_generate_py_inpaints(sd1_inpainting, tmp_path, capsys):
    image, mask = picture(24, 32, seed=3), box_mask(24, 32)
    png.write_png(tmp_path / "in.png", image)
    to_pil(mask[..., 0]).save(tmp_path / "mask.png")  # a grey PNG, as masks usually are
    code, out, err = run(generate.main, capsys, "a cat", "--model", sd1_inpainting, *FAST, "--init-image",
                         tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--out", tmp_path / "inpainted")
    assert code == 0, err
    written, text = png_reader.read_png(tmp_path / "inpainted.png")
    expected = sample(load_pipeline(sd1_inpainting), "a cat", steps=4, seed=5, init_image=image,
                      mask=mask_from_image(mask), progress=False)
    assert torch.equal(written, expected[0]) and "Denoising strength: 1" in text["parameters"]


def test_generate_py_refuses_bad_masks_and_models(sd1, sd1_inpainting, tmp_path, capsys):
    png.write_png(tmp_path / "in.png", picture(24, 32))
    png.write_png(tmp_path / "small.png", box_mask(16, 32))
    code, _, err = run(generate.main, capsys, "a cat", "--model", sd1, *FAST, "--init-image", tmp_path / "in.png",
                       "--mask", tmp_path / "small.png")
    assert code == 2 and err == [f"error: --init-image {tmp_path / 'in.png'}, --mask {tmp_path / 'small.png'}: the "
                                 "mask is 32x16; it must be a bool [H, W] of the image's size, 32x24"]
    code, _, err = run(generate.main, capsys, "a cat", "--model", sd1_inpainting, *FAST, "--height", "16", "--width",
                       "16")
    assert code == 2 and len(err) == 1 and "is an inpainting model (9 input channels)" in err[0]


# ---------------------------------------------------------------------------------------------
# Every method inpaints: the arguments flow through generate()

METHODS = {"sd": [], "negative": [], "static": [], "sld-max": [], "safree": [], "dng": ["--sampler", "euler-a"]}


@pytest.mark.parametrize("model", ["sd1", "sd1_inpainting"])
def test_every_method_inpaints(request, tmp_path, capsys, model):
    folder = request.getfixturevalue(model)
    png.write_png(tmp_path / "in.png", picture(24, 32, seed=3))
    png.write_png(tmp_path / "mask.png", box_mask(24, 32))
    made = {}
    for method, extra in METHODS.items():
        code, _, err = run(generate.main, capsys, "a person on a beach", "--model", folder, *FAST[:4], *FAST[6:],
                           *extra, "--method", method,
                           "--init-image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                           "--out", tmp_path / method)
        assert code == 0, (method, err)
        made[method], text = png_reader.read_png(tmp_path / f"{method}.png")
        assert f"Method: {method}" in text["parameters"]
    assert all(not torch.equal(made[m], made["sd"]) for m in METHODS if m not in ("sd", "dng"))


def test_dng_weighs_only_the_latents_the_sampler_drew():
    """With a 4-channel UNet, inpainting puts the image back outside the mask: the posterior update
    counts the latents inside it alone (StepState.drawn)."""
    from methods.dng import Strength, update
    g = torch.Generator().manual_seed(0)
    x, mean_u, mean_n = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    drawn = torch.zeros(1, 1, 6, 6)
    drawn[..., 2:5, 1:4] = 1
    p = torch.tensor([0.3, 0.6], dtype=torch.float64)
    outside = drawn == 0
    moved = x.clone()
    moved[outside.expand_as(x)] += 5  # what happens where nothing was drawn must not matter
    strength = Strength()
    ours = update(p, moved, mean_u, mean_n, 0.5, strength, drawn)
    assert torch.equal(ours, update(p, x, mean_u, mean_n, 0.5, strength, drawn))
    inside = lambda t: t * drawn  # the same step with the outside set equal in x and both means
    assert torch.allclose(ours, update(p, inside(x), inside(mean_u), inside(mean_n), 0.5, strength))
    assert not torch.allclose(ours, update(p, moved, mean_u, mean_n, 0.5, strength))
