"""VL-DNP: tasks, the chat-completions client against a real local HTTP server, the sampler hook,
and its guidance checked against a reference loop written on the diffusers components."""
import base64
import dataclasses
import json
import re
import threading
import time

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

import weights
from fake_vlm import Trickle, completion, dead_url
from helpers import FixedProposer, assert_close_rel, rel_err
from png_reader import read_png
from sampler.loop import generate, to_uint8
from vlm.base import Reply
from vlm.base import prepare_image
from vlm.client import VLMClient
from methods.vldnp import DynamicNegatives, default_query_steps
from methods.vldnp_cli import parse_steps
from vlm.open_tasks import CREATIVE, SAFETY
from vlm.tasks import NUDITY, get_task, is_refusal
from vlm.trace import trace_dict, write_trace

SIZE, STEPS = 32, 6  # the tiny VAE halves: 16x16 latents


def draw(pipe, prompt, hooks, steps=STEPS):
    """generate() at the tests' size and seed, with `hooks`: uint8 [B, H, W, 3]."""
    return generate(pipe, prompt, steps=steps, height=SIZE, width=SIZE, seed=0, hooks=hooks, progress=False)


def noise(batch):
    """The initial latents generate() draws for seed 0."""
    return torch.randn((batch, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(0))


class Recorder:
    """A hook placed after DynamicNegatives: x_t, the negatives and w_neg each step ran with, and the
    decoded x0 at `decode_steps`."""

    def __init__(self, decode_steps=()):
        self.decode_steps, self.x, self.negatives, self.scales, self.decoded = set(decode_steps), [], [], [], {}

    def __call__(self, state):
        self.x.append(state.x.clone())
        self.negatives.append(list(state.guidance.negative))
        self.scales.append(list(state.guidance.negative_scale))  # per image
        if state.i in self.decode_steps:
            self.decoded[state.i] = to_uint8(state.decode_x0())


class Scripted:
    """A proposer answering from a script {(prompt, step): reply text}, parsed by `task`; it records
    every call. A script value that is an exception is raised."""

    def __init__(self, task, script):
        self.task, self.script, self.calls = task, script, []

    def __call__(self, image, prompt, step):
        self.calls.append((step, prompt, image))
        raw = self.script.get((prompt, step), self.script.get(step, "none"))
        if isinstance(raw, Exception):
            raise raw
        return Reply(self.task.parse(raw), raw)


# ---------------------------------------------------------------------------------------------
# a real chat-completions server on 127.0.0.1

def png_from_data_uri(uri: str, tmp_path) -> torch.Tensor:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    file = tmp_path / "sent.png"
    file.write_bytes(base64.b64decode(uri[len(prefix):]))
    return read_png(file)[0]


# ---------------------------------------------------------------------------------------------
# reference: SD sampling written on diffusers / transformers components

class Reference:
    """Text -> DDIM with three-branch guidance, straight on the diffusers components of the folder."""

    def __init__(self, folder):
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.scheduler_config = DDIMScheduler.from_pretrained(folder / "scheduler").config

    def encode(self, text):
        ids = self.tokenizer([text], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids).last_hidden_state

    def decode(self, latents):
        return to_uint8(self.vae.decode(latents / self.vae.config.scaling_factor).sample)

    @torch.no_grad()
    def sample(self, prompt, latents, negatives, steps=STEPS, g=7.5, w=7.5):
        """negatives: {step: text or None}, each in force from its step on. Returns x_t per step, the
        decoded x0 prediction per step (uint8), and the final image (uint8)."""
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        cond, uncond = self.encode(prompt), self.encode("")
        x, xs, x0s, negative = latents, [], [], None
        for i, t in enumerate(scheduler.timesteps):
            negative = negatives.get(i, negative)
            xs.append(x)
            eps_u, eps_c = self.unet(x, t, uncond).sample, self.unet(x, t, cond).sample
            eps = eps_u + g * (eps_c - eps_u)
            alpha_bar = scheduler.alphas_cumprod[t]
            x0s.append(self.decode((x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()))
            if negative is not None:
                eps = eps - w * (self.unet(x, t, self.encode(negative)).sample - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
        return xs, x0s, self.decode(x)


@pytest.fixture(scope="module")
def reference(sd1):
    return Reference(sd1)


def assert_images_close(ours, ref):
    """uint8 images from two implementations: at most one level apart (rounding at .5)."""
    assert ours.shape == ref.shape
    assert (ours.int() - ref.int()).abs().max() <= 1


# ---------------------------------------------------------------------------------------------
# tasks

def test_nudity_task():
    assert NUDITY.question == ('Which of the following bare human body parts can you spot in the image? '
                               '"female genitalia, buttocks, female breast, male breast, anus, feet, belly, '
                               'armpits, male genitalia"')
    assert NUDITY.mode == "replace" and get_task("nudity") is NUDITY
    assert NUDITY.parse("Female breast") == ["female breast"]  # not also "male breast"
    assert NUDITY.parse("male breast") == ["male breast"]
    assert NUDITY.parse("MALE BREAST and female breast") == ["female breast", "male breast"]
    assert NUDITY.parse("I can see female  breasts, an armpit and one foot.") == ["female breast", "feet", "armpits"]
    assert NUDITY.parse("female genitalia") == ["female genitalia"]
    for nothing in ("none", "None.", "no", "No bare body parts are visible.", "bellybutton", ""):
        assert NUDITY.parse(nothing) == [], nothing
    assert NUDITY.negative(["female breast", "feet"]) == "Nudity, Sexual, female breast, feet."
    assert NUDITY.negative([]) is None
    assert NUDITY.parse("x" * 5000 + " feet") == []  # past the reply cap: never read
    # a clause saying a part is not there names nothing
    assert NUDITY.parse("No feet, but a belly.") == ["belly"]
    assert NUDITY.parse("I don’t see any feet; female breast") == ["female breast"]
    assert NUDITY.parse("There are no feet or armpits visible.") == []


NOTHING = ["none", "None.", '"none"', "No.", "", "Nothing unsafe.", "There are no unsafe elements in this image.",
           "There is nothing unsafe in the image.", "I don't see any unsafe elements.",
           "I can’t see anything unsafe or unwanted.", "I see no unsafe elements.",
           "The image does not contain any unsafe elements.", "This image contains no unsafe content.",
           "The image appears to be safe.", "It is safe.", "No unsafe or unwanted elements are visible."]
REFUSALS = ["I'm sorry, I can't help with that.", "I’m sorry, but I can’t assist with that request.",
            "Sorry, I cannot help with this.", "I cannot assist with that.", "I am unable to analyze this image.",
            "I'm not able to help with requests like this.", "As an AI, I won't describe this image.",
            "I apologize, but I cannot fulfill this request.", "I can not provide that information.",
            # a model that cannot see images: its "nothing" is no finding
            "I cannot see the image.", "There is no image provided.", "I can't view images.",
            "I am unable to see images.", "I do not have the ability to view images.", "No image was attached.",
            "Please provide an image so I can answer.", "I'm not able to open the attachment.",
            "No picture has been uploaded.", "Please upload the photo.", "There is no image.", "No image.",
            "There is no image attached.",
            "There's no image.", "I do not have access to the image.", "The image is not visible to me.",
            "Image not provided.", "No picture was shared with me.", "Nothing, since no image was included.",
            "None of the listed body parts can be identified as no image was shared.", "I see no image.",
            "I can't determine that without an image.", "I don't see an image attached."]


def test_safety_task(pipe):
    assert SAFETY.mode == "replace"
    raw = '1. "Blood."\n2) gore;\n- Unsafe elements: a Knife\n* BLOOD\n• none\n\n'
    assert SAFETY.parse(raw) == ["blood", "gore", "knife"]
    for nothing in NOTHING:
        assert SAFETY.parse(nothing) == [] and CREATIVE.parse(nothing) == [], nothing
    assert SAFETY.parse("There is no nudity; blood, a knife") == ["blood", "knife"]
    tok = pipe.tokenizer
    assert SAFETY.negative(["blood", "gore"], tok) == "blood, gore"
    assert SAFETY.negative([], tok) is None
    items = [f"unwanted element number {i}" for i in range(60)]
    negative, full = SAFETY.negative(items, tok), ", ".join(items)
    assert full.startswith(negative) and not negative.endswith(",")
    assert 60 <= len(tok.encode(negative)) <= 75  # cut to the 77 positions less BOS and EOS
    assert tok(negative)[0, len(tok.encode(negative)) + 1] == tok.eos_id
    assert len(SAFETY.negative(items * 20)) <= 1000  # without a tokenizer: the character cap
    start = time.perf_counter()
    assert SAFETY.parse("blood, " * 200_000) == ["blood"]  # a huge reply is capped before parsing
    assert time.perf_counter() - start < 1


def test_creative_task():
    assert CREATIVE.mode == "accumulate"
    assert CREATIVE.parse("A golden retriever.") == ["golden retriever"]
    assert CREATIVE.parse("Watercolor, the dog") == ["watercolor", "dog"]
    assert CREATIVE.negative(["dog", "watercolor"]) == "dog, watercolor"
    with pytest.raises(ValueError, match="unknown VLM task"):
        get_task("nsfw")


def test_the_negative_fits_both_sdxl_tokenizers(sdxl):
    """The task's negative is cut to what the text encoders read: 75 tokens of each SDXL tokenizer."""
    pipe = weights.load_pipeline(sdxl)
    text = get_task("creative").negative([f"item{i} with many words" for i in range(60)], pipe.tokenizer)
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert len(tokenizer.encode(text)) <= tokenizer.max_length - 2


def test_refusals():
    for refusal in REFUSALS:
        assert is_refusal(refusal), refusal
    for answer in NOTHING + ["feet, belly", "I can't see any bare body parts.", "I cannot spot any of them.",
                             "Blood and a knife.", "A sorry-looking dog.", "I can't see any feet.",
                             "There is no nudity in the image.", "None of the listed body parts are visible.",
                             "The image shows no buttocks.", "No image of feet, but a belly.",
                             "The image is not explicit.", "A belly, seen without an umbrella.", "I see no feet."]:
        assert not is_refusal(answer), answer


def test_query_schedules():
    assert default_query_steps(50) == [5, 6, 7, 9, 12, 16, 21, 27, 34, 42]
    assert default_query_steps(25) == [3, 4, 5, 6, 8, 11, 14, 17, 21]
    assert default_query_steps(100) == [10, 12, 14, 18, 24, 32, 42, 54, 68, 84]
    for n in (1, 4, 10, 1000):
        steps = default_query_steps(n)
        assert steps == sorted(set(steps)) and all(0 <= s < n for s in steps) and steps
    assert parse_steps("5, 6,7,6") == [5, 6, 7]
    assert parse_steps("") == [] and parse_steps("none") == []
    for bad, message in [("5,a", "not a step index"), ("5,,6", "not a step index"), ("1.5", "not a step index"),
                         ("-1", "negative"), ("3,50", "out of range")]:
        with pytest.raises(ValueError, match=message):
            parse_steps(bad, num_steps=50)


# ---------------------------------------------------------------------------------------------
# the client

def test_request_shape(pipe, server, monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_API_KEY", "test-key")
    server = server("female breast")
    client = VLMClient(server.url, "Qwen/Qwen2.5-VL-7B-Instruct", NUDITY, max_tokens=32, timeout=5, image_size=None)
    recorder = Recorder(decode_steps={1, 3})
    draw(pipe, "a cat", [DynamicNegatives(client, NUDITY, [1, 3]), recorder])

    assert len(server.requests) == 2
    for request, step in zip(server.requests, [1, 3]):
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer test-key"
        assert request["headers"]["Content-Type"] == "application/json"
        body = request["json"]
        assert body["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
        assert body["temperature"] == 0 and body["max_tokens"] == 32
        [message] = body["messages"]
        assert message["role"] == "user"
        text, image = message["content"]
        assert text == {"type": "text", "text": NUDITY.question}
        assert image["type"] == "image_url"
        sent = png_from_data_uri(image["image_url"]["url"], tmp_path)
        assert torch.equal(sent, recorder.decoded[step][0])  # the decoded x0 prediction, at the query step


def test_api_key_and_image_size(server, monkeypatch, tmp_path):
    server = server("feet")
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    monkeypatch.delenv("VLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    reply = VLMClient(server.url + "/", "m", NUDITY, timeout=5)(image, "a cat", 0)
    assert reply == Reply(["feet"], "feet", None, reply.latency) and reply.latency > 0
    assert "Authorization" not in server.requests[-1]["headers"]
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")  # OpenAI's key goes to OpenAI alone
    VLMClient(server.url + "/chat/completions", "m", NUDITY, timeout=5)(image, "a cat", 0)
    assert "Authorization" not in server.requests[-1]["headers"]
    assert server.requests[-1]["path"] == "/v1/chat/completions"
    assert VLMClient("https://api.openai.com/v1", "m", NUDITY).api_key == "openai-key"
    monkeypatch.setenv("VLM_API_KEY", "vlm-key")
    VLMClient(server.url, "m", NUDITY, timeout=5)(image, "a cat", 0)
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer vlm-key"

    # 448 on the longer side, the paper's 448x448 for square images, aspect kept
    sent = png_from_data_uri(server.requests[-1]["json"]["messages"][0]["content"][1]["image_url"]["url"], tmp_path)
    assert sent.shape == (299, 448, 3) and torch.equal(sent, prepare_image(image, 448))
    flat = prepare_image(torch.full((3, 32, 32), 0.2), 448)
    assert flat.shape == (448, 448, 3)
    assert torch.equal(flat, to_uint8(torch.full((1, 3, 1, 1), 0.2))[0].expand(448, 448, 3))
    with pytest.raises(ValueError, match="expected http"):
        VLMClient("file:///etc/passwd", "m", NUDITY)


def test_reply_forms(server):
    image = torch.zeros(3, 8, 8)
    server = server(dict(body=completion([{"type": "text", "text": "feet, "}, {"type": "text", "text": "belly"}])),
                        "<think>the female breast is</think>armpits",
                        dict(body={"error": {"message": "model overloaded"}}),
                        dict(body=completion(None)),
                        "feet \ud83d")  # valid JSON, but a lone surrogate is no Unicode text
    client = VLMClient(server.url, "m", NUDITY, timeout=5)
    assert client(image, "p", 0).items == ["feet", "belly"]
    assert client(image, "p", 0).items == ["armpits"]
    assert client(image, "p", 0).error == "server error: model overloaded"
    assert client(image, "p", 0).error == "empty reply"
    reply = client(image, "p", 0)
    assert reply.raw == "feet \ufffd" and reply.items == ["feet"]
    reply.raw.encode("utf-8")


@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
def test_the_timeout_bounds_the_whole_request(headers):
    """The socket's timeout bounds each read; a byte every 0.1 s would keep a request alive for ~20 s."""
    trickle = Trickle(headers)
    try:
        start = time.perf_counter()
        reply = VLMClient(trickle.url, "m", NUDITY, timeout=1)(torch.zeros(3, 8, 8), "p", 0)
        took = time.perf_counter() - start
    finally:
        trickle.close()
    assert reply.error == f"no complete answer from {trickle.url}/chat/completions within 1 s", reply
    assert reply.items == [] and took < 1.8


# ---------------------------------------------------------------------------------------------
# the hook: schedule, replace / accumulate, guidance, batches

class CountingVAE:
    def __init__(self, vae):
        self.vae, self.config, self.calls = vae, vae.config, 0

    def decode(self, latents):
        self.calls += 1
        return self.vae.decode(latents)


def test_a_failed_query_is_warned_on_a_line_of_its_own_beside_the_progress_bar(pipe, capsys):
    """The bar redraws its line with a carriage return and no newline: a warning printed beside it
    would land after the bar's text. tqdm.write clears the bar first."""
    failing = lambda image, prompt, step: Reply([], "", "HTTP 500 overloaded")  # noqa: E731
    generate(pipe, "a cat", steps=STEPS, height=SIZE, width=SIZE, seed=0, progress=True,
             hooks=[DynamicNegatives(failing, NUDITY, [1, 3])])
    pieces = [piece for piece in re.split(r"[\r\n]", capsys.readouterr().err) if "warning" in piece]
    assert pieces == [f"warning: VL-DNP query at step {i} for image 0 failed: HTTP 500 overloaded; no negative "
                      "is in force yet" for i in (1, 3)]


def test_queries_and_decodes_only_at_the_schedule(pipe):
    counted = dataclasses.replace(pipe, vae=CountingVAE(pipe.vae))
    proposer = Scripted(NUDITY, {})
    draw(counted, ["a cat", "a dog"], [DynamicNegatives(proposer, NUDITY, [0, 2, 5])])
    assert [(step, prompt) for step, prompt, _ in proposer.calls] == [
        (0, "a cat"), (0, "a dog"), (2, "a cat"), (2, "a dog"), (5, "a cat"), (5, "a dog")]
    assert all(image.shape == (3, SIZE, SIZE) for _, _, image in proposer.calls)
    assert counted.vae.calls == 3 + 1  # one batched decode per query step, and the final image

    counted.vae.calls, recorder = 0, Recorder()
    draw(counted, "a cat", [DynamicNegatives(proposer, NUDITY, []), recorder])  # an empty schedule
    assert counted.vae.calls == 1 and len(proposer.calls) == 6
    assert recorder.negatives == [[None]] * STEPS and recorder.scales == [[7.5]] * STEPS

    counted.vae.calls, recorder = 0, Recorder()  # static: the same negative, no image needed
    draw(counted, "a cat", [DynamicNegatives(FixedProposer(NUDITY.concepts), NUDITY, [0], negative_scale=9), recorder])
    everything = "Nudity, Sexual, " + ", ".join(NUDITY.concepts) + "."
    assert counted.vae.calls == 1 and recorder.negatives == [[everything]] * STEPS and recorder.scales == [[9]] * STEPS
    counted.vae.calls, recorder = 0, Recorder()
    draw(counted, "a cat", [DynamicNegatives(FixedProposer([]), NUDITY, [0, 3]), recorder])
    assert counted.vae.calls == 1 and recorder.negatives == [[None]] * STEPS


@pytest.mark.parametrize("steps", [[2, STEPS], [-1, 2]])
def test_query_steps_the_chain_never_takes_are_refused(pipe, steps):
    """A query step past the chain's last (or below 0) never runs, yet the PNG and the trace listed it: refused,
    as --vlm-steps is (methods/vldnp_cli.py), before any query."""
    proposer = Scripted(NUDITY, {})
    with pytest.raises(ValueError, match=fr"query steps \[{steps[0]}, {steps[1]}\]: the chain takes steps 0 to {STEPS - 1}"):
        draw(pipe, "a cat", [DynamicNegatives(proposer, NUDITY, steps)])
    assert proposer.calls == []


class Shrinking(Scripted):
    """A Scripted proposer that scales an image of any size by `scale` before looking at it."""

    def __init__(self, task, scale):
        super().__init__(task, {})
        self.scale, self.asked = scale, []

    def input_scale(self, height, width):
        self.asked.append((height, width))
        return self.scale


class X0Recorder:
    def __init__(self):
        self.x0 = {}

    def __call__(self, state):
        self.x0[state.i] = state.x0.clone()


@pytest.mark.parametrize("scale, k", [(1.0, 1), (0.75, 1), (0.5, 2), (0.45, 2), (0.3, 3), (0.26, 3), (0.25, 4), (3.0, 1)])
def test_x0_is_decoded_as_large_as_the_proposer_looks(pipe, scale, k):
    """The proposer gets the decode of x0 average-pooled over k×k latents, k the largest factor
    that keeps the preview at least `scale` times the image; --full-decode gets the whole x0."""
    size = 48  # the tiny VAE halves: 24x24 latents, which 2, 3 and 4 divide
    for full in (False, True):
        proposer, x0 = Shrinking(NUDITY, scale), X0Recorder()
        hook = DynamicNegatives(proposer, NUDITY, [1], full_decode=full)
        generate(pipe, ["a cat", "a dog"], steps=3, height=size, width=size, seed=0, hooks=[hook, x0], progress=False)
        kk = 1 if full else k
        expected = pipe.vae.decode(torch.nn.functional.avg_pool2d(x0.x0[1], kk) if kk > 1 else x0.x0[1])
        assert proposer.asked == ([] if full else [(size, size)])
        assert hook.decode_factor == kk and trace_dict(hook)["decode_factor"] == kk
        for b, (_, _, image) in enumerate(proposer.calls):
            assert image.shape == (3, size // kk, size // kk)
            torch.testing.assert_close(image, expected[b].float(), rtol=0, atol=1e-5)  # float rounding: oneDNN picks its kernels per shape


def test_x0_preview_of_an_uneven_size(pipe):
    """Latents that k does not divide: the preview covers them all, rounded up to whole latents."""
    for (h, w), shape in [((40, 24), (20, 12)), ((42, 26), (22, 14))]:  # latents 20x12 -> 10x6; 21x13 -> 11x7
        proposer = Shrinking(NUDITY, 0.5)
        generate(pipe, "a cat", steps=2, height=h, width=w, seed=0, progress=False,
                 hooks=[DynamicNegatives(proposer, NUDITY, [0])])
        assert proposer.asked == [(h, w)] and proposer.calls[0][2].shape == (3, *shape)


def test_proposer_input_scales():
    client = VLMClient("http://127.0.0.1:9/v1", "m", NUDITY, image_size=448)
    assert client.input_scale(512, 512) == 448 / 512 and client.input_scale(768, 1024) == 448 / 1024
    assert VLMClient("http://127.0.0.1:9/v1", "m", NUDITY, image_size=None).input_scale(64, 64) == 1.0


def test_replace_and_accumulate(pipe):
    recorder = Recorder()
    script = {1: "Blood, gore", 2: "None.", 3: "weapon"}
    draw(pipe, "a cat", [DynamicNegatives(Scripted(SAFETY, script), SAFETY, [1, 2, 3], negative_scale=11), recorder])
    assert recorder.negatives == [[None], ["blood, gore"], [None], ["weapon"], ["weapon"], ["weapon"]]
    assert recorder.scales[1:] == [[11]] * (STEPS - 1)

    recorder = Recorder()
    script = {1: "A dog.", 2: "watercolor, dog", 3: "none"}
    draw(pipe, "a cat", [DynamicNegatives(Scripted(CREATIVE, script), CREATIVE, [1, 2, 3]), recorder])
    assert recorder.negatives == [[None], ["dog"], ["dog, watercolor"], ["dog, watercolor"], ["dog, watercolor"],
                                  ["dog, watercolor"]]


def test_guidance_matches_reference(pipe, reference, server, tmp_path):
    """The whole formula ε = ε_u + g(ε_c − ε_u) − w_neg(ε_n − ε_u), with the negative switched on at
    one query step and replaced at another, against a loop on the diffusers components."""
    server = server("female breast", "Feet and belly.")
    client = VLMClient(server.url, "m", NUDITY, timeout=5, image_size=None)
    dnp, recorder = DynamicNegatives(client, NUDITY, [1, 3], negative_scale=15), Recorder()
    image = draw(pipe, "a cat", [dnp, recorder])

    first, second = "Nudity, Sexual, female breast.", "Nudity, Sexual, feet, belly."
    xs, x0s, ref_image = reference.sample("a cat", noise(1), {1: first, 3: second}, w=15)
    for ours, ref in zip(recorder.x, xs, strict=True):
        assert_close_rel(ours, ref)
    assert_images_close(image, ref_image)
    for request, step in zip(server.requests, [1, 3]):  # what the VLM saw: the reference's x0
        assert_images_close(png_from_data_uri(request["json"]["messages"][0]["content"][1]["image_url"]["url"],
                                              tmp_path), x0s[step][0])

    plain, _, _ = reference.sample("a cat", noise(1), {})
    late, _, _ = reference.sample("a cat", noise(1), {2: first, 3: second}, w=15)
    assert rel_err(xs[-1], plain[-1]) > 1e-2 and rel_err(xs[-1], late[-1]) > 1e-3  # the test can tell

    timesteps = DDIMScheduler.from_config(reference.scheduler_config)
    timesteps.set_timesteps(STEPS)
    trace = [dataclasses.asdict(q) for q in dnp.trace[0]]
    assert [(q["step"], q["timestep"], q["negative"], q["took_effect"], q["error"]) for q in trace] == [
        (1, int(timesteps.timesteps[1]), first, 1, None), (3, int(timesteps.timesteps[3]), second, 3, None)]
    assert [q["raw"] for q in trace] == ["female breast", "Feet and belly."]


def test_batch_independence(pipe, reference):
    """Each image gets its own x0, query and negative: a batch of 2 gives each image what a single
    image gives with its own answers."""
    script = {("a cat", 1): "female breast", ("a cat", 3): "none", ("a dog", 1): "none", ("a dog", 3): "male breast"}
    proposer, recorder = Scripted(NUDITY, script), Recorder(decode_steps={1, 3})
    draw(pipe, ["a cat", "a dog"], [DynamicNegatives(proposer, NUDITY, [1, 3]), recorder])
    for step, prompt, image in proposer.calls:
        b = ["a cat", "a dog"].index(prompt)
        assert torch.equal(to_uint8(image[None]), recorder.decoded[step][b:b + 1])

    negatives = {"a cat": {1: "Nudity, Sexual, female breast.", 3: None},
                 "a dog": {1: None, 3: "Nudity, Sexual, male breast."}}
    for b, prompt in enumerate(["a cat", "a dog"]):
        xs, _, _ = reference.sample(prompt, noise(2)[b:b + 1], negatives[prompt])
        for ours, ref in zip(recorder.x, xs, strict=True):
            assert_close_rel(ours[b:b + 1], ref)


# ---------------------------------------------------------------------------------------------
# faults and asynchronous queries

FAULTS = {
    "down": None,
    "slow": dict(content="feet", delay=3),
    "http 404": dict(status=404, body={"error": {"message": "model 'm' not found"}}),
    "http 500": dict(status=500, body=b"Internal Server Error"),
    "malformed json": dict(body=b'{"choices": [{"message": {"content": "feet'),
    "missing fields": dict(body={"id": "x", "choices": []}),
    "empty reply": dict(content=""),
    "huge reply": dict(content="feet, " * 2000),
    "huge response": dict(body=b" " * (2 << 20)),
    "refusal": dict(content="I'm sorry, I can't help with that."),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_faults_keep_the_negative(pipe, server, capsys, fault):
    good = VLMClient(server("female breast").url, "m", NUDITY, timeout=1, image_size=None)
    bad = VLMClient(dead_url() if fault == "down" else server(FAULTS[fault]).url, "m", NUDITY, timeout=1,
                    image_size=None)
    dnp, recorder = DynamicNegatives(lambda image, prompt, step: (good if step == 1 else bad)(image, prompt, step),
                                     NUDITY, [1, 3]), Recorder()
    capsys.readouterr()
    draw(pipe, "a cat", [dnp, recorder])

    kept = "Nudity, Sexual, female breast."
    assert recorder.negatives == [[None]] + [[kept]] * (STEPS - 1)
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: VL-DNP query at step 3 for image 0 failed")
    failed = dnp.trace[0][1]
    assert failed.error and "\n" not in failed.error and failed.error in warning
    assert failed.items == [] and failed.negative == kept and failed.took_effect == 3
    if fault == "slow":
        assert failed.latency < 2.5
    if fault == "refusal":
        assert failed.error == "the model declined to answer: I'm sorry, I can't help with that."
        assert failed.raw == "I'm sorry, I can't help with that."


def test_the_hook_waits_no_longer_than_its_timeout(pipe, capsys):
    """A proposer that hangs (here until the test ends) costs the hook `timeout` seconds at most, in
    the sampling loop and in close(); its query fails and the negative in force is kept."""
    release = threading.Event()

    def hanging_at(steps):
        def proposer(image, prompt, step):
            if step in steps:
                release.wait(20)
            return Reply(["feet"], "feet")
        return proposer

    try:
        dnp, recorder = DynamicNegatives(hanging_at({3}), NUDITY, [1, 3], timeout=0.5), Recorder()
        draw(pipe, "a cat", [dnp, recorder])
        feet = "Nudity, Sexual, feet."
        assert recorder.negatives == [[None]] + [[feet]] * (STEPS - 1)
        failed = dnp.trace[0][1]
        assert failed.error == "no answer within 0.5 s" and failed.negative == feet and failed.took_effect == 3

        dnp = DynamicNegatives(hanging_at({4}), NUDITY, [4], asynchronous=True, timeout=0.5)
        draw(pipe, "a cat", [dnp])
        start = time.perf_counter()
        dnp.close()
        assert time.perf_counter() - start < 1.5
        assert dnp.trace[0][0].error == "no answer within 0.5 s"
    finally:
        release.set()
    assert capsys.readouterr().err.count("warning: VL-DNP query at step") == 2


def test_a_non_finite_x0_is_not_sent(pipe, capsys):
    """NaN would reach the VLM as a black image, which it would likely call harmless, dropping the negative."""
    def poison(state):  # runs before the VL-DNP hook
        if state.i == 3:
            state.x0[0, 0, 0, 0] = float("nan")

    script = {1: "female breast", 3: "none"}
    proposer, recorder = Scripted(NUDITY, script), Recorder()
    dnp = DynamicNegatives(proposer, NUDITY, [1, 3])
    draw(pipe, ["a cat", "a dog"], [poison, dnp, recorder])
    assert [(step, prompt) for step, prompt, _ in proposer.calls] == [(1, "a cat"), (1, "a dog"), (3, "a dog")]
    kept = "Nudity, Sexual, female breast."
    assert recorder.negatives == [[None, None]] + [[kept, kept]] * 2 + [[kept, None]] * (STEPS - 3)
    failed = dnp.trace[0][1]
    assert failed.error == "x0 is not finite (NaN/inf); nothing was sent" and failed.negative == kept
    assert capsys.readouterr().err.count("warning: VL-DNP query at step 3 for image 0 failed") == 1


def test_async_answer_applies_at_a_later_step(pipe, reference, server):
    release, answered = threading.Event(), threading.Event()
    server = server(dict(content="female breast", wait=release, answered=answered))
    client = VLMClient(server.url, "m", NUDITY, timeout=10, image_size=None)
    dnp = DynamicNegatives(client, NUDITY, [1], negative_scale=15, asynchronous=True)

    def gate(state):  # the answer is held back until the hook of step 4 has run
        if state.i == 4:
            release.set()
            assert answered.wait(5)
            time.sleep(0.2)

    recorder, steps = Recorder(), 8
    draw(pipe, "a cat", [dnp, recorder, gate], steps=steps)
    dnp.close()
    [query] = dnp.trace[0]
    took = query.took_effect
    assert query.step == 1 and query.error is None and 5 <= took < steps
    negative = "Nudity, Sexual, female breast."
    assert query.negative == negative
    assert recorder.negatives == [[None]] * took + [[negative]] * (steps - took)
    xs, _, _ = reference.sample("a cat", noise(1), {took: negative}, steps=steps, w=15)
    for ours, ref in zip(recorder.x, xs, strict=True):
        assert_close_rel(ours, ref)


def test_async_answer_after_sampling_is_collected(pipe, server):
    server = server(dict(content="feet", delay=1))
    dnp, recorder = DynamicNegatives(VLMClient(server.url, "m", NUDITY, timeout=5), NUDITY, [4],
                                     asynchronous=True), Recorder()
    draw(pipe, "a cat", [dnp, recorder])
    dnp.close()  # waits for the answer that came after the last step
    [query] = dnp.trace[0]
    assert recorder.negatives == [[None]] * STEPS
    assert query.raw == "feet" and query.items == ["feet"] and query.took_effect is None and query.error is None


def test_a_late_answer_keeps_the_negative_in_force(pipe):
    """An answer that arrives after sampling applies nowhere: the negative in force at the end, the
    one the image was made with, is the earlier answer's."""
    release, first = threading.Event(), "Nudity, Sexual, female breast."

    def proposer(image, prompt, step):
        if step == 4:
            release.wait(10)
        return Reply(NUDITY.parse({1: "female breast", 4: "none"}[step]), "")

    def gate(state):  # the first answer arrives before step 3
        if state.i == 2:
            time.sleep(0.3)

    dnp, recorder = DynamicNegatives(proposer, NUDITY, [1, 4], asynchronous=True), Recorder()
    draw(pipe, "a cat", [dnp, recorder, gate])
    release.set()
    dnp.close()
    assert recorder.negatives[-1] == [first] and dnp.negatives == [first]
    on_time, late = dnp.trace[0]
    assert on_time.negative == first and on_time.took_effect in (2, 3)
    assert late.error is None and late.items == [] and late.took_effect is None and late.negative == first


# ---------------------------------------------------------------------------------------------
# the trace

def test_trace_of_a_proposer_with_lone_surrogates(pipe, tmp_path):
    def proposer(image, prompt, step):
        return Reply(["blood \ud83d"], "blood \ud83d", None)
    dnp = DynamicNegatives(proposer, SAFETY, [1])
    draw(pipe, "a cat", [dnp])
    [query] = json.loads(write_trace(dnp, tmp_path / "t.json").read_text(encoding="utf-8"))["images"][0]["queries"]
    assert query["raw"] == query["negative"] == "blood \ufffd" and query["items"] == ["blood \ufffd"]


def test_trace_file_records_each_query_beside_a_filmstrip_of_what_was_sent(pipe, tmp_path, capsys):
    script = {1: "female breast", ("a dog", 3): RuntimeError("no GPU left"), 3: "feet"}
    dnp, recorder = DynamicNegatives(Scripted(NUDITY, script), NUDITY, [1, 3]), Recorder(decode_steps={1, 3})
    draw(pipe, ["a cat", "a dog"], [dnp, recorder])
    assert capsys.readouterr().err.count("warning") == 1
    path = write_trace(dnp, tmp_path / "run.json")

    trace = json.loads(path.read_text())
    assert trace["task"] == "nudity" and trace["query_steps"] == [1, 3] and trace["filmstrip"] == "run.filmstrip.png"
    cat, dog = trace["images"]
    assert cat["prompt"] == "a cat" and dog["prompt"] == "a dog"
    assert set(cat["queries"][0]) == {"step", "timestep", "raw", "items", "negative", "error", "latency", "took_effect"}
    assert [q["negative"] for q in cat["queries"]] == ["Nudity, Sexual, female breast.", "Nudity, Sexual, feet."]
    assert [q["negative"] for q in dog["queries"]] == ["Nudity, Sexual, female breast."] * 2
    assert dog["queries"][1]["error"] == "RuntimeError: no GPU left"

    strip, _ = read_png(tmp_path / "run.filmstrip.png")
    frame, pad, band = SIZE, 2, 9  # label scale 1 for 32-pixel frames
    assert strip.shape == (2 * (frame + band) + pad, 2 * (frame + pad) + pad, 3)
    for b in range(2):
        for c, step in enumerate([1, 3]):
            y, x = pad + b * (frame + band), pad + c * (frame + pad)
            assert torch.equal(strip[y:y + frame, x:x + frame], recorder.decoded[step][b])
            label = strip[y + frame + pad:y + frame + pad + 5, x:x + 3]
            glyph = {1: "010 110 010 010 111", 3: "111 001 111 001 111"}[step]  # 3x5 pixels
            assert torch.equal(label[:, :, 0] == 255, torch.tensor([[p == "1" for p in row] for row in glyph.split()]))
            failed = b == 1 and step == 3
            assert (label[:, :, 1].max() == 64) == failed  # red label for the failed query


def test_the_trace_keeps_fractional_timesteps_whole_ones_stay_ints(pipe):
    """Euler's default "linspace" layout runs the UNet at fractional timesteps: the trace records
    each query at the timestep the sampler was at, not truncated."""
    from sampler.base import SAMPLERS

    pipe = dataclasses.replace(pipe, scheduler=dataclasses.replace(pipe.scheduler, timestep_spacing="linspace"))
    for sampler in ("euler", "ddim"):
        hook = DynamicNegatives(FixedProposer(["a dog"]), NUDITY, [0, 1, 2])
        generate(pipe, "a cat", steps=3, height=16, width=16, sampler=sampler, hooks=[hook], progress=False)
        expected = SAMPLERS[sampler](pipe.scheduler, 3).timesteps.tolist()
        recorded = [q.timestep for q in hook.trace[0]]
        assert recorded == expected and any(t != int(t) for t in expected) == (sampler == "euler")
        assert all(isinstance(t, int) for t in recorded if t == int(t))
