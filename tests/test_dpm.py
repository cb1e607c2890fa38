"""Parity of sampler/dpm.py with diffusers' DPMSolverMultistepScheduler as SD uses it
(`DPMSolverMultistepScheduler.from_config(<SD's scheduler config>)`), alone and inside the loop."""
import json
import re
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from helpers import assert_close_rel, assert_same_image, fake_model, images_with_scheduler
from sampler.ddim import DDIM
from sampler.dpm import DPMSolverPP
from sampler.loop import generate
from sampler.schedule import SchedulerConfig
from weights import load_pipeline

SD14_SCHEDULER_JSON = {  # CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json: no timestep_spacing
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


def pair(num_steps, **overrides):
    """(ours, diffusers') for SD's scheduler config with `overrides`, read by both as from_config reads it."""
    d = {**SD14_SCHEDULER_JSON, **overrides}
    ref = DPMSolverMultistepScheduler.from_config(d)
    ref.set_timesteps(num_steps)
    return DPMSolverPP(SchedulerConfig.from_dict(d), num_steps), ref


# ---- the settings SD's config gives, and the tables

def test_sd_config_gives_the_2m_settings():
    ref = DPMSolverMultistepScheduler.from_config(SD14_SCHEDULER_JSON).config
    assert (ref.algorithm_type, ref.solver_order, ref.solver_type) == ("dpmsolver++", 2, "midpoint")
    assert (ref.lower_order_final, ref.euler_at_final, ref.final_sigmas_type) == (True, False, "zero")
    assert not (ref.use_karras_sigmas or ref.use_exponential_sigmas or ref.use_beta_sigmas or ref.use_lu_lambdas
                or ref.thresholding)
    assert ref.lambda_min_clipped == -float("inf") and ref.variance_type is None
    assert ref.timestep_spacing == "linspace"  # the class default: SD's file does not say


def test_unset_spacing_is_each_samplers_default():
    """An SD folder's config, as a file and as diffusers' in-memory config: DPM-Solver++ takes
    "linspace" and DDIM "leading", as each diffusers class does."""
    pndm_config = PNDMScheduler.from_config(SD14_SCHEDULER_JSON).config  # lists timestep_spacing as defaulted
    for d in (SD14_SCHEDULER_JSON, pndm_config):
        cfg = SchedulerConfig.from_dict(d)
        assert cfg.timestep_spacing is None
        ref = DPMSolverMultistepScheduler.from_config(d)
        ref.set_timesteps(50)
        assert torch.equal(DPMSolverPP(cfg, 50).timesteps, ref.timesteps)
        assert ref.timesteps[0] == 999 and ref.timesteps[-1] == 20
        ref = DDIMScheduler.from_config(d)
        ref.set_timesteps(50)
        assert torch.equal(DDIM(cfg, 50).timesteps, ref.timesteps)
    stated = SchedulerConfig.from_dict({**SD14_SCHEDULER_JSON, "timestep_spacing": "leading"})
    assert stated.timestep_spacing == "leading"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_and_sigmas(spacing, offset):
    ref = DPMSolverMultistepScheduler.from_config({**SD14_SCHEDULER_JSON, "timestep_spacing": spacing,
                                                   "steps_offset": offset})
    cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    for n in [*range(1, 60), 61, 99, 100, 103, 250, 500, 998, 999, 1000]:
        ref.set_timesteps(n)
        t = ref.timesteps
        if spacing == "trailing" and len(t) == n + 1 and t[-1] == -1:
            t = t[:n]  # diffusers' float overshoot (e.g. n=61): we keep the n steps asked for
        if len(t) == n and 0 <= t.min() and t.max() < 1000:
            ours = DPMSolverPP(cfg, n)
            assert torch.equal(ours.timesteps, t), (spacing, offset, n)
            assert torch.equal(ours.rho[:n], ref.sigmas[:n]) and ours.rho[n] == 0  # diffusers' σ/α, ending at 0
            assert ours.rho.dtype == torch.float32 and ours.timesteps.dtype == torch.int64
        else:  # diffusers goes out of [0, 1000) here (leading with offset 1 at n=999 reaches t=1000)
            with pytest.raises(ValueError):
                DPMSolverPP(cfg, n)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_beta_schedules(schedule, zero_snr):
    ours, ref = pair(20, beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, timestep_spacing="trailing")
    assert torch.equal(ours.alpha_bar, ref.alphas_cumprod[ref.timesteps])
    assert torch.equal(ours.rho, ref.sigmas)
    assert torch.isfinite(ours.lam[:-1]).all() and ours.lam[-1] == float("inf")


# ---- whole trajectories, step by step

def run_trajectory(ours, ref, x, tol=1e-6):
    """Each step of ours must match diffusers' from the same input: x follows the reference. Also
    runs ours on its own, and returns (ours on its own, reference) at the end."""
    x_ref, x_free = x.clone(), x.clone()
    free = DPMSolverPP(ours.config, ours.num_steps)
    for i, t in enumerate(ref.timesteps):
        x_prev, x0 = ours.step(fake_model(x_ref, t), i, x_ref)
        x_free, _ = free.step(fake_model(x_free, t), i, x_free)
        out = ref.step(fake_model(x_ref, t), t, x_ref).prev_sample
        assert x_prev.dtype == out.dtype == x.dtype
        assert_close_rel(x0, ref.model_outputs[-1], tol)  # the x0 that diffusers' solver works with
        assert_close_rel(x_prev, out, tol)
        x_ref = out
    return x_free, x_ref


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 25])
def test_trajectory_parity(prediction_type, n):
    ours, ref = pair(n, prediction_type=prediction_type)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_free, x_ref = run_trajectory(ours, ref, x)
    assert_close_rel(x_free, x_ref, 1e-5)
    if n >= 3:  # the second-order steps matter: DDIM on the same timesteps ends elsewhere
        first_order = DPMSolverPP(ours.config, n)
        first_order.num_steps = 2  # every step is then i == 0 or i >= num_steps - 1: first order
        x_first = x.clone()
        for i, t in enumerate(ours.timesteps):
            x_first, _ = first_order.step(fake_model(x_first, t), i, x_first)
        assert not torch.allclose(x_first, x_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_trajectory_other_spacings_and_zero_snr(spacing):
    ours, ref = pair(7, timestep_spacing=spacing, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    run_trajectory(ours, ref, torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_follows_diffusers(dtype):
    """The update runs in float32 and returns the input dtype, as diffusers' does."""
    ours, ref = pair(10)
    run_trajectory(ours, ref, torch.randn(1, 4, 8, 8).to(dtype), tol=1e-2)


def test_last_step_lands_on_x0():
    ours, _ = pair(4)
    x = torch.randn(1, 4, 8, 8)
    for i, t in enumerate(ours.timesteps):
        x, x0 = ours.step(fake_model(x, t), i, x)
    assert torch.equal(x, x0)


def test_steps_must_come_in_order_and_eta_must_be_zero():
    ours, _ = pair(5)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="in order"):
        ours.step(fake_model(x, 999), 1, x)
    with pytest.raises(ValueError, match="eta"):
        ours.step(fake_model(x, 999), 0, x, eta=0.5)
    ours.step(fake_model(x, 999), 0, x)
    with pytest.raises(ValueError, match="in order"):
        ours.step(fake_model(x, 999), 0, x)
    a = ours.predict(fake_model(x, 500), 2, x)  # predict is pure
    ours.predict(fake_model(x, 100), 3, x)
    assert all(torch.equal(u, v) for u, v in zip(a, ours.predict(fake_model(x, 500), 2, x)))


def test_rejects_bad_step_counts():
    for n in (0, 1001):
        pytest.raises(ValueError, DPMSolverPP, SchedulerConfig(), n)


# ---- the loop against StableDiffusionPipeline with DPMSolverMultistepScheduler.from_config

@pytest.fixture(scope="module")
def sd1_sd14_scheduler(sd1, tmp_path_factory):
    """The SD1 folder with SD1.4's scheduler config, without timestep_spacing: the paper's setup."""
    folder = shutil.copytree(sd1, tmp_path_factory.mktemp("sd1-sd14") / "sd1")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD14_SCHEDULER_JSON))
    return folder


CASES = {
    "plain": dict(prompt="a cat on a table", height=32, width=32, steps=5),
    "negative-batch2-nonsquare": dict(prompt="a photo of a dog", negative_prompt="blurry, ugly", batch=2,
                                      height=24, width=32, steps=6, guidance_scale=5.0, seed=7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sd1_matches_diffusers(sd1_sd14_scheduler, case):
    pipe = load_pipeline(sd1_sd14_scheduler)
    assert pipe.scheduler.timestep_spacing is None
    ours = generate(pipe, **CASES[case], sampler="dpm++2m", progress=False)
    assert_same_image(ours, images_with_scheduler(sd1_sd14_scheduler, DPMSolverMultistepScheduler, **CASES[case]))
    if case == "plain":  # and the sampler mattered: DDIM gives another image
        ddim = generate(pipe, **CASES[case], sampler="ddim", progress=False)
        assert (ddim.int() - ours.int()).abs().max() > 2


def test_sd2_v_prediction_matches_diffusers(sd2v):
    pipe = load_pipeline(sd2v)
    assert pipe.scheduler.prediction_type == "v_prediction" and pipe.scheduler.timestep_spacing == "leading"
    kw = dict(prompt="a mountain, oil painting!", batch=2, steps=5, height=32, width=32)
    assert_same_image(generate(pipe, **kw, sampler="dpm++2m", progress=False), images_with_scheduler(sd2v, DPMSolverMultistepScheduler, **kw))


def test_generate_rejects_eta_and_unknown_samplers(sd1):
    pipe = load_pipeline(sd1)
    with pytest.raises(ValueError, match="eta"):
        generate(pipe, "a", steps=2, height=16, width=16, eta=0.5, sampler="dpm++2m", progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(pipe, "a", steps=2, height=16, width=16, sampler="heun", progress=False)


def test_settings_diffusers_would_honour_are_refused_not_ignored():
    """A scheduler config whose DPM-Solver settings differ from what dpm++2m implements would give
    diffusers' DPMSolverMultistepScheduler another trajectory: refused, in a line naming the key."""
    sd = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    for key, value in [("use_karras_sigmas", True), ("solver_order", 3), ("algorithm_type", "sde-dpmsolver++"),
                       ("solver_type", "heun"), ("final_sigmas_type", "sigma_min"), ("use_lu_lambdas", True)]:
        with pytest.raises(ValueError, match=re.escape(f"sets {key}={value!r}; the dpm++2m sampler")):
            DPMSolverPP(SchedulerConfig.from_dict({**sd, key: value}), 10)
    # what diffusers reads as the 2M update: its own defaults, and UniPC's names for the solver type
    for config in [DPMSolverMultistepScheduler.from_config(sd).config, {**sd, "solver_type": "bh2"},
                   {**sd, "lower_order_final": False}]:
        ours = DPMSolverPP(SchedulerConfig.from_dict(dict(config)), 10)
        ref = DPMSolverMultistepScheduler.from_config(config)
        ref.set_timesteps(10)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
        assert ref.config.solver_type == "midpoint" and ref.config.algorithm_type == "dpmsolver++"


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_is_refused_where_diffusers_fails(variance_type):
    """With variance_type "learned"/"learned_range", diffusers reads an epsilon model's output as
    [mean, variance] and keeps 3 channels, which SD's 4-channel latents cannot take: it fails mid-
    sampling. Refused before sampling, in one line; for v-prediction diffusers ignores it, as we do."""
    sd = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "variance_type": variance_type}
    ref = DPMSolverMultistepScheduler.from_config(sd)
    ref.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(RuntimeError):
        ref.step(fake_model(x, ref.timesteps[0]), ref.timesteps[0], x)
    message = f"sets variance_type='{variance_type}'; the dpm++2m sampler reads an epsilon"
    with pytest.raises(ValueError, match=re.escape(message)):
        DPMSolverPP(SchedulerConfig.from_dict(sd), 5)
    ours, ref = pair(5, variance_type=variance_type, prediction_type="v_prediction")
    run_trajectory(ours, ref, x)
