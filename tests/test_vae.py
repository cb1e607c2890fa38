"""Parity of model/vae.py with diffusers' AutoencoderKL on random weights."""
import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL

from conftest import assert_close_rel, randomize_, rel_err
from model.vae import SD, AutoencoderKL, VAEConfig

SMALL = VAEConfig(channels=(32, 64), layers_per_block=2, norm_groups=8)


def make_pair(cfg: VAEConfig, seed: int = 0):
    """A randomized diffusers VAE with cfg's shape, and ours loaded from its state dict."""
    n = len(cfg.channels)
    ref = RefAutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scaling_factor,
    )
    randomize_(ref, seed).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def small_pair():
    return make_pair(SMALL)


def test_state_dict_matches_diffusers(small_pair):
    ref, ours = small_pair
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in our_shapes
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in our_shapes
    # eps barely moves outputs on random weights (variances are O(1)), so check it here.
    ours_modules = dict(ours.named_modules())
    norms = [(n, m) for n, m in ref.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in ours.modules())
    for name, norm in norms:
        assert (ours_modules[name].eps, ours_modules[name].num_groups) == (norm.eps, norm.num_groups), name


@torch.no_grad()
def test_decode_matches_diffusers(small_pair):
    ref, ours = small_pair
    sf = SMALL.scaling_factor
    z = torch.randn(2, 4, 16, 16)  # two levels: 32x32 image
    out = ours.decode(z)
    assert out.shape == (2, 3, 32, 32)
    assert_close_rel(out, ref.decode(z / sf).sample)


@torch.no_grad()
def test_encode_mean_matches_diffusers(small_pair):
    ref, ours = small_pair
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    lat = ours.encode(x)
    assert lat.shape == (2, 4, 16, 16)
    assert_close_rel(lat, ref.encode(x).latent_dist.mean * SMALL.scaling_factor)


@torch.no_grad()
def test_encode_sample_matches_diffusers(small_pair):
    ref, ours = small_pair
    sf = SMALL.scaling_factor
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    lat = ours.encode(x, generator=torch.Generator().manual_seed(42))
    expect = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(42)) * sf
    assert_close_rel(lat, expect)
    # The noise really is there, and depends on the seed.
    assert rel_err(lat, ours.encode(x)) > 1e-2
    assert rel_err(lat, ours.encode(x, generator=torch.Generator().manual_seed(43))) > 1e-2


@torch.no_grad()
def test_encode_sample_clamps_logvar():
    """Push logvar far outside [-30, 20] in two channels so the clamp matters."""
    ref, ours = make_pair(SMALL, seed=2)
    for model in (ref, ours):
        model.quant_conv.bias[4] += 100.0  # logvar channel 0 -> clamped to 20
        model.quant_conv.bias[5] -= 100.0  # logvar channel 1 -> clamped to -30
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    lat = ours.encode(x, generator=torch.Generator().manual_seed(7))
    expect = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    assert_close_rel(lat, expect * SMALL.scaling_factor)


@torch.no_grad()
def test_full_sd_layout_decode():
    ref, ours = make_pair(SD, seed=1)
    z = torch.randn(1, 4, 4, 4)  # four levels: 32x32 image
    out = ours.decode(z)
    assert out.shape == (1, 3, 32, 32)
    assert_close_rel(out, ref.decode(z / SD.scaling_factor).sample)


@torch.no_grad()
def test_bf16_cpu_smoke(small_pair):
    """bf16 keeps ~3 significant digits; through ~30 layers we allow 5% relative error."""
    ref, _ = small_pair
    ours = AutoencoderKL(SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.to(torch.bfloat16)
    z = torch.randn(1, 4, 16, 16)
    x = torch.rand(1, 3, 32, 32) * 2 - 1

    out = ours.decode(z.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close_rel(out.float(), ref.decode(z / SMALL.scaling_factor).sample, tol=5e-2)

    lat = ours.encode(x.bfloat16(), generator=torch.Generator().manual_seed(0))
    assert lat.dtype == torch.bfloat16 and torch.isfinite(lat).all()
    lat = ours.encode(x.bfloat16())
    assert_close_rel(lat.float(), ref.encode(x).latent_dist.mean * SMALL.scaling_factor, tol=5e-2)
