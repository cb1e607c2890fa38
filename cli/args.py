"""What the scripts share, written once: the options for the model and sampling, with the methods'
(methods/options.py) (`add_shared_arguments`), and their one validation before any model loads
(`check_shared`). Every failure is one line on stderr (`fail`); a UsageError is a bad argument (exit 2)."""
import argparse
import os
import re
import sys
from pathlib import Path

import torch

import weights
from checkpoint import looks_like_repo_id
from checkpoint.tensors import DTYPES
from methods import options
from methods.options import SIDE, UsageError, check_rules, finite
from sampler.base import SAMPLERS
from files import printable


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + message
        raise UsageError(message)


def int_pair(separator: str, minimum: int):
    """argparse type: two integers joined by `separator`, e.g. "1024x768", each from `minimum` to SIDE."""
    def parse(text: str) -> tuple[int, int]:
        parts = text.lower().split(separator)
        if len(parts) != 2 or not all(p.strip().isdigit() and minimum <= int(p) <= SIDE for p in parts):
            raise argparse.ArgumentTypeError(f"{text!r}: not two integers {minimum} to {SIDE} like 1024{separator}768")
        return int(parts[0]), int(parts[1])
    return parse


def lora_spec(text: str) -> tuple[str, float]:
    """argparse type: FILE[:SCALE] -> (FILE, SCALE), SCALE 1 when not given (a path's own colons stay)."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, finite(scale)) if path else (text, 1.0)  # finite: inf and NaN are refused
    except ValueError:  # not a number: a colon of the path
        return text, 1.0


def add_shared_arguments(p: argparse.ArgumentParser, *, sampler: str, many: bool) -> list[str]:
    """The options the scripts share; returns the methods' (those an unused one of is refused). `sampler`:
    the default sampler; `many`: evaluate.py's and distill.py's, where lists sweep and --proposer is vldnp's."""
    m = p.add_argument_group("model and sampling")
    m.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                   help="Hugging Face repo id, diffusers folder or .safetensors file (default: %(default)s)")
    m.add_argument("--tokenizer", metavar="DIR", help="for single files: a tokenizer folder (tokenizer.json, or "
                   "vocab.json and merges.txt), or for SDXL a diffusers SDXL folder (default: downloaded)")
    m.add_argument("--prediction-type", choices=["epsilon", "v"], help="what the UNet predicts, overriding the "
                   "model's config or file (SD 2.x 768 models: v)")
    m.add_argument("--lora", dest="loras", action="append", type=lora_spec, default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) merged at SCALE (default 1); repeatable")
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
    return options.add_options(p, many)


def check_shared(args, specs: list[str], method_options: list[str], given: set[str]):
    """Checks the shared options and makes the methods `specs` names, args.chosen_methods (methods/options.py);
    sets args.task, device and torch_dtype. A `given` one of `method_options` no method reads is refused."""
    check_rules([("steps", 1 <= args.steps <= 1000, "between 1 and 1000"),
                 ("guidance_scale", 0 <= args.guidance_scale <= 1000, "between 0 and 1000"),  # as a prompt file's
                 ("strength", args.strength is None or 0 < args.strength <= 1, "more than 0 and at most 1")]
                + [(side, size is None or (0 < size <= SIDE and size % 8 == 0), f"a multiple of 8 from 8 to {SIDE}")
                   for side, size in [("height", args.height), ("width", args.width)]], args)
    SAMPLERS[args.sampler]  # a leaf this copy lacks is said now, before any model loads
    args.chosen_methods = options.choose(args, specs, method_options, given)
    model = Path(args.model).expanduser()
    named = model.suffix in (".safetensors", ".ckpt") or not looks_like_repo_id(args.model)  # a file, not a repo
    if named and not os.path.exists(model):  # os.path's: False, not OSError, for a name too long
        raise UsageError(f"--model {args.model}: no such file or folder (nor a Hugging Face repo id like org/name)")
    if missing := [path for path, _ in args.loras if not os.path.isfile(Path(path).expanduser())]:
        raise UsageError(f"--lora {missing[0]}: no such file")
    args.device = pick_device(args.device)
    auto = torch.float16 if args.device.type == "cuda" else torch.float32  # --dtype auto: fp16 on cuda
    args.torch_dtype = DTYPES.get(args.dtype, auto)


def pick_device(name: str) -> torch.device:
    """--device: "auto" is cuda, then mps, then cpu; else a device that exists here, or a UsageError."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    if not re.fullmatch(r"(cuda|mps|cpu)(:(0|[1-9]\d?))?", name):  # torch.device() raises for 01, past 2^31
        raise UsageError(f"--device {name}: unknown device; use auto, cuda, cuda:N, mps or cpu")
    device = torch.device(name)
    if not available[device.type]:
        raise UsageError(f"--device {name}: {device.type} is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} cuda devices")
    return device


def load_model(args):
    """The pipeline --model names, with the --lora files merged in."""
    pipe = weights.load_pipeline(args.model, args.device, args.torch_dtype, args.tokenizer, args.prediction_type)
    for path, scale in args.loras:
        weights.load_lora(pipe, path, scale)
    return pipe


def fail(message, code: int) -> int:
    """Prints `message` as one line on stderr (the first line of a longer one) and returns `code`.
    Control characters are shown as escapes (files.printable), whoever wrote the message."""
    print(f"error: {printable((str(message).strip().splitlines() or [str(message)])[0])}", file=sys.stderr)
    return code
