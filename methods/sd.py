"""Plain Stable Diffusion: classifier-free guidance (Ho & Salimans 2022, eq. 6),

    ε = ε_u + g(ε_c − ε_u),    ε_u = ε_θ(x_t, "")

or, with --negative-prompt n, a classic negative prompt in place of the empty text (methods/negative.py)."""
from dataclasses import dataclass

from methods.base import Method, Plan, classic_negative


@dataclass(frozen=True)
class PlainSD(Method):
    name = "sd"
    flags = ("negative_prompt",)
    negative_prompt: str | None = None

    @classmethod
    def from_args(cls, args, variant=None):
        return [cls(args.negative_prompt)] if cls.no_variant(variant) else []

    def plan(self, pipe, prompt, batch=1):
        return Plan(prompt, {"negative_prompt": self.negative_prompt}, {"Method": self.label},
                    classic_negative(self.negative_prompt))
