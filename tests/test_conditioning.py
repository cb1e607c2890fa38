"""What the UNet is conditioned on. A branch conditioned on hidden states (Embedded) or on a schedule of
them (Switch), against diffusers' `prompt_embeds` path and against the hook that makes the same change
by hand; SDXL's text conditioning (both encoders' hidden states, the pooled embedding, the zeros of an
empty negative) against StableDiffusionXLPipeline.encode_prompt, and its size and crop micro-conditioning
(the time ids, and the image they make), refused for a model without it."""
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from checkpoints import SDXL_WIDTH, make_sdxl_folder
from helpers import (SDXL_PROMPTS, assert_close_rel, assert_same_image, ddim_reference, pipeline_images,
                     sdxl_reference)
from sampler.loop import Embedded, Switch, generate, words
from weights import load_pipeline

SMALL = dict(steps=4, height=16, width=16, progress=False)
DEFAULTS = dict(steps=4, height=32, width=32)  # SDXL's images, as in test_sampler.py


def embedded(pipe, text: str, scale: float = 1.0) -> Embedded:
    hidden, pooled = pipe.encode_text([text])
    return Embedded(hidden[0] * scale, None, text)


def test_embedded_hidden_states_match_diffusers_prompt_embeds(sd1):
    """An Embedded prompt and negative are what diffusers' prompt_embeds/negative_prompt_embeds are."""
    pipe = load_pipeline(sd1)
    prompt, negative = embedded(pipe, "a dog", 1.3), embedded(pipe, "blurry", 0.7)  # no text gives these states
    ours = generate(pipe, prompt, negative_prompt=negative, **SMALL)
    expected = pipeline_images(ddim_reference(sd1), None, prompt_embeds=prompt.hidden[None],
                               negative_prompt_embeds=negative.hidden[None], num_inference_steps=4, height=16,
                               width=16)
    assert_same_image(ours, expected)
    assert (ours.int() - generate(pipe, "a dog", negative_prompt="blurry", **SMALL).int()).abs().max() > 2


def test_switch_is_the_hook_that_changes_the_prompt_at_its_step_without_rerunning_the_unet(sd1):
    pipe = load_pipeline(sd1)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))

    def by_hand(state):  # what Switch(before, "a cat", last_step=1) declares
        if state.i == 2:
            state.guidance.prompt = ["a cat"]

    before = embedded(pipe, "a dog", 1.5)
    switched = generate(pipe, Switch(before, "a cat", last_step=1), **SMALL)
    switch_calls, calls[:] = list(calls), []
    hooked = generate(pipe, before, hooks=[by_hand], **SMALL)
    handle.remove()
    assert torch.equal(switched, hooked)
    assert switch_calls == [2, 2, 2, 2]  # the change is known ahead: no extra call at step 2
    assert calls == [2, 2, 2, 1, 2]  # the hook's change re-runs the cond branch at step 2
    for other in (generate(pipe, "a cat", **SMALL), generate(pipe, before, **SMALL)):
        assert (switched.int() - other.int()).abs().max() > 2


def test_batched_entries_mix_texts_and_schedules_per_image(sd1):
    pipe = load_pipeline(sd1)
    switch = Switch(embedded(pipe, "a dog", 1.5), "a cat", last_step=2)
    both = generate(pipe, [switch, "a tree"], **SMALL)
    assert torch.equal(both[0], generate(pipe, switch, **SMALL)[0])
    assert torch.equal(both[1], generate(pipe, ["a dog", "a tree"], **SMALL)[1])


def test_words_of_an_entry():
    hidden = torch.zeros(77, 8)
    assert words("a cat") == "a cat" and words(None) is None
    assert words(Embedded(hidden, None, "a dog")) == "a dog"
    assert words(Switch(Embedded(hidden, None, "a dog"), "a cat", last_step=3)) == "a dog"


def test_vl_dnp_asks_about_the_words_of_a_prompt_given_as_states(sd1):
    """A hook that asks a proposer about the prompt gets its words, whatever conditions the branch."""
    from methods.vldnp import DynamicNegatives
    from vlm.tasks import NUDITY

    pipe = load_pipeline(sd1)
    asked = []

    def proposer(image, prompt, step):
        from vlm.base import Reply
        asked.append(prompt)
        return Reply([], "")

    hook = DynamicNegatives(proposer, NUDITY, [0, 2])
    generate(pipe, Switch(embedded(pipe, "a dog", 1.5), "a cat", last_step=1), hooks=[hook], **SMALL)
    assert asked == ["a dog", "a dog"] and hook.prompts == ["a dog"]


@torch.no_grad()
def test_encode_text_matches_encode_prompt(sdxl_pair):
    """Every prompt, "" included, is encoded; without a negative prompt the unconditional branch is zeros
    for both outputs (force_zeros_for_empty_prompt), and an explicit negative_prompt="" is encoded."""
    ours, ref = sdxl_pair
    for prompt in SDXL_PROMPTS:
        embeds, negative, pooled, negative_pooled = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                                      do_classifier_free_guidance=True)
        hidden, ours_pooled = ours.encode_text([prompt])
        assert hidden.shape == (1, 77, SDXL_WIDTH) and ours_pooled.shape == (1, 40)
        assert_close_rel(hidden, embeds)
        assert_close_rel(ours_pooled, pooled)
        assert not negative.any() and not negative_pooled.any()
    unconditional = ours.unconditional
    assert torch.equal(unconditional.hidden, torch.zeros(77, SDXL_WIDTH)) and torch.equal(unconditional.pooled,
                                                                                          torch.zeros(40))
    _, negative, _, negative_pooled = ref.encode_prompt("a dog", device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=True, negative_prompt="")
    hidden, pooled = ours.encode_text([""])
    assert negative.abs().max() > 0.1
    assert_close_rel(hidden, negative)
    assert_close_rel(pooled, negative_pooled)


@torch.no_grad()
def test_unconditional_is_the_encoded_empty_text_without_force_zeros(tmp_path):
    folder = make_sdxl_folder(tmp_path, seed=4, force_zeros_for_empty_prompt=False)
    ours, ref = load_pipeline(folder), StableDiffusionXLPipeline.from_pretrained(folder)
    assert not ours.force_zeros_for_empty_prompt and ours.unconditional == ""
    _, negative, _, negative_pooled = ref.encode_prompt("a dog", device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=True)
    hidden, pooled = ours.encode_text([ours.unconditional])
    assert negative.abs().max() > 0.1
    assert_close_rel(hidden, negative)
    assert_close_rel(pooled, negative_pooled)


@pytest.mark.parametrize("height, width, extra", [
    (1024, 1024, {}), (768, 1344, {}),
    (512, 640, dict(original_size=(2048, 1536), crop_top_left=(64, 32), target_size=(1024, 896))),
])
def test_time_ids_are_diffusers(sdxl_pair, height, width, extra):
    ours, ref = sdxl_pair
    original, crop, target = (extra.get("original_size", (height, width)), extra.get("crop_top_left", (0, 0)),
                              extra.get("target_size", (height, width)))
    expected = ref._get_add_time_ids(original, crop, target, dtype=torch.float32, text_encoder_projection_dim=40)
    assert ours.time_ids(height, width, **extra).tolist() == expected[0].tolist()


def test_micro_conditioning_matches_diffusers(sdxl):
    sizes = dict(original_size=(64, 48), crop_top_left=(4, 8), target_size=(24, 40))
    ours = generate(load_pipeline(sdxl), "a cat", **DEFAULTS, **sizes, progress=False)
    expected = pipeline_images(sdxl_reference(sdxl, "ddim"), "a cat", num_inference_steps=4, guidance_scale=7.5,
                               height=32, width=32, original_size=sizes["original_size"],
                               crops_coords_top_left=sizes["crop_top_left"], target_size=sizes["target_size"])
    assert_same_image(ours, expected)
    assert (ours.int() - generate(load_pipeline(sdxl), "a cat", **DEFAULTS, progress=False).int()).abs().max() > 2


def test_micro_conditioning_is_refused_for_a_model_without_it(sd1):
    pipe = load_pipeline(sd1)
    with pytest.raises(ValueError, match="SDXL's"):
        generate(pipe, "a cat", **DEFAULTS, original_size=(64, 64), progress=False)
