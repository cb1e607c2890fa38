"""generate.py's side: the checks only a loaded model can answer, and where its images and their text go:
numbered names, new ones claimed without ever taking one that exists."""
import os
import re
import tempfile
from pathlib import Path

import png
from cli.args import fail
from files import printable
from methods.options import UsageError
from sampler.schedule import UnsupportedSetting

OUTPUTS = Path("outputs")


def check_out(out: str | None, option: str, images=()):
    """--out or --trace names a file whose folder is made (parents too) if missing, and must take it, numbered or with
    its .filmstrip, and write_atomic's temporary file beside it (None: outputs/), and replace none of the `images`."""
    folder, name = (OUTPUTS, "outputs/") if out is None else (Path(out).parent, f"{option} {out}")
    written = {os.path.abspath(p) for p in (out, os.path.splitext(out)[0] + ".filmstrip.png")} if images else set()
    if written & {os.path.abspath(p) for p in images if p}:
        raise UsageError(f"{name}: it or its filmstrip would replace --init-image, --mask or an --out image; rename it")
    if out is not None and (os.path.isdir(out) or out.endswith(("/", os.sep))):  # os.path's: no OSError
        raise UsageError(f"{name}: names a folder; give a file name, e.g. {Path(out) / 'image.png'}")
    if out is not None and not re.fullmatch(r"[^\s.]|\S.*[^\s.]", Path(out).name, re.S):  # "x.png ", "x.", "", "a/.."
        raise UsageError(f"{option} {out!r}: a file name may not be empty, begin or end in a space, or end in '.'")
    existing = next(p for p in [folder, *folder.parents] if os.path.lexists(p))
    if not existing.is_dir():
        raise UsageError(f"{name}: {existing} is a file, not a folder")
    longest = f".{Path(out or 'x').name}.filmstrip-9999."  # the longest temporary file name a write here takes
    try:  # the sure test: os.access misjudges root and read-only mounts
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=longest, suffix=".tmp"):
            pass
    except OSError as e:
        what = f"write in {folder}" if folder.is_dir() else f"create the folder {folder}"
        raise UsageError(f"{name}: cannot {what} ({e.strerror})") from None


def check_sizes(args, pipe, sampler):
    """What only the loaded model can tell: the steps its schedule can take, and whether it takes SDXL's sizes."""
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


def png_text(args, plan, seed: int, height: int, width: int, pipe, b: int) -> str:
    """Image b's `parameters` text: the common settings, an edit's strength, SDXL's micro-conditioning
    where it is not the default, the method's, the batch's, and the LoRAs merged into `pipe`."""
    sizes = [("Original size", "x", args.original_size, (height, width)),
             ("Crop top-left", ",", args.crop_top_left, (0, 0)),
             ("Target size", "x", args.target_size, (height, width))]
    extra = {name: f"{v[0]}{sep}{v[1]}" for name, sep, v, default in sizes if v is not None and v != default}
    extra |= plan.image_parameters(b) | ({"Eta": f"{args.eta:g}"} if args.eta else {})
    extra |= {"Batch size": args.batch, "Batch pos": b} if args.batch > 1 else {}
    return png.parameters_text(args.prompt, plan.negative_prompt, steps=args.steps, sampler=args.sampler,
                               guidance_scale=args.guidance_scale, seed=seed, width=width, height=height,
                               model=pipe.name, strength=args.edit.get("strength"), loras=pipe.loras, extra=extra)


def write_trace(plan, path: str, saved: bool) -> int:
    """Writes the method's trace; the exit status: 0, or 1 with one line when it cannot be written."""
    try:
        print(printable(f"trace: {plan.write_trace(path)}"))
        return 0
    except (OSError, ValueError) as e:
        return fail(f"cannot write the trace {path}: {e}" + (" (the images were saved)" if saved else ""), 1)


def save(images, out: str | None, texts: list[str], seed: int) -> list[Path]:
    """Writes each image (uint8 [H, W, 3]) atomically to `out` (or new paths in outputs/, claimed: made empty,
    so that no other run takes the names); an image that cannot be written leaves no file behind."""
    paths = claim_new_paths(OUTPUTS, str(seed), len(images)) if out is None else numbered(Path(out), len(images))
    written = 0
    try:
        for path, image, text in zip(paths, images, texts):
            png.write_png(path, image, {"parameters": text})
            written += 1
    finally:
        if out is None and not written:  # the first, claimed, never written
            paths[0].unlink(missing_ok=True)
    return paths


def numbered(base: Path | str, batch: int) -> list[Path]:
    """base.png, or base-0.png ... base-{batch-1}.png, base's .png not doubled (generate.py's --out, outputs/)."""
    base = Path(base).with_suffix("") if Path(base).suffix.lower() == ".png" else Path(base)
    return [base.with_name(base.name + (f"-{i}" if batch > 1 else "") + ".png") for i in range(batch)]


def claim_new_paths(folder: Path, tag: str, batch: int) -> list[Path]:
    """The next folder/NNNNN-TAG paths, the first created empty with O_EXCL: a name that exists already,
    written by an earlier run (numbered below N) or a concurrent one (which claimed the same first), is never taken."""
    n = max((int(m[1]) for f in folder.iterdir() if (m := re.match(r"(\d{5,})-", f.name))), default=-1) + 1
    while True:
        paths = numbered(folder / f"{n:05d}-{tag}", batch)
        try:
            os.close(os.open(paths[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            return paths
        except FileExistsError:
            n += 1
