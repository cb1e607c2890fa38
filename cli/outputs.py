"""generate.py's side of the house: its examples, the checks only a loaded model can answer, and where
its images and their text go."""
import os
from pathlib import Path

import torch

import png
from cli.args import UsageError, fail, make_folder
from files import claim_new_paths, numbered
from sampler.schedule import UnsupportedSetting

OUTPUTS = Path("outputs")

EXAMPLES = """\
examples:
  python generate.py "a watercolor of a lighthouse at dawn" --seed 42
  python generate.py "a red fox in the snow" --negative-prompt "blurry" --batch 4 --out fox.png
  python generate.py "a castle on a hill" --model stabilityai/stable-diffusion-xl-base-1.0 --sampler euler
  python generate.py "a castle on a hill" --model stabilityai/sdxl-turbo --sampler euler-a --steps 1 --guidance 0
  python generate.py "a person at the beach" --vlm-url http://localhost:8000/v1 --trace trace.json
  python generate.py "a person at the beach" --method safree --sampler dpm++2m   # as evaluate.py's safree
  python generate.py "a person at the beach" --method dng --sampler euler-a --trace trace.json

Prints the seed, then each image's path. Exit status: 0 done; 1 sampling failed (nothing saved), or
the trace could not be written; 2 bad argument or model, or a VLM that does not answer (see
--allow-vlm-failures); 3 images saved, but for one or more of them no VL-DNP answer took effect: they
were made without the dynamic negative, as their PNGs say; 130 interrupted. A bug is a traceback.
"""


def check_out(out: str | None, option: str):
    """--out or --trace names a file whose folder is made (parents too) if missing, and must be
    writable. Without --out, outputs/ is made."""
    if out is None:
        return make_folder(OUTPUTS, "outputs/") if option == "--out" else None
    if Path(out).is_dir() or out.endswith(("/", os.sep)):
        raise UsageError(f"{option} {out}: names a folder; give a file name, e.g. {Path(out) / 'image.png'}")
    make_folder(Path(out).parent, f"{option} {out}")


def check_sizes(args, pipe, sampler):
    """What only the loaded model can tell: the steps its schedule can take with the sampler, and
    whether it takes SDXL's size and crop conditioning."""
    try:
        sampler(pipe.scheduler, args.steps)
    except UnsupportedSetting as e:
        raise UsageError(f"--sampler {args.sampler}: {e}") from None
    except ValueError as e:
        raise UsageError(f"--steps {args.steps}: {e}") from None
    given = [flag for flag, value in [("--original-size", args.original_size), ("--crop-top-left", args.crop_top_left),
                                      ("--target-size", args.target_size)] if value is not None]
    if given and pipe.time_ids(pipe.default_size, pipe.default_size) is None:
        raise UsageError(f"{', '.join(given)}: SDXL's size and crop conditioning; the model {pipe.name} "
                         f"({pipe.family}) takes none")


def png_text(args, plan, seed: int, height: int, width: int, pipe, sizes: dict, b: int) -> str:
    """Image b's `parameters` text: the common settings, an edit's strength, SDXL's micro-conditioning
    where it is not the default, the method's, the batch's, and the LoRAs merged into `pipe`."""
    defaults = {"original_size": ("Original size", "x", (height, width)),
                "crop_top_left": ("Crop top-left", ",", (0, 0)), "target_size": ("Target size", "x", (height, width))}
    extra = {name: f"{value[0]}{sep}{value[1]}" for key, (name, sep, default) in defaults.items()
             if (value := sizes[key]) is not None and tuple(value) != default}
    extra.update(plan.image_parameters(b))
    if args.eta:
        extra["Eta"] = f"{args.eta:g}"
    if args.batch > 1:
        extra.update({"Batch size": args.batch, "Batch pos": b})
    return png.parameters_text(args.prompt, plan.negative_prompt, steps=args.steps, sampler=args.sampler,
                               guidance_scale=args.guidance_scale, seed=seed, width=width, height=height,
                               model=pipe.name, strength=args.edit.get("strength"), loras=pipe.loras, extra=extra)


def write_trace(plan, path: str, saved: bool) -> int:
    """Writes the method's trace; the exit status: 0, or 1 with one line when it cannot be written."""
    try:
        print(f"trace: {plan.write_trace(path)}")
        return 0
    except (OSError, ValueError) as e:
        return fail(f"cannot write the trace {path}: {e}" + (" (the images were saved)" if saved else ""), 1)


def save(images: torch.Tensor, out: str | None, texts: list[str], seed: int) -> list[Path]:
    """Writes each image atomically to `out` (or new paths in outputs/); an image that cannot be
    written leaves no file behind."""
    if out is None:
        paths, claimed = claim_new_paths(OUTPUTS, str(seed), len(images)), True
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
