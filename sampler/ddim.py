"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models"), as Stable Diffusion uses it.

Matches diffusers' DDIMScheduler number for number. As there, the ᾱ tables are float32 and the per-step
ᾱ are 0-d tensors, which do not promote the latents: arithmetic and results stay in the input dtype.
"""
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SchedulerConfig:
    """Training noise schedule plus sampling settings. The defaults are SD 1.x/2.x's settings, which
    are not the defaults of diffusers' DDIMScheduler constructor.

    timestep_spacing None means the config did not say, as SD 1.x/2.x's scheduler_config.json files
    do not. diffusers then uses the default of whichever scheduler class reads the config, and so do
    we: DDIM takes "leading" (DDIMScheduler's default), DPM-Solver++ takes "linspace"
    (DPMSolverMultistepScheduler's), which is what `DPMSolverMultistepScheduler.from_config(
    pipe.scheduler.config)` gives on an SD folder."""
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

    def __post_init__(self):
        for name, allowed in [("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2")),
                              ("prediction_type", ("epsilon", "v_prediction", "sample")),
                              ("timestep_spacing", ("leading", "trailing", "linspace", None))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; use one of {allowed}")

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """Read a diffusers scheduler_config.json of any scheduler class. Unknown keys are ignored,
        and missing keys keep SD's defaults (timestep_spacing: None, the sampler's own)."""
        if d.get("thresholding"):
            raise ValueError("thresholding=true (dynamic thresholding) is not supported")
        if d.get("trained_betas") is not None:
            raise ValueError("trained_betas is not supported; give beta_start/beta_end/beta_schedule")
        known = {f.name for f in dataclasses.fields(cls)}
        # diffusers' in-memory configs list in `_use_default_values` the keys it filled with the defaults of
        # the class that made them, and from_config() gives such keys the reading class's defaults instead.
        # For timestep_spacing the sampler's default then applies, as for a key absent from the file.
        if "timestep_spacing" in d.get("_use_default_values", ()):
            known.remove("timestep_spacing")
        return cls(**{k: v for k, v in d.items() if k in known})


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
    """Shift and scale √ᾱ so that ᾱ_T = 0, which means zero SNR at the last step, while √ᾱ_1 stays
    unchanged. From Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    alpha_bar = ((sqrt_ab - last) * (first / (first - last))) ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_timesteps(cfg: SchedulerConfig, num_steps: int, spacing: str) -> torch.Tensor:
    """The num_steps training timesteps that DDIM visits with `spacing`, in descending order, as a
    LongTensor. They equal diffusers' DDIMScheduler.set_timesteps, including numpy's float rounding."""
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
    A CPU generator draws on the CPU and the result then moves to `device`. A list of generators draws
    one batch element each."""
    device = torch.device(device or "cpu")
    gens = generator if isinstance(generator, list) else [generator]
    on = "cpu" if gens[0] is not None and gens[0].device.type == "cpu" else device
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=on, dtype=dtype).to(device)
    draws = [torch.randn((1, *shape[1:]), generator=g, device=on, dtype=dtype) for g in gens]
    return torch.cat(draws).to(device)


class DDIM:
    """DDIM sampler over `num_steps` of the training timesteps (Song et al. 2021, eq. 12):

        x_prev = √ᾱ_prev · x0 + √(1 − ᾱ_prev − σ²) · ε + σ · z,
        σ = η · √((1 − ᾱ_prev) / (1 − ᾱ_t)) · √(1 − ᾱ_t / ᾱ_prev)     (eq. 16)

    η = 0 gives deterministic DDIM, and η = 1 gives DDPM's posterior variance. The object holds only
    tables, and `step` is a pure function of its arguments. Step i goes from timesteps[i] to
    prev_timesteps[i] = timesteps[i] - T // num_steps. If that is below 0, ᾱ_prev is 1 when
    set_alpha_to_one is set and ᾱ_0 otherwise."""

    def __init__(self, config: SchedulerConfig, num_steps: int):
        T = config.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
        self.config, self.num_steps = config, num_steps
        self.alphas_cumprod = torch.cumprod(1.0 - make_betas(config), dim=0)  # ᾱ_t, float32 [T]
        spacing = config.timestep_spacing or "leading"  # DDIMScheduler's default
        self.timesteps = t = make_timesteps(config, num_steps, spacing)  # [N]
        if len(t) != num_steps or t.min() < 0 or t.max() >= T:  # diffusers' rules overshoot for some N
            raise ValueError(f"{spacing} spacing (steps_offset {config.steps_offset}) gives "
                             f"{len(t)} timesteps in [{t.min()}, {t.max()}] for {num_steps} steps, "
                             f"outside [0, {T})")
        self.prev_timesteps = t - T // num_steps  # [N]
        final = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.alpha_bar = self.alphas_cumprod[t]  # ᾱ_t per step, [N]
        self.alpha_bar_prev = torch.where(self.prev_timesteps >= 0,
                                          self.alphas_cumprod[self.prev_timesteps.clamp(min=0)], final)  # [N]

    def predict(self, model_output: torch.Tensor, i: int, x: torch.Tensor):
        """Turn the model's output at step i into (x0, ε). Like diffusers, clip_sample clamps x0 but
        does not recompute ε from the clamped x0."""
        a = self.alpha_bar[i]
        x0, eps = x0_and_eps(model_output, x, a**0.5, (1 - a) ** 0.5, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, eta: float = 0.0, generator=None):
        """One update from x at timesteps[i] to x_prev at prev_timesteps[i]. Returns (x_prev, x0).
        For eta > 0, z is drawn from `generator` as diffusers draws it: shaped like model_output, in
        its dtype."""
        x0, eps = self.predict(model_output, i, x)
        a, a_prev = self.alpha_bar[i], self.alpha_bar_prev[i]
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            x_prev = x_prev + sigma * z
        return x_prev, x0
