"""model.packing: convolutions whose weight is held only in oneDNN's blocked layout once called where
nn.Conv2d would run oneDNN. A packed model must give nn.Conv2d's results for every configuration,
the same bits whatever calls came before, run PyTorch's own kernel where nn.Conv2d would, keep no
plain copy of a weight it packed, show the plain weights to state_dict(), follow a changed weight,
and never stand in the way of autograd, other dtypes or copying."""
import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close_rel, randomize_
from model.packing import VAE_MIN_PIXELS, PackedConv2d, pack_convolutions, unpack_convolutions
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig
from weights import load_pipeline


def randomized(conv):
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_()
    return conv


def reference(plain: nn.Conv2d, x):
    return F.conv2d(x, plain.weight, plain.bias, plain.stride, plain.padding, plain.dilation, plain.groups)


def onednn(conv: nn.Module, x) -> bool:
    """Whether nn.Conv2d runs oneDNN on x (PyTorch chooses by the input's shape and its thread count), not
    its own kernel; conv: an nn.Conv2d or a PackedConv2d, whose weight's shape is asked about."""
    weight = torch.zeros(()).expand(conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    return torch._C._select_conv_backend(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                         False, [0, 0], conv.groups) == torch._C._ConvBackend.Mkldnn


def packed_pair(*args, **kwargs):
    """A frozen random nn.Conv2d and its PackedConv2d (built from a copy of it)."""
    plain = randomized(nn.Conv2d(*args, **kwargs)).requires_grad_(False)
    return plain, pack_convolutions(copy.deepcopy(plain))


CASES = [  # (in, out, kernel, stride, padding, dilation, groups, bias, input shape)
    (4, 8, 3, 1, 1, 1, 1, True, (2, 4, 9, 7)),
    (8, 8, 3, 2, 0, 1, 1, True, (2, 8, 11, 11)),  # the VAE's downsampler: stride 2, no padding
    (8, 6, 1, 1, 0, 1, 1, True, (3, 8, 5, 6)),
    (6, 6, 3, 2, 1, 1, 1, False, (2, 6, 8, 8)),
    (8, 4, 3, 1, 2, 2, 2, True, (2, 8, 10, 9)),  # dilated, grouped
    (3, 16, 4, 4, 0, 1, 1, False, (2, 3, 16, 12)),  # a patch embedding
    (8, 8, 3, 1, 1, 1, 1, True, (1, 8, 11, 11)),  # one small input: PyTorch's own kernel
    (320, 320, 3, 1, 1, 1, 1, True, (1, 320, 8, 8)),  # one input, large enough for oneDNN
]


def test_the_cases_take_both_kernels():
    kinds = {onednn(nn.Conv2d(cin, cout, k, stride, pad, dil, groups, bias), torch.randn(shape))
             for cin, cout, k, stride, pad, dil, groups, bias, shape in CASES}
    assert kinds == {True, False}


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups,bias,shape", CASES)
def test_matches_the_plain_convolution(cin, cout, k, stride, pad, dil, groups, bias, shape):
    plain, conv = packed_pair(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias)
    assert isinstance(conv, PackedConv2d)
    x = torch.randn(shape)
    with torch.no_grad():
        y = conv(x)
        torch.testing.assert_close(y, reference(plain, x), rtol=1e-5, atol=1e-5)
        assert conv.packed == conv.weight.is_mkldnn == onednn(plain, x)
        if not onednn(plain, x):  # nn.Conv2d's own kernel on the plain weight: its bits
            assert torch.equal(y, reference(plain, x))
        for other in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
            torch.testing.assert_close(conv(other), reference(plain, other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups,bias,shape", CASES)
def test_an_output_s_bits_do_not_depend_on_the_calls_before_it(cin, cout, k, stride, pad, dil, groups, bias, shape):
    """Whatever ran before (nothing, the same shape, a shape that packs, one that does not), a call
    runs the kernel its input's shape picks: the same bits, exactly."""
    _, conv = packed_pair(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias)
    x = torch.randn(shape)
    others = [torch.randn(shape[0] + 1, *shape[1:]), torch.randn(1, cin, 2 * k + 1, 2 * k + 1)]
    with torch.no_grad():
        first = conv(x)
        outputs = [conv(x)]
        for other in others:
            conv(other)
            outputs.append(conv(x))
    assert all(torch.equal(y, first) for y in outputs)


def test_the_packed_weight_reads_back_as_the_plain_one():
    plain, conv = packed_pair(8, 4, 3, padding=2, dilation=2, groups=2)
    with torch.no_grad():
        conv(torch.randn(2, 8, 10, 9))
    assert conv.packed
    assert torch.equal(conv.weight.to_dense(), plain.weight)  # exactly: packing only moves the numbers
    assert (conv.weight.shape, conv.weight.dtype, conv.weight.device) == (plain.weight.shape, torch.float32,
                                                                           torch.device("cpu"))


def test_packs_once_per_input_shape():
    plain, conv = packed_pair(8, 8, 3, padding=1)
    a, b = torch.randn(2, 8, 6, 6), torch.randn(3, 8, 5, 7)
    with torch.inference_mode():
        conv(a)
        packed = conv.weight
        assert conv.packed_for == a.shape
        conv(a)
        assert conv.weight is packed  # reused, not packed again
        torch.testing.assert_close(conv(b), reference(plain, b), rtol=1e-5, atol=1e-5)
        assert conv.weight is not packed and conv.packed_for == b.shape
        torch.testing.assert_close(conv(a), reference(plain, a), rtol=1e-5, atol=1e-5)


def test_a_small_single_input_unpacks_and_runs_pytorch_s_own_kernel():
    plain, conv = packed_pair(8, 8, 3, padding=1)
    big, small = torch.randn(2, 8, 6, 6), torch.randn(1, 8, 6, 6)
    assert onednn(plain, big) and not onednn(plain, small)
    with torch.inference_mode():
        conv(big)
        assert conv.packed
        assert torch.equal(conv(small), reference(plain, small))
        assert not conv.packed and torch.equal(conv.weight, plain.weight)  # one copy of the weight, plain
        conv(big)
        assert conv.packed_for == big.shape


def test_an_input_under_min_pixels_runs_nn_conv2d_s_path_on_the_plain_weight():
    plain = randomized(nn.Conv2d(8, 8, 3, padding=1)).requires_grad_(False)
    conv = pack_convolutions(copy.deepcopy(plain), min_pixels=2 * 6 * 6)
    small, big = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 6, 6)  # 60 and 72 pixels (N * H * W)
    assert onednn(plain, small) and onednn(plain, big)
    with torch.inference_mode():
        conv(big)
        assert conv.packed_for == big.shape
        assert torch.equal(conv(small), reference(plain, small))  # nn.Conv2d's bits, after a pack too
        assert not conv.packed and torch.equal(conv.weight, plain.weight)
        conv(big)
        assert conv.packed_for == big.shape


def test_a_loaded_pipeline_packs_its_vae_on_large_maps_only(sd1):
    """load_pipeline packs the UNet at every shape oneDNN runs, and the VAE (called once per image)
    only on maps of at least VAE_MIN_PIXELS pixels."""
    pipe = load_pipeline(sd1)
    vae_convs = [m for m in pipe.vae.modules() if isinstance(m, PackedConv2d)]
    assert vae_convs and all(m.min_pixels == VAE_MIN_PIXELS for m in vae_convs)
    assert all(m.min_pixels == 0 for m in pipe.unet.modules() if isinstance(m, PackedConv2d))
    side = int(VAE_MIN_PIXELS ** 0.5) // pipe.vae_scale  # a latent whose largest map is under the bound
    with torch.inference_mode():
        pipe.vae.decode(torch.randn(1, 4, side, side))
    assert not any(m.packed for m in vae_convs)
    with torch.inference_mode():
        pipe.vae.decode(torch.randn(2, 4, side, side))  # twice the pixels: the last level's maps pack
    assert any(m.packed for m in vae_convs)


def plain_bytes(module: nn.Module) -> int:
    """Bytes of the 4-D (convolution weight shaped) dense tensors reachable from the module's
    attributes: parameters, buffers and anything else it holds, in containers or not."""
    seen, total = set(), 0

    def visit(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if not obj.is_mkldnn and obj.dim() == 4 and id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v)

    for m in module.modules():
        visit({k: v for k, v in vars(m).items() if k != "_modules"})
    return total


def test_keeps_no_plain_copy_of_a_packed_weight():
    torch.manual_seed(0)
    model = pack_convolutions(nn.Sequential(nn.Conv2d(5, 7, 3, padding=1), nn.SiLU(), nn.Conv2d(7, 5, 3, padding=1)))
    model = randomized(model).requires_grad_(False)
    assert plain_bytes(model) == (5 * 7 * 9 * 2) * 4  # before the first call: the plain weights, once
    with torch.no_grad():
        model(torch.randn(2, 5, 6, 6))
        model(torch.randn(3, 5, 9, 4))  # a re-pack for another shape keeps none either
    assert all(m.packed for m in model if isinstance(m, PackedConv2d))
    assert plain_bytes(model) == 0
    gc.collect()
    tensors = [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor) and not t.is_mkldnn]
    assert not [t for t in tensors if t.shape in ((7, 5, 3, 3), (5, 7, 3, 3))]


def test_a_packed_weight_cannot_be_changed_in_place():
    _, conv = packed_pair(4, 4, 3, padding=1)
    with torch.no_grad():
        conv(torch.randn(2, 4, 8, 8))
        with pytest.raises(RuntimeError):  # never a silent write in the plain layout into the blocked one
            conv.weight.copy_(torch.randn(4, 4, 3, 3))


@pytest.mark.parametrize("change", ["load_state_dict", "replace", "to-and-back", "copy_-before-the-first-call"])
def test_follows_a_changed_weight(change):
    plain, conv = packed_pair(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    new = torch.randn_like(plain.weight)
    with torch.no_grad():
        if change == "copy_-before-the-first-call":
            conv.weight.copy_(new)
        before = conv(x)
        if change == "load_state_dict":
            conv.load_state_dict({"weight": new, "bias": plain.bias.clone()})
        elif change == "replace":
            conv.weight = nn.Parameter(new, requires_grad=False)
        elif change == "to-and-back":
            conv.double()
            conv.weight.copy_(new.double())
            conv.float()
        after = conv(x)
    plain.weight.copy_(new)
    if change == "copy_-before-the-first-call":
        torch.testing.assert_close(before, reference(plain, x), rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference(plain, x), rtol=1e-5, atol=1e-5)
    assert conv.packed


def test_weights_made_in_inference_mode():
    with torch.inference_mode():
        plain, conv = packed_pair(4, 4, 3, padding=1)
        x = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(conv(x), reference(plain, x), rtol=1e-5, atol=1e-5)
        assert conv.packed


def test_gradients_flow_as_through_nn_conv2d():
    plain = randomized(nn.Conv2d(4, 6, 3, padding=1))
    conv = pack_convolutions(copy.deepcopy(plain))  # trainable: never packed
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        conv(x)
    assert not conv.packed
    conv(x).square().sum().backward()
    plain(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-4)


def test_an_input_that_needs_grad_unpacks_a_frozen_weight():
    plain, conv = packed_pair(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        conv(x)
    assert conv.packed
    conv(x).square().sum().backward()
    reference(plain, x2).square().sum().backward()
    assert not conv.packed  # one copy of the weight, plain now
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_take_the_plain_path(dtype):
    plain, conv = packed_pair(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        conv(x)
        assert conv.packed
        conv, plain, x = conv.to(dtype), plain.to(dtype), x.to(dtype)
        assert not conv.packed and conv.weight.dtype == dtype
        assert torch.equal(conv(x), reference(plain, x))
    assert not conv.packed


def test_copies_hold_the_plain_weight_and_pack_their_own():
    plain, conv = packed_pair(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        y = conv(x)
        clone = copy.deepcopy(conv)
        assert conv.packed and not clone.packed and torch.equal(clone.weight, plain.weight)
        torch.testing.assert_close(clone(x), y)
        assert clone.packed and clone.weight is not conv.weight


def test_state_dict_is_nn_conv2d_s():
    plain, conv = packed_pair(4, 8, 3, padding=1)
    assert list(conv.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        conv(torch.randn(2, 4, 5, 5))
    assert conv.packed
    state = conv.state_dict()
    assert list(state) == ["weight", "bias"]
    assert not state["weight"].is_mkldnn and state["weight"].is_contiguous()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())


def test_leaves_other_convolutions_alone():
    reflect, same = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 3, padding="same")

    class Sub(nn.Conv2d):
        pass

    model = pack_convolutions(nn.Sequential(reflect, same, Sub(2, 2, 1), nn.Conv2d(2, 2, 1)))
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d, Sub, PackedConv2d]


SMALL_UNET = UNetConfig(channels=(32, 64), attention=(True, False), num_heads=(2, 2), context_dim=24, norm_groups=8)
SMALL_VAE = VAEConfig(channels=(32, 64), layers_per_block=1, norm_groups=8)


def small_models(seed=0):
    return (randomize_(UNet(SMALL_UNET), seed).requires_grad_(False).eval(),
            randomize_(AutoencoderKL(SMALL_VAE), seed + 1).requires_grad_(False).eval())


def model_outputs(unet, vae):
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 12, 10, generator=g), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        noise = unet(x, torch.tensor([999, 17]), context)  # [2, 4, 12, 10]
        return noise, vae.decode(noise), vae.encode(vae.decode(noise), generator=g)


def test_a_packed_unet_and_vae_match_the_plain_ones():
    plain = small_models()
    packed = tuple(pack_convolutions(m) for m in small_models())
    convs = [m for model in packed for m in model.modules() if isinstance(m, PackedConv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for model in plain for m in model.modules())
    inputs = {}
    for conv in convs:
        conv.register_forward_pre_hook(lambda conv, args: inputs.__setitem__(conv, args[0]))
    expected, first, got = model_outputs(*plain), model_outputs(*packed), model_outputs(*packed)
    assert all(conv.packed == onednn(conv, inputs[conv]) for conv in convs)
    assert any(conv.packed for conv in convs)
    for a, b, c in zip(got, expected, first):
        assert_close_rel(a, b, 1e-5)
        assert torch.equal(a, c)  # a second run, on weights packed in the first: the same bits
    for model, ref in zip(packed, plain):
        unpacked = [m for m in model.modules() if isinstance(m, PackedConv2d) and not m.packed]
        assert plain_bytes(model) == sum(m.weight.numel() * m.weight.element_size() for m in unpacked)
        state, ref_state = model.state_dict(), ref.state_dict()
        assert list(state) == list(ref_state)
        assert all(torch.equal(state[k], v) and not state[k].is_mkldnn for k, v in ref_state.items())


def test_unpacking_round_trips():
    plain = small_models()
    models = tuple(pack_convolutions(m) for m in small_models())
    model_outputs(*models)
    models = tuple(unpack_convolutions(m) for m in models)
    for model, ref in zip(models, plain):
        assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
        assert all(not p.is_mkldnn and not p.requires_grad for p in model.parameters())
        ref_state = ref.state_dict()
        assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    for a, b in zip(model_outputs(*models), model_outputs(*plain)):
        assert torch.equal(a, b)
