"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models"), as Stable Diffusion uses it.

Matches diffusers' DDIMScheduler number for number. As there, the ᾱ tables are float32 and the per-step
ᾱ are 0-d tensors, which do not promote the latents: arithmetic and results stay in the input dtype.
"""
import torch

from sampler.schedule import SchedulerConfig, checked_timesteps, make_betas, randn, x0_and_eps


class DDIM:
    """DDIM sampler over `num_steps` of the training timesteps (Song et al. 2021, eq. 12):

        x_prev = √ᾱ_prev · x0 + √(1 − ᾱ_prev − σ²) · ε + σ · z,
        σ = η · √((1 − ᾱ_prev) / (1 − ᾱ_t)) · √(1 − ᾱ_t / ᾱ_prev)     (eq. 16)

    η = 0 gives deterministic DDIM, and η = 1 gives DDPM's posterior variance. The object holds only
    tables, and `step` is a pure function of its arguments. Step i goes from timesteps[i] to
    prev_timesteps[i] = timesteps[i] - T // num_steps. If that is below 0, ᾱ_prev is 1 when
    set_alpha_to_one is set and ᾱ_0 otherwise."""

    init_noise_scale = 1.0  # x_T ~ N(0, I)

    def __init__(self, config: SchedulerConfig, num_steps: int, start: int = 0):
        T = config.num_train_timesteps
        spacing = config.timestep_spacing or "leading"  # DDIMScheduler's default
        self.timesteps = t = checked_timesteps(config, num_steps, spacing, start=start)  # [N]
        self.config, self.num_steps = config, len(t)
        self.alphas_cumprod = torch.cumprod(1.0 - make_betas(config), dim=0)  # ᾱ_t, float32 [T]
        self.prev_timesteps = t - T // num_steps  # [N], a stride of the whole layout's
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

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x at timesteps[i]: √ᾱ_t·x0 + √(1 − ᾱ_t)·ε (Ho et al. 2020, eq. 4)."""
        if i == self.num_steps:
            return x0
        a = self.alpha_bar[i]
        return a**0.5 * x0 + (1 - a) ** 0.5 * noise

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, eta: float = 0.0, generator=None):
        """One update from x at timesteps[i] to x_prev at prev_timesteps[i]. Returns (x_prev, x0).
        For eta > 0, z is drawn from `generator` as diffusers draws it: shaped like model_output, in its dtype."""
        mean, sigma, x0 = self._gaussian(model_output, i, x, eta)
        if eta > 0:
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            return mean + sigma * z, x0
        return mean, x0

    def transition(self, model_output: torch.Tensor, i: int, x: torch.Tensor, eta: float = 0.0):
        """(mean, σ): step i draws x_prev ~ N(mean, σ²I) (eq. 12). σ is 0 at eta = 0, and at eta = 1
        DDPM's posterior deviation between the two timesteps (Ho et al. 2020, eq. 7)."""
        return self._gaussian(model_output, i, x, eta)[:2]

    def _gaussian(self, model_output, i, x, eta):
        """(mean, σ, x0) of step i."""
        x0, eps = self.predict(model_output, i, x)
        a, a_prev = self.alpha_bar[i], self.alpha_bar_prev[i]
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        return a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps, sigma, x0
