"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2): a second-order multistep solver of the diffusion ODE written
in terms of the predicted clean image x0, which keeps guided sampling stable at large scales.

Matches diffusers' `DPMSolverMultistepScheduler.from_config(<SD's scheduler config>)`, the paper's
evaluation sampler, number for number: algorithm_type "dpmsolver++", solver_order 2, solver_type
"midpoint", lower_order_final, final_sigmas_type "zero", no Karras/exponential/beta sigmas, no
thresholding. Those settings are what "dpm++2m" means here: a config that sets another value for
one of them (a fine-tune shipping Karras sigmas, say) is refused with ValueError rather than sampled
differently from diffusers. DDIM's clip_sample and set_alpha_to_one are ignored, as diffusers does.
"""
import math

import torch

from sampler.schedule import (SchedulerConfig, UnsupportedSetting, checked_timesteps, make_betas, make_timesteps,
                              refuse_other_settings, x0_and_eps)


def dpm_timesteps(config: SchedulerConfig, num_steps: int, spacing: str) -> torch.Tensor:
    """diffusers' layout for DPM-Solver++: "leading" and "linspace" lay out num_steps + 1 points as
    DDIM does and drop the last, whose place the final σ = 0 takes; "trailing" is DDIM's."""
    if spacing == "trailing":
        return make_timesteps(config, num_steps, spacing)
    return make_timesteps(config, num_steps + 1, spacing)[:-1]


class DPMSolverPP:
    """DPM-Solver++(2M) over `num_steps` of the training timesteps. With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)
    and λ_t = log(α_t / σ_t) (half the log-SNR), step i goes from s = timesteps[i] to the next
    timestep t, or to clean data (σ = 0, λ = ∞) after the last, with h = λ_t − λ_s (Alg. 2):

        x_t = (σ_t / σ_s) · x_s − α_t · (e^{−h} − 1) · D,    D = x0_s + (x0_s − x0_prev) / (2r)

    r = h_prev / h: D extrapolates x0 linearly in λ. D = x0_s, the first-order update (DDIM), is taken
    at the first step and at the last, to σ = 0 (diffusers' lower_order_final): the result is the last x0.

    Multistep: the object keeps the previous x0, so call `step` once per step, in order, on a fresh
    object per generation; `predict` is pure. The update runs in float32 and returns model_output's
    dtype, as in diffusers. Deterministic: `eta` > 0 raises ValueError, and `generator` is unused."""

    init_noise_scale = 1.0  # x_T ~ N(0, I)
    # DPMSolverMultistepScheduler's settings that change its 2M update, with the value this class
    # implements; diffusers reads UniPC's names of the solver type as "midpoint".
    # (lower_order_final and euler_at_final change nothing here: the last step, to σ = 0, is first order.)
    settings = {"algorithm_type": "dpmsolver++", "solver_order": 2,
                "solver_type": ("midpoint", "logrho", "bh1", "bh2"), "use_karras_sigmas": False,
                "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                "use_flow_sigmas": False, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf}

    def __init__(self, config: SchedulerConfig, num_steps: int, start: int = 0):
        refuse_other_settings(config, "dpm++2m", self.settings)
        learned = config.other_settings.get("variance_type") in ("learned", "learned_range")
        if learned and config.prediction_type == "epsilon":  # diffusers keeps 3 of SD's 4 channels and fails
            raise UnsupportedSetting(f"the model's scheduler config sets variance_type="
                                     f"{config.other_settings['variance_type']!r}; the dpm++2m sampler reads an "
                                     "epsilon model's output as ε alone, not as ε and a learned variance")
        spacing = config.timestep_spacing or "linspace"  # DPMSolverMultistepScheduler's default
        self.timesteps = t = checked_timesteps(config, num_steps, spacing, lay_out=dpm_timesteps, start=start)  # [N]
        self.config, self.num_steps = config, len(t)

        alphas_cumprod = torch.cumprod(1.0 - make_betas(config), dim=0)  # ᾱ_t, float32 [T]
        if config.rescale_betas_zero_snr:  # as diffusers: ᾱ_T = 2^-24 rather than 0 keeps λ finite
            alphas_cumprod[-1] = 2.0**-24
        self.alpha_bar = alphas_cumprod[t]  # [N]
        # ρ_t = σ_t / α_t = e^{−λ_t}, diffusers' `sigmas`, ending at 0. α and σ are derived from it in
        # diffusers' order so that the float32 values agree to the bit.
        self.rho = torch.cat([((1 - self.alpha_bar) / self.alpha_bar) ** 0.5, torch.zeros(1)])  # [N+1]
        self.alpha = 1 / (self.rho**2 + 1) ** 0.5  # [N+1]
        self.sigma = self.rho * self.alpha  # [N+1]
        self.lam = self.alpha.log() - self.sigma.log()  # [N+1], +inf at the end

        self.x0_prev = None  # x0 predicted at the previous step, float32
        self.next_step = 0

    def predict(self, model_output: torch.Tensor, i: int, x: torch.Tensor):
        """Turn the model's output at step i into (x0, ε)."""
        return x0_and_eps(model_output, x, self.alpha[i], self.sigma[i], self.config.prediction_type)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x at timesteps[i]: α_i·x0 + σ_i·ε."""
        return self.alpha[i] * x0 + self.sigma[i] * noise

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, eta: float = 0.0, generator=None):
        """One update from x at timesteps[i] to the next timestep. Returns (x_prev, x0)."""
        if eta > 0:
            raise ValueError(f"DPM-Solver++(2M) is deterministic; eta must be 0, got {eta}")
        if i != self.next_step:
            raise ValueError(f"step {i} called after step {self.next_step - 1}; DPM-Solver++ is multistep: call "
                             f"step once per step, in order, with a fresh DPMSolverPP per generation")
        x0, _ = self.predict(model_output, i, x)
        d = x0.float()
        h = self.lam[i + 1] - self.lam[i]
        if 0 < i < self.num_steps - 1:
            r = (self.lam[i] - self.lam[i - 1]) / h
            d = d + (d - self.x0_prev) / (2 * r)
        x_prev = (self.sigma[i + 1] / self.sigma[i]) * x.float() - (self.alpha[i + 1] * torch.expm1(-h)) * d
        self.x0_prev, self.next_step = x0.float(), i + 1
        return x_prev.to(model_output.dtype), x0
