"""Text to image with Stable Diffusion 1.x, 2.x or SDXL:  python generate.py "a photo of a cat"

parse the arguments -> ask a VLM server, if any -> load the model -> build the VL-DNP hook -> generate
-> save PNGs.

The PNGs' `parameters` text chunk holds the prompt and settings in the layout AUTOMATIC1111 and other
SD tools read. With the same checkpoint, prompt, seed and settings, the image is the one diffusers'
StableDiffusionPipeline with DDIMScheduler gives. Arguments are checked before any model is loaded
(cli/generate_args.py); every expected failure is one line, a bug is Python's traceback.
"""
import os
import re
import secrets
import sys
from pathlib import Path

import torch

import png
import weights
from cli.args import UsageError, fail
from cli.generate_args import OUTPUTS, check, parse_args
from cli.metadata import parameters_text
from cli.proposers import make_preview, make_proposer
from evaluation.methods import Setup, build_methods
from sampler.base import SAMPLERS
from sampler.loop import NonFiniteError, generate
from sampler.memory import TooLargeError, is_out_of_memory
from sampler.schedule import UnsupportedSetting
from vlm.dnp import DynamicNegatives, static_trace, write_trace_json
from vlm.preview import VAE_PREVIEW
from vlm.base import check_proposer
from vlm.tasks import get_task


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        check(args)
    except SystemExit as e:  # --help
        return e.code
    except UsageError as e:
        return fail(e, 2)
    try:
        return run(args)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            return fail(f"out of memory; try a smaller --batch or image size ({type(e).__name__}: {e})", 1)
        raise  # a bug: Python's traceback


def run(args) -> int:
    """The run after the arguments are checked; returns the exit status."""
    # 0. a VLM server that does not answer stops the run before the model loads
    server_error = check_vlm_server(args)
    if server_error:
        return fail(server_error, 2)
    seed = secrets.randbelow(2**32) if args.seed is None else args.seed
    print(f"seed: {seed}", flush=True)
    try:
        # 1. load the x0 preview decoder, if not the model's VAE (TAESD is small: a missing one fails in
        # seconds), then the model, and check what only it can tell: the steps its schedule can take
        preview = make_preview(args.preview_decoder if makes_previews(args) else "vae", args.device, args.torch_dtype)
        pipe = weights.load_pipeline(args.model, args.device, args.torch_dtype, args.tokenizer, args.prediction_type)
        try:
            first_timestep = int(SAMPLERS[args.sampler](pipe.scheduler, args.steps).timesteps[0])
        except UnsupportedSetting as e:
            raise UsageError(f"--sampler {args.sampler}: {e}") from None
        except ValueError as e:
            raise UsageError(f"--steps {args.steps}: {e}") from None
        check_size_conditioning(args, pipe)
        if preview.mismatch(pipe.family):
            raise UsageError(preview.mismatch(pipe.family))
        # 2. the VL-DNP hook, or the fixed negative of --proposer static
        hook, static_negative = vl_dnp(args, pipe, preview)
        static = None if static_negative is None else static_trace(
            get_task(args.vlm_task), static_negative, [args.prompt] * args.batch, first_timestep, args.negative_scale)
        # 2b. what --method sets instead of the flags: the prompt's conditioning and the branches
        setup = method_setup(args, pipe)
    except (UsageError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        return fail(e, 2)
    height, width = args.height or pipe.default_size, args.width or pipe.default_size
    sizes = dict(original_size=args.original_size, crop_top_left=args.crop_top_left, target_size=args.target_size)
    saved = False
    try:
        # 3. sample
        branches = {"negative_prompt": args.negative_prompt, "negative": static_negative,
                    "negative_scale": args.negative_scale, **setup.kwargs}
        images = generate(pipe, setup.prompt, steps=args.steps, guidance_scale=args.guidance, height=height,
                          width=width, batch=args.batch, seed=seed, eta=args.eta, sampler=args.sampler,
                          hooks=[hook] if hook else [], progress=not args.quiet, **sizes, **branches)
        if hook is not None:
            hook.close()  # collects the answers still outstanding
        # 4. save
        texts = [parameters_text(args.prompt, branches["negative_prompt"], steps=args.steps, sampler=args.sampler,
                                 guidance_scale=args.guidance, seed=seed, width=width, height=height, model=pipe.name,
                                 extra={**size_settings(sizes, height, width), **setup.parameters,
                                        **settings(args, hook, static_negative, i)})
                 for i in range(args.batch)]
        for path in save(images, args.out, texts, seed):
            print(path)
        saved = True
    except NonFiniteError as e:
        return fail(f"{e}. Nothing was saved.", 1)
    except TooLargeError as e:  # found before sampling
        return fail(f"{e}. Nothing was made.", 2)
    except OSError as e:
        return fail(f"cannot write the image: {e}", 1)
    finally:  # after the images, and for a failed run too
        trace_written = finish_trace(args, hook, static, saved)
    if report_failed_queries(hook, args.batch):  # an image without the guard asked for outranks a lost trace
        return 3
    return 0 if trace_written else 1


def check_vlm_server(args) -> str | None:
    """Asks the --vlm-url server about a grey image before the model loads: a server that is down
    then costs seconds, not a model load and images made without the guard asked for. Returns the
    error line, or None to go on (--allow-vlm-failures: a warning, and the run goes on)."""
    if args.proposer != "vlm" or not args.query_steps:
        return None
    problem = check_proposer(make_proposer(args, get_task(args.vlm_task)))
    if problem is None:
        return None
    if not args.allow_vlm_failures:
        return (f"the VLM does not answer: {problem}. Start it or fix --vlm-url; --allow-vlm-failures runs anyway, "
                "recording each failed query")
    print(f"warning: the VLM does not answer ({problem}); running anyway, recording each failed query",
          file=sys.stderr, flush=True)
    return None


def report_failed_queries(hook, batch: int) -> bool:
    """Says in a closing line on stderr how many VL-DNP queries failed, and which images no answer
    reached, if any. True when an image had queries but no answer took effect: it was made without
    the dynamic negative."""
    if hook is None:
        return False
    counts = [hook.failed_queries(b) for b in range(batch)]
    failed, asked = sum(f for f, _ in counts), sum(a for _, a in counts)
    unanswered = [b for b in range(batch) if hook.unanswered(b)]
    if not failed and not unanswered:
        return False
    parts = [f"{failed} of {asked} VL-DNP queries failed"] if failed else []
    if unanswered:
        images = f"image {unanswered[0]}: it was" if len(unanswered) == 1 else \
            f"images {', '.join(map(str, unanswered))}: they were"
        parts.append(f"no {'' if failed else 'VL-DNP '}answer took effect for {images} made without the dynamic "
                     "negative (exit status 3)")
    else:
        parts.append(f"the negative in force was kept, and the PNG{'s count' if batch > 1 else ' counts'} them")
    print(f"warning: {'; '.join(parts)}", file=sys.stderr, flush=True)
    return bool(unanswered)


def check_size_conditioning(args, pipe):
    """SDXL's micro-conditioning flags need a model that takes it, which is known once it is loaded."""
    given = [flag for flag, value in [("--original-size", args.original_size), ("--crop-top-left", args.crop_top_left),
                                      ("--target-size", args.target_size)] if value is not None]
    if given and pipe.time_ids(pipe.default_size, pipe.default_size) is None:
        raise UsageError(f"{', '.join(given)}: SDXL's size and crop conditioning; the model {pipe.name} "
                         f"({pipe.family}) takes none")


def size_settings(sizes: dict, height: int, width: int) -> dict:
    """The micro-conditioning for the PNG, where it is not the default (the image's size, 0,0)."""
    names = {"original_size": ("Original size", "x", (height, width)),
             "crop_top_left": ("Crop top-left", ",", (0, 0)), "target_size": ("Target size", "x", (height, width))}
    return {name: f"{value[0]}{sep}{value[1]}" for key, (name, sep, default) in names.items()
            if (value := sizes[key]) is not None and tuple(value) != default}


def makes_previews(args) -> bool:
    """Whether VL-DNP will decode x0 previews: a proposer that looks, at one step or more."""
    return args.proposer in ("vlm", "clip") and bool(args.query_steps)


def vl_dnp(args, pipe, preview=VAE_PREVIEW):
    """(the hook or None, the fixed three-branch negative or None) for the chosen proposer; `preview`
    decodes the hook's x0 previews."""
    task = get_task(args.vlm_task)
    if args.proposer == "none":
        return None, None
    if args.proposer == "static":
        return None, task.negative(list(task.concepts), pipe.tokenizer)
    try:
        proposer = make_proposer(args, task, pipe.device, pipe.dtype)
    except weights.CheckpointError as e:  # the CLIP weights
        raise weights.CheckpointError(f"{e} (or run without VL-DNP: --proposer none)") from None
    timeout = args.vlm_timeout + 5 if args.proposer == "vlm" else None  # past the client's own, a backstop
    return DynamicNegatives(proposer, task, args.query_steps, args.negative_scale, args.vlm_async,
                            full_decode=args.full_decode, timeout=timeout, preview=preview), None


def method_setup(args, pipe) -> Setup:
    """What --method NAME sets, as evaluate.py's method NAME (evaluation/methods.py) sets it: the
    prompt's conditioning, generate()'s branch arguments and the PNG's parameters, led by "Method".
    Without --method, the prompt and nothing else; vldnp is the hook of vl_dnp()."""
    if args.method is None:
        return Setup(args.prompt, {}, [])
    if args.method == "vldnp":
        return Setup(args.prompt, {}, [], parameters={"Method": "vldnp"})
    name, _, preset = args.method.partition("-")
    negative = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
    method, = build_methods([name], [args.negative_scale], sld_presets=[preset] if preset else (),
                            safree_concepts=args.safree_concept_set, **negative)
    setup = method.setup(pipe, args.prompt)
    setup.parameters = {"Method": method.label, **setup.parameters}
    return setup


def settings(args, hook, static_negative, index: int) -> dict:
    """The settings of image `index` beyond the common ones, for its parameters text."""
    extra = {"Eta": f"{args.eta:g}"} if args.eta else {}
    if args.batch > 1:
        extra.update({"Batch size": args.batch, "Batch pos": index})
    return {**extra, **vl_dnp_settings(args, hook, static_negative, index)}


def vl_dnp_settings(args, hook, static_negative, index: int) -> dict:
    """What VL-DNP did to image `index`."""
    if args.proposer == "none":
        return {}
    settings = {"VL-DNP": f"{args.proposer} {args.vlm_task}", "Negative scale": f"{args.negative_scale:g}"}
    if hook is None:
        return {**settings, "Dynamic negative": static_negative}
    settings["VL-DNP steps"] = " ".join(map(str, args.query_steps)) or "none"
    return {**settings, **hook.outcome(index)}


def finish_trace(args, hook, static: dict | None, saved: bool) -> bool:
    """Closes the VL-DNP hook and writes its trace, or the `static` run's, if asked for. False, said
    in one line, when the trace cannot be written; the images, if `saved`, are written already."""
    if hook is not None:
        hook.close()
    if not args.trace or (hook is None and static is None):
        return True
    try:
        print(f"trace: {hook.write_trace(args.trace) if hook is not None else write_trace_json(args.trace, static)}")
        return True
    except (OSError, ValueError) as e:
        fail(f"cannot write the trace {args.trace}: {e}" + (" (the images were saved)" if saved else ""), 1)
        return False


# ---------------------------------------------------------------------------------------------
# Where the images go

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


def save(images: torch.Tensor, out: str | None, texts: list[str], seed: int) -> list[Path]:
    """Writes each image atomically to `out` (or new paths in outputs/); an image that cannot be
    written leaves no file behind."""
    if out is None:
        paths, claimed = claim_new_paths(seed, len(images)), True
    else:
        out = Path(out)
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


if __name__ == "__main__":
    sys.exit(main())
