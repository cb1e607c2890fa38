"""SDXL's text encoders against transformers on random weights: CLIP ViT-L and OpenCLIP
ViT-bigG, each read at the penultimate hidden state without the final LayerNorm, and bigG's
pooled output through its text projection (CLIPTextModelWithProjection.text_embeds)."""
import dataclasses

import pytest
import torch
import transformers

from helpers import assert_close_rel, randomize_
from model.clip import SD2_TEXT, SDXL_TEXT_G, SDXL_TEXT_L, CLIPTextConfig, CLIPTextModel
from test_clip import BOS, EOS, VOCAB, hf_text_config, prompt_ids, reference

# the two SDXL towers, small: 3 layers so that the penultimate state is neither the first nor the last
TEXT_L = CLIPTextConfig(vocab_size=VOCAB, width=48, num_layers=3, num_heads=4, mlp_dim=96, act="quick_gelu",
                        context_layer=-2, context_norm=False)
TEXT_G = CLIPTextConfig(vocab_size=VOCAB, width=64, num_layers=3, num_heads=4, mlp_dim=128, act="gelu",
                        context_layer=-2, context_norm=False, projection_dim=40)


def load(ours: CLIPTextModel, ref) -> CLIPTextModel:
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}, strict=True)
    return ours.eval()


@pytest.mark.parametrize("pad_id, eos_token_id", [(EOS, 2), (0, 2), (0, EOS)],
                         ids=["pad-eos", "pad-!-legacy-eos", "pad-!-first-eos"])
@torch.no_grad()
def test_vit_l_penultimate_matches_transformers(pad_id, eos_token_id):
    ref = reference(transformers.CLIPTextModel, hf_text_config(TEXT_L, eos_token_id))
    ours = load(CLIPTextModel(TEXT_L), ref)
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
    ours = load(CLIPTextModel(TEXT_G), ref)
    ids = prompt_ids([0, 5, 30, 75], pad_id, seed=1)
    expected = ref(input_ids=ids, output_hidden_states=True)
    context, pooled = ours.encode(ids)
    assert_close_rel(context, expected.hidden_states[-2])
    assert_close_rel(pooled, expected.text_embeds)
    assert_close_rel(ours(ids), expected.hidden_states[-2])


@torch.no_grad()
def test_context_layer_and_norm_are_what_the_config_says():
    """The last layer with the final LN is SD1/SD2's context (transformers' last_hidden_state);
    -3 reads two layers before the end (a 'clip skip' of 2)."""
    ref = reference(transformers.CLIPTextModel, hf_text_config(TEXT_L, 2), seed=5)
    ids = prompt_ids([4, 9], EOS)
    expected = ref(input_ids=ids, output_hidden_states=True)
    last = load(CLIPTextModel(dataclasses.replace(TEXT_L, context_layer=-1, context_norm=True)), ref)
    assert_close_rel(last(ids), expected.last_hidden_state)
    earlier = load(CLIPTextModel(dataclasses.replace(TEXT_L, context_layer=-3)), ref)
    assert_close_rel(earlier(ids), expected.hidden_states[-3])
    normed = load(CLIPTextModel(dataclasses.replace(TEXT_L, context_norm=True)), ref)
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
