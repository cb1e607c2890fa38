"""The sampling loop against diffusers on random weights: StableDiffusionPipeline + DDIMScheduler, and
StableDiffusionXLPipeline with every sampler, where the pooled embedding and size ids reach the UNet through
the loop's conditioning, with no SDXL branch in the loop (SDXL base's and SDXL-Turbo's settings, and the
image of an original single file)."""
import inspect
import json
import shutil

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

from checkpoints import NORMALISED_VAE, SDXL_SCHEDULER, TURBO_SCHEDULER, make_sdxl_folder
from helpers import (assert_same_image, ddim_reference, pipeline_images, scheduler_classes, sdxl_reference,
                     with_settings)
from sampler.base import SAMPLERS, Sampler
from sampler.ddim import DDIM
from sampler.loop import NonFiniteError, generate
from sampler.schedule import SchedulerConfig
from weights import export_single_file, load_pipeline


def reference_images(ref, prompt, negative_prompt=None, steps=4, guidance_scale=7.5, height=32, width=32, batch=1,
                     eta=0.0, seed=0):
    return pipeline_images(ref, prompt, seed=seed, negative_prompt=negative_prompt, num_inference_steps=steps,
                           guidance_scale=guidance_scale, height=height, width=width, num_images_per_prompt=batch,
                           eta=eta)


DEFAULTS = dict(steps=4, height=32, width=32)
CASES = {
    "plain": dict(prompt="a cat on a table"),
    "negative-batch2-nonsquare-eta": dict(prompt="a photo of a dog", negative_prompt="blurry, ugly", batch=2,
                                          height=24, width=40, eta=0.7, steps=5, guidance_scale=5.0),
    "guidance1": dict(prompt="a red house", guidance_scale=1.0, steps=3),
    "two-prompts": dict(prompt=["a castle", "a lake at night"], negative_prompt=["fog", "boats"], seed=7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sd1_folder_matches_diffusers(sd1, case):
    kw = {**DEFAULTS, **CASES[case]}
    ours = generate(load_pipeline(sd1), **kw, progress=False)
    assert_same_image(ours, reference_images(ddim_reference(sd1), **kw))


def test_sd1_single_file_matches_diffusers(sd1, tmp_path):
    file = export_single_file(sd1, tmp_path / "model.safetensors")
    pipe = load_pipeline(file, tokenizer=sd1 / "tokenizer")
    kw = dict(prompt="a cat on a table", negative_prompt="dark", height=32, width=24, steps=4)
    assert_same_image(generate(pipe, **kw, progress=False), reference_images(ddim_reference(sd1), **kw))


def test_sd2_v_prediction_matches_diffusers(sd2v, tmp_path):
    pipe = load_pipeline(sd2v)
    assert pipe.family == "sd2" and pipe.scheduler.prediction_type == "v_prediction"
    kw = dict(prompt="a mountain, oil painting!", batch=2, steps=4, eta=0.3, height=32, width=32)
    assert_same_image(generate(pipe, **kw, progress=False), reference_images(ddim_reference(sd2v), **kw))
    # a single file says its prediction type only sometimes: prediction_type="v" gives it, whatever the file says
    file = export_single_file(sd2v, tmp_path / "v.safetensors")
    pipe = load_pipeline(file, tokenizer=sd2v / "tokenizer", prediction_type="v")
    kw = dict(prompt="a mountain", height=32, width=32, steps=3)
    assert_same_image(generate(pipe, **kw, progress=False), reference_images(ddim_reference(sd2v), **kw))


OUTDATED = {"steps_offset-0": dict(steps_offset=0), "clip_sample": dict(clip_sample=True)}


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
@pytest.mark.parametrize("outdated", list(OUTDATED))
def test_an_outdated_sd_scheduler_config_is_read_as_stable_diffusion_pipeline_reads_it(sd1, tmp_path, outdated,
                                                                                       sampler):
    """StableDiffusionPipeline (and its Img2Img and Inpaint pipelines) rewrite steps_offset to 1 and clip_sample
    to False in the scheduler config they are given, as hub folders of SD 1.x/2.x still hold older values;
    a scheduler made from the pipeline's config inherits them."""
    from diffusers import StableDiffusionPipeline
    folder = with_settings(sd1, tmp_path, **OUTDATED[outdated])
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = scheduler_classes()[sampler].from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ours = generate(load_pipeline(folder), "a photo of a dog", **DEFAULTS, sampler=sampler, progress=False)
    assert_same_image(ours, reference_images(ref, "a photo of a dog", **DEFAULTS))


def test_ddim_settings_a_config_lacks_are_sds_not_ddimschedulers_defaults(sd1, tmp_path):
    """An Euler config written by today's diffusers holds no clip_sample or set_alpha_to_one, and a hand-written one
    may lack steps_offset. DDIMScheduler.from_config(pipe.scheduler.config) then takes its constructor's defaults
    (True, True, and 0: StableDiffusionPipeline's rewrite to 1 is undone, the key being listed as defaulted), clipping
    SD's latents to [-1, 1]; we keep SD's (CompVis' ddim.py: no clipping, ᾱ_0 at the last step, offset 1), which is
    DDIMScheduler's image with them written (docs/correctness.md)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
    folder = with_settings(sd1, tmp_path)
    written = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").config
    config = {k: v for k, v in written.items() if k not in ("steps_offset", "_use_default_values")}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = DDIMScheduler.from_config({**config, "steps_offset": 1, "clip_sample": False,
                                               "set_alpha_to_one": False})
    ref.set_progress_bar_config(disable=True)
    ours = generate(load_pipeline(folder), "a photo of a dog", **DEFAULTS, progress=False)
    assert_same_image(ours, reference_images(ref, "a photo of a dog", **DEFAULTS))


def test_an_sdxl_scheduler_config_is_read_as_written(sdxl, tmp_path):
    """StableDiffusionXLPipeline rewrites nothing: steps_offset 0 stays 0."""
    folder = with_settings(sdxl, tmp_path, steps_offset=0)
    ours = generate(load_pipeline(folder), "a photo of a dog", **DEFAULTS, progress=False)
    assert_same_image(ours, reference_images(sdxl_reference(folder, "ddim"), "a photo of a dog", **DEFAULTS))


def test_one_batched_unet_call_per_step(sd1):
    pipe = load_pipeline(sd1)
    calls = []  # the batch size of every UNet call
    pipe.unet.register_forward_pre_hook(lambda unet, args: calls.append(args[0].shape[0]))
    generate(pipe, "a", steps=3, batch=2, height=16, width=16, progress=False)
    assert calls == [4, 4, 4]  # uncond + cond for 2 images, one call per step
    calls.clear()
    generate(pipe, "a", steps=3, batch=2, guidance_scale=1.0, height=16, width=16, progress=False)
    assert calls == [2, 2, 2]  # guidance <= 1: no unconditional branch
    calls.clear()
    generate(pipe, ["a", "c"], steps=2, negative=["b", None], height=16, width=16, progress=False)
    assert calls == [5, 5]  # the negative branch only for the image that has one


def test_guidance_is_still_a_name_for_guidance_scale(sd1):
    pipe = load_pipeline(sd1)
    kw = dict(steps=2, height=16, width=16, progress=False)
    old = generate(pipe, "a", guidance=3.0, **kw)
    assert torch.equal(old, generate(pipe, "a", guidance_scale=3.0, **kw))
    assert not torch.equal(old, generate(pipe, "a", **kw))
    with pytest.raises(TypeError, match="both"):
        generate(pipe, "a", guidance=3.0, guidance_scale=3.0, **kw)
    with pytest.raises(TypeError, match="guidence"):
        generate(pipe, "a", guidence=3.0, **kw)


def test_hooks_see_the_step_state(sd1):
    pipe = load_pipeline(sd1)
    seen = []
    generate(pipe, "a dog", steps=4, height=16, width=16, progress=False, hooks=[seen.append])
    ddim = DDIM(pipe.scheduler, 4)
    assert [s.i for s in seen] == [0, 1, 2, 3]
    assert [s.t for s in seen] == ddim.timesteps.tolist()
    for s in seen:
        x0, _ = ddim.predict(s.eps, s.i, s.x)
        torch.testing.assert_close(s.x0, x0)
        assert s.decode_x0().shape == (1, 3, 16, 16)


def three_branch_reference(folder, prompt, switches, steps, seed=0, g=7.5, size=16):
    """The guidance written out with diffusers components: the negative in force at each step
    comes from `switches` {step: (negative, w), or None to drop it}; no negative branch before the first."""
    ref = ddim_reference(folder)
    sched = ref.scheduler
    sched.set_timesteps(steps)
    embed = lambda text: ref.text_encoder(ref.tokenizer([text], padding="max_length", max_length=77,
                                                        truncation=True, return_tensors="pt").input_ids)[0]
    e_u, e_c = embed(""), embed(prompt)
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 4, size // 2, size // 2), generator=gen)
    negative = None
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            negative = switches.get(i, negative)
            u, c = ref.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([e_u, e_c])).sample.chunk(2)
            eps = u + g * (c - u)
            if negative is not None:
                n = ref.unet(x, t, encoder_hidden_states=embed(negative[0])).sample
                eps = eps - negative[1] * (n - u)
            x = sched.step(eps, t, x, generator=gen).prev_sample
        return ref.vae.decode(x / ref.vae.config.scaling_factor).sample


def test_three_branch_guidance_matches_a_reference_loop(sd1):
    pipe = load_pipeline(sd1)
    switches = {1: ("a cat", 5.0), 3: ("a bird, blurry", 9.0)}

    def hook(state):
        if state.i in switches:
            state.guidance.negative = [switches[state.i][0]]
            state.guidance.negative_scale = switches[state.i][1]

    ours = generate(pipe, "a dog", steps=5, height=16, width=16, hooks=[hook], progress=False)
    with torch.no_grad():
        expected = three_branch_reference(sd1, "a dog", switches, steps=5)
    expected = (expected * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert (ours.int() - (expected * 255).round().int()).abs().max() <= 1
    # and the hook mattered
    plain = generate(pipe, "a dog", steps=5, height=16, width=16, progress=False)
    assert (plain.int() - ours.int()).abs().max() > 2


def test_a_negative_switched_off_stops_at_that_step(sd1):
    """Dropping the negative adds no branch, yet it must change ε from the step the hook ran at."""
    pipe = load_pipeline(sd1)
    switches = {1: ("a cat", 9.0), 2: None}

    def hook(state):
        if state.i in switches:
            negative, w = switches[state.i] or (None, state.guidance.negative_scale)
            state.guidance.negative, state.guidance.negative_scale = [negative], w

    ours = generate(pipe, "a dog", steps=4, height=16, width=16, hooks=[hook], progress=False)
    with torch.no_grad():
        expected = three_branch_reference(sd1, "a dog", switches, steps=4)
    expected = ((expected * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).round()
    assert (ours.int() - expected.int()).abs().max() <= 1


def test_static_negative_from_the_start_matches_reference(sd1):
    pipe = load_pipeline(sd1)
    ours = generate(pipe, "a dog", steps=3, height=16, width=16, negative="a cat", negative_scale=4.0, progress=False)
    with torch.no_grad():
        expected = three_branch_reference(sd1, "a dog", {0: ("a cat", 4.0)}, steps=3)
    expected = ((expected * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).round()
    assert (ours.int() - expected.int()).abs().max() <= 1


def test_batch_images_are_independent_of_each_others_negatives(sd1):
    """Image 0 with a negative switched on at step 1 is the same whether image 1 gets one or not."""
    pipe = load_pipeline(sd1)

    def switch(negatives):
        def hook(state):
            if state.i == 1:
                state.guidance.negative = list(negatives)
        return hook

    both = generate(pipe, ["a dog", "a tree"], steps=3, height=16, width=16, hooks=[switch(["cat", "rock"])],
                    progress=False)
    first_only = generate(pipe, ["a dog", "a tree"], steps=3, height=16, width=16, hooks=[switch(["cat", None])],
                          progress=False)
    assert torch.equal(both[0], first_only[0])
    assert not torch.equal(both[1], first_only[1])


def test_nan_stops_with_the_step_named(sd1):
    pipe = load_pipeline(sd1)

    def poison(state):
        if state.i == 2:
            state.x.fill_(float("nan"))

    with pytest.raises(NonFiniteError, match="step 2"):
        generate(pipe, "a", steps=4, height=16, width=16, hooks=[poison], progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_initial_noise_is_drawn_in_the_pipeline_dtype(sd1, dtype):
    """diffusers draws x_T in the embeddings' dtype; for a latent size not a multiple of 16 a CPU
    generator gives other numbers in fp16 than in fp32, so drawing in fp32 and casting differs."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe = load_pipeline(sd1, dtype=dtype)
    seen = []
    generate(pipe, "a", steps=1, height=18, width=18, seed=3, progress=False,
             hooks=[lambda s: seen.append(s.x.clone())])
    expected = randn_tensor((1, 4, 9, 9), generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert seen[0].dtype == dtype and torch.equal(seen[0], expected)


@pytest.mark.parametrize("height, width", [(19, 16), (16, 17)])
def test_a_size_not_a_multiple_of_the_vae_scale_is_refused(sd1, height, width):
    pipe = load_pipeline(sd1)  # the small VAE halves twice: a scale of 2
    with pytest.raises(ValueError, match=f"{height}x{width}.*multiples of 2"):
        generate(pipe, "a", steps=1, height=height, width=width, progress=False)


def test_nan_from_the_decoder_is_an_error_not_a_black_image(sd1):
    pipe = load_pipeline(sd1)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match="decod"):
        generate(pipe, "a", steps=2, height=16, width=16, progress=False)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_has_the_interface_the_loop_uses(name):
    sampler = SAMPLERS[name](SchedulerConfig(), 7)
    assert sampler.num_steps == 7 and sampler.timesteps.shape == (7,)
    # whole training timesteps are int64; Euler's default "linspace" layout visits fractional ones, as diffusers
    assert sampler.timesteps.dtype == (torch.float32 if name.startswith("euler") else torch.int64)
    assert isinstance(sampler.init_noise_scale, float) and 0 < sampler.init_noise_scale <= 1
    for method in ("predict", "step"):
        ours = inspect.signature(getattr(sampler, method)).parameters
        declared = list(inspect.signature(getattr(Sampler, method)).parameters)[1:]  # less self
        assert list(ours) == declared, f"{name}.{method}"
    for n in (0, 1001):
        pytest.raises(ValueError, SAMPLERS[name], SchedulerConfig(), n)


# ---------------------------------------------------------------- SDXL

SDXL_CASES = {
    "plain": dict(prompt="a cat on a table"),
    "negative-batch2-nonsquare": dict(prompt="a photo of a dog", negative_prompt="blurry, ugly", batch=2,
                                      height=48, width=32, steps=5, guidance_scale=5.0),
    "guidance1": dict(prompt="a red house", guidance_scale=1.0, steps=3),
    "two-prompts": dict(prompt=["a castle", "a lake at night"], negative_prompt=["fog", "boats"], seed=7),
}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("case", list(SDXL_CASES))
def test_sdxl_images_match_diffusers(sdxl, case, sampler):
    kw = {**DEFAULTS, **SDXL_CASES[case]}
    ours = generate(load_pipeline(sdxl), **kw, sampler=sampler, progress=False)
    assert_same_image(ours, reference_images(sdxl_reference(sdxl, sampler), **kw))


@pytest.mark.parametrize("negative_prompt", [None, "blurry, ugly", ""],
                         ids=["no-negative", "negative", "negative-empty"])
def test_an_empty_prompt_on_sdxl_matches_diffusers(sdxl, negative_prompt):
    """force_zeros_for_empty_prompt zeros only the unconditional branch of a call without a negative prompt
    (negative_prompt None): an empty prompt is encoded like any text, and so is negative_prompt=""."""
    kw = dict(DEFAULTS, prompt="", negative_prompt=negative_prompt)
    ours = generate(load_pipeline(sdxl), **kw, progress=False)
    assert_same_image(ours, reference_images(sdxl_reference(sdxl, "ddim"), **kw))


@pytest.mark.parametrize("negative_prompt", [None, ""], ids=["no-negative", "negative-empty"])
def test_an_empty_prompt_on_sdxl_with_transformers_own_token_ids_matches_diffusers(tmp_path, negative_prompt):
    """Text configs written without the hub's legacy eos_token_id 2: the pooled output is taken where
    transformers takes it (the first eos_token_id; position 0 when the ids lack it), not at the largest id."""
    folder = make_sdxl_folder(tmp_path, hub_token_ids=False)
    kw = dict(DEFAULTS, prompt="", negative_prompt=negative_prompt)
    ours = generate(load_pipeline(folder), **kw, progress=False)
    assert_same_image(ours, reference_images(sdxl_reference(folder, "ddim"), **kw))


@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_a_vae_config_with_latents_mean_and_std_is_read_as_diffusers_reads_it(request, tmp_path, family):
    """StableDiffusionXLPipeline decodes (latents·std/scaling_factor + mean); StableDiffusionPipeline has no
    such keys and decodes latents/scaling_factor, whatever the VAE's config says."""
    folder = with_settings(request.getfixturevalue(family), tmp_path, "vae/config.json", **NORMALISED_VAE)
    kw = dict(DEFAULTS, prompt="a cat on a table", negative_prompt="blurry")
    ours = generate(load_pipeline(folder), **kw, progress=False)
    assert_same_image(ours, reference_images(sdxl_reference(folder, "ddim") if family == "sdxl" else
                                             ddim_reference(folder), **kw))


def test_sdxl_default_size_is_diffusers(sdxl):
    ref = sdxl_reference(sdxl, "ddim")
    assert load_pipeline(sdxl).default_size == ref.default_sample_size * ref.vae_scale_factor


def test_a_three_branch_negative_runs_on_sdxl(sdxl):
    """The negative branch gets the pooled embedding of its own text, like the others."""
    pipe = load_pipeline(sdxl)
    plain = generate(pipe, "a dog", **DEFAULTS, progress=False)
    guided = generate(pipe, "a dog", **DEFAULTS, negative="a cat", negative_scale=5.0, progress=False)
    assert (plain.int() - guided.int()).abs().max() > 2


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
    assert_same_image(ours, reference_images(sdxl_reference(sdxl, sampler), **kw))
