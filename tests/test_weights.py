"""Loading: both formats give the reference models' numbers; every error is one clear line."""
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from checkpoints import FAMILIES, make_sd_folder
from helpers import assert_close_rel, assert_same_image, hub_cache, pipeline_images, randomize_
from checkpoint.hub import hub_patterns
from checkpoint.original import inspect_single_file
from checkpoint.tensors import safetensors_keys
from sampler.ddim import DDIM
from sampler.loop import generate
from weights import CheckpointError, export_single_file, load_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def folder(request, tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp(request.param), request.param, seed=5)


def reference_outputs(folder):
    """The three models' outputs on fixed inputs, computed by diffusers and transformers."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text.config.vocab_size, (2, 77), generator=g)
    x, z = torch.randn(2, 4, 8, 12, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    images = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        context = text(ids).last_hidden_state
        sf = vae.config.scaling_factor
        return dict(ids=ids, x=x, z=z, images=images, context=context,
                    eps=unet(x, torch.tensor([999, 1]), encoder_hidden_states=context).sample,
                    decoded=vae.decode(z / sf).sample, encoded=vae.encode(images).latent_dist.mean * sf)


def assert_matches(pipe, ref):
    with torch.no_grad():
        assert_close_rel(pipe.text_encoder(ref["ids"]), ref["context"])
        assert_close_rel(pipe.unet(ref["x"], torch.tensor([999, 1]), ref["context"]), ref["eps"])
        assert_close_rel(pipe.vae.decode(ref["z"]), ref["decoded"])
        assert_close_rel(pipe.vae.encode(ref["images"]), ref["encoded"])


def test_folder_and_single_file_give_the_reference_numbers(folder, tmp_path):
    ref = reference_outputs(folder)
    pipe = load_pipeline(folder)
    assert pipe.family == folder.parent.name[:3] or pipe.family in ("sd1", "sd2")
    assert_matches(pipe, ref)
    file = export_single_file(folder, tmp_path / "model.safetensors")
    assert_matches(load_pipeline(file, tokenizer=folder / "tokenizer"), ref)


def test_single_file_family_and_pad_are_read_from_the_weights(folder, tmp_path):
    family = "sd2" if json.loads((folder / "unet" / "config.json").read_text()).get("use_linear_projection") else "sd1"
    file = export_single_file(folder, tmp_path / "model.safetensors")
    pipe = load_pipeline(file, tokenizer=folder / "tokenizer")
    assert pipe.family == family
    assert pipe.unet.config.linear_proj == (family == "sd2")
    assert pipe.tokenizer.pad_id == (0 if family == "sd2" else pipe.tokenizer.eos_id)


def test_diffusers_reads_our_single_file_as_the_same_weights(folder, tmp_path):
    file = export_single_file(folder, tmp_path / "model.safetensors")
    theirs = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    original = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(theirs, name).state_dict(), getattr(original, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"


def test_transformers5_text_keys_without_prefix(tmp_path):
    folder = make_sd_folder(tmp_path, "sd1", hub_text_prefix=False)
    assert not any(k.startswith("text_model.") for k in load_file(folder / "text_encoder" / "model.safetensors"))
    assert_matches(load_pipeline(folder), reference_outputs(folder))


def test_what_real_single_files_carry_is_tolerated(folder, tmp_path):
    file = export_single_file(folder, tmp_path / "model.safetensors")
    state = load_file(file)
    extras = {name: torch.rand(1000) for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev",
                                                  "sqrt_alphas_cumprod", "posterior_mean_coef2")}
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.diffusion_modelinput_blocks00weight"] = torch.rand(2, 2)
    if "cond_stage_model.model.token_embedding.weight" in state:
        extras["cond_stage_model.model.text_projection"] = torch.rand(128, 128)
        extras["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    else:
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    save_file({**state, **extras}, tmp_path / "real.safetensors")
    pipe = load_pipeline(tmp_path / "real.safetensors", tokenizer=folder / "tokenizer")
    assert_matches(pipe, reference_outputs(folder))


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


def _run(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_repo_id_loads_from_the_hub_cache_offline(sd1, tmp_path):
    hub_cache(tmp_path, "someone/tiny-sd", sd1)
    code = "from weights import load_pipeline; p = load_pipeline('someone/tiny-sd'); print(p.name, p.family)"
    result = _run(code, {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["someone/tiny-sd", "sd1"]


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


def error_of(source, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_pipeline(source, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_truncated_and_corrupt_files(sd1_file, tmp_path):
    data = sd1_file.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in error_of(tmp_path / "truncated.safetensors", tokenizer="unused")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(4096))
    assert "truncated or corrupt" in error_of(tmp_path / "garbage.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "empty.safetensors" in error_of(tmp_path / "empty.safetensors")


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


def test_wrong_or_damaged_single_files(sd1_file, sd1, tmp_path):
    state = load_file(sd1_file)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    save_file({k: v for k, v in state.items() if k != key}, tmp_path / "missing.safetensors")
    message = error_of(tmp_path / "missing.safetensors", tokenizer=sd1 / "tokenizer")
    assert "missing" in message and "proj_in" in message

    save_file({**state, "model.diffusion_model.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    assert "model.diffusion_model.extra.weight" in error_of(tmp_path / "extra.safetensors", tokenizer=sd1 / "tokenizer")

    key = "first_stage_model.decoder.conv_out.bias"
    save_file({**state, key: torch.zeros(5)}, tmp_path / "shape.safetensors")
    message = error_of(tmp_path / "shape.safetensors", tokenizer=sd1 / "tokenizer")
    assert "wrong shape" in message and "conv_out.bias" in message

    save_file({**state, "conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, tmp_path / "xl.safetensors")
    assert "SDXL" in error_of(tmp_path / "xl.safetensors")

    save_file({k: v for k, v in state.items() if k.startswith("first_stage_model.")}, tmp_path / "part.safetensors")
    assert "no UNet" in error_of(tmp_path / "part.safetensors")
    vae = {k.removeprefix("first_stage_model."): v for k, v in state.items() if k.startswith("first_stage_model.")}
    save_file(vae, tmp_path / "vae.safetensors")  # how standalone VAE releases are stored
    assert "VAE alone" in error_of(tmp_path / "vae.safetensors")


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


@pytest.mark.parametrize("drop", [
    "model.diffusion_model.out.2.", "model.diffusion_model.input_blocks.1.", ".attn2.",
    "first_stage_model.encoder.conv_in.", "first_stage_model.encoder.down.", "first_stage_model.post_quant_conv.",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.",
    "cond_stage_model.transformer.text_model.encoder.layers.",
])
def test_partial_single_files_name_a_missing_tensor(sd1_file, sd1, tmp_path, drop):
    save_file({k: v for k, v in load_file(sd1_file).items() if drop not in k}, tmp_path / "partial.safetensors")
    message = error_of(tmp_path / "partial.safetensors", tokenizer=sd1 / "tokenizer")
    assert "partial.safetensors" in message and drop in message


@pytest.mark.parametrize("in_channels", [9, 8])  # inpainting, instruct-pix2pix
def test_inpainting_and_pix2pix_models_are_refused(sd1_file, sd1, tmp_path, in_channels):
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


def vit_h_text_shapes(layers: int) -> dict[str, tuple]:
    """The shapes of SD2's text encoder (OpenCLIP ViT-H/14) in a single file, with `layers` layers."""
    prefix, w = "cond_stage_model.model.", 1024
    shapes = {f"{prefix}token_embedding.weight": (49408, w), f"{prefix}positional_embedding": (77, w),
              f"{prefix}ln_final.weight": (w,), f"{prefix}ln_final.bias": (w,)}
    layer = {"ln_1.weight": (w,), "ln_1.bias": (w,), "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
             "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
             "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,), "mlp.c_proj.weight": (w, 4 * w),
             "mlp.c_proj.bias": (w,)}
    for i in range(layers):
        shapes.update({f"{prefix}transformer.resblocks.{i}.{k}": s for k, s in layer.items()})
    return shapes


def test_sd2_single_files_run_the_text_layers_diffusers_runs(tmp_path):
    # Real SD2 files hold ViT-H's 24 text layers and SD2 runs the first 23. diffusers skips layer 23
    # by name, so a file holding only the 23 runs them all. Shapes only: the real size is 1.4 GB.
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
    skipped = {k.split(".")[4] for k in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE if ".resblocks." in k}
    assert skipped == {"23"}
    file = export_single_file(make_sd_folder(tmp_path / "sd2", "sd2"), tmp_path / "sd2.safetensors")
    others = {k: s for k, s in safetensors_keys(file).items() if not k.startswith("cond_stage_model.")}
    for layers in (24, 23):
        family, *_, text = inspect_single_file({**others, **vit_h_text_shapes(layers)}, "sd2.safetensors")[:4]
        assert family == "sd2" and text.width == 1024 and text.num_layers == 23, layers


def _resaved(file: Path, out: Path, metadata=None, **markers) -> Path:
    """`file` saved again with only `metadata` (besides format) and `markers` added as tensors."""
    save_file({**load_file(file), **markers}, out, metadata={"format": "pt", **(metadata or {})})
    return out


def test_a_v_model_exported_says_so_and_makes_diffusers_image(sd2v, tmp_path, capsys):
    # Before, the file did not say it, epsilon was assumed in silence and the image was wrong.
    file = export_single_file(sd2v, tmp_path / "v.safetensors")
    assert safe_open(str(file), "pt").metadata()["modelspec.prediction_type"] == "v"
    pipe = load_pipeline(file, tokenizer=sd2v / "tokenizer")
    assert pipe.scheduler.prediction_type == "v_prediction" and pipe.unet.config.sample_size == 96
    assert capsys.readouterr().err == ""
    ref = StableDiffusionPipeline.from_pretrained(sd2v, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt="a lighthouse", negative_prompt="fog", height=32, width=32)
    assert_same_image(generate(pipe, **kw, steps=4, progress=False), pipeline_images(ref, num_inference_steps=4, **kw))


@pytest.mark.parametrize("metadata, markers, expected", [
    ({"modelspec.prediction_type": "v"}, {}, "v_prediction"),
    ({"modelspec.prediction_type": "epsilon"}, {}, "epsilon"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, {}, "v_prediction"),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, {}, "epsilon"),
    ({}, {"v_pred": torch.tensor([])}, "v_prediction"),
    ({}, {"global_step": torch.tensor(875000)}, "epsilon"),
    ({"modelspec.prediction_type": "epsilon", "modelspec.architecture": "stable-diffusion-v2-768-v"}, {}, "epsilon"),
], ids=["modelspec-v", "modelspec-eps", "architecture-768-v", "architecture-512", "v_pred-key", "sd2-base-step",
        "stated-type-wins"])
def test_sd2_files_that_say_their_prediction_type_are_read_so(sd2v, tmp_path, capsys, metadata, markers, expected):
    file = _resaved(export_single_file(sd2v, tmp_path / "exported.safetensors"), tmp_path / "m.safetensors",
                    metadata, **markers)
    pipe = load_pipeline(file, tokenizer=sd2v / "tokenizer")
    assert pipe.scheduler.prediction_type == expected and not pipe.scheduler.rescale_betas_zero_snr
    assert capsys.readouterr().err == ""


def test_sd2_file_that_does_not_say_is_epsilon_with_one_warning(sd2v, tmp_path, capsys):
    plain = _resaved(export_single_file(sd2v, tmp_path / "exported.safetensors"), tmp_path / "plain.safetensors",
                     global_step=torch.tensor(110000))  # a step that tells nothing
    pipe = load_pipeline(plain, tokenizer=sd2v / "tokenizer")
    assert pipe.scheduler.prediction_type == "epsilon"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: plain.safetensors:"), lines
    assert "assuming epsilon" in lines[0] and "--prediction-type v" in lines[0] and 'prediction_type="v"' in lines[0]
    # the caller's choice is no guess: no warning, and it wins over what a file says
    assert load_pipeline(plain, tokenizer=sd2v / "tokenizer", prediction_type="v").scheduler.prediction_type == "v_prediction"
    stated = _resaved(plain, tmp_path / "stated.safetensors", {"modelspec.prediction_type": "v"})
    assert load_pipeline(stated, tokenizer=sd2v / "tokenizer", prediction_type="epsilon").scheduler.prediction_type == "epsilon"
    assert capsys.readouterr().err == ""


def test_sd1_files_are_epsilon_without_a_warning(sd1_file, sd1, tmp_path, capsys):
    plain = _resaved(sd1_file, tmp_path / "plain.safetensors")
    assert load_pipeline(plain, tokenizer=sd1 / "tokenizer").scheduler.prediction_type == "epsilon"
    v = _resaved(sd1_file, tmp_path / "v.safetensors", v_pred=torch.tensor([]))  # SD1 v fine-tunes exist
    assert load_pipeline(v, tokenizer=sd1 / "tokenizer").scheduler.prediction_type == "v_prediction"
    assert capsys.readouterr().err == ""


def test_zero_terminal_snr_marker_and_unknown_stated_types(sd1_file, sd1, tmp_path):
    zsnr = _resaved(sd1_file, tmp_path / "zsnr.safetensors", v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    scheduler = load_pipeline(zsnr, tokenizer=sd1 / "tokenizer").scheduler
    assert scheduler.prediction_type == "v_prediction" and scheduler.rescale_betas_zero_snr
    flow = _resaved(sd1_file, tmp_path / "flow.safetensors", {"modelspec.prediction_type": "flow"})
    message = error_of(flow, tokenizer=sd1 / "tokenizer")
    assert "modelspec.prediction_type='flow'" in message and "--prediction-type" in message
    assert load_pipeline(flow, tokenizer=sd1 / "tokenizer", prediction_type="epsilon").scheduler.prediction_type == "epsilon"


def test_single_file_tokenizer_may_be_a_diffusers_folder(sd1_file, sd1):
    """--tokenizer DIR takes a pipeline folder too, whose tokenizer/ is used (SDXL's: tokenizer/ and
    tokenizer_2/)."""
    from_folder = load_pipeline(sd1_file, tokenizer=sd1)
    from_tokenizer = load_pipeline(sd1_file, tokenizer=sd1 / "tokenizer")
    texts = ["a photo of a cat", ""]
    assert from_folder.tokenizer(texts).tolist() == from_tokenizer.tokenizer(texts).tolist()
