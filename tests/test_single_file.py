"""Original single files, the format most fine-tunes are shared in (Stability's key names; SDXL's sgm names:
conditioner.embedders.0/.1, label_emb, bigG's fused in_proj and transposed text_projection): our export of
SD1, SD2 and SDXL read back by us and by diffusers' from_single_file, the family, text layers and prediction
type read off the file, the full SDXL key set read off its shapes, and damaged files as one-line errors."""
import dataclasses
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoint.original import PREFIX, TEXT_ENCODERS, inspect_single_file, text_table, unet_table, vae_table
from checkpoint.tensors import safetensors_header
from checkpoints import make_sd_folder
from helpers import (assert_close_rel, assert_matches, assert_same_image, error_of, pipeline_images,
                     reference_outputs)
from model.clip import SDXL_TEXT_G, SDXL_TEXT_L, CLIPTextModel
from model.unet import SDXL, UNet
from model.vae import AutoencoderKL, VAEConfig
from sampler.loop import generate
from weights import CheckpointError, export_single_file, load_pipeline


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def folder(request, tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp(request.param), request.param, seed=5)


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


def test_truncated_and_corrupt_files(sd1_file, tmp_path):
    data = sd1_file.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in error_of(tmp_path / "truncated.safetensors", tokenizer="unused")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(4096))
    assert "truncated or corrupt" in error_of(tmp_path / "garbage.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "empty.safetensors" in error_of(tmp_path / "empty.safetensors")


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
    others = {k: s for k, s in safetensors_header(file)[0].items() if not k.startswith("cond_stage_model.")}
    for layers in (24, 23):
        family, *_, text = inspect_single_file({**others, **vit_h_text_shapes(layers)}, "sd2.safetensors")[:4]
        assert family == "sd2" and text.width == 1024 and text.num_layers == 23, layers


def _resaved(file: Path, out: Path, metadata=None, **markers) -> Path:
    """`file` saved again with only `metadata` (besides format) and `markers` added as tensors."""
    save_file({**load_file(file), **markers}, out, metadata={"format": "pt", **(metadata or {})})
    return out


def test_an_export_replaces_the_file_whole_or_not_at_all(sd1, tmp_path):
    """A disk that fills up mid-export (here a file-size limit, RLIMIT_FSIZE, below the export's size) is one
    line and exit 2; the file it was to replace is as it was, and no partial file is left beside it. A whole
    export gets the permissions a plain open() would give it, as every file this project writes."""
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the old file")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))  # Python ignores SIGXFSZ: EFBIG
    done = subprocess.run([sys.executable, "weights.py", "export", str(sd1), str(out)], preexec_fn=limit,
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {out}"), done.stderr[-2000:]
    assert out.read_bytes() == b"the old file" and os.listdir(tmp_path) == [out.name]
    umask = os.umask(0)
    os.umask(umask)
    assert load_file(export_single_file(sd1, out)) and os.listdir(tmp_path) == [out.name]
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


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
    plain = _resaved(export_single_file(sd2v, tmp_path / "exported.safetensors"),
                     tmp_path / "plain\x1b]0;title\x07.safetensors",  # its name shown, not obeyed by the terminal
                     global_step=torch.tensor(110000))  # a step that tells nothing
    pipe = load_pipeline(plain, tokenizer=sd2v / "tokenizer")
    assert pipe.scheduler.prediction_type == "epsilon"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: plain\\x1b]0;title\\x07.safetensors:"), lines
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


# ---------------------------------------------------------------- SDXL

def test_sdxl_export_has_the_sgm_layout(sdxl_file):
    state = load_file(sdxl_file)
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (256, 88)
    assert state["model.diffusion_model.label_emb.0.2.weight"].shape == (256, 256)
    assert state["conditioner.embedders.1.model.text_projection"].shape == (128, 40)  # [width, projection]
    assert state["conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"].shape == (384, 128)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state
    assert not any(k.startswith("cond_stage_model.") for k in state)


def test_sdxl_export_loads_back_as_the_same_weights(sdxl, sdxl_file):
    ours, back = load_pipeline(sdxl, pack=False), load_pipeline(sdxl_file, tokenizer=sdxl, pack=False)
    assert back.family == "sdxl" and back.force_zeros_for_empty_prompt and back.vae.config.scaling_factor == 0.13025
    assert back.scheduler.timestep_spacing == "leading"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, name), getattr(back, name)
        # the latent size it was trained at is not in a single file: SDXL's 128 is assumed
        assert dataclasses.replace(a.config, **({"sample_size": 128} if name == "unet" else {})) == b.config, name
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    texts = ["a lighthouse", ""]
    for x, y in zip(ours.encode_text(texts), back.encode_text(texts)):
        torch.testing.assert_close(x, y)  # equal weights; the projection read transposed may sum in another order


def test_diffusers_reads_our_sdxl_export_as_the_same_weights(sdxl, sdxl_file):
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl)
    from_file = StableDiffusionXLPipeline.from_single_file(str(sdxl_file), config=str(sdxl), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(ref, name).state_dict(), getattr(from_file, name).state_dict()
        sa = {k: v for k, v in sa.items() if not k.endswith("position_ids")}
        sb = {k: v for k, v in sb.items() if not k.endswith("position_ids")}
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    with torch.no_grad():
        expected = ref.encode_prompt("a red fox", device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
        got = from_file.encode_prompt("a red fox", device="cpu", num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
    assert_close_rel(got[0], expected[0])
    assert_close_rel(got[2], expected[2])


@pytest.mark.parametrize("sampler, scheduler", [("ddim", DDIMScheduler), ("dpm++2m", DPMSolverMultistepScheduler)])
def test_sdxl_images_from_the_file_are_diffusers_from_single_file(sdxl, sdxl_file, sampler, scheduler):
    """Same seed, same image (within 2 levels) as StableDiffusionXLPipeline.from_single_file on our
    export, with the empty negative as zeros and the size ids of a non-square image."""
    ref = StableDiffusionXLPipeline.from_single_file(str(sdxl_file), config=str(sdxl), local_files_only=True)
    ref.scheduler = scheduler.from_pretrained(sdxl, subfolder="scheduler")
    ref.set_progress_bar_config(disable=True)
    ours = generate(load_pipeline(sdxl_file, tokenizer=sdxl), "a lighthouse at dusk", steps=4, height=32, width=48,
                    sampler=sampler, seed=5, progress=False)
    expected = pipeline_images(ref, "a lighthouse at dusk", seed=5, num_inference_steps=4, height=32, width=48,
                               guidance_scale=7.5)  # generate()'s default; StableDiffusionXLPipeline's is 5
    assert_same_image(ours, expected)


def full_sdxl_shapes() -> dict[str, tuple]:
    """The key -> shape set of a full SDXL base single file as our tables write it, from models on
    the meta device (the real file is 6.9 GB in fp16)."""
    shapes = {}
    with torch.device("meta"):
        vae_cfg = VAEConfig(scaling_factor=0.13025)
        models = [("unet", UNet(SDXL), unet_table(SDXL)), ("vae", AutoencoderKL(vae_cfg), vae_table(vae_cfg))]
        models += [(name, CLIPTextModel(cfg), text_table(cfg, name))
                   for name, cfg in zip(TEXT_ENCODERS["sdxl"], (SDXL_TEXT_L, SDXL_TEXT_G))]
    for prefix, model, table in models:
        state = model.state_dict()
        for key, o in table.items():
            shape = tuple(state[key].shape)
            if o.part is not None:
                shape = (3 * shape[0], *shape[1:])
            if o.conv:
                shape = (*shape, 1, 1)
            shapes[PREFIX[prefix] + o.key] = shape[::-1] if o.transpose else shape
    return shapes


def test_full_sdxl_key_set_is_read_as_sdxl_base():
    shapes = full_sdxl_shapes()
    family, unet, vae, text, text_2 = inspect_single_file(shapes, "sd_xl_base_1.0.safetensors")
    assert family == "sdxl" and unet == SDXL and text == SDXL_TEXT_L and text_2 == SDXL_TEXT_G
    assert vae == VAEConfig(scaling_factor=0.13025)
    # diffusers recognizes the same key set as SDXL base (it reads keys and shapes only)
    with torch.device("meta"):
        checkpoint = {k: torch.empty(s) for k, s in shapes.items()}
    assert infer_diffusers_model_type(checkpoint) == "xl_base"
    # the sgm names of the real release, a few of each kind
    for key, shape in [("model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
                       ("model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
                       ("model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight",
                        (10240, 1280)),
                       ("model.diffusion_model.output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
                       ("model.diffusion_model.output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
                       ("conditioner.embedders.1.model.text_projection", (1280, 1280)),
                       ("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (3840, 1280)),
                       ("conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight", (3072, 768)),
                       ("first_stage_model.decoder.up.0.block.2.conv2.weight", (128, 128, 3, 3))]:
        assert shapes[key] == shape, key


def test_damaged_sdxl_files_are_one_line_errors(sdxl_file, sdxl, tmp_path):
    state = load_file(sdxl_file)
    no_bigg = {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}
    save_file(no_bigg, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"no text encoder \(conditioner\.embedders\.1\.model\.\*\)"):
        load_pipeline(tmp_path / "a.safetensors", tokenizer=sdxl)
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"
    save_file({k: v for k, v in state.items() if k != key}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"3 missing \(first: conditioner.embedders.1.model.transformer.resblocks"
                                              r".0.attn.in_proj_bias\); read as an SDXL single file"):
        load_pipeline(tmp_path / "b.safetensors", tokenizer=sdxl)
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in state.items()
               if not k.startswith("conditioner.embedders.0.")}
    save_file(refiner, tmp_path / "refiner.safetensors")
    with pytest.raises(CheckpointError, match="the SDXL refiner"):
        load_pipeline(tmp_path / "refiner.safetensors", tokenizer=sdxl)
    with pytest.raises(CheckpointError, match="has no tokenizer_2/; SDXL needs two tokenizers"):
        load_pipeline(sdxl_file, tokenizer=sdxl / "tokenizer")
