"""What every sampler is, and the samplers by name: `SAMPLERS[name](config, num_steps)` makes one for
a generation, and sampler/loop.py drives it through this interface alone. Only DDIM is needed by the
rest of the project; the others are leaves (leaves.py), imported when first named."""
from typing import Protocol

import torch

from leaves import Leaves


class Sampler(Protocol):
    """A sampler over num_steps of the training timesteps, made by `cls(config: SchedulerConfig,
    num_steps, start=0)`, which raises ValueError for a step count it cannot lay out. It takes the
    steps of that layout from `start` on: all of them, or the last ones for an image edit, which
    starts from the image noised to timesteps[0] (sampler/edit.py). Step i goes from x at
    timesteps[i] towards clean data; x0 is the clean latents the model output predicts there."""

    num_steps: int  # the steps it takes: the layout's num_steps less `start`
    # [num_steps], training timesteps in descending order: int64, or float32 for a sampler that also visits
    # points between them (Euler's "linspace" layout, as diffusers), where the UNet runs at the fractional t
    timesteps: torch.Tensor
    init_noise_scale: float  # x at timesteps[0] is init_noise_scale · z, z ~ N(0, I): diffusers' init_noise_sigma in x

    def predict(self, model_output: torch.Tensor, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, ε) that the model output at step i implies. Pure: it may be called any time."""
        ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x at timesteps[i] for clean latents x0 and noise ε ~ N(0, I): α_i·x0 + σ_i·ε, diffusers'
        add_noise at that step (i = num_steps: x0 itself)."""
        ...

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One update of x from timesteps[i]; returns (x_prev, x0). eta scales the fresh noise drawn
        from `generator`, for a sampler that has any."""
        ...

    # A sampler that draws fresh noise (ddim at eta > 0, euler-a) also has
    #   transition(model_output, i, x, eta=0.0) -> (mean, σ): step i draws x_prev ~ N(mean, σ²I),
    # which Dynamic Negative Guidance (methods/dng.py) weighs. The deterministic ones have none.


SAMPLERS: Leaves = Leaves("sampler", {
    "ddim": "sampler.ddim:DDIM",
    "dpm++2m": "sampler.dpm:DPMSolverPP",
    "euler": "sampler.euler:Euler",
    "euler-a": "sampler.euler:EulerAncestral",
})
