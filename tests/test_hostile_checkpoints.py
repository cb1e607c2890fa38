"""Checkpoints made to break the loader, and what they get: one CheckpointError line (exit status 2 from
generate.py), in bounded memory, before anything their header or config asks for is built.

    a header key that numbers more blocks than the file holds   model.diffusion_model.input_blocks.<10^12>.0.weight
    a config of sizes no model has, or of the wrong types        unet/config.json layers_per_block: 10^7
    integer or bool weights                                      an int32 conv_in.weight
    a shard index without a weight_map, or naming other files    "weight_map": {"x": "../x.safetensors"}
    a safetensors header of impossible lengths or offsets        refused by the safetensors library itself

A load that could exhaust memory runs in a child process limited to MEMORY bytes of address space, next to
the untouched checkpoints it was made from, which must load within the same limit."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPTextConfig

from checkpoint.clip import clip_config_from_transformers, load_clip
from checkpoint.configs import text_config_from_transformers, unet_config_from_diffusers, vae_config_from_diffusers
from checkpoint.sdxl import text_config_with_projection
from checkpoint.single_file import main as single_file_main
from checkpoints import make_taesd_folder
from helpers import run, run_bounded
from checkpoint.taesd import load_taesd, taesd_config_from_diffusers
from weights import CheckpointError, export_single_file, load_pipeline

# Address space for a child that loads the small checkpoints below: they need under 1 GiB of it.
MEMORY = 3 * 2**29
HUGE = 10**12


@pytest.fixture(scope="module")
def bases(sd1, sd1_file, sdxl, clip_folder, tmp_path_factory):
    """The untouched checkpoints the hostile ones are made from."""
    return dict(sd1=sd1, sd1_file=sd1_file, sdxl=sdxl, clip=clip_folder,
                taesd=make_taesd_folder(tmp_path_factory.mktemp("bases") / "taesd"))


def with_tensors(file: Path, out: Path, tensors: dict) -> Path:
    """`file` saved again as `out`, with `tensors` added or replaced."""
    save_file({**load_file(file), **tensors}, out)
    return out


def with_config(folder: Path, out: Path, file: str, key: str, value, **also) -> Path:
    """A copy of `folder` whose `file` (a JSON object) has `key` set to `value`, and each key of `also`
    to its value; "a.b" sets b in the dict a."""
    out = Path(shutil.copytree(folder, out))
    config = json.loads((out / file).read_text())
    for key, value in {key: value, **also}.items():
        *outer, last = key.split(".")
        inner = config
        for name in outer:
            inner = inner[name]
        inner[last] = value
    (out / file).write_text(json.dumps(config))
    return out


def with_text(folder: Path, out: Path, file: str, text: str) -> Path:
    """A copy of `folder` whose `file` holds `text`."""
    out = Path(shutil.copytree(folder, out))
    (out / file).write_text(text)
    return out


def in_file(key, tensor):
    """A case: the SD1 single file with one more (or another) tensor."""
    return lambda bases, out: ("pipeline", with_tensors(bases["sd1_file"], out.with_suffix(".safetensors"),
                                                        {key: tensor}), {"tokenizer": str(bases["sd1"] / "tokenizer")})


def in_config(base, loader, file, key, value):
    """A case: a copy of a folder with one config value changed."""
    return lambda bases, out: (loader, with_config(bases[base], out, file, key, value), {})


def replaced(base, file, make):
    """A case: a copy of a folder whose `file` is what `make(path)` puts there instead (a link, a folder, a FIFO)."""
    def case(bases, out):
        out = Path(shutil.copytree(bases[base], out))
        (out / file).unlink()
        make(out / file)
        return "pipeline", out, {}
    return case


def untouched(base, loader, **kwargs):
    return lambda bases, out: (loader, bases[base], {k: str(bases[v]) for k, v in kwargs.items()})


# name: (how the checkpoint is made, what its one line must say)
HOSTILE = {
    "input-block-index": (in_file(f"model.diffusion_model.input_blocks.{HUGE}.0.weight", torch.zeros(0)),
                          rf"model\.diffusion_model\.input_blocks\.{HUGE}\.0\.weight"),
    "vae-level-index": (in_file(f"first_stage_model.encoder.down.{HUGE}.block.0.conv1.weight", torch.zeros(0)),
                        rf"first_stage_model\.encoder\.down\.{HUGE}\.block"),
    "text-layer-index": (in_file(f"cond_stage_model.transformer.text_model.encoder.layers.{HUGE}.mlp.fc1.weight",
                                 torch.zeros(0)), rf"encoder\.layers\.{HUGE}\.mlp"),
    "overflowing-shape": (in_file("model.diffusion_model.input_blocks.1.0.out_layers.3.weight", torch.zeros(2**62, 0)),
                          rf"block_out_channels.*{2**62}"),
    "unet-layers": (in_config("sd1", "pipeline", "unet/config.json", "layers_per_block", 10**7),
                    r"unet/config\.json: .*layers_per_block"),
    "unet-depth": (in_config("sd1", "pipeline", "unet/config.json", "transformer_layers_per_block", 10**7),
                   r"unet/config\.json: .*transformer_layers_per_block"),
    "unet-channels": (in_config("sd1", "pipeline", "unet/config.json", "block_out_channels", [32, HUGE]),
                      r"unet/config\.json: .*block_out_channels"),
    "vae-layers": (in_config("sd1", "pipeline", "vae/config.json", "layers_per_block", 10**7),
                   r"vae/config\.json: .*layers_per_block"),
    "text-layers": (in_config("sd1", "pipeline", "text_encoder/config.json", "num_hidden_layers", 10**7),
                    r"text_encoder/config\.json: .*num_hidden_layers"),
    "text-2-projection": (in_config("sdxl", "pipeline", "text_encoder_2/config.json", "projection_dim", HUGE),
                          r"text_encoder_2/config\.json: .*projection_dim"),
    "clip-vision-layers": (in_config("clip", "clip", "config.json", "vision_config.num_hidden_layers", 10**7),
                           r"config\.json: .*vision_config.*num_hidden_layers"),
    "taesd-blocks": (in_config("taesd", "taesd", "config.json", "num_decoder_blocks", [10**7, 3, 3, 1]),
                     r"config\.json: .*num_decoder_blocks"),
    # cuts prompt and negative to nothing: the image would be unguarded, its PNG text saying otherwise
    "tokenizer-length": (in_config("sd1", "pipeline", "tokenizer/tokenizer_config.json", "model_max_length", 2),
                         r"tokenizer/tokenizer_config\.json: model_max_length=2"),
    # a config that is no file: read whole, /dev/zero would take all memory; a FIFO would wait for ever
    "config-is-dev-zero": (replaced("sd1", "unet/config.json", lambda path: path.symlink_to("/dev/zero")),
                           r"unet/config\.json: not a file"),
    "config-is-a-folder": (replaced("sd1", "vae/config.json", Path.mkdir), r"vae/config\.json: not a file"),
    "config-is-a-fifo": (replaced("sd1", "text_encoder/config.json", os.mkfifo),
                         r"text_encoder/config\.json: not a file"),
}
UNTOUCHED = {"sd1": untouched("sd1", "pipeline"), "sd1-file": untouched("sd1_file", "pipeline", tokenizer="sd1"),
             "sdxl": untouched("sdxl", "pipeline"), "clip": untouched("clip", "clip"),
             "taesd": untouched("taesd", "taesd")}

# The child: loads each checkpoint and prints, as one JSON line, the exception it got, if any.
CHILD = """
import json, sys
from checkpoint.clip import load_clip
from checkpoint.taesd import load_taesd
from weights import CheckpointError, load_pipeline

LOADERS = {"pipeline": load_pipeline, "clip": load_clip, "taesd": load_taesd}
for name, loader, source, kwargs in json.loads(sys.argv[1]):
    try:
        LOADERS[loader](source, **kwargs)
        outcome = ["loaded", ""]
    except BaseException as e:  # anything but a CheckpointError is what the test reports
        outcome = [type(e).__name__, str(e)]
    print(json.dumps([name, *outcome]), flush=True)
"""


@pytest.fixture(scope="module")
def sources(bases, tmp_path_factory) -> dict[str, tuple]:
    """name -> (loader, source, kwargs) for every case and every untouched checkpoint."""
    tmp = tmp_path_factory.mktemp("hostile")
    makers = {**{name: make for name, (make, _) in HOSTILE.items()}, **UNTOUCHED}
    return {name: make(bases, tmp / name) for name, make in makers.items()}


@pytest.fixture(scope="module")
def outcomes(sources) -> dict[str, tuple[str, str]]:
    """name -> (exception name or "loaded", message), all loaded in one child of MEMORY bytes."""
    jobs = [[name, loader, str(source), kwargs] for name, (loader, source, kwargs) in sources.items()]
    try:
        stdout = run_bounded([sys.executable, "-c", CHILD, json.dumps(jobs)], MEMORY, timeout=600).stdout
    except subprocess.TimeoutExpired as e:  # what it said before it hung
        stdout = (e.stdout or b"").decode()
    found = {name: (kind, message) for name, kind, message in map(json.loads, stdout.splitlines())}
    return {name: found.get(name, ("never reported (the child hung or died before it)", "")) for name in sources}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_checkpoint_is_one_line_in_bounded_memory(outcomes, name):
    kind, message = outcomes[name]
    assert kind == "CheckpointError", f"{kind}: {message[:500]}"
    assert "\n" not in message and re.search(HOSTILE[name][1], message), message


@pytest.mark.parametrize("name", list(UNTOUCHED))
def test_the_untouched_checkpoints_load_in_the_same_memory(outcomes, name):
    assert outcomes[name] == ("loaded", "")


@pytest.mark.parametrize("name", ["input-block-index", "unet-layers", "tokenizer-length"])
def test_generate_py_says_it_in_one_line_and_exits_2(sources, name, tmp_path):
    out = tmp_path / "image.png"
    _, source, kwargs = sources[name]
    args = [sys.executable, "generate.py", "a", "--model", str(source), "--proposer", "none", "--steps", "1",
            "--out", str(out), *(a for k, v in kwargs.items() for a in (f"--{k}", v))]
    done = run_bounded(args, MEMORY, timeout=600)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(HOSTILE[name][1], lines[0]), lines
    assert not out.exists()


# Values that fit in memory but no model has, or of the wrong type: each one line naming file and key (and
# the other keys to set with it, when there are).
@pytest.mark.parametrize("base, file, key, value, also", [row if len(row) == 5 else (*row, {}) for row in [
    ("sd1", "unet/config.json", "layers_per_block", "2"),
    ("sd1", "unet/config.json", "layers_per_block", 2.5),
    ("sd1", "unet/config.json", "layers_per_block", 0),
    ("sd1", "unet/config.json", "norm_num_groups", 7),  # does not divide the channels
    ("sd1", "unet/config.json", "attention_head_dim", 3),  # heads that do not divide the channels
    ("sd1", "unet/config.json", "attention_head_dim", 0),
    ("sd1", "unet/config.json", "sample_size", 10**8),  # the default image would be 8e8 pixels wide
    ("sd1", "unet/config.json", "cross_attention_dim", True),
    ("sd1", "vae/config.json", "latent_channels", 0),
    ("sd1", "vae/config.json", "norm_num_groups", 5),
    ("sd1", "scheduler/scheduler_config.json", "num_train_timesteps", 10**10),  # sampling would allocate 40 GB
    ("sd1", "text_encoder/config.json", "max_position_embeddings", -5),
    ("sd1", "text_encoder/config.json", "num_attention_heads", 3),
    ("sd1", "text_encoder/config.json", "eos_token_id", [49407]),  # where the pooled output is taken
    ("clip", "config.json", "vision_config.patch_size", 0),
    ("clip", "config.json", "vision_config.image_size", 4),  # smaller than a patch
    ("taesd", "config.json", "latent_channels", None),
    ("taesd", "config.json", "scaling_factor", float("inf")),
    # a scaling factor that makes unit latents overflow float16 either way it is applied
    ("sd1", "vae/config.json", "scaling_factor", 1e-300),
    ("sd1", "vae/config.json", "scaling_factor", 0),
    ("sd1", "vae/config.json", "scaling_factor", float("inf")),
    ("sd1", "vae/config.json", "scaling_factor", 1e5),
    # SDXL's per-channel latents_mean and latents_std: one number a channel, the std above 0
    ("sdxl", "vae/config.json", "latents_std", [1.0, 0.0, 1.0, 1.0], {"latents_mean": [0.0] * 4}),
    ("sdxl", "vae/config.json", "latents_mean", [0.0, 1.0], {"latents_std": [1.0] * 4}),
    ("sdxl", "vae/config.json", "latents_mean", ["0", 0, 0, 0], {"latents_std": [1.0] * 4}),
    # betas at or past 1 make ᾱ reach 0 or go negative: NaN at the first step
    ("sd1", "scheduler/scheduler_config.json", "beta_end", 1.0),
    ("sd1", "scheduler/scheduler_config.json", "beta_end", float("inf")),
    ("sd1", "scheduler/scheduler_config.json", "beta_start", float("nan")),
    ("sd1", "scheduler/scheduler_config.json", "beta_end", 0.5),  # ᾱ underflows to 0 in float32
    ("sdxl", "scheduler/scheduler_config.json", "steps_offset", "1"),
    ("sdxl", "scheduler/scheduler_config.json", "steps_offset", None),
    ("sdxl", "scheduler/scheduler_config.json", "clip_sample", "false"),  # a string is true
    ("sdxl", "scheduler/scheduler_config.json", "clip_sample_range", "1", {"clip_sample": True}),
    ("sdxl", "scheduler/scheduler_config.json", "clip_sample_range", None, {"clip_sample": True}),
    # a tokenizer shorter than its text encoder cuts prompt and negative to nothing, or to less than it reads
    ("sd1", "tokenizer/tokenizer_config.json", "model_max_length", 2),
    ("sd1", "tokenizer/tokenizer_config.json", "model_max_length", 0),
    ("sd1", "tokenizer/tokenizer_config.json", "model_max_length", True),
    ("sd1", "tokenizer/tokenizer_config.json", "model_max_length", -5),
    ("sd1", "tokenizer/tokenizer_config.json", "model_max_length", 76),
    ("sdxl", "tokenizer_2/tokenizer_config.json", "model_max_length", 3),
    # an id past the text encoder's embedding
    ("sd1", "tokenizer/vocab.json", "<|startoftext|>", 10**6),
    ("sd1", "tokenizer/vocab.json", "a</w>", 5000),
    ("sdxl", "tokenizer_2/tokenizer.json", "model.vocab.<|endoftext|>", 10**7),
    ("sd1", "model_index.json", "_class_name", 5),
    ("sd1", "model_index.json", "_class_name", True),
    # SDXL's switches: a string "false" would be true, and 0 means false to diffusers, not here
    ("sdxl", "model_index.json", "force_zeros_for_empty_prompt", "false"),
    ("sdxl", "model_index.json", "force_zeros_for_empty_prompt", None),
    ("sdxl", "vae/config.json", "force_upcast", "false"),
    ("sdxl", "vae/config.json", "force_upcast", 0),
]])
def test_a_config_value_no_model_has_is_one_line(bases, tmp_path, base, file, key, value, also):
    folder = with_config(bases[base], tmp_path / "folder", file, key, value, **also)
    load = {"clip": load_clip, "taesd": load_taesd}.get(base, load_pipeline)
    with pytest.raises(CheckpointError) as info:
        load(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder / file)) and key.split(".")[-1] in message, message


# What Python's json cannot read back into values: nesting past its recursion limit, and integers past its
# limit on digits. Every JSON file a checkpoint holds, through the one reader each uses.
NESTED, DIGITS = "[" * 100_000 + "]" * 100_000, '{"vocab_size": 1' + "0" * 5000 + "}"


@pytest.mark.parametrize("base, file, text", [
    ("sd1", "model_index.json", NESTED),
    ("sd1", "unet/config.json", NESTED),
    ("sd1", "scheduler/scheduler_config.json", NESTED),
    ("sd1", "text_encoder/config.json", NESTED),
    ("sd1", "text_encoder/config.json", DIGITS),
    ("sd1", "tokenizer/vocab.json", NESTED),
    ("sd1", "tokenizer/special_tokens_map.json", NESTED),
    ("sdxl", "tokenizer_2/tokenizer.json", NESTED),
    ("clip", "config.json", NESTED),
    ("clip", "config.json", DIGITS),
], ids=lambda v: "nested" if v is NESTED else "digits" if v is DIGITS else None)
def test_json_past_pythons_limits_is_one_line(bases, tmp_path, base, file, text):
    folder = with_text(bases[base], tmp_path / "folder", file, text)
    load = {"clip": load_clip}.get(base, load_pipeline)
    with pytest.raises(CheckpointError) as info:
        load(folder)
    assert "\n" not in str(info.value) and str(folder / file) in str(info.value), str(info.value)


def test_a_tokenizer_config_that_sets_no_length_still_loads(bases, tmp_path):
    """Old tokenizer configs lack model_max_length, or hold transformers' "no limit" (int(1e30))."""
    folder = Path(shutil.copytree(bases["sd1"], tmp_path / "folder"))
    config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    for length in [None, int(1e30)]:
        (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": length}))
        assert load_pipeline(folder).tokenizer.max_length == 77
    del config["model_max_length"]
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_pipeline(folder).tokenizer.max_length == 77


# `python weights.py export`: one line for what it cannot read or write, exit status 2, terminal escapes shown
def export(capsys, *argv):
    return run(single_file_main, capsys, "export", *argv, export_single_file=export_single_file)


def test_export_says_a_broken_source_in_one_line(bases, tmp_path, capsys):
    for name, make in [("class", lambda f: with_config(bases["sd1"], f, "model_index.json", "_class_name", 5)),
                       ("nested", lambda f: with_text(bases["sd1"], f, "unet/config.json", NESTED)),
                       ("escape\x1b]0;title\x07\nline", lambda f: f)]:  # no such source; its name in the message
        code, out, err = export(capsys, make(tmp_path / name), tmp_path / "out.safetensors")
        assert code == 2 and out == [] and len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert "\x1b" not in err[0] and "\x07" not in err[0], err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("argv, about", [
    ([], "the following arguments are required: command"), (["export"], "required: source, out"),
    (["export", "a", "b", "--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
    (["export", "a", "b", "c\x1b[2J"], "unrecognized arguments: c\\x1b[2J")])  # argparse's own text, escapes raw
def test_export_says_a_bad_argument_in_one_line(argv, about, capsys):
    """As generate.py, evaluate.py and distill.py say theirs: not argparse's usage line and message."""
    code, out, err = run(single_file_main, capsys, *argv, export_single_file=export_single_file)
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith("error: ") and about in err[0], err
    assert "\x1b" not in err[0], err


def test_export_writes_into_a_new_folder_and_refuses_a_folder(bases, tmp_path, capsys):
    tmp_path.joinpath("folder").mkdir()
    code, _, err = export(capsys, bases["sd1"], tmp_path / "folder")
    assert code == 2 and len(err) == 1 and "folder" in err[0], err
    (tmp_path / "file").write_text("")
    code, _, err = export(capsys, bases["sd1"], tmp_path / "file" / "out.safetensors")  # under a file
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    code, out, _ = export(capsys, bases["sd1"], tmp_path / "new" / "out.safetensors")
    assert code == 0 and (tmp_path / "new" / "out.safetensors").is_file(), out


# The configs of the real models must pass: diffusers and transformers write them as for the hub repos.
def meta_config(cls, **kwargs) -> dict:
    """The config.json a diffusers model class writes for these arguments, its model built on the meta device."""
    with torch.device("meta"):
        return dict(cls(**kwargs).config)


SDXL_UNET = dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                 "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128)
REAL = {
    "sd15-unet": (unet_config_from_diffusers, lambda: meta_config(UNet2DConditionModel, cross_attention_dim=768)),
    "sd21-unet": (unet_config_from_diffusers, lambda: meta_config(
        UNet2DConditionModel, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
        upcast_attention=True, sample_size=96)),
    "sdxl-unet": (unet_config_from_diffusers, lambda: meta_config(UNet2DConditionModel, **SDXL_UNET)),
    "sd-vae": (vae_config_from_diffusers, lambda: meta_config(
        AutoencoderKL, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)),
    "vit-l-text": (text_config_from_transformers, lambda: CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12).to_dict()),
    "vit-h-text": (text_config_from_transformers, lambda: CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu",
        projection_dim=512).to_dict()),
    "bigg-text": (text_config_with_projection, lambda: CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
        projection_dim=1280).to_dict()),
    "clip-vit-l-14": (clip_config_from_transformers, lambda: CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=14), projection_dim=768).to_dict()),
    "taesd": (taesd_config_from_diffusers, lambda: meta_config(AutoencoderTiny)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_the_real_models_configs_pass(name):
    parse, config = REAL[name]
    parse(json.loads(json.dumps(config())))  # as read from config.json


# Integer and bool weights: one line naming the tensor and its dtype.
@pytest.mark.parametrize("base, file, key, dtype", [
    ("sd1", "unet/diffusion_pytorch_model.safetensors", "conv_in.weight", torch.int32),
    ("sd1", "unet/diffusion_pytorch_model.safetensors", "conv_in.weight", torch.int16),
    ("sd1", "vae/diffusion_pytorch_model.safetensors", "decoder.conv_out.bias", torch.uint8),
    ("sd1", "text_encoder/model.safetensors", "text_model.final_layer_norm.weight", torch.bool),
    ("clip", "model.safetensors", "text_projection.weight", torch.int64),
    ("taesd", "diffusion_pytorch_model.safetensors", "decoder.layers.0.weight", torch.int8),
])
def test_integer_weights_are_one_line_naming_the_tensor(bases, tmp_path, base, file, key, dtype):
    folder = Path(shutil.copytree(bases[base], tmp_path / "folder"))
    state = load_file(folder / file)
    state[key] = state[key].to(dtype)
    save_file(state, folder / file)
    load = {"clip": load_clip, "taesd": load_taesd}.get(base, load_pipeline)
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} \({str(dtype).removeprefix('torch.')}\)"):
        load(folder)


def test_integer_weights_in_a_single_file(bases, tmp_path):
    key = "first_stage_model.decoder.conv_out.weight"
    file = in_file(key, load_file(bases["sd1_file"])[key].to(torch.int16))(bases, tmp_path / "int")[1]
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} \(int16\)"):
        load_pipeline(file, tokenizer=bases["sd1"] / "tokenizer")


def test_what_real_files_hold_besides_float32_still_loads(bases, tmp_path):
    """float64 weights are converted; position_ids are int64 in hub text encoders, and float in some."""
    folder = Path(shutil.copytree(bases["sd1"], tmp_path / "folder"))
    for file, key in [("unet/diffusion_pytorch_model.safetensors", "conv_in.weight"),
                      ("text_encoder/model.safetensors", "text_model.embeddings.position_ids")]:
        state = load_file(folder / file)
        state[key] = state[key].double()
        save_file(state, folder / file)
    pipe = load_pipeline(folder)
    assert pipe.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(pipe.unet.conv_in.weight, load_pipeline(bases["sd1"]).unet.conv_in.weight)


# Shard indexes (diffusion_pytorch_model.safetensors.index.json, model.safetensors.index.json)
def sharded(folder: Path, out: Path, index) -> Path:
    """A copy of `folder` whose UNet weights are one shard, named by `index` (the JSON written as it is)."""
    out = Path(shutil.copytree(folder, out))
    (out / "unet" / "diffusion_pytorch_model.safetensors").rename(out / "unet" / "shard-1.safetensors")
    (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return out


def test_a_diffusers_shard_index_loads(sd1, tmp_path):
    """diffusers' own shards, for the refusals below to be measured against."""
    folder = Path(shutil.copytree(sd1, tmp_path / "folder"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    UNet2DConditionModel.from_pretrained(sd1 / "unet").save_pretrained(folder / "unet", max_shard_size="100KB")
    assert len(list((folder / "unet").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert torch.equal(load_pipeline(folder).unet.conv_out.weight, load_pipeline(sd1).unet.conv_out.weight)


@pytest.mark.parametrize("index, says", [
    ({"metadata": {"total_size": 4}}, "no weight_map"),
    ({"weight_map": ["shard-1.safetensors"]}, "no weight_map"),
    ({"weight_map": {}}, "no weight_map"),
    ([], "no weight_map"),
    ({"weight_map": {"conv_in.weight": "../../sd1.safetensors"}}, r"'\.\./\.\./sd1\.safetensors'"),
    ({"weight_map": {"conv_in.weight": "/etc/passwd"}}, "'/etc/passwd'"),
    ({"weight_map": {"conv_in.weight": ".."}}, r"'\.\.'"),
    ({"weight_map": {"conv_in.weight": 3}}, r"\b3\b"),
    ({"weight_map": {"conv_in.weight": None}}, "None"),
], ids=["no-map", "a-list", "empty", "not-an-object", "escapes", "absolute", "parent", "a-number", "null"])
def test_a_malformed_shard_index_is_one_line(sd1, tmp_path, index, says):
    folder = sharded(sd1, tmp_path / "folder", index)
    with pytest.raises(CheckpointError) as info:
        load_pipeline(folder)
    message = str(info.value)
    assert "\n" not in message and "diffusion_pytorch_model.safetensors.index.json" in message, message
    assert re.search(says, message), message


# Headers the safetensors library refuses itself: still one CheckpointError line each.
def raw_safetensors(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file written byte by byte: `length` declares the header's size (default: its own)."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


F32 = lambda shape, start, end: {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize("header, data, length", [
    ({"a": F32([1], 0, 4)}, bytes(4), 2**62),  # a header of 4 EiB
    ({"a": F32([1], 0, 4)}, bytes(4), 10**6),  # longer than the file
    ({"a": F32([2], 0, 8), "b": F32([2], 4, 12)}, bytes(12), None),  # overlapping data
    ({"a": F32([1000], 0, 4000)}, bytes(4), None),  # data past the end of the file
    ({"a": F32([2**32, 2**32, 2**32], 0, 0)}, b"", None),  # a shape whose size overflows
    ({"a": F32([1], 2**63, 2**63 + 4)}, bytes(4), None),  # offsets past 2^63
    ({"a": F32([2], 0, 4)}, bytes(4), None),  # a shape the offsets do not hold
    ({"a": F32([-1], 0, 4)}, bytes(4), None),
], ids=["huge-length", "length-past-eof", "overlap", "past-eof", "overflow", "huge-offset", "short", "negative"])
def test_an_impossible_header_is_one_line(tmp_path, header, data, length):
    file = raw_safetensors(tmp_path / "model.safetensors", header, data, length)
    with pytest.raises(CheckpointError) as info:
        load_pipeline(file)
    assert "\n" not in str(info.value) and str(file) in str(info.value)
