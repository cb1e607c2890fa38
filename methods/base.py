"""What a method is. A method turns its settings, the loaded pipeline and a prompt into the arguments of
sampler/loop.py's `generate` (the prompt's conditioning, the branches, a guidance rule, step hooks)
and says what it records: the PNG's parameters and, per image, the negatives it used.

    method = StaticNegative(negative_scale=7.5)     # methods/static.py; a command line: options.from_args
    plan = method.plan(pipe, "a person on a beach")
    images = generate(pipe, plan.prompt, **plan.arguments, seed=1)
    plan.finish()                                  # hooks that run in the background are collected
    plan.image_parameters(0), plan.queries(0)      # what the PNG and the records say of image 0
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from files import write_json


@dataclass
class Plan:
    """One prompt made by one method: `prompt` (a text or a sampler.loop Conditioning) and generate()'s
    other keywords (`arguments`); the PNG settings it adds, led by "Method" (`parameters`); what the records
    keep of its negatives per query, alike for every image (`negatives`). Per-image hooks override below."""
    prompt: object
    arguments: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    negatives: list[dict] = field(default_factory=list)

    @property
    def negative_prompt(self) -> str | None:
        """The classic negative prompt, for the PNG's "Negative prompt:" line."""
        return self.arguments.get("negative_prompt")

    def image_parameters(self, b: int) -> dict:
        """The PNG settings of image b."""
        return self.parameters

    def queries(self, b: int) -> list[dict]:
        """What the records keep of image b's negatives."""
        return self.negatives

    def unguarded(self, b: int) -> str | None:
        """Why image b was made without the guard asked for (every query failed, say); None when it was not."""
        return None

    def summary(self) -> str | None:
        """A closing warning for stderr, when something went wrong that the images alone do not say."""
        return None

    def trace(self) -> dict | None:
        """The --trace JSON (vlm/trace.py's layout), for the methods that keep one."""
        return None

    def write_trace(self, path) -> Path:
        """Writes the trace JSON at `path` (and whatever goes beside it); returns the path."""
        return write_json(path, self.trace())

    def finish(self):
        """Collects what still runs after sampling (background queries); call it once generate() returns or raises."""


class Method:
    """One way to make an image, at one setting (one file of methods/, registered in methods/__init__.py).

    `name` is what --method and --methods call it. `flags` are the options it reads (argparse dests);
    an option given that no chosen method reads is refused, so no flag is silently ignored.
    `from_args` makes the instances a command line asks for: one per value it sweeps."""
    name: ClassVar[str] = "?"
    flags: ClassVar[tuple[str, ...]] = ()
    swept: ClassVar[bool] = False  # one instance per --negative-scale value
    needs_cfg: ClassVar[bool] = False  # its guard acts through the unconditional branch, which g <= 1 skips

    @classmethod
    def add_options(cls, parser, many: bool):
        """Adds this method's own options (methods/options.py adds the shared ones); `many`: lists sweep."""

    @classmethod
    def rules(cls, args) -> list[tuple[str, bool, str]]:
        """(option dest, whether its value is good, what it must be) for this method's own options."""
        return []

    @classmethod
    def reads(cls, args) -> set[str]:
        """The options this method reads with these arguments (a VLM's options only with a VLM, say)."""
        return set(cls.flags)

    @classmethod
    def from_args(cls, args, variant: str | None = None) -> list["Method"]:
        raise NotImplementedError

    @classmethod
    def no_variant(cls, variant: str | None) -> bool:
        """True; a ValueError for a variant ("sd-x") of a method that has none."""
        if variant is not None:
            raise ValueError(f"method {cls.name} has no variants; use {cls.name}, not {cls.name}-{variant}")
        return True

    @property
    def label(self) -> str:
        """What records and PNGs call it: its name, or name-variant ("sld-max")."""
        return self.name

    @property
    def scale(self) -> float | None:
        """w_neg, for the methods swept over it."""
        return getattr(self, "negative_scale", None) if self.swept else None

    @property
    def key(self) -> str:
        """Its part of image names and job keys: the label, then _w{scale} when swept."""
        return self.label if self.scale is None else f"{self.label}_w{self.scale:g}"

    def settings(self) -> dict:
        """What decides its images, for run.json: its label, w_neg as "scale" when swept, its other fields."""
        fields = {f.name: describe(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name != "negative_scale"} if dataclasses.is_dataclass(self) else {}
        return {"method": self.label, **({"scale": self.scale} if self.swept else {}), **fields}

    def prepare(self, device, dtype) -> str | None:
        """Makes what it needs besides the model (a proposer, a preview decoder); why a VLM does not answer, or None."""
        return None

    def check(self, pipe) -> str | None:
        """Why it cannot run on the loaded model, in one line; None if it can. Asked before any image."""
        return None

    def plan(self, pipe, prompt: str, batch: int = 1) -> Plan:
        """generate()'s arguments for `batch` images of `prompt`, and what the method records."""
        raise NotImplementedError


def classic_negative(text: str | None) -> list[dict]:
    """The records' entry for a classic negative prompt, in force from the first step."""
    return [] if text is None else [{"step": 0, "negative": text, "error": None}]


def describe(value):
    """A setting as run.json keeps it: plain values as they are, a part by its `description` or name."""
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    plain = value is None or isinstance(value, (str, int, float, bool))
    return value if plain else getattr(value, "description", None) or getattr(value, "name", repr(value))

