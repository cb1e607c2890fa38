"""Parity of model/clip.py and model/clip_vision.py with transformers' CLIP on random weights (small configs):
the text tower as SD1 and SD2 read it, SDXL's two (CLIP ViT-L and OpenCLIP ViT-bigG at the penultimate hidden
state without the final LayerNorm, bigG's pooled output through its text projection), the vision tower, both
towers' features, low precision, and the image preprocessing."""
import dataclasses

import pytest
import torch
import transformers
from helpers import assert_close_rel, clip_features, randomize_, rel_err

from checkpoint.sdxl import penultimate, text_config_with_projection
from model.clip import SD2_TEXT, SDXL_TEXT_G, SDXL_TEXT_L, CLIPTextConfig, CLIPTextModel
from model.clip_vision import CLIP_MEAN, CLIP_STD, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, preprocess

VOCAB = 1000
BOS, EOS = VOCAB - 2, VOCAB - 1  # as in CLIP, EOS is the largest id

TEXT_SD1 = CLIPTextConfig(vocab_size=VOCAB, width=48, num_layers=2, num_heads=4, mlp_dim=96,
                          act="quick_gelu")
TEXT_SD2 = CLIPTextConfig(vocab_size=VOCAB, width=64, num_layers=2, num_heads=4, mlp_dim=128,
                          act="gelu")
VISION = CLIPVisionConfig(image_size=32, patch_size=8, width=48, num_layers=2, num_heads=4,
                          mlp_dim=96)
CLIP = CLIPConfig(text=TEXT_SD1, vision=VISION, projection_dim=40)


def hf_text_config(c: CLIPTextConfig, eos_token_id: int) -> transformers.CLIPTextConfig:
    # eos_token_id=2 is the legacy value found in the SD / openai hub configs; transformers
    # then pools at ids.argmax(). Any other value makes it pool at the first EOS.
    return transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, max_position_embeddings=c.max_positions, hidden_size=c.width,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim, hidden_act=c.act, layer_norm_eps=c.eps,
        bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=1)


def hf_vision_config(c: CLIPVisionConfig) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(
        image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.width,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim, hidden_act=c.act, layer_norm_eps=c.eps)


def reference(cls, config, seed=0):
    """A transformers model with every tensor random, using eager (explicit-mask) attention."""
    config._attn_implementation = "eager"
    return randomize_(cls(config).eval(), seed)


def copy_into(ours: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    sd = {k.replace("pre_layrnorm", "pre_layernorm"): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    return ours.eval()


def prompt_ids(lengths, pad_id, T=77, seed=0):
    """[B, T] ids like a tokenizer makes: BOS, content, EOS, then padding (lengths = content)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0] = BOS
        ids[b, 1:n + 1] = torch.randint(1, BOS, (n,), generator=g)
        ids[b, n + 1] = EOS
    return ids


# ---------------------------------------------------------------- text tower

@pytest.mark.parametrize("config, pad_id, eos_token_id", [
    (TEXT_SD1, EOS, 2),    # SD1: pad with EOS; legacy hub config -> argmax pooling
    (TEXT_SD2, 0, EOS),    # SD2: pad with 0 ("!"); modern config -> first-EOS pooling
], ids=["sd1", "sd2"])
@torch.no_grad()
def test_text_model_matches_transformers(config, pad_id, eos_token_id):
    ref = reference(transformers.CLIPTextModel, hf_text_config(config, eos_token_id))
    ours = copy_into(CLIPTextModel(config), ref)
    ids = prompt_ids([0, 5, 30, 75], pad_id)  # empty prompt ... truncated full prompt
    expected = ref(input_ids=ids)

    hidden = ours(ids)
    assert_close_rel(hidden, expected.last_hidden_state)
    assert_close_rel(ours.at_eos(hidden, ids), expected.pooler_output)


@torch.no_grad()
def test_text_model_is_causal_and_unmasked():
    ours = randomize_(CLIPTextModel(TEXT_SD1).eval())
    a, b = prompt_ids([5, 5], EOS, seed=0), prompt_ids([5, 5], EOS, seed=0)
    b[1, 10:] = 3  # change only the padding of the second prompt
    ha, hb = ours(a), ours(b)
    assert torch.equal(ha[:, :10], hb[:, :10])    # earlier positions cannot see it (causal)
    assert rel_err(ha[1, 10:], hb[1, 10:]) > 1e-2  # later ones do (no padding mask)


def test_state_dict_names_match_hub_text_encoder():
    """transformers 5 writes CLIPTextModel keys without `text_model.`; hub text_encoder files
    carry it (they use CLIPModel's naming). Ours must equal the first and the second with the
    prefix stripped, shapes included."""
    ours = {k: v.shape for k, v in CLIPTextModel(TEXT_SD1).state_dict().items()}
    text_only = transformers.CLIPTextModel(hf_text_config(TEXT_SD1, 2))
    assert ours == {k: v.shape for k, v in text_only.state_dict().items()}

    full = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=hf_text_config(TEXT_SD1, 2), vision_config=hf_vision_config(VISION),
        projection_dim=40))
    hub = {k: v.shape for k, v in full.state_dict().items() if k.startswith("text_model.")}
    assert ours == {k.removeprefix("text_model."): v for k, v in hub.items()}
    assert not any("position_ids" in k for k in ours)


# ---------------------------------------------------------------- SDXL's two text towers

# the two SDXL towers, small: 3 layers so that the penultimate state is neither the first nor the last
TEXT_L = CLIPTextConfig(vocab_size=VOCAB, width=48, num_layers=3, num_heads=4, mlp_dim=96, act="quick_gelu",
                        context_layer=-2, context_norm=False)
TEXT_G = CLIPTextConfig(vocab_size=VOCAB, width=64, num_layers=3, num_heads=4, mlp_dim=128, act="gelu",
                        context_layer=-2, context_norm=False, projection_dim=40)


def copy_text_into(ours: CLIPTextModel, ref) -> CLIPTextModel:
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}, strict=True)
    return ours.eval()


@pytest.mark.parametrize("pad_id, eos_token_id", [(EOS, 2), (0, 2), (0, EOS)],
                         ids=["pad-eos", "pad-!-legacy-eos", "pad-!-first-eos"])
@torch.no_grad()
def test_vit_l_penultimate_matches_transformers(pad_id, eos_token_id):
    ref = reference(transformers.CLIPTextModel, hf_text_config(TEXT_L, eos_token_id))
    ours = copy_text_into(CLIPTextModel(TEXT_L), ref)
    ids = prompt_ids([0, 5, 30, 75], pad_id)
    expected = ref(input_ids=ids, output_hidden_states=True)
    assert_close_rel(ours(ids), expected.hidden_states[-2])
    context, pooled = ours.encode(ids)
    assert_close_rel(context, expected.hidden_states[-2])
    assert_close_rel(pooled, expected.pooler_output)  # no projection: the final-LN'd EOS state


@pytest.mark.parametrize("pad_id, eos_token_id", [(0, 2), (0, EOS), (EOS, 2)],
                         ids=["pad-!-legacy-eos", "pad-!-first-eos", "pad-eos"])
@torch.no_grad()
def test_bigg_penultimate_and_projected_pool_match_transformers(pad_id, eos_token_id):
    config = hf_text_config(TEXT_G, eos_token_id)
    config.projection_dim = TEXT_G.projection_dim
    ref = reference(transformers.CLIPTextModelWithProjection, config, seed=3)
    ours = copy_text_into(CLIPTextModel(TEXT_G), ref)
    ids = prompt_ids([0, 5, 30, 75], pad_id, seed=1)
    expected = ref(input_ids=ids, output_hidden_states=True)
    context, pooled = ours.encode(ids)
    assert_close_rel(context, expected.hidden_states[-2])
    assert_close_rel(pooled, expected.text_embeds)
    assert_close_rel(ours(ids), expected.hidden_states[-2])


@pytest.mark.parametrize("eos_token_id", [2, EOS, 500, 49407],
                         ids=["legacy-2", "eos", "eos-not-the-largest-id", "transformers-default-not-in-vocab"])
@torch.no_grad()
def test_pooled_output_is_where_the_config_says_as_in_transformers(eos_token_id):
    """transformers pools at ids.argmax() for the legacy eos_token_id 2 of the hub's SD configs, else at
    the first eos_token_id (position 0 when the ids lack it, as with CLIPTextConfig's default 49407 and a
    small vocabulary). The config goes through the loader's reader, as a checkpoint's config.json does."""
    config = hf_text_config(TEXT_G, eos_token_id)
    config.projection_dim = TEXT_G.projection_dim
    ref = reference(transformers.CLIPTextModelWithProjection, config, seed=4)
    ours = copy_text_into(CLIPTextModel(penultimate(text_config_with_projection(config.to_dict()))), ref)
    ids = prompt_ids([0, 5, 30, 75], 0, seed=2)
    ids[ids == EOS] = EOS if eos_token_id in (2, 49407) else eos_token_id
    assert_close_rel(ours.encode(ids)[1], ref(input_ids=ids).text_embeds)


@torch.no_grad()
def test_context_layer_and_norm_are_what_the_config_says():
    """The last layer with the final LN is SD1/SD2's context (transformers' last_hidden_state);
    -3 reads two layers before the end (a 'clip skip' of 2)."""
    ref = reference(transformers.CLIPTextModel, hf_text_config(TEXT_L, 2), seed=5)
    ids = prompt_ids([4, 9], EOS)
    expected = ref(input_ids=ids, output_hidden_states=True)
    last = copy_text_into(CLIPTextModel(dataclasses.replace(TEXT_L, context_layer=-1, context_norm=True)), ref)
    assert_close_rel(last(ids), expected.last_hidden_state)
    earlier = copy_text_into(CLIPTextModel(dataclasses.replace(TEXT_L, context_layer=-3)), ref)
    assert_close_rel(earlier(ids), expected.hidden_states[-3])
    normed = copy_text_into(CLIPTextModel(dataclasses.replace(TEXT_L, context_norm=True)), ref)
    assert_close_rel(normed(ids), ref.final_layer_norm(expected.hidden_states[-2]))


def test_sdxl_presets_are_the_hub_configs():
    """stabilityai/stable-diffusion-xl-base-1.0 text_encoder/ and text_encoder_2/config.json."""
    hub_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768, vocab_size=49408, max_position_embeddings=77)
    hub_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280, vocab_size=49408, max_position_embeddings=77)
    for preset, hub in [(SDXL_TEXT_L, hub_l), (SDXL_TEXT_G, hub_g)]:
        assert (preset.width, preset.mlp_dim, preset.num_layers, preset.num_heads, preset.act,
                preset.vocab_size, preset.max_positions) == (
            hub["hidden_size"], hub["intermediate_size"], hub["num_hidden_layers"], hub["num_attention_heads"],
            hub["hidden_act"], hub["vocab_size"], hub["max_position_embeddings"])
        assert (preset.context_layer, preset.context_norm) == (-2, False)
    assert SDXL_TEXT_G.projection_dim == hub_g["projection_dim"] and SDXL_TEXT_L.projection_dim == 0
    assert SDXL_TEXT_L.width + SDXL_TEXT_G.width == 2048  # the SDXL UNet's cross-attention width
    assert (SD2_TEXT.context_layer, SD2_TEXT.context_norm) == (-1, True)


def test_full_bigg_layout_keys_and_shapes_are_transformers():
    config = transformers.CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                         num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
    with torch.device("meta"):
        ref = transformers.CLIPTextModelWithProjection(config)
        ours = CLIPTextModel(SDXL_TEXT_G)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k.removeprefix("text_model."): v.shape for k, v in ref.state_dict().items()}


# ---------------------------------------------------------------- vision tower

@torch.no_grad()
def test_vision_model_matches_transformers():
    ref = reference(transformers.CLIPVisionModel, hf_vision_config(VISION))
    ours = copy_into(CLIPVisionModel(VISION), ref)
    pixels = torch.randn(3, 3, 32, 32)
    expected = ref(pixel_values=pixels)

    hidden = ours(pixels)
    assert_close_rel(hidden, expected.last_hidden_state)
    assert_close_rel(ours.class_token(hidden), expected.pooler_output)


# ---------------------------------------------------------------- both towers

@pytest.fixture(scope="module")
def clip_pair():
    config = transformers.CLIPConfig(
        text_config=hf_text_config(CLIP.text, 2), vision_config=hf_vision_config(CLIP.vision),
        projection_dim=CLIP.projection_dim)
    ref = reference(transformers.CLIPModel, config, seed=1)
    return ref, copy_into(CLIPModel(CLIP), ref)


def test_clip_model_keys_equal_transformers(clip_pair):
    ref, ours = clip_pair
    renamed = {k.replace("pre_layrnorm", "pre_layernorm") for k in ref.state_dict()}
    assert set(ours.state_dict()) == renamed
    assert "vision_model.pre_layernorm.weight" in renamed


@torch.no_grad()
def test_clip_model_features_match_transformers(clip_pair):
    ref, ours = clip_pair
    ids = prompt_ids([3, 12, 75], EOS)
    pixels = torch.randn(2, 3, 32, 32)
    assert_close_rel(ours.encode_text(ids), clip_features(ref.get_text_features(input_ids=ids)))
    assert_close_rel(ours.encode_image(pixels),
                     clip_features(ref.get_image_features(pixel_values=pixels)))
    assert torch.equal(ours.logit_scale, ref.logit_scale)


# ---------------------------------------------------------------- low precision

# bf16 keeps ~3 significant digits, fp16 ~4; measured errors on these 2-layer models are about
# 1e-2 (bf16) and 8e-3 (fp16), so 3e-2 is loose but still catches a wrong dtype path.
LOW_PRECISION_TOL = 3e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_close_to_fp32(dtype):
    model = randomize_(CLIPModel(CLIP).eval())
    ids = prompt_ids([4, 20], EOS)
    pixels = torch.randn(2, 3, 32, 32)
    full = model.text_model(ids), model.encode_text(ids), model.encode_image(pixels)

    model = model.to(dtype)
    low = model.text_model(ids), model.encode_text(ids), model.encode_image(pixels)  # fp32 pixels
    for lo, fu in zip(low, full):
        assert lo.dtype == dtype
        assert_close_rel(lo.float(), fu, tol=LOW_PRECISION_TOL)


# ---------------------------------------------------------------- preprocess

def test_preprocess_shape_and_constant_image():
    for H, W in [(40, 60), (70, 35), (32, 32)]:
        images = torch.full((2, 3, H, W), 0.2)  # 0.2 in [-1, 1] is 0.6 in [0, 1]
        out = preprocess(images, image_size=32)
        assert out.shape == (2, 3, 32, 32)
        mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        expected = ((0.6 - mean) / std).view(1, 3, 1, 1).expand_as(out)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_preprocess_crops_the_center():
    """Short side already at size: no resampling, only the centered crop remains."""
    images = torch.rand(1, 3, 32, 48) * 2 - 1
    out = preprocess(images, image_size=32)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    crop = ((images[..., 8:40] + 1) / 2 - mean) / std
    torch.testing.assert_close(out, crop, rtol=0, atol=1e-5)


def test_preprocess_close_to_clip_image_processor():
    """Against transformers' PIL processor on a smooth image. Not exact: PIL's bicubic kernel
    (a=-0.5) differs from torch's (a=-0.75) and PIL works on 8-bit images."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(-1, 1, 90), torch.linspace(-1, 1, 60), indexing="ij")
    images = torch.stack([torch.sin(3 * x), torch.cos(2 * y), x * y]).unsqueeze(0)  # [1, 3, 90, 60]
    u8 = ((images[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                      crop_size={"height": 32, "width": 32})
    expected = processor(images=Image.fromarray(u8), return_tensors="pt")["pixel_values"]
    out = preprocess(images, image_size=32)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 0.05  # ~1.5% of the [0, 1] range after the std divide
