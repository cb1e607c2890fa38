"""CPU weight packing, applied to a loaded model: each convolution keeps its weight in oneDNN's layout.

On the CPU, PyTorch runs convolutions with oneDNN, which wants the weight in a blocked layout chosen
for the input's shape. nn.Conv2d keeps the weight as [out, in, kh, kw], so oneDNN reorders it into
a fresh buffer on every call. In the UNet's deep levels, where a 1280-channel 3x3 weight meets an
8x8 feature map, that reorder costs more than the convolution itself.

`pack_convolutions(model)` replaces each nn.Conv2d with a PackedConv2d. Where nn.Conv2d would run
oneDNN (PyTorch picks the kernel from the input's shape), a PackedConv2d reorders its weight once for
that input shape and then holds only the reordered tensor: the plain one is let go, so packing costs
no memory, provided that memory was the weight's own (pages of a file mapping shared with other
tensors stay resident while any of those lives). Where nn.Conv2d would run PyTorch's own kernel (a
single small input, such as a first pass over every weight on a tiny latent), which reads the plain
weight and reorders nothing, it runs that kernel, unpacking the weight first if it holds it packed.
The kernel depends on the input's shape alone, so an output's bits never depend on the calls before
it. A call with another shape re-packs from the plain weight. (torch.compile's freezing pass packs
convolution weights too.) `unpack_convolutions(model)` gives back nn.Conv2d modules. `pack_pipeline`,
which weights.load_pipeline applies, packs the UNet at every shape and the VAE on large maps only.

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
    """A frozen nn.Conv2d whose weight, once called where nn.Conv2d would run oneDNN, is held only in
    oneDNN's blocked layout for that input shape."""

    def __init__(self, conv: nn.Conv2d, min_pixels: int = 0):
        super().__init__()
        self.min_pixels = min_pixels  # an input with fewer pixels (N * H * W) runs nn.Conv2d's path
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = conv.weight  # [out, in/groups, kh, kw] until the first packable call
        self.register_parameter("bias", conv.bias)
        self.packed_for = None  # the input shape self.weight is laid out for, while it is packed

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packable(x) or x.shape[0] * x.shape[2] * x.shape[3] < self.min_pixels or self._native(x):
            self._unpack()
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if not (self.packed and self.packed_for == x.shape):
            self._pack(x.shape)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], "")

    def _native(self, x: torch.Tensor) -> bool:
        """Whether nn.Conv2d would run PyTorch's own kernel on x, not oneDNN: asked of PyTorch's kernel
        choice with a stand-in for the plain weight (its shape, no memory)."""
        weight = torch.zeros((), dtype=x.dtype).expand(self.out_channels, self.in_channels // self.groups,
                                                       *self.kernel_size)
        backend = torch._C._select_conv_backend(x, weight, self.bias, self.stride, self.padding, self.dilation, False,
                                                [0, 0], self.groups)
        return backend != torch._C._ConvBackend.Mkldnn

    def _packable(self, x: torch.Tensor) -> bool:
        frozen = not any(p.requires_grad for p in self.parameters())
        return (frozen and not (torch.is_grad_enabled() and x.requires_grad)
                and x.device.type == "cpu" and x.dim() == 4 and x.dtype == self.weight.dtype == torch.float32
                and self.weight.device.type == "cpu"
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and not torch.compiler.is_compiling())

    def _pack(self, shape: torch.Size):
        self._unpack()  # from a layout for another shape, oneDNN's reorder can take longer than the call
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
            state["packed_for"] = None
        return state

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, min_pixels={self.min_pixels}, packed_for={self.packed_for}")


def packable(module: nn.Module) -> bool:
    """nn.Conv2d itself (not a subclass, which may compute something else), with zero padding given
    as numbers: what oneDNN's packed convolution computes."""
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def pack_convolutions(module: nn.Module, min_pixels: int = 0) -> nn.Module:
    """Replaces every nn.Conv2d in `module` with a PackedConv2d, in place, and returns `module` (or,
    for an nn.Conv2d itself, its PackedConv2d). Meant for a loaded model whose parameters do not
    require grad: each weight is packed at its first fp32 CPU call that nn.Conv2d would run with
    oneDNN, and one that requires grad is never packed. An input with fewer than `min_pixels` pixels
    (N * H * W) runs nn.Conv2d's path on the plain weight, for a model called once per shape, whose
    packs pay for themselves in that call only on large maps."""
    if packable(module):
        return PackedConv2d(module, min_pixels)
    for name, child in module.named_children():
        setattr(module, name, pack_convolutions(child, min_pixels))
    return module


VAE_MIN_PIXELS = 8192  # N * H * W: the VAE's convolutions on smaller maps are not packed (pack_pipeline)


def pack_pipeline(pipe):
    """Packs a loaded Pipeline's convolutions in place and returns it. The UNet runs at every step, so
    its packs pay for themselves from the second call on; the VAE runs once per image, and a pack pays
    for itself within that one call only on a large map (docs/performance.md), so its convolutions on
    maps under VAE_MIN_PIXELS run nn.Conv2d's path. The text encoders have no convolutions."""
    pack_convolutions(pipe.unet)
    pack_convolutions(pipe.vae, VAE_MIN_PIXELS)
    return pipe


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
