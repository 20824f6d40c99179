"""Benchmarks of the dcnv3 kernel for `kernels benchmark` (CPU or GPU), at the four stage shapes of InternImage-T
(batch 8 at 224x224: 56x56 with 4 groups ... 7x7 with 32, 16 channels a group, 3x3 kernel). Each workload is
verified against, and timed beside, a PyTorch reference built on `grid_sample`:

    kernels benchmark hub_kernels/dcnv3            # a local tree (its build/), or
    kernels benchmark internimage-hf/dcnv3 --version 1
"""

import torch
import torch.nn.functional as F
from kernels.benchmark import Benchmark


def dcnv3_reference(value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
    """DCNv3 with a 3x3 kernel, stride 1, padding 1, dilation 1 and offset scale 1, by `grid_sample`: output pixel
    (h, w), point p = 3 * ix + iy of group g samples the value map at (w + ix - 1 + dx, h + iy - 1 + dy)."""
    batch, height, width, channels = value.shape
    depth = channels // group
    grid_y, grid_x = torch.meshgrid(
        torch.arange(height, dtype=value.dtype, device=value.device),
        torch.arange(width, dtype=value.dtype, device=value.device),
        indexing="ij",
    )
    kernel = torch.tensor([-1.0, 0.0, 1.0], dtype=value.dtype, device=value.device)
    kernel_x, kernel_y = kernel.repeat_interleave(3), kernel.repeat(3)  # x-major point order
    offset = offset.view(batch, height, width, group, 9, 2)
    x = grid_x[..., None, None] + kernel_x + offset[..., 0]
    y = grid_y[..., None, None] + kernel_y + offset[..., 1]
    grid = torch.stack([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)  # (N, H, W, G, 9, 2)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(batch * group, height, width * 9, 2)
    maps = (
        value.view(batch, height, width, group, depth)
        .permute(0, 3, 4, 1, 2)
        .reshape(batch * group, depth, height, width)
    )
    samples = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    samples = samples.view(batch, group, depth, height, width, 9)
    weights = mask.view(batch, height, width, group, 9).permute(0, 3, 1, 2, 4)[:, :, None]
    return (samples * weights).sum(-1).permute(0, 3, 4, 1, 2).reshape(batch, height, width, channels)


class _StageWorkloads:
    """Forward, and forward with backward, at one stage shape; subclasses set `size` and `groups`."""

    seed = 0
    size: int
    groups: int
    batch = 8

    def setup(self) -> None:
        channels, points = self.groups * 16, self.groups * 9
        self.value = torch.randn(self.batch, self.size, self.size, channels, device=self.device)
        self.offset = 0.5 * torch.randn(self.batch, self.size, self.size, 2 * points, device=self.device)
        logits = torch.randn(self.batch, self.size, self.size, self.groups, 9, device=self.device)
        self.mask = logits.softmax(-1).flatten(-2)
        self.upstream = torch.randn(self.batch, self.size, self.size, channels, device=self.device)
        self.settings = (3, 3, 1, 1, 1, 1, 1, 1, self.groups, 16, 1.0, False)

    def benchmark_forward(self) -> None:
        self.out = self.kernel.dcnv3(self.value, self.offset, self.mask, *self.settings)

    def verify_forward(self) -> torch.Tensor:
        return dcnv3_reference(self.value, self.offset, self.mask, self.groups)

    def benchmark_forward_backward(self) -> None:
        """The value gradient, from a forward and backward pass."""
        self.out = self._value_gradient(lambda v, o, m: self.kernel.dcnv3(v, o, m, *self.settings))

    def verify_forward_backward(self) -> torch.Tensor:
        return self._value_gradient(lambda v, o, m: dcnv3_reference(v, o, m, self.groups))

    def _value_gradient(self, operator) -> torch.Tensor:
        leaves = [tensor.detach().requires_grad_() for tensor in (self.value, self.offset, self.mask)]
        operator(*leaves).backward(self.upstream)
        return leaves[0].grad


class Stage1(_StageWorkloads, Benchmark):
    size, groups = 56, 4


class Stage2(_StageWorkloads, Benchmark):
    size, groups = 28, 8


class Stage3(_StageWorkloads, Benchmark):
    size, groups = 14, 16


class Stage4(_StageWorkloads, Benchmark):
    size, groups = 7, 32
