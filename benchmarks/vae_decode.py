"""VAE decode time and peak memory: `decode` against `decode_tiled`, and how far apart they are.

    python benchmarks/vae_decode.py [--sizes 512,1024] [--tile 64] [--overlap 16] [--device cpu] [--dtype fp32]

The SD VAE (84M parameters) with random weights (every tensor, norms and biases included), decoding
N(0, 1) latents; `--config small` is its structure at 32 channels, for a smoke test. Each decode
runs in a fresh process, so its peak memory is its own: peak RSS on CPU, torch.cuda.max_memory_allocated
on GPU, where an untimed decode first loads the kernels and the timed one runs between two
synchronisations. The difference is max |tiled - untiled| / max |untiled| and the same with the
mean; see model/vae_tiled.py for why they differ at all. It exits with 1 if a decode failed.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.vae import SD, VAEConfig  # noqa: E402

# The SD VAE, and its structure (four levels, two resnets a level) at 32 channels, for a smoke test.
CONFIGS = {"sd": SD, "small": VAEConfig(channels=(32, 32, 32, 32))}

CHILD = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from bench import peak_gib, reset_peak, sync
from checkpoint.tensors import to_dtype
from model.vae import AutoencoderKL
from model.vae_tiled import decode_tiled
from random_weights import randomize_
from vae_decode import CONFIGS
config, size, method, tile, overlap, device, dtype, out = sys.argv[2:]
device, dtype = torch.device(device), to_dtype(dtype)
vae = randomize_(AutoencoderKL(CONFIGS[config]), 0).to(device, dtype).requires_grad_(False).eval()
f = 2 ** (len(vae.config.channels) - 1)
z = torch.randn(1, 4, int(size) // f, int(size) // f, generator=torch.Generator().manual_seed(0)).to(device, dtype)
run = lambda: vae.decode(z) if method == "decode" else decode_tiled(vae, z, int(tile), int(overlap))
with torch.no_grad():
    if device.type == "cuda":  # kernels load at their first call
        run()
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    images = run()
    sync(device)
seconds = time.perf_counter() - start
torch.save(images.float().cpu(), out)
print("BENCH", seconds, peak_gib(device))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="512,1024", help="image sizes (square), comma-separated (%(default)s)")
    p.add_argument("--tile", type=int, default=64, help="tile, in latent pixels (%(default)s)")
    p.add_argument("--overlap", type=int, default=16, help="overlap, in latent pixels (%(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--config", choices=sorted(CONFIGS), default="sd", help="the VAE: SD's, or small (%(default)s)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp())
    print("| size | decode s | decode peak GiB | tiled s | tiled peak GiB | max diff | mean diff |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for size in map(int, args.sizes.split(",")):
        row = dict(size=size)
        for method in ("decode", "decode_tiled"):
            out = scratch / f"{method}-{size}.pt"
            run = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), args.config, str(size), method,
                                  str(args.tile), str(args.overlap), args.device, args.dtype, str(out)],
                                 cwd=ROOT / "benchmarks", capture_output=True, text=True)
            if run.returncode:
                why = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
                print(f"{method} at {size}²: failed ({why})", file=sys.stderr)
                row[f"{method}_error"] = why
                continue
            seconds, peak = map(float, run.stdout.split("BENCH")[-1].split())
            row[method] = dict(seconds=seconds, peak_gib=peak)
        if "decode" in row and "decode_tiled" in row:
            exact, tiled = (torch.load(scratch / f"{m}-{size}.pt") for m in ("decode", "decode_tiled"))
            row["max_diff"] = ((tiled - exact).abs().max() / exact.abs().max()).item()
            row["mean_diff"] = ((tiled - exact).abs().mean() / exact.abs().max()).item()
        cell = lambda m, k: f"{row[m][k]:.2f}" if m in row else "failed"
        diff = lambda k: f"{row[k]:.1e}" if k in row else "-"
        print(f"| {size}² | {cell('decode', 'seconds')} | {cell('decode', 'peak_gib')} | "
              f"{cell('decode_tiled', 'seconds')} | {cell('decode_tiled', 'peak_gib')} | "
              f"{diff('max_diff')} | {diff('mean_diff')} |", flush=True)
        results.append(row)
    print(f"tile {args.tile}, overlap {args.overlap} (latent pixels); {args.dtype} on {args.device}; "
          f"torch {torch.__version__}")
    if args.json:
        from bench import machine
        Path(args.json).write_text(json.dumps(dict(settings=vars(args), machine=machine(args.device), results=results),
                                              indent=2))
    return 1 if any(k.endswith("_error") for row in results for k in row) else 0


if __name__ == "__main__":
    sys.exit(main())
