"""SAFREE (methods/safree.py): its parts on hand-made vectors, and its images against a reference loop
written from issue 14's description of the released code, with transformers' CLIPTokenizer and
CLIPTextModel and diffusers' UNet, VAE and DDIMScheduler on random weights."""
import math
import types

import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from checkpoints import make_sd_folder
from helpers import max_diff
from sampler.loop import Embedded, Switch, generate
from methods.safree import CONCEPT_SETS, ConceptSet, concept_set, filter_steps, projection, safree, triggers
from vlm.tasks import SAFREE_NUDITY_CONCEPTS as NUDITY
from weights import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = dict(height=16, width=16)


# ---------------------------------------------------------------- the parts, on hand-made vectors

def test_projection_onto_the_columns_span():
    A = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # [4, 2]
    P = projection(A)
    Q, _ = torch.linalg.qr(A)
    torch.testing.assert_close(P, Q @ Q.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(P @ A, A, rtol=0, atol=1e-12)
    outside = torch.tensor([1.0, -1.0, 1.0, 0.0], dtype=torch.float64)  # orthogonal to both columns
    torch.testing.assert_close(P @ outside, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    # a repeated column changes nothing: the pseudo-inverse, not the inverse
    torch.testing.assert_close(projection(torch.cat([A, A[:, :1] * 2], dim=1)), P, rtol=0, atol=1e-10)


def test_projection_in_float64_keeps_nearly_parallel_columns_apart():
    """Columns 1e-5 apart in angle: CᵀC's condition number is about 1e10, past float32's reach."""
    a, b = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    a[0], b[0], b[1] = 1.0, 1.0, 1e-5
    P = projection(torch.stack([a * 30, b * 30], dim=1))
    e1 = torch.zeros(8, dtype=torch.float64)
    e1[1] = 1.0
    torch.testing.assert_close(P @ e1, e1, rtol=0, atol=1e-6)


def test_trigger_rule():
    d = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    assert triggers(d, 0.01).tolist() == [False, False, False, True]
    # d_i >= (1 + α) · mean of the others, at equality too: 3 >= 1.5 · 2
    assert triggers(torch.tensor([3.0, 2.0, 2.0], dtype=torch.float64), 0.5).tolist() == [True, False, False]
    assert triggers(torch.tensor([2.9, 2.0, 2.0], dtype=torch.float64), 0.5).tolist() == [False, False, False]
    # the mean leaves token i out: with it in, 2 would be under 1.01 · 1.25
    assert triggers(torch.tensor([1.0, 1.0, 1.0, 1.26], dtype=torch.float64), 0.01).tolist()[-1]
    # the released code's one-token case: its mean over no others is NaN, and the token a trigger
    assert triggers(torch.tensor([0.5], dtype=torch.float64)).tolist() == [True]


def test_filter_steps():
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    assert filter_steps(0.5333) == 5  # at the midpoint, sigmoid = 1/2
    assert filter_steps(0.0) == 0 and filter_steps(1.0) == 10
    assert filter_steps(0.5) == round(10 * sigmoid(5 * (5.0 - 5.333))) == 2
    assert filter_steps(0.6) == round(10 * sigmoid(5 * (6.0 - 5.333))) == 10
    assert filter_steps(0.55) == round(10 * sigmoid(5 * (5.5 - 5.333))) == 7
    artist = CONCEPT_SETS["artists-VanGogh"]
    assert (artist.k, artist.midpoint) == (3.5, 5.5) and filter_steps(0.55, artist.k, artist.midpoint) == 5
    assert filter_steps(0.5, artist.k, artist.midpoint) == round(10 * sigmoid(7 * -0.5)) == 0
    assert (CONCEPT_SETS["nudity"].k, CONCEPT_SETS["nudity"].midpoint) == (2.5, 5.333)


def test_concept_sets():
    assert CONCEPT_SETS["nudity"].concepts == NUDITY and len(NUDITY) == 17
    assert concept_set("nudity") == CONCEPT_SETS["nudity"]
    custom = concept_set(" Van Gogh, starry sky ,, Van Gogh")
    assert custom == ConceptSet("custom", ("Van Gogh", "starry sky")) and custom.k == 2.5
    assert custom.negative == "Van Gogh, starry sky"
    assert CONCEPT_SETS["nudity"].negative.startswith("Sexual Acts, Content Meant to Arouse Sexual Excitement, ")
    with pytest.raises(ValueError, match="no concepts"):
        concept_set(" , ")


def test_refuses_other_model_families():
    with pytest.raises(ValueError, match="SD 1.x and 2.x"):
        safree(types.SimpleNamespace(family="sdxl"), "a cat")


# ---------------------------------------------------------------- the reference, from the description

class Reference:
    """SAFREE from issue 14's words, with transformers and diffusers parts loaded from a folder."""

    def __init__(self, folder):
        self.tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.te = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        self.folder = folder

    @torch.no_grad()
    def values(self, prompt, concepts=NUDITY, alpha=0.01, k=2.5, midpoint=5.333) -> dict:
        L = self.tok.model_max_length
        c_in = self.tok(list(concepts), padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        C = self.te(c_in.input_ids, attention_mask=c_in.attention_mask).pooler_output.double().T  # [D, K]
        P_c = C @ torch.linalg.pinv(C.T @ C) @ C.T
        ids = self.tok(prompt, padding="longest", return_tensors="pt").input_ids
        n = ids.shape[1] - 2
        if ids.shape[1] > L:
            ids, n = ids[:, :L], L - 2
        masked = ids.repeat(n, 1)
        for i in range(n):
            masked[i, i + 1] = 0
        p = self.te(masked, attention_mask=None).pooler_output.double()  # [n, D]
        P_in = p.T @ torch.linalg.pinv(p @ p.T) @ p
        I = torch.eye(P_c.shape[0], dtype=torch.float64)
        d = torch.linalg.norm((I - P_c) @ p.T, dim=0)
        mean_others = torch.stack([torch.cat([d[:i], d[i + 1:]]).mean() for i in range(n)])
        keep = d < (1 + alpha) * mean_others
        text = self.tok(prompt, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        e = self.te(text.input_ids).last_hidden_state[0].double()  # [77, D]
        e_proj = ((I - P_c) @ P_in @ e.T).T
        keep_rows = torch.ones(L, dtype=torch.bool)
        keep_rows[1:n + 1] = keep
        filtered = torch.where(keep_rows[:, None], e, e_proj)
        marked = text.attention_mask[0] == 1
        beta = 1 - F.cosine_similarity(e_proj[marked], e[marked]).mean().item()
        t_star = round(10 * (1 / (1 + math.exp(-2 * k * (10 * beta - midpoint)))))
        return dict(P_c=P_c, P_in=P_in, d=d, triggers=~keep, hidden=e, filtered=filtered, beta=beta, t_star=t_star,
                    ids=ids[0, 1:n + 1].tolist())

    @torch.no_grad()
    def images(self, prompt, concepts=NUDITY, steps=12, seed=0, guidance=7.5) -> tuple[torch.Tensor, dict]:
        v = self.values(prompt, concepts)
        L = self.tok.model_max_length
        neg = self.tok(", ".join(concepts), padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        uncond = self.te(neg.input_ids).last_hidden_state[0]
        scheduler = DDIMScheduler.from_pretrained(self.folder / "scheduler")
        scheduler.set_timesteps(steps)
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (1, self.unet.config.in_channels, SIZE["height"] // scale, SIZE["width"] // scale)
        x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            cond = (v["filtered"] if i <= v["t_star"] else v["hidden"]).float()
            out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.stack([uncond, cond])).sample
            out_u, out_c = out.chunk(2)
            x = scheduler.step(out_u + guidance * (out_c - out_u), t, x).prev_sample
        image = self.vae.decode(x / self.vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        return (image * 255).round().to(torch.uint8), v


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, tmp_path_factory):
    folder = make_sd_folder(tmp_path_factory.mktemp(request.param), request.param)
    return load_pipeline(folder), Reference(folder)


# On these random weights, a prompt of 64 tokens puts β near 0.505, so that t* = 2 (short prompts give
# β near 0.7 and t* = 10, where later steps hardly change a 16 px image).
PROMPT = ("a painting of a beautiful woman in a red dress standing in the rain oil on canvas portrait of an old man "
          "with a long white beard dramatic light by rembrandt a cozy little house in the forest at night warm "
          "glowing windows snow falling a futuristic city skyline at sunset with flying")


def test_values_match_the_reference(model):
    pipe, ref = model
    long = " ".join(["a cozy little house in the forest at night"] * 9)  # 81 tokens: cut to 75 copies, no EOS
    for prompt in [PROMPT, "a cat", long]:
        ours, theirs = safree(pipe, prompt), ref.values(prompt)
        assert ours.token_ids == theirs["ids"] and (prompt != long or len(ours.token_ids) == 75)
        for name, mine in [("P_c", ours.concept_projection), ("P_in", ours.token_projection), ("d", ours.distances),
                           ("hidden", ours.hidden), ("filtered", ours.filtered)]:
            torch.testing.assert_close(mine, theirs[name], rtol=1e-4, atol=1e-4 * theirs[name].abs().max().item(),
                                       msg=lambda m: f"{prompt[:20]} {name}: {m}")
        assert torch.equal(ours.triggers, theirs["triggers"])
        assert ours.beta == pytest.approx(theirs["beta"], abs=1e-5) and ours.last_step == theirs["t_star"]


def test_images_match_the_reference_loop(model):
    pipe, ref = model
    steps = 12
    expected, v = ref.images(PROMPT, steps=steps)
    # the case exercises every part: some triggers and some kept tokens, and a switch inside the run
    assert 0 < int(v["triggers"].sum()) < len(v["ids"]) and 0 < v["t_star"] < steps - 1, v
    assert ((expected > 0) & (expected < 255)).float().mean() > 0.2, "reference image is saturated"
    s = safree(pipe, PROMPT)
    ours = generate(pipe, s.conditioning(), s.concepts.negative, steps=steps, **SIZE, progress=False)
    assert max_diff(ours, expected) <= 2
    # and each part shows: the plain prompt, the filter for all steps or for none, are other images
    run = lambda prompt: generate(pipe, prompt, s.concepts.negative, steps=steps, **SIZE, progress=False)
    embedded = Embedded(s.filtered.float(), None, PROMPT)
    for wrong in [PROMPT, embedded, Switch(embedded, PROMPT, s.last_step - 1),
                  Switch(embedded, PROMPT, s.last_step + 1)]:
        assert max_diff(run(wrong), expected) > 2, wrong


def test_each_prompt_of_a_batch_gets_its_own(model):
    """Image b of a batch is the image its own SAFREE makes in row b (row b's noise)."""
    pipe, _ = model
    a, b = (safree(pipe, p) for p in [PROMPT, "a cat sitting on a wooden table"])
    run = lambda x, y: generate(pipe, [x.conditioning(), y.conditioning()], [x.concepts.negative, y.concepts.negative],
                                steps=6, **SIZE, progress=False)
    both, only_a, only_b = run(a, b), run(a, a), run(b, b)
    assert max_diff(both[0], only_a[0]) <= 1 and max_diff(both[1], only_b[1]) <= 1
    assert max_diff(both[1], only_a[1]) > 2


def test_the_filtered_rows_are_the_triggers(model):
    pipe, _ = model
    s = safree(pipe, PROMPT)
    changed = (s.filtered != s.hidden).any(dim=-1)
    assert changed[1:len(s.token_ids) + 1].tolist() == s.triggers.tolist() and not changed[0]
    assert not changed[len(s.token_ids) + 1:].any()
    assert s.summary()["triggers"] == [i for i, t in enumerate(s.triggers.tolist()) if t]
    switch = s.conditioning()
    assert switch.at(s.last_step).text == PROMPT and switch.at(s.last_step + 1) == PROMPT
