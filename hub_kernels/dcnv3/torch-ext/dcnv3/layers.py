"""Hub layers replacing the forward of InternImage's `DCNv3Core` and, on the CPU, of its MLP (kernels' layer rules:
no `__init__`, no state of their own; they read the host module's settings and submodules through `self`)."""

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
        return ops.dcnv3_forward(*_operands(value, offset, mask), *_settings(self))


class DCNv3Softmax(DCNv3):
    """InternImage's `DCNv3SoftmaxCore`: the weights come as logits, normalised by a softmax over each group's points
    inside the operator (on the CPU on the way into the aggregation, never written to memory)."""

    def forward(self, value: torch.Tensor, offset: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        return ops.dcnv3_softmax_forward(*_operands(value, offset, mask_logits), *_settings(self))


def _operands(value: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # The operator takes one dtype; offsets and weights follow the value's (e.g. softmax kept in fp32 by amp).
    return value.contiguous(), offset.to(value.dtype).contiguous(), mask.to(value.dtype).contiguous()


def _settings(core: nn.Module) -> tuple:
    """The operator's arguments after the tensors, from the host core's square-kernel settings."""
    return (
        core.kernel_size,
        core.kernel_size,
        core.stride,
        core.stride,
        core.pad,
        core.pad,
        core.dilation,
        core.dilation,
        core.group,
        core.group_channels,
        float(core.offset_scale),
        bool(core.remove_center),
    )


# Activations the fused linear applies, by the host MLP's `hidden_act` (transformers' ACT2FN names).
FUSED_ACTIVATIONS = ("gelu", "relu", "silu")
# oneDNN's fused linear took 8-9 % off InternImage-T's CPU forward on one machine and added 5-8 % on another whose
# CPU has AVX2 but not AVX-512 (ATen's GEMM and a separate GELU were faster there); the layer fuses only where torch
# reports AVX-512, the likely difference (the first machine's capability was not recorded).
FUSED_LINEAR_PAYS = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fusable(mlp: nn.Module, hidden_states: torch.Tensor) -> bool:
    """float32 CPU inference through plain nn.Linear layers: the fused op has no autograd formula and knows nothing of
    adapters or quantised layers that replace fc1/fc2 (e.g. peft's LoRA), which must run as they are."""
    if not FUSED_LINEAR_PAYS or mlp.training or mlp.hidden_act not in FUSED_ACTIVATIONS:
        return False
    if not hasattr(ops, "linear_activation"):
        return False
    if type(mlp.fc1) is not nn.Linear or type(mlp.fc2) is not nn.Linear:
        return False
    # Hooks, and a replaced `forward` of a linear layer (accelerate's hooks wrap it), would be skipped by the fused op.
    # (`kernelize` itself sets the activation's `forward` when it is a hub layer without a kernel.)
    if any(_has_hooks(module) for module in (mlp.fc1, mlp.act, mlp.fc2)):
        return False
    if "forward" in vars(mlp.fc1) or "forward" in vars(mlp.fc2):
        return False
    if hidden_states.device.type != "cpu" or hidden_states.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    weights = (mlp.fc1.weight, mlp.fc2.weight)
    if any(weight.device.type != "cpu" or weight.dtype != torch.float32 for weight in weights):
        return False
    return not (torch.is_grad_enabled() and (hidden_states.requires_grad or any(w.requires_grad for w in weights)))


class InternImageMLP(nn.Module):
    """InternImage's MLP (fc1, activation, fc2) for CPU inference: each linear layer one oneDNN op with its bias, fc1
    with the activation fused. Elsewhere (training, autocast, other dtypes or devices) it runs the host's layers."""

    hidden_act: str
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    dropout: nn.Module

    can_torch_compile = True
    has_backward = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _fusable(self, hidden_states):
            return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))
        hidden_states = ops.linear_activation(hidden_states, self.fc1.weight, self.fc1.bias, self.hidden_act)
        return ops.linear_activation(hidden_states, self.fc2.weight, self.fc2.bias, "none")
