"""model.conv.Conv2d: an nn.Conv2d that keeps its weight packed for oneDNN on the CPU. It must give
nn.Conv2d's results for every configuration, follow its weight when that changes, and never stand
in the way of autograd, other dtypes or copying."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from model.conv import Conv2d

def randomized(conv):
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_()
    return conv


def reference(conv, x):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


CASES = [  # (in, out, kernel, stride, padding, dilation, groups, bias, input shape)
    (4, 8, 3, 1, 1, 1, 1, True, (2, 4, 9, 7)),
    (8, 8, 3, 2, 0, 1, 1, True, (1, 8, 11, 11)),  # the VAE's downsampler: stride 2, no padding
    (8, 6, 1, 1, 0, 1, 1, True, (3, 8, 5, 6)),
    (6, 6, 3, 2, 1, 1, 1, False, (2, 6, 8, 8)),
    (8, 4, 3, 1, 2, 2, 2, True, (1, 8, 10, 9)),  # dilated, grouped
    (3, 16, 4, 4, 0, 1, 1, False, (2, 3, 16, 12)),  # a patch embedding
]


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups,bias,shape", CASES)
def test_matches_the_plain_convolution(cin, cout, k, stride, pad, dil, groups, bias, shape):
    torch.manual_seed(0)
    conv = randomized(Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias))
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), reference(conv, x), rtol=1e-5, atol=1e-5)
        for other in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
            torch.testing.assert_close(conv(other), reference(conv, other), rtol=1e-5, atol=1e-5)


def test_packs_once_per_input_shape():
    torch.manual_seed(0)
    conv = randomized(Conv2d(8, 8, 3, padding=1))
    a, b = torch.randn(2, 8, 6, 6), torch.randn(3, 8, 5, 7)
    with torch.inference_mode():
        conv(a)
        packed = conv._packed
        assert packed is not None
        conv(a)
        assert conv._packed is packed  # reused, not packed again
        torch.testing.assert_close(conv(b), reference(conv, b), rtol=1e-5, atol=1e-5)
        assert conv._packed is not packed
        torch.testing.assert_close(conv(a), reference(conv, a), rtol=1e-5, atol=1e-5)


@pytest.fixture
def conv_x():
    torch.manual_seed(0)
    return randomized(Conv2d(4, 4, 3, padding=1)), torch.randn(1, 4, 8, 8)


@pytest.mark.parametrize("change", ["copy_", "load_state_dict", "replace", "to-and-back"])
def test_follows_a_changed_weight(change, conv_x):
    conv, x = conv_x
    with torch.no_grad():
        before = conv(x)
        new = torch.randn_like(conv.weight)
        if change == "copy_":
            conv.weight.copy_(new)
        elif change == "load_state_dict":
            conv.load_state_dict({"weight": new, "bias": conv.bias.clone()})
        elif change == "replace":
            conv.weight = torch.nn.Parameter(new)
        else:
            conv.double()
            conv.weight.copy_(new.double())
            conv.float()
        after = conv(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference(conv, x), rtol=1e-5, atol=1e-5)


def test_weights_made_in_inference_mode():
    torch.manual_seed(0)
    with torch.inference_mode():
        conv = randomized(Conv2d(4, 4, 3, padding=1))
        x = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(conv(x), reference(conv, x), rtol=1e-5, atol=1e-5)


def test_gradients_flow_as_through_nn_conv2d():
    torch.manual_seed(0)
    conv = randomized(Conv2d(4, 6, 3, padding=1))
    plain = torch.nn.Conv2d(4, 6, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    conv(x).square().sum().backward()
    plain(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_take_the_plain_path(dtype, conv_x):
    conv, x = conv_x[0].to(dtype), conv_x[1].to(dtype)
    with torch.no_grad():
        assert torch.equal(conv(x), reference(conv, x))
    assert conv._packed is None


def test_copies_and_moves_drop_the_packed_weight(conv_x):
    conv, x = conv_x
    with torch.no_grad():
        y = conv(x)
    assert conv._packed is not None
    for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert clone._packed is None
        with torch.no_grad():
            torch.testing.assert_close(clone(x), y)
    conv.to(torch.float64)
    assert conv._packed is None


def test_state_dict_is_nn_conv2d_s():
    conv = Conv2d(4, 8, 3, padding=1)
    assert list(conv.state_dict()) == list(torch.nn.Conv2d(4, 8, 3, padding=1).state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        conv(torch.randn(1, 4, 5, 5))
    assert list(conv.state_dict()) == ["weight", "bias"]


def test_packing_can_be_turned_off(conv_x, monkeypatch):
    conv, x = conv_x
    with torch.no_grad():
        y = conv(x)
        assert conv._packed is not None
        monkeypatch.setattr(Conv2d, "packing", False)
        torch.testing.assert_close(conv(x), y, rtol=1e-5, atol=1e-5)
    assert conv._packed is None  # the copy is let go
