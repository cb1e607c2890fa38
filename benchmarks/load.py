"""Loading, and the fp32 CPU UNet step, with and without convolution packing: ours
(weights.load_pipeline) against diffusers' StableDiffusionPipeline.from_pretrained, on the full SD1.5
layout (860M-parameter UNet, 84M VAE, 123M text encoder) with random weights.

    python benchmarks/load.py [--folder DIR] [--repeats 3] [--steps 5] [--json out.json] [--baseline CHECKOUT]

Each run is a fresh process that
  1. loads the folder and uses every weight once: the text encoder on one prompt, the UNet on
     [1, 4, 8, 8] latents, the VAE's decoder on those latents and its encoder on the 64x64 image.
     Recorded: the wall and CPU time of both, and of the imports each needs beyond torch; the peak
     RSS at that point (imports included, for both), with the RSS then split into anonymous memory
     and mapped file pages;
  2. calls the UNet at batch 2 on 32x32 latents: once to warm up (ours packs the weights for this
     shape in it: model/packing.py; in step 1 its single 8x8 input ran PyTorch's own kernel, as
     diffusers' did), once more, then --steps times. Recorded: the wall and CPU time of the two first
     calls, and the median of the others.
The runs are ours (load_pipeline's default, which packs the convolutions for fp32 on the CPU), ours
with pack=False, and diffusers, taking turns (ours, plain, diffusers, ours, ...) so that all see the
same machine load; the table shows medians over --repeats and the JSON every run, each with the
load average when it started. On a busy machine compare CPU times (the process' own, all threads),
which other processes change less than wall times. --baseline adds a fourth, "baseline": ours (the
default, packed) as another checkout of this project has it (an older commit, say), run by this
script's worker, in the same turns.

The folder is written once, by diffusers and transformers, and reused (warm page cache).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMPLS = ("ours", "plain", "diffusers")  # plain: ours with pack=False
PROMPT = "a photograph of an astronaut riding a horse"


def loader(impl: str):
    """Imports what `impl` needs (before any clock starts) and returns folder -> (tokenize, text
    encoder, UNet, VAE decode, VAE encode), each a function of tensors."""
    if impl == "diffusers":
        import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion  # noqa: F401
        import transformers.models.clip.modeling_clip  # noqa: F401
        from diffusers import StableDiffusionPipeline

        def load(folder):
            p = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                        requires_safety_checker=False)
            return (lambda prompts: p.tokenizer(prompts, padding="max_length", max_length=p.tokenizer.model_max_length,
                                                truncation=True, return_tensors="pt").input_ids,
                    lambda ids: p.text_encoder(ids)[0],
                    lambda x, t, context: p.unet(x, t, encoder_hidden_states=context).sample,
                    lambda z: p.vae.decode(z).sample,
                    lambda images: p.vae.encode(images).latent_dist.mean)
        return load

    from weights import load_pipeline

    def load(folder):
        p = load_pipeline(folder, dtype=torch.float32, pack=impl == "ours")
        return p.tokenizer, p.text_encoder, p.unet, p.vae.decode, p.vae.encode
    return load


def memory_gib() -> dict:
    """The process' peak RSS so far and its RSS now, split into anonymous memory and mapped file
    pages (safetensors maps the file: weights read that way are file pages). Linux's VmHWM, not
    ru_maxrss, which a process started by fork and exec inherits from its parent."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    except FileNotFoundError:  # no /proc (macOS): ru_maxrss is in bytes there
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 3
        return dict(peak=peak, now=float("nan"), anon=float("nan"), file=float("nan"))
    gib = {k: int(status[k].split()[0]) / 1024 ** 2 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
    return dict(peak=gib["VmHWM"], now=gib["VmRSS"], anon=gib["RssAnon"], file=gib["RssFile"])


def worker(impl: str, folder: str, steps: int) -> dict:
    t0 = time.perf_counter()
    load = loader(impl)
    imports_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    imported = memory_gib()
    with torch.no_grad():
        start, start_cpu = time.perf_counter(), time.process_time()
        tokenize, text, unet, decode, encode = load(folder)
        loaded, loaded_cpu = time.perf_counter(), time.process_time()
        context = text(tokenize([PROMPT]))  # [1, 77, 768]
        encode(decode(unet(torch.randn(1, 4, 8, 8, generator=g), 999, context)))  # [1, 4, 8, 8] latents
        first_pass, first_pass_cpu = time.perf_counter(), time.process_time()
        memory = memory_gib()
        result = dict(imports_s=imports_s, load_s=loaded - start, first_pass_s=first_pass - loaded,
                      total_s=first_pass - start, ready_s=imports_s + first_pass - start,
                      load_cpu_s=loaded_cpu - start_cpu, total_cpu_s=first_pass_cpu - start_cpu,
                      peak_rss_gib=memory["peak"], rss_after_imports_gib=imported["peak"],
                      anon_gib=memory["anon"], file_gib=memory["file"])

        context = text(tokenize([PROMPT, ""]))  # [2, 77, 768]
        x = torch.randn(2, 4, 32, 32, generator=g)
        w0, c0 = time.perf_counter(), time.process_time()
        unet(x, 999, context)  # warm-up: the first call with this shape, in which ours packs
        result.update(warmup_s=time.perf_counter() - w0, warmup_cpu_s=time.process_time() - c0)
        w0, c0 = time.perf_counter(), time.process_time()
        unet(x, 999, context)  # the second: the first with the weights ours packed
        result.update(second_s=time.perf_counter() - w0, second_cpu_s=time.process_time() - c0)
        wall, cpu = [], []
        for _ in range(steps):
            w0, c0 = time.perf_counter(), time.process_time()
            unet(x, 999, context)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return dict(result, step_s=statistics.median(wall), step_cpu_s=statistics.median(cpu), step_runs_s=wall,
                peak_rss_after_steps_gib=memory_gib()["peak"])


def run(impl: str, folder: Path, steps: int, threads: int | None, baseline: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "ours" if impl == "baseline" else impl, "--folder", str(folder),
           "--steps", str(steps)]
    if threads:
        cmd += ["--threads", str(threads)]
    if impl == "baseline":
        cmd += ["--root", str(baseline)]
    load_average = os.getloadavg()[0]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), load_average=load_average)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/sd15-random", help="written on first use")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed UNet calls per run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--json")
    parser.add_argument("--baseline", type=Path, help="another checkout of this project, run as 'baseline'")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)  # the worker imports the project from here
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.root:
        sys.path.insert(0, args.root)
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.steps)))
        return
    folder, impls = Path(args.folder), args.impls.split(",") + (["baseline"] if args.baseline else [])
    if args.baseline and not (args.baseline / "weights.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a checkout of this project (no weights.py)")
    if not (folder / "model_index.json").exists():
        print(f"writing a random SD1.5-size folder to {folder} ...", file=sys.stderr)
        from random_weights import write_sd_folder
        write_sd_folder(folder)
    for file in folder.rglob("*.safetensors"):  # into the page cache, for the first run as for the others
        with open(file, "rb") as f:
            while f.read(1 << 26):
                pass
    runs = {impl: [] for impl in impls}
    for i in range(args.repeats):
        for impl in impls:
            runs[impl].append(run(impl, folder, args.steps, args.threads, args.baseline))
            r = runs[impl][-1]
            print(f"  round {i + 1} {impl:<9} load average {r['load_average']:.1f}, imports {r['imports_s']:.2f} s, "
                  f"load+pass {r['total_s']:.2f} s (CPU {r['total_cpu_s']:.2f} s), peak {r['peak_rss_gib']:.2f} GiB, "
                  f"warm-up {r['warmup_s']:.2f} s, second {r['second_s']:.2f} s, step {r['step_s']:.2f} s "
                  f"(CPU {r['step_cpu_s']:.2f} s)",
                  file=sys.stderr)
    columns = {"ready_s": "imports + load + first pass s", "imports_s": "(imports s)",
               "total_s": "load + first pass s", "total_cpu_s": "(CPU s)", "load_s": "(load s)",
               "peak_rss_gib": "peak RSS GiB", "rss_after_imports_gib": "(after imports)", "anon_gib": "(anon after)",
               "file_gib": "(file after)", "warmup_s": "warm-up call s", "warmup_cpu_s": "(CPU s)",
               "second_s": "second call s", "second_cpu_s": "(CPU s)",
               "step_s": "step s", "step_cpu_s": "step CPU s", "load_average": "load average"}
    table = {impl: {k: statistics.median(r[k] for r in rs) for k in columns} for impl, rs in runs.items()}
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1024 ** 3
    print(f"{size:.2f} GiB of fp32 safetensors, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, medians of "
          f"{args.repeats} runs; step: the UNet at batch 2 on 32x32 latents, median of {args.steps} calls after the "
          "warm-up call and the second")
    print("| impl | " + " | ".join(columns.values()) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for impl, t in table.items():
        print(f"| {impl} | " + " | ".join(f"{t[k]:.{3 if k.startswith('step') else 2}f}" for k in columns) + " |")
    ratios = {}
    if "diffusers" in table:
        d = table["diffusers"]
        for impl in (i for i in table if i != "diffusers"):
            r = ratios[impl] = {k: table[impl][k] / d[k] for k in (
                "ready_s", "total_s", "total_cpu_s", "peak_rss_gib", "warmup_s", "warmup_cpu_s", "second_s",
                "second_cpu_s", "step_s", "step_cpu_s")}
            print(f"{impl} / diffusers: imports + load + first pass {r['ready_s']:.2f}x, load + first pass "
                  f"{r['total_s']:.2f}x (CPU {r['total_cpu_s']:.2f}x), peak RSS {r['peak_rss_gib']:.2f}x; warm-up "
                  f"{r['warmup_s']:.2f}x (CPU {r['warmup_cpu_s']:.2f}x), second call {r['second_s']:.2f}x (CPU "
                  f"{r['second_cpu_s']:.2f}x); step {r['step_s']:.2f}x "
                  f"(CPU {r['step_cpu_s']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(size_gib=size, repeats=args.repeats, steps=args.steps,
                                                   cpus=os.cpu_count(), threads=torch.get_num_threads(),
                                                   medians=table, ratios_to_diffusers=ratios, runs=runs), indent=2))


if __name__ == "__main__":
    main()
