"""Hub layer replacing the forward of InternImage's `DCNv3Core` (kernels' layer rules: no `__init__`, no state of
its own; it reads the host module's settings through `self`)."""

import torch
from torch import nn

from ._ops import ops


class DCNv3(nn.Module):
    kernel_size: int
    stride: int
    pad: int
    dilation: int
    group: int
    group_channels: int
    offset_scale: float
    remove_center: bool

    can_torch_compile = True
    has_backward = True

    def forward(self, value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The operator takes one dtype; offsets and weights follow the value's (e.g. softmax kept in fp32 by amp).
        return ops.dcnv3_forward(
            value.contiguous(),
            offset.to(value.dtype).contiguous(),
            mask.to(value.dtype).contiguous(),
            self.kernel_size,
            self.kernel_size,
            self.stride,
            self.stride,
            self.pad,
            self.pad,
            self.dilation,
            self.dilation,
            self.group,
            self.group_channels,
            float(self.offset_scale),
            bool(self.remove_center),
        )
