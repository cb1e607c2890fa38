"""A branch conditioned on hidden states (Embedded) or on a schedule of them (Switch), against
diffusers' `prompt_embeds` path and against the hook that makes the same change by hand."""
import torch

from helpers import assert_same_image, ddim_reference, pipeline_images
from sampler.loop import Embedded, Switch, generate, words
from weights import load_pipeline

SMALL = dict(steps=4, height=16, width=16, progress=False)


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
