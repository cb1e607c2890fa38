"""Load time and peak memory of a full SD1.5-size model from a local diffusers folder: ours
(weights.load_pipeline) against diffusers' StableDiffusionPipeline.from_pretrained.

    python benchmarks/load.py [--folder DIR] [--repeats 3] [--dtype fp32] [--json out.json]

The folder is created on first use: the SD1.5 architecture (860M-parameter UNet, 84M VAE, 123M
CLIP text encoder) with random weights, written by diffusers/transformers (test requirements).
Each load runs in a fresh process, so peak RSS is that load's own (ru_maxrss of the child).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOADERS = {
    "ours": "from weights import load_pipeline; p = load_pipeline(FOLDER, dtype=DTYPE)",
    "diffusers": ("from diffusers import StableDiffusionPipeline; "
                  "p = StableDiffusionPipeline.from_pretrained(FOLDER, torch_dtype=DTYPE, safety_checker=None, "
                  "requires_safety_checker=False)"),
}
CHILD = """
import resource, sys, time, torch
torch.set_num_threads(torch.get_num_threads())
FOLDER, DTYPE = sys.argv[1], getattr(torch, sys.argv[2])
start = time.perf_counter()
{load}
seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)
"""


def build(folder: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from checkpoints import SCHEDULER
    from fake_vocab import write_clip_vocab
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(0)
    def randomize(model):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=g)
        return model
    randomize(UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)).save_pretrained(folder / "unet")
    randomize(AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)).save_pretrained(folder / "vae")
    randomize(CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12))).save_pretrained(
        folder / "text_encoder")
    write_clip_vocab(folder / "tokenizer")
    DDIMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/sd15-random")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json")
    args = parser.parse_args()
    folder = Path(args.folder)
    if not (folder / "unet" / "config.json").exists():
        print(f"building a random SD1.5-size checkpoint in {folder} ...", file=sys.stderr)
        build(folder)
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1024 ** 3
    results = {}
    for _ in range(args.repeats):  # interleaved, so both see the same page-cache conditions
        for name, load in LOADERS.items():
            out = subprocess.run([sys.executable, "-c", CHILD.format(load=load), str(folder), args.dtype],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            seconds, rss = map(float, out.stdout.split()[-2:])
            results.setdefault(name, []).append((seconds, rss))
    print(f"{size:.2f} GB of safetensors, dtype {args.dtype}, median of {args.repeats} (warm page cache)")
    print(f"{'loader':<10} {'load s':>8} {'peak RSS GB':>12}")
    table = {}
    for name, runs in results.items():
        table[name] = dict(seconds=statistics.median(s for s, _ in runs), peak_rss_gb=statistics.median(r for _, r in runs))
        print(f"{name:<10} {table[name]['seconds']:>8.2f} {table[name]['peak_rss_gb']:>12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(size_gb=size, dtype=args.dtype, results=table), indent=2))


if __name__ == "__main__":
    main()
