"""LoRA files, merged into a loaded pipeline's weights (Hu et al. 2022, "LoRA: Low-Rank Adaptation of
Large Language Models", eq. 3):

    W' = W + s · (α / r) · B A,    A: [r, in] (the "down" matrix), B: [out, r] ("up")

per layer it names, with s the scale the user gives, r the rank and α the file's alpha (α = r where
it gives none). Convolutions take A as [r, in, kh, kw] and B as [out, r, 1, 1]: B A is then the
kernel's update. Once merged, sampling costs nothing extra; `Lora.remove()` puts the weights back.
The sum is taken in float32 from the file's matrices and rounded once to the model's dtype; peft,
under diffusers' fuse_lora, holds A and B in a half-precision model's dtype and rounds B A to it
before the sum, so on such a model the two differ by that rounding.

Two formats, as diffusers' load_lora_weights reads them (+ fuse_lora gives the same weights):

    kohya / A1111   lora_unet_<layer>.lora_down.weight, .lora_up.weight, .alpha, with the layer's
                    name joined by "_": diffusers' UNet names (kohya's SD1/SD2 LoRAs) or the original
                    ones (SDXL's: input_blocks_4_1_...), and lora_te_ (lora_te1_, lora_te2_ for
                    SDXL's two encoders) before transformers' text_model_encoder_layers_...
    diffusers/PEFT  unet.<layer>.lora_A.weight / .lora_B.weight (older files: .lora.down/.lora.up,
                    .lora_linear_layer.down/.up), text_encoder. and text_encoder_2.; α and r from the
                    file's lora_adapter_metadata (lora_alpha, r, alpha_pattern, rank_pattern, use_rslora),
                    α = r without it

Where diffusers 0.42 differs, this module follows the formula above (kohya's and A1111's rule):
- a kohya file whose α differs by layer: each layer's own α (diffusers gives some layers, the UNet's
  attention and the text encoder's among them, the file's most common one);
- a 1x1 convolution (SD1's proj_in, proj_out) given [r, in] matrices, or a linear layer (SD2's)
  given [r, in, 1, 1] ones: the same update (diffusers refuses both);
- an SD1/SD2 kohya file in the original names (diffusers maps them for SDXL only and refuses it);
- a diffusers file whose text-encoder adapter holds only MLP layers (diffusers refuses it): merged
  as peft merges it;
- an SDXL kohya file's add_embedding in diffusers' names (lora_unet_add_embedding_linear_1), which
  diffusers drops silently: merged, as diffusers merges the original name (label_emb_0_0).

Matching is strict: every key of the file must name a layer of this model, with both matrices, of
that layer's shape, or the file is refused in one line naming the key, and nothing is merged. The
layer names come from the model itself and from the original-name tables the single-file loader
uses (checkpoint/original.py), so no name is guessed.
"""
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from checkpoint.original import unet_table
from checkpoint.tensors import CheckpointError, read_safetensors, safetensors_header


class LoraError(CheckpointError):
    """A LoRA file that cannot be merged into this model; one line naming the file and the key."""


@dataclass(frozen=True)
class LoraInfo:
    """What an image's metadata records of a LoRA, as A1111 writes it: `<lora:name:scale>` in the
    prompt and "name: hash" in its Lora hashes."""
    name: str  # the file's name without .safetensors
    hash: str  # A1111's short hash: the first 12 hex digits of the SHA-256 of the file after its header
    scale: float

    @property
    def tag(self) -> str:
        return f"<lora:{self.name}:{self.scale:g}>"


@dataclass
class Update:
    """One layer's low-rank update: `down` A [r, in(, kh, kw)], `up` B [out, r(, 1, 1)], `alpha` α."""
    part: str  # "unet", "text_encoder" or "text_encoder_2"
    layer: str  # the module's name in it
    keys: dict[str, str] = field(default_factory=dict)  # "down", "up", "alpha" -> the file's key
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


@dataclass
class Lora:
    """A LoRA merged into `pipe`; `remove()` restores the weights it changed, exactly."""
    pipe: object
    info: LoraInfo
    originals: dict[tuple[str, str], torch.Tensor]  # (part, layer) -> the weight before, on the CPU

    def remove(self):
        """Puts back the weights of before the merge. LoRAs merged after this one must go first."""
        if not self.pipe.loras or self.pipe.loras[-1] is not self.info:
            raise ValueError(f"LoRA {self.info.name} is not the last one merged; remove the later ones first")
        for (part, layer), weight in self.originals.items():
            set_weight(getattr(self.pipe, part).get_submodule(layer), weight)
        self.pipe.loras.pop()


def load_lora(pipe, path, scale: float = 1.0) -> Lora:
    """Merges the LoRA file at `path` into `pipe` at `scale` (s above); returns its handle, and
    records it in pipe.loras. LoraError (one line) for a file this model cannot take."""
    path = Path(path)
    if not math.isfinite(scale):
        raise LoraError(f"{path}: the scale must be a finite number, got {scale}")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: not a .safetensors file; LoRAs are read from safetensors files only")
    updates = read_lora(path, pipe)
    originals = {}
    for u in updates:
        module = getattr(pipe, u.part).get_submodule(u.layer)
        weight = module.state_dict()["weight"]
        originals[(u.part, u.layer)] = weight.to("cpu", copy=True)
        rank = u.down.shape[0]
        factor = scale * (rank if u.alpha is None else u.alpha) / rank
        delta = u.up.flatten(1).to(weight.device, torch.float32) @ u.down.flatten(1).to(weight.device, torch.float32)
        set_weight(module, (weight.float() + factor * delta.reshape(weight.shape)).to(weight.dtype))
    info = LoraInfo(path.name.removesuffix(".safetensors"), short_hash(path), scale)
    pipe.loras.append(info)
    return Lora(pipe, info, originals)


def set_weight(module: nn.Module, weight: torch.Tensor):
    """Copies `weight` into the module's, through load_state_dict: a packed convolution
    (model/packing.py) takes it as a plain one does."""
    module.load_state_dict({**module.state_dict(), "weight": weight.to(module.state_dict()["weight"].device)})


def short_hash(path: Path) -> str:
    """A1111's LoRA hash (kohya's addnet hash): SHA-256 of the file after its safetensors header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Reading a file into updates, strictly

KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
               "lora_te2_": "text_encoder_2"}
KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
PEFT_PARTS = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                 ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
                 ".lora_linear_layer.up.weight": "up"}


def read_lora(path: Path, pipe) -> list[Update]:
    """The updates of a LoRA file, each checked against the layer it names in `pipe`."""
    keys, _ = safetensors_header(path)
    if not keys:
        raise LoraError(f"{path}: holds no tensors")
    kohya = all(k.startswith(tuple(KOHYA_PARTS)) for k in keys)
    if not kohya and not all(k.startswith(tuple(PEFT_PARTS)) for k in keys):
        key = next((k for k in keys if not k.startswith(tuple(KOHYA_PARTS) + tuple(PEFT_PARTS))), None)
        if key is None:  # both formats' keys: diffusers would read one and drop the other
            kohya_key, key = (next(k for k in keys if k.startswith(tuple(p))) for p in (KOHYA_PARTS, PEFT_PARTS))
            raise LoraError(f"{path}: {key} is diffusers' format beside kohya's {kohya_key}; a LoRA file holds one")
        what = "a full model, not a LoRA" if key.startswith(("model.diffusion_model.", "first_stage_model.")) else \
            "a key of neither LoRA format (kohya's lora_unet_/lora_te_, diffusers' unet./text_encoder.)"
        raise LoraError(f"{path}: {key} is {what}")
    parts, suffixes = (KOHYA_PARTS, KOHYA_SUFFIXES) if kohya else (PEFT_PARTS, PEFT_SUFFIXES)
    updates, tables = {}, {}
    for key in keys:
        prefix = max((p for p in parts if key.startswith(p)), key=len)  # text_encoder_2. over text_encoder.
        part = parts[prefix]
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None:
            raise LoraError(f"{path}: {key} is not a LoRA matrix or alpha ({', '.join(suffixes)}); "
                            "DoRA, LoHa, LoKr and other LyCORIS kinds are not supported")
        if getattr(pipe, part, None) is None:
            raise LoraError(f"{path}: {key} is for SDXL's second text encoder, which the {pipe.family} model has not; "
                            "a LoRA for another model family")
        if part not in tables:
            tables[part] = layer_names(pipe, part, kohya)
        name = key[len(prefix):-len(suffix)]
        layer = tables[part].get(name)
        if layer is None:
            raise LoraError(f"{path}: {key} names no layer of the {pipe.family} model's {part}; a LoRA for another "
                            "model family?")
        update = updates.setdefault((part, layer), Update(part, layer))
        kind = suffixes[suffix]
        if kind in update.keys:
            raise LoraError(f"{path}: {key} and {update.keys[kind]} are both the {kind} of {part} layer {layer}")
        update.keys[kind] = key
    tensors = read_safetensors(path)
    alphas = None if kohya else peft_alphas(path)
    for u in updates.values():
        for kind, key in u.keys.items():
            if kind == "alpha" and tensors[key].numel() != 1:
                raise LoraError(f"{path}: {key} holds {tensors[key].numel()} values; an alpha is one number")
            if not torch.isfinite(tensors[key]).all():
                raise LoraError(f"{path}: {key} holds NaN or infinite values; a damaged LoRA")
            setattr(u, kind, tensors[key].float().item() if kind == "alpha" else tensors[key])
        check_shapes(path, pipe, u)
        if alphas is not None:
            u.alpha = alphas(u)
    return list(updates.values())


def check_shapes(path: Path, pipe, u: Update):
    """Both matrices present, of one rank, and of the layer's shape."""
    for kind in ("down", "up"):
        if kind not in u.keys:
            raise LoraError(f"{path}: {next(iter(u.keys.values()))} has no {kind} matrix beside it")
    weight = getattr(pipe, u.part).get_submodule(u.layer).state_dict()["weight"]
    down, up = u.down, u.up
    if down.ndim and down.shape[0] == 0:
        raise LoraError(f"{path}: {u.keys['down']} has rank 0 (no rows); a LoRA's rank is at least 1")
    fits = (down.ndim in (2, 4) and up.ndim in (2, 4) and up.shape[0] == weight.shape[0]
            and up.shape[1] == down.shape[0] and up.shape[2:] in ((), (1, 1))
            and down.flatten(1).shape[1] == weight[0].numel() and (down.ndim == 2 or down.shape[2:] == weight.shape[2:]
                                                                   or weight.ndim == 2 and down.shape[2:] == (1, 1)))
    if not fits:
        raise LoraError(f"{path}: {u.keys['down']} and its pair are {list(down.shape)} and {list(up.shape)}, which do not "
                        f"fit the {pipe.family} model's {u.part} layer {u.layer} {list(weight.shape)}; a LoRA for "
                        "another model family")


def layer_names(pipe, part: str, kohya: bool) -> dict[str, str]:
    """The names a LoRA file may give each Linear or Conv2d layer of `part` -> its module name. kohya
    joins a name with "_": the UNet's by diffusers' names or the original ones (checkpoint/original.py),
    a text encoder's after transformers' `text_model`. diffusers' files give module names, a text
    encoder's with or without `text_model.`."""
    layers = [name for name, m in getattr(pipe, part).named_modules() if not list(m.children())
              and not isinstance(m, nn.Embedding) and getattr(m, "weight", None) is not None and m.weight.ndim in (2, 4)]
    names = {}
    if part == "unet":
        original = unet_table(pipe.unet.config)
        for layer in layers:
            spellings = [layer, original[f"{layer}.weight"].key.removesuffix(".weight")]
            for s in spellings:
                names[s.replace(".", "_") if kohya else s] = layer
    else:
        for layer in layers:
            if kohya:
                names[f"text_model_{layer}".replace(".", "_")] = layer
            else:
                names[layer] = names[f"text_model.{layer}"] = layer
    return names


def peft_alphas(path: Path):
    """update -> α for a diffusers/PEFT file: its lora_adapter_metadata's lora_alpha, or the
    alpha_pattern entry that matches the layer (peft's get_pattern_key), over r likewise; with
    use_rslora, α/√r is what multiplies. Without metadata, α = r (scale 1)."""
    text = safetensors_header(path)[1].get("lora_adapter_metadata")
    try:
        metadata = json.loads(text) if text else {}
    except (ValueError, RecursionError) as e:  # RecursionError: nested past Python's limit
        raise LoraError(f"{path}: its lora_adapter_metadata is not JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise LoraError(f"{path}: its lora_adapter_metadata is not a JSON object")

    def alpha(u: Update) -> float:
        rank = u.down.shape[0]
        config = {k.removeprefix(f"{u.part}."): v for k, v in metadata.items() if k.startswith(f"{u.part}.")}
        if not config:
            return rank
        if config.get("use_dora") or config.get("lora_bias"):
            raise LoraError(f"{path}: its {u.part} adapter uses {'DoRA' if config.get('use_dora') else 'a LoRA bias'}, "
                            "which is not supported")
        a = setting(path, u, config, "lora_alpha", "alpha_pattern")
        r = setting(path, u, config, "r", "rank_pattern")
        if r != rank:
            raise LoraError(f"{path}: {u.keys['down']} has rank {rank}, its metadata says {r}")
        return a * math.sqrt(rank) if config.get("use_rslora") else a  # α/√r = (α√r)/r

    return alpha


def setting(path: Path, u: Update, config: dict, name: str, patterns: str) -> float:
    """config[name] (default: u's rank) for u's layer, or the value of the first entry of
    config[patterns] that matches the end of the layer's name (peft's get_pattern_key); a finite number."""
    table = config.get(patterns) or {}
    if not isinstance(table, dict):
        raise LoraError(f"{path}: its {u.part}.{patterns} is not a JSON object of pattern: value")
    what, value = f"{u.part}.{name}", config.get(name, u.down.shape[0])
    for key, v in table.items():
        if re.search(r"\)[*+?{]", key) or len(re.findall(r"[*+?{]", key)) > 2:  # re has no timeout
            raise LoraError(f"{path}: its {u.part}.{patterns} key {key!r} repeats a group, or more than twice: a "
                            "pattern that can take longer than any run to match; give the layer's name")
        try:
            matches = re.match(rf"(.*\.)?({key})$", u.layer)
        except re.error as e:
            raise LoraError(f"{path}: its {u.part}.{patterns} key {key!r} is not a regular expression ({e})") from None
        if matches:
            what, value = f"{u.part}.{patterns} value", v
            break
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraError(f"{path}: its {what} {value!r} is not a finite number")
    return value
