"""Safe Latent Diffusion (methods/sld.py) against diffusers' StableDiffusionPipelineSafe on random weights."""
import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionPipelineSafe

from helpers import max_diff, pipeline_images
from sampler.loop import Guidance, generate
from methods.sld import PRESETS, SAFETY_CONCEPT, SLD, SafeLatentDiffusion, SLDConfig
from weights import load_pipeline

SIZE = dict(height=16, width=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(sd1):
    sd = StableDiffusionPipeline.from_pretrained(sd1, safety_checker=None, requires_safety_checker=False)
    safe = StableDiffusionPipelineSafe(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                       scheduler=DDIMScheduler.from_pretrained(sd1, subfolder="scheduler"),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    safe.set_progress_bar_config(disable=True)
    assert safe.safety_concept == SAFETY_CONCEPT
    return safe


def reference_images(ref, prompt, config: SLDConfig, steps, guidance_scale=7.5, seed=0):
    return pipeline_images(ref, prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance_scale, **SIZE,
                           sld_warmup_steps=config.warmup_steps, sld_guidance_scale=config.scale,
                           sld_threshold=config.threshold, sld_momentum_scale=config.momentum_scale,
                           sld_mom_beta=config.momentum_beta)


def test_presets_are_diffusers_safety_config():
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    names = dict(warmup_steps="sld_warmup_steps", scale="sld_guidance_scale", threshold="sld_threshold",
                 momentum_scale="sld_momentum_scale", momentum_beta="sld_mom_beta")
    for preset, config in PRESETS.items():
        theirs = getattr(SafetyConfig, preset.upper())
        assert {names[k]: v for k, v in dataclasses.asdict(config).items()} == theirs


def sld(preset) -> dict:
    """generate()'s arguments for SLD at `preset` (a name or an SLDConfig): the method's plan."""
    return SLD(preset).plan(None, "").arguments


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_match_diffusers(pipe, reference, preset):
    """18 steps: past every preset's warm-up (weak's is 15)."""
    prompt, steps = "a cat on a table", 18
    ours = generate(pipe, prompt, steps=steps, **SIZE, progress=False, **sld(preset))
    expected = reference_images(reference, prompt, PRESETS[preset], steps)
    assert ((expected > 0) & (expected < 255)).float().mean() > 0.2, "reference image is saturated"
    assert max_diff(ours, expected) <= 2
    # The safety term shows: weak's three guided steps at s_S = 20 move pixels by about one level at
    # this size; the stronger presets move them by far more than the tolerance.
    plain = generate(pipe, prompt, steps=steps, **SIZE, progress=False)
    assert preset == "weak" or max_diff(ours, plain) > 5


# A short warm-up and an s_S that does not saturate μ, so that every hyper-parameter shows.
VISIBLE = SLDConfig(warmup_steps=3, scale=10, threshold=0.05, momentum_scale=0.5, momentum_beta=0.7)


def test_each_part_of_the_formula_shows_and_matches_diffusers(pipe, reference):
    prompts, steps = ["a cat on a table", "a dog"], 8
    expected = reference_images(reference, prompts, VISIBLE, steps)
    run = lambda **kw: generate(pipe, prompts, steps=steps, **SIZE, progress=False, **kw)
    assert max_diff(run(**sld(VISIBLE)), expected) <= 2
    # each change a mistake could make moves the image out of tolerance
    assert max_diff(run(), expected) > 10
    for change in [dict(warmup_steps=2), dict(warmup_steps=4), dict(momentum_scale=0.0), dict(momentum_beta=0.3),
                   dict(threshold=0.1), dict(scale=5)]:
        wrong = run(**sld(dataclasses.replace(VISIBLE, **change)))
        assert max_diff(wrong, expected) > 2, change
    rule = SafeLatentDiffusion(VISIBLE)
    swapped = run(negative=SAFETY_CONCEPT, rule=lambda u, c, s, guidance, i: rule(c, u, s, guidance, i))
    assert max_diff(swapped, expected) > 2


def test_rule_gives_the_same_answer_when_called_twice_for_a_step():
    gen = torch.Generator().manual_seed(0)
    steps = [tuple(torch.randn(2, 4, 3, 3, generator=gen) * 0.1 for _ in range(3)) for _ in range(6)]
    guidance = Guidance(prompt=["a", "b"], uncond=["", ""], negative=[SAFETY_CONCEPT] * 2, negative_scale=[7.5] * 2)
    config = dataclasses.replace(VISIBLE, warmup_steps=0)
    once, twice = SafeLatentDiffusion(config), SafeLatentDiffusion(config)
    answers = []
    for i, (u, c, s) in enumerate(steps):
        answers.append(once(u, c, s, guidance, i))
        assert torch.equal(twice(u, c, s, guidance, i), answers[-1])
        assert torch.equal(twice(u, c, s, guidance, i), answers[-1])
    # the momentum carries over: step 4's answer is not the one with no momentum
    assert not torch.allclose(SafeLatentDiffusion(config)(*steps[4], guidance, 0), answers[4])
    # step 0 starts a new generation
    for i, branches in enumerate(steps[:3]):
        assert torch.equal(twice(*branches, guidance, i), answers[i])
    with pytest.raises(RuntimeError, match="step 5 after step 2"):
        twice(*steps[5], guidance, 5)


def test_a_hook_that_forces_a_second_combine_changes_nothing(pipe):
    """The loop re-combines the branches when a hook changes a scale; SLD ignores negative_scale."""
    def nudge(state):
        state.guidance.negative_scale[0] += 1.0

    kw = dict(steps=6, **SIZE, progress=False)
    plain = generate(pipe, "a dog", **kw, **sld(VISIBLE))
    assert torch.equal(generate(pipe, "a dog", **kw, hooks=[nudge], **sld(VISIBLE)), plain)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown SLD preset 'mild'"):
        SafeLatentDiffusion("mild")


def test_sld_rule_invariants_on_sdxl(sdxl):
    """diffusers has no SDXL SLD pipeline, so SLD's rule is checked on SDXL by what it must do: max
    (no warm-up) steers the image from the first step; medium leaves it plain while its 10 warm-up
    steps last, and steers it after; a safety scale of 1 or less is plain classifier-free guidance."""
    pipe = load_pipeline(sdxl)

    def image(steps, preset=None):
        rule = {} if preset is None else SLD(preset).plan(pipe, "").arguments
        return generate(pipe, "a person on a beach", steps=steps, height=32, width=32, seed=3, progress=False,
                        **rule).int()

    plain4, plain12 = image(4), image(12)
    assert (image(4, "max") - plain4).abs().max() > 2
    assert (image(4, "medium") - plain4).abs().max() <= 1
    assert (image(12, "medium") - plain12).abs().max() > 0  # steps 10 and 11 only: a small change
    assert (image(4, dataclasses.replace(PRESETS["max"], scale=1.0)) - plain4).abs().max() <= 1
    assert isinstance(SLD("max").plan(pipe, "").arguments["rule"], SafeLatentDiffusion)
