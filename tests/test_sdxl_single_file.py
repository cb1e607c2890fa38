"""SDXL original single files (Stability's sgm key names: conditioner.embedders.0/.1, label_emb,
bigG's fused in_proj and transposed text_projection): our export, read back by us and by diffusers'
from_single_file, and the full SDXL key set read off its shapes."""
import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file, save_file

from checkpoint.original import PREFIX, TEXT_ENCODERS, inspect_single_file, text_table, unet_table, vae_table
from helpers import assert_close_rel, assert_same_image, pipeline_images
from model.clip import SDXL_TEXT_G, SDXL_TEXT_L, CLIPTextModel
from model.unet import SDXL, UNet
from model.vae import AutoencoderKL, VAEConfig
from sampler.loop import generate
from weights import CheckpointError, load_pipeline


def test_export_has_the_sgm_layout(sdxl_file):
    state = load_file(sdxl_file)
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (256, 88)
    assert state["model.diffusion_model.label_emb.0.2.weight"].shape == (256, 256)
    assert state["conditioner.embedders.1.model.text_projection"].shape == (128, 40)  # [width, projection]
    assert state["conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"].shape == (384, 128)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state
    assert not any(k.startswith("cond_stage_model.") for k in state)


def test_export_loads_back_as_the_same_weights(sdxl, sdxl_file):
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


def test_diffusers_reads_our_export_as_the_same_weights(sdxl, sdxl_file):
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
def test_images_from_the_file_are_diffusers_from_single_file(sdxl, sdxl_file, sampler, scheduler):
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
