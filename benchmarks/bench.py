"""Sampling speed and memory: ours (sampler.loop.generate) against diffusers' StableDiffusionPipeline
with DDIMScheduler, on the same weights, in the same run.

    python benchmarks/bench.py                                  # SD1.5 random weights, 512², 50 steps
    python benchmarks/bench.py --size 256 --steps 10 --modes cfg,negative --repeats 3
    python benchmarks/bench.py --size 128,256 --batch 1,2,4 --impls ours        # scaling
    python benchmarks/bench.py --device cuda --dtype fp16 --compile --json gpu.json

Each implementation runs in its own worker process, so its load time and peak memory are its own
(peak RSS on CPU, reset before each run; torch.cuda.max_memory_allocated on GPU). The parent asks
the workers in turn for one run at a time: ours, diffusers, ours, diffusers, ... so both see the
same machine load. Each case starts with `--warmup` short runs (3 steps) that are not counted;
the figures are medians.

Per run it records the end-to-end time of one call (text encoding, sampling, VAE decode, uint8
images), and the time per denoising step: the median gap between consecutive step callbacks (our
step hook, diffusers' callback_on_step_end), each of which synchronises the device. A step is one
batched UNet call over every guidance branch, the guidance formula and the DDIM update. The process'
CPU time per step is recorded too: on a machine shared with other work, run with --threads 1 and
compare CPU times, which other processes barely change (with more threads, waiting threads spin and
count). Both implementations draw the same noise from the same seed, so the images must agree: the
table shows the largest pixel difference between them.

The default model is the full SD1.5 architecture (860M-parameter UNet, 84M VAE, 123M text encoder)
with random weights. With diffusers installed it is written once, by diffusers and transformers, to
a folder (--folder) that both implementations load; without diffusers, ours is built in memory.
"""
import argparse
import ctypes
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
IN_MEMORY = "random-sd15"
WARMUP_STEPS = 3  # steps of a warm-up run  # --model value: the random SD1.5 built in memory, ours only


@dataclass
class Mode:
    """One way of sampling. `kwargs` go to both generate() and diffusers' pipeline; `hooks`, when set,
    makes step hooks for one of our runs: such a mode has no diffusers counterpart."""
    kwargs: dict = field(default_factory=dict)
    hooks: object = None  # (pipe, case) -> list of hooks, made fresh for each run


MODES = {
    "cfg": Mode(),  # classifier-free guidance, g = 7.5: two branches per image
    "negative": Mode(dict(negative_prompt=NEGATIVE)),  # the negative prompt replaces the unconditional branch
    # VL-DNP at the paper's 10 query steps (rescaled to --steps) or --queries, task nudity:
    "dnp-clip": Mode(hooks=lambda pipe, case: dnp_hooks(pipe, case, "clip", 1.0)),  # CLIP, finds nothing
    "dnp-clip-found": Mode(hooks=lambda pipe, case: dnp_hooks(pipe, case, "clip", 0.0)),  # finds all: 3 branches
    "dnp-stub": Mode(hooks=lambda pipe, case: dnp_hooks(pipe, case, "stub")),  # a 300 ms VLM, synchronous
    "dnp-stub-async": Mode(hooks=lambda pipe, case: dnp_hooks(pipe, case, "stub", asynchronous=True)),
}


STUB_LATENCY = 0.3  # seconds per query of the stub VLM
_clip = {}


class StubVLM:
    """A VLM of fixed latency that always sees feet: the cost of waiting for a server, no more."""
    def __call__(self, image, prompt, step):
        from vlm.base import Reply
        time.sleep(STUB_LATENCY)
        return Reply(["feet"], "feet")


def query_steps(steps: int, queries: int | None) -> list[int]:
    """The paper's schedule rescaled to `steps` (None), or `queries` steps spread evenly from the
    paper's first query step to the last step."""
    from methods.vldnp import default_query_steps

    if queries is None:
        return default_query_steps(steps)
    first = default_query_steps(steps)[0]
    return sorted({round(first + j * (steps - 1 - first) / max(1, queries - 1)) for j in range(queries)})


def dnp_hooks(pipe, case, proposer, threshold=0.5, asynchronous=False):
    """A fresh DynamicNegatives hook. The CLIP proposer is a random-weight ViT-L/14 (the real one's
    size, so its cost is real), built once per worker on the pipeline's device and dtype."""
    from methods.vldnp import DynamicNegatives
    from vlm.tasks import get_task

    task = get_task("nudity")
    if proposer == "stub":
        chosen = StubVLM()
    else:
        from model.clip_vision import VIT_L14, CLIPModel
        from vlm.clip_proposer import CLIPProposer
        if "model" not in _clip:
            with torch.device("meta"):
                model = CLIPModel(VIT_L14)
            model = model.to_empty(device=pipe.device)
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
            _clip["model"] = model.to(pipe.dtype).requires_grad_(False).eval()
        chosen = CLIPProposer(_clip["model"], pipe.tokenizer, list(task.concepts), threshold=threshold,
                              task=task.name)
    return [DynamicNegatives(chosen, task, query_steps(case["steps"], case.get("queries")),
                             asynchronous=asynchronous)]


# ---------------------------------------------------------------------------------------------
# The worker: loads one implementation, then runs the cases the parent sends, one JSON line each

def worker(args):
    import sampler.loop  # noqa: F401  imported before the clock starts: load time is the load alone
    from checkpoint.tensors import to_dtype

    if args.worker == "diffusers":
        import diffusers.pipelines  # noqa: F401
    device, dtype = torch.device(args.device), to_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    reset_peak(device)
    start = time.perf_counter()
    run = load_ours(args, device, dtype) if args.worker == "ours" else load_diffusers(args, device, dtype)
    reply(load_s=time.perf_counter() - start, load_peak_gib=peak_gib(device))
    for line in sys.stdin:
        case = json.loads(line)
        reset_peak(device)
        steps = []

        def on_step():
            sync(device)
            steps.append((time.perf_counter(), time.process_time()))

        sync(device)
        start = time.perf_counter()
        images = run(case, on_step)  # uint8 [B, H, W, 3]
        sync(device)
        total = time.perf_counter() - start
        if case.get("save"):
            torch.save(images, case["save"])
        wall, cpu = ([b[k] - a[k] for a, b in zip(steps, steps[1:])] for k in (0, 1))
        reply(total_s=total, step_s=statistics.median(wall), step_cpu_s=statistics.median(cpu),
              peak_gib=peak_gib(device))


def load_ours(args, device, dtype):
    from sampler.loop import generate
    from weights import load_pipeline

    pipe = random_sd15(device, dtype) if args.model == IN_MEMORY else load_pipeline(args.model, device, dtype)
    if args.compile:
        pipe.unet.compile(mode=args.compile_mode)

    def run(case, on_step):
        mode = MODES[case["mode"]]
        hooks = (mode.hooks(pipe, case) if mode.hooks else []) + [lambda state: on_step()]
        try:
            return generate(pipe, PROMPT, steps=case["steps"], height=case["height"], width=case["width"],
                            batch=case["batch"], seed=0, hooks=hooks, progress=False, **mode.kwargs)
        finally:  # an asynchronous VL-DNP hook waits here for its last queries
            for hook in hooks:
                getattr(hook, "close", lambda: None)()
    return run


def load_diffusers(args, device, dtype):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils.logging import disable_progress_bar

    disable_progress_bar()
    kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if Path(args.model).is_file():
        pipe = StableDiffusionPipeline.from_single_file(args.model, **kwargs)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.model, **kwargs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        pipe.unet.compile(mode=args.compile_mode)

    def callback(pipe, i, t, tensors):
        on_step_end()
        return tensors

    def run(case, on_step):
        nonlocal on_step_end
        on_step_end = on_step
        images = pipe(PROMPT, num_inference_steps=case["steps"], guidance_scale=7.5, height=case["height"],
                      width=case["width"], num_images_per_prompt=case["batch"], eta=0.0,
                      generator=torch.Generator("cpu").manual_seed(0), output_type="np",
                      callback_on_step_end=callback, **MODES[case["mode"]].kwargs).images
        return torch.from_numpy((images * 255).round().astype("uint8"))  # as diffusers' numpy_to_pil rounds

    on_step_end = None
    return run


def random_sd15(device, dtype):
    """The SD1.5 pipeline with N(0, 0.02) weights, built straight on `device` (no diffusers needed)."""
    from checkpoint.folder import load_tokenizer
    from model.clip import SD1_TEXT, CLIPTextModel
    from model.unet import SD15, UNet
    from model.vae import SD, AutoencoderKL
    from random_weights import normal_, write_byte_tokenizer
    from sampler.schedule import SchedulerConfig
    from weights import Pipeline, pack_for_cpu

    generator = torch.Generator(device).manual_seed(0)

    def build(cls, cfg):
        with torch.device("meta"):
            model = cls(cfg)
        model = normal_(model.to_empty(device=device), generator)
        return model.to(dtype).requires_grad_(False).eval()

    tokenizer = load_tokenizer(write_byte_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer"))
    pipe = Pipeline(tokenizer, build(CLIPTextModel, SD1_TEXT), build(UNet, SD15), build(AutoencoderKL, SD),
                    SchedulerConfig(), family="sd1", name=IN_MEMORY)
    return pack_for_cpu(pipe)  # as load_pipeline does


def reply(**values):
    print("BENCH " + json.dumps(values), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        gc.collect()
        try:  # hand freed heap back to the system, so the peak of this run is not that of an earlier one
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS, to the RSS now


def peak_gib(device) -> float:
    """Peak memory since reset_peak: allocated GPU memory on CUDA; otherwise the process' peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) / 2 ** 20
    import resource  # no /proc (macOS): the peak since the process started, in bytes there
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 30


# ---------------------------------------------------------------------------------------------
# The parent: starts the workers, interleaves their runs, prints a table, writes JSON

class Worker:
    def __init__(self, impl: str, args):
        cmd = [sys.executable, __file__, "--worker", impl, "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--compile-mode", args.compile_mode] + (["--compile"] if args.compile else []) \
            + (["--threads", str(args.threads)] if args.threads else [])
        self.impl = impl
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.load = self.read()

    def run(self, case: dict) -> dict:
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        return self.read()

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("BENCH "):
                return json.loads(line[6:])
        raise RuntimeError(f"the {self.impl} worker stopped (exit code {self.process.wait()}); see its error above")

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def machine(device: str) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    info = dict(cpu=cpu.group(1) if cpu else platform.processor(), cores=os.cpu_count(),
                torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    try:  # the installed version, without the seconds of importing it
        info["diffusers"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["commit"] = git.stdout.strip() or None
    return info


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"512" or "768x512" (width x height), comma-separated -> [(height, width)]."""
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().partition("x")
        sizes.append((int(h or w), int(w)))
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="repo id, diffusers folder or .safetensors file (default: random SD1.5 "
                                    "weights, in --folder when diffusers is installed, else in memory)")
    p.add_argument("--folder", default="/tmp/sd15-random", help="where the random SD1.5 is written (%(default)s)")
    p.add_argument("--size", default="512", help="image size, N or WxH; a comma list runs each (%(default)s)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", default="1", help="images per prompt; a comma list runs each (%(default)s)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default="cfg,negative", help=f"comma list of {', '.join(MODES)} (%(default)s)")
    p.add_argument("--queries", help="comma list of query counts for the dnp modes, spread evenly from the "
                                     "paper's first query step (default: the paper's 10 steps, rescaled)")
    p.add_argument("--impls", default="ours,diffusers", help="comma list of ours, diffusers (%(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case and implementation (%(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help=f"untimed {WARMUP_STEPS}-step runs first, per case (%(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads in each worker (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (both implementations)")
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode (%(default)s: with CUDA graphs on GPU)")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    impls = [impl for impl in ("ours", "diffusers") if impl in args.impls.split(",")]
    modes = args.modes.split(",")
    if not impls:
        p.error("--impls: choose ours, diffusers or both")
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"unknown mode {unknown[0]}; choose from {', '.join(MODES)}")
    if args.steps < 2:
        p.error("--steps must be at least 2 (a step's time is the gap between two steps)")
    if importlib.util.find_spec("diffusers") is None and "diffusers" in impls:
        print("diffusers is not installed: timing ours alone", file=sys.stderr)
        impls.remove("diffusers")
    if args.model is None:
        args.model = IN_MEMORY if "diffusers" not in impls else args.folder
        if args.model == args.folder and not (Path(args.folder) / "unet" / "config.json").exists():
            print(f"writing random SD1.5 weights to {args.folder} (once) ...", file=sys.stderr)
            from random_weights import write_sd_folder
            write_sd_folder(args.folder)

    info = machine(args.device)
    workers = [Worker(impl, args) for impl in impls]
    counts = [None] if args.queries is None else [int(q) for q in args.queries.split(",")]
    cases = [dict(mode=m, height=h, width=w, batch=b, steps=args.steps, queries=q)
             for m, (h, w), b in product(modes, parse_sizes(args.size), map(int, args.batch.split(",")))
             for q in (counts if MODES[m].hooks else [None])]
    scratch = Path(tempfile.mkdtemp())
    results = []
    try:
        for n, case in enumerate(cases):
            runs = {w.impl: [] for w in workers}
            for r in range(args.warmup + args.repeats):
                for w in workers:
                    if w.impl == "diffusers" and MODES[case["mode"]].hooks:
                        continue
                    if r < args.warmup:  # a short run warms kernels, allocator and caches for this case
                        w.run(dict(case, steps=min(case["steps"], WARMUP_STEPS), save=None))
                        continue
                    save = str(scratch / f"{w.impl}-{n}.pt") if r == args.warmup else None  # first timed run
                    runs[w.impl].append(w.run(dict(case, save=save)))
            row = dict(case)
            for impl, rs in runs.items():
                if rs:
                    total = statistics.median(r["total_s"] for r in rs)
                    row[impl] = dict(step_ms=1e3 * statistics.median(r["step_s"] for r in rs),
                                     step_ms_min=1e3 * min(r["step_s"] for r in rs),
                                     step_cpu_ms=1e3 * statistics.median(r["step_cpu_s"] for r in rs), total_s=total,
                                     images_per_s=case["batch"] / total,
                                     peak_gib=max(r["peak_gib"] for r in rs), runs=rs)
            if all(impl in row for impl in ("ours", "diffusers")):
                a, b = (torch.load(scratch / f"{impl}-{n}.pt").int() for impl in ("ours", "diffusers"))
                row["max_pixel_diff"] = (a - b).abs().max().item()
            results.append(row)
            print_row(row, impls, header=n == 0)
    finally:
        for w in workers:
            w.close()

    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = dict(machine=info,
                  settings=dict(model=args.model, dtype=args.dtype, device=args.device, steps=args.steps,
                                repeats=args.repeats, warmup=args.warmup, prompt=PROMPT,
                                threads=args.threads or torch.get_num_threads(),
                                compile=args.compile_mode if args.compile else False),
                  load={w.impl: w.load for w in workers}, results=results)
    print()
    print("load: " + ", ".join(f"{w.impl} {w.load['load_s']:.2f} s ({w.load['load_peak_gib']:.2f} GiB peak)"
                                for w in workers))
    m = info
    print(f"{args.dtype} on {m.get('gpu', args.device)}; {m['cpu']}, {m['cores']} cores; torch {m['torch']}"
          + (f", diffusers {m['diffusers']}" if "diffusers" in m else "")
          + f"; median of {args.repeats} after {args.warmup} warm-up; model {args.model}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def print_row(row: dict, impls: list[str], header: bool):
    """One markdown table row per case. `diffusers / ours` above 1 means ours is faster."""
    both = impls == ["ours", "diffusers"]
    if header:
        cols = ["mode", "size", "batch", "queries"]
        cols += [f"{impl} {c}" for impl in impls for c in ("ms/step", "s total", "img/s", "peak GiB")]
        cols += ["step time diffusers / ours", "CPU time diffusers / ours", "max pixel diff"] if both else []
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    queries = len(query_steps(row["steps"], row["queries"])) if MODES[row["mode"]].hooks else 0
    cells = [row["mode"], f"{row['width']}x{row['height']}", str(row["batch"]), str(queries)]
    for impl in impls:
        r = row.get(impl)
        cells += [f"{r['step_ms']:.0f}", f"{r['total_s']:.2f}", f"{r['images_per_s']:.3f}", f"{r['peak_gib']:.2f}"] \
            if r else ["-"] * 4
    if both:
        ratio = lambda key: f"{row['diffusers'][key] / row['ours'][key]:.2f}" if "diffusers" in row else "-"
        cells += [ratio("step_ms"), ratio("step_cpu_ms"), str(row.get("max_pixel_diff", "-"))]
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
