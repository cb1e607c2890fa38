"""Hugging Face hub downloads. Only configs, tokenizers and safetensors weights are fetched, into the
standard cache; huggingface_hub reads HF_TOKEN and HF_HUB_OFFLINE itself. Every failure is one
CheckpointError line that says what to do."""
import os
import re
from pathlib import Path

import torch

from checkpoint.tensors import CheckpointError

WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}

# Where a single file's tokenizer comes from: the hub repo of its text encoder.
TOKENIZER_REPOS = {"sd1": "openai/clip-vit-large-patch14", "sd2": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}


def looks_like_repo_id(s: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not s.startswith((".", "/"))


def hub_patterns(dtype: torch.dtype, components=tuple(WEIGHTS)) -> list[str]:
    """The files a diffusers repo needs: configs, tokenizer and safetensors weights only (no
    pickles, no safety checker). fp16 variants are taken for half-precision loads."""
    variant = ".fp16" if dtype in (torch.float16, torch.bfloat16) else ""
    weights = [f"{c}/{WEIGHTS[c]}{variant}.safetensors*" for c in components]
    return ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "tokenizer/*.json", "tokenizer/*.txt", "scheduler/scheduler_config.json", *weights]


def download(repo_id: str, dtype=torch.float32) -> Path:
    """Fetches what `hub_patterns` names and returns the snapshot folder. A component with no fp16
    variant file falls back to its full-precision file."""
    from huggingface_hub import snapshot_download

    def fetch(patterns):
        path = Path(hub_fetch(lambda: snapshot_download(repo_id, allow_patterns=patterns), repo_id))
        return path, [c for c in WEIGHTS if not any((path / c).glob("*.safetensors*"))]

    path, missing = fetch(hub_patterns(dtype))
    if missing and dtype != torch.float32:
        path, missing = fetch(hub_patterns(torch.float32, missing))
    if missing:
        raise CheckpointError(f"{repo_id}: the repo has no {missing[0]}/*.safetensors; only diffusers-layout repos "
                              "with safetensors weights are supported (or download a .safetensors single file)")
    return path


def download_files(repo_id: str, patterns: list[str]) -> Path:
    """The snapshot folder of `repo_id` holding the files that match `patterns`."""
    from huggingface_hub import snapshot_download

    return Path(hub_fetch(lambda: snapshot_download(repo_id, allow_patterns=patterns), repo_id))


def download_tokenizer(family: str) -> Path:
    """The folder of the tokenizer files of a family's text encoder."""
    return download_files(TOKENIZER_REPOS[family], ["vocab.json", "merges.txt"])


def hub_fetch(fetch, repo_id: str):
    """Runs a hub download and turns its failures into one-line CheckpointErrors."""
    from huggingface_hub import errors

    try:
        return fetch()
    except errors.GatedRepoError:
        raise CheckpointError(f"{repo_id}: the repo is gated; accept its licence on the hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such repo on the Hugging Face hub (or it is private: set HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
            "the hub cannot be reached and it is not in the local cache"
        raise CheckpointError(f"{repo_id}: cannot download: {why}") from None
    except errors.EntryNotFoundError as e:
        raise CheckpointError(f"{repo_id}: file not found in the repo ({str(e).splitlines()[0]})") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{repo_id}: download failed: {str(e).splitlines()[0]}") from None
