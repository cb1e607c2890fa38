"""CPU weight packing, applied to a loaded model: each convolution keeps its weight in oneDNN's layout.

On the CPU, PyTorch runs convolutions with oneDNN, which wants the weight in a blocked layout chosen
for the input's shape. nn.Conv2d keeps the weight as [out, in, kh, kw], so oneDNN reorders it into
a fresh buffer on every call. In the UNet's deep levels, where a 1280-channel 3x3 weight meets an
8x8 feature map, that reorder costs more than the convolution itself.

`pack_convolutions(model)` replaces each nn.Conv2d with a PackedConv2d. Every fp32 inference call on
the CPU runs oneDNN's convolution on a channels-last input. The first call with an input shape hands
it the plain weight, which oneDNN reorders for that call only, as nn.Conv2d's would be; the second
call in a row with the same shape reorders it once and keeps only the reordered tensor: the plain
one is let go, so packing costs no memory, provided that memory was the weight's own (pages of a file
mapping shared with other tensors stay resident while any of those lives). Both calls run the same
kernel on the same layout, so an output's bits never depend on which came first; a one-off call (a
first pass over every weight, a batch of another size) pays for no copy it will not reuse. A call
with another shape first gives the plain weight back. (torch.compile's freezing pass packs
convolution weights too.) `unpack_convolutions(model)` gives back nn.Conv2d modules.

What the model shows the outside stays nn.Conv2d's: state_dict() gives plain [out, in, kh, kw]
weights under the same keys, load_state_dict() takes them, `conv.weight.shape/dtype/device` read as
before. A call that cannot use the packed weight (autograd, another dtype or device) first unpacks
it, and so do .to(), .float(), .cuda(), ...; later fp32 CPU calls pack again. In-place writes into
a packed weight fail. torch.compile needs the weights plain: compile before the first call, or do not
pack (its freezing pass packs weights itself).
"""
import torch
import torch.nn.functional as F
from torch import nn


class PackedConv2d(nn.Module):
    """A frozen nn.Conv2d whose weight, once called twice in a row with one input shape, is held only in
    oneDNN's blocked layout for that shape."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = conv.weight  # [out, in/groups, kh, kw] until the first packable call
        self.register_parameter("bias", conv.bias)
        self.packed_for = None  # the input shape self.weight is laid out for, while it is packed
        self.last_shape = None  # the previous call's input shape

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packable(x):
            self._unpack()
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        shape, previous, self.last_shape = x.shape, self.last_shape, x.shape
        if not (self.packed and self.packed_for == shape):
            self._unpack()  # from a layout for another shape, oneDNN's reorder can be slower than the call
            if previous == shape:
                self._pack(shape)
        x = x.contiguous(memory_format=torch.channels_last)  # [B, C, H, W] stored as [B, H, W, C], as packed
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], "")

    def _packable(self, x: torch.Tensor) -> bool:
        frozen = not any(p.requires_grad for p in self.parameters())
        return (frozen and not (torch.is_grad_enabled() and x.requires_grad)
                and x.device.type == "cpu" and x.dim() == 4 and x.dtype == self.weight.dtype == torch.float32
                and self.weight.device.type == "cpu"
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and not torch.compiler.is_compiling())

    def _pack(self, shape: torch.Size):
        self.weight = nn.Parameter(torch._C._nn.mkldnn_reorder_conv2d_weight(
            self.weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, shape), requires_grad=False)
        self.packed_for = tuple(shape)

    def _unpack(self):
        if self.packed:
            with torch.no_grad():
                self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)
            self.packed_for = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(), ...
        self._unpack()
        return super()._apply(fn, recurse)

    def __getstate__(self):  # deepcopy and pickle: the copy holds the plain weight, and packs its own
        state = self.__dict__.copy()
        if self.packed:
            plain = nn.Parameter(self.weight.to_dense(), requires_grad=False)
            state["_parameters"] = {**self._parameters, "weight": plain}
            state["packed_for"] = state["last_shape"] = None
        return state

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, packed_for={self.packed_for}")


def packable(module: nn.Module) -> bool:
    """nn.Conv2d itself (not a subclass, which may compute something else), with zero padding given
    as numbers: what oneDNN's packed convolution computes."""
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def pack_convolutions(module: nn.Module) -> nn.Module:
    """Replaces every nn.Conv2d in `module` with a PackedConv2d, in place, and returns `module` (or,
    for an nn.Conv2d itself, its PackedConv2d). Meant for a loaded model whose parameters do not
    require grad: each weight is packed at its first fp32 CPU call, and one that requires grad is
    never packed."""
    if packable(module):
        return PackedConv2d(module)
    for name, child in module.named_children():
        setattr(module, name, pack_convolutions(child))
    return module


def unpack_convolutions(module: nn.Module) -> nn.Module:
    """Replaces every PackedConv2d in `module` with an nn.Conv2d holding its plain weight, in place,
    and returns `module` (or, for a PackedConv2d itself, its nn.Conv2d)."""
    if isinstance(module, PackedConv2d):
        module._unpack()
        with torch.device("meta"):
            conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, module.dilation, module.groups, bias=module.bias is not None)
        conv.weight, conv.bias = module.weight, module.bias
        return conv
    for name, child in module.named_children():
        setattr(module, name, unpack_convolutions(child))
    return module
