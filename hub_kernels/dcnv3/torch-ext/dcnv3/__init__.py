"""DCNv3, the deformable aggregation of InternImage, as a compiled operator with autograd and torch.compile
support. `layers.DCNv3` and `layers.DCNv3Softmax` replace the forward of InternImage's parameter-free core modules
(`kernels.kernelize`)."""

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


def dcnv3_softmax(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask_logits: torch.Tensor,
    *settings,
) -> torch.Tensor:
    """`dcnv3` with the weights given as logits (N, H_out, W_out, group * P), normalised by a softmax over each
    group's P points, as InternImage computes them; the same settings follow the tensors."""
    return ops.dcnv3_softmax_forward(input, offset, mask_logits, *settings)


def _dcnv3_forward_fake(input, offset, mask, *settings):
    return input.new_empty((offset.shape[0], offset.shape[1], offset.shape[2], input.shape[3]))


for _forward in ("dcnv3_forward", "dcnv3_softmax_forward"):
    torch.library.register_fake(add_op_namespace_prefix(_forward))(_dcnv3_forward_fake)


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


def _softmax_backward(ctx, grad_output):
    """The softmax's gradient through the aggregation's: w * (g - sum(g * w)) over each group's points, with the
    weights recomputed from the logits in float32 (float64 for float64)."""
    input, offset, mask_logits = ctx.saved_tensors
    group = ctx.settings[8]
    logits = mask_logits.unflatten(-1, (group, -1))
    weights = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    upstream = grad_output.contiguous()
    grad_input, grad_offset, grad_weights = ops.dcnv3_backward(
        input, offset, weights.to(logits.dtype).flatten(-2), upstream, *ctx.settings
    )
    grad_weights = grad_weights.unflatten(-1, (group, -1)).to(weights.dtype)
    grad_logits = weights * (grad_weights - (grad_weights * weights).sum(-1, keepdim=True))
    return (grad_input, grad_offset, grad_logits.flatten(-2).to(logits.dtype), *([None] * len(ctx.settings)))


torch.library.register_autograd(add_op_namespace_prefix("dcnv3_forward"), _backward, setup_context=_setup_context)
torch.library.register_autograd(
    add_op_namespace_prefix("dcnv3_softmax_forward"), _softmax_backward, setup_context=_setup_context
)

__all__ = ["dcnv3", "dcnv3_softmax", "layers"]
