"""DCNv3, the deformable aggregation of InternImage, as a compiled operator with autograd and torch.compile
support. `layers.DCNv3` replaces the forward of InternImage's parameter-free core module (`kernels.kernelize`)."""

import torch

from . import layers
from ._ops import add_op_namespace_prefix, ops


def dcnv3(
    input: torch.Tensor,
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
) -> torch.Tensor:
    """Aggregate `input` (N, H, W, group * group_channels) at the sampling points given by `offset`
    (N, H_out, W_out, group * P * 2, (x, y) per point) with the weights `mask` (N, H_out, W_out, group * P)."""
    return ops.dcnv3_forward(
        input,
        offset,
        mask,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        group,
        group_channels,
        offset_scale,
        remove_center,
    )


@torch.library.register_fake(add_op_namespace_prefix("dcnv3_forward"))
def _dcnv3_forward_fake(input, offset, mask, *settings):
    return input.new_empty((offset.shape[0], offset.shape[1], offset.shape[2], input.shape[3]))


@torch.library.register_fake(add_op_namespace_prefix("dcnv3_backward"))
def _dcnv3_backward_fake(input, offset, mask, grad_output, *settings):
    return [torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)]


if hasattr(ops, "linear_activation"):  # CPU builds

    @torch.library.register_fake(add_op_namespace_prefix("linear_activation"))
    def _linear_activation_fake(input, weight, bias, activation):
        return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    input, offset, mask, *settings = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.settings = settings


def _backward(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    grads = ops.dcnv3_backward(input, offset, mask, grad_output.contiguous(), *ctx.settings)
    return (*grads, *([None] * len(ctx.settings)))


torch.library.register_autograd(add_op_namespace_prefix("dcnv3_forward"), _backward, setup_context=_setup_context)

__all__ = ["dcnv3", "layers"]
