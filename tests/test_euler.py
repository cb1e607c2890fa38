"""Parity of sampler/euler.py with diffusers' EulerDiscreteScheduler ("euler") and
EulerAncestralDiscreteScheduler ("euler-a") as `from_config(<the model's scheduler config>)` sets them
up: the noise levels, each step from the same input, and images from StableDiffusionPipeline."""
import json
import shutil

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       PNDMScheduler)

from methods.options import UsageError
from generate import parse_args
from helpers import assert_close_rel, assert_same_image, fake_model, images_with_scheduler
from png import parameters_text
from sampler.euler import Euler, EulerAncestral
from sampler.loop import generate
from sampler.schedule import SchedulerConfig
from weights import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

SD14_SCHEDULER_JSON = {  # CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json: no timestep_spacing
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
SDXL_SCHEDULER_JSON = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    **SD14_SCHEDULER_JSON, "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
    "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
    "timestep_spacing": "leading", "use_karras_sigmas": False,
}
TURBO_SCHEDULER_JSON = {  # stabilityai/sdxl-turbo scheduler/scheduler_config.json
    **SDXL_SCHEDULER_JSON, "_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.24.0.dev0",
    "timestep_spacing": "trailing",
}
OURS = {EulerDiscreteScheduler: Euler, EulerAncestralDiscreteScheduler: EulerAncestral}
NAMES = {EulerDiscreteScheduler: "euler", EulerAncestralDiscreteScheduler: "euler-a"}
BOTH = list(OURS)


def pair(ref_class, num_steps, config=SD14_SCHEDULER_JSON, **overrides):
    """(ours, diffusers') for a scheduler config with `overrides`, read by both as from_config reads it."""
    d = {**config, **overrides}
    ref = ref_class.from_config(d)
    ref.set_timesteps(num_steps)
    return OURS[ref_class](SchedulerConfig.from_dict(d), num_steps), ref


# ---- the settings the configs give, and the noise levels

def test_configs_give_the_settings_we_implement():
    for config, spacing in [(SD14_SCHEDULER_JSON, "linspace"), (SDXL_SCHEDULER_JSON, "leading"),
                            (TURBO_SCHEDULER_JSON, "trailing")]:
        for ref_class in BOTH:
            assert ref_class.from_config(config).config.timestep_spacing == spacing
        ref = EulerDiscreteScheduler.from_config(config).config
        assert (ref.interpolation_type, ref.timestep_type, ref.final_sigmas_type) == ("linear", "discrete", "zero")
        assert not (ref.use_karras_sigmas or ref.use_exponential_sigmas or ref.use_beta_sigmas)
    # an SD folder's config as diffusers holds it in memory, timestep_spacing marked as defaulted
    pndm_config = PNDMScheduler.from_config(SD14_SCHEDULER_JSON).config
    assert SchedulerConfig.from_dict(pndm_config).timestep_spacing is None
    ours, ref = Euler(SchedulerConfig.from_dict(pndm_config), 9), EulerDiscreteScheduler.from_config(pndm_config)
    ref.set_timesteps(9)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps[1] == 874.125


@pytest.mark.parametrize("ref_class", BOTH)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_and_sigmas(ref_class, spacing, offset):
    """Timesteps, diffusers' σ-space noise levels ρ ending at 0, and the initial noise, for many step
    counts. "linspace" visits fractional timesteps, as diffusers does; the others are whole."""
    ref = ref_class.from_config({**SD14_SCHEDULER_JSON, "timestep_spacing": spacing, "steps_offset": offset})
    cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    for n in [*range(1, 40), 50, 61, 99, 100, 103, 250, 500, 999, 1000]:
        ref.set_timesteps(n)
        t, rho = ref.timesteps, ref.sigmas
        if spacing == "trailing" and len(t) == n + 1 and t[-1] == -1:
            t, rho = t[:n], torch.cat([rho[:n], rho[-1:]])  # diffusers' float overshoot (n=61): we keep n steps
        if len(t) == n and 0 <= t.min() and t.max() < 1000:
            ours = OURS[ref_class](cfg, n)
            assert ours.timesteps.dtype == (torch.float32 if spacing == "linspace" else torch.int64)
            assert torch.equal(ours.timesteps.float(), t), (spacing, offset, n)
            assert torch.equal(ours.rho, rho) and ours.rho[n] == 0
            # diffusers starts from z·init_noise_sigma in σ-space, whose UNet input is that over √(ρ_0² + 1)
            assert abs(ours.init_noise_scale - ref.init_noise_sigma / (rho[0] ** 2 + 1) ** 0.5) < 1e-6
        else:  # diffusers goes out of [0, 1000) here (leading with offset 1 at n=1000 reaches t=1000)
            with pytest.raises(ValueError):
                OURS[ref_class](cfg, n)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_beta_schedules(schedule, zero_snr):
    for ref_class in BOTH:
        ours, ref = pair(ref_class, 20, beta_schedule=schedule, rescale_betas_zero_snr=zero_snr,
                         timestep_spacing="trailing")
        assert torch.equal(ours.rho, ref.sigmas) and torch.isfinite(ours.rho).all()


def test_euler_refuses_the_settings_it_does_not_implement_and_euler_a_has_none():
    for key, value in [("use_karras_sigmas", True), ("interpolation_type", "log_linear"),
                       ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
                       ("timestep_type", "continuous"), ("final_sigmas_type", "sigma_min")]:
        cfg = SchedulerConfig.from_dict({**SDXL_SCHEDULER_JSON, key: value})
        with pytest.raises(ValueError, match=f"{key}={value!r}"):
            Euler(cfg, 10)
        # EulerAncestralDiscreteScheduler reads none of these keys: the same sampler as without them
        ours, ref = pair(EulerAncestralDiscreteScheduler, 10, SDXL_SCHEDULER_JSON, **{key: value})
        assert torch.equal(ours.rho, ref.sigmas)
    Euler(SchedulerConfig.from_dict({**SDXL_SCHEDULER_JSON, "use_karras_sigmas": None}), 10)  # null: not set
    # diffusers' in-memory configs: a key filled with its class's default is not a setting of the config
    Euler(SchedulerConfig.from_dict(DPMSolverMultistepScheduler.from_config(SD14_SCHEDULER_JSON).config), 10)
    karras = DPMSolverMultistepScheduler.from_config({**SD14_SCHEDULER_JSON, "use_karras_sigmas": True}).config
    pytest.raises(ValueError, Euler, SchedulerConfig.from_dict(karras), 10)


# ---- whole trajectories, step by step

def run_trajectory(ours, ref, z, seed=0, tol=1e-5):
    """Runs ours in x and diffusers in σ-space from the same z, with the same noise generator; at each
    step ours' x must be the UNet input diffusers computes, and the predicted x0 the same. At the end
    (ρ = 0) both are the clean latents. Returns ours' result."""
    x, x_hat = z * ours.init_noise_scale, z * ref.init_noise_sigma
    g_ours, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for i, t in enumerate(ref.timesteps):
        model_input = ref.scale_model_input(x_hat, t)
        assert x.dtype == model_input.dtype == z.dtype
        assert_close_rel(x, model_input, tol)
        assert ours.timesteps[i] == t
        x, x0 = ours.step(fake_model(x, ours.timesteps[i]), i, x, generator=g_ours)
        out = ref.step(fake_model(model_input, t), t, x_hat, generator=g_ref)
        assert_close_rel(x0, out.pred_original_sample.to(x0.dtype), tol)
        x_hat = out.prev_sample
    assert x.dtype == x_hat.dtype
    assert_close_rel(x, x_hat, tol)
    return x


@pytest.mark.parametrize("ref_class", BOTH)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 2, 4, 25])
def test_trajectory_parity(ref_class, prediction_type, spacing, n):
    if ref_class is EulerAncestralDiscreteScheduler and prediction_type == "sample":
        ref = pair(ref_class, n, prediction_type="sample")[1]
        pytest.raises(NotImplementedError, ref.step, torch.zeros(1), ref.timesteps[0], torch.zeros(1))
        return  # diffusers' ancestral scheduler has no "sample" prediction to compare with
    ours, ref = pair(ref_class, n, prediction_type=prediction_type, timestep_spacing=spacing)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run_trajectory(ours, ref, z)


@pytest.mark.parametrize("ref_class", BOTH)
def test_trajectory_zero_snr_v_prediction(ref_class):
    ours, ref = pair(ref_class, 7, timestep_spacing="trailing", prediction_type="v_prediction",
                     rescale_betas_zero_snr=True)
    run_trajectory(ours, ref, torch.randn(1, 4, 8, 8), tol=1e-4)  # ρ_0 = 4096: diffusers' x̂ is 4096x ours


@pytest.mark.parametrize("ref_class", BOTH)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 1e-1)])
def test_low_precision_follows_diffusers(ref_class, dtype, tol):
    """The update runs in float32 and returns the input dtype, as diffusers' does. Each side rounds
    its own state (diffusers' is ρ_0 ≈ 15 times larger), which bf16's 8 bits show."""
    ours, ref = pair(ref_class, 10)
    run_trajectory(ours, ref, torch.randn(1, 4, 8, 8).to(dtype), tol=tol)


def test_ancestral_noise_matters_and_is_drawn_from_the_generator():
    z = torch.randn(1, 4, 8, 8)
    a, b = (run_trajectory(*pair(EulerAncestralDiscreteScheduler, 6), z, seed=seed) for seed in (1, 2))
    assert not torch.allclose(a, b, atol=1e-2)
    plain, _ = pair(EulerDiscreteScheduler, 6)
    x = z * plain.init_noise_scale
    for i, t in enumerate(plain.timesteps):
        x, _ = plain.step(fake_model(x, t), i, x)
    assert not torch.allclose(a, x, atol=1e-2)


@pytest.mark.parametrize("cls", [Euler, EulerAncestral])
def test_last_step_lands_on_x0_and_eta_is_refused(cls):
    ours = cls(SchedulerConfig(), 4)
    x = torch.randn(1, 4, 8, 8)
    for i, t in enumerate(ours.timesteps):
        x, x0 = ours.step(fake_model(x, t), i, x, generator=torch.Generator().manual_seed(i))
    assert torch.equal(x, x0)
    with pytest.raises(ValueError, match="eta"):
        ours.step(fake_model(x, 999), 0, x, eta=0.5)


# ---- the loop against StableDiffusionPipeline with the Euler schedulers

@pytest.fixture(scope="module")
def with_config(sd1, tmp_path_factory):
    """with_config(d): the SD1 test models in a folder whose scheduler config is d."""
    def folder(d):
        path = tmp_path_factory.mktemp("sd1-euler")
        shutil.copytree(sd1, path, dirs_exist_ok=True)
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(d))
        return path
    return folder


CASES = {  # (scheduler config, diffusers class, generate() arguments)
    "sd1-euler": (SD14_SCHEDULER_JSON, EulerDiscreteScheduler, dict(prompt="a cat on a table", steps=7)),
    # "linspace" with one step visits t = 0 alone, from diffusers' x_T = z·ρ(0): init_noise_scale matters
    "sd1-euler-1-step": (SD14_SCHEDULER_JSON, EulerDiscreteScheduler, dict(prompt="a cat", steps=1, seed=2)),
    "sd1-euler-a-negative-batch2-nonsquare": (
        SD14_SCHEDULER_JSON, EulerAncestralDiscreteScheduler,
        dict(prompt="a photo of a dog", negative_prompt="blurry, ugly", batch=2, height=24, width=32, steps=6,
             guidance_scale=5.0, seed=7)),
    "sdxl-config-euler": (SDXL_SCHEDULER_JSON, EulerDiscreteScheduler, dict(prompt="a red boat", steps=5, seed=3)),
    "sdxl-config-euler-a": (SDXL_SCHEDULER_JSON, EulerAncestralDiscreteScheduler,
                            dict(prompt="a red boat", steps=3, seed=3)),
    "turbo-1-step": (TURBO_SCHEDULER_JSON, EulerAncestralDiscreteScheduler,
                     dict(prompt="a fox in the snow", steps=1, guidance_scale=0.0, seed=5)),
    "turbo-4-steps-batch2": (TURBO_SCHEDULER_JSON, EulerAncestralDiscreteScheduler,
                             dict(prompt="a fox in the snow", steps=4, guidance_scale=0.0, batch=2, seed=5)),
    "trailing-euler": (TURBO_SCHEDULER_JSON, EulerDiscreteScheduler, dict(prompt="a fox", steps=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_images_match_diffusers(with_config, case):
    config, ref_class, kw = CASES[case]
    kw = {"height": 32, "width": 32, **kw}
    folder = with_config(config)
    ours = generate(load_pipeline(folder), **kw, sampler=NAMES[ref_class], progress=False)
    assert_same_image(ours, images_with_scheduler(folder, ref_class, **kw))


def test_the_sampler_matters(with_config):
    """Euler, Euler a and DDIM on the same seed give three different images."""
    pipe = load_pipeline(with_config(SD14_SCHEDULER_JSON))
    kw = dict(prompt="a cat on a table", steps=7, height=32, width=32, progress=False)
    images = [generate(pipe, **kw, sampler=s) for s in ("euler", "euler-a", "ddim")]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert (images[a].int() - images[b].int()).abs().max() > 2


@pytest.mark.parametrize("ref_class", BOTH)
def test_sd2_v_prediction_matches_diffusers(sd2v, ref_class):
    pipe = load_pipeline(sd2v)
    assert pipe.scheduler.prediction_type == "v_prediction" and pipe.scheduler.timestep_spacing == "leading"
    kw = dict(prompt="a mountain, oil painting!", batch=2, steps=4, height=32, width=32)
    ours = generate(pipe, **kw, sampler=NAMES[ref_class], progress=False)
    assert_same_image(ours, images_with_scheduler(sd2v, ref_class, **kw))


# ---- the command line

def test_command_line_names_and_eta():
    for name, written in [("euler", "Euler"), ("euler-a", "Euler a")]:
        args = parse_args(["a", "--sampler", name, "--proposer", "none"])
        assert args.sampler == name
        text = parameters_text("a", None, steps=4, sampler=name, guidance_scale=1.0, seed=1, width=8, height=8,
                               model="m")
        assert f"Sampler: {written}," in text
        with pytest.raises(UsageError, match="--eta"):
            parse_args(["a", "--sampler", name, "--eta", "0.5", "--proposer", "none"])
