"""The methods' command line, written once for generate.py, evaluate.py and distill.py: the options
several methods share and each method's own (Method.add_options, in its file), their types, and the
check that makes the methods a command line names (`choose`), then readies their parts (`prepare_all`).
A bad option is one line: UsageError."""
import argparse
import math

from methods import METHODS, Method
from vlm.tasks import TASKS

SIDE = 65504  # a size's longest side, in pixels: float16's largest, as SDXL's size ids are in the model's dtype


class UsageError(Exception):
    """A bad argument, found before any model is loaded."""


def finite(text: str) -> float:
    """argparse type: a float that is neither inf nor NaN, which would only end in a NaN image."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def comma_list(item=str):
    """argparse type: "a, b,a" -> ["a", "b"] (deduplicated, in order), each item converted by `item`."""
    def parse(text: str) -> list:
        return list(dict.fromkeys(item(part.strip()) for part in text.split(",") if part.strip()))
    parse.__name__ = getattr(item, "__name__", "list")  # argparse names the type in its message
    return parse


def text(value: str) -> str:
    """argparse type: text, refusing a byte the shell's text was not UTF-8 in (a lone surrogate to Python)."""
    if any("\ud800" <= c <= "\udfff" for c in value):
        raise argparse.ArgumentTypeError("not UTF-8 text (a byte of another encoding); give it in UTF-8")
    return value


def add_options(p: argparse.ArgumentParser, many: bool) -> list[str]:
    """The methods' options; returns their dests. `many`: evaluate.py's, where lists sweep."""
    w = p.add_argument_group("the methods (methods/; an option no chosen method reads is refused)")
    w.add_argument("--negative-prompt", type=text, metavar="TEXT", help="a classic negative prompt, in place of the "
                   "empty unconditional text (sd, static, vldnp); method negative's text (default: the task's static "
                   "one)")
    w.add_argument("--negative-scale", dest="negative_scales", type=comma_list(finite), default=[7.5], metavar="W",
                   help="w_neg in eps = eps_u + g(eps_c - eps_u) - w_neg(eps_n - eps_u), for static and vldnp"
                   + ("; a list sweeps it, e.g. 2.5,5,10" if many else "") + " (default: 7.5)")
    w.add_argument("--static-negative", type=text, metavar="TEXT", help="the fixed negative of static and dng "
                   "(default: the task's; for nudity SAFREE's 17 concepts)")
    w.add_argument("--vlm-task", choices=sorted(TASKS), default="nudity", help="the concern: what a proposer is "
                   "asked, and the static negative: nudity (the paper's), safety, creative (default: %(default)s)")
    first = len(p._actions)
    for name in filter(METHODS.present, METHODS):  # each method's own options, from its file
        METHODS[name].add_options(p, many)
    return [a.dest for a in w._group_actions] + [a.dest for a in p._actions[first:]]


def choose(args, specs: list[str], options: list[str], given: set[str]) -> list[Method]:
    """The methods `specs` names, each made from its options once they pass its rules; sets args.task.
    One of `options` that is `given` but read by no method is refused."""
    try:
        args.task = TASKS[args.vlm_task]
        classes = list(dict.fromkeys(METHODS[split_name(spec)[0]] for spec in specs))
        w, cfg = args.negative_scales, ", ".join(c.name for c in classes if c.needs_cfg)
        check_rules([("negative_scales", w and 0 <= min(w) and max(w) <= 1000, "numbers between 0 and 1000"),
                     ("guidance_scale", args.guidance_scale > 1 or not cfg, f"above 1 for {cfg} (a guard that acts "
                      "through the unconditional branch, which g <= 1 skips, as in diffusers)")]
                    + [rule for cls in classes for rule in cls.rules(args)], args)  # before any method uses them
        chosen = from_args(args, specs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    read = set().union(*(cls.reads(args) for cls in classes))
    for dest in [d for d in options if d in given and d not in read]:
        raise UsageError(f"{flag(dest)}: no method of this run reads it ({', '.join(c.name for c in classes)}); "
                         "leave it out or choose a method that does")
    return chosen


def given_options(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The dests of the options `argv` gives explicitly (whatever their values): argparse sets a
    default only where the namespace has no value yet, so a namespace primed with a marker keeps
    the marker wherever nothing was given; a repeatable option's (--lora) is a list, which it copies."""
    unset = object()
    primed = {a.dest: [] if isinstance(a, argparse._AppendAction) else unset for a in parser._actions
              if a.dest != argparse.SUPPRESS}
    parsed = parser.parse_args(argv, argparse.Namespace(**primed))
    return {dest for dest, value in vars(parsed).items() if dest in primed and value is not primed[dest]}


def flag(dest: str) -> str:
    """The option a dest comes from: negative_scales -> --negative-scale."""
    return {"negative_scales": "--negative-scale", "guidance_scale": "--guidance", "dng_lambdas": "--dng-lambda"}.get(
        dest, "--" + dest.replace("_", "-"))


def check_rules(rules: list[tuple[str, bool, str]], args):
    """Each rule is (argument dest, whether its value is good, what it must be)."""
    for name, ok, rule in rules:
        if not ok:
            value = getattr(args, name)
            value = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else value
            raise UsageError(f"{flag(name)} {value}: must be {rule}")


def split_name(spec: str) -> tuple[str, str | None]:
    """"sld-max" -> ("sld", "max"), a method and its variant; "vldnp" -> ("vldnp", None)."""
    if spec in METHODS:
        return spec, None
    name, _, variant = spec.partition("-")
    if name in METHODS and variant:
        return name, variant
    raise ValueError(f"unknown method {spec!r}; use {', '.join(METHODS)} (sld also as sld-weak ... sld-max)")


def from_args(args, specs: list[str]) -> list[Method]:
    """The instances a command line asks for, in the order named: one per variant and swept value.
    Raises ValueError, one line, for a setting a method cannot take."""
    made = {}
    for spec in dict.fromkeys(specs):
        name, variant = split_name(spec)
        for method in METHODS[name].from_args(args, variant):
            made.setdefault(method.key, method)
    return list(made.values())


def prepare_all(chosen: list[Method], device, dtype, allow_failures: bool) -> str | None:
    """Method.prepare for each, before the model loads: a one-line ValueError for a part that cannot load
    or, unless `allow_failures`, a VLM that does not answer; then the warning to show, or None."""
    problem = next(filter(None, [method.prepare(device, dtype) for method in chosen]), None)
    if problem and not allow_failures:
        raise ValueError(f"the VLM does not answer: {problem}. Start it or fix --vlm-url; "
                         "--allow-vlm-failures runs anyway, recording each failed query")
    return problem and f"the VLM does not answer ({problem}); running anyway, recording each failed query"
