"""Hugging Face hub downloads. Only configs, tokenizers and safetensors weights are fetched, into the
standard cache; huggingface_hub reads HF_TOKEN, HF_HUB_OFFLINE and HF_HUB_ETAG_TIMEOUT itself.

Every failure is one CheckpointError line, within seconds, that says what to do. huggingface_hub's own
first request has no timeout (a hub that accepts the connection and never answers hangs it), so the
hub is asked first, with HF_HUB_ETAG_TIMEOUT, whether the repo exists; when it does not answer, only
the local cache is read.
"""
import importlib
from pathlib import Path

import torch

from checkpoint.tensors import CheckpointError

WEIGHT_FILE_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                     "text_encoder_2": "model"}  # SDXL's second text encoder: only in repos whose config names it

# Where a single file's tokenizer comes from: the hub repo of its text encoder.
# SDXL's two come from its own repo, whose tokenizer_2/ records its "!" padding.
TOKENIZER_REPOS = {"sd1": "openai/clip-vit-large-patch14", "sd2": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                   "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def hub_patterns(dtype: torch.dtype, components=tuple(WEIGHT_FILE_STEMS)) -> list[str]:
    """The files a diffusers repo needs: configs, tokenizer and safetensors weights only (no
    pickles, no safety checker). fp16 variants are taken for half-precision loads."""
    variant = ".fp16" if dtype in (torch.float16, torch.bfloat16) else ""
    weights = [f"{c}/{WEIGHT_FILE_STEMS[c]}{variant}.safetensors*" for c in components]
    return ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "tokenizer/*.json", "tokenizer/*.txt", "text_encoder_2/config.json", "tokenizer_2/*.json",
            "tokenizer_2/*.txt", "scheduler/scheduler_config.json", *weights]


# What to do instead of downloading, appended to each failure of a pipeline's download.
LOCAL_MODEL = ("--model (weights.py export's SOURCE, load_pipeline's source) also takes a local diffusers folder or "
               "a .safetensors file")


def download(repo_id: str, dtype=torch.float32) -> Path:
    """Fetches what `hub_patterns` names and returns the snapshot folder. A component with no fp16
    variant file falls back to its full-precision file."""
    def fetch(patterns):
        path = download_files(repo_id, patterns, LOCAL_MODEL)
        needed = [c for c in WEIGHT_FILE_STEMS if c != "text_encoder_2" or (path / c / "config.json").is_file()]
        return path, [c for c in needed if not any((path / c).glob("*.safetensors*"))]

    path, missing = fetch(hub_patterns(dtype))
    if missing and dtype != torch.float32:
        path, missing = fetch(hub_patterns(torch.float32, missing))
    if missing:
        raise CheckpointError(f"{repo_id}: the repo has no {missing[0]}/*.safetensors; only diffusers-layout repos "
                              "with safetensors weights are supported (or download a .safetensors single file)")
    return path


def download_tokenizer(family: str) -> Path:
    """The folder of the tokenizer files of a family's text encoder, for a single file, which holds none."""
    fix = ("a single file holds no tokenizer: pass --tokenizer DIR (load_pipeline's tokenizer=), a folder with "
           "vocab.json and merges.txt or tokenizer.json, e.g. the tokenizer/ of a diffusers folder"
           + (" (for SDXL a diffusers SDXL folder, with tokenizer/ and tokenizer_2/)" if family == "sdxl" else ""))
    files = ["vocab.json", "merges.txt"]
    if family == "sdxl":
        files = [f"{folder}/{name}" for folder in ("tokenizer", "tokenizer_2")
                 for name in (*files, "special_tokens_map.json", "tokenizer_config.json")]
    return download_files(TOKENIZER_REPOS[family], files, fix)


def download_files(repo_id: str, patterns: list[str], fix: str = "") -> Path:
    """The snapshot folder of `repo_id` holding the files that match `patterns`. Every failure is one
    CheckpointError line, ending in `fix`: what to do instead."""
    from huggingface_hub import snapshot_download

    unreachable = None
    try:
        unreachable = ask_hub(repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=unreachable is not None))
    except network_errors() as e:
        raise CheckpointError(hub_message(e, repo_id, unreachable) + (f"; {fix}" if fix else "")) from None


def ask_hub(repo_id: str) -> str | None:
    """None if the hub answers that `repo_id` exists, else why only the local cache is to be read.
    The hub's word that the repo is missing, private or gated is raised."""
    from huggingface_hub import HfApi, constants, errors

    try:
        HfApi().repo_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except errors.OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except errors.RepositoryNotFoundError:
        raise
    except errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        return f"the hub answered HTTP {status}" if status else "the hub cannot be reached"
    except network_errors():
        return "the hub cannot be reached"
    return None


def network_errors() -> tuple[type[Exception], ...]:
    """What a hub call raises when the network or the hub fails: OSErrors (huggingface_hub's own
    errors, and requests' in its 0.x releases) and the transport errors of httpx2 / httpx, which
    its later releases use and which are not OSErrors."""
    found = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(found)


def hub_message(e: Exception, repo_id: str, unreachable: str | None) -> str:
    """One line for a failed hub download."""
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return f"{repo_id}: the repo is gated; accept its licence on the hub and set HF_TOKEN"
    if isinstance(e, errors.RepositoryNotFoundError):
        return f"{repo_id}: no such repo on the Hugging Face hub (or it is private: set HF_TOKEN)"
    if isinstance(e, errors.LocalEntryNotFoundError):
        return f"{repo_id}: cannot download: {unreachable or 'the hub cannot be reached'} and it is not in the local cache"
    if isinstance(e, errors.EntryNotFoundError):
        return f"{repo_id}: file not found in the repo ({first_line(e)})"
    return f"{repo_id}: download failed: {first_line(e)}"


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
