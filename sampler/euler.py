"""Euler samplers: "euler", the Euler method on the diffusion ODE (Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models"), and "euler-a", its ancestral form, which adds
fresh noise at every step (k-diffusion's `sample_euler_ancestral`, Crowson 2022).

Match diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler number for number, as
`from_config(<the model's scheduler config>)` sets them up: timestep_spacing "linspace" when the config
does not say (both classes' default; SD 1.x/2.x files do not say), interpolation_type "linear", no
Karras/exponential/beta sigmas, final σ = 0, discrete timesteps. "euler" refuses a config that asks
EulerDiscreteScheduler for anything else; EulerAncestralDiscreteScheduler has none of those settings
and reads none of them, and neither does "euler-a". DDIM's clip_sample and set_alpha_to_one do not
apply, as in diffusers.

diffusers runs these in Karras' σ-space: x̂ = x0 + ρ·ε with ρ = √((1 − ᾱ)/ᾱ) (its `sigmas`), and
gives the UNet x̂ / √(ρ² + 1). Here x stays what the loop keeps for every sampler, the
variance-preserving x = α·x0 + σ·ε with α = 1/√(ρ² + 1), σ = ρ·α: exactly that UNet input, so no
input scaling is needed. The σ-space updates below are written in x by x = α·x̂; they are the same
updates, and with the same x_T the trajectories agree.
"""
import numpy as np
import torch

from sampler.schedule import (SchedulerConfig, checked_timesteps, make_betas, make_timesteps, randn,
                              refuse_other_settings, x0_and_eps)


def euler_timesteps(config: SchedulerConfig, num_steps: int, spacing: str) -> torch.Tensor:
    """diffusers' layout for its Euler schedulers: "leading" and "trailing" as DDIM's, int64; "linspace"
    is not rounded: num_steps float32 points evenly spaced over [0, T − 1], mostly between training
    timesteps, where ρ is interpolated and the UNet is run at the fractional timestep."""
    if spacing != "linspace":
        return make_timesteps(config, num_steps, spacing)
    t = np.linspace(0, config.num_train_timesteps - 1, num_steps)[::-1]
    return torch.from_numpy(t.astype(np.float32).copy())


class Euler:
    """Euler's method (Karras et al. 2022, Algorithm 2 with S_churn = 0 and without its second-order
    correction) on the probability-flow ODE dx̂/dρ = (x̂ − x0)/ρ (their eq. 1 and 3, σ(t) = t; x0 is
    the denoiser D(x̂; ρ)). Step i goes from ρ_i = ρ(timesteps[i]) to ρ_{i+1}, which is 0 after the last:

        x̂' = x̂ + (ρ_{i+1} − ρ_i) · (x̂ − x0)/ρ_i = x0 + ρ_{i+1} · ε

    In x that is x' = α_{i+1}·x0 + σ_{i+1}·ε: DDIM's deterministic update (Song et al. 2021, eq. 12,
    η = 0) at Euler's noise levels; the last step lands on x0. ρ at a timestep is the training table's,
    interpolated linearly between whole timesteps. diffusers starts from x̂_T = init_noise_sigma·z,
    z ~ N(0, I), with ρ_0 or, for "leading", √(ρ_0² + 1): in x, `init_noise_scale`·z, σ_0 or 1.
    `step` is pure; it runs in float32 and returns model_output's dtype, as in diffusers, and is
    deterministic: `eta` > 0 raises ValueError, and `generator` is unused."""

    # EulerDiscreteScheduler's settings with the one value each that this class implements
    settings = {"interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "timestep_type": "discrete", "final_sigmas_type": "zero"}

    def __init__(self, config: SchedulerConfig, num_steps: int, start: int = 0):
        refuse_other_settings(config, "euler", self.settings, " (euler-a has no such setting)")
        T = config.num_train_timesteps
        spacing = config.timestep_spacing or "linspace"  # the default of diffusers' Euler schedulers
        self.timesteps = t = checked_timesteps(config, num_steps, spacing, lay_out=euler_timesteps, start=start)  # [N]
        self.config, self.num_steps = config, len(t)

        alphas_cumprod = torch.cumprod(1.0 - make_betas(config), dim=0)  # ᾱ_t, float32 [T]
        if config.rescale_betas_zero_snr:  # as diffusers: ᾱ_T = 2^-24 rather than 0 keeps ρ finite
            alphas_cumprod[-1] = 2.0**-24
        table = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()  # ρ at each training timestep, [T]
        rho = np.interp(t.numpy(), np.arange(T), table).astype(np.float32)  # [N], float64 interpolation as diffusers
        self.rho = torch.cat([torch.from_numpy(rho), torch.zeros(1)])  # [N+1], diffusers' `sigmas`
        self.alpha = 1 / (self.rho**2 + 1) ** 0.5  # [N+1], 1 at the end
        self.sigma = self.rho * self.alpha  # [N+1], 0 at the end
        self.init_noise_scale = 1.0 if spacing == "leading" else self.sigma[0].item()

    def predict(self, model_output: torch.Tensor, i: int, x: torch.Tensor):
        """Turn the model's output at step i into (x0, ε)."""
        return x0_and_eps(model_output, x, self.alpha[i], self.sigma[i], self.config.prediction_type)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x at timesteps[i]: α_i·x0 + σ_i·ε, which is diffusers' x̂ = x0 + ρ_i·ε scaled by α_i."""
        return self.alpha[i] * x0 + self.sigma[i] * noise

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, eta: float = 0.0, generator=None):
        """One update from x at timesteps[i] to the next timestep. Returns (x_prev, x0)."""
        if eta > 0:
            raise ValueError(f"Euler is deterministic; eta must be 0, got {eta}")
        x0, eps = self.predict(model_output.float(), i, x.float())
        x_prev = self.alpha[i + 1] * x0 + self.sigma[i + 1] * eps
        return x_prev.to(model_output.dtype), x0.to(model_output.dtype)


class EulerAncestral(Euler):
    """Euler's method with ancestral noise (k-diffusion's `get_ancestral_step`, η = 1): step i takes an
    Euler step down to ρ_down and adds fresh noise z ~ N(0, I) of ρ_up, back up to ρ_{i+1}:

        ρ_up² = ρ_{i+1}² (ρ_i² − ρ_{i+1}²) / ρ_i²,   ρ_down² = ρ_{i+1}² − ρ_up²
        x̂' = x0 + ρ_down · ε + ρ_up · z

    α_{i+1}·ρ_up is DDPM's posterior standard deviation between the two timesteps (Ho et al. 2020,
    eq. 7), so in x this is DDIM's update with η = 1 (Song et al. 2021, eq. 12 and 16) at Euler's noise
    levels. The last step (ρ_{i+1} = 0) adds no noise and lands on x0. z is drawn at every step, the
    last included, from `generator` as diffusers draws it: shaped like model_output, in its dtype,
    after the initial latents. Its strength is fixed, as in diffusers: `eta` > 0 raises ValueError.
    The update runs in float32 and returns model_output's dtype."""

    settings = {}  # EulerAncestralDiscreteScheduler has none of EulerDiscreteScheduler's settings

    def __init__(self, config: SchedulerConfig, num_steps: int, start: int = 0):
        super().__init__(config, num_steps, start)
        r_from, r_to = self.rho[:-1], self.rho[1:]  # [N] each
        self.rho_up = (r_to**2 * (r_from**2 - r_to**2) / r_from**2) ** 0.5  # [N]
        self.rho_down = (r_to**2 - self.rho_up**2) ** 0.5  # [N]

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, eta: float = 0.0, generator=None):
        """One update from x at timesteps[i] to the next timestep, with fresh noise. Returns (x_prev, x0)."""
        if eta > 0:
            raise ValueError(f"euler-a's noise has a fixed strength, as in diffusers; eta must be 0, got {eta}")
        x0, eps = self.predict(model_output.float(), i, x.float())
        z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        x_prev = self.alpha[i + 1] * (x0 + self.rho_down[i] * eps + self.rho_up[i] * z.float())
        return x_prev.to(model_output.dtype), x0.to(model_output.dtype)

    def transition(self, model_output: torch.Tensor, i: int, x: torch.Tensor, eta: float = 0.0):
        """(mean, σ), float32: step i draws x_prev ~ N(mean, σ²I), mean = α_{i+1}(x0 + ρ_down·ε) and
        σ = α_{i+1}·ρ_up, 0 at the last step."""
        if eta > 0:
            raise ValueError(f"euler-a's noise has a fixed strength, as in diffusers; eta must be 0, got {eta}")
        x0, eps = self.predict(model_output.float(), i, x.float())
        return self.alpha[i + 1] * (x0 + self.rho_down[i] * eps), self.alpha[i + 1] * self.rho_up[i]
