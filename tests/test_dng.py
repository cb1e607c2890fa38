"""Dynamic Negative Guidance (methods/dng.py): the posterior update against a transcription of the
released `compute_posterior_DNG`, on random tensors and along a real sampling trace; the static
limit; an unrelated negative; seeds; the trace and the PNG; the samplers it refuses; evaluate.py's
sweep over λ; VL-DNP with the dng schedule. Random-weight SD1 checkpoint."""
import json
import math
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
import torch

import evaluate
import generate
from evaluation.plot import pareto_svg
from helpers import run
from methods.dng import DNG, Strength, update
from methods.vldnp import VLDNP
from png_reader import read_png
from sampler.ddim import DDIM
from sampler.euler import EulerAncestral
from sampler.loop import Embedded
from sampler.loop import generate as sample
from sampler.schedule import SchedulerConfig
from vlm.base import Reply
from vlm.tasks import NUDITY

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a person on a beach"
SMALL = ["--steps", "4", "--height", "16", "--width", "16", "--device", "cpu", "--quiet"]


# ---------------------------------------------------------------- the released posterior update

def released_posterior(diffusion, t, p_prev, new_x, x, eps, bad_eps, temp, p_min, p_max, offset):
    """compute_posterior_DNG of the released code (FelixKoulischer/Dynamic-Negative-Guidance,
    utils/Generate_Batch_pretrained.py), transcribed from its equations: DDPM's step from index t to
    t − 1 has the mean μ(ε) = (x − (1 − α_t)/√(1 − ᾱ_t)·ε)/√α_t and the variance
    σ² = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·(1 − α_t); the unconditional model gives ε, the to-forget model
    bad_ε, and p ← clamp(p·exp((−temp·(‖x' − μ(bad_ε)‖² − ‖x' − μ(ε)‖²) + offset)/(2σ²)), p_min, p_max)."""
    a_t, abar_t = diffusion.alphas[t], diffusion.alphas_cumprod[t]
    abar_prev = diffusion.alphas_cumprod[t - 1] if t > 0 else abar_t
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - a_t)
    mean = lambda e: (x.flatten(1) - (1 - a_t) / (1 - abar_t).sqrt() * e.flatten(1)) / a_t.sqrt()  # noqa: E731
    diff = ((new_x.flatten(1) - mean(bad_eps)) ** 2).sum(1) - ((new_x.flatten(1) - mean(eps)) ** 2).sum(1)
    return (p_prev * torch.exp(1 / (2 * variance) * (-temp * diff + offset))).clamp(p_min, p_max)


def ddpm_chain(ddim: DDIM) -> SimpleNamespace:
    """The released code's `diffusion` for the chain of timesteps a DDIM visits, in float64: index
    k = N − i is step i's timestep and k − 1 the one it steps to, so that DDIM at eta = 1 takes the
    step DDPM takes (Song et al. 2021, eq. 16)."""
    abar = torch.cat([ddim.alpha_bar_prev[-1:], ddim.alpha_bar.flip(0)]).double()  # [N + 1], ascending k
    return SimpleNamespace(alphas_cumprod=abar, alphas=abar / torch.cat([abar[:1], abar[:-1]]))


def ours(ddim, i, p, x, x_next, out_u, out_n, strength):
    mean_u, sigma = ddim.transition(out_u, i, x, eta=1.0)
    mean_n, _ = ddim.transition(out_n, i, x, eta=1.0)
    return update(p, x_next, mean_u, mean_n, float(sigma) ** 2, strength)


def test_the_update_is_the_released_codes_on_random_tensors():
    ddim, g = DDIM(SchedulerConfig(), 20), torch.Generator().manual_seed(0)
    chain, N = ddpm_chain(ddim), 20
    inside = 0
    for i in (0, 7, 18):
        x, out_u, out_n, z = (torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
        mean, sigma = ddim.transition(out_u + 7.5 * (out_n - out_u) / 4, i, x, eta=1.0)
        x_next = mean + float(sigma) * z
        p = torch.tensor([0.01, 0.2, 0.6], dtype=torch.float64)
        for temperature in (1e-3, 1e-2, 1e-1, 1.0):
            strength = Strength(temperature=temperature, offset=0.05, p_min=1e-4, p_max=0.95)
            expected = released_posterior(chain, N - i, p, x_next, x, out_u, out_n, temperature, 1e-4, 0.95, 0.05)
            torch.testing.assert_close(ours(ddim, i, p, x, x_next, out_u, out_n, strength), expected,
                                       rtol=1e-5, atol=1e-12)
            inside += int(((expected > 1e-4) & (expected < 0.95)).sum())
    assert inside >= 10  # the comparison is not only of the clamps


def test_euler_ancestral_draws_from_ddims_eta_1_gaussian():
    """euler-a's step is DDIM's at eta = 1 at the same timesteps, so the two weigh a step alike."""
    config = SchedulerConfig(timestep_spacing="leading")
    ddim, euler = DDIM(config, 10), EulerAncestral(config, 10)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    for i in range(9):
        (m1, s1), (m2, s2) = ddim.transition(out, i, x, eta=1.0), euler.transition(out, i, x)
        torch.testing.assert_close(m1, m2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(float(s1), float(s2), rtol=1e-4, atol=0)


def test_the_update_is_the_released_codes_along_a_sampling_trace(pipe):
    """DNG at DDIM eta = 1, the released code's DDPM step, over 10 steps: replaying the released
    update on the recorded x_t, ε_u and ε_n gives the p_t the hook used at every step."""
    strength = Strength(lam=5.0, temperature=0.05, offset=0.01, p_min=1e-4)
    plan = DNG(strength, "a red car").plan(pipe, PROMPT)
    seen = []
    record = lambda s: seen.append((s.x, torch.stack([s.outputs[("u", b, "")] for b in range(2)]),  # noqa: E731
                                    torch.stack([s.outputs[("n", b, "a red car")] for b in range(2)])))
    plan.arguments["hooks"].append(record)
    sample(pipe, PROMPT, steps=10, height=32, width=32, batch=2, seed=4, eta=1.0, sampler="ddim", progress=False,
           **plan.arguments)
    chain = ddpm_chain(DDIM(pipe.scheduler, 10))
    p = torch.full((2,), strength.prior, dtype=torch.float64)
    for i in range(10):
        if i:
            (x, eps, bad), (x_next, _, _) = seen[i - 1], seen[i]
            p = released_posterior(chain, 10 - (i - 1), p, x_next.double(), x.double(), eps.double(), bad.double(),
                                   strength.temperature, strength.p_min, strength.p_max, strength.offset)
        got = [plan.hook.steps[b][i]["p"] for b in range(2)]
        assert got == pytest.approx(p.tolist(), rel=1e-3), i
    assert len({round(s["p"], 6) for s in plan.hook.steps[0]}) > 5  # p moved, not stuck at a clamp


# ---------------------------------------------------------------- behaviour

def test_the_static_limit_is_the_static_baseline(sd1, tmp_path, capsys):
    """At temperature 0 and offset 0, p_t stays at the prior: the image is method static's at
    w_neg = λπ/(1 − π), and the trace says so at every step."""
    common = [PROMPT, "--model", sd1, *SMALL, "--sampler", "euler-a", "--seed", 2, "--static-negative", "a red car"]
    code, _, err = run(generate.main, capsys, *common, "--method", "dng", "--dng-lambda", 6, "--dng-temperature", 0,
                       "--dng-offset", 0, "--out", tmp_path / "dng.png", "--trace", tmp_path / "dng.json")
    assert code == 0, err
    w = 6 * 0.01 / (1 - 0.01)
    code, _, err = run(generate.main, capsys, *common, "--method", "static", "--negative-scale", repr(w), "--out",
                       tmp_path / "s.png")
    assert code == 0, err
    assert torch.equal(read_png(tmp_path / "dng.png")[0], read_png(tmp_path / "s.png")[0])
    steps = json.loads((tmp_path / "dng.json").read_text())["images"][0]["steps"]
    assert [(s["p"], s["w_neg"]) for s in steps] == [(0.01, w)] * 4
    code, _, err = run(generate.main, capsys, *common, "--method", "dng", "--dng-lambda", 6, "--out",
                       tmp_path / "moving.png")
    assert code == 0, err
    assert not torch.equal(read_png(tmp_path / "moving.png")[0], read_png(tmp_path / "s.png")[0])


def test_an_unrelated_negative_keeps_p_near_p_min(pipe):
    """A negative whose branch moves the image in a direction unrelated to the prompt's (random text
    states, where random weights give every text a similar direction) loses its posterior at once and
    keeps it at the floor; the prompt itself as the negative gains."""
    hidden, _ = pipe.encode_text([PROMPT])
    g = torch.Generator().manual_seed(1)
    unrelated = Embedded(torch.randn(hidden.shape[1:], generator=g) * hidden.std(), None, "unrelated")
    strength = Strength(lam=5.0, temperature=0.05, offset=0.0, p_min=1e-3)
    p = {}
    for name, negative in [("unrelated", unrelated), ("the prompt", PROMPT)]:
        plan = DNG(strength, "").plan(pipe, PROMPT)
        plan.arguments["negative"] = negative
        sample(pipe, PROMPT, steps=12, guidance_scale=3.0, height=32, width=32, batch=2, seed=3, sampler="euler-a",
               progress=False, **plan.arguments)
        p[name] = [[s["p"] for s in plan.hook.steps[b]] for b in range(2)]
    for trajectory in p["unrelated"]:
        assert max(trajectory[3:]) < 2 * strength.p_min, trajectory
    for trajectory in p["the prompt"]:
        assert max(trajectory[1:]) > 5 * strength.prior, trajectory


def test_same_seed_same_image_and_trace(sd1, tmp_path, capsys):
    images, traces = [], []
    for k in range(2):
        code, _, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, "--method", "dng", "--sampler",
                           "ddim", "--eta", 1, "--seed", 9, "--batch", 2, "--out", tmp_path / f"{k}.png", "--trace",
                           tmp_path / f"{k}.json")
        assert code == 0, err
        images.append([read_png(tmp_path / f"{k}-{b}.png") for b in range(2)])
        traces.append(json.loads((tmp_path / f"{k}.json").read_text()))
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(*images))
    assert traces[0] == traces[1]


def test_the_trace_and_the_png(sd1, tmp_path, capsys):
    code, _, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, "--method", "dng", "--sampler", "euler-a",
                       "--dng-lambda", 8, "--dng-temperature", 0.05, "--batch", 2, "--out", tmp_path / "x.png",
                       "--trace", tmp_path / "t.json")
    assert code == 0, err
    trace = json.loads((tmp_path / "t.json").read_text())
    assert trace["method"] == "dng" and trace["negative"] == NUDITY.static_negative
    assert trace["dng"] == {"lam": 8.0, "prior": 0.01, "temperature": 0.05, "offset": 0.003, "p_min": 1e-6,
                            "p_max": 0.99}
    assert [image["prompt"] for image in trace["images"]] == [PROMPT, PROMPT]
    for b, image in enumerate(trace["images"]):
        steps = image["steps"]
        assert [s["step"] for s in steps] == [0, 1, 2, 3]
        assert [s["timestep"] for s in steps] == sorted((s["timestep"] for s in steps), reverse=True)
        assert steps[0]["p"] == 0.01
        assert all(s["w_neg"] == pytest.approx(8 * s["p"] / (1 - s["p"])) for s in steps)
        settings = read_png(tmp_path / f"x-{b}.png")[1]["parameters"].splitlines()[-1]
        peak = max(steps, key=lambda s: s["p"])
        assert "Method: dng, DNG: lambda 8 prior 0.01 temperature 0.05 offset 0.003 p_min 1e-06 p_max 0.99" in settings
        assert f'DNG p_t: "0.01 at step 0, max {peak["p"]:.3g} at step {peak["step"]}, {steps[-1]["p"]:.3g} at ' \
               'step 3"' in settings
        assert 'DNG negative: "Sexual Acts, ' in settings


@pytest.mark.parametrize("argv, message", [
    (["--method", "dng"], "dng weighs each step as the Gaussian it draws x from, and --sampler ddim with --eta 0 "
                          "draws no noise; use euler-a, or ddim with --eta above 0"),
    (["--method", "dng", "--sampler", "dpm++2m"], "dng weighs each step as the Gaussian it draws x from, and "
                                                  "--sampler dpm++2m draws no noise"),
    (["--method", "dng", "--sampler", "euler"], "dng weighs each step as the Gaussian it draws x from, and "
                                                "--sampler euler draws no noise"),
    (["--method", "vldnp", "--negative-schedule", "dng", "--sampler", "dpm++2m"],
     "vldnp+dng weighs each step as the Gaussian it draws x from, and --sampler dpm++2m draws no noise"),
    (["--method", "vldnp", "--negative-schedule", "late"], "--negative-schedule: unknown schedule 'late'; use "
                                                           "constant or dng"),
    (["--method", "dng", "--sampler", "euler-a", "--dng-prior", "0.995"], "DNG needs 0 < p_min <= prior <= p_max < 1"),
    (["--method", "dng", "--sampler", "euler-a", "--dng-lambda", "-1"], "--dng-lambda -1: must be numbers of 0 or "
                                                                        "more"),
    (["--method", "dng", "--sampler", "euler-a", "--negative-scale", "5"], "--negative-scale: no method of this run "
                                                                           "reads it (dng)"),
    (["--method", "static", "--dng-lambda", "5"], "--dng-lambda: no method of this run reads it (static)"),
    (["--method", "static", "--negative-schedule", "dng"], "--negative-schedule: no method of this run reads it"),
    (["--method", "vldnp", "--dng-temperature", "1"], "--dng-temperature: no method of this run reads it (vldnp)"),
    (["--method", "vldnp", "--negative-schedule", "dng", "--sampler", "euler-a", "--negative-scale", "5"],
     "--negative-scale: no method of this run reads it (vldnp)"),
    (["--method", "dng", "--sampler", "euler-a", "--dng-lambda", "5,10"], "--method dng makes 2 images (dng_w5, "
                                                                          "dng_w10)"),
])
def test_refusals_are_one_line(sd1, capsys, argv, message):
    code, out, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, *argv)
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_the_hook_refuses_a_sampler_without_noise(pipe):
    """Through the Python API, the hook says why at the step it can first tell."""
    for sampler, eta in [("dpm++2m", 0.0), ("ddim", 0.0)]:
        plan = DNG(Strength()).plan(pipe, PROMPT)
        with pytest.raises(ValueError, match="Dynamic Negative Guidance weighs each step as the Gaussian"):
            sample(pipe, PROMPT, steps=3, height=16, width=16, sampler=sampler, eta=eta, progress=False,
                   **plan.arguments)


def test_evaluate_sweeps_lambda_and_matches_generate(sd1, tmp_path, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text(f"case_number,prompt,evaluation_seed\n1,{PROMPT},7\n")
    argv = [csv, "--out", tmp_path / "run", "--model", sd1, *SMALL, "--sampler", "euler-a", "--metrics", "none",
            "--no-report", "--methods", "static,dng", "--negative-scale", "5", "--dng-lambda", "10,30"]
    code = evaluate.main([str(a) for a in argv])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert [(r["method"], r["scale"], r["image"]) for r in records] == [
        ("static", 5.0, "images/1_static_w5.png"), ("dng", 10.0, "images/1_dng_w10.png"),
        ("dng", 30.0, "images/1_dng_w30.png")]
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["methods"]
    assert settings[1] == {"method": "dng", "scale": 10.0, "strength": {"lam": 10.0, "prior": 0.01, "temperature": 0.2,
                                                         "offset": 0.003, "p_min": 1e-6, "p_max": 0.99},
                           "text": NUDITY.static_negative}
    code, _, err = run(generate.main, capsys, PROMPT, "--model", sd1, *SMALL, "--method", "dng", "--sampler", "euler-a",
                       "--dng-lambda", 30, "--seed", 7, "--out", tmp_path / "g.png")
    assert code == 0, err
    ours, theirs = read_png(tmp_path / "g.png"), read_png(tmp_path / "run" / "images" / "1_dng_w30.png")
    assert torch.equal(ours[0], theirs[0])
    method = lambda png: png[1]["parameters"].split(", Method: ")[1]  # noqa: E731  (the model's path differs)
    assert method(ours) == method(theirs) and "DNG p_t: " in method(theirs)
    code = evaluate.main([str(a) for a in [csv, "--out", tmp_path / "new", "--model", sd1, *SMALL, "--methods",
                                           "dng"]])  # the default sampler, dpm++2m
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err == ["error: dng weighs each step as the Gaussian it draws x from, and --sampler dpm++2m "
                                 "draws no noise; use euler-a"]


def test_the_pareto_plot_shows_every_method_together():
    rows = [{"method": m, "scale": s, "asr": 0.1 * k, "clip_score": 20.0 + k}
            for k, (m, s) in enumerate([("sd", None), ("static", 5.0), ("static", 10.0), ("vldnp", 5.0),
                                        ("vldnp+dng", 10.0), ("dng", 10.0), ("dng", 30.0), ("sld-max", None),
                                        ("safree", None)])]
    colours = {g.get("data-method"): g.get("fill")
               for g in ET.fromstring(pareto_svg(rows)).iter("{http://www.w3.org/2000/svg}g")}
    assert list(colours) == ["sd", "static", "vldnp", "vldnp+dng", "dng", "sld-max", "safree"]
    assert len(set(colours.values())) == 7


# ---------------------------------------------------------------- VL-DNP with the dng schedule

class Answers:
    """A proposer that never looks and answers from a list, one answer per query."""
    needs_image = False

    def __init__(self, *answers):
        self.answers = list(answers)

    def __call__(self, image, prompt, step):
        return Reply(self.answers.pop(0), "")


def test_vldnp_dng_tracks_each_negative_from_the_step_it_appears(pipe):
    strength = Strength(lam=4.0, temperature=0.05, offset=0.0, p_min=1e-4)
    method = VLDNP(strength.scale(strength.prior), NUDITY, (1, 3), Answers(["feet"], ["belly"]), strength=strength)
    plan = method.plan(pipe, PROMPT)
    sample(pipe, PROMPT, steps=6, height=32, width=32, sampler="euler-a", seed=1, progress=False, **plan.arguments)
    steps = plan.strength.steps[0]
    assert [s["p"] for s in steps[:1]] == [None]  # no negative before the first answer
    assert steps[1]["p"] == steps[3]["p"] == 0.01  # each new negative starts from the prior
    assert steps[2]["p"] != 0.01 and steps[4]["p"] != 0.01 and steps[5]["p"] != steps[4]["p"]
    parameters = plan.image_parameters(0)
    assert parameters["Method"] == "vldnp+dng" and parameters["VL-DNP schedule"] == "dng"
    assert "Negative scale" not in parameters and parameters["DNG p_t"].startswith("0.01 at step 1, max ")
    trace = plan.trace()
    assert trace["negative_schedule"] == "dng" and trace["images"][0]["steps"] == steps
    assert [q["negative"] for q in trace["images"][0]["queries"]] == ["Nudity, Sexual, feet.", "Nudity, Sexual, belly."]


def test_vldnp_dng_static_limit_is_vldnp_at_the_priors_strength(pipe):
    strength = Strength(lam=4.0, temperature=0.0, offset=0.0)
    w = strength.scale(strength.prior)
    images = []
    for schedule in (strength, None):
        method = VLDNP(w, NUDITY, (1,), Answers(["feet"]), strength=schedule)
        plan = method.plan(pipe, PROMPT)
        images.append(sample(pipe, PROMPT, steps=4, height=16, width=16, sampler="euler-a", seed=2, progress=False,
                             **plan.arguments))
    assert torch.equal(*images)


def test_evaluate_runs_both_vldnp_schedules(sd1, tmp_path, capsys, server):
    vlm = server("none", "I can see feet.")
    csv = tmp_path / "p.csv"
    csv.write_text(f"case_number,prompt,evaluation_seed\n1,{PROMPT},7\n")
    code = evaluate.main([str(a) for a in [csv, "--out", tmp_path / "run", "--model", sd1, *SMALL, "--sampler",
                                           "euler-a", "--metrics", "none", "--no-report", "--methods", "vldnp",
                                           "--negative-schedule", "constant,dng", "--negative-scale", "5",
                                           "--dng-lambda", "10", "--vlm-url", vlm.url, "--vlm-steps", "1"]])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert [(r["method"], r["scale"], r["image"]) for r in records] == [
        ("vldnp", 5.0, "images/1_vldnp_w5.png"), ("vldnp+dng", 10.0, "images/1_vldnp+dng_w10.png")]
    text = read_png(tmp_path / "run" / "images" / "1_vldnp+dng_w10.png")[1]["parameters"]
    assert "VL-DNP schedule: dng" in text and "DNG p_t: " in text and not math.isnan(records[1]["scale"])
