"""The peak memory of one UNet call and of one VAE decode, measured, beside sampler/memory.py's
estimate of it, which generate() checks against the device's free memory before sampling: the
estimate must not be below what the call takes.

    python benchmarks/memory_peaks.py [--cases unet:2:64,vae:1:512] [--device cpu] [--dtype fp32]

A case is unet:ROWS:LATENTS, SD1.5's UNet over ROWS rows of LATENTS x LATENTS latents, or
vae:IMAGES:PIXELS, SD's VAE decoding IMAGES images of PIXELS x PIXELS. The weights keep their
default initialisation: memory does not depend on the values. Each case runs in a fresh process,
after a small warm-up call; its peak is how far the call raises the peak RSS (CPU) or
torch.cuda.max_memory_allocated (CUDA) above where it was before.
"""
import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = "unet:2:64,unet:16:32,unet:2:128,vae:1:512,vae:4:256,vae:1:1024"

CHILD = """
import sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
from bench import peak_gib, reset_peak, sync
from checkpoint.tensors import to_dtype
from model.unet import SD15, UNet
from model.vae import SD, AutoencoderKL
from sampler.memory import unet_bytes, vae_bytes
what, n, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
device, dtype = torch.device(sys.argv[5]), to_dtype(sys.argv[6])
scores = device.type not in ("cpu", "cuda")
randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)
with torch.no_grad():
    if what == "unet":
        model = UNet(SD15).to(device, dtype).eval()
        call = lambda k: model(randn(n, 4, k, k), 999, randn(n, 77, 768))
        estimate, latents = unet_bytes(SD15, n, size, size, dtype.itemsize, scores), size
    else:
        model = AutoencoderKL(SD).to(device, dtype).eval()
        call = lambda k: model.decode(randn(n, 4, k, k))
        estimate, latents = vae_bytes(SD, n, size, size, dtype.itemsize, scores), size // 8
    call(8)
    sync(device)
    reset_peak(device)
    before = peak_gib(device)
    call(latents)
    sync(device)
print("BENCH", peak_gib(device) - before, estimate / 2**30)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=CASES, help="comma-separated unet:ROWS:LATENTS or vae:IMAGES:PIXELS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    args = p.parse_args()
    print("| case | measured GiB | estimate GiB | estimate / measured |\n|---|---|---|---|", flush=True)
    for case in args.cases.split(","):
        what, n, size = case.split(":")
        out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), what, n, size, args.device, args.dtype],
                             capture_output=True, text=True, check=True).stdout
        measured, estimate = map(float, out.split("BENCH")[1].split())
        name = f"UNet, {n} rows of {size}² latents" if what == "unet" else f"VAE decode, {n} x {size}²"
        print(f"| {name} | {measured:.3f} | {estimate:.3f} | {estimate / measured:.2f} |", flush=True)


if __name__ == "__main__":
    main()
