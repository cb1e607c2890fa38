"""An SDXL diffusers folder, written by diffusers' StableDiffusionXLPipeline with every tensor random,
loads strictly through weights.load_pipeline, and its conditioning (encode_text, time_ids) and UNet
match diffusers' on the same folder."""
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from checkpoints import SDXL, make_sdxl_folder
from helpers import assert_close_rel
from weights import CheckpointError, load_pipeline

WIDTH = SDXL["unet"]["cross_attention_dim"]  # 64 + 128
PROMPTS = ["a photo of a cat", "A castle on a hill, highly detailed, 8k!!", "", "wow! " * 40]


@pytest.fixture(scope="module")
def pair(sdxl):
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl)
    return load_pipeline(sdxl), ref


def test_loads_as_sdxl(pair):
    ours, ref = pair
    assert ours.family == "sdxl" and ours.force_zeros_for_empty_prompt
    assert ours.vae.config.scaling_factor == 0.13025
    assert ours.unet.config.context_dim == WIDTH and ours.text_encoder_2.config.projection_dim == 40
    assert ours.tokenizer_2.pad_id == ref.tokenizer_2.convert_tokens_to_ids("!")
    assert ours.default_size == ref.default_sample_size * ref.vae_scale_factor == 2 * SDXL["unet"]["sample_size"]
    assert ours.scheduler.timestep_spacing == "leading" and ours.scheduler.steps_offset == 1


@pytest.mark.parametrize("tokenizer", ["tokenizer", "tokenizer_2"])
def test_tokenizers_match_transformers(pair, sdxl, tokenizer):
    ours = getattr(pair[0], tokenizer)
    ref = CLIPTokenizer.from_pretrained(sdxl / tokenizer)
    expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours(PROMPTS).tolist() == expected.tolist()


@torch.no_grad()
def test_encode_text_matches_encode_prompt(pair):
    """Every prompt, "" included, is encoded; without a negative prompt the unconditional branch is zeros
    for both outputs (force_zeros_for_empty_prompt), and an explicit negative_prompt="" is encoded."""
    ours, ref = pair
    for prompt in PROMPTS:
        embeds, negative, pooled, negative_pooled = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                                      do_classifier_free_guidance=True)
        hidden, ours_pooled = ours.encode_text([prompt])
        assert hidden.shape == (1, 77, WIDTH) and ours_pooled.shape == (1, 40)
        assert_close_rel(hidden, embeds)
        assert_close_rel(ours_pooled, pooled)
        assert not negative.any() and not negative_pooled.any()
    unconditional = ours.unconditional
    assert torch.equal(unconditional.hidden, torch.zeros(77, WIDTH)) and torch.equal(unconditional.pooled,
                                                                                     torch.zeros(40))
    _, negative, _, negative_pooled = ref.encode_prompt("a dog", device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=True, negative_prompt="")
    hidden, pooled = ours.encode_text([""])
    assert negative.abs().max() > 0.1
    assert_close_rel(hidden, negative)
    assert_close_rel(pooled, negative_pooled)


@torch.no_grad()
def test_unconditional_is_the_encoded_empty_text_without_force_zeros(tmp_path):
    folder = make_sdxl_folder(tmp_path, seed=4, force_zeros_for_empty_prompt=False)
    ours, ref = load_pipeline(folder), StableDiffusionXLPipeline.from_pretrained(folder)
    assert not ours.force_zeros_for_empty_prompt and ours.unconditional == ""
    _, negative, _, negative_pooled = ref.encode_prompt("a dog", device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=True)
    hidden, pooled = ours.encode_text([ours.unconditional])
    assert negative.abs().max() > 0.1
    assert_close_rel(hidden, negative)
    assert_close_rel(pooled, negative_pooled)


@pytest.mark.parametrize("height, width, extra", [
    (1024, 1024, {}), (768, 1344, {}),
    (512, 640, dict(original_size=(2048, 1536), crop_top_left=(64, 32), target_size=(1024, 896))),
])
def test_time_ids_are_diffusers(pair, height, width, extra):
    ours, ref = pair
    original, crop, target = (extra.get("original_size", (height, width)), extra.get("crop_top_left", (0, 0)),
                              extra.get("target_size", (height, width)))
    expected = ref._get_add_time_ids(original, crop, target, dtype=torch.float32, text_encoder_projection_dim=40)
    assert ours.time_ids(height, width, **extra).tolist() == expected[0].tolist()


@torch.no_grad()
def test_unet_matches_diffusers(pair):
    ours, ref = pair
    g = torch.Generator().manual_seed(0)
    x, hidden, pooled = torch.randn(2, 4, 12, 10, generator=g), torch.randn(2, 77, WIDTH, generator=g), \
        torch.randn(2, 40, generator=g)
    time_ids = ours.time_ids(96, 80)
    expected = ref.unet(x, torch.tensor([901, 3]), encoder_hidden_states=hidden,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(2, -1)}).sample
    assert_close_rel(ours.unet(x, torch.tensor([901, 3]), hidden, pooled=pooled, time_ids=time_ids), expected)


@torch.no_grad()
def test_vae_decodes_like_diffusers(pair):
    ours, ref = pair
    latents = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    expected = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
    assert_close_rel(ours.vae.decode(latents), expected)


@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_vae_decodes_in_fp32_unless_fp16_safe(tmp_path, force_upcast):
    """diffusers decodes SDXL's VAE in fp32 when it is loaded in fp16 and its config says force_upcast
    (SDXL base's does; madebyollin/sdxl-vae-fp16-fix's does not)."""
    folder = make_sdxl_folder(tmp_path, seed=1, force_upcast=force_upcast)
    pipe = load_pipeline(folder, dtype=torch.float16)
    assert pipe.unet.conv_in.weight.dtype == torch.float16 and pipe.text_encoder_2.text_projection.weight.dtype \
        == torch.float16
    assert pipe.vae.post_quant_conv.weight.dtype == (torch.float32 if force_upcast else torch.float16)
    with torch.no_grad():
        images = pipe.vae.decode(torch.randn(1, 4, 4, 4, dtype=torch.float16))
    assert images.dtype == (torch.float32 if force_upcast else torch.float16)


def test_damaged_sdxl_folders_are_one_line_errors(sdxl, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sdxl, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(CheckpointError, match=r"missing subfolder tokenizer_2/ \(a diffusers folder of SDXL needs"):
        load_pipeline(broken)

    shutil.copytree(sdxl, broken, dirs_exist_ok=True)
    from safetensors.torch import load_file, save_file
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


def test_repo_id_loads_sdxl_from_the_hub_cache_offline(sdxl, tmp_path):
    """The hub patterns take text_encoder_2/ and tokenizer_2/ (and the fp16 variant for fp16 loads,
    falling back to the full-precision files a repo without one holds)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import hub_cache
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


def test_hub_patterns_take_sdxls_second_encoder_and_tokenizer():
    from fnmatch import fnmatch

    from checkpoint.hub import hub_patterns
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
