"""Parity of sampler/ddim.py with diffusers' DDIMScheduler, configured with SD's settings and variations."""
import dataclasses
import json

import pytest
import torch
import diffusers
from diffusers import DDIMScheduler, PNDMScheduler

from helpers import assert_close_rel, fake_model
from sampler.ddim import DDIM
from sampler.schedule import SchedulerConfig

SD_SETTINGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def pair(num_steps, **overrides):
    """(ours, diffusers') for SD's settings with `overrides`."""
    ref = DDIMScheduler(**{**SD_SETTINGS, **overrides})
    ref.set_timesteps(num_steps)
    return DDIM(SchedulerConfig(**overrides), num_steps), ref


# ---- timesteps and ᾱ tables

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_every_step_count(spacing, offset):
    ref = DDIMScheduler(**{**SD_SETTINGS, "timestep_spacing": spacing, "steps_offset": offset})
    cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    for n in range(1, 1001):
        ref.set_timesteps(n)
        t = ref.timesteps
        if spacing == "trailing" and len(t) == n + 1 and t[-1] == -1:
            t = t[:n]  # diffusers' float overshoot (e.g. n=61): we keep the n steps asked for
        if len(t) == n and 0 <= t.min() and t.max() < 1000:
            ours = DDIM(cfg, n)
            assert ours.timesteps.dtype == torch.int64
            assert torch.equal(ours.timesteps, t), (spacing, offset, n)
        else:  # diffusers goes out of [0, 1000) here (leading with offset 1 at n=1000 reaches t=1000)
            with pytest.raises(ValueError):
                DDIM(cfg, n)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [1, 7, 20, 50, 1000])
def test_alpha_bar_tables(spacing, set_alpha_to_one, offset, n):
    if spacing == "leading" and offset == 1 and n == 1000:
        pytest.raises(ValueError, DDIM, SchedulerConfig(steps_offset=1), 1000)  # diffusers reaches t=1000
        return
    ours, ref = pair(n, timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one, steps_offset=offset)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.timesteps, ref.timesteps)
    for i, t in enumerate(ref.timesteps.tolist()):
        prev = t - 1000 // n
        assert ours.prev_timesteps[i] == prev
        assert ours.alpha_bar[i] == ref.alphas_cumprod[t]
        assert ours.alpha_bar_prev[i] == (ref.alphas_cumprod[prev] if prev >= 0 else ref.final_alpha_cumprod)
    if set_alpha_to_one and ours.prev_timesteps[-1] < 0:
        assert ours.alpha_bar_prev[-1] == 1.0


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_beta_schedules(schedule, zero_snr):
    ours, ref = pair(50, beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    assert ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert (ours.alphas_cumprod[-1] == 0) == zero_snr


# ---- whole trajectories, step by step

def run_trajectory(ours, ref, eta, x, use_generator=True):
    g_ours = torch.Generator().manual_seed(1234) if use_generator else None
    g_ref = torch.Generator().manual_seed(1234) if use_generator else None
    x_ours, x_ref = x.clone(), x.clone()
    for i, t in enumerate(ref.timesteps):
        x_prev, x0 = ours.step(fake_model(x_ours, t), i, x_ours, eta=eta, generator=g_ours)
        out = ref.step(fake_model(x_ref, t), t, x_ref, eta=eta, generator=g_ref)
        assert x_prev.dtype == out.prev_sample.dtype and x0.dtype == out.pred_original_sample.dtype
        assert_close_rel(x0, out.pred_original_sample, 1e-6)
        assert_close_rel(x_prev, out.prev_sample, 1e-6)
        x_ours, x_ref = x_prev, out.prev_sample
    if use_generator:  # both consumed the same number of draws
        assert torch.equal(torch.randn(8, generator=g_ours), torch.randn(8, generator=g_ref))
    return x_ours


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_trajectory_parity(prediction_type, clip_sample, eta):
    kw = dict(prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=0.8)
    ours, ref = pair(20, **kw)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    final = run_trajectory(ours, ref, eta, x)
    if clip_sample:  # the clamp was active at the first step
        x0 = ours.predict(fake_model(x, ours.timesteps[0]), 0, x)[0]
        assert x0.abs().max() == 0.8
    if eta > 0:  # the noise matters: without it the result differs
        assert not torch.allclose(final, run_trajectory(*pair(20, **kw), 0.0, x))


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_trajectory_other_spacings_and_zero_snr(spacing):
    ours, ref = pair(7, timestep_spacing=spacing, prediction_type="v_prediction",
                     rescale_betas_zero_snr=True, set_alpha_to_one=True)
    run_trajectory(ours, ref, 0.7, torch.randn(1, 4, 8, 8))


def test_trajectory_single_step_and_no_generator():
    ours, ref = pair(1)
    run_trajectory(ours, ref, 0.0, torch.randn(1, 4, 8, 8), use_generator=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_follows_diffusers(dtype):
    """diffusers' 0-d float32 ᾱ coefficients leave fp16/bf16 latents in their dtype, and so do ours."""
    ours, ref = pair(10)
    run_trajectory(ours, ref, 0.7, torch.randn(1, 4, 8, 8).to(dtype))


def test_step_is_pure():
    ours, _ = pair(20)
    x = torch.randn(1, 4, 8, 8)
    eps = fake_model(x, 500)
    a = ours.step(eps, 3, x, eta=0.5, generator=torch.Generator().manual_seed(0))
    ours.step(eps, 7, x)
    b = ours.step(eps, 3, x, eta=0.5, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# ---- reading scheduler_config.json

SD14_SCHEDULER_JSON = {  # CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


def test_from_dict_pndm_gives_sd_settings():
    assert SchedulerConfig.from_dict(SD14_SCHEDULER_JSON) == SchedulerConfig()
    pndm = PNDMScheduler(**{k: v for k, v in SD14_SCHEDULER_JSON.items()
                            if not k.startswith("_") and k != "clip_sample"})
    assert SchedulerConfig.from_dict(dict(pndm.config)) == SchedulerConfig()


def test_from_dict_takes_known_keys_and_keeps_defaults():
    cfg = SchedulerConfig.from_dict({"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                     "use_karras_sigmas": True, "solver_order": 2})
    assert cfg == SchedulerConfig(prediction_type="v_prediction", timestep_spacing="trailing")
    assert SchedulerConfig.from_dict({}) == SchedulerConfig()
    assert SchedulerConfig.from_dict({"steps_offset": 0}).clip_sample is False
    # diffusers' own DDIM defaults are all read, none replaced by SD's
    ddim_defaults = {k: v for k, v in DDIMScheduler().config.items() if not k.startswith("_")}
    cfg = dataclasses.asdict(SchedulerConfig.from_dict(ddim_defaults))
    assert cfg == {k: ddim_defaults[k] for k in cfg} != dataclasses.asdict(SchedulerConfig())


def test_from_dict_matches_diffusers_from_config():
    d = {**SD14_SCHEDULER_JSON, "prediction_type": "v_prediction", "timestep_spacing": "linspace"}
    ref = DDIMScheduler.from_config(d)
    ref.set_timesteps(25)
    ours = DDIM(SchedulerConfig.from_dict(d), 25)
    assert torch.equal(ours.timesteps, ref.timesteps)
    run_trajectory(ours, ref, 0.3, torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("bad", [
    {"thresholding": True}, {"trained_betas": [0.1] * 1000}, {"beta_schedule": "sigmoid"},
    {"timestep_spacing": "karras"}, {"prediction_type": "flow"},
])
def test_from_dict_rejects_unsupported(bad):
    with pytest.raises(ValueError):
        SchedulerConfig.from_dict({**SD14_SCHEDULER_JSON, **bad})


@pytest.mark.parametrize("scheduler", ["EDMDPMSolverMultistepScheduler", "EDMEulerScheduler",
                                       "FlowMatchEulerDiscreteScheduler"])
def test_from_dict_rejects_a_schedule_without_sd_betas(scheduler):
    """Playground v2.5's EDM scheduler (an SDXL UNet and VAE) and the flow-matching ones sample another noise
    schedule than SD's betas, which these samplers would silently use in their place."""
    config = json.loads(getattr(diffusers, scheduler)().to_json_string())
    with pytest.raises(ValueError, match=scheduler):
        SchedulerConfig.from_dict(config)


def test_rejects_bad_step_counts():
    for n in (0, 1001):
        pytest.raises(ValueError, DDIM, SchedulerConfig(), n)
