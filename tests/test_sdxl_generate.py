"""SDXL images from sampler.loop.generate against diffusers' StableDiffusionXLPipeline, same seed,
on a random SDXL folder: the pooled embedding and size ids reach the UNet through the loop's
conditioning, with no SDXL branch in the loop. Every sampler from SDXL's own scheduler config, SDXL-Turbo's
settings, and the same image from an original single file."""
import json
import shutil

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionXLPipeline)

from checkpoints import SDXL_SCHEDULER, TURBO_SCHEDULER
from helpers import assert_same_image, pipeline_images
from sampler.loop import generate
from weights import load_pipeline

SCHEDULERS = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
              "euler-a": EulerAncestralDiscreteScheduler}
CASES = {
    "plain": dict(prompt="a cat on a table"),
    "negative-batch2-nonsquare": dict(prompt="a photo of a dog", negative_prompt="blurry, ugly", batch=2,
                                      height=48, width=32, steps=5, guidance_scale=5.0),
    "guidance1": dict(prompt="a red house", guidance_scale=1.0, steps=3),
    "two-prompts": dict(prompt=["a castle", "a lake at night"], negative_prompt=["fog", "boats"], seed=7),
}
DEFAULTS = dict(steps=4, height=32, width=32)


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
def test_sdxl_images_match_diffusers(sdxl, case, sampler):
    kw = {**DEFAULTS, **CASES[case]}
    ours = generate(load_pipeline(sdxl), **kw, sampler=sampler, progress=False)
    assert_same_image(ours, reference_images(reference(sdxl, sampler), **kw))


@pytest.mark.parametrize("negative_prompt", [None, "blurry, ugly", ""],
                         ids=["no-negative", "negative", "negative-empty"])
def test_an_empty_prompt_matches_diffusers(sdxl, negative_prompt):
    """force_zeros_for_empty_prompt zeros only the unconditional branch of a call without a negative prompt
    (negative_prompt None): an empty prompt is encoded like any text, and so is negative_prompt=""."""
    kw = dict(DEFAULTS, prompt="", negative_prompt=negative_prompt)
    ours = generate(load_pipeline(sdxl), **kw, progress=False)
    assert_same_image(ours, reference_images(reference(sdxl, "ddim"), **kw))


def test_sdxl_default_size_is_diffusers(sdxl):
    ref = reference(sdxl, "ddim")
    assert load_pipeline(sdxl).default_size == ref.default_sample_size * ref.vae_scale_factor


def test_a_three_branch_negative_runs_on_sdxl(sdxl):
    """The negative branch gets the pooled embedding of its own text, like the others."""
    pipe = load_pipeline(sdxl)
    plain = generate(pipe, "a dog", **DEFAULTS, progress=False)
    guided = generate(pipe, "a dog", **DEFAULTS, negative="a cat", negative_scale=5.0, progress=False)
    assert (plain.int() - guided.int()).abs().max() > 2


def test_micro_conditioning_matches_diffusers(sdxl):
    sizes = dict(original_size=(64, 48), crop_top_left=(4, 8), target_size=(24, 40))
    ours = generate(load_pipeline(sdxl), "a cat", **DEFAULTS, **sizes, progress=False)
    expected = pipeline_images(reference(sdxl, "ddim"), "a cat", num_inference_steps=4, guidance_scale=7.5,
                               height=32, width=32, original_size=sizes["original_size"],
                               crops_coords_top_left=sizes["crop_top_left"], target_size=sizes["target_size"])
    assert_same_image(ours, expected)
    assert (ours.int() - generate(load_pipeline(sdxl), "a cat", **DEFAULTS, progress=False).int()).abs().max() > 2


def test_micro_conditioning_is_refused_for_a_model_without_it(sd1):
    pipe = load_pipeline(sd1)
    with pytest.raises(ValueError, match="SDXL's"):
        generate(pipe, "a cat", **DEFAULTS, original_size=(64, 64), progress=False)


def test_sdxl_scheduler_config_is_sdxl_base_1_0s(sdxl):
    """The folder's scheduler is what the euler cases above read: SDXL base's own, leading, offset 1."""
    config = json.loads((sdxl / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerDiscreteScheduler"
    assert {k: config[k] for k in ("timestep_spacing", "steps_offset")} == {"timestep_spacing": "leading",
                                                                            "steps_offset": 1}
    assert SDXL_SCHEDULER["timestep_spacing"] == "leading"


@pytest.fixture(scope="module")
def turbo(sdxl, tmp_path_factory):
    """The small SDXL folder with SDXL-Turbo's scheduler, as the sdxl-turbo repo names and configures it."""
    root = tmp_path_factory.mktemp("turbo") / "sdxl-turbo"
    shutil.copytree(sdxl, root)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER))
    index = json.loads((root / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]  # as sdxl-turbo's model_index.json
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_settings_match_diffusers(turbo, steps):
    """SDXL-Turbo as its model card runs it: euler-a, trailing, 1 or 4 steps, guidance 0."""
    kw = dict(prompt="a cinematic shot of a raccoon", steps=steps, guidance_scale=0.0, height=32, width=32)
    ours = generate(load_pipeline(turbo), **kw, sampler="euler-a", progress=False)
    ref = StableDiffusionXLPipeline.from_pretrained(turbo)
    assert type(ref.scheduler) is EulerAncestralDiscreteScheduler
    assert ref.scheduler.config.timestep_spacing == "trailing"
    ref.set_progress_bar_config(disable=True)
    assert_same_image(ours, reference_images(ref, **kw))


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_sdxl_single_file_image_is_diffusers(sdxl, sdxl_file, sampler):
    """An original single file, its tokenizers from the folder (--tokenizer DIR), gives diffusers' image
    of the folder it was exported from."""
    kw = dict(DEFAULTS, prompt="a lighthouse at dawn", negative_prompt="fog")
    ours = generate(load_pipeline(sdxl_file, tokenizer=sdxl), **kw, sampler=sampler, progress=False)
    assert_same_image(ours, reference_images(reference(sdxl, sampler), **kw))
