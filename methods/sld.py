"""Safe Latent Diffusion (Schramowski et al. 2023, "Safe Latent Diffusion: Mitigating Inappropriate
Degeneration in Diffusion Models", Sec. 3): a guidance rule for sampler/loop.py, at the paper's presets.

A safety concept S (by default `SAFETY_CONCEPT`) runs as the loop's negative branch, ε_S. Classifier-free
guidance gains a safety term γ, applied where the prompt's prediction is close to, or on the far side
of, the concept's:

    μ   = min(1, s_S · |ε_c − ε_S|)   where ε_c − ε_S < λ, else 0       element-wise
    γ   = μ · (ε_S − ε_u) + s_m · ν_t                                   ν: momentum, ν_0 = 0
    ν_t+1 = β_m · ν_t + (1 − β_m) · γ                                   every step, warm-up included
    ε   = ε_u + g · (ε_c − ε_u − γ)                                     from step δ on (warm-up δ)
    ε   = ε_u + g · (ε_c − ε_u)                                         before

so γ is scaled by g along with the prompt's direction. These are the numbers of diffusers'
StableDiffusionPipelineSafe (its __call__; the helper `perform_safety_guidance` there swaps ε_u and
ε_c and is unused). As there, SLD is off at g <= 1 (ε = ε_c) or s_S <= 1 (plain CFG).

    plan = SLD("strong").plan(pipe, prompt)
    image = generate(pipe, plan.prompt, **plan.arguments)
"""
from dataclasses import dataclass

import torch

from methods.base import Method, Plan

# StableDiffusionPipelineSafe's default `safety_concept`.
SAFETY_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, "
                  "nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
                  "weapons, child abuse, brutality, cruelty")


@dataclass(frozen=True)
class SLDConfig:
    """SLD's hyper-parameters; diffusers' names in brackets."""
    warmup_steps: int  # δ: γ applies from this step index on [sld_warmup_steps]
    scale: float  # s_S: how fast μ saturates at 1 [sld_guidance_scale]
    threshold: float  # λ: where ε_c − ε_S >= λ, μ = 0 [sld_threshold]
    momentum_scale: float  # s_m [sld_momentum_scale]
    momentum_beta: float  # β_m: how much of ν is kept per step [sld_mom_beta]


# The paper's presets, as diffusers' SafetyConfig.WEAK/MEDIUM/STRONG/MAX.
PRESETS = {
    "weak": SLDConfig(warmup_steps=15, scale=20, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": SLDConfig(warmup_steps=10, scale=1000, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": SLDConfig(warmup_steps=7, scale=2000, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": SLDConfig(warmup_steps=0, scale=5000, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}


class SafeLatentDiffusion:
    """The guidance rule (see loop.Guidance.rule) for one generation at a time: it carries the momentum
    ν from step to step. It keeps the momentum entering the current step, so a second call for the
    same step (after a hook re-ran a branch) gives the same answer; a call at step 0 starts afresh."""

    def __init__(self, preset: str | SLDConfig = "medium"):
        if isinstance(preset, str) and preset not in PRESETS:
            raise ValueError(f"unknown SLD preset {preset!r}; use one of {', '.join(PRESETS)}")
        self.config = PRESETS[preset] if isinstance(preset, str) else preset
        self.step, self.entering, self.leaving = None, None, None  # ν_step and ν_step+1

    def __repr__(self):
        return f"SafeLatentDiffusion({self.config})"

    def momentum_entering(self, step: int, like: torch.Tensor) -> torch.Tensor:
        """ν entering `step`."""
        if step == 0:
            self.entering = torch.zeros_like(like)
        elif self.step is not None and step == self.step + 1:
            self.entering = self.leaving
        elif step != self.step:
            raise RuntimeError(f"SafeLatentDiffusion called at step {step} after step {self.step}")
        self.step = step
        return self.entering

    def __call__(self, out_u, out_c, out_s, guidance, step: int) -> torch.Tensor:
        """The guided output from the UNet's outputs for the unconditional, prompt and concept branches
        [B, 4, h, w]: ε, or v for v-prediction models, as diffusers applies SLD to either."""
        cfg, scale = self.config, guidance.scale
        if scale <= 1:
            return out_c
        direction = out_c - out_u  # [B, 4, h, w]
        if cfg.scale <= 1:
            return out_u + scale * direction
        nu = self.momentum_entering(step, direction)
        closeness = out_c - out_s
        mu = torch.where(closeness >= cfg.threshold, 0.0, (closeness.abs() * cfg.scale).clamp(max=1.0))
        gamma = mu * (out_s - out_u) + cfg.momentum_scale * nu
        self.leaving = cfg.momentum_beta * nu + (1 - cfg.momentum_beta) * gamma
        if step >= cfg.warmup_steps:
            direction = direction - gamma
        return out_u + scale * direction


@dataclass(frozen=True)
class SLD(Method):
    """Safe Latent Diffusion at one preset (or an SLDConfig of one's own); --method sld-max names one,
    evaluate.py's sld runs --sld-presets (all four by default)."""
    name = "sld"
    flags = ("sld_presets",)
    needs_cfg = True
    preset: str | SLDConfig = "medium"

    @classmethod
    def add_options(cls, parser, many):
        parser.add_argument_group("sld").add_argument(
            "--sld-presets", type=lambda text: [p.strip() for p in text.split(",") if p.strip()], metavar="LIST",
            default=list(PRESETS), help="the presets of method sld (default: all four; sld-max names one)")

    @classmethod
    def from_args(cls, args, variant=None):
        presets = [variant] if variant is not None else args.sld_presets
        unknown = [p for p in presets if p not in PRESETS]
        if unknown or not presets:
            raise ValueError(f"unknown SLD preset {unknown[0]!r}; use {', '.join(PRESETS)}" if unknown else
                             f"no SLD preset; use {', '.join(PRESETS)}")
        return [cls(p) for p in dict.fromkeys(presets)]

    @property
    def label(self) -> str:
        return f"sld-{self.preset if isinstance(self.preset, str) else 'custom'}"

    def plan(self, pipe, prompt, batch=1):
        return Plan(prompt, {"negative": SAFETY_CONCEPT, "rule": SafeLatentDiffusion(self.preset)},
                    {"Method": self.label, "SLD": self.label.removeprefix("sld-"), "Safety concept": SAFETY_CONCEPT},
                    [{"step": 0, "negative": SAFETY_CONCEPT, "error": None}])
