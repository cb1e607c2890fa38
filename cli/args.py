"""Argument checks shared by the command lines. Every failure is one line on stderr: `fail` prints it,
and a UsageError is a bad argument found before any model is loaded (exit status 2)."""
import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

from checkpoint.hub import looks_like_repo_id
from checkpoint.taesd import REPOS as TAESD_REPOS
from checkpoint.tensors import DTYPES
from vlm.client import printable


class UsageError(Exception):
    """A bad argument, found before any model is loaded."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + message
        raise UsageError(message)


def finite(text: str) -> float:
    """argparse type: a float that is neither inf nor NaN, which would only end in a NaN image."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_pair(separator: str, minimum: int):
    """argparse type: two integers joined by `separator`, e.g. "1024x768", each at least `minimum`."""
    def parse(text: str) -> tuple[int, int]:
        parts = text.lower().split(separator)
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(map(int, parts)) < minimum:
            what = "positive" if minimum > 0 else "non-negative"
            raise argparse.ArgumentTypeError(f"{text!r} is not two {what} integers like 1024{separator}768")
        return int(parts[0]), int(parts[1])
    return parse


def check_rules(rules: list[tuple[str, bool, str]], args):
    """Each rule is (argument name, whether its value is good, what it must be)."""
    for name, ok, rule in rules:
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {rule}")


def check_model(model: str):
    path = Path(model).expanduser()
    if not path.exists() and (path.suffix in (".safetensors", ".ckpt") or not looks_like_repo_id(model)):
        raise UsageError(f"--model {model}: no such file or folder (nor a Hugging Face repo id like org/name)")


PREVIEW_HELP = ("what decodes VL-DNP's x0 previews, the images the proposer sees and the --trace filmstrip shows: "
                "vae, the model's own VAE, as in the paper; taesd, madebyollin/taesd, the tiny autoencoder SD "
                "interfaces use for live previews (about 17x fewer FLOPs, softer images; 10 MB, downloaded once), "
                "or taesdxl, madebyollin/taesdxl, SDXL's; "
                "or a TAESD folder (diffusers AutoencoderTiny) or madebyollin's taesd_decoder.safetensors "
                "(default: vae)")


def check_preview_decoder(choice: str):
    """--preview-decoder is vae, taesd, or an existing folder or .safetensors file (read when it loads,
    before the diffusion model)."""
    if choice == "vae" or choice in TAESD_REPOS:
        return
    path = Path(choice).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
        return
    what = "not a .safetensors file" if path.is_file() else "no such file or folder"
    raise UsageError(f"--preview-decoder {choice}: {what}; use vae, taesd, taesdxl, a TAESD folder or a "
                     "taesd_decoder.safetensors file")


def check_writable(folder: Path, flag: str):
    """`folder` exists and a file can be made in it."""
    try:
        if not folder.is_dir():
            raise UsageError(f"{flag}: {folder} is not an existing folder")
        with tempfile.TemporaryFile(dir=folder):  # the sure test: os.access misjudges root and read-only mounts
            pass
    except OSError as e:
        raise UsageError(f"{flag}: cannot write in {folder} ({e.strerror})") from None


def pick_device(name: str) -> torch.device:
    """`auto` is cuda, then mps, then cpu."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in available:
        raise UsageError(f"--device {name}: unknown device; use auto, cuda, cuda:N, mps or cpu")
    if not available[device.type]:
        raise UsageError(f"--device {name}: {device.type} is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} cuda devices")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on cuda and fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def fail(message, code: int) -> int:
    """Prints `message` as one line on stderr (the first line of a longer one) and returns `code`.
    Control characters are shown as escapes (vlm.client.printable), whoever wrote the message."""
    lines = str(message).strip().splitlines()
    print(f"error: {printable(lines[0] if lines else str(message))}", file=sys.stderr)
    return code
