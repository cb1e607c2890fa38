"""Loading diffusers folders (SD1, SD2, SDXL) and repo ids from the hub cache: the reference models' numbers,
the files the hub is asked for, and every error as one clear line. Original single files: test_single_file.py."""
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from checkpoints import FAMILIES, SDXL, SDXL_WIDTH, make_sd_folder
from helpers import (assert_close_rel, assert_matches, assert_same_image, error_of, hub_cache, pipeline_images,
                     randomize_, reference_outputs)
from checkpoint.hub import hub_patterns
from sampler.ddim import DDIM
from sampler.loop import generate
from weights import CheckpointError, load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_transformers5_text_keys_without_prefix(tmp_path):
    folder = make_sd_folder(tmp_path, "sd1", hub_text_prefix=False)
    assert not any(k.startswith("text_model.") for k in load_file(folder / "text_encoder" / "model.safetensors"))
    assert_matches(load_pipeline(folder), reference_outputs(folder))


def test_fp16_variant_files_and_target_dtype(sd1, tmp_path):
    folder = Path(shutil.copytree(sd1, tmp_path / "fp16"))
    for sub, stem in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        full = folder / sub / f"{stem}.safetensors"
        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(full).items()},
                  folder / sub / f"{stem}.fp16.safetensors")
        full.unlink()
    pipe = load_pipeline(folder, dtype=torch.bfloat16)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert all(p.device.type == "cpu" for p in model.parameters())
    assert load_pipeline(folder, dtype="fp32").unet.conv_in.weight.dtype == torch.float32


def test_legacy_vae_attention_names(sd1, tmp_path):
    folder = Path(shutil.copytree(sd1, tmp_path / "legacy"))
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for k, v in load_file(file).items():
        for new, old in names.items():
            k = k.replace(new, old)
        state[k] = v
    assert any(".proj_attn." in k for k in state)
    save_file(state, file)
    assert_matches(load_pipeline(folder), reference_outputs(sd1))


def test_scheduler_config_is_honoured_and_defaults_are_sds(sd1, tmp_path):
    folder = Path(shutil.copytree(sd1, tmp_path / "sched"))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "linear",
         "skip_prk_steps": True, "timestep_spacing": "trailing"}))
    s = load_pipeline(folder).scheduler
    assert (s.beta_start, s.beta_end, s.beta_schedule, s.timestep_spacing) == (0.001, 0.02, "linear", "trailing")
    assert (s.steps_offset, s.set_alpha_to_one, s.clip_sample) == (1, False, False)  # SD's, not DDIM's defaults
    shutil.rmtree(folder / "scheduler")
    s = load_pipeline(folder).scheduler
    assert (s.beta_schedule, s.beta_start, s.beta_end) == ("scaled_linear", 0.00085, 0.012)
    # spacing left to each sampler's default, as diffusers does: leading for DDIM (981, 961, ...)
    assert DDIM(s, 50).timesteps[:2].tolist() == [981, 961]
    assert load_pipeline(folder, prediction_type="v").scheduler.prediction_type == "v_prediction"


def test_hub_patterns_fetch_no_pickles_and_no_safety_checker():
    for dtype in (torch.float32, torch.float16):
        patterns = hub_patterns(dtype)
        assert not any(p.endswith((".bin", ".ckpt", ".pt", ".pth")) or "safety_checker" in p for p in patterns)
        assert any(p.startswith("unet/") and "safetensors" in p for p in patterns)
    assert any(".fp16." in p for p in hub_patterns(torch.float16))


def test_hub_patterns_take_sdxls_second_encoder_and_tokenizer():
    # files of stabilityai/stable-diffusion-xl-base-1.0
    wanted = {torch.float16: ["text_encoder_2/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"],
              torch.float32: ["text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]}
    common = ["text_encoder_2/config.json", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt",
              "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json", "model_index.json"]
    unwanted = ["text_encoder_2/pytorch_model.bin", "text_encoder_2/model.onnx", "text_encoder_2/flax_model.msgpack",
                "vae_1_0/diffusion_pytorch_model.safetensors"]
    for dtype, files in wanted.items():
        patterns = hub_patterns(dtype)
        for file in files + common:
            assert any(fnmatch(file, p) for p in patterns), file
        for file in unwanted:
            assert not any(fnmatch(file, p) for p in patterns), file


def _run(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_repo_id_loads_from_the_hub_cache_offline(sd1, tmp_path):
    hub_cache(tmp_path, "someone/tiny-sd", sd1)
    code = "from weights import load_pipeline; p = load_pipeline('someone/tiny-sd'); print(p.name, p.family)"
    result = _run(code, {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["someone/tiny-sd", "sd1"]


def test_repo_id_loads_sdxl_from_the_hub_cache_offline(sdxl, tmp_path):
    """The hub patterns take text_encoder_2/ and tokenizer_2/ (and the fp16 variant for fp16 loads,
    falling back to the full-precision files a repo without one holds)."""
    hub_cache(tmp_path, "someone/tiny-sdxl", sdxl)
    code = ("import torch; from weights import load_pipeline\n"
            "for dtype in (torch.float32, torch.float16):\n"
            "    p = load_pipeline('someone/tiny-sdxl', dtype=dtype)\n"
            "    print(p.name, p.family, p.text_encoder_2.config.projection_dim, p.tokenizer_2.pad_id)")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(root), "HF_HOME": str(tmp_path),
                                 "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    pad = str(StableDiffusionXLPipeline.from_pretrained(sdxl).tokenizer_2.convert_tokens_to_ids("!"))
    assert result.stdout.split() == ["someone/tiny-sdxl", "sdxl", "40", pad] * 2


@pytest.mark.parametrize("offline", ["1", "0"])
def test_repo_id_not_reachable_is_one_line(tmp_path, offline):
    # HF_ENDPOINT points at a closed local port: no traffic leaves the machine.
    code = ("from weights import load_pipeline, CheckpointError\n"
            "try:\n    load_pipeline('someone/not-here')\n"
            "except CheckpointError as e:\n    print(e)")
    result = _run(code, {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": offline, "HF_ENDPOINT": "http://127.0.0.1:9",
                         "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "someone/not-here" in lines[0], result.stdout + result.stderr
    assert ("HF_HUB_OFFLINE" in lines[0]) == (offline == "1")
    assert "--model" in lines[0] and "local diffusers folder or a .safetensors file" in lines[0]


# What the hub's failures look like from a closed network: a hub on a closed port, offline mode, a hub
# that takes the connection and never answers, a proxy that refuses it. Each is one line within seconds.
HUB_DOWN = {"closed port": {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
            "offline": {"HF_HUB_OFFLINE": "1"}}


@pytest.mark.parametrize("case", HUB_DOWN)
def test_single_file_without_tokenizer_offline_is_one_line_naming_the_fix(sd1_file, tmp_path, case):
    # Once six retry lines over 26 s, then an error that did not say --tokenizer.
    command = [sys.executable, str(ROOT / "generate.py"), "a castle", "--model", str(sd1_file), "--proposer", "none",
               "--steps", "1", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, env={**os.environ, "HF_HOME": str(tmp_path), **HUB_DOWN[case]},
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--tokenizer DIR" in lines[0] and "vocab.json and merges.txt or tokenizer.json" in lines[0], lines[0]


def _load_error(source: str, env: dict, timeout: float) -> list[str]:
    """The lines a subprocess prints loading `source`: the CheckpointError, then its stderr."""
    code = ("from weights import load_pipeline, CheckpointError\n"
            f"try:\n    load_pipeline({source!r})\n"
            "except CheckpointError as e:\n    print(e)")
    result = _run(code, env, timeout=timeout)
    return result.stdout.strip().splitlines() + result.stderr.strip().splitlines()


def test_a_hub_that_never_answers_is_one_line_within_the_timeout(sd1_file, tmp_path):
    # huggingface_hub's first request has no timeout of its own: this once hung for good.
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel takes connections; nobody answers
        env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "2",
               "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        lines = _load_error(str(sd1_file), env, timeout=60)
    assert len(lines) == 1 and "the hub cannot be reached" in lines[0] and "--tokenizer DIR" in lines[0], lines


class _RefusingProxy(http.server.BaseHTTPRequestHandler):
    def do_CONNECT(self):
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_proxy_that_refuses_the_hub_is_one_line(tmp_path):
    # Machines that reach only a package registry often do so through a proxy; its refusal was a traceback.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = f"http://127.0.0.1:{server.server_address[1]}"
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid",
           "HTTPS_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    try:
        lines = _load_error("someone/not-here", env, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert len(lines) == 1 and lines[0].startswith("someone/not-here: cannot download"), lines
    assert "local diffusers folder" in lines[0]


def test_not_a_checkpoint_folder_and_missing_subfolder(sd1, tmp_path):
    (tmp_path / "photos").mkdir()
    assert "not a Stable Diffusion checkpoint folder" in error_of(tmp_path / "photos")
    partial = Path(shutil.copytree(sd1, tmp_path / "partial"))
    shutil.rmtree(partial / "vae")
    assert "missing subfolder vae/" in error_of(partial)
    shutil.copytree(sd1 / "vae", partial / "vae")
    (partial / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (partial / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    assert "pickled" in error_of(partial)
    (partial / "tokenizer" / "merges.txt").unlink()
    shutil.copy(sd1 / "unet" / "diffusion_pytorch_model.safetensors", partial / "unet")
    assert "merges.txt" in error_of(partial)


def test_missing_path_and_pickle_file(tmp_path):
    assert "no such file or folder" in error_of(tmp_path / "nope")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02pickle")
    assert "pickled" in error_of(tmp_path / "model.ckpt")


def test_sdxl_folder_is_named(sd1, tmp_path):
    folder = Path(shutil.copytree(sd1, tmp_path / "xl"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert "SDXL" in error_of(folder)


def test_mismatched_parts(sd1, tmp_path):
    folder = Path(shutil.copytree(sd1, tmp_path / "mixed"))
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 64}))
    message = error_of(folder)
    assert "unet" in message and "wrong shape" in message


def test_damaged_sdxl_folders_are_one_line_errors(sdxl, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sdxl, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(CheckpointError, match=r"missing subfolder tokenizer_2/ \(a diffusers folder of SDXL needs"):
        load_pipeline(broken)

    shutil.copytree(sdxl, broken, dirs_exist_ok=True)
    file = broken / "text_encoder_2" / "model.safetensors"
    state = load_file(file)
    del state["text_projection.weight"]
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"text_encoder_2: tensors do not fit CLIPTextModel: 1 missing "
                                              r"\(first: text_projection.weight\)"):
        load_pipeline(broken)

    shutil.copytree(sdxl, broken, dirs_exist_ok=True)
    config = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 128}))
    with pytest.raises(CheckpointError, match=r"unet: tensors do not fit UNet: \d+ of the wrong shape \(first: "
                                              r"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"):
        load_pipeline(broken)

    index = json.loads((sdxl / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(CheckpointError, match="names StableDiffusionXLImg2ImgPipeline.*refiner is not supported"):
        load_pipeline(broken)


def test_tokenizer_argument_takes_an_sdxl_folder(sdxl, tmp_path):
    pipe = load_pipeline(sdxl, tokenizer=sdxl)
    assert pipe.tokenizer_2.pad_id != pipe.tokenizer.pad_id
    with pytest.raises(CheckpointError, match="has no tokenizer_2/; SDXL needs two tokenizers"):
        load_pipeline(sdxl, tokenizer=sdxl / "tokenizer")


def test_folder_saved_by_diffusers_loads(sd1, tmp_path):
    # diffusers' save_pretrained (transformers 5) writes the tokenizer as tokenizer.json alone
    ref = StableDiffusionPipeline.from_pretrained(sd1, safety_checker=None, requires_safety_checker=False)
    ref.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "tokenizer" / "vocab.json").exists()
    pipe = load_pipeline(tmp_path / "saved")
    prompts = ["a photo of a cat", "WOW!! <|ENDOFTEXT|> <|endoftext|> " * 10]
    expected = ref.tokenizer(prompts, padding="max_length", max_length=ref.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    assert pipe.tokenizer(prompts).tolist() == expected.tolist()
    assert_matches(pipe, reference_outputs(sd1))


def test_loads_as_sdxl(sdxl_pair):
    ours, ref = sdxl_pair
    assert ours.family == "sdxl" and ours.force_zeros_for_empty_prompt
    assert ours.vae.config.scaling_factor == 0.13025
    assert ours.unet.config.context_dim == SDXL_WIDTH and ours.text_encoder_2.config.projection_dim == 40
    assert ours.tokenizer_2.pad_id == ref.tokenizer_2.convert_tokens_to_ids("!")
    assert ours.default_size == ref.default_sample_size * ref.vae_scale_factor == 2 * SDXL["unet"]["sample_size"]
    assert ours.scheduler.timestep_spacing == "leading" and ours.scheduler.steps_offset == 1


def test_prompts_are_padded_to_the_tokenizers_model_max_length(tmp_path):
    # a model made for 32 tokens: diffusers pads to tokenizer.model_max_length
    folder = make_sd_folder(tmp_path / "short", "sd1", max_length=32)
    pipe = load_pipeline(folder)
    assert pipe.tokenizer.max_length == 32
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    prompts = ["a photo of a cat", "a lighthouse on a cliff " * 10]
    with torch.no_grad():
        expected, _ = ref.encode_prompt(prompts, "cpu", 1, False)
        assert expected.shape[1] == 32
        assert_close_rel(pipe.text_encoder(pipe.tokenizer(prompts)), expected)
    kw = dict(prompt="a cat on a table", negative_prompt="dark", height=32, width=32)
    assert_same_image(generate(pipe, **kw, steps=4, progress=False),
                      pipeline_images(ref, num_inference_steps=4, **kw))
    # never longer than the text encoder's positions (some tokenizer configs hold 1e30)
    config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 10**30}))
    assert load_pipeline(folder).tokenizer.max_length == 32


def _without(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


@pytest.mark.parametrize("part, change, expected", [
    ("text_encoder", lambda c: {"model_type": "t5", "d_model": 128, "num_layers": 2}, "'t5'"),
    ("text_encoder", _without("hidden_size"), "'hidden_size'"),
    ("unet", _without("cross_attention_dim"), "'cross_attention_dim'"),
    ("unet", _without("down_block_types"), "'down_block_types'"),
    ("unet", lambda c: {**c, "block_out_channels": 64}, "wrong type"),
    ("unet", lambda c: [c], "JSON object"),
    ("vae", _without("block_out_channels"), "'block_out_channels'"),
    ("vae", lambda c: {**c, "_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
], ids=["t5-text", "no-hidden-size", "no-cross-attention-dim", "no-block-types", "channels-not-a-list",
        "a-list", "vae-no-channels", "tiny-vae"])
def test_wrong_configs_name_the_file_and_key(sd1, tmp_path, part, change, expected):
    folder = Path(shutil.copytree(sd1, tmp_path / "wrong"))
    file = folder / part / "config.json"
    file.write_text(json.dumps(change(json.loads(file.read_text()))))
    message = error_of(folder)
    assert str(file) in message and expected in message


@pytest.mark.parametrize("in_channels", [8, 5])  # instruct-pix2pix, depth (inpainting's 9 load: test_inpaint.py)
def test_pix2pix_and_depth_models_are_refused(sd1_file, sd1, tmp_path, in_channels):
    state = load_file(sd1_file)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    out, _, h, w = state[key].shape
    save_file({**state, key: torch.randn(out, in_channels, h, w)}, tmp_path / "inpaint.safetensors")
    message = error_of(tmp_path / "inpaint.safetensors", tokenizer=sd1 / "tokenizer")
    assert f"{in_channels} input channels" in message and "text-to-image" in message
    # a folder, even one whose model_index.json says StableDiffusionPipeline
    folder = Path(shutil.copytree(sd1, tmp_path / "folder"))
    unet = randomize_(UNet2DConditionModel(**FAMILIES["sd1"]["unet"], in_channels=in_channels))
    unet.save_pretrained(folder / "unet")
    message = error_of(folder)
    assert str(folder / "unet") in message and f"{in_channels} input channels" in message


