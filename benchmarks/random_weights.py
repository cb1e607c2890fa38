"""Random Stable Diffusion weights and a tokenizer, so that the benchmarks need no download and no
test code. Random weights give real speed and memory figures, and two implementations can be
compared on the same weights; the images they make are noise.

    normal_(model, generator)   every parameter N(0, 0.02^2): a full-size model that stays finite
    randomize_(model, seed)     every parameter on the scale a layer expects, gains near 1
    write_byte_tokenizer(dir)   a CLIP tokenizer folder that tokenizes any prompt, with no merges
    write_sd_folder(dir)        the SD1.5 layout with N(0, 0.02) weights, as diffusers saves it
    SCHEDULER                   SD 1.x/2.x's noise schedule, as diffusers' DDIMScheduler takes it

    python benchmarks/random_weights.py /tmp/sd15-random            # 3.97 GiB of fp32 safetensors
    python benchmarks/random_weights.py /tmp/sd15-tiny --tiny       # its structure, tiny: smoke tests
"""
import argparse
import json
import math
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)


def normal_(model: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> torch.nn.Module:
    """Fill every parameter, norms and biases included, with N(0, std^2) drawn from `generator`
    (which must be on the parameters' device)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std, generator=generator)
    return model


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with random values, norms and biases included,
    so that a swapped, transposed or missing tensor changes the output.

    Matrices get N(0, 1/fan_in); 1-D gains (``*.weight``) get N(1, 0.1);
    everything else (biases, class embeddings) N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def write_byte_tokenizer(folder, model_max_length: int = 77) -> Path:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) and return its
    path. The vocabulary is the 256 byte-level characters, each also with the end-of-word "</w>",
    then <|startoftext|> and <|endoftext|>; there are no merges, so every UTF-8 byte of a word is
    one token. Ours (model.tokenizer) and transformers' CLIPTokenizer read it alike."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=model_max_length,
                  tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# The SD1.5 layout (stable-diffusion-v1-5's configs: their values that differ from diffusers' and
# transformers' defaults), and TINY: the same structure (four VAE levels, so 8 pixels per latent;
# cross-attention in the UNet; a quick_gelu text tower) at widths that run in moments on a CPU.
SD15 = dict(
    unet=dict(cross_attention_dim=768, attention_head_dim=8),
    vae=dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768),
)
TINY = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              sample_size=8),
    vae=dict(block_out_channels=(32, 32, 32, 32), latent_channels=4, layers_per_block=1, sample_size=64),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
)


def write_sd_folder(folder, tiny: bool = False) -> Path:
    """A diffusers StableDiffusionPipeline folder with N(0, 0.02) weights, written by diffusers and
    transformers: the SD1.5 layout (860M-parameter UNet, 84M VAE, 123M text encoder), or TINY. Its
    tokenizer is `write_byte_tokenizer`'s. Returns the folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder, spec = Path(folder), TINY if tiny else SD15
    g = torch.Generator().manual_seed(0)
    vocab = json.loads((write_byte_tokenizer(folder / "tokenizer") / "vocab.json").read_text())
    normal_(UNet2DConditionModel(**spec["unet"]), g).save_pretrained(folder / "unet")
    vae = dict(down_block_types=("DownEncoderBlock2D",) * len(spec["vae"]["block_out_channels"]),
               up_block_types=("UpDecoderBlock2D",) * len(spec["vae"]["block_out_channels"]), **spec["vae"])
    normal_(AutoencoderKL(**vae), g).save_pretrained(folder / "vae")
    text = CLIPTextConfig(hidden_act="quick_gelu", max_position_embeddings=77, bos_token_id=vocab[BOS],
                          eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], **spec["text"])
    normal_(CLIPTextModel(text), g).save_pretrained(folder / "text_encoder")
    DDIMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))
    return folder


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Write a random-weight SD1.5-layout diffusers folder.")
    p.add_argument("folder")
    p.add_argument("--tiny", action="store_true", help="the same structure, tiny (for smoke tests)")
    args = p.parse_args()
    print(write_sd_folder(args.folder, args.tiny))
