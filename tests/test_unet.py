"""UNet parity with diffusers' UNet2DConditionModel on random weights."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from checkpoint.configs import unet_config_from_diffusers
from helpers import assert_close_rel, randomize_
from model.unet import SD15, SD21, SD21_BASE, UNet

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
