"""What every sampler shares: the training noise schedule (SchedulerConfig, the β and ᾱ tables), the
timesteps a sampler visits, the model output read as (x0, ε), and noise drawn as diffusers draws it.
The samplers themselves are sampler/ddim.py, sampler/dpm.py and sampler/euler.py.
"""
import dataclasses
import math
from dataclasses import InitVar, dataclass

import numpy as np
import torch


@dataclass
class SchedulerConfig:
    """Training noise schedule plus sampling settings. The defaults are SD 1.x/2.x's settings, which
    are not the defaults of diffusers' DDIMScheduler constructor.

    timestep_spacing None means the config did not say, as SD 1.x/2.x's scheduler_config.json files
    do not. diffusers then uses the default of whichever scheduler class reads the config, and so do
    we: DDIM takes "leading", DPM-Solver++ and Euler "linspace" (each diffusers class's default), as
    `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` does on an SD folder.

    `other_settings` holds the config's keys that are not fields, as `from_dict` read them: the
    settings of some scheduler classes only, such as EulerDiscreteScheduler's use_karras_sigmas. A
    sampler that implements only their defaults refuses other values (sampler/euler.py). They are
    not fields, so two configs that differ only there are equal: DDIM reads none of them."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"   # or "linear", "squaredcos_cap_v2"
    prediction_type: str = "epsilon"       # or "v_prediction", "sample"
    timestep_spacing: str | None = None    # "leading", "trailing", "linspace"; None: the sampler's default
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    other_settings: InitVar[dict | None] = None

    def __post_init__(self, other_settings):
        self.other_settings = dict(other_settings or {})
        for name, allowed in [("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2")),
                              ("prediction_type", ("epsilon", "v_prediction", "sample")),
                              ("timestep_spacing", ("leading", "trailing", "linspace", None))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; use one of {allowed}")

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """Read a diffusers scheduler_config.json of any scheduler class. Missing keys keep SD's
        defaults (timestep_spacing: None, the sampler's own); keys that are not fields go to
        other_settings, but for those set to null, which diffusers' classes take as unset."""
        if str(d.get("_class_name")).startswith(("EDM", "FlowMatch")):  # Playground v2.5's; SD3's
            raise ValueError(f"{d['_class_name']} samples a noise schedule other than SD's betas; not supported")
        if d.get("thresholding"):
            raise ValueError("thresholding=true (dynamic thresholding) is not supported")
        if d.get("trained_betas") is not None:
            raise ValueError("trained_betas is not supported; give beta_start/beta_end/beta_schedule")
        fields = {f.name for f in dataclasses.fields(cls)}
        # diffusers' in-memory configs list in `_use_default_values` the keys filled with their class's defaults,
        # which from_config() gives the reading class's defaults instead: for timestep_spacing the sampler's
        # default then applies, as for a key absent from the file; such keys are left out of other_settings.
        defaulted = set(d.get("_use_default_values", ()))
        read = fields - {"timestep_spacing"} if "timestep_spacing" in defaulted else fields
        other = {k: v for k, v in d.items()
                 if k not in fields and not k.startswith("_") and k not in defaulted and v is not None}
        return cls(**{k: v for k, v in d.items() if k in read}, other_settings=other)


class UnsupportedSetting(ValueError):
    """The model's scheduler config asks the sampler for something it does not implement."""


def refuse_other_settings(cfg: SchedulerConfig, sampler: str, implemented: dict, note: str = ""):
    """UnsupportedSetting when the config sets one of a scheduler class's `implemented` settings (name ->
    the value this sampler implements, or a tuple of the names diffusers reads as it) to another
    value, which diffusers would honour."""
    for key, value in implemented.items():
        accepted = value if isinstance(value, tuple) else (value,)
        if key in cfg.other_settings and cfg.other_settings[key] not in accepted:
            raise UnsupportedSetting(f"the model's scheduler config sets {key}={cfg.other_settings[key]!r}; the "
                                     f"{sampler} sampler implements only {key}={accepted[0]!r}{note}")


def make_betas(cfg: SchedulerConfig) -> torch.Tensor:
    """β_1..β_T that the model was trained with, float32 [T]."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":  # DDPM (Ho et al. 2020)
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":  # latent diffusion: linear in √β
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:  # cosine schedule (Nichol & Dhariwal 2021, eq. 17), β capped at 0.999
        def alpha_bar(i):
            return math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) for i in range(T)],
                             dtype=torch.float32)
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that ᾱ_T = 0, which means zero SNR at the last step, while √ᾱ_1 stays unchanged. From Lin
    et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    alpha_bar = ((sqrt_ab - last) * (first / (first - last))) ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_timesteps(cfg: SchedulerConfig, num_steps: int, spacing: str) -> torch.Tensor:
    """num_steps training timesteps laid out with `spacing`, in descending order, as a LongTensor.
    They equal diffusers' DDIMScheduler.set_timesteps, including numpy's float rounding."""
    T, N = cfg.num_train_timesteps, num_steps
    if spacing == "leading":  # 0, T//N, 2·T//N, ..., then shifted by steps_offset
        t = np.arange(N)[::-1] * (T // N) + cfg.steps_offset
    elif spacing == "trailing":  # T-1 down to about T/N-1, in strides of T/N
        # For some N (61, 103, ...) float rounding makes arange yield N+1 points, the last being -1;
        # diffusers keeps that out-of-range step, we keep the N asked for.
        t = (np.round(np.arange(T, 0, -T / N)) - 1)[:N]
    else:  # "linspace": N points evenly spaced over [0, T-1], rounded to integers
        t = np.linspace(0, T - 1, N).round()[::-1]
    return torch.from_numpy(t.astype(np.int64).copy())


def checked_timesteps(cfg: SchedulerConfig, num_steps: int, spacing: str, lay_out=make_timesteps,
                      start: int = 0) -> torch.Tensor:
    """The timesteps `lay_out(cfg, num_steps, spacing)` gives a sampler, from step `start` on (an
    image edit's chain starts part-way, sampler/edit.py), or ValueError when num_steps is not in
    [1, T], start not in [0, num_steps), or the layout is not num_steps timesteps in [0, T): diffusers'
    rules overshoot for some counts (e.g. "leading" with steps_offset 1 reaches t = T at num_steps = T)."""
    T, N = cfg.num_train_timesteps, num_steps
    if not 1 <= N <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {N}")
    if not 0 <= start < N:
        raise ValueError(f"the first step must be in [0, {N}) for {N} steps, got {start}")
    t = lay_out(cfg, N, spacing)  # [N]
    if len(t) != N or t.min() < 0 or t.max() >= T:
        raise ValueError(f"{spacing} spacing (steps_offset {cfg.steps_offset}) gives {len(t)} timesteps "
                         f"in [{t.min()}, {t.max()}] for {N} steps, outside [0, {T})")
    return t[start:]


def x0_and_eps(model_output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str):
    """Both the clean latents x0 and the noise ε that the model's output implies, with x_t = α·x0 + σ·ε
    (α = √ᾱ_t, σ = √(1 − ᾱ_t)). Every sampler turns the output into these the same way."""
    if prediction_type == "epsilon":
        x0 = (x - sigma * model_output) / alpha
        eps = model_output
    elif prediction_type == "v_prediction":  # v = α·ε − σ·x0 (Salimans & Ho 2022)
        x0 = alpha * x - sigma * model_output
        eps = alpha * model_output + sigma * x
    else:  # "sample": the model predicts x0
        x0 = model_output
        eps = (x - alpha * x0) / sigma
    return x0, eps


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Gaussian noise drawn as diffusers' randn_tensor draws it, so that a seed gives the same numbers.
    A CPU generator draws on the CPU and the result then moves to `device`."""
    device = torch.device(device or "cpu")
    on = "cpu" if generator is not None and generator.device.type == "cpu" else device
    return torch.randn(shape, generator=generator, device=on, dtype=dtype).to(device)
