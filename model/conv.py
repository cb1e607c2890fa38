"""nn.Conv2d, with its weight packed once for the CPU instead of on every call.

On the CPU, PyTorch runs convolutions with oneDNN, which wants the weight in a blocked layout
chosen for the input's shape. nn.Conv2d keeps the weight as [out, in, kh, kw], so oneDNN
reorders it into a fresh buffer on every call: for a 1280-channel 3x3 convolution that is 59 MB
copied, and page-faulted in, per call. In the UNet's deep levels, where such a weight meets an
8x8 feature map, the reorder costs more than the convolution: on a 2-core CPU, at batch 2, a call
takes 34 ms with it and 16 ms without. Conv2d keeps the reordered weight for the last input shape
it saw, as torch.compile's freezing pass does, and uses it while the weight stays the same tensor,
unmodified.

The price is a second copy of every weight used this way (2.4 GB for SD1.5's UNet in fp32);
`Conv2d.packing = False` turns it off. Only fp32 inference on the CPU takes this path; anything
that needs autograd, another dtype or another device is nn.Conv2d's own forward.
"""
import torch
from torch import nn


class Conv2d(nn.Conv2d):
    packing = True  # for every instance; False saves the memory of the packed copies
    _packed = None  # (weight, (input shape, its address, its version), oneDNN weight); not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packable(x):
            if self._packed is not None:
                self._packed = None
            return super().forward(x)
        w = self.weight
        key = (x.shape, w.data_ptr(), None if w.is_inference() else w._version)
        packed = self._packed
        if packed is None or packed[0] is not w or packed[1] != key:
            packed = self._packed = (w, key, torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, x.shape))
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed[2], self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], "")

    def _packable(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *self.parameters()))
        return (self.packing and not needs_grad and x.device.type == "cpu" and x.dim() == 4
                and x.dtype == self.weight.dtype == torch.float32
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and not torch.compiler.is_compiling())

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), .cuda(), ...: the packed copy is stale
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # deepcopy and pickle: a clone packs its own
        return {**super().__getstate__(), "_packed": None}
