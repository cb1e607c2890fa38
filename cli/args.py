"""What generate.py and evaluate.py share, written once: the options for the model, sampling, the
methods and VL-DNP (`add_shared_arguments`), and their one validation before any model loads
(`check_shared`). Every failure is one line on stderr (`fail`); a UsageError is a bad argument (exit 2)."""
import argparse
import os
import sys
from pathlib import Path

import torch

import methods
import weights
from checkpoint import looks_like_repo_id
from checkpoint.tensors import DTYPES
from files import sha256_file
from methods.options import comma_list, finite
from sampler.base import SAMPLERS
from vlm.base import printable
from vlm.tasks import TASKS


class UsageError(Exception):
    """A bad argument, found before any model is loaded."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + message
        raise UsageError(message)


def int_pair(separator: str, minimum: int):
    """argparse type: two integers joined by `separator`, e.g. "1024x768", each at least `minimum`."""
    def parse(text: str) -> tuple[int, int]:
        parts = text.lower().split(separator)
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(map(int, parts)) < minimum:
            what = "positive" if minimum > 0 else "non-negative"
            raise argparse.ArgumentTypeError(f"{text!r} is not two {what} integers like 1024{separator}768")
        return int(parts[0]), int(parts[1])
    return parse


def text(value: str) -> str:
    """argparse type: text, refusing a byte the shell's text was not UTF-8 in (a lone surrogate to Python)."""
    if any("\ud800" <= c <= "\udfff" for c in value):
        raise argparse.ArgumentTypeError("not UTF-8 text (a byte of another encoding); give it in UTF-8")
    return value


def lora_spec(text: str) -> tuple[str, float]:
    """argparse type: FILE[:SCALE] -> (FILE, SCALE), SCALE 1 when not given (a path's own colons stay)."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, finite(scale)) if path else (text, 1.0)  # finite: inf and NaN are refused
    except ValueError:  # not a number: a colon of the path
        return text, 1.0


def add_shared_arguments(p: argparse.ArgumentParser, *, sampler: str, many: bool) -> list[str]:
    """The options both scripts take; returns the methods' (those an unused one of is refused). `sampler`:
    the default sampler; `many`: evaluate.py, where --negative-scale sweeps and --proposer is vldnp's."""
    m = p.add_argument_group("model and sampling")
    m.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                   help="Hugging Face repo id, diffusers folder or .safetensors file (default: %(default)s)")
    m.add_argument("--tokenizer", metavar="DIR", help="for single files: a tokenizer folder (tokenizer.json, or "
                   "vocab.json and merges.txt), or for SDXL a diffusers SDXL folder (default: downloaded)")
    m.add_argument("--prediction-type", choices=["epsilon", "v"], help="what the UNet predicts, overriding the "
                   "model's config or file (SD 2.x 768 models: v)")
    m.add_argument("--lora", dest="loras", action="append", type=lora_spec, default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) merged into the model at SCALE "
                   "(default 1); repeat it for more")
    m.add_argument("--sampler", choices=list(SAMPLERS), default=sampler, help="ddim; dpm++2m, the paper's; euler; "
                   "euler-a, SDXL-Turbo's (default: %(default)s)")
    m.add_argument("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
    m.add_argument("--guidance", dest="guidance_scale", type=finite, default=7.5, metavar="SCALE",
                   help="classifier-free guidance scale g; 1 or less skips the unconditional pass (default: 7.5)")
    m.add_argument("--strength", type=finite, metavar="S", help="how much of an edited image changes, in (0, 1]: the "
                   "last floor(steps*S) steps run (default: diffusers', 0.8, or 1 with a mask)")
    m.add_argument("--height", type=int, metavar="PX", help="a multiple of 8 (default: the model's)")
    m.add_argument("--width", type=int, metavar="PX", help="a multiple of 8 (default: the model's)")
    m.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    m.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on cuda")
    m.add_argument("--quiet", action="store_true", help="no progress bar")

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
    for name in filter(methods.METHODS.present, methods.METHODS):  # each method's own options, from its file
        methods.METHODS[name].add_options(p, many)
    return [a.dest for a in w._group_actions] + [a.dest for a in p._actions[first:]]


def given_options(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The dests of the options `argv` gives explicitly (whatever their values): argparse sets a
    default only where the namespace has no value yet, so a namespace primed with a marker keeps
    the marker wherever nothing was given; a repeatable option's (--lora) is a list, which it copies."""
    unset = object()
    primed = {a.dest: [] if isinstance(a, argparse._AppendAction) else unset for a in parser._actions
              if a.dest != argparse.SUPPRESS}
    parsed = parser.parse_args(argv, argparse.Namespace(**primed))
    return {dest for dest, value in vars(parsed).items() if dest in primed and value is not primed[dest]}


def check_shared(args, specs: list[str], method_options: list[str], given: set[str]):
    """Checks the shared options and makes the methods `specs` names, args.chosen_methods (each checks its own
    options); sets args.task, device and torch_dtype. A `given` one of `method_options` no method reads is refused."""
    check_rules([("steps", 1 <= args.steps <= 1000, "between 1 and 1000"),
                 ("guidance_scale", 0 <= args.guidance_scale <= 1000, "between 0 and 1000"),  # as a prompt file's
                 ("negative_scales", args.negative_scales and 0 <= min(args.negative_scales)
                  and max(args.negative_scales) <= 1000, "numbers between 0 and 1000"),
                 ("strength", args.strength is None or 0 < args.strength <= 1, "more than 0 and at most 1")]
                + [(side, size is None or (size > 0 and size % 8 == 0), "a positive multiple of 8")
                   for side, size in [("height", args.height), ("width", args.width)]], args)
    try:
        args.task = TASKS[args.vlm_task]
        SAMPLERS[args.sampler]  # a leaf this copy lacks is said now, before any model loads
        classes = list(dict.fromkeys(methods.METHODS[methods.split_name(spec)[0]] for spec in specs))
        check_rules([rule for cls in classes for rule in cls.rules(args)], args)  # before any method uses them
        args.chosen_methods = methods.from_args(args, specs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    read = set().union(*(cls.reads(args) for cls in classes))
    for dest in [d for d in method_options if d in given and d not in read]:
        raise UsageError(f"{flag(dest)}: no method of this run reads it ({', '.join(c.name for c in classes)}); "
                         "leave it out or choose a method that does")
    model = Path(args.model).expanduser()
    named = model.suffix in (".safetensors", ".ckpt") or not looks_like_repo_id(args.model)  # a file, not a repo
    if named and not os.path.exists(model):  # os.path's: False, not OSError, for a name too long
        raise UsageError(f"--model {args.model}: no such file or folder (nor a Hugging Face repo id like org/name)")
    for path, _ in args.loras:
        if not os.path.isfile(Path(path).expanduser()):
            raise UsageError(f"--lora {path}: no such file")
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device {e}") from None
    args.torch_dtype = pick_dtype(args.dtype, args.device)


def pick_device(name: str) -> torch.device:
    """"auto" is cuda, then mps, then cpu; else a device that exists here, or a ValueError naming it."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in available:
        raise ValueError(f"{name}: unknown device; use auto, cuda, cuda:N, mps or cpu")
    if not available[device.type]:
        raise ValueError(f"{name}: {device.type} is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name}: there are only {torch.cuda.device_count()} cuda devices")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is fp16 on cuda and fp32 elsewhere; else fp32, fp16 or bf16."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(args):
    """The pipeline --model names, with the --lora files merged in."""
    pipe = weights.load_pipeline(args.model, args.device, args.torch_dtype, args.tokenizer, args.prediction_type)
    for path, scale in args.loras:
        weights.load_lora(pipe, path, scale)
    return pipe


def model_settings(args) -> dict:
    """What decides a run's images besides its methods and prompts, as its run.json or data.json
    records them to refuse a resume with others; a key only where used, so older folders resume."""
    return {"model": args.model, "tokenizer": args.tokenizer, "prediction_type": args.prediction_type,
            "dtype": str(args.torch_dtype).removeprefix("torch."), "sampler": args.sampler, "steps": args.steps,
            "guidance": args.guidance_scale, "seed": args.seed, "height": args.height, "width": args.width,
            **({"strength": args.strength} if args.strength is not None else {}),
            **({"lora": [{"file": str(p), "scale": scale, "sha256": sha256_file(p)} for p, scale in args.loras]}
               if args.loras else {})}


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


def fail(message, code: int) -> int:
    """Prints `message` as one line on stderr (the first line of a longer one) and returns `code`.
    Control characters are shown as escapes (vlm.client.printable), whoever wrote the message."""
    lines = str(message).strip().splitlines()
    print(f"error: {printable(lines[0] if lines else str(message))}", file=sys.stderr)
    return code
