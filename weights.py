"""Loading Stable Diffusion 1.x / 2.x weights from safetensors, strictly.

    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")   # a Hugging Face repo id
    pipe = load_pipeline("path/to/diffusers-folder")                        # unet/, vae/, text_encoder/, ...
    pipe = load_pipeline("v1-5-pruned-emaonly.safetensors")                 # an original single file

Our modules use diffusers' / transformers' parameter names, so a diffusers folder loads almost as
is. Original single files (CompVis / Stability key names) go through one table per model, built
with loops from the model's config (`unet_table`, `vae_table`, `text_table`). Each table maps our
key to the original key, plus how the tensor is stored there: `to_ours` and `to_original` are the
only places where tensors are reshaped or split. The exporter writes single files with the same
tables, inverted.

Tensors are read one at a time, straight to the target device and dtype, into models built on the
meta device, so loading never holds a second full copy of the weights.

Command line: `python weights.py export SOURCE OUT.safetensors [--dtype fp16]` writes a single file.
"""
import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.clip import SD2_TEXT, CLIPTextConfig, CLIPTextModel
from model.tokenizer import Tokenizer
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig
from sampler.ddim import SchedulerConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why and what to do, in one line."""


# ---------------------------------------------------------------------------------------------
# The pipeline object

@dataclass
class Pipeline:
    tokenizer: Tokenizer  # list[str] -> LongTensor[B, 77] (its max_length)
    text_encoder: CLIPTextModel  # ids -> [B, 77, D]
    unet: UNet  # (latents[B, 4, h, w], t, context[B, 77, D]) -> [B, 4, h, w]
    vae: AutoencoderKL  # decode(latents) -> images in [-1, 1]; encode(images) -> latents
    scheduler: SchedulerConfig
    family: str  # "sd1" or "sd2"
    name: str  # where it came from, for image metadata

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel: 8 in SD."""
        return 2 ** (len(self.vae.config.channels) - 1)

    @property
    def default_size(self) -> int:
        return self.vae_scale * self.unet.config.sample_size

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype


def load_pipeline(source, device="cpu", dtype=torch.float32, tokenizer=None, prediction_type=None) -> Pipeline:
    """Loads a repo id, a diffusers folder or an original single .safetensors file.

    `tokenizer` is a tokenizer folder (vocab.json + merges.txt, or tokenizer.json); single files need
    one, and without it the matching text encoder's tokenizer is downloaded. `prediction_type`
    ("epsilon" or "v") overrides the scheduler's, since single files do not record it."""
    device, dtype = torch.device(device), to_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_file():
        pipe = _load_single_file(path, device, dtype, tokenizer, prediction_type)
    elif path.is_dir():
        pipe = _load_folder(path, device, dtype, tokenizer)
    elif looks_like_repo_id(str(source)):
        pipe = _load_folder(download(str(source), dtype), device, dtype, tokenizer)
        pipe.name = str(source)
    else:
        raise CheckpointError(f"{source}: no such file or folder, and not a Hugging Face repo id (org/name)")
    if prediction_type is not None:
        pipe.scheduler.prediction_type = {"v": "v_prediction", "eps": "epsilon"}.get(prediction_type, prediction_type)
    if pipe.text_encoder.config.width != pipe.unet.config.context_dim:
        raise CheckpointError(
            f"{source}: the text encoder's width {pipe.text_encoder.config.width} does not match the UNet's "
            f"cross-attention width {pipe.unet.config.context_dim}; the parts come from different models"
        )
    # diffusers pads prompts to the tokenizer's model_max_length; they must fit the text encoder
    pipe.tokenizer.max_length = min(pipe.tokenizer.max_length, pipe.text_encoder.config.max_positions)
    return pipe


def to_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return names[dtype]


# ---------------------------------------------------------------------------------------------
# Reading tensors

def read_safetensors(path: Path, device=None, dtype=None, keys=None) -> dict[str, torch.Tensor]:
    """Reads (some of) a safetensors file, one tensor at a time, to `device` and `dtype`
    (floating-point tensors only). A corrupt or truncated file gives a CheckpointError."""
    try:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            out = {}
            for k in f.keys() if keys is None else keys:
                t = f.get_tensor(k)
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            return out
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def safetensors_keys(path: Path) -> dict[str, tuple]:
    """Key -> shape, from the header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_strict(model_cls, config, state: dict[str, torch.Tensor], where: str, hint: str = "", names=None):
    """Builds `model_cls(config)` on the meta device and fills it from `state`, which must hold
    exactly the model's tensors, each of the model's shape. The result needs no initialization and
    holds only the tensors in `state`. `names` maps our keys to the file's, for the messages."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [(names or {}).get(k, k) for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{(names or {}).get(k, k)} {tuple(state[k].shape)} (model: {expected[k]})" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (first: {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of the wrong shape (first: {wrong[0]})" if wrong else ""]
        raise CheckpointError(f"{where}: tensors do not fit {model_cls.__name__}: "
                              + ", ".join(p for p in parts if p) + (f"; {hint}" if hint else ""))
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# Diffusers folders

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")


def _load_folder(path: Path, device, dtype, tokenizer) -> Pipeline:
    _check_folder(path)
    unet_cfg = read_config(path / "unet" / "config.json", unet_config_from_diffusers)
    check_text_to_image(unet_cfg, str(path / "unet" / "config.json"))
    vae_cfg = read_config(path / "vae" / "config.json", vae_config_from_diffusers)
    text_cfg = read_config(path / "text_encoder" / "config.json", text_config_from_transformers)

    unet_state = read_component(path / "unet", "diffusion_pytorch_model", device, dtype)
    vae_state = rename_legacy_vae_keys(read_component(path / "vae", "diffusion_pytorch_model", device, dtype))
    text_state = read_component(path / "text_encoder", "model", device, dtype)
    text_state = {k.removeprefix("text_model."): v for k, v in text_state.items() if not k.endswith("position_ids")}

    sched_file = path / "scheduler" / "scheduler_config.json"
    try:
        scheduler = SchedulerConfig.from_dict(read_json(sched_file)) if sched_file.is_file() else SchedulerConfig()
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{sched_file}: {e}") from None
    family = "sd2" if unet_cfg.linear_proj or text_cfg.act == "gelu" else "sd1"
    return Pipeline(
        tokenizer=load_tokenizer(tokenizer or path / "tokenizer"),
        text_encoder=load_strict(CLIPTextModel, text_cfg, text_state, str(path / "text_encoder")),
        unet=load_strict(UNet, unet_cfg, unet_state, str(path / "unet")),
        vae=load_strict(AutoencoderKL, vae_cfg, vae_state, str(path / "vae")),
        scheduler=scheduler, family=family, name=path.name,
    )


def _check_folder(path: Path):
    index = path / "model_index.json"
    cls = read_json(index).get("_class_name", "") if index.is_file() else ""
    if "XL" in cls or (path / "text_encoder_2").is_dir():
        raise CheckpointError(f"{path}: this looks like an SDXL model ({cls or 'text_encoder_2/'}); "
                              "only SD1/SD2 are supported")
    if cls and cls not in ("StableDiffusionPipeline", "StableDiffusionPipelineSafe", "OnnxStableDiffusionPipeline"):
        raise CheckpointError(f"{path}: model_index.json names {cls}; only StableDiffusionPipeline models (SD1/SD2) "
                              "are supported")
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if len(missing) == len(SUBFOLDERS):
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint folder (expected subfolders "
                              f"{', '.join(s + '/' for s in SUBFOLDERS)}; or pass a .safetensors file)")
    if missing:
        raise CheckpointError(f"{path}: missing subfolder {missing[0]}/ (a diffusers folder needs "
                              f"{', '.join(s + '/' for s in SUBFOLDERS)})")


def read_json(file: Path, needed: str = "") -> dict:
    """A JSON file, or a CheckpointError saying it is missing (and what needs it) or broken."""
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing{f' ({needed})' if needed else ''}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def read_config(file: Path, parse):
    """parse(the config in `file`). A config of another kind, or one that lacks a key the model
    needs or has a value of the wrong type, is a one-line CheckpointError naming the file."""
    c = read_json(file)
    try:
        if not isinstance(c, dict):
            raise CheckpointError("holds no JSON object")
        return parse(c)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{file}: no {e.args[0]!r}, which the model needs (a config of another model?)") from None
    except (TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: a value of the wrong type ({e})") from None


def read_component(folder: Path, stem: str, device, dtype) -> dict[str, torch.Tensor]:
    """`stem.safetensors`, its fp16 variant, or the shards named by either's index file."""
    names = [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    if dtype in (torch.float16, torch.bfloat16):
        names.reverse()
    for name in names:
        if (folder / name).is_file():
            return read_safetensors(folder / name, device, dtype)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            return {k: v for s in shards for k, v in read_safetensors(folder / s, device, dtype).items()}
    pickles = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    why = f" (found only {pickles[0]}: pickled weights are not loaded, convert it to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder}: no {stem}.safetensors{why}")


def unet_config_from_diffusers(c: dict) -> UNetConfig:
    """UNetConfig from a diffusers unet/config.json. Rejects what SD1/SD2 do not use."""
    if c.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"holds a {c['_class_name']}, not the UNet2DConditionModel of SD1/SD2")
    for key, ok in [("addition_embed_type", None), ("class_embed_type", None), ("encoder_hid_dim_type", None),
                    ("time_cond_proj_dim", None), ("dual_cross_attention", False), ("only_cross_attention", False),
                    ("resnet_time_scale_shift", "default"), ("act_fn", "silu"), ("time_embedding_type", "positional"),
                    ("flip_sin_to_cos", True), ("freq_shift", 0), ("center_input_sample", False),
                    ("conv_in_kernel", 3), ("conv_out_kernel", 3), ("attention_type", "default"),
                    ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("resnet_out_scale_factor", 1.0),
                    ("mid_block_scale_factor", 1)]:
        if c.get(key, ok) != ok:
            hint = " (this looks like SDXL)" if key == "addition_embed_type" else ""
            raise CheckpointError(f"{key}={c[key]!r} is not supported; only SD1/SD2 UNets are{hint}")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    attention = []
    for d, u in zip(down, reversed(up)):
        if (d, u) not in [("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"), ("DownBlock2D", "UpBlock2D")]:
            raise CheckpointError(f"block types {d}/{u} are not supported (SD1/SD2 use "
                                  "CrossAttnDownBlock2D/CrossAttnUpBlock2D and DownBlock2D/UpBlock2D)")
        attention.append(d == "CrossAttnDownBlock2D")
    n = len(down)
    per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
    # diffusers' "attention_head_dim" holds the number of heads when num_attention_heads is unset.
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    layers = c.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise CheckpointError("a different layers_per_block per level is not supported")
        layers = layers[0]
    depth = per_level(c.get("transformer_layers_per_block", 1))
    if any(isinstance(d, (list, tuple)) for d in depth):
        raise CheckpointError("per-block transformer depths are not supported")
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4),
        channels=tuple(c["block_out_channels"]), layers_per_block=layers, attention=tuple(attention),
        num_heads=per_level(heads), transformer_depth=depth, context_dim=c["cross_attention_dim"],
        linear_proj=c.get("use_linear_projection", False), norm_groups=c.get("norm_num_groups", 32),
        norm_eps=c.get("norm_eps", 1e-5), upcast_attention=c.get("upcast_attention", False),
        sample_size=c.get("sample_size") or 64,
    )


def check_text_to_image(unet: UNetConfig, where: str):
    """Inpainting, instruct-pix2pix and depth UNets take more input channels than the latents."""
    if unet.in_channels != unet.out_channels:
        raise CheckpointError(f"{where}: the UNet takes {unet.in_channels} input channels, not {unet.out_channels} "
                              "(9: inpainting, 8: instruct-pix2pix, 5: depth); only text-to-image SD1/SD2 models "
                              "are supported")


def vae_config_from_diffusers(c: dict) -> VAEConfig:
    if c.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"holds a {c['_class_name']}, not the AutoencoderKL of SD1/SD2")
    if any(t != "DownEncoderBlock2D" for t in c.get("down_block_types", [])) or c.get("use_quant_conv") is False:
        raise CheckpointError("only the SD1/SD2 KL autoencoder is supported")
    return VAEConfig(
        in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3),
        latent_channels=c.get("latent_channels", 4), channels=tuple(c["block_out_channels"]),
        layers_per_block=c.get("layers_per_block", 2), norm_groups=c.get("norm_num_groups", 32),
        scaling_factor=c.get("scaling_factor", 0.18215),
    )


def text_config_from_transformers(c: dict) -> CLIPTextConfig:
    c = c.get("text_config", c)
    if c.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise CheckpointError(f"model_type {c['model_type']!r} is not a CLIP text model (SD1/SD2 use CLIPTextModel)")
    if c.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"hidden_act {c['hidden_act']!r} is not supported")
    return CLIPTextConfig(
        vocab_size=c.get("vocab_size", 49408), max_positions=c.get("max_position_embeddings", 77),
        width=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        mlp_dim=c["intermediate_size"], act=c.get("hidden_act", "quick_gelu"), eps=c.get("layer_norm_eps", 1e-5),
    )


def rename_legacy_vae_keys(state: dict) -> dict:
    """Hub VAEs saved by older diffusers call the attention layers query/key/value/proj_attn."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    pattern = re.compile("|".join(re.escape(k) for k in legacy))
    return {pattern.sub(lambda m: legacy[m.group(0)], k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Original single files: one table per model, from our key to where the original keeps it

@dataclass(frozen=True)
class Original:
    key: str
    part: int | None = None  # OpenCLIP fuses q, k, v into one in_proj: this is chunk `part` of 3
    conv: bool = False  # stored as a 1x1 conv where we have a Linear (the VAE's attention)
    transpose: bool = False  # stored transposed (OpenCLIP's text_projection)


def to_ours(stored: torch.Tensor, o: Original) -> torch.Tensor:
    """The one place where original tensors are reshaped into ours."""
    if o.part is not None:
        stored = stored.chunk(3, dim=0)[o.part]
    if o.conv:
        stored = stored.flatten(1)
    return stored.t() if o.transpose else stored


def to_original(ours: list[torch.Tensor], o: Original) -> torch.Tensor:
    """The inverse of to_ours; `ours` holds the 3 parts when the original fuses them."""
    t = torch.cat(ours, dim=0) if o.part is not None else ours[0]
    if o.conv:
        t = t[:, :, None, None]
    return t.t() if o.transpose else t


def _prefixes_to_keys(model_keys, prefixes: list[tuple[str, str]]) -> dict[str, Original]:
    """Expands (our module prefix, original module prefix) pairs into a full key table by
    longest-prefix match over the model's keys."""
    prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
    table = {}
    for key in model_keys:
        ours, orig = next(((a, b) for a, b in prefixes if key == a or key.startswith(a + ".")), (key, key))
        table[key] = Original(orig + key[len(ours):])
    return table


RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_table(cfg: UNetConfig) -> dict[str, Original]:
    """Ours -> CompVis openaimodel.py names (after `model.diffusion_model.`)."""
    L, n = cfg.layers_per_block, len(cfg.channels)
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
             ("mid_block.attentions.0", "middle_block.1")]
    resnets = [("mid_block.resnets.0", "middle_block.0"), ("mid_block.resnets.1", "middle_block.2")]
    for i in range(n):
        for j in range(L):
            resnets.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{1 + i * (L + 1) + j}.0"))
            pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{1 + i * (L + 1) + j}.1"))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (L + 1)}.0.op"))
        level = n - 1 - i  # up_blocks run from the deepest level back up
        for j in range(L + 1):
            resnets.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * (L + 1) + j}.0"))
            pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{i * (L + 1) + j}.1"))
        pairs.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{i * (L + 1) + L}.{2 if cfg.attention[level] else 1}"))
    pairs += [(f"{a}.{x}", f"{b}.{y}") for a, b in resnets for x, y in RESNET]
    with torch.device("meta"):
        keys = UNet(cfg).state_dict().keys()
    return _prefixes_to_keys(keys, pairs)


def vae_table(cfg: VAEConfig) -> dict[str, Original]:
    """Ours -> CompVis ldm/modules/diffusionmodules/model.py names (after `first_stage_model.`)."""
    n = len(cfg.channels)
    pairs = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_norm_out", f"{part}.norm_out"),
                  (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1"),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2"),
                  (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1")]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block"),
                  (f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample"),
                  (f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n - 1 - i}.block"),
                  (f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{n - 1 - i}.upsample")]
    with torch.device("meta"):
        keys = AutoencoderKL(cfg).state_dict().keys()
    table = _prefixes_to_keys(keys, pairs)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, o in table.items():
        for ours, orig in attn.items():
            if f".attn_1.{ours}." in o.key:
                table[key] = Original(o.key.replace(f".attn_1.{ours}.", f".attn_1.{orig}."),
                                      conv=ours != "group_norm" and key.endswith("weight"))
        if ".conv_shortcut." in o.key:
            table[key] = Original(o.key.replace(".conv_shortcut.", ".nin_shortcut."))
    return table


OPENCLIP = [("embeddings.token_embedding.weight", "token_embedding.weight"),
            ("embeddings.position_embedding.weight", "positional_embedding"),
            ("final_layer_norm", "ln_final"), ("encoder.layers", "transformer.resblocks")]
OPENCLIP_LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                  ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]


def text_table(cfg: CLIPTextConfig, family: str) -> dict[str, Original]:
    """Ours -> the single file's text encoder names: transformers' CLIP names for SD1, OpenCLIP's
    for SD2 (with q, k, v fused into one in_proj)."""
    with torch.device("meta"):
        keys = CLIPTextModel(cfg).state_dict().keys()
    if family == "sd1":
        return {k: Original(k) for k in keys}
    pairs = list(OPENCLIP)
    for i in range(cfg.num_layers):
        pairs += [(f"encoder.layers.{i}.{a}", f"transformer.resblocks.{i}.{b}") for a, b in OPENCLIP_LAYER]
    table = _prefixes_to_keys(keys, pairs)
    for key in keys:
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
        if m:
            table[key] = Original(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", part="qkv".index(m[2]))
    return table


PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model."}

# What real single files carry besides the three models. Nothing else is skipped.
IGNORED = re.compile("|".join([
    r"model_ema\..*",  # the EMA copy of the UNet (emaonly files already hold EMA weights)
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar)",  # DDPM buffers
    r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids",  # arange(77), sometimes float
    r"cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)",  # OpenCLIP parts SD2 does not use
]))

FOREIGN = [("conditioner.embedders", "an SDXL checkpoint"), ("model.diffusion_model.label_emb", "an SDXL checkpoint"),
           ("model.diffusion_model.joint_blocks", "an SD3 checkpoint"), ("double_blocks", "a Flux checkpoint"),
           ("model.diffusion_model.double_blocks", "a Flux checkpoint"), ("lora_", "a LoRA, not a full model"),
           ("encoder.down.0.block", "a VAE alone, not a full model"), ("text_model.encoder", "a text encoder alone")]


class Shapes(dict):
    """The shapes of the tensors under `prefix` in a single file, keyed without it. Looking up a
    tensor the file lacks is a CheckpointError naming it."""

    def __init__(self, shapes: dict[str, tuple], prefix: str, where: str):
        super().__init__({k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)})
        self.prefix, self.where = prefix, where

    def __missing__(self, key):
        raise CheckpointError(f"{self.where}: no {self.prefix}{key}; not a complete SD1/SD2 single file")


def inspect_single_file(shapes: dict[str, tuple], where: str):
    """Reads the architecture off the tensor shapes: (family, UNetConfig, VAEConfig, CLIPTextConfig)."""
    for marker, what in FOREIGN:
        if any(k.startswith(marker) for k in shapes):
            raise CheckpointError(f"{where}: this looks like {what}; only SD1/SD2 single files are supported")
    if f"{PREFIX['unet']}input_blocks.0.0.weight" not in shapes:
        found = sorted({k.split(".")[0] + ".*" for k in shapes})[:3]
        raise CheckpointError(f"{where}: no UNet ({PREFIX['unet']}*), only {', '.join(found) or 'nothing'}; "
                              "not a full SD1/SD2 single file")
    family = "sd2" if any(k.startswith(PREFIX["sd2"]) for k in shapes) else "sd1"
    if not any(k.startswith(PREFIX[family]) for k in shapes):
        raise CheckpointError(f"{where}: no text encoder ({PREFIX['sd1']}* or {PREFIX['sd2']}*)")
    if not any(k.startswith(PREFIX["vae"]) for k in shapes):
        raise CheckpointError(f"{where}: no VAE ({PREFIX['vae']}*)")

    u = Shapes(shapes, PREFIX["unet"], where)
    inputs = sorted({int(k.split(".")[1]) for k in u if k.startswith("input_blocks.")})
    downsamplers = [i for i in inputs if i > 0 and f"input_blocks.{i}.0.op.weight" in u]
    L = (downsamplers[0] if downsamplers else len(inputs)) - 1  # res blocks per level
    n = (max(inputs) + 1) // (L + 1)
    first = [1 + i * (L + 1) for i in range(n)]  # first res block of each level
    channels = tuple(u[f"input_blocks.{b}.0.out_layers.3.weight"][0] for b in first)
    attention = tuple(any(k.startswith(f"input_blocks.{b}.1.") for k in u) for b in first)
    depth = tuple(len({k.split(".")[4] for k in u if k.startswith(f"input_blocks.{b}.1.transformer_blocks.")}) or 1
                  for b in first)
    attn_keys = [k for k in u if k.endswith("attn2.to_k.weight")]
    if not attn_keys:
        raise CheckpointError(f"{where}: no cross-attention ({PREFIX['unet']}*.attn2.to_k.weight); not an SD1/SD2 UNet")
    proj = next((s for k, s in u.items() if k.endswith(("proj_in.weight", "proj_out.weight"))), (0, 0, 1, 1))
    # SD1 uses 8 heads everywhere; SD2 uses 64 channels per head.
    heads = (8,) * n if family == "sd1" else tuple(max(c // 64, 1) for c in channels)
    unet = UNetConfig(
        in_channels=u["input_blocks.0.0.weight"][1], out_channels=u["out.2.weight"][0], channels=channels,
        layers_per_block=L, attention=attention, num_heads=heads,
        transformer_depth=tuple(d if a else 1 for d, a in zip(depth, attention)),
        context_dim=u[attn_keys[0]][1], linear_proj=len(proj) == 2, sample_size=64,
    )
    check_text_to_image(unet, where)

    v = Shapes(shapes, PREFIX["vae"], where)
    # with no encoder.down.* at all, the lookups of level 0 below name what is missing
    levels = sorted({int(k.split(".")[2]) for k in v if k.startswith("encoder.down.")}) or [0]
    vae = VAEConfig(
        in_channels=v["encoder.conv_in.weight"][1], out_channels=v["decoder.conv_out.weight"][0],
        latent_channels=v["post_quant_conv.weight"][0],
        channels=tuple(v[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels),
        layers_per_block=len({k.split(".")[4] for k in v if k.startswith("encoder.down.0.block.")}),
    )

    t = Shapes(shapes, PREFIX[family], where)
    if family == "sd1":
        vocab, width = t["embeddings.token_embedding.weight"]
        layers_in_file = len({k.split(".")[2] for k in t if k.startswith("encoder.layers.")})
        mlp = t["encoder.layers.0.mlp.fc1.weight"][0]
        positions = t["embeddings.position_embedding.weight"][0]
    else:
        vocab, width = t["token_embedding.weight"]
        layers_in_file = len({k.split(".")[2] for k in t if k.startswith("transformer.resblocks.")})
        mlp = t["transformer.resblocks.0.mlp.c_fc.weight"][0]
        positions = t["positional_embedding"][0]
    # SD2 uses the penultimate layer of OpenCLIP: its last layer is never run. Real files hold all 24
    # layers of ViT-H, a few only the 23 run (diffusers runs 23 either way); at other sizes the file is
    # taken to hold the unused layer too, as export_single_file writes it.
    num_layers = layers_in_file if family == "sd1" else \
        SD2_TEXT.num_layers if width == SD2_TEXT.width else layers_in_file - 1
    text = CLIPTextConfig(vocab_size=vocab, max_positions=positions, width=width, num_layers=num_layers,
                          num_heads=max(width // 64, 1), mlp_dim=mlp, act="gelu" if family == "sd2" else "quick_gelu")
    return family, unet, vae, text


def _load_single_file(path: Path, device, dtype, tokenizer, prediction_type) -> Pipeline:
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: pickled checkpoints are not loaded (they can run code); "
                              "use the .safetensors release or convert it")
    shapes = safetensors_keys(path)
    family, unet_cfg, vae_cfg, text_cfg = inspect_single_file(shapes, str(path))
    parts = [("unet", UNet, unet_cfg, unet_table(unet_cfg)), ("vae", AutoencoderKL, vae_cfg, vae_table(vae_cfg)),
             (family, CLIPTextModel, text_cfg, text_table(text_cfg, family))]
    if family == "sd2":
        last = f"{PREFIX['sd2']}transformer.resblocks.{text_cfg.num_layers}."  # the unused layer, if there
        unused = {k for k in shapes if k.startswith(last)}
    else:
        unused = set()
    wanted = {PREFIX[p] + o.key for p, _, _, table in parts for o in table.values()}
    stray = [k for k in shapes if k not in wanted and k not in unused and not IGNORED.fullmatch(k)]
    if stray:
        raise CheckpointError(f"{path}: {len(stray)} unexpected tensors (first: {stray[0]}); "
                              "not a plain SD1/SD2 checkpoint (inpainting, SDXL or a merged add-on?)")
    stored = read_safetensors(path, device, dtype, keys=sorted(wanted & shapes.keys()))
    models = {}
    for prefix, cls, cfg, table in parts:
        state = {k: to_ours(stored[PREFIX[prefix] + o.key], o) for k, o in table.items() if PREFIX[prefix] + o.key in stored}
        models[cls] = load_strict(cls, cfg, state, str(path), hint=f"read as an {family.upper()} single file",
                                  names={k: PREFIX[prefix] + o.key for k, o in table.items()})
    del stored
    if prediction_type in ("v", "v_prediction") and family == "sd2":
        unet_cfg.sample_size = 96  # the 768-v models
    return Pipeline(
        tokenizer=_single_file_tokenizer(tokenizer, family), text_encoder=models[CLIPTextModel],
        unet=models[UNet], vae=models[AutoencoderKL], scheduler=SchedulerConfig(), family=family, name=path.name,
    )


# ---------------------------------------------------------------------------------------------
# The Hugging Face hub

# Where a single file's tokenizer comes from: the hub repo of its text encoder, and its pad token.
TOKENIZERS = {"sd1": ("openai/clip-vit-large-patch14", "<|endoftext|>"),
              "sd2": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "!")}


def load_tokenizer(folder, pad_token=None) -> Tokenizer:
    """A tokenizer folder; its own pad token wins over `pad_token`."""
    try:
        return Tokenizer.from_folder(folder, pad_token=pad_token)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tokenizer: {e}".replace("\n", " ")) from None


def _single_file_tokenizer(folder, family: str) -> Tokenizer:
    repo, pad = TOKENIZERS[family]
    if folder is not None:
        return load_tokenizer(folder, pad)
    from huggingface_hub import hf_hub_download

    files = [hub_fetch(lambda: hf_hub_download(repo, f), repo) for f in ("vocab.json", "merges.txt")]
    try:
        return Tokenizer.from_files(files[0], files[1], pad_token=pad)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tokenizer: {e}".replace("\n", " ")) from None


def looks_like_repo_id(s: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not s.startswith((".", "/"))


WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def hub_patterns(dtype: torch.dtype, components=tuple(WEIGHTS)) -> list[str]:
    """The files a diffusers repo needs: configs, tokenizer and safetensors weights only (no
    pickles, no safety checker). fp16 variants are taken for half-precision loads."""
    variant = ".fp16" if dtype in (torch.float16, torch.bfloat16) else ""
    weights = [f"{c}/{WEIGHTS[c]}{variant}.safetensors*" for c in components]
    return ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "tokenizer/*.json", "tokenizer/*.txt", "scheduler/scheduler_config.json", *weights]


def download(repo_id: str, dtype=torch.float32) -> Path:
    """Fetches what `hub_patterns` names into the standard Hugging Face cache and returns the
    snapshot folder. huggingface_hub reads HF_TOKEN and HF_HUB_OFFLINE itself. A component with
    no fp16 variant file falls back to its full-precision file."""
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


# ---------------------------------------------------------------------------------------------
# The exporter: diffusers folder (or any loadable source) -> original single file

def export_single_file(source, out, dtype=None) -> Path:
    """Writes an original-layout single file (CompVis / Stability key names) that diffusers' and
    other tools' single-file loaders read. SD2 files get OpenCLIP's last text layer as zeros,
    because real SD2 files carry that (unused) layer and loaders drop it."""
    pipe = source if isinstance(source, Pipeline) else load_pipeline(source, dtype=dtype or torch.float32)
    parts = [("unet", pipe.unet, unet_table(pipe.unet.config)), ("vae", pipe.vae, vae_table(pipe.vae.config)),
             (pipe.family, pipe.text_encoder, text_table(pipe.text_encoder.config, pipe.family))]
    out_state = {}
    for prefix, model, table in parts:
        state = model.state_dict()
        by_original = {}  # original key -> (entry, [our tensors in part order])
        for key, o in sorted(table.items(), key=lambda item: item[1].part or 0):
            by_original.setdefault(o.key, (o, []))[1].append(state[key])
        for original_key, (o, tensors) in by_original.items():
            out_state[PREFIX[prefix] + original_key] = to_original(tensors, o)
    if pipe.family == "sd2":
        n = pipe.text_encoder.config.num_layers
        for k in [k for k in out_state if k.startswith(f"{PREFIX['sd2']}transformer.resblocks.{n - 1}.")]:
            out_state[k.replace(f".resblocks.{n - 1}.", f".resblocks.{n}.")] = torch.zeros_like(out_state[k])
    out_state = {k: v.to(dtype or v.dtype).contiguous() for k, v in out_state.items()}
    out = Path(out)
    save_file(out_state, str(out), metadata={"format": "pt"})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="weights.py", description="Stable Diffusion weights tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write an original-layout single .safetensors file")
    ex.add_argument("source", help="repo id, diffusers folder or single file")
    ex.add_argument("out", help="output .safetensors path")
    ex.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    try:
        path = export_single_file(args.source, args.out, to_dtype(args.dtype))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
