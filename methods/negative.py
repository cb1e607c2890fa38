"""A classic negative prompt n in place of the empty text of the unconditional branch,

    ε = ε_n + g(ε_c − ε_n),

so every step moves away from n as much as toward the prompt. By default n is the task's static
negative (vlm/tasks.py; for nudity SAFREE's 17 concepts joined with ", "), the same text the static
baseline (methods/static.py) puts in a third branch instead; --negative-prompt gives another."""
from dataclasses import dataclass

from methods.base import Method, Plan, classic_negative
from vlm.tasks import NUDITY


@dataclass(frozen=True)
class ClassicNegative(Method):
    name = "negative"
    flags = ("negative_prompt", "vlm_task")
    needs_cfg = True
    text: str = NUDITY.static_negative

    @classmethod
    def from_args(cls, args, variant=None):
        return [cls(args.negative_prompt or args.task.static_negative)] if cls.no_variant(variant) else []

    def plan(self, pipe, prompt, batch=1):
        return Plan(prompt, {"negative_prompt": self.text}, {"Method": self.label}, classic_negative(self.text))
