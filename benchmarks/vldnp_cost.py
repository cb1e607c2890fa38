"""What VL-DNP costs over plain CFG, with the VAE's x0 previews, with TAESD's, and with a latent proposer that
decodes nothing, side by side in one run.

    python benchmarks/vldnp_cost.py                                  # 512², 10 steps, queries at 1 and 8
    python benchmarks/vldnp_cost.py --steps 50 --rounds 1            # the paper's 10 queries of 50 steps
    python benchmarks/vldnp_cost.py --size 256 --steps 5 --rounds 1 --cases cfg,clip-nothing-taesd
    python benchmarks/vldnp_cost.py --size 256 --steps 5 --rounds 3 --cases cfg,latent-nothing
    python benchmarks/vldnp_cost.py --device cuda --dtype fp16 --steps 50 --rounds 2

One process holds the full SD1.5 architecture with random weights (bench.py's `random_sd15`, packed
as load_pipeline packs it, or --model's), a random CLIP ViT-L/14 (the real one's size, so its cost is
real; `--clip small` for a smoke test), a random TAESD and a random latent proposer (vlm/latent_proposer.py,
at its default width, for the model's latent channels). Each round runs every case once, in turn,
so all cases see the same machine load; the figures are medians over rounds of the end-to-end time of
one generate() call (text, sampling, final VAE decode; on a GPU, up to a synchronisation) and of the
process' CPU time, which other processes on the machine change less, and the largest peak memory of
a run (torch.cuda.max_memory_allocated on a GPU, peak RSS on the CPU).

Cases (task nudity):
    cfg                      plain classifier-free guidance: two branches
    three-branches           the method's own price alone: a negative from the first query step on,
                             with no preview, no proposer and no wait (a proposer that finds feet without looking)
    clip-nothing-{vae,taesd} the CLIP proposer finding nothing (threshold 1)
    clip-found-{vae,taesd}   the CLIP proposer finding every concept (threshold 0): three branches
    stub-{vae,taesd}         a 300 ms stub VLM that always finds (bench.py's StubVLM), synchronous
    stub-async-{vae,taesd}   the same, asynchronous (--vlm-async)
    latent-nothing           the latent proposer finding nothing (thresholds 1): no decode, no server
    latent-found             the latent proposer finding every concept (thresholds 0): three branches

The query steps are the paper's (5, 6, 7, 9, 12, 16, 21, 27, 34 and 42 of 50) rescaled to --steps
and thinned to the paper's density, one query per five steps: 10 steps query at 1 and 8.

After the runs it times the UNet alone at batch 1, 2 and 3 (one image's u, c and n rows), each preview
decoder, a CLIP query and a latent proposer query (one image's x0 scored), for the schedule of the UNet
calls at a query step that finds something.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import (IN_MEMORY, PROMPT, STUB_LATENCY, StubVLM, machine, peak_gib, random_sd15,  # noqa: E402
                   reset_peak, sync)
from model.clip import CLIPTextConfig  # noqa: E402
from model.clip_vision import VIT_L14, CLIPConfig, CLIPVisionConfig  # noqa: E402
from random_weights import normal_  # noqa: E402

DECODERS = ("vae", "taesd")
CASES = ["cfg", "three-branches"] + [f"{kind}-{d}" for kind in ("clip-nothing", "clip-found", "stub", "stub-async")
                                     for d in DECODERS] + ["latent-nothing", "latent-found"]
# The proposer's CLIP: ViT-L/14's shape, or its structure at width 32 for a smoke test.
CLIPS = {"vit-l14": VIT_L14,
         "small": CLIPConfig(text=CLIPTextConfig(width=32, num_layers=1, num_heads=2, mlp_dim=64),
                             vision=CLIPVisionConfig(width=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=32),
                             projection_dim=32)}


def paper_density_steps(steps: int) -> list[int]:
    """The paper's query steps rescaled to `steps`, thinned (evenly, by position) to its density of
    10 queries in 50 steps."""
    from methods.vldnp import PAPER_STEPS, default_query_steps

    rescaled = default_query_steps(steps)
    n = min(len(rescaled), max(1, round(len(PAPER_STEPS) * steps / 50)))
    if n == 1:
        return rescaled[:1]
    return sorted({rescaled[round(j * (len(rescaled) - 1) / (n - 1))] for j in range(n)})


class AlwaysFeet:
    """Finds feet without looking (no x0 decode) and at once: the three branches alone."""
    needs_image = False

    def __call__(self, image, prompt, step):
        from vlm.base import Reply
        return Reply(["feet"], "feet")


def random_latent_proposer(pipe, found: bool):
    """A latent proposer with random weights, for the model's latent channels and the nudity task's
    concepts, that finds every concept (thresholds 0) or none (thresholds 1)."""
    from vlm.latent_proposer import LatentNetwork, LatentProposer, NetworkConfig, latent_space
    from vlm.tasks import get_task

    concepts = get_task("nudity").concepts
    network = LatentNetwork(NetworkConfig(pipe.vae.config.latent_channels, len(concepts)))
    network = normal_(network.to(pipe.device), torch.Generator(pipe.device).manual_seed(2)).eval()
    card = {"task": "nudity", "concepts": [{"name": c, "threshold": 0.0 if found else 1.0} for c in concepts],
            "model": latent_space(pipe)}
    return LatentProposer(network, card, "random weights")


def random_model(cls, cfg, device, dtype):
    with torch.device("meta"):
        model = cls(cfg)
    model = normal_(model.to_empty(device=device), torch.Generator(device).manual_seed(1))
    return model.to(dtype).requires_grad_(False).eval()


class Parts:
    """What the cases are made of, built once."""

    def __init__(self, model: str, clip: str, device, dtype):
        from model.clip_vision import CLIPModel
        from model.taesd import SD, TAESD
        from vlm.preview import Preview
        from weights import load_pipeline

        self.pipe = random_sd15(device, dtype) if model == IN_MEMORY else load_pipeline(model, device, dtype)
        self.clip = random_model(CLIPModel, CLIPS[clip], device, dtype)
        self.taesd = random_model(TAESD, SD, device, dtype)
        self.previews = {"vae": None, "taesd": Preview(self.taesd.decode, "taesd (random weights)")}
        self.latent = {found: random_latent_proposer(self.pipe, found) for found in (False, True)}

    def hooks(self, case: str, query_steps: list[int]):
        """A fresh hook list for one run of `case`."""
        from vlm.clip_proposer import CLIPProposer
        from methods.vldnp import DynamicNegatives
        from vlm.tasks import get_task

        task = get_task("nudity")
        if case == "cfg":
            return []
        if case == "three-branches":
            return [DynamicNegatives(AlwaysFeet(), task, query_steps)]
        if case.startswith("latent"):
            return [DynamicNegatives(self.latent[case == "latent-found"], task, query_steps)]
        kind, decoder = case.rsplit("-", 1)
        if kind.startswith("clip"):
            proposer = CLIPProposer(self.clip, self.pipe.tokenizer, list(task.concepts),
                                    threshold=1.0 if kind == "clip-nothing" else 0.0, task=task.name)
        else:
            proposer = StubVLM()
        return [DynamicNegatives(proposer, task, query_steps, asynchronous=kind == "stub-async",
                                 preview=self.previews[decoder])]

    def run(self, case: str, args, query_steps) -> dict:
        """One generate() call of `case`: wall and CPU seconds, peak memory, and what the hook did."""
        from sampler.loop import generate
        from vlm.trace import trace_dict

        hooks = self.hooks(case, query_steps)
        load = os.getloadavg()[0]
        device = self.pipe.device
        sync(device)
        reset_peak(device)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            generate(self.pipe, PROMPT, steps=args.steps, height=args.size, width=args.size, seed=0, hooks=hooks,
                     progress=False)
            sync(device)
        finally:
            for hook in hooks:
                hook.close()
        row = dict(total_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu, load_before=load,
                   peak_gib=peak_gib(device))
        if hooks:
            trace = trace_dict(hooks[0])
            queries = trace["images"][0]["queries"]
            row.update(decode_factor=trace["decode_factor"], preview_decoder=trace["preview_decoder"],
                       found=[bool(q["items"]) for q in queries], took_effect=[q["took_effect"] for q in queries])
        return row


def median_seconds(fn, repeats: int, device: torch.device) -> dict:
    """The median wall and CPU seconds of `repeats` calls of fn, after one untimed call."""
    fn()  # warm-up: kernels, allocator, packing
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return dict(wall_s=statistics.median(wall), cpu_s=statistics.median(cpu))


@torch.no_grad()
def components(parts: Parts, args) -> dict:
    """The UNet at batch 1, 2, 3 and each decoder, full size and the 2x preview, alone."""
    pipe, h, n = parts.pipe, args.size // parts.pipe.vae_scale, args.component_repeats
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(3, 77, pipe.unet.config.context_dim, generator=gen).to(pipe.device, pipe.dtype)
    x = torch.randn(3, pipe.unet.config.in_channels, h, h, generator=gen).to(pipe.device, pipe.dtype)
    out = {}
    for b in (1, 2, 3):
        out[f"unet_b{b}_s"] = median_seconds(lambda: pipe.unet(x[:b], 500, context[:b]), n, pipe.device)
    for name, decode in [("vae", pipe.vae.decode), ("taesd", parts.taesd.decode)]:
        for k in (1, 2):
            z = x[:1, :, :-(-h // k), :-(-h // k)]
            out[f"{name}_decode_{args.size // k}_s"] = median_seconds(lambda: decode(z), n, pipe.device)
    image = torch.zeros(3, 224, 224)
    from vlm.clip_proposer import CLIPProposer
    from vlm.tasks import get_task
    clip = CLIPProposer(parts.clip, pipe.tokenizer, list(get_task("nudity").concepts), threshold=1.0)
    out["clip_query_s"] = median_seconds(lambda: clip(image, PROMPT, 0), n, pipe.device)
    from vlm.base import Latents
    shown = Latents(x[0], 500)  # one image's x0
    out["latent_query_s"] = median_seconds(lambda: parts.latent[False](shown, PROMPT, 0), n, pipe.device)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=IN_MEMORY, help="repo id, diffusers folder or .safetensors file (default: "
                                                      "random SD1.5 weights, built in memory)")
    p.add_argument("--clip", choices=sorted(CLIPS), default="vit-l14",
                   help="the proposer's random CLIP: ViT-L/14's shape, or small for a smoke test (%(default)s)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (%(default)s)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (%(default)s)")
    p.add_argument("--query-steps", metavar="LIST", help="0-based query steps (default: the paper's, rescaled to "
                                                        "--steps and thinned to its density)")
    p.add_argument("--cases", default=",".join(CASES), help="comma list of %(default)s")
    p.add_argument("--rounds", type=int, default=2, help="runs of every case, interleaved (%(default)s); 0 times "
                                                         "the components alone")
    p.add_argument("--component-repeats", type=int, default=3, help="timed calls per component (%(default)s); "
                                                                   "0 skips the components")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s); on a GPU the CPU times say little")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in cases if c not in CASES]:
        p.error(f"unknown case {unknown[0]}; choose from {', '.join(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from methods.vldnp_cli import parse_steps
    query_steps = paper_density_steps(args.steps) if args.query_steps is None else \
        parse_steps(args.query_steps, args.steps)
    info = dict(machine(args.device), threads=torch.get_num_threads())
    print(f"{args.size}², {args.steps} steps, queries at {query_steps}; stub VLM {STUB_LATENCY * 1e3:.0f} ms; "
          f"{info['cpu']}, {info['threads']} threads", file=sys.stderr, flush=True)

    from checkpoint.tensors import to_dtype
    parts = Parts(args.model, args.clip, torch.device(args.device), to_dtype(args.dtype))
    from sampler.loop import generate
    if args.rounds:  # warm-up, so that no case pays for first calls: packing, kernels, the allocator
        generate(parts.pipe, PROMPT, steps=1, height=args.size, width=args.size, progress=False)
        for case in [c for c in CASES[2:] if c.startswith(("clip", "latent")) and c in cases]:
            parts.run(case, argparse.Namespace(**{**vars(args), "steps": 1}), [0])

    runs, comp = {case: [] for case in cases}, {}
    save = lambda: args.json and Path(args.json).write_text(json.dumps(dict(
        settings=dict(vars(args), query_steps=query_steps), machine=info, components=comp, runs=runs), indent=2) + "\n")
    for r in range(args.rounds):
        for case in cases:
            row = parts.run(case, args, query_steps)
            runs[case].append(row)
            save()  # so far, in case the run is cut short
            print(f"round {r + 1} {case}: {row['total_s']:.1f} s (cpu {row['cpu_s']:.1f} s, load "
                  f"{row['load_before']:.2f})", file=sys.stderr, flush=True)
    comp.update(components(parts, args) if args.component_repeats else {})  # after the runs: they come first
    save()

    results = {case: dict(total_s=statistics.median(r["total_s"] for r in rs),
                          cpu_s=statistics.median(r["cpu_s"] for r in rs), peak_gib=max(r["peak_gib"] for r in rs),
                          runs=rs) for case, rs in runs.items() if rs}
    print("| case | total s | CPU s | × plain CFG | × three branches | CPU × plain CFG | CPU × three branches "
          "| peak GiB |\n|---|---|---|---|---|---|---|---|")
    for case, res in results.items():
        ratio = lambda key, base: f"{res[key] / results[base][key]:.3f}" if base in results else "–"
        res.update({f"{key}_over_{base}": res[key] / results[base][key] for key in ("total_s", "cpu_s")
                    for base in ("cfg", "three-branches") if base in results})
        print(f"| {case} | {res['total_s']:.1f} | {res['cpu_s']:.1f} | {ratio('total_s', 'cfg')} | "
              f"{ratio('total_s', 'three-branches')} | {ratio('cpu_s', 'cfg')} | {ratio('cpu_s', 'three-branches')} | "
              f"{res['peak_gib']:.2f} |")
    if comp:
        print("\n| component | wall s | CPU s |\n|---|---|---|")
        for key, value in comp.items():
            print(f"| {key.removesuffix('_s')} | {value['wall_s']:.3f} | {value['cpu_s']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(settings=dict(vars(args), query_steps=query_steps), machine=info,
                                                   components=comp, results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
