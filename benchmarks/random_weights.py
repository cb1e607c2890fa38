"""Random Stable Diffusion weights and a tokenizer, so that the benchmarks need no download and no
test code. Random weights give real speed and memory figures, and two implementations can be
compared on the same weights; the images they make are noise.

    normal_(model, generator)   every parameter N(0, 0.02^2): a full-size model that stays finite
    randomize_(model, seed)     every parameter on the scale a layer expects, gains near 1
    write_byte_tokenizer(dir)   a CLIP tokenizer folder that tokenizes any prompt, with no merges
    SCHEDULER                   SD 1.x/2.x's noise schedule, as diffusers' DDIMScheduler takes it
"""
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
