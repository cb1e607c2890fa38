"""generate.py's command line: its options, and the checks that run before any model is loaded."""
import argparse
import os
from pathlib import Path

from cli.args import (PREVIEW_HELP, Parser, UsageError, check_model, check_preview_decoder, check_rules,
                      check_writable, finite, int_pair, pick_device, pick_dtype)
from sampler.base import SAMPLERS
from sampler.safree import CONCEPT_SETS, concept_set
from sampler.sld import PRESETS as SLD_PRESETS
from vlm.client import chat_url
from vlm.dnp import PAPER_STEPS, default_query_steps, parse_steps
from vlm.tasks import TASKS

DEMO_PROMPT = "a photograph of an astronaut riding a horse"
METHODS = ("sd", "negative", "static", "vldnp", *(f"sld-{p}" for p in SLD_PRESETS), "safree")  # evaluate.py's
OUTPUTS = Path("outputs")

EXAMPLES = """\
examples:
  python generate.py "a watercolor of a lighthouse at dawn" --seed 42
  python generate.py "a red fox in the snow" --negative-prompt "blurry" --batch 4 --out fox.png
  python generate.py "a castle on a hill" --model stabilityai/stable-diffusion-2-1-base
  python generate.py "a castle on a hill" --model v2-1_768-ema-pruned.safetensors --prediction-type v
  python generate.py "a castle on a hill" --model stabilityai/stable-diffusion-xl-base-1.0 --sampler euler
  python generate.py "a castle on a hill" --model stabilityai/sdxl-turbo --sampler euler-a --steps 1 --guidance 0
  python generate.py "a person at the beach" --proposer none          # plain Stable Diffusion
  python generate.py "a person at the beach" --method safree --sampler dpm++2m   # as evaluate.py's safree
  python generate.py "a person at the beach" --vlm-url http://localhost:8000/v1 --trace trace.json

Prints the seed, then the path of each image written.
Exit status:
  0    done
  1    sampling failed (nothing saved), or the --trace could not be written (the images were)
  2    bad argument or model, or a --vlm-url server that does not answer (see --allow-vlm-failures)
  3    images saved, but for one or more of them no VL-DNP answer took effect (every query failed,
       or with --vlm-async came after the last step): they were made without the dynamic
       negative, and their PNGs say so
  130  interrupted
A bug ends with Python's traceback (status 1).
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="generate.py", description="Generate images with Stable Diffusion 1.x, 2.x or SDXL (DDIM, "
               "DPM-Solver++ 2M, Euler or Euler ancestral), optionally with VL-DNP.",
               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default=DEMO_PROMPT, help=f'what to draw (default: "{DEMO_PROMPT}")')
    p.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from")
    p.add_argument("--method", choices=METHODS, help="make the image as evaluate.py's method NAME makes it (with "
                   "the same --sampler, --steps, --guidance and --seed, the same image): sd plain; negative the "
                   "classic --negative-prompt, by default SAFREE's 17 nudity concepts; static those as a three-branch "
                   "negative at --negative-scale; vldnp VL-DNP (--proposer vlm or clip); sld-* Safe Latent Diffusion; "
                   "safree SAFREE. Without it, --proposer decides (default: VL-DNP)")
    p.add_argument("--safree-concepts", metavar="LIST", help="the concepts of --method safree: comma-separated, "
                   f"or one of {', '.join(CONCEPT_SETS)} (default: nudity)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                   help="Hugging Face repo id, diffusers folder or .safetensors file (default: %(default)s)")
    m.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer folder for single files: tokenizer.json, or vocab.json and merges.txt; for "
                        "SDXL a diffusers SDXL folder, whose tokenizer/ and tokenizer_2/ are used "
                        "(default: downloaded)")
    m.add_argument("--prediction-type", choices=["epsilon", "v"],
                   help="what the UNet predicts, overriding the model's scheduler config or what a single "
                        "file says (ModelSpec metadata, a v_pred tensor); an SD2 file that says nothing is "
                        "taken as epsilon, with a warning (SD 2.x 768 models: v)")

    s = p.add_argument_group("sampling")
    s.add_argument("--seed", type=int, help="random seed (default: a random one; printed and stored in the PNG)")
    s.add_argument("--sampler", choices=list(SAMPLERS), default="ddim",
                   help="ddim; dpm++2m: DPM-Solver++ 2M, the paper's evaluation sampler; euler; or euler-a: "
                        "Euler ancestral, SDXL-Turbo's (default: ddim)")
    s.add_argument("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
    s.add_argument("--guidance", type=finite, default=7.5, metavar="SCALE",
                   help="classifier-free guidance scale; 1 or less skips the unconditional pass (default: %(default)s)")
    s.add_argument("--height", type=int, metavar="PX", help="image height, a multiple of 8 (default: the model's)")
    s.add_argument("--width", type=int, metavar="PX", help="image width, a multiple of 8 (default: the model's)")
    s.add_argument("--eta", type=finite, default=0.0,
                   help="DDIM noise: 0 deterministic, 1 like DDPM; ddim only (default: 0)")
    s.add_argument("--batch", type=int, default=1, metavar="N", help="images sampled together (default: 1)")
    s.add_argument("--original-size", type=int_pair("x", 1), metavar="HxW", help="SDXL's micro-conditioning: the "
                   "size of the training image the model should imitate; small sizes look upscaled (default: the "
                   "image's size)")
    s.add_argument("--crop-top-left", type=int_pair(",", 0), metavar="Y,X", help="SDXL's micro-conditioning: the "
                   "top-left corner of the crop the model should imitate; 0,0 is centred (default: 0,0)")
    s.add_argument("--target-size", type=int_pair("x", 1), metavar="HxW",
                   help="SDXL's micro-conditioning: the size aimed at (default: the image's size)")

    o = p.add_argument_group("output and hardware")
    o.add_argument("--out", metavar="PATH", help="write PATH.png, or PATH-0.png ... PATH-{N-1}.png with --batch N, "
                                                  "overwriting; a missing folder is made (default: a new file in "
                                                  "outputs/, never overwriting)")
    o.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    o.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on cuda, fp32 elsewhere")
    o.add_argument("--quiet", action="store_true", help="no progress bar (the seed and paths are still printed)")

    add_vl_dnp_arguments(p)
    return p.parse_args(argv)


def add_vl_dnp_arguments(parser: argparse.ArgumentParser):
    v = parser.add_argument_group("VL-DNP: dynamic negative prompts from what a model sees (arXiv 2510.26052)")
    v.add_argument("--proposer", choices=["auto", "vlm", "clip", "static", "none"],
                   help="who looks at the predicted image: a VLM server (vlm), the built-in CLIP ViT-L/14 (clip), "
                        "nobody but with the task's fixed negative from the start (static, the paper's baseline), "
                        "or nobody: plain Stable Diffusion (none). auto (the default without --method): vlm with "
                        "--vlm-url, else clip")
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
    v.add_argument("--allow-vlm-failures", action="store_true",
                   help="run even if the VLM server does not answer a test query before the model loads "
                        "(default: exit 2); failed queries are still counted in the PNG and on stderr")
    v.add_argument("--clip-model", default="openai/clip-vit-large-patch14", metavar="MODEL",
                   help="CLIP for --proposer clip: repo id or folder (default: %(default)s)")
    v.add_argument("--clip-threshold", type=finite, default=0.5, metavar="P",
                   help="how sure CLIP must be that a concept beats a neutral caption (default: 0.5)")
    v.add_argument("--full-decode", action="store_true",
                   help="decode the whole x0 image at each query; by default it is decoded only as large as the "
                        "proposer looks at it (CLIP: 224 px, so 256 px for a 512 px image)")
    v.add_argument("--preview-decoder", default="vae", metavar="{vae,taesd,taesdxl,PATH}", help=PREVIEW_HELP)
    v.add_argument("--negative-scale", type=finite, default=7.5, metavar="W",
                   help="w_neg in eps = eps_u + g(eps_c - eps_u) - w_neg(eps_neg - eps_u), g being --guidance (default: 7.5)")
    v.add_argument("--trace", metavar="PATH.json", help="write each query (step, reply, negative, error, latency) "
                   "as JSON, and the images the proposer saw beside it as PATH.filmstrip.png; with --proposer "
                   "static, the fixed negative from step 0")


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
    check_rules([("negative_scale", args.negative_scale >= 0, "0 or more"),
                 ("vlm_timeout", 0 < args.vlm_timeout <= 86400, "more than 0 and at most 86400 (a day)"),
                 ("clip_threshold", 0 <= args.clip_threshold <= 1, "between 0 and 1")], args)
    try:
        args.query_steps = default_query_steps(args.steps) if args.vlm_steps is None else \
            parse_steps(args.vlm_steps, args.steps)
    except ValueError as e:
        raise UsageError(f"--vlm-steps: {e}") from None
    check_preview_decoder(args.preview_decoder)
    if args.trace is not None:
        if args.proposer == "none":
            raise UsageError("--trace: --proposer none has no negative to trace")
        check_out(args.trace, "--trace")


def check(args):
    """Rejects bad arguments, before any heavy work; sets args.device, args.torch_dtype and
    args.query_steps, and resolves --proposer auto."""
    check_method(args)
    check_rules([("steps", 1 <= args.steps <= 1000, "between 1 and 1000"), ("guidance", args.guidance >= 0, "0 or more"),
                 ("eta", args.eta >= 0, "0 or more"), ("batch", args.batch >= 1, "at least 1"),
                 ("seed", args.seed is None or 0 <= args.seed < 2**64, "between 0 and 2^64 - 1")]
                + [(side, size is None or (size > 0 and size % 8 == 0), "a positive multiple of 8")
                   for side, size in [("height", args.height), ("width", args.width)]], args)
    if args.eta and args.sampler != "ddim":
        kind = "has fixed noise" if args.sampler == "euler-a" else "is deterministic"
        raise UsageError(f"--eta {args.eta}: only --sampler ddim takes eta; {args.sampler} {kind}")
    check_model(args.model)
    check_out(args.out)
    check_vl_dnp(args)
    args.device = pick_device(args.device)
    args.torch_dtype = pick_dtype(args.dtype, args.device)


def check_out(out: str | None, option: str = "--out"):
    """--out names a file; its folder is made (parents too) if missing, and must be writable.
    Without --out, outputs/ is made."""
    if out is None:
        return make_folder(OUTPUTS, "outputs/")
    if Path(out).is_dir() or out.endswith(("/", os.sep)):
        raise UsageError(f"{option} {out}: names a folder; give a file name, e.g. {Path(out) / 'image.png'}")
    make_folder(Path(out).parent, f"{option} {out}")


def make_folder(folder: Path, flag: str):
    """Makes `folder` and its missing parents, and checks that a file can be written in it."""
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise UsageError(f"{flag}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag}: cannot create the folder {folder} ({e.strerror})") from None
    check_writable(folder, flag)


def check_method(args):
    """--method against the flags it stands in for: without it, --proposer decides as before (auto
    when not given). With it, --proposer is only vldnp's (vlm or clip), --negative-prompt only
    negative's text, --safree-concepts only safree's, and --trace only vldnp's. Sets
    args.proposer ("none" for every method but vldnp) and args.safree_concept_set."""
    method = args.method
    conflicts = [
        (args.proposer is not None and method not in (None, "vldnp"),
         f"--proposer {args.proposer} conflicts with --method {method}, which names the whole method"),
        (method == "vldnp" and args.proposer in ("static", "none"),
         f"--proposer {args.proposer} conflicts with --method vldnp, which takes --proposer vlm or clip"),
        (method not in (None, "negative") and args.negative_prompt is not None,
         f"--negative-prompt conflicts with --method {method}: it is the text of --method negative"),
        (method != "safree" and args.safree_concepts is not None, "--safree-concepts needs --method safree"),
        (method not in (None, "vldnp") and args.trace is not None,
         f"--trace records VL-DNP's queries; --method {method} makes none"),
    ]
    for conflict, message in conflicts:
        if conflict:
            raise UsageError(message)
    if method not in (None, "vldnp"):
        args.proposer = "none"
    elif args.proposer is None:
        args.proposer = "auto"
    try:
        args.safree_concept_set = concept_set(args.safree_concepts or "nudity")
    except ValueError as e:
        raise UsageError(f"--safree-concepts: {e}") from None
