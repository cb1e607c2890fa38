"""SDXL's UNet: our step time and peak memory against diffusers' UNet2DConditionModel, on the same
random weights, loaded from the same diffusers folder.

    python benchmarks/sdxl.py                                     # SDXL base's UNet, 64x64 latents, batch 2
    python benchmarks/sdxl.py --latent 128 --rounds 1 --steps 1   # 1024² images
    python benchmarks/sdxl.py --impls ours,plain,bf16,diffusers --json benchmarks/results/cpu-sdxl.json
    python benchmarks/sdxl.py --device cuda --impls fp16,diffusers-fp16 --latent 128 --steps 5
    python benchmarks/sdxl.py --rounds 0                          # write the folder only

The folder (--folder) is written once: stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
and N(0, 0.02) weights in fp32, in shards of about 2 GB with diffusers' index file (a shard at a time
is in memory while writing). Each run is a fresh process that
  1. loads the UNet: ours as weights.load_pipeline does (checkpoint/folder.py:read_component maps
     each tensor of the files, checkpoint/tensors.py:load_strict assigns them, then the convolutions
     are packed for fp32 on the CPU, model/packing.py), diffusers with from_pretrained;
  2. calls it once at batch --batch (CFG's two branches) on --latent² latents with SDXL's added
     conditioning (pooled text embedding and size ids). Recorded: the time of load and of this first
     call, the peak RSS of the process at that point, and its RSS split into anonymous memory and
     mapped file pages; on a GPU also torch.cuda.max_memory_allocated, the peak of load and first call;
  3. calls it --steps more times on the same inputs: the median wall and CPU time of a call is the step
     (on a GPU each call is timed between two torch.cuda.synchronize).
The implementations take turns, one fresh process each (ours, diffusers, ours, diffusers, ...), so
that all see the same machine load; the load average is recorded before and after each run. The
first call's output of each implementation is compared with diffusers': the largest absolute difference,
over the largest absolute value of diffusers' output.

Implementations: ours (fp32, packed convolutions: load_pipeline's default on the CPU), plain (ours,
fp32, pack=False), bf16 and fp16 (ours in bfloat16, float16), diffusers (fp32), diffusers-bf16,
diffusers-fp16. On a GPU nothing is packed, as load_pipeline packs on the CPU only: ours is plain.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import machine, sync  # noqa: E402
from checkpoint.hub import WEIGHT_FILE_STEMS  # noqa: E402

IMPLS = ("ours", "plain", "bf16", "fp16", "diffusers", "diffusers-bf16", "diffusers-fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # an implementation's suffix -> its dtype; else fp32
UNET_FILE_STEM = WEIGHT_FILE_STEMS["unet"]  # diffusion_pytorch_model
SHARD_BYTES = 2 * 1024 ** 3

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: its values that differ from
# UNet2DConditionModel's defaults (tests/test_unet.py pins model/unet.py:SDXL to them).
SDXL_UNET = dict(
    block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    sample_size=128,
)
# The same structure, small, for a smoke test: pooled width 32 plus six 16-d ids.
SMALL_UNET = dict(SDXL_UNET, block_out_channels=[64, 64, 128], attention_head_dim=[1, 1, 2], cross_attention_dim=64,
                  transformer_layers_per_block=[1, 2, 2], addition_time_embed_dim=16,
                  projection_class_embeddings_input_dim=32 + 6 * 16, sample_size=8)
CONFIGS = {"sdxl": SDXL_UNET, "small": SMALL_UNET}


def write_folder(folder: Path, config: dict, seed: int = 0):
    """A diffusers UNet folder with N(0, 0.02) fp32 weights, each tensor drawn in turn in key order
    from one generator, written in shards of about SHARD_BYTES."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet2DConditionModel(**config).state_dict().items()}
    shards, size = [[]], 0
    for k in sorted(shapes):
        if size > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += 4 * math.prod(shapes[k])
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = [f"{UNET_FILE_STEM}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        save_file({k: torch.empty(shapes[k]).normal_(0, 0.02, generator=g) for k in keys}, str(folder / name),
                  metadata={"format": "pt"})
    total = sum(4 * math.prod(s) for s in shapes.values())
    weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
    (folder / f"{UNET_FILE_STEM}.safetensors.index.json").write_text(
        json.dumps(dict(metadata=dict(total_size=total), weight_map=weight_map), indent=1))
    (folder / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DConditionModel"), indent=1))


def load(impl: str, folder: Path, device: torch.device):
    """-> unet(x, t, context, pooled, time_ids) -> noise prediction, and the dtype of its inputs."""
    dtype = next((d for suffix, d in DTYPES.items() if impl.endswith(suffix)), torch.float32)
    if impl.startswith("diffusers"):
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval().requires_grad_(False)
        return (lambda x, t, c, p, ids: unet(x, t, encoder_hidden_states=c,
                                            added_cond_kwargs={"text_embeds": p, "time_ids": ids}).sample), dtype
    from checkpoint.configs import read_config, unet_config_from_diffusers
    from checkpoint.folder import read_component
    from checkpoint.tensors import load_strict
    from model.packing import pack_convolutions
    from model.unet import UNet

    config = read_config(folder / "config.json", unet_config_from_diffusers)
    unet = load_strict(UNet, config, read_component(folder, UNET_FILE_STEM, device, dtype), str(folder))
    if impl == "ours" and device.type == "cpu":
        pack_convolutions(unet)
    return (lambda x, t, c, p, ids: unet(x, t, c, pooled=p, time_ids=ids)), dtype


def worker(args) -> dict:
    from load import memory_gib
    if args.worker.startswith("diffusers"):
        import diffusers.models.unets.unet_2d_condition  # noqa: F401  imports before the clock starts
    else:
        import checkpoint.folder, model.packing  # noqa: F401, E401
    folder, device = Path(args.folder), torch.device(args.device)
    config = json.loads((folder / "config.json").read_text())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()  # the CUDA context is not part of the load
    start = time.perf_counter()
    unet, dtype = load(args.worker, folder, device)
    sync(device)
    loaded = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    size = 8 * args.latent
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(device, dtype)
    context = torch.randn(args.batch, 77, config["cross_attention_dim"], generator=g).to(device, dtype)
    pooled_width = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    pooled = torch.randn(args.batch, pooled_width, generator=g).to(device, dtype)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * args.batch, dtype=dtype, device=device)
    with torch.no_grad():
        out = unet(x, 999, context, pooled, time_ids)  # the first call: packs, pages the weights in
        sync(device)
        first = time.perf_counter()
        memory = memory_gib()
        gpu = dict(peak_gpu_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30) if cuda else {}
        if args.save:
            from safetensors.torch import save_file
            save_file({"out": out.float().contiguous()}, args.save)
        wall, cpu = [], []
        for _ in range(args.steps):
            w0, c0 = time.perf_counter(), time.process_time()
            unet(x, 999, context, pooled, time_ids)
            sync(device)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    if cuda:
        gpu["peak_gpu_after_steps_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return dict(load_s=loaded - start, first_call_s=first - loaded, peak_rss_gib=memory["peak"],
                anon_gib=memory["anon"], file_gib=memory["file"], peak_rss_after_steps_gib=memory_gib()["peak"], **gpu,
                step_s=statistics.median(wall) if wall else None, step_cpu_s=statistics.median(cpu) if cpu else None,
                step_runs_s=wall)


def run(impl: str, args, save: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--folder", args.folder, "--latent", str(args.latent),
           "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device, "--save", save]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    before = os.getloadavg()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{impl} failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), load_average_before=before,
                load_average_after=os.getloadavg())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/sdxl-unet-random",
                   help="the random-weight UNet folder, written on first use (%(default)s)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="sdxl",
                   help="the UNet written to a new --folder: SDXL base's, or a small one of its structure "
                        "(%(default)s)")
    p.add_argument("--latent", type=int, default=64, help="latent height and width: image size / 8 (%(default)s)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch; 2 is one image with CFG (%(default)s)")
    p.add_argument("--steps", type=int, default=2, help="timed calls after the first, per run (%(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of each implementation, taking turns (%(default)s); 0 writes the folder only")
    p.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    p.add_argument("--impls", default="ours,diffusers", help=f"comma list of {', '.join(IMPLS)} (%(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads in each run (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="write the settings, every run and the medians here")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    impls = args.impls.split(",")
    if unknown := [i for i in impls if i not in IMPLS]:
        p.error(f"unknown implementation {unknown[0]}; choose from {', '.join(IMPLS)}")
    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        print(f"writing a random {args.config} UNet to {folder} (once) ...", file=sys.stderr)
        write_folder(folder, CONFIGS[args.config])
    if args.rounds == 0:
        return

    scratch = Path(tempfile.mkdtemp())
    runs = {impl: [] for impl in impls}
    for r in range(args.rounds):
        for impl in impls:
            runs[impl].append(run(impl, args, str(scratch / f"{impl}.safetensors")))
            x = runs[impl][-1]
            step = f"step {x['step_s']:.2f} s (CPU {x['step_cpu_s']:.2f} s)" if x["step_s"] else "no timed step"
            print(f"  round {r + 1} {impl:<14} load {x['load_s']:.1f} s, first call {x['first_call_s']:.1f} s, "
                  f"peak {x['peak_rss_gib']:.2f} GiB, {step}; load average {x['load_average_before'][0]:.1f} -> "
                  f"{x['load_average_after'][0]:.1f}", file=sys.stderr)
    keys = ["load_s", "first_call_s", "peak_rss_gib", "anon_gib", "file_gib"] \
        + (["peak_gpu_gib"] if args.device.startswith("cuda") else []) \
        + (["step_s", "step_cpu_s"] if args.steps else [])
    medians = {impl: {k: statistics.median(x[k] for x in rs) for k in keys} for impl, rs in runs.items()}
    from safetensors.torch import load_file
    outputs = {impl: load_file(str(scratch / f"{impl}.safetensors"))["out"] for impl in impls}
    reference = next((i for i in ("diffusers", "diffusers-bf16", "diffusers-fp16") if i in impls), impls[0])
    for impl in impls:
        diff = (outputs[impl] - outputs[reference]).abs().max() / outputs[reference].abs().max()
        medians[impl]["rel_diff_to_" + reference] = diff.item()
    ratios = {impl: {k: medians[impl][k] / medians[reference][k] for k in keys} for impl in impls if impl != reference}

    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1024 ** 3
    print(f"{size:.2f} GiB of fp32 safetensors; batch {args.batch} on {args.latent}x{args.latent} latents; "
          f"{torch.get_num_threads()} threads; medians of {args.rounds} rounds, step: median of {args.steps} calls")
    print("| impl | " + " | ".join(keys) + f" | max diff / max |{reference}| |")
    print("|---" * (len(keys) + 2) + "|")
    for impl, m in medians.items():
        print(f"| {impl} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + f" | {m['rel_diff_to_' + reference]:.1e} |")
    for impl, r in ratios.items():
        print(f"{impl} / {reference}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            settings=dict(config=json.loads((folder / "config.json").read_text()), size_gib=size, latent=args.latent,
                          batch=args.batch, steps=args.steps, rounds=args.rounds, threads=torch.get_num_threads(),
                          device=args.device),
            machine=machine(args.device),
            medians=medians, ratios_to_reference=ratios, reference=reference, runs=runs), indent=2))


if __name__ == "__main__":
    main()
