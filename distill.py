"""Distil VL-DNP's proposer into a latent proposer, which needs no decode and no server:

    python distill.py collect PROMPTS.csv --out DATA_DIR --vlm-url URL    # the teacher's verdicts, with x0
    python distill.py train DATA_DIR --out proposer.safetensors           # the student, and its card
    python generate.py "a person on a beach" --latent-proposer proposer.safetensors

Parse the arguments, then hand over to distillation/ (collect.py, train.py). Every expected failure is
one line and a non-zero exit status; a bug is Python's traceback.
"""
import argparse
import shlex
import sys
from pathlib import Path

import weights
from cli.args import Parser, add_shared_arguments, check_shared, fail, load_model, pick_device
from cli.outputs import check_out, check_sizes
from distillation.collect import Collection, collect
from distillation.data import DataError
from distillation.train import Training, train
from evaluation.prompts import PromptFileError, read_prompts
from evaluation.run import Sampling
from evaluation.run_folder import model_settings
from files import printable
from leaves import MissingLeaf
from methods.options import UsageError, check_rules, finite, given_options
from sampler.base import SAMPLERS
from sampler.memory import TooLargeError, is_out_of_memory

EXAMPLES = """\
examples:
  python distill.py collect nudity.csv --out data/nudity --vlm-url http://localhost:8000/v1 --limit 500
  python distill.py train data/nudity --out nudity-sd14.safetensors
  python evaluate.py nudity.csv --out runs/latent --methods sd,vldnp --latent-proposer nudity-sd14.safetensors

collect: re-run the same command to resume. Exit status: 0 done; 1 some prompts failed (a re-run
retries those whose VLM queries failed; NaN latents fail again); 2 bad argument, prompt file, model,
data folder or VLM; 130 interrupted.
"""


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = Parser(prog="distill.py", description="Distil VL-DNP's proposer (a VLM, or CLIP) into a latent proposer "
               "that scores the sampler's x0 latents.", epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="{collect,train}")

    c = commands.add_parser("collect", help="sample the prompts with VL-DNP and the teacher as its proposer, "
                            "keeping x0, x_t and t at each query and the teacher's verdict")
    c.add_argument("prompts", metavar="PROMPTS.csv", help="a prompt CSV, read as evaluate.py reads it")
    c.add_argument("--out", required=True, metavar="DATA_DIR", help="the data folder: new, empty, or one to resume")
    c.add_argument("--prompt-column", metavar="NAME", help="the prompt column, when not one of the usual names")
    c.add_argument("--limit", type=int, metavar="N", help="only the first N prompts")
    c.add_argument("--seeds-per-prompt", type=int, default=4, metavar="N", help="images per prompt, sampled "
                   "together from the row's seed (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, metavar="BASE",
                   help="prompts without evaluation_seed use seed BASE + case number (default: %(default)s)")
    options = add_shared_arguments(c, sampler="dpm++2m", many=True)
    # check_sizes reads generate.py's SDXL size options, which collect has not
    c.set_defaults(run=run_collect, original_size=None, crop_top_left=None, target_size=None)

    t = commands.add_parser("train", help="fit a latent proposer to a data folder, held out by prompt")
    t.add_argument("data", metavar="DATA_DIR", help="a folder distill.py collect wrote")
    t.add_argument("--out", required=True, metavar="FILE", help="the latent proposer to write (.safetensors)")
    t.add_argument("--epochs", type=int, default=Training.epochs, help="passes over the data (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=Training.batch_size, help="(default: %(default)s)")
    t.add_argument("--learning-rate", type=finite, default=Training.learning_rate, help="AdamW's (default: %(default)s)")
    t.add_argument("--width", type=int, default=Training.width, help="the network's first convolution's channels "
                   "(default: %(default)s)")
    t.add_argument("--held-out", type=finite, default=Training.held_out, metavar="FRACTION", help="the prompts held "
                   "out for the card's numbers (default: %(default)s)")
    t.add_argument("--seed", type=int, default=Training.seed, help="for the split and the fit (default: %(default)s)")
    t.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    t.set_defaults(run=run_train)

    args = p.parse_args(argv)
    if args.command == "collect":
        check_collect(args, options, given_options(c, argv[1:]))
    else:
        check_rules([("epochs", 1 <= args.epochs <= 100000, "between 1 and 100000"),
                     ("batch_size", 1 <= args.batch_size <= 65536, "between 1 and 65536"),
                     ("learning_rate", 0 < args.learning_rate <= 1, "more than 0 and at most 1"),
                     ("width", 1 <= args.width <= 1024, "between 1 and 1024"),
                     ("held_out", 0 < args.held_out < 1, "more than 0 and less than 1"),
                     ("seed", 0 <= args.seed < 2**64, "between 0 and 2^64 - 1")], args)
        args.device = pick_device(args.device)
        check_out(args.out, "--out")
    args.argv = argv
    return args


def check_collect(args, options: list[str], given: set[str]):
    check_rules([("seed", 0 <= args.seed < 2**64, "between 0 and 2^64 - 1"),
                 ("limit", args.limit is None or args.limit >= 1, "at least 1"),
                 ("seeds_per_prompt", 1 <= args.seeds_per_prompt <= 64, "between 1 and 64"),
                 ("strength", args.strength is None, "left out: collect draws images from text and edits none")], args)
    check_shared(args, ["vldnp"], options, given)
    if len(args.chosen_methods) != 1:
        raise UsageError(f"collect runs one VL-DNP, and these settings make {len(args.chosen_methods)} "
                         f"({', '.join(m.key for m in args.chosen_methods)}); give one --negative-scale and one "
                         "--negative-schedule")
    if args.chosen_methods[0].query_steps == ():
        raise UsageError("--vlm-steps none: collect keeps the teacher's verdicts at the query steps; give some")


def run_collect(args) -> int:
    prompts = read_prompts(args.prompts, args.prompt_column, args.limit)
    if prompts.skipped:
        first = prompts.skipped[0]
        print(printable(f"warning: {len(prompts.skipped)} rows of {args.prompts} are skipped, the first (line "
                        f"{first.line}) for: {first.reason}"), file=sys.stderr, flush=True)
    method = args.chosen_methods[0]
    settings = {
        **model_settings(args), "seeds_per_prompt": args.seeds_per_prompt, "method": method.settings(),
    }
    info = {"prompts": str(args.prompts), "prompts_sha256": prompts.sha256, "prompts_used": len(prompts.rows),
            "command": shlex.join(["distill.py", *args.argv])}

    def check_pipe(pipe):
        check_sizes(args, pipe, SAMPLERS[args.sampler])

    return collect(Collection(
        out=Path(args.out), rows=prompts.rows, method=method, settings=settings,
        sampling=Sampling(args.steps, args.sampler, args.height, args.width), guidance_scale=args.guidance_scale,
        base_seed=args.seed, images=args.seeds_per_prompt, device=args.device, dtype=args.torch_dtype,
        load_pipe=lambda: load_model(args),
        check_pipe=check_pipe, allow_failures=args.allow_vlm_failures, progress=not args.quiet, info=info))


def run_train(args) -> int:
    settings = Training(args.epochs, args.batch_size, args.learning_rate, args.width, args.held_out, args.seed)
    card = train(Path(args.data), Path(args.out), settings, args.device)
    data = card["data"]
    print(printable(f"{args.out}: {card['task']} on {card['model']['family']} latents, from {data['examples']} "
                    f"answered queries of {data['prompts']} prompts ({data['held_out']['prompts']} held out)"))
    return 0


def main(argv=None) -> int:
    args = None
    try:
        args = parse_args(argv)
        return args.run(args)
    except SystemExit as e:  # --help
        return e.code
    except (UsageError, PromptFileError, DataError, weights.CheckpointError, MissingLeaf, TooLargeError) as e:
        return fail(e, 2)
    except OSError as e:
        return fail(e, 1)
    except KeyboardInterrupt:
        collecting = args is not None and args.command == "collect"
        return fail("interrupted" + (f"; re-run the same command to resume from {args.out}" if collecting else ""), 130)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise  # a bug: Python's traceback
        return fail(f"out of memory; try fewer --seeds-per-prompt, a smaller size or --batch-size "
                    f"({type(e).__name__}: {e})", 1)


if __name__ == "__main__":
    sys.exit(main())
