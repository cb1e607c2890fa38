"""The VL-DNP proposer a command line names: who looks at the predicted image (vlm/base.py's Proposer)."""
from checkpoint.clip import load_clip
from vlm.client import VLMClient
from vlm.clip_proposer import CLIPProposer
from vlm.dnp import StaticProposer
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


def describe_proposer(args) -> dict:
    """The proposer's settings, for run records."""
    if args.proposer == "vlm":
        return {"name": "vlm", "model": args.vlm_model}
    if args.proposer == "clip":
        return {"name": "clip", "model": args.clip_model, "threshold": args.clip_threshold}
    return {"name": args.proposer}
