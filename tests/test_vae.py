"""Parity of model/vae.py with diffusers' AutoencoderKL on random weights, an SDXL folder's VAE as both load it,
and SDXL's fp16 VAE decoding in fp32 as diffusers' does."""
import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL

from checkpoint.configs import vae_config_from_diffusers
from checkpoints import make_sdxl_folder
from helpers import assert_close_rel, randomize_, rel_err
from model.vae import SD, AutoencoderKL, VAEConfig
from model.vae_tiled import _tile_spans, decode_tiled
from weights import load_pipeline

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
def test_sdxl_vae_decodes_like_diffusers(sdxl_pair):
    ours, ref = sdxl_pair
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


@torch.no_grad()
def test_a_vae_of_another_activation_is_refused(small_pair):
    """diffusers' AutoencoderKL with act_fn "gelu" holds SD's tensors but computes another function."""
    ref, ours = small_pair
    other = RefAutoencoderKL(**{**ref.config, "act_fn": "gelu"}).eval()
    other.load_state_dict(ref.state_dict())
    z = torch.randn(1, 4, 8, 8)
    assert rel_err(ours.decode(z), other.decode(z / SMALL.scaling_factor).sample) > 1e-2
    with pytest.raises(ValueError, match="act_fn='gelu' is not supported"):
        vae_config_from_diffusers(dict(other.config))


@pytest.mark.parametrize("key", ["use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"])
def test_a_vae_without_a_part_sds_has_is_refused_by_name(small_pair, key):
    """diffusers' AutoencoderKL can leave out the quant convs or the middle attention (SD3/Flux-shaped VAEs)."""
    with pytest.raises(ValueError, match=f"^{key}=False is not supported; SD's VAE has {key}=True$"):
        vae_config_from_diffusers({**small_pair[0].config, key: False})


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
def test_bf16_decode_is_within_5_percent_of_the_fp32_reference(small_pair):
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


# Tiled decoding: an approximation of `decode` (the decoder's GroupNorms and mid-block attention are
# global), exact where a single tile covers the latents or a pixel lies in one tile only.

@torch.no_grad()
def test_decode_tiled_one_tile_is_decode(small_pair):
    _, ours = small_pair
    z = torch.randn(2, 4, 16, 12)
    assert torch.equal(decode_tiled(ours, z, tile=16, overlap=4), ours.decode(z))


@torch.no_grad()
def test_decode_tiled_places_tiles_exactly(small_pair):
    """Where only one tile covers a pixel, the output is that tile's own decode: checks where each
    tile lands, at both ends of both axes."""
    _, ours = small_pair
    z = torch.randn(1, 4, 48, 40)
    tiled = decode_tiled(ours, z, tile=16, overlap=4)
    rows, cols = _tile_spans(48, 16, 4), _tile_spans(40, 16, 4)
    assert len(rows) > 2 and len(cols) > 2
    f = 2  # SMALL has two levels
    first = ours.decode(z[:, :, :16, :16])
    only_y, only_x = f * rows[1][0], f * cols[1][0]  # before the second tile starts
    assert torch.equal(tiled[:, :, :only_y, :only_x], first[:, :, :only_y, :only_x])
    last = ours.decode(z[:, :, -16:, -16:])
    only_y, only_x = f * (48 - rows[-2][1]), f * (40 - cols[-2][1])  # after the second-last tile ends
    assert torch.equal(tiled[:, :, -only_y:, -only_x:], last[:, :, -only_y:, -only_x:])


@torch.no_grad()
def test_decode_tiled_close_to_decode(small_pair):
    """Real tiling on random weights, against the untiled decode and against diffusers' own tiled
    decode at the same tile size and overlap. Measured: max error 8.0e-2 of the image's max (at
    the seams), mean 1.2e-2; diffusers' tiling gives 1.1e-1 and 1.4e-2 on the same input."""
    ref, ours = small_pair
    z = torch.randn(1, 4, 48, 40)
    exact = ours.decode(z)
    tiled = decode_tiled(ours, z, tile=16, overlap=8)
    mean_err = lambda a: ((a - exact).abs().mean() / exact.abs().max()).item()
    assert rel_err(tiled, exact) < 0.1 and mean_err(tiled) < 0.015

    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = 16, 32, 8 / 16
    try:
        theirs = ref.decode(z / SMALL.scaling_factor).sample
    finally:
        ref.disable_tiling()
    assert rel_err(tiled, exact) <= rel_err(theirs, exact) and mean_err(tiled) <= mean_err(theirs)


@torch.no_grad()
def test_decode_tiled_shapes_and_tile_bound(small_pair):
    """Sizes that are no multiple of the tile, or smaller than it on one axis; the decoder never
    sees more than tile x tile latents, which is what bounds memory."""
    _, ours = small_pair
    seen = []
    handle = ours.decoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        for h, w in [(37, 21), (9, 50), (17, 17)]:
            out = decode_tiled(ours, torch.randn(2, 4, h, w), tile=16, overlap=5)
            assert out.shape == (2, 3, 2 * h, 2 * w) and torch.isfinite(out).all()
    finally:
        handle.remove()
    assert max(max(s) for s in seen) == 16
    with pytest.raises(ValueError):
        decode_tiled(ours, torch.randn(1, 4, 8, 8), tile=16, overlap=16)
