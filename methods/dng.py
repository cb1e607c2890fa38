"""Dynamic Negative Guidance (Koulischer, Deleu, Raya, Demeester, Ambrogioni, ICLR 2025, arXiv
2410.14398): a negative whose strength follows how likely the chain is to be making it.

Sampling p(x | not n) ∝ p(x)(1 − p(n | x)) needs the score of log(1 − p(n | x_t)), which is
−p_t/(1 − p_t) times that of log p(n | x_t), with p_t = p(n | x_t). With a strength λ and the
static baseline's three branches (methods/static.py) that is

    ε = ε_u + g(ε_c − ε_u) − w_t(ε_n − ε_u),    w_t = λ · p_t / (1 − p_t)

so the negative pushes hard only while the chain looks like heading for it, and switches itself off
when it does not. p_t is tracked along the chain (Alg. 1, the released `compute_posterior_DNG`): a
stochastic step draws x' ~ N(μ, σ²I), and weighing x' under the step the negative's output would
take, N(μ_n, σ²I), against the unconditional one, N(μ_u, σ²I), gives

    p' = clip(p · exp((δ − τ(‖x' − μ_n‖² − ‖x' − μ_u‖²)) / 2σ²), p_min, p_max),   p = π at the start

with the prior π, a temperature τ and an offset δ. As in the released code the likelihood ratio
multiplies p unnormalised, and the clip keeps it a probability. At τ = δ = 0, p stays π and DNG is
the static baseline at w_neg = λπ/(1 − π) (its "static limit").

On Stable Diffusion, the released code's unconditional model is the empty text's branch ε_u and its
to-forget model the negative's branch ε_n; x' is the step actually taken, with the positive CFG term
and the negative term in it, and μ, σ are the sampler's own step (`transition`, sampler/base.py), so
the sampler must draw noise: ddim with eta > 0 (eta = 1 is DDPM's step, the released code's) or
euler-a. `DynamicStrength` is the hook; `DNG` the method; `Strength` its settings, which VL-DNP's
--negative-schedule dng uses too (methods/vldnp.py): a negative that appears or changes mid-run is
tracked from the prior again from the step it appears.
"""
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Method, Plan
from methods.options import comma_list, finite
from sampler.loop import at_step, words
from vlm.tasks import NUDITY


@dataclass(frozen=True)
class Strength:
    """How DNG sets w_neg: λ and the posterior that scales it (Alg. 1; the released code's names in
    brackets). The defaults are within the paper's Stable Diffusion settings (docs/evaluation.md)."""
    lam: float = 20.0  # λ [guidance_scale]
    prior: float = 0.01  # π, p at the first step [prior]
    temperature: float = 0.2  # τ [Temp]
    offset: float = 0.003  # δ [offset]
    p_min: float = 1e-6  # [p_min]
    p_max: float = 0.99  # [p_max]

    # the options of cli/args.py that make one, for the methods that read them
    flags: ClassVar[tuple[str, ...]] = ("dng_lambdas", "dng_prior", "dng_temperature", "dng_offset", "dng_p_min",
                                        "dng_p_max")

    def __post_init__(self):
        if not 0 < self.p_min <= self.prior <= self.p_max < 1:
            raise ValueError(f"DNG needs 0 < p_min <= prior <= p_max < 1 (--dng-p-min, --dng-prior, --dng-p-max); "
                             f"got {self.p_min:g}, {self.prior:g}, {self.p_max:g}")
        if self.lam < 0 or self.temperature < 0:
            raise ValueError(f"DNG's lambda and temperature must be 0 or more (--dng-lambda, --dng-temperature); "
                             f"got {self.lam:g}, {self.temperature:g}")

    @classmethod
    def from_args(cls, args, who: str) -> list["Strength"]:
        """One per --dng-lambda value. Raises ValueError (one line) for settings out of range, or for a
        sampler that draws no noise, whose steps `who` could not weigh."""
        eta = getattr(args, "eta", None)  # generate.py's; evaluate.py has no --eta
        if not (args.sampler == "euler-a" or (args.sampler == "ddim" and eta)):
            sampler = f"{args.sampler} with --eta 0" if args.sampler == "ddim" and eta is not None else args.sampler
            raise ValueError(f"{who} weighs each step as the Gaussian it draws x from, and --sampler {sampler} draws "
                             "no noise; use euler-a" + (", or ddim with --eta above 0" if eta is not None else ""))
        return [cls(lam, args.dng_prior, args.dng_temperature, args.dng_offset, args.dng_p_min, args.dng_p_max)
                for lam in args.dng_lambdas]

    def scale(self, p: float) -> float:
        """w_neg = λ p / (1 − p)."""
        return self.lam * p / (1 - p)

    @property
    def description(self) -> dict:
        return dataclasses.asdict(self)

    def text(self) -> str:
        """For the PNG."""
        return (f"lambda {self.lam:g} prior {self.prior:g} temperature {self.temperature:g} offset {self.offset:g} "
                f"p_min {self.p_min:g} p_max {self.p_max:g}")

    def hook(self) -> "DynamicStrength":
        return DynamicStrength(self)


def update(p: torch.Tensor, x_next: torch.Tensor, mean_u: torch.Tensor, mean_n: torch.Tensor, variance: float,
           strength: Strength) -> torch.Tensor:
    """One step of Alg. 1: p [B], float64 on the CPU, after the step to x_next [B, ...] that was
    drawn from N(·, variance·I), where the unconditional and the negative branches would have
    stepped to the means mean_u and mean_n [B, ...]."""
    dtype = torch.promote_types(x_next.dtype, torch.float32)
    x = x_next.to(dtype).flatten(1)
    d = (x - mean_n.to(dtype).flatten(1)).square().sum(1) - (x - mean_u.to(dtype).flatten(1)).square().sum(1)  # [B]
    exponent = (strength.offset - strength.temperature * d.cpu().double()) / (2 * variance)
    return (p * exponent.exp()).clamp(strength.p_min, strength.p_max)


class DynamicStrength:
    """The DNG sampler hook, for one generate() call. For each image with a three-branch negative it
    weighs the step just taken (`update`) and sets w_neg = λ p_t / (1 − p_t) for this step. A
    negative set or changed by a hook before this one in the list (VL-DNP's) starts from the prior
    at the step it appears; an image without one has no p. `steps[b]` records, per step, image b's
    step, timestep, p_t and w_neg (None without a negative)."""

    def __init__(self, strength: Strength):
        self.strength = strength
        self.prompts: list[str] = []
        self.steps: list[list[dict]] = []
        self._p: list[float | None] = []
        self._last = None  # the step to weigh next: (i, x_t, outputs, per image its (u, n) rows or None)

    def __call__(self, state) -> None:
        if state.i == 0:
            self._start(state)
        else:
            self._weigh(state)
        guidance, previous = state.guidance, self._last[3] if self._last else [None] * len(self._p)
        rows = []
        for b, entry in enumerate(guidance.negative):
            negative = at_step(entry, state.i)
            if negative is None:
                self._p[b] = None
            elif previous[b] is None or previous[b][1][2] != negative:  # new: from the prior
                self._p[b] = self.strength.prior
            p = self._p[b]
            w = None if p is None else self.strength.scale(p)
            if w is not None:
                guidance.set_negative_scale(b, w)
            rows.append(None if p is None else (("u", b, at_step(guidance.uncond[b], state.i)), ("n", b, negative)))
            t = int(state.t) if float(state.t).is_integer() else float(state.t)
            self.steps[b].append({"step": state.i, "timestep": t, "p": p, "w_neg": w})
        self._last = (state.i, state.x, state.outputs, rows)

    def _start(self, state):
        if self.steps:
            raise RuntimeError("a DynamicStrength hook serves one generate() call; make a new one per call")
        if not hasattr(state.sampler, "transition"):
            raise ValueError(f"Dynamic Negative Guidance weighs each step as the Gaussian it draws x from; "
                             f"{type(state.sampler).__name__} draws no noise: use ddim with eta > 0, or euler-a")
        self.prompts = [words(p) for p in state.guidance.prompt]
        self.steps, self._p = [[] for _ in self.prompts], [None] * len(self.prompts)

    def _weigh(self, state):
        """Updates p of the images that had a negative at the last step, by the step from there to state.x."""
        i, x, outputs, rows = self._last
        tracked = [b for b, row in enumerate(rows) if row is not None]
        if not tracked:
            return
        out_u = torch.stack([outputs[rows[b][0]] for b in tracked])  # [K, 4, h, w]
        out_n = torch.stack([outputs[rows[b][1]] for b in tracked])
        mean_u, sigma = state.sampler.transition(out_u, i, x[tracked], state.eta)
        mean_n, _ = state.sampler.transition(out_n, i, x[tracked], state.eta)
        if float(sigma) == 0:
            raise ValueError(f"Dynamic Negative Guidance weighs each step as the Gaussian it draws x from; step {i} "
                             "drew no noise: use ddim with eta > 0, or euler-a")
        p = torch.tensor([self._p[b] for b in tracked], dtype=torch.float64)
        p = update(p, state.x[tracked], mean_u, mean_n, float(sigma) ** 2, self.strength)
        for b, value in zip(tracked, p.tolist()):
            self._p[b] = value

    def summary(self, b: int) -> str:
        """Image b's p_t for its PNG: where it started, its peak and where it ended; "none" without a negative."""
        seen = [s for s in self.steps[b] if s["p"] is not None]
        if not seen:
            return "none"
        peak = max(seen, key=lambda s: s["p"])
        return ", ".join(f"{label}{s['p']:.3g} at step {s['step']}"
                         for label, s in [("", seen[0]), ("max ", peak), ("", seen[-1])])

    def trace_images(self) -> list[dict]:
        """Per image: its prompt and its steps, for the trace."""
        return [{"image": b, "prompt": prompt, "steps": self.steps[b]} for b, prompt in enumerate(self.prompts)]


@dataclass(frozen=True)
class DNG(Method):
    """Dynamic Negative Guidance at one λ, with a fixed negative `text` (the task's static negative by
    default, as the static baseline's, or --static-negative)."""
    name = "dng"
    flags = ("static_negative", "vlm_task", "trace") + Strength.flags
    swept = True  # one per --dng-lambda value
    strength: Strength = Strength()
    text: str = NUDITY.static_negative

    @classmethod
    def add_options(cls, parser, many):
        d = parser.add_argument_group("dng: Dynamic Negative Guidance (Koulischer et al., ICLR 2025)")
        d.add_argument("--dng-lambda", dest="dng_lambdas", type=comma_list(finite), default=[20.0], metavar="L",
                       help="lambda in w_neg = lambda p_t/(1 - p_t), for dng and --negative-schedule dng"
                       + ("; a list sweeps it" if many else "") + " (default: 20)")
        d.add_argument("--dng-prior", type=finite, default=0.01, metavar="P", help="p_t where a negative starts "
                       "(default: %(default)s)")
        d.add_argument("--dng-temperature", type=finite, default=0.2, metavar="T", help="how fast p_t follows the "
                       "steps; 0 with --dng-offset 0 keeps it at the prior (default: %(default)s)")
        d.add_argument("--dng-offset", type=finite, default=0.003, metavar="D", help="added to each step's "
                       "log-likelihood ratio (default: %(default)s)")
        d.add_argument("--dng-p-min", type=finite, default=1e-6, metavar="P", help="p_t's floor (default: %(default)s)")
        d.add_argument("--dng-p-max", type=finite, default=0.99, metavar="P", help="p_t's ceiling (default: %(default)s)")

    @classmethod
    def rules(cls, args):
        return [("dng_lambdas", args.dng_lambdas and min(args.dng_lambdas) >= 0, "numbers of 0 or more")]

    @classmethod
    def from_args(cls, args, variant=None):
        cls.no_variant(variant)
        text = args.static_negative or args.task.static_negative
        return [cls(strength, text) for strength in Strength.from_args(args, "dng")]

    @property
    def scale(self) -> float:
        """λ, the value evaluate.py sweeps."""
        return self.strength.lam

    def plan(self, pipe, prompt, batch=1):
        hook = self.strength.hook()
        return DNGPlan(prompt, {"negative": self.text, "negative_scale": self.strength.scale(self.strength.prior),
                                "hooks": [hook]},
                       {"Method": self.label, "DNG": self.strength.text(), "DNG negative": self.text},
                       [{"step": 0, "negative": self.text, "error": None}], hook)


@dataclass
class DNGPlan(Plan):
    """The hook decides each image's w_neg per step: its p_t goes in the PNG, in brief, and in the trace."""
    hook: DynamicStrength = None

    def image_parameters(self, b):
        return {**self.parameters, "DNG p_t": self.hook.summary(b)}

    def trace(self) -> dict:
        return {"method": "dng", "negative": self.arguments["negative"], "dng": self.hook.strength.description,
                "images": self.hook.trace_images()}
