"""The static baseline of the VL-DNP paper (Chang et al. 2025, arXiv 2510.26052): a fixed negative n
as a third branch from the first step, through the same guidance as VL-DNP,

    ε = ε_u + g(ε_c − ε_u) − w_neg(ε_n − ε_u),

where VL-DNP chooses n by looking. n is the task's static negative (vlm/tasks.py; for nudity SAFREE's
17 concepts joined with ", ") unless --static-negative gives another; w_neg is --negative-scale."""
from dataclasses import dataclass

from methods.base import Method, Plan, classic_negative
from sampler.loop import words
from vlm.tasks import NUDITY


@dataclass(frozen=True)
class StaticNegative(Method):
    name = "static"
    flags = ("static_negative", "negative_scales", "vlm_task", "negative_prompt", "trace")
    swept = True
    negative_scale: float = 7.5
    text: str = NUDITY.static_negative
    negative_prompt: str | None = None  # a classic negative prompt for the unconditional branch, as well

    @classmethod
    def from_args(cls, args, variant=None):
        cls.no_variant(variant)
        text = args.static_negative or args.task.static_negative
        return [cls(w, text, args.negative_prompt) for w in args.negative_scales]

    def plan(self, pipe, prompt, batch=1):
        plan = StaticPlan(prompt, {"negative": self.text, "negative_scale": self.negative_scale,
                                   "negative_prompt": self.negative_prompt},
                          {"Method": self.label, "Negative scale": f"{self.negative_scale:g}",
                           "Static negative": self.text},
                          classic_negative(self.negative_prompt) + [{"step": 0, "negative": self.text, "error": None}])
        plan.arguments["hooks"] = [plan.see_first_step]
        return plan


@dataclass
class StaticPlan(Plan):
    first_timestep: int | float | None = None
    prompts: list[str] | None = None

    def see_first_step(self, state):
        """A hook that only looks: the first timestep and the prompts, for the trace."""
        if state.i == 0:
            self.first_timestep, self.prompts = state.t, [words(p) for p in state.guidance.prompt]

    def trace(self) -> dict:
        """The negative of each image, in force from step 0, in VL-DNP's trace layout (methods/vldnp.py)."""
        negative, w = self.arguments["negative"], self.arguments["negative_scale"]
        query = {"step": 0, "timestep": self.first_timestep, "raw": "", "items": [], "negative": negative,
                 "error": None, "latency": None, "took_effect": 0}
        return {"method": "static", "negative": negative, "negative_scale": w, "query_steps": [0], "filmstrip": None,
                "images": [{"image": b, "prompt": p, "queries": [query]} for b, p in enumerate(self.prompts or [])]}
