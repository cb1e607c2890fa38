"""The VL-DNP proposer a command line names: who looks at the predicted image (vlm/base.py's Proposer)."""
from checkpoint.clip import load_clip
from checkpoint.taesd import FAMILIES as TAESD_FAMILIES
from checkpoint.taesd import REPOS as TAESD_REPOS
from checkpoint.taesd import load_taesd
from checkpoint.tensors import CheckpointError
from cli.args import UsageError
from vlm.client import VLMClient
from vlm.clip_proposer import CLIPProposer
from vlm.dnp import StaticProposer
from vlm.preview import VAE_PREVIEW, Preview
from vlm.tasks import Task


def make_proposer(args, task: Task, device=None, dtype=None):
    """args.proposer is "vlm" (a server: args.vlm_url, vlm_model, vlm_timeout), "clip" (CLIP ViT:
    args.clip_model and clip_threshold, loaded on `device` in `dtype`) or "static" (the task's fixed
    concepts at every query)."""
    if args.proposer == "vlm":
        return VLMClient(args.vlm_url, args.vlm_model, task, timeout=args.vlm_timeout)
    if args.proposer == "static":
        return StaticProposer(list(task.concepts))
    model, tokenizer = load_clip(args.clip_model, device, dtype)
    return CLIPProposer(model, tokenizer, list(task.concepts), threshold=args.clip_threshold, task=task.name,
                        name=args.clip_model)


def make_preview(choice: str, device=None, dtype=None) -> Preview:
    """The x0 preview decoder --preview-decoder names (cli/args.py:check_preview_decoder checked it):
    the model's VAE, or TAESD (madebyollin/taesd or taesdxl, or a folder or file) loaded on `device`
    in `dtype`. TAESD that cannot be had (offline and not cached, a damaged file) is a UsageError line.
    It loads before the diffusion model, so whether it fits the model is checked after that
    (Preview.mismatch)."""
    if choice == "vae":
        return VAE_PREVIEW
    source = TAESD_REPOS.get(choice, choice)
    try:
        model = load_taesd(source, device or "cpu", dtype or "fp32")
    except CheckpointError as e:
        raise UsageError(f"--preview-decoder {choice}: {e} (or decode the previews with the model's VAE: "
                         "--preview-decoder vae)") from None
    if choice in TAESD_REPOS:
        return Preview(model.decode, f"{choice} ({source})", TAESD_FAMILIES[choice])
    return Preview(model.decode, choice)


def describe_proposer(args) -> dict:
    """The proposer's settings, for run records."""
    if args.proposer == "vlm":
        return {"name": "vlm", "model": args.vlm_model}
    if args.proposer == "clip":
        return {"name": "clip", "model": args.clip_model, "threshold": args.clip_threshold}
    return {"name": args.proposer}
