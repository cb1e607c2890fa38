"""SDXL images from sampler.loop.generate against diffusers' StableDiffusionXLPipeline, same seed,
on a random SDXL folder: the pooled embedding and size ids reach the UNet through the loop's
conditioning, with no SDXL branch in the loop."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionXLPipeline

from checkpoints import make_sdxl_folder
from helpers import assert_same_image, pipeline_images
from sampler.loop import generate
from weights import load_pipeline

SCHEDULERS = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler}
CASES = {
    "plain": dict(prompt="a cat on a table"),
    "negative-batch2-nonsquare": dict(prompt="a photo of a dog", negative_prompt="blurry, ugly", batch=2,
                                      height=48, width=32, steps=5, guidance_scale=5.0),
    "guidance1": dict(prompt="a red house", guidance_scale=1.0, steps=3),
    "two-prompts": dict(prompt=["a castle", "a lake at night"], negative_prompt=["fog", "boats"], seed=7),
}
DEFAULTS = dict(steps=4, height=32, width=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


def reference(folder, sampler):
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    ref.scheduler = SCHEDULERS[sampler].from_pretrained(folder, subfolder="scheduler")
    ref.set_progress_bar_config(disable=True)
    return ref


def reference_images(ref, prompt, negative_prompt=None, steps=4, guidance_scale=7.5, height=32, width=32, batch=1,
                     seed=0):
    return pipeline_images(ref, prompt, seed=seed, negative_prompt=negative_prompt, num_inference_steps=steps,
                           guidance_scale=guidance_scale, height=height, width=width, num_images_per_prompt=batch)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("case", list(CASES))
def test_sdxl_images_match_diffusers(folder, case, sampler):
    kw = {**DEFAULTS, **CASES[case]}
    ours = generate(load_pipeline(folder), **kw, sampler=sampler, progress=False)
    assert_same_image(ours, reference_images(reference(folder, sampler), **kw))


def test_sdxl_default_size_is_diffusers(folder):
    ref = reference(folder, "ddim")
    assert load_pipeline(folder).default_size == ref.default_sample_size * ref.vae_scale_factor


def test_a_three_branch_negative_runs_on_sdxl(folder):
    """The negative branch gets the pooled embedding of its own text, like the others."""
    pipe = load_pipeline(folder)
    plain = generate(pipe, "a dog", **DEFAULTS, progress=False)
    guided = generate(pipe, "a dog", **DEFAULTS, negative="a cat", negative_scale=5.0, progress=False)
    assert (plain.int() - guided.int()).abs().max() > 2


def test_micro_conditioning_matches_diffusers(folder):
    sizes = dict(original_size=(64, 48), crop_top_left=(4, 8), target_size=(24, 40))
    ours = generate(load_pipeline(folder), "a cat", **DEFAULTS, **sizes, progress=False)
    expected = pipeline_images(reference(folder, "ddim"), "a cat", num_inference_steps=4, guidance_scale=7.5,
                               height=32, width=32, original_size=sizes["original_size"], crops_coords_top_left=sizes["crop_top_left"],
                               target_size=sizes["target_size"])
    assert_same_image(ours, expected)
    assert (ours.int() - generate(load_pipeline(folder), "a cat", **DEFAULTS, progress=False).int()).abs().max() > 2


def test_micro_conditioning_is_refused_for_a_model_without_it(tmp_path):
    from checkpoints import make_sd_folder
    pipe = load_pipeline(make_sd_folder(tmp_path, "sd1"))
    with pytest.raises(ValueError, match="SDXL's"):
        generate(pipe, "a cat", **DEFAULTS, original_size=(64, 64), progress=False)
