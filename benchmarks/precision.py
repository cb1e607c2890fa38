"""fp16 and bf16 against fp32: how far a low-precision run lands from the fp32 run of the same model.

    python benchmarks/precision.py --device cuda --dtypes fp16,bf16 --size 512 --steps 50 --json gpu-precision.json
    python benchmarks/precision.py --model runwayml/stable-diffusion-v1-5 --device cuda

The model is loaded once in fp32 and cast to each dtype, so every run has the same weights, rounded.
Per dtype it measures, against fp32:

- each model on the same fp32 inputs, cast: the text encoder on the prompt and "", the UNet on
  N(0, 1) latents at t = 500 with those embeddings, the VAE decoder on N(0, 1) latents. The error is
  max |low - fp32| / max |fp32|;
- end to end: `generate` with the same seed, as uint8 images. Low precision changes every step a
  little and the steps compound, so the images are compared by their mean and largest pixel
  difference, in levels of 255.

On a GPU the fp32 run is fp32 throughout: TF32 is turned off for matmuls and convolutions (cuDNN
allows it by default), or the reference itself would carry fp16's 10-bit mantissa. The time of a
run is its model calls and its `generate`, after --warmup untimed steps in that dtype (a GPU loads
each kernel at its first call) and between two synchronisations.

It prints a table, writes JSON, and exits with 1 when a figure is past its tolerance (TOLERANCES) or
a run gives NaN/inf. Without --model it uses the random-weight SD1.5 of bench.py, built in memory,
so it needs no diffusers and no download. Random weights are not trained ones: their activations
have other ranges, so with them this is a check that the low-precision paths work, and a figure to
compare; the tolerances are for trained weights.
"""
import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from bench import IN_MEMORY, PROMPT, machine, random_sd15, sync  # bench puts the repository on sys.path

# Largest accepted error per dtype. Models: max |low - fp32| / max |fp32|. Images: levels of 255.
TOLERANCES = {
    "fp16": dict(text=1e-2, unet=1e-2, vae=1e-2, mean_pixel=2.0),
    "bf16": dict(text=5e-2, unet=5e-2, vae=5e-2, mean_pixel=6.0),
}


def rel_err(low: torch.Tensor, ref: torch.Tensor) -> float:
    low, ref = low.double(), ref.double()
    return ((low - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def cast(pipe, dtype):
    """A copy of `pipe` in `dtype`; the fp32 pipeline is left as it is."""
    models = {name: copy.deepcopy(getattr(pipe, name)).to(dtype) for name in ("text_encoder", "unet", "vae")}
    return dataclasses.replace(pipe, **models)


@torch.no_grad()
def model_outputs(pipe, height: int, width: int, context=None) -> dict[str, torch.Tensor]:
    """Each model's output on fixed fp32 inputs, cast to the pipeline's dtype; returned as fp32.
    The UNet gets `context` (the fp32 run's embeddings), so that its error is its own."""
    g = torch.Generator().manual_seed(0)
    f = pipe.vae_scale
    latents = torch.randn(2, pipe.unet.config.in_channels, height // f, width // f, generator=g)
    z = torch.randn(1, pipe.vae.config.latent_channels, height // f, width // f, generator=g)
    ids = pipe.tokenizer([PROMPT, ""]).to(pipe.device)
    text = pipe.text_encoder(ids)  # [2, 77, D]
    context = text if context is None else context
    eps = pipe.unet(latents.to(pipe.device, pipe.dtype), 500, context.to(pipe.device, pipe.dtype))
    image = pipe.vae.decode(z.to(pipe.device, pipe.dtype))
    return dict(text=text.float().cpu(), unet=eps.float().cpu(), vae=image.float().cpu())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=IN_MEMORY,
                   help="repo id, diffusers folder or .safetensors file (default: random SD1.5 in memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16, bf16 (%(default)s)")
    p.add_argument("--size", type=int, default=512, help="image size, square (%(default)s)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the end-to-end run (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0, help="untimed steps of generate per dtype first (%(default)s)")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    if unknown := [d for d in dtypes if d not in TOLERANCES]:
        p.error(f"--dtypes: unknown {unknown[0]!r}; choose from {', '.join(TOLERANCES)}")
    from checkpoint.tensors import to_dtype
    from sampler.loop import NonFiniteError, generate
    from weights import load_pipeline

    device = torch.device(args.device)
    if device.type == "cuda":  # the reference in IEEE fp32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    pipe = random_sd15(device, torch.float32) if args.model == IN_MEMORY else load_pipeline(args.model, device)
    if args.size % pipe.vae_scale:
        p.error(f"--size must be a multiple of {pipe.vae_scale}")

    def run(pipe, context=None):
        if args.warmup:
            try:
                generate(pipe, PROMPT, steps=args.warmup, height=args.size, width=args.size, progress=False)
            except NonFiniteError:
                pass  # the timed run records it
        sync(device)
        start = time.perf_counter()
        outputs = model_outputs(pipe, args.size, args.size, context)
        try:
            outputs["images"] = generate(pipe, PROMPT, steps=args.steps, height=args.size, width=args.size,
                                         seed=args.seed, progress=False)
        except NonFiniteError as e:
            outputs["images"] = str(e)
        sync(device)
        outputs["seconds"] = time.perf_counter() - start
        return outputs

    reference = run(pipe)
    print("| dtype | text encoder | UNet | VAE decode | mean pixel diff | max pixel diff | s | within tolerance |")
    print("|---|---|---|---|---|---|---|---|")
    results, failed = [], False
    for name in dtypes:
        low = run(cast(pipe, to_dtype(name)), reference["text"])
        row = dict(dtype=name, seconds=low["seconds"], seconds_fp32=reference["seconds"])
        row.update({k: rel_err(low[k], reference[k]) for k in ("text", "unet", "vae")})
        if isinstance(low["images"], str):
            row["error"] = low["images"]
        else:
            diff = (low["images"].int() - reference["images"].int()).abs()
            row.update(mean_pixel=diff.float().mean().item(), max_pixel=diff.max().item())
        tol = TOLERANCES[name]
        past = [k for k in tol if not row.get(k, float("inf")) <= tol[k]]  # NaN and a missing figure fail
        row["past_tolerance"] = past
        failed |= bool(past)
        results.append(row)
        fig = lambda k, fmt: format(row[k], fmt) if k in row else "-"
        print(f"| {name} | {fig('text', '.1e')} | {fig('unet', '.1e')} | {fig('vae', '.1e')} | "
              f"{fig('mean_pixel', '.2f')} | {fig('max_pixel', 'd')} | {row['seconds']:.1f} | "
              f"{'no: ' + ', '.join(past) if past else 'yes'} |", flush=True)
        if "error" in row:
            print(f"{name}: {row['error']}", file=sys.stderr)
    print(f"against fp32 ({reference['seconds']:.1f} s); {args.size}², {args.steps} steps, seed {args.seed}; "
          f"model {args.model}; {args.device}; tolerances {TOLERANCES}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine(args.device), settings=vars(args),
                                                   tolerances=TOLERANCES, results=results), indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
