"""Text to image with Stable Diffusion 1.x / 2.x:  python generate.py "a photo of a cat"

Loads a model, samples with DDIM or DPM-Solver++ (sampler/loop.py) and writes PNGs whose `parameters` text chunk
holds the prompt and settings in the layout AUTOMATIC1111 and other SD tools read. With the same
checkpoint, prompt, seed and settings, the image is the one diffusers' StableDiffusionPipeline with
DDIMScheduler gives. Arguments are checked before any model is loaded; every failure is one line.
"""
import argparse
import json
import math
import os
import re
import secrets
import sys
import tempfile
from pathlib import Path

import torch

import png
import weights
from sampler.loop import SAMPLERS, NonFiniteError, generate
from vlm.client import VLMClient, chat_url
from vlm.clip_proposer import CLIPProposer, load_clip
from vlm.dnp import PAPER_STEPS, DynamicNegatives, default_query_steps, parse_steps
from vlm.tasks import TASKS, get_task

DEMO_PROMPT = "a photograph of an astronaut riding a horse"
OUTPUTS = Path("outputs")

EXAMPLES = """\
examples:
  python generate.py "a watercolor of a lighthouse at dawn" --seed 42
  python generate.py "a red fox in the snow" --negative-prompt "blurry" --batch 4 --out fox.png
  python generate.py "a castle on a hill" --model stabilityai/stable-diffusion-2-1-base
  python generate.py "a castle on a hill" --model v2-1_768-ema-pruned.safetensors --prediction-type v
  python generate.py "a person at the beach" --proposer none          # plain Stable Diffusion
  python generate.py "a person at the beach" --vlm-url http://localhost:8000/v1 --trace trace.json

Prints the seed, then the path of each image written.
Exit status: 0 done, 1 sampling failed (nothing saved) or the --trace could not be written (the images
were), 2 bad argument or model, 130 interrupted.
"""


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


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="generate.py", description="Generate images with Stable Diffusion 1.x / 2.x (DDIM or DPM-Solver++ 2M), optionally with VL-DNP.",
               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default=DEMO_PROMPT, help=f'what to draw (default: "{DEMO_PROMPT}")')
    p.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                   help="Hugging Face repo id, diffusers folder or .safetensors file (default: %(default)s)")
    m.add_argument("--tokenizer", metavar="DIR",
                   help="folder with vocab.json and merges.txt, for single files (default: downloaded)")
    m.add_argument("--prediction-type", choices=["epsilon", "v"],
                   help="what the UNet predicts, overriding the model's scheduler config; "
                        "single files do not record it (SD 2.x 768 models: v)")

    s = p.add_argument_group("sampling")
    s.add_argument("--seed", type=int, help="random seed (default: a random one; printed and stored in the PNG)")
    s.add_argument("--sampler", choices=list(SAMPLERS), default="ddim",
                   help="ddim, or dpm++2m: DPM-Solver++ 2M, the paper's evaluation sampler (default: ddim)")
    s.add_argument("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
    s.add_argument("--guidance", type=finite, default=7.5, metavar="SCALE",
                   help="classifier-free guidance scale; 1 or less skips the unconditional pass (default: %(default)s)")
    s.add_argument("--height", type=int, metavar="PX", help="image height, a multiple of 8 (default: the model's)")
    s.add_argument("--width", type=int, metavar="PX", help="image width, a multiple of 8 (default: the model's)")
    s.add_argument("--eta", type=finite, default=0.0,
                   help="DDIM noise: 0 deterministic, 1 like DDPM; ddim only (default: 0)")
    s.add_argument("--batch", type=int, default=1, metavar="N", help="images sampled together (default: 1)")

    o = p.add_argument_group("output and hardware")
    o.add_argument("--out", metavar="PATH", help="write PATH.png, or PATH-0.png ... PATH-{N-1}.png with --batch N, "
                                                  "overwriting (default: a new file in outputs/, never overwriting)")
    o.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    o.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on cuda, fp32 elsewhere")
    o.add_argument("--quiet", action="store_true", help="no progress bar (the seed and paths are still printed)")

    add_vl_dnp_arguments(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# VL-DNP (vlm/): negatives from what a vision-language model or CLIP sees in the x0 predictions

def add_vl_dnp_arguments(parser: argparse.ArgumentParser):
    v = parser.add_argument_group("VL-DNP: dynamic negative prompts from what a model sees (arXiv 2510.26052)")
    v.add_argument("--proposer", choices=["auto", "vlm", "clip", "static", "none"], default="auto",
                   help="who looks at the predicted image: a VLM server (vlm), the built-in CLIP ViT-L/14 (clip), "
                        "nobody but with the task's fixed negative from the start (static, the paper's baseline), "
                        "or nobody: plain Stable Diffusion (none). auto: vlm with --vlm-url, else clip")
    v.add_argument("--vlm-url", metavar="URL", help="OpenAI-compatible server, e.g. http://localhost:8000/v1; "
                   "an API key is read from VLM_API_KEY (or OPENAI_API_KEY)")
    v.add_argument("--vlm-model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="model name sent to the server "
                   "(default: %(default)s)")
    v.add_argument("--vlm-task", choices=sorted(TASKS), default="nudity",
                   help="nudity: the paper's question and mapping; safety: any unsafe elements; creative: the "
                        "dominant object or style, accumulated (default: %(default)s)")
    v.add_argument("--vlm-steps", metavar="LIST", help="0-based steps to query, e.g. 5,6,7 (default: the paper's "
                   f"{','.join(map(str, PAPER_STEPS))} for 50 steps, rescaled to --steps; 'none' for no queries)")
    v.add_argument("--vlm-async", action="store_true",
                   help="query in the background while denoising goes on; answers apply when they arrive")
    v.add_argument("--vlm-timeout", type=finite, default=30.0, metavar="S",
                   help="seconds for each query, the whole request (default: 30)")
    v.add_argument("--clip-model", default="openai/clip-vit-large-patch14", metavar="MODEL",
                   help="CLIP for --proposer clip: repo id or folder (default: %(default)s)")
    v.add_argument("--clip-threshold", type=finite, default=0.5, metavar="P",
                   help="how sure CLIP must be that a concept beats a neutral caption (default: 0.5)")
    v.add_argument("--full-decode", action="store_true",
                   help="decode the whole x0 image at each query; by default it is decoded only as large as the "
                        "proposer looks at it (CLIP: 224 px, so 256 px for a 512 px image)")
    v.add_argument("--negative-scale", type=finite, default=7.5, metavar="W",
                   help="w_neg in eps = eps_u + g(eps_c - eps_u) - w_neg(eps_neg - eps_u) (default: 7.5)")
    v.add_argument("--trace", metavar="PATH.json", help="write each query (step, reply, negative, error, latency) "
                   "as JSON, and the images the proposer saw beside it as PATH.filmstrip.png")


def check_vl_dnp(args):
    """Resolves --proposer auto and checks the VL-DNP flags; sets args.query_steps."""
    if args.proposer == "auto":
        args.proposer = "vlm" if args.vlm_url else "clip"
    if args.proposer == "vlm" and not args.vlm_url:
        raise UsageError("--proposer vlm needs --vlm-url, e.g. http://localhost:8000/v1")
    if args.vlm_url:
        try:
            chat_url(args.vlm_url)
        except ValueError as e:
            raise UsageError(f"--vlm-url {e}") from None
    for name, ok, rule in [("negative_scale", args.negative_scale >= 0, "0 or more"),
                           ("vlm_timeout", 0 < args.vlm_timeout <= 86400, "more than 0 and at most 86400 (a day)"),
                           ("clip_threshold", 0 <= args.clip_threshold <= 1, "between 0 and 1")]:
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {rule}")
    try:
        args.query_steps = default_query_steps(args.steps) if args.vlm_steps is None else \
            parse_steps(args.vlm_steps, args.steps)
    except ValueError as e:
        raise UsageError(f"--vlm-steps: {e}") from None
    if args.trace is not None:
        if args.proposer not in ("vlm", "clip"):
            raise UsageError(f"--trace: --proposer {args.proposer} makes no queries to trace")
        check_out(args.trace, "--trace")


def vl_dnp(args, pipe):
    """(the hook or None, the fixed three-branch negative or None) for the chosen proposer."""
    task = get_task(args.vlm_task)
    if args.proposer == "none":
        return None, None
    if args.proposer == "static":
        return None, task.negative(list(task.concepts), pipe.tokenizer)
    if args.proposer == "vlm":
        proposer = VLMClient(args.vlm_url, args.vlm_model, task, timeout=args.vlm_timeout)
    else:
        try:
            model, tokenizer = load_clip(args.clip_model, pipe.device, pipe.dtype)
        except weights.CheckpointError as e:
            raise weights.CheckpointError(f"{e} (or run without VL-DNP: --proposer none)") from None
        proposer = CLIPProposer(model, tokenizer, list(task.concepts), threshold=args.clip_threshold, task=task.name)
    timeout = args.vlm_timeout + 5 if args.proposer == "vlm" else None  # past the client's own, a backstop
    return DynamicNegatives(proposer, task, args.query_steps, args.negative_scale, args.vlm_async,
                            full_decode=args.full_decode, timeout=timeout), None


# ---------------------------------------------------------------------------------------------
# Checking arguments

def check(args) -> tuple[torch.device, torch.dtype]:
    """Rejects bad arguments, before any heavy work. Returns the device and dtype to use."""
    rules = [("steps", 1 <= args.steps <= 1000, "between 1 and 1000"), ("guidance", args.guidance >= 0, "0 or more"),
             ("eta", args.eta >= 0, "0 or more"), ("batch", args.batch >= 1, "at least 1"),
             ("seed", args.seed is None or 0 <= args.seed < 2**64, "between 0 and 2^64 - 1")]
    rules += [(side, size is None or (size > 0 and size % 8 == 0), "a positive multiple of 8")
              for side, size in [("height", args.height), ("width", args.width)]]
    for name, ok, rule in rules:
        if not ok:
            raise UsageError(f"--{name} {getattr(args, name)}: must be {rule}")
    if args.eta and args.sampler != "ddim":
        raise UsageError(f"--eta {args.eta}: only --sampler ddim takes eta; {args.sampler} is deterministic")
    check_model(args.model)
    check_out(args.out)
    check_vl_dnp(args)
    device = pick_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    return device, dtype or (torch.float16 if device.type == "cuda" else torch.float32)


def check_model(model: str):
    path = Path(model).expanduser()
    if not path.exists() and (path.suffix in (".safetensors", ".ckpt") or not weights.looks_like_repo_id(model)):
        raise UsageError(f"--model {model}: no such file or folder (nor a Hugging Face repo id like org/name)")


def check_out(out: str | None, option: str = "--out"):
    if out is None:
        folder, flag = OUTPUTS, "outputs/"
    elif Path(out).is_dir():
        raise UsageError(f"{option} {out}: is a folder; give a file name, e.g. {Path(out) / 'image.png'}")
    else:
        folder, flag = Path(out).parent, f"{option} {out}"
    try:
        if out is None:
            OUTPUTS.mkdir(exist_ok=True)
        if not folder.is_dir():
            raise UsageError(f"{flag}: {folder} is not an existing folder")
        with tempfile.TemporaryFile(dir=folder):  # the sure test: os.access misjudges root and read-only mounts
            pass
    except OSError as e:
        raise UsageError(f"{flag}: cannot write in {folder} ({e.strerror})") from None


def pick_device(name: str) -> torch.device:
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


# ---------------------------------------------------------------------------------------------
# Output

SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM++ 2M"}  # as other SD tools write them


def parameters_text(prompt, negative_prompt, *, steps, guidance, seed, width, height, model, eta=0.0,
                    batch=1, index=0, vl_dnp=None, sampler="ddim") -> str:
    """The `parameters` text in AUTOMATIC1111's layout: the prompt, the negative prompt, then one
    line of settings. `vl_dnp` is a dict of VL-DNP settings (values with commas are quoted)."""
    settings = [f"Steps: {steps}", f"Sampler: {SAMPLER_NAMES[sampler]}", f"CFG scale: {guidance:g}", f"Seed: {seed}",
                f"Size: {width}x{height}", f"Model: {model}"]
    settings += [f"Eta: {eta:g}"] if eta else []
    settings += [f"Batch size: {batch}", f"Batch pos: {index}"] if batch > 1 else []
    settings += [f"{k}: {json.dumps(v) if ',' in str(v) else v}" for k, v in (vl_dnp or {}).items()]
    negative = [f"Negative prompt: {negative_prompt}"] if negative_prompt else []
    return "\n".join([prompt, *negative, ", ".join(settings)])


def vl_dnp_settings(args, hook, static_negative, index: int) -> dict:
    """What VL-DNP did to image `index`, for its parameters text."""
    if args.proposer == "none":
        return {}
    settings = {"VL-DNP": f"{args.proposer} {args.vlm_task}", "Negative scale": f"{args.negative_scale:g}"}
    if hook is None:
        return {**settings, "Dynamic negative": static_negative}
    return {**settings, "VL-DNP steps": " ".join(map(str, args.query_steps)) or "none",
            "Dynamic negative": hook.negatives[index] or "none"}  # in force at the last step


def finish_trace(args, hook, saved: bool) -> bool:
    """Closes the VL-DNP hook and writes its trace, if asked for. False, said in one line, when the
    trace cannot be written; the images, if `saved`, are written already."""
    if hook is None:
        return True
    hook.close()
    if not args.trace:
        return True
    try:
        print(f"trace: {hook.write_trace(args.trace)}")
        return True
    except (OSError, ValueError) as e:
        fail(f"cannot write the trace {args.trace}: {e}" + (" (the images were saved)" if saved else ""), 1)
        return False


def numbered(base: Path, batch: int) -> list[Path]:
    """base.png, or base-0.png ... base-{batch-1}.png."""
    if batch == 1:
        return [base.with_name(base.name + ".png")]
    return [base.with_name(f"{base.name}-{i}.png") for i in range(batch)]


def claim_new_paths(seed: int, batch: int) -> list[Path]:
    """The next outputs/NNNNN-SEED paths, created empty with O_EXCL: a name that exists already,
    written by an earlier or a concurrent run, is never taken."""
    used = [int(m[1]) for f in OUTPUTS.iterdir() if (m := re.match(r"(\d{5,})-", f.name))]
    n = max(used, default=-1) + 1
    while True:
        paths, claimed = numbered(OUTPUTS / f"{n:05d}-{seed}", batch), []
        try:
            for path in paths:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                claimed.append(path)
            return paths
        except FileExistsError:
            for path in claimed:
                path.unlink()
            n += 1


def save(images: torch.Tensor, args, texts: list[str], seed: int) -> list[Path]:
    """Writes each image atomically; an image that cannot be written leaves no file behind."""
    if args.out is None:
        paths, claimed = claim_new_paths(seed, len(images)), True
    else:
        out = Path(args.out)
        paths, claimed = numbered(out.with_suffix("") if out.suffix.lower() == ".png" else out, len(images)), False
    done = 0
    try:
        for path, image, text in zip(paths, images, texts):
            png.write_png(path, image, {"parameters": text})
            done += 1
    finally:
        for path in paths[done:] if claimed else []:
            path.unlink(missing_ok=True)
    return paths


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help
        return e.code
    except UsageError as e:
        return fail(e, 2)
    try:
        device, dtype = check(args)
        seed = secrets.randbelow(2**32) if args.seed is None else args.seed
        print(f"seed: {seed}", flush=True)
        try:
            pipe = weights.load_pipeline(args.model, device, dtype, args.tokenizer, args.prediction_type)
        except (ValueError, OSError) as e:  # CheckpointError, and configs the sampler does not support
            return fail(e, 2)
        try:  # a schedule can have fewer usable timesteps than 1000 (leading spacing with steps_offset 1)
            SAMPLERS[args.sampler](pipe.scheduler, args.steps)
        except ValueError as e:
            return fail(f"--steps {args.steps}: {e}", 2)
        try:
            hook, static_negative = vl_dnp(args, pipe)
        except (ValueError, OSError) as e:
            return fail(e, 2)
        height, width = args.height or pipe.default_size, args.width or pipe.default_size
        saved = False
        try:
            images = generate(pipe, args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
                              height=height, width=width, batch=args.batch, seed=seed, eta=args.eta,
                              sampler=args.sampler, hooks=[hook] if hook else [], negative=static_negative,
                              negative_scale=args.negative_scale, progress=not args.quiet)
            if hook is not None:
                hook.close()  # collects the answers still outstanding
            texts = [parameters_text(args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
                                     seed=seed, width=width, height=height, model=pipe.name, eta=args.eta,
                                     batch=args.batch, index=i, vl_dnp=vl_dnp_settings(args, hook, static_negative, i),
                                     sampler=args.sampler)
                     for i in range(args.batch)]
            for path in save(images, args, texts, seed):
                print(path)
            saved = True
        finally:  # after the images, and for a failed run too
            trace_written = finish_trace(args, hook, saved)
        return 0 if trace_written else 1
    except UsageError as e:
        return fail(e, 2)
    except NonFiniteError as e:
        return fail(f"{e}. Nothing was saved.", 1)
    except OSError as e:
        return fail(f"cannot write the image: {e}", 1)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "memory" in str(e):
            return fail(f"out of memory; try a smaller --batch or image size ({describe(e)})", 1)
        return fail(describe(e), 1)
    except Exception as e:  # a bug, but still one line rather than a traceback
        return fail(describe(e), 1)


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def fail(message, code: int) -> int:
    """Prints `message` as one line on stderr (the first line of a longer one) and returns `code`."""
    lines = str(message).strip().splitlines()
    print(f"error: {lines[0] if lines else message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
