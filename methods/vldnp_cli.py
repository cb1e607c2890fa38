"""VL-DNP's command line (methods/vldnp.py): its options, their checks, the options it reads, the
methods they ask for and the proposer they name (vlm/proposers.py). Only a command line needs this file."""
from pathlib import Path

from leaves import Leaves
from methods.options import UsageError, comma_list, finite
from vlm.proposers import LEAVES, PROPOSERS, ProposerSource, check_preview_decoder

# --negative-schedule: "constant" is the paper's fixed w_neg and needs nothing more
SCHEDULES: Leaves = Leaves("negative schedule", {"dng": "methods.dng:Strength"})


def add_options(p, many: bool):
    """VL-DNP's options. `many`: evaluate.py's, where --proposer names vldnp's proposer alone."""
    v = p.add_argument_group("vldnp: VL-DNP, dynamic negative prompts from what a model sees (arXiv 2510.26052)")
    v.add_argument("--proposer", choices=["auto", *PROPOSERS] + ([] if many else ["static", "none"]),
                   help="who looks at the predicted image: a VLM server, CLIP, or a latent proposer distilled from "
                   "one (auto: latent with --latent-proposer, vlm with --vlm-url, else clip)"
                   + ("" if many else "; without --method, static and none name those methods"))
    v.add_argument("--vlm-url", metavar="URL", help="an OpenAI-compatible server, e.g. http://localhost:8000/v1; "
                   "VLM_API_KEY (OPENAI_API_KEY for api.openai.com) goes to that host alone")
    v.add_argument("--vlm-model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="(default: %(default)s)")
    v.add_argument("--vlm-steps", metavar="LIST", help="0-based steps to query, or none (default: the paper's "
                   "5,6,7,9,12,16,21,27,34,42 of 50, rescaled)")
    v.add_argument("--vlm-async", action="store_true", help="query in the background; answers apply on arrival")
    v.add_argument("--vlm-timeout", type=finite, default=30.0, metavar="S", help="seconds per request (default: 30)")
    v.add_argument("--vlm-retries", type=int, default=3, metavar="N", help="retries after a transient fault "
                   "(default: %(default)s)")
    v.add_argument("--vlm-max-in-flight", type=int, default=4, metavar="N", help="requests at once (default: 4)")
    v.add_argument("--allow-vlm-failures", action="store_true", help="run even if the VLM does not answer up front")
    v.add_argument("--clip-model", default="openai/clip-vit-large-patch14", metavar="MODEL",
                   help="CLIP's repo id or folder (default: %(default)s)")
    v.add_argument("--clip-threshold", type=finite, default=0.5, metavar="P", help="how sure CLIP must be that a "
                   "concept beats a neutral caption (default: 0.5)")
    v.add_argument("--latent-proposer", metavar="FILE", help="a latent proposer (distill.py train): it scores the "
                   "x0 latents, with no decode and no server")
    v.add_argument("--full-decode", action="store_true", help="decode all of x0, not just what the proposer sees")
    v.add_argument("--preview-decoder", default="vae", metavar="{vae,taesd,taesdxl,PATH}", help="what decodes the "
                   "x0 previews: the model's vae, as in the paper, or TAESD, cheaper and softer (default: vae)")
    v.add_argument("--negative-schedule", type=comma_list(), default=["constant"], metavar="LIST", help="the "
                   "strength: constant (--negative-scale), or dng, DNG's for the negative it sees (--dng-*)"
                   + ("; a list runs each" if many else "") + " (default: constant)")


def rules(args) -> list[tuple[str, bool, str]]:
    return [("vlm_timeout", 0 < args.vlm_timeout <= 86400, "more than 0 and at most 86400 (a day)"),
            ("vlm_retries", 0 <= args.vlm_retries <= 100, "between 0 and 100"),
            ("vlm_max_in_flight", 1 <= args.vlm_max_in_flight <= 1024, "between 1 and 1024"),
            ("clip_threshold", 0 <= args.clip_threshold <= 1, "between 0 and 1")]


def reads(cls, args) -> set[str]:
    """The options VL-DNP reads with these arguments: w_neg only with the constant schedule, the
    preview decoder's only when something is decoded, and the chosen proposer's and schedule's."""
    schedules = set(args.negative_schedule)
    read = set(cls.flags) - ({"negative_scales"} if "constant" not in schedules else set())
    if args.proposer in PROPOSERS and not PROPOSERS[args.proposer].previews:  # nothing is decoded
        read -= {"preview_decoder", "full_decode"}
    if "dng" in schedules:
        read |= set(SCHEDULES["dng"].flags)
    return read | set(PROPOSERS[args.proposer].flags if args.proposer in PROPOSERS else ())


def from_args(cls, args, paper_steps) -> list:
    """One VLDNP per --negative-scale value (constant schedule) and per --dng-lambda value (dng),
    sharing one ProposerSource; `paper_steps(num_steps)` gives the paper's query steps. Raises ValueError, one line."""
    resolve(args)
    unknown = [s for s in args.negative_schedule if s not in ("constant", *SCHEDULES)]
    if unknown or not args.negative_schedule:
        raise ValueError(f"--negative-schedule: {'unknown schedule ' + repr(unknown[0]) if unknown else 'empty'}; "
                         f"use constant or {', '.join(SCHEDULES)}")
    try:
        steps = paper_steps(args.steps) if args.vlm_steps is None else parse_steps(args.vlm_steps, args.steps)
    except ValueError as e:
        raise ValueError(f"--vlm-steps: {e}") from None
    source = ProposerSource(args, args.task)

    def made(w, strength=None):
        return cls(w, args.task, tuple(steps), source, None, args.vlm_async, args.full_decode, None,
                   args.negative_prompt, strength, paper_steps=args.vlm_steps is None)
    methods = [made(w) for w in args.negative_scales] if "constant" in args.negative_schedule else []
    if "dng" in args.negative_schedule:
        methods += [made(s.scale(s.prior), s) for s in SCHEDULES["dng"].from_args(args, "vldnp+dng")]
    return methods


def resolve(args):
    """Resolves --proposer auto, and checks the VLM's URL and the preview decoder: ValueError, one line."""
    if args.proposer in (None, "auto"):
        args.proposer = "latent" if args.latent_proposer else "vlm" if args.vlm_url else "clip"
    if args.proposer not in PROPOSERS:
        raise ValueError(f"--proposer {args.proposer}: vldnp asks {' or '.join(PROPOSERS)}")
    if args.proposer == "latent":
        if not args.latent_proposer:
            raise ValueError("--proposer latent needs --latent-proposer FILE, made by distill.py train")
        if not Path(args.latent_proposer).is_file():
            raise ValueError(f"--latent-proposer {args.latent_proposer}: no such file")
    if args.proposer == "vlm":
        if not args.vlm_url:
            raise ValueError("--proposer vlm needs --vlm-url, e.g. http://localhost:8000/v1")
        LEAVES["vlm"]  # a copy without vlm/client.py says so now, not as a bad --vlm-url
        try:
            LEAVES["vlm client"].chat_url(args.vlm_url)
        except ValueError as e:
            raise ValueError(f"--vlm-url {e}") from None
    check_preview_decoder(args.preview_decoder)


def check_edit_steps(vlm_steps: str | None, taken: int, steps: int):
    """--vlm-steps count the steps an edit takes, `taken` of `steps`: one past them would never run. UsageError."""
    try:
        parse_steps(vlm_steps or "", taken)
    except ValueError as e:
        raise UsageError(f"--vlm-steps count the steps the edit takes, {taken} of {steps}: {e}") from None


def parse_steps(text: str, num_steps: int | None = None) -> list[int]:
    """"5,6,7" -> [5, 6, 7], sorted and deduplicated; "" or "none" -> [] (no queries)."""
    if text.strip().lower() in ("", "none"):
        return []
    steps = set()
    for part in text.split(","):
        try:
            step = int(part.strip())
        except ValueError:
            raise ValueError(f"query steps {text!r}: {part.strip()!r} is not a step index; "
                             "expected comma-separated integers such as 5,6,7") from None
        if step < 0:
            raise ValueError(f"query steps {text!r}: step {step} is negative; steps are 0-based indices")
        if num_steps is not None and step >= num_steps:
            raise ValueError(f"query steps {text!r}: step {step} is out of range for {num_steps} steps "
                             f"(0 to {num_steps - 1})")
        steps.add(step)
    return sorted(steps)
