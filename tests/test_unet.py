"""model/unet.py against diffusers' UNet2DConditionModel on random weights: SD1- and SD2-shaped configs and
SDXL's (the same code, another config: addition_embed_type "text_time"), an SDXL folder's UNet as both load it,
the full layouts' keys and shapes, low precision, torch.compile, and the presets against the hub's configs."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from checkpoint.configs import unet_config_from_diffusers
from checkpoints import SDXL_WIDTH
from helpers import assert_close_rel, randomize_, rel_err
from model.unet import SD15, SD21, SD21_BASE, SDXL, UNet

SD1_SMALL = dict(
    block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=48,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, sample_size=8,
)
SD2_SMALL = dict(
    block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=32, cross_attention_dim=40,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2, 2), use_linear_projection=True, transformer_layers_per_block=(1, 2, 1), sample_size=8,
)
ALL_ATTENTION = dict(  # attention at every level, 3 layers per block, non-default eps
    block_out_channels=(32, 32), layers_per_block=3, norm_num_groups=4, norm_eps=1e-3, cross_attention_dim=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, sample_size=8,
)


def build_pair(config, seed=0):
    ref = randomize_(UNet2DConditionModel(**config), seed).eval()
    ours = UNet(unet_config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("config", [SD1_SMALL, SD2_SMALL, ALL_ATTENTION], ids=["sd1", "sd2", "all-attn"])
@pytest.mark.parametrize("size", [(8, 8), (12, 10), (9, 7)], ids=["square", "non-square", "odd"])
def test_unet_matches_diffusers(config, size):
    ours, ref = build_pair(config)
    x = torch.randn(2, 4, *size)
    context = torch.randn(2, 7, config["cross_attention_dim"])
    t = torch.tensor([999, 17])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        assert_close_rel(ours(x, t, context), expected)
        # a scalar timestep broadcasts over the batch
        assert_close_rel(ours(x, 500, context), ref(x, 500, encoder_hidden_states=context).sample)


def test_upcast_attention_matches_in_fp32():
    ours, ref = build_pair({**SD2_SMALL, "upcast_attention": True})
    assert ours.config.upcast_attention
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 40)
    with torch.no_grad():
        assert_close_rel(ours(x, 10, context), ref(x, 10, encoder_hidden_states=context).sample)


def test_full_sd15_layout_small_latents():
    """The real SD1.5 channel layout (320/640/1280/1280, 8 heads) at 16x16 latents."""
    ref = randomize_(UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8), 1).eval()
    cfg = unet_config_from_diffusers(dict(ref.config))
    assert cfg.channels == (320, 640, 1280, 1280) and cfg.num_heads == (8, 8, 8, 8)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 768)
    with torch.no_grad():
        assert_close_rel(ours(x, 981, context), ref(x, 981, encoder_hidden_states=context).sample)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(dtype):
    ours, _ = build_pair(SD1_SMALL)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 48)
    with torch.no_grad():
        full = ours(x, 400, context)
        low = ours.to(dtype)(x.to(dtype), 400, context.to(dtype))
    assert low.dtype == dtype
    # bf16 keeps 8 bits of mantissa: a few percent of the output's range is the expected error.
    assert_close_rel(low.float(), full, tol=5e-2)


def test_unsupported_diffusers_configs_are_rejected():
    with pytest.raises(ValueError, match="addition_embed_type"):
        unet_config_from_diffusers({**SD1_SMALL, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="block type"):
        unet_config_from_diffusers({**SD1_SMALL, "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")})


@pytest.mark.parametrize("setting", [dict(timestep_post_act="silu"), dict(time_embedding_act_fn="silu"),
                                     dict(downsample_padding=0)], ids=lambda setting: next(iter(setting)))
def test_settings_that_change_the_output_but_no_tensor_are_refused(setting):
    """With these, diffusers computes another function of the same tensors: loaded, the UNet would differ silently."""
    ours, ref = build_pair(SD1_SMALL)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 48)
    other = UNet2DConditionModel(**SD1_SMALL, **setting).eval()
    other.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert rel_err(ours(x, 10, context), other(x, 10, encoder_hidden_states=context).sample) > 1e-2
    with pytest.raises(ValueError, match=f"{next(iter(setting))}=.* is not supported"):
        unet_config_from_diffusers(dict(other.config))


# The unet/config.json keys that matter, as the hub's SD1.5, SD2.1 (768-v) and SD2.1-base repos hold them.
HUB_UNETS = {
    "sd15": dict(attention_head_dim=8, cross_attention_dim=768, sample_size=64),
    "sd21": dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                 upcast_attention=True, sample_size=96),
    "sd21-base": dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                      upcast_attention=False, sample_size=64),
}


@pytest.mark.parametrize("name, preset", [("sd15", SD15), ("sd21", SD21), ("sd21-base", SD21_BASE)])
def test_presets_are_the_hub_configs(name, preset):
    config = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, **HUB_UNETS[name])
    assert unet_config_from_diffusers(config) == preset


def test_torch_compile_traces_once_for_every_timestep():
    """The sampling loop passes each timestep as a Python int. torch.compile must make it symbolic
    (a second trace) rather than trace the UNet again for each value: past its cache limit of 8
    traces it would fall back to eager for the rest of the run."""
    ours, _ = build_pair(SD1_SMALL)
    graphs = []

    def count_graphs(graph, example_inputs):  # a torch.compile backend that runs the traced graph as it is
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=count_graphs)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 48)
    with torch.no_grad():
        for t in (981, 961, 941, 921):
            assert_close_rel(compiled(x, t, context), ours(x, t, context), tol=1e-6)
    assert len(graphs) <= 2


# ---------------------------------------------------------------- SDXL

# SDXL's structure, small: no attention at the top level, per-level transformer depths and heads,
# linear proj_in, and the pooled embedding (24) plus six 8-d ids added to the time embedding.
SDXL_SMALL = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=48,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
    sample_size=8,
)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, every key the parser reads
HUB_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}


@pytest.mark.parametrize("size", [(8, 8), (12, 10), (9, 7)], ids=["square", "non-square", "odd"])
def test_sdxl_unet_matches_diffusers(size):
    ours, ref = build_pair(SDXL_SMALL)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, *size, generator=g), torch.randn(2, 7, 48, generator=g)
    pooled = torch.randn(2, 24, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 32, 16, 640, 384]])
    t = torch.tensor([999, 17])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert_close_rel(ours(x, t, context, pooled=pooled, time_ids=time_ids), expected)
        # one row of time ids serves every row of the batch
        same = time_ids[:1].expand(2, -1)
        expected = ref(x, 500, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled,
                                                                                 "time_ids": same}).sample
        assert_close_rel(ours(x, 500, context, pooled=pooled, time_ids=time_ids[0]), expected)


@torch.no_grad()
def test_sdxl_folders_unet_matches_diffusers(sdxl_pair):
    ours, ref = sdxl_pair
    g = torch.Generator().manual_seed(0)
    x, hidden, pooled = torch.randn(2, 4, 12, 10, generator=g), torch.randn(2, 77, SDXL_WIDTH, generator=g), \
        torch.randn(2, 40, generator=g)
    time_ids = ours.time_ids(96, 80)
    expected = ref.unet(x, torch.tensor([901, 3]), encoder_hidden_states=hidden,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(2, -1)}).sample
    assert_close_rel(ours.unet(x, torch.tensor([901, 3]), hidden, pooled=pooled, time_ids=time_ids), expected)


def test_the_added_conditioning_is_used_and_required():
    ours, _ = build_pair(SDXL_SMALL)
    x, context, pooled = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 48), torch.randn(1, 24)
    ids = torch.tensor([1024.0, 768, 0, 0, 1024, 1024])
    with torch.no_grad():
        out = ours(x, 10, context, pooled=pooled, time_ids=ids)
        assert (out - ours(x, 10, context, pooled=pooled, time_ids=ids.flip(0))).abs().max() > 1e-3
        assert (out - ours(x, 10, context, pooled=2 * pooled, time_ids=ids)).abs().max() > 1e-3
        with pytest.raises(ValueError, match="needs the pooled text embedding and the size/crop time_ids"):
            ours(x, 10, context)


def test_sdxl_preset_is_the_hub_config():
    assert unet_config_from_diffusers(HUB_SDXL_UNET) == SDXL


def test_full_sdxl_layout_keys_and_shapes_are_diffusers():
    """The full SDXL UNet (2.6 B parameters, 10 GB in fp32) built on the meta device: every
    state-dict key and shape equals diffusers' for the hub config."""
    config = {k: v for k, v in HUB_SDXL_UNET.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
        ours = UNet(SDXL)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert sum(v.numel() for v in ours.state_dict().values()) == sum(v.numel() for v in ref.state_dict().values())


def test_other_addition_embed_types_are_rejected():
    with pytest.raises(ValueError, match="addition_embed_type='image' is not supported"):
        unet_config_from_diffusers({**SDXL_SMALL, "addition_embed_type": "image"})
    with pytest.raises(ValueError, match="needs addition_time_embed_dim and projection_class_embeddings_input_dim"):
        unet_config_from_diffusers({**SDXL_SMALL, "projection_class_embeddings_input_dim": None})
