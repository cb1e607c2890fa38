"""Loading and writing original single files with the tables of original.py, and the command line that
writes one (`python weights.py export`)."""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from checkpoint.folder import FAMILIES, load_tokenizer
from checkpoint.hub import download_tokenizer
from checkpoint.original import (IGNORED, PREFIX, TEXT_ENCODERS, inspect_single_file, text_table, to_original, to_ours,
                                 unet_table, vae_table)
from checkpoint.pipeline import Pipeline
from checkpoint.prediction import MARKERS, NAMES, Prediction, assumed_warning, read_prediction, written_metadata
from checkpoint.tensors import CheckpointError, load_strict, read_safetensors, safetensors_header, to_dtype
from files import printable, settle
from model.clip import CLIPTextModel
from model.unet import UNet
from model.vae import AutoencoderKL
from sampler.schedule import SchedulerConfig


def load_single_file(path: Path, device, dtype, tokenizer=None, prediction_type=None) -> Pipeline:
    """The pipeline in an original .safetensors file. Single files hold no tokenizer: `tokenizer` is
    a folder (for SDXL a diffusers SDXL folder, whose tokenizer/ and tokenizer_2/ are used), else the
    text encoder's own is downloaded. Some say their prediction type (checkpoint/prediction.py);
    `prediction_type` overrides it, and an SD2 file that does not say it is taken as ε with a warning
    on stderr. A v-prediction SD2 file is the 768 px model."""
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: pickled checkpoints are not loaded (they can run code); "
                              "use the .safetensors release or convert it")
    shapes, _ = safetensors_header(path)
    family, unet_cfg, vae_cfg, *text_cfgs = inspect_single_file(shapes, str(path))
    texts = dict(zip(TEXT_ENCODERS[family], text_cfgs))
    parts = [("unet", UNet, unet_cfg, unet_table(unet_cfg)), ("vae", AutoencoderKL, vae_cfg, vae_table(vae_cfg))]
    parts += [(name, CLIPTextModel, cfg, text_table(cfg, name)) for name, cfg in texts.items()]
    if family == "sd2":
        last = f"{PREFIX['sd2']}transformer.resblocks.{texts['sd2'].num_layers}."  # the unused layer, if there
        unused = {k for k in shapes if k.startswith(last)}
    else:
        unused = set()
    wanted = {PREFIX[p] + o.key for p, _, _, table in parts for o in table.values()}
    stray = [k for k in shapes if k not in wanted and k not in unused and k not in MARKERS and not IGNORED.fullmatch(k)]
    if stray:
        raise CheckpointError(f"{path}: {len(stray)} unexpected tensors (first: {stray[0]}); "
                              f"not a plain {family.upper()} checkpoint (inpainting, a refiner or a merged add-on?)")
    prediction = file_prediction(path, shapes, family, prediction_type)
    # SDXL's VAE overflows in fp16: it decodes in fp32, as diffusers does with SDXL's VAE config
    vae_dtype = torch.float32 if family == "sdxl" and dtype == torch.float16 else dtype
    models = {}
    for prefix, cls, cfg, table in parts:
        keys = sorted({PREFIX[prefix] + o.key for o in table.values()} & shapes.keys())
        stored = read_safetensors(path, device, vae_dtype if prefix == "vae" else dtype, keys=keys)
        state = {k: to_ours(stored[PREFIX[prefix] + o.key], o) for k, o in table.items() if PREFIX[prefix] + o.key in stored}
        models[prefix] = load_strict(cls, cfg, state, str(path), hint=f"read as an {family.upper()} single file",
                                     names={k: PREFIX[prefix] + o.key for k, o in table.items()})
        del stored
    if prediction.type == "v_prediction" and family == "sd2":
        unet_cfg.sample_size = 96  # the 768-v models
    if prediction.said_by is None:
        print(assumed_warning(printable(path.name)), file=sys.stderr, flush=True)
    scheduler = SchedulerConfig(prediction_type=prediction.type, rescale_betas_zero_snr=prediction.zero_snr)
    names = TEXT_ENCODERS[family]
    if family == "sdxl":
        scheduler.timestep_spacing = "leading"  # SDXL's scheduler_config.json says so, for every sampler
        tokenizer, tokenizer_2 = FAMILIES["sdxl"].tokenizers(tokenizer or download_tokenizer(family))
        extra = dict(tokenizer_2=load_tokenizer(tokenizer_2, texts[names[1]], TOKENIZER_PAD["sdxl_g"]),
                     text_encoder_2=models[names[1]], force_zeros_for_empty_prompt=True)
    else:
        extra = {}
    tokenizer = load_tokenizer(tokenizer or download_tokenizer(family), texts[names[0]], TOKENIZER_PAD[names[0]])
    return Pipeline(tokenizer=tokenizer, text_encoder=models[names[0]], unet=models["unet"],
                    vae=models["vae"], scheduler=scheduler, family=family, name=path.name, **extra)


def file_prediction(path: Path, shapes: dict, family: str, prediction_type=None) -> Prediction:
    """The prediction type the caller chose, else the one the file says (or assumes, said_by None)."""
    markers = read_safetensors(path, keys=[k for k in MARKERS if k in shapes])
    if prediction_type is not None:
        if prediction_type not in NAMES:
            raise CheckpointError(f"prediction_type={prediction_type!r}: use epsilon or v")
        return Prediction(NAMES[prediction_type], "the caller", "ztsnr" in markers)
    return read_prediction(safetensors_header(path)[1], markers, family, str(path))


# The pad token of each family's tokenizer, which the text encoders' hub repos do not all record.
TOKENIZER_PAD = {"sd1": "<|endoftext|>", "sd2": "!", "sdxl_l": "<|endoftext|>", "sdxl_g": "!"}


def write_single_file(pipe: Pipeline, out: Path, dtype=None) -> Path:
    """Writes `pipe` as an original-layout single file (CompVis / Stability key names) that diffusers'
    and other tools' single-file loaders read. SD2 files get OpenCLIP's last text layer as zeros,
    because real SD2 files carry that (unused) layer and loaders drop it. The prediction type goes
    into the metadata, as ModelSpec's modelspec.prediction_type, which load_single_file reads back."""
    encoders = dict(zip(TEXT_ENCODERS[pipe.family], (pipe.text_encoder, pipe.text_encoder_2)))
    parts = [("unet", pipe.unet, unet_table(pipe.unet.config)), ("vae", pipe.vae, vae_table(pipe.vae.config))]
    parts += [(name, model, text_table(model.config, name)) for name, model in encoders.items()]
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
    # Atomic as files.write_atomic, whose bytes (safetensors' save) would hold the weights twice in memory: written
    # in a temporary folder beside `out` (removed, whatever happens), then settled over `out`.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as folder:
        part = os.path.join(folder, "part")
        try:
            save_file(out_state, part, metadata={"format": "pt", **written_metadata(pipe.scheduler.prediction_type)})
        except SafetensorError as e:  # what the file system said, in safetensors' words
            raise OSError(f"{out}: cannot write it ({e})") from None
        settle(part, out)
    return out


class _Usage(Exception):
    """A bad argument: one line, as the other scripts say theirs (cli/args.py), not argparse's usage and message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage(message)


def main(argv, export_single_file) -> int:
    """`python weights.py export SOURCE OUT.safetensors [--dtype fp16]`, with weights.export_single_file,
    which loads any source (passed in: checkpoint/ does not import the front)."""
    parser = _Parser(prog="weights.py", description="Stable Diffusion weights tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write an original-layout single .safetensors file")
    ex.add_argument("source", help="repo id, diffusers folder or single file")
    ex.add_argument("out", help="output .safetensors path")
    ex.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="(default: %(default)s)")
    try:  # the arguments, the output's folder (made if missing, as generate.py's --out), then a load of minutes
        args = parser.parse_args(argv)
        out = Path(args.out)
        if out.is_dir():
            raise OSError(f"{out}: names a folder; give a file name, e.g. {out / 'model.safetensors'}")
        out.parent.mkdir(parents=True, exist_ok=True)
        path = export_single_file(args.source, out, to_dtype(args.dtype))
    except (_Usage, CheckpointError, OSError) as e:  # one line, with what a terminal would obey shown as escapes
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 2
    print(f"wrote {printable(str(path))}")
    return 0
