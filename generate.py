"""Generate images with Stable Diffusion 1.x, 2.x or SDXL, guided by a method (methods/): plain SD, a
negative prompt, static, VL-DNP (the default: with CLIP, or with a VLM given --vlm-url), SLD, SAFREE
or DNG. A seed gives diffusers' image; each PNG holds the settings in AUTOMATIC1111's `parameters`.

examples:
  python generate.py "a watercolor of a lighthouse at dawn" --seed 42
  python generate.py "a red fox in the snow" --negative-prompt "blurry" --batch 4 --out fox.png
  python generate.py "a castle on a hill" --model stabilityai/stable-diffusion-xl-base-1.0 --sampler euler
  python generate.py "a castle on a hill" --model stabilityai/sdxl-turbo --sampler euler-a --steps 1 --guidance 0
  python generate.py "a person at the beach" --vlm-url http://localhost:8000/v1 --trace trace.json
  python generate.py "a person at the beach" --method safree --sampler dpm++2m   # as evaluate.py's safree
  python generate.py "a person at the beach" --method dng --sampler euler-a --trace trace.json

Prints the seed, then each image's path. Exit status: 0 done; 1 nothing saved, or no trace written;
2 bad argument, model or VLM (see --allow-vlm-failures); 3 saved, but made without the dynamic negative
(no VL-DNP answer took effect, as the PNGs say); 130 interrupted. A bug is a traceback.
"""
import argparse
import secrets
import sys

from cli.args import Parser, add_shared_arguments, check_shared, fail, int_pair, load_model
from cli.outputs import check_out, check_sizes, numbered, png_text, save, write_trace
from files import printable
from leaves import Leaves, MissingLeaf
from methods.options import UsageError, check_rules, finite, given_options, prepare_all, text
from sampler.base import SAMPLERS
from sampler.loop import EDITS, NonFiniteError, generate
from sampler.memory import TooLargeError, is_out_of_memory

DEMO_PROMPT = "a photograph of an astronaut riding a horse"
LEAVES = Leaves("option", {"--init-image": "cli.edit:read_edit"})  # reads the images an edit starts from


def parse_args(argv=None):
    p = Parser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", type=text, default=DEMO_PROMPT, help=f'what to draw (default: "{DEMO_PROMPT}")')
    p.add_argument("--method", metavar="NAME", help="how the image is guided: sd, negative, static, vldnp, sld-weak "
                   "... sld-max, safree, dng, as evaluate.py's method NAME makes it (default: --proposer decides)")
    p.add_argument("--seed", type=int, help="random seed (default: a random one; printed and stored in the PNG)")
    p.add_argument("--eta", type=finite, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM; ddim only")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="images sampled together (default: 1)")
    p.add_argument("--init-image", metavar="PNG", help="edit this image (img2img), at its size, instead of drawing one")
    p.add_argument("--mask", metavar="PNG", help="with --init-image: repaint where the mask is white (inpainting)")
    p.add_argument("--out", metavar="PATH", help="write PATH.png, or PATH-0.png ... with --batch; a missing folder "
                   "is made (default: a new file in outputs/, never overwriting)")
    p.add_argument("--trace", metavar="PATH.json", help="write the method's negatives per step as JSON (VL-DNP: each "
                   "query, and the images the proposer saw as PATH.filmstrip.png; DNG: p_t and w_neg at each step)")
    s = p.add_argument_group("SDXL's micro-conditioning: a training image's size and crop to imitate, and the target")
    s.add_argument("--original-size", type=int_pair("x", 1), metavar="HxW", help="original size (default: the image's)")
    s.add_argument("--crop-top-left", type=int_pair(",", 0), metavar="Y,X", help="crop corner (default: 0,0, centred)")
    s.add_argument("--target-size", type=int_pair("x", 1), metavar="HxW", help="size aimed at (default: the image's)")
    options = add_shared_arguments(p, sampler="ddim", many=False)
    args = p.parse_args(argv)
    given = given_options(p, argv)
    if args.method is None:  # --proposer names the method
        given.discard("proposer")
    elif args.method == "vldnp" and args.proposer in ("static", "none"):
        raise UsageError(f"--proposer {args.proposer} conflicts with --method vldnp, which asks vlm or clip")
    spec = args.method or {"static": "static", "none": "sd"}.get(args.proposer, "vldnp")
    check_shared(args, [spec], options + ["trace"], given)
    if len(keys := [m.key for m in args.chosen_methods]) != 1:
        raise UsageError(f"--method {spec} makes {len(keys)} images ({', '.join(keys)}); generate.py makes one: "
                         "name one preset, e.g. sld-medium, or give one --negative-scale")
    check_rules([("eta", args.eta >= 0, "0 or more"), ("batch", 1 <= args.batch <= 10**6, "between 1 and 1000000"),
                 ("eta", not args.eta or args.sampler == "ddim", f"0 with {args.sampler}; only ddim takes eta"),
                 ("seed", args.seed is None or 0 <= args.seed < 2**64, "between 0 and 2^64 - 1")], args)
    args.edit = LEAVES["--init-image"](args) if args.init_image or args.mask or args.strength is not None else {}
    check_out(args.out, "--out")
    if args.trace:
        check_out(args.trace, "--trace", [args.init_image, args.mask,  # the trace is written last: it replaces none
                                          *(numbered(args.out, args.batch) if args.out else ())])
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        return run(args, args.chosen_methods[0])
    except SystemExit as e:  # --help
        return e.code
    except (UsageError, MissingLeaf) as e:  # MissingLeaf: an option whose file this copy lacks
        return fail(e, 2)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            return fail(f"out of memory; try a smaller --batch or image size ({type(e).__name__}: {e})", 1)
        raise  # a bug: Python's traceback


def run(args, method) -> int:
    """The run after the arguments are checked; returns the exit status."""
    seed = secrets.randbelow(2**32) if args.seed is None else args.seed
    try:
        # 1. what the method needs besides the model (a VLM that answers, CLIP, TAESD), then the model
        if warning := prepare_all([method], args.device, args.torch_dtype, args.allow_vlm_failures):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        print(f"seed: {seed}", flush=True)
        pipe = load_model(args)
        check_sizes(args, pipe, SAMPLERS[args.sampler])
        if args.edit or pipe.inpainting:  # an inpainting model needs an image and a mask
            EDITS["img2img"].check_edit(pipe, args.edit.get("init_image"), args.edit.get("mask"), args.strength,
                                        args.height, args.width)
        if method.check(pipe):
            raise UsageError(method.check(pipe))
        # 2. the method's plan: the prompt's conditioning, the branches, hooks
        plan = method.plan(pipe, args.prompt, args.batch)
    except (UsageError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        return fail(e, 2)
    saved = False
    try:  # 3. generate, 4. save
        try:
            images = generate(pipe, plan.prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                              height=args.height, width=args.width, batch=args.batch, seed=seed, eta=args.eta,
                              sampler=args.sampler, original_size=args.original_size, crop_top_left=args.crop_top_left,
                              target_size=args.target_size, progress=not args.quiet, **args.edit, **plan.arguments)
        finally:
            plan.finish()  # collects the answers still outstanding
        for path in save(images, args.out, [png_text(args, plan, seed, *images.shape[1:3], pipe, b)
                                            for b in range(args.batch)], seed):
            print(printable(str(path)))
        saved = True
    except NonFiniteError as e:
        return fail(f"{e}. Nothing was saved.", 1)
    except TooLargeError as e:  # found before sampling
        return fail(f"{e}. Nothing was made.", 2)
    except OSError as e:
        return fail(f"cannot write the image: {e}", 1)
    finally:  # after the images, and for a failed run too
        status = 0 if not args.trace else write_trace(plan, args.trace, saved)
    if plan.summary():  # an image made without the guard asked for outranks a lost trace
        print(f"warning: {plan.summary()}", file=sys.stderr, flush=True)
    return 3 if any(plan.unguarded(b) for b in range(args.batch)) else status


if __name__ == "__main__":
    sys.exit(main())
