# Copyright 2026 The InternImage-HF authors. All rights reserved.
#
# Licensed under the MIT License.
"""Pure-PyTorch DCNv3 core operator (deformable aggregation of InternImage).

The operator takes the projected value map, the per-point offsets and the per-point aggregation weights and returns
the aggregated map; the learned projections that produce those tensors live in the modeling file. `DCNv3Core` is
parameter-free so that the kernels hub can swap its forward for a compiled kernel (`kernels.kernelize`).
"""

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ENV_VARS_TRUE_VALUES, is_kernels_available


def _undecorated(layer_name: str):
    return lambda cls: cls


if is_kernels_available():
    # transformers' decorator, which honours USE_HUB_KERNELS.
    from transformers.integrations import use_kernel_forward_from_hub
elif os.environ.get("USE_HUB_KERNELS", "YES").upper() not in ENV_VARS_TRUE_VALUES:
    use_kernel_forward_from_hub = _undecorated
else:
    # transformers accepts only some kernels releases (5.23 wants kernels >= 0.18.2) and then makes its decorator a
    # no-op; the package calls kernels directly, so it decorates with kernels' own where kernels is installed at all.
    try:
        from kernels import use_kernel_forward_from_hub
    except ImportError:  # pragma: no cover - exercised only where kernels is missing
        use_kernel_forward_from_hub = _undecorated


def _aten_grid_sample(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _define_opaque_grid_sample():
    """`internimage::grid_sample_bilinear_zeros`: F.grid_sample (bilinear, zero padding, align_corners=False) as an
    op that torch.compile calls as it is. Inductor otherwise decomposes grid_sample into generated gathers that run
    the operator 8x slower than ATen's kernel on the CPU (batch 8, 56x56, 64 channels). Defined once per process,
    whether this file is imported as the package or as Hub remote code."""
    try:
        return torch.ops.internimage.grid_sample_bilinear_zeros
    except AttributeError:
        pass

    @torch.library.custom_op("internimage::grid_sample_bilinear_zeros", mutates_args=())
    def grid_sample_bilinear_zeros(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return _aten_grid_sample(value, grid)

    @grid_sample_bilinear_zeros.register_fake
    def _(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return value.new_empty(value.shape[0], value.shape[1], grid.shape[1], grid.shape[2])

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output: torch.Tensor):
        value, grid = ctx.saved_tensors
        bilinear, zeros, align_corners = 0, 0, False
        return torch.ops.aten.grid_sampler_2d_backward(
            grad_output, value, grid, bilinear, zeros, align_corners, [ctx.needs_input_grad[0], True]
        )

    grid_sample_bilinear_zeros.register_autograd(backward, setup_context=setup_context)
    return torch.ops.internimage.grid_sample_bilinear_zeros


opaque_grid_sample = _define_opaque_grid_sample()


def _grid_sample(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling with zero padding; under torch.compile (not export, which keeps standard ops for ONNX and
    other runtimes) through the opaque op above."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return opaque_grid_sample(value, grid)
    return _aten_grid_sample(value, grid)


def _sampling_grid_base(
    height_out: int,
    width_out: int,
    height_in: int,
    width_in: int,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    offset_scale: float,
    remove_center: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Sampling locations with zero offsets, in `grid_sample` coordinates, shape `(P, H_out * W_out, 2)`.

    Points are enumerated x-major (`p = ix * kernel_h + iy`) as in the original operator, whose checkpoints order
    their offset and mask rows that way. The original pads the input by `pad` and normalises by the padded size;
    sampling the unpadded map with zero padding and normalising by its own size is the same bilinear sample.
    """
    half_h = dilation_h * (kernel_h - 1) // 2
    half_w = dilation_w * (kernel_w - 1) // 2
    kernel_x = (torch.arange(kernel_w, dtype=dtype, device=device) * dilation_w - half_w) * offset_scale
    kernel_y = (torch.arange(kernel_h, dtype=dtype, device=device) * dilation_h - half_h) * offset_scale
    kernel_x, kernel_y = torch.meshgrid(kernel_x, kernel_y, indexing="ij")
    kernel_points = torch.stack([kernel_x.reshape(-1), kernel_y.reshape(-1)], dim=-1)
    if remove_center:
        center = (kernel_h * kernel_w - 1) // 2
        kernel_points = torch.cat([kernel_points[:center], kernel_points[center + 1 :]])

    center_x = torch.arange(width_out, dtype=dtype, device=device) * stride_w + (half_w - pad_w)
    center_y = torch.arange(height_out, dtype=dtype, device=device) * stride_h + (half_h - pad_h)
    center_y, center_x = torch.meshgrid(center_y, center_x, indexing="ij")
    centers = torch.stack([center_x.reshape(-1), center_y.reshape(-1)], dim=-1)

    pixels = kernel_points[:, None, :] + centers[None, :, :]
    size = torch.tensor([width_in, height_in], dtype=dtype, device=device)
    return (2 * pixels + 1) / size - 1


def softmax_over_points(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax along the points dimension `dim`, written as exp / sum: on the CPU several times faster than
    `Tensor.softmax`, whose kernel vectorises along the points (8 or 9) rather than the pixels."""
    weights = (logits - logits.amax(dim=dim, keepdim=True)).exp()
    return weights / weights.sum(dim=dim, keepdim=True)


def dcnv3_core_pytorch(
    value: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
    softmax: bool = False,
) -> torch.Tensor:
    """DCNv3 aggregation: `out[n,h,w,g*D+c] = sum_p mask[n,h,w,g,p] * bilinear(value[n,:,:,g*D+c], loc_p)`.

    Args:
        value: `(N, H_in, W_in, group * group_channels)`, channels last.
        offset: `(N, H_out, W_out, group * P * 2)`, per group and point an (x, y) displacement in kernel units.
        mask: `(N, H_out, W_out, group * P)`, aggregation weights, used as given; with `softmax=True` logits,
            normalised by a softmax over each group's points.

    Half-precision inputs are sampled in float32: in float16 or bfloat16 the normalised sampling coordinates lose
    up to half a pixel. The result has the dtype of `value`.
    """
    batch, height_in, width_in, _ = value.shape
    output_dtype = value.dtype
    _, height_out, width_out, _ = offset.shape
    num_points = kernel_h * kernel_w - int(bool(remove_center))
    compute_dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32

    base = _sampling_grid_base(
        height_out,
        width_out,
        height_in,
        width_in,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        offset_scale,
        remove_center,
        compute_dtype,
        value.device,
    )
    # Offsets are in pixels times offset_scale; grid units are 2 / size per pixel.
    offset_to_grid = torch.tensor(
        [2 * offset_scale / width_in, 2 * offset_scale / height_in], dtype=compute_dtype, device=value.device
    )
    length_out = height_out * width_out
    # Points before pixels: grid_sample then vectorises over the long pixel axis, and the weighted sum over points
    # runs over contiguous rows instead of a reduction along a last dimension of 8 or 9.
    offset = offset.to(compute_dtype).reshape(batch, length_out, group, num_points, 2).permute(0, 2, 3, 1, 4)
    grid = torch.addcmul(base, offset, offset_to_grid).reshape(batch * group, num_points, length_out, 2)

    value = value.to(compute_dtype).reshape(batch, height_in, width_in, group, group_channels)
    value = value.permute(0, 3, 4, 1, 2).reshape(batch * group, group_channels, height_in, width_in)
    sampled = _grid_sample(value, grid)

    # Under torch.compile the softmax is taken points before pixels: inductor fuses it into the weighted sum below,
    # which then reads the weights along the pixel axis it vectorises over (in the incoming (..., group * P) layout,
    # 9 strided loads a vector). Eager keeps its order and so its results to the last bit, which the embedded
    # detection demo is sensitive to (benchmarks/RESULTS.md).
    softmax_late = softmax and torch.compiler.is_compiling()
    mask = mask.to(compute_dtype).reshape(batch, length_out, group, num_points)
    if softmax and not softmax_late:
        mask = softmax_over_points(mask, dim=-1)
    mask = mask.permute(0, 2, 3, 1).reshape(batch * group, 1, num_points, length_out)
    if softmax_late:
        mask = softmax_over_points(mask, dim=2)
    point_samples, point_weights = sampled.unbind(2), mask.unbind(2)
    output = point_samples[0] * point_weights[0]
    for samples, weights in zip(point_samples[1:], point_weights[1:]):
        output.addcmul_(samples, weights)
    output = output.view(batch, group * group_channels, height_out, width_out).permute(0, 2, 3, 1)
    return output.contiguous().to(output_dtype)


def check_dcnv3_inputs(value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, core: "DCNv3Core") -> None:
    """Raise a ValueError naming the first inconsistency between the tensors and the operator's settings."""
    for name in ("kernel_size", "stride", "dilation", "group", "group_channels"):
        if getattr(core, name) < 1:
            raise ValueError(f"DCNv3 `{name}` must be a positive integer; got {getattr(core, name)}.")
    if core.pad < 0:
        raise ValueError(f"DCNv3 `pad` must not be negative; got {core.pad}.")
    if core.remove_center and core.kernel_size % 2 == 0:
        raise ValueError(f"DCNv3 `remove_center` needs an odd kernel size; got {core.kernel_size}.")
    if value.dim() != 4 or offset.dim() != 4 or mask.dim() != 4:
        raise ValueError(
            "DCNv3 expects channels-last 4-D tensors (N, H, W, C); got value, offset and mask with "
            f"{value.dim()}, {offset.dim()} and {mask.dim()} dimensions."
        )
    channels = core.group * core.group_channels
    if value.shape[-1] != channels:
        raise ValueError(
            f"DCNv3 value has {value.shape[-1]} channels in its last dimension, expected group * group_channels = "
            f"{channels}. Inputs must be channels-last (N, H, W, C)."
        )
    height_out = (value.shape[1] + 2 * core.pad - (core.dilation * (core.kernel_size - 1) + 1)) // core.stride + 1
    width_out = (value.shape[2] + 2 * core.pad - (core.dilation * (core.kernel_size - 1) + 1)) // core.stride + 1
    if value.shape[1] < 1 or value.shape[2] < 1 or height_out < 1 or width_out < 1:
        raise ValueError(
            f"DCNv3 value map of {value.shape[1]}x{value.shape[2]} pixels is empty or smaller than the kernel's reach "
            f"({core.dilation * (core.kernel_size - 1) + 1} pixels with padding {core.pad})."
        )
    num_points = core.kernel_size**2 - int(core.remove_center)
    expected_offset = (value.shape[0], height_out, width_out, core.group * num_points * 2)
    expected_mask = expected_offset[:3] + (core.group * num_points,)
    if tuple(offset.shape) != expected_offset:
        raise ValueError(f"DCNv3 offset has shape {tuple(offset.shape)}, expected {expected_offset}.")
    if tuple(mask.shape) != expected_mask:
        raise ValueError(f"DCNv3 mask has shape {tuple(mask.shape)}, expected {expected_mask}.")


@use_kernel_forward_from_hub("DCNv3")
class DCNv3Core(nn.Module):
    """Parameter-free DCNv3 aggregation with square kernels, as InternImage uses it.

    Its forward is what a hub kernel's `DCNv3` layer replaces; the kernel reads the settings below from `self`.
    """

    def __init__(
        self,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        group_channels: int = 16,
        offset_scale: float = 1.0,
        remove_center: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = group_channels
        self.offset_scale = offset_scale
        self.remove_center = remove_center

    def forward(self, value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_dcnv3_inputs(value, offset, mask, self)
        return dcnv3_core_pytorch(value, offset, mask, *self.operator_settings())

    def operator_settings(self) -> tuple:
        """The operator's arguments after the tensors (square kernel, stride, padding and dilation)."""
        return (
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
            self.offset_scale,
            self.remove_center,
        )

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}, dilation={self.dilation}, "
            f"group={self.group}, group_channels={self.group_channels}, offset_scale={self.offset_scale}, "
            f"remove_center={self.remove_center}"
        )


@use_kernel_forward_from_hub("DCNv3Softmax")
class DCNv3SoftmaxCore(DCNv3Core):
    """`DCNv3Core` whose weights come as logits, normalised by a softmax over each group's points, as InternImage
    uses the operator. One module for both, so that the hub kernel's `DCNv3Softmax` layer can fuse the softmax into
    the aggregation (on the CPU the weights are then never written to memory)."""

    def forward(self, value: torch.Tensor, offset: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        check_dcnv3_inputs(value, offset, mask_logits, self)
        return dcnv3_core_pytorch(value, offset, mask_logits, *self.operator_settings(), softmax=True)
