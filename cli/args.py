"""What generate.py and evaluate.py share, written once: the options for the model, sampling, the
methods and VL-DNP (`add_shared_arguments`), and their one validation (`check_shared`), which runs
before any model is loaded. Every failure is one line on stderr: `fail` prints it, and a
UsageError is a bad argument (exit status 2)."""
import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

import methods
from checkpoint import looks_like_repo_id
from checkpoint.tensors import DTYPES
from sampler.base import SAMPLERS
from vlm.base import printable
from vlm.proposers import check_preview_decoder
from vlm.tasks import TASKS


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


def comma_list(item=str):
    """argparse type: "a, b,a" -> ["a", "b"] (deduplicated, in order), each item converted by `item`."""
    def parse(text: str) -> list:
        return list(dict.fromkeys(item(part.strip()) for part in text.split(",") if part.strip()))
    parse.__name__ = getattr(item, "__name__", "list")  # argparse names the type in its message
    return parse


def int_pair(separator: str, minimum: int):
    """argparse type: two integers joined by `separator`, e.g. "1024x768", each at least `minimum`."""
    def parse(text: str) -> tuple[int, int]:
        parts = text.lower().split(separator)
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(map(int, parts)) < minimum:
            what = "positive" if minimum > 0 else "non-negative"
            raise argparse.ArgumentTypeError(f"{text!r} is not two {what} integers like 1024{separator}768")
        return int(parts[0]), int(parts[1])
    return parse


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
    m.add_argument("--sampler", choices=list(SAMPLERS), default=sampler, help="ddim; dpm++2m, the paper's; euler; "
                   "euler-a, SDXL-Turbo's (default: %(default)s)")
    m.add_argument("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
    m.add_argument("--guidance", dest="guidance_scale", type=finite, default=7.5, metavar="SCALE",
                   help="classifier-free guidance scale g; 1 or less skips the unconditional pass (default: 7.5)")
    m.add_argument("--height", type=int, metavar="PX", help="a multiple of 8 (default: the model's)")
    m.add_argument("--width", type=int, metavar="PX", help="a multiple of 8 (default: the model's)")
    m.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    m.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on cuda")
    m.add_argument("--quiet", action="store_true", help="no progress bar")

    w = p.add_argument_group("the methods' settings (an option no chosen method reads is refused)")
    w.add_argument("--negative-prompt", metavar="TEXT", help="a classic negative prompt, in place of the empty "
                   "unconditional text (sd, static, vldnp); method negative's text (default: the task's static one)")
    w.add_argument("--static-negative", metavar="TEXT", help="method static's fixed negative (default: the task's; "
                   "for nudity SAFREE's 17 concepts)")
    w.add_argument("--negative-scale", dest="negative_scales", type=comma_list(finite), default=[7.5], metavar="W",
                   help="w_neg in eps = eps_u + g(eps_c - eps_u) - w_neg(eps_n - eps_u), for static and vldnp"
                   + ("; a list sweeps it, e.g. 2.5,5,10" if many else "") + " (default: 7.5)")
    w.add_argument("--sld-presets", type=comma_list(), default=["weak", "medium", "strong", "max"], metavar="LIST",
                   help="method sld's presets (default: all four; sld-max names one)")
    w.add_argument("--safree-concepts", metavar="LIST", help="method safree's concepts: a comma list, or nudity, "
                   "artists-VanGogh, artists-KellyMcKernan (default: nudity)")
    w.add_argument("--proposer", choices=["auto", "vlm", "clip", "latent"] + ([] if many else ["static", "none"]),
                   help="vldnp's: who looks at the predicted image, a VLM server, CLIP, or a latent proposer distilled "
                   "from one (auto: latent with --latent-proposer, vlm with --vlm-url, else clip)"
                   + ("" if many else "; without --method, static and none name those methods"))
    w.add_argument("--vlm-url", metavar="URL", help="an OpenAI-compatible server, e.g. http://localhost:8000/v1; "
                   "VLM_API_KEY (or OPENAI_API_KEY) goes to that host alone")
    w.add_argument("--vlm-model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="(default: %(default)s)")
    w.add_argument("--vlm-task", choices=sorted(TASKS), default="nudity", help="what is asked, and the static "
                   "negative: nudity (the paper's), safety, creative (default: %(default)s)")
    w.add_argument("--vlm-steps", metavar="LIST", help="0-based steps to query, or none (default: the paper's "
                   "5,6,7,9,12,16,21,27,34,42 of 50, rescaled)")
    w.add_argument("--vlm-async", action="store_true", help="query in the background; answers apply on arrival")
    w.add_argument("--vlm-timeout", type=finite, default=30.0, metavar="S", help="seconds per request (default: 30)")
    w.add_argument("--vlm-retries", type=int, default=3, metavar="N", help="retries after a transient fault "
                   "(default: %(default)s)")
    w.add_argument("--vlm-max-in-flight", type=int, default=4, metavar="N", help="requests at once (default: 4)")
    w.add_argument("--allow-vlm-failures", action="store_true", help="run even if the VLM does not answer up front")
    w.add_argument("--clip-model", default="openai/clip-vit-large-patch14", metavar="MODEL",
                   help="CLIP's repo id or folder (default: %(default)s)")
    w.add_argument("--clip-threshold", type=finite, default=0.5, metavar="P", help="how sure CLIP must be that a "
                   "concept beats a neutral caption (default: 0.5)")
    w.add_argument("--latent-proposer", metavar="FILE", help="a latent proposer (distill.py train): it scores the "
                   "x0 latents, with no decode and no server")
    w.add_argument("--full-decode", action="store_true", help="decode all of x0, not just what the proposer sees")
    w.add_argument("--preview-decoder", default="vae", metavar="{vae,taesd,taesdxl,PATH}", help="what decodes the "
                   "x0 previews: the model's vae, as in the paper, or TAESD, cheaper and softer (default: vae)")

    d = p.add_argument_group("Dynamic Negative Guidance (Koulischer et al., ICLR 2025; methods/dng.py)")
    d.add_argument("--dng-lambda", dest="dng_lambdas", type=comma_list(finite), default=[20.0], metavar="L",
                   help="lambda in w_neg = lambda p_t/(1 - p_t), for dng and --negative-schedule dng"
                   + ("; a list sweeps it" if many else "") + " (default: 20)")
    d.add_argument("--dng-prior", type=finite, default=0.01, metavar="P", help="p_t where a negative starts "
                   "(default: %(default)s)")
    d.add_argument("--dng-temperature", type=finite, default=0.2, metavar="T", help="how fast p_t follows the steps; "
                   "0 with --dng-offset 0 keeps it at the prior (default: %(default)s)")
    d.add_argument("--dng-offset", type=finite, default=0.003, metavar="D", help="added to each step's "
                   "log-likelihood ratio (default: %(default)s)")
    d.add_argument("--dng-p-min", type=finite, default=1e-6, metavar="P", help="p_t's floor (default: %(default)s)")
    d.add_argument("--dng-p-max", type=finite, default=0.99, metavar="P", help="p_t's ceiling (default: %(default)s)")
    d.add_argument("--negative-schedule", type=comma_list(), default=["constant"], metavar="LIST", help="vldnp's "
                   "strength: constant (--negative-scale), or dng, DNG's for the negative it sees (--dng-*)"
                   + ("; a list runs each" if many else "") + " (default: constant)")
    return [a.dest for group in (w, d) for a in group._group_actions]


def given_options(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The dests of the options `argv` gives explicitly (whatever their values): argparse sets a
    default only where the namespace has no value yet, so a namespace primed with a marker keeps
    the marker wherever nothing was given."""
    unset = object()
    primed = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed = parser.parse_args(argv, primed)
    return {dest for dest, value in vars(parsed).items() if value is not unset}


def check_shared(args, specs: list[str], method_options: list[str], given: set[str]):
    """Checks the shared options and makes the methods `specs` names: sets args.chosen_methods,
    args.task, args.device and args.torch_dtype, and resolves --proposer auto. An option of
    `method_options` that was `given` and that no chosen method reads is refused."""
    check_rules([("steps", 1 <= args.steps <= 1000, "between 1 and 1000"),
                 ("guidance_scale", args.guidance_scale >= 0, "0 or more"),
                 ("negative_scales", args.negative_scales and min(args.negative_scales) >= 0, "numbers of 0 or more"),
                 ("dng_lambdas", args.dng_lambdas and min(args.dng_lambdas) >= 0, "numbers of 0 or more"),
                 ("vlm_timeout", 0 < args.vlm_timeout <= 86400, "more than 0 and at most 86400 (a day)"),
                 ("vlm_retries", 0 <= args.vlm_retries <= 100, "between 0 and 100"),
                 ("vlm_max_in_flight", 1 <= args.vlm_max_in_flight <= 1024, "between 1 and 1024"),
                 ("clip_threshold", 0 <= args.clip_threshold <= 1, "between 0 and 1")]
                + [(side, size is None or (size > 0 and size % 8 == 0), "a positive multiple of 8")
                   for side, size in [("height", args.height), ("width", args.width)]], args)
    if args.proposer in (None, "auto"):
        args.proposer = "latent" if args.latent_proposer else "vlm" if args.vlm_url else "clip"
    if args.proposer == "latent":
        if not args.latent_proposer:
            raise UsageError("--proposer latent needs --latent-proposer FILE, made by distill.py train")
        if not Path(args.latent_proposer).is_file():
            raise UsageError(f"--latent-proposer {args.latent_proposer}: no such file")
    if args.proposer == "vlm":
        from vlm.client import chat_url  # a leaf
        if not args.vlm_url:
            raise UsageError("--proposer vlm needs --vlm-url, e.g. http://localhost:8000/v1")
        try:
            chat_url(args.vlm_url)
        except ValueError as e:
            raise UsageError(f"--vlm-url {e}") from None
    args.task = TASKS[args.vlm_task]
    try:
        SAMPLERS[args.sampler]  # a leaf this copy lacks is said now, before any model loads
        args.chosen_methods = methods.from_args(args, specs)
        check_preview_decoder(args.preview_decoder)
    except ValueError as e:
        raise UsageError(str(e)) from None
    read = set().union(*(type(m).reads(args) for m in args.chosen_methods))
    for dest in [d for d in method_options if d in given and d not in read]:
        names = ", ".join(dict.fromkeys(m.name for m in args.chosen_methods))
        raise UsageError(f"{flag(dest)}: no method of this run reads it ({names}); leave it out or choose a method "
                         "that does")
    check_model(args.model)
    args.device = pick_device(args.device)
    args.torch_dtype = pick_dtype(args.dtype, args.device)


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


def check_model(model: str):
    path = Path(model).expanduser()
    if not path.exists() and (path.suffix in (".safetensors", ".ckpt") or not looks_like_repo_id(model)):
        raise UsageError(f"--model {model}: no such file or folder (nor a Hugging Face repo id like org/name)")


def make_folder(folder: Path, flag: str):
    """Makes `folder` and its missing parents, and checks that a file can be written in it."""
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise UsageError(f"{flag}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag}: cannot create the folder {folder} ({e.strerror})") from None
    try:
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
