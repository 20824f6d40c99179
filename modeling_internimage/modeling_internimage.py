# Copyright 2026 The InternImage-HF authors. All rights reserved.
#
# Licensed under the MIT License.
"""PyTorch InternImage model (Wang et al., "InternImage: Exploring Large-Scale Vision Foundation Models with
Deformable Convolutions", CVPR 2023).

The trunk runs channels-last (N, H, W, C) as the original does; every tensor handed out (hidden states, feature
maps, stage outputs) is NCHW, a permuted view of the tensor the next layer consumes.
"""

import functools
import math
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.modeling_utils import PreTrainedModel

from .configuration_internimage import REMOTE_CODE_AUTO_MAP, InternImageConfig
from .dcnv3 import DCNv3Core


# Fixed by the released H/G checkpoints (the original hard-codes them too).
CLIP_PROJECTOR_DIM = 1024
CLIP_PROJECTOR_HEADS = 16
CLIP_EMBED_DIM = 768

ACT_LAYERS = {"GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU}


class InternImageChannelsLastBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d applied to a channels-last (N, H, W, C) tensor."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def build_channels_last_norm(config: InternImageConfig, num_channels: int) -> nn.Module:
    """The configured norm (`config.norm_layer`) over the last dimension of a channels-last tensor."""
    if config.norm_layer == "BN":
        return InternImageChannelsLastBatchNorm(num_channels)
    return nn.LayerNorm(num_channels, eps=config.layer_norm_eps)


# (post-op, algorithm) of the activations oneDNN fuses; exact (erf) GELU only, as the original uses.
_ONEDNN_POST_OPS = {nn.ReLU: ("relu", ""), nn.SiLU: ("swish", "")}


def _onednn_post_op(activation: nn.Module) -> tuple[str, str] | None:
    if type(activation) is nn.GELU:
        return ("gelu", "none") if activation.approximate == "none" else None
    return _ONEDNN_POST_OPS.get(type(activation))


@functools.cache
def onednn_linear_op() -> Callable[..., torch.Tensor] | None:
    """oneDNN's linear with bias and activation fused, the op torch.compile uses for CPU inference, or None.

    It skips the bias copy of ATen's addmm and, fused with the MLP's activation, a pass over the widest tensor of
    every block: float32 InternImage-T inference on CPU 8-9 % faster. The op is private to torch, so it is used only
    where this torch has it and, checked once on a small input, it computes what F.linear and GELU compute.
    """
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return None
    # Explicit device and dtype: the check must not follow torch.set_default_device / set_default_dtype.
    probe = {"device": "cpu", "dtype": torch.float32}
    inputs = torch.linspace(-2, 2, 24, **probe).reshape(3, 8)
    weight, bias = torch.linspace(-1, 1, 32, **probe).reshape(4, 8), torch.linspace(-0.5, 0.5, 4, **probe)
    try:
        with torch.no_grad():
            fused = op(inputs, weight, bias, "gelu", [], "none")
            agrees = torch.allclose(fused, F.gelu(F.linear(inputs, weight, bias)), atol=1e-5)
    except (RuntimeError, TypeError):
        agrees = False
    return op if agrees else None


def _called_plainly(*modules: nn.Module) -> bool:
    """No forward hooks and no forward replaced on the instance (accelerate's offload hooks wrap `forward` itself)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not any(
        module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module) for module in modules
    )


def runs_on_onednn(hidden_states: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether `linear` may run on `hidden_states` through oneDNN: float32 inference on CPU.

    The oneDNN op has no autograd formula, and compilers, exporters and autocast should see the plain op, so it is
    not used where gradients are wanted, nor under torch.compile, export, tracing or CPU autocast.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if not isinstance(hidden_states, torch.Tensor):
        return False
    if hidden_states.device.type != "cpu" or hidden_states.dtype != torch.float32 or hidden_states.numel() == 0:
        return False
    if linear.weight.dtype != torch.float32 or linear.weight.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in linear.parameters())):
        return False
    return onednn_linear_op() is not None


def onednn_linear(hidden_states: torch.Tensor, linear: nn.Linear, activation: nn.Module | None = None) -> torch.Tensor:
    """`activation(linear(hidden_states))` as one oneDNN op, where `runs_on_onednn` allows it and oneDNN fuses the
    activation (`_onednn_post_op`)."""
    post_op, algorithm = ("none", "") if activation is None else _onednn_post_op(activation)
    return onednn_linear_op()(hidden_states, linear.weight, linear.bias, post_op, [], algorithm)


def softmax_last_dim(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dimension (the 8 or 9 sampling points); several times faster on CPU than
    `Tensor.softmax(-1)`, whose kernel vectorises along that dimension."""
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    return weights / weights.sum(dim=-1, keepdim=True)


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability `drop_prob`, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
    return hidden_states * keep / keep_prob


class InternImageDropPath(nn.Module):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return drop_path(hidden_states, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class InternImageEmbeddings(nn.Module):
    """Stem: two 3x3 stride-2 convolutions with norm and activation between them (stride 4 in total)."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        self.num_channels = config.num_channels
        self.conv1 = nn.Conv2d(config.num_channels, config.channels // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = build_channels_last_norm(config, config.channels // 2)
        self.act = ACT_LAYERS[config.act_layer]()
        self.conv2 = nn.Conv2d(config.channels // 2, config.channels, kernel_size=3, stride=2, padding=1)
        self.norm2 = build_channels_last_norm(config, config.channels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv1(pixel_values).permute(0, 2, 3, 1)
        hidden_states = self.act(self.norm1(hidden_states)).permute(0, 3, 1, 2)
        hidden_states = self.conv2(hidden_states).permute(0, 2, 3, 1)
        return self.norm2(hidden_states).permute(0, 3, 1, 2)


class InternImageLinear(nn.Linear):
    """nn.Linear that runs through oneDNN, its bias fused, in float32 CPU inference (`runs_on_onednn`)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if runs_on_onednn(hidden_states, self):
            return onednn_linear(hidden_states, self)
        return super().forward(hidden_states)


# The DCNv3 projections are initialised through their own classes, not keyed on the parent block as Deformable DETR
# does: transformers skips `_init_weights` for a module without parameters of its own when the model is custom code
# (`PreTrainedModel._initialize_weights`), which this package is, so a parent-keyed init would never run.
class InternImageZeroInitLinear(InternImageLinear):
    """Linear layer initialised to zero: the DCNv3 offset and weight predictors (training starts from the regular
    grid with uniform weights) and the center-feature-scale projection (blend 0.5)."""


class InternImageXavierLinear(InternImageLinear):
    """Linear layer initialised xavier-uniform with zero bias: the DCNv3 value and output projections."""


class InternImageDCNv3(nn.Module):
    """DCNv3 block operator: value projection, offsets and softmax weights from a depthwise-conv branch, deformable
    aggregation by `DCNv3Core`, output projection."""

    def __init__(self, config: InternImageConfig, channels: int, groups: int) -> None:
        super().__init__()
        dw_kernel_size = config.dw_kernel_size or 3
        self.groups = groups
        self.num_points = config.num_points
        self.dw_conv = nn.Conv2d(
            channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels
        )
        self.dw_norm = build_channels_last_norm(config, channels)
        self.dw_act = ACT_LAYERS[config.act_layer]()
        self.offset = InternImageZeroInitLinear(channels, groups * self.num_points * 2)
        self.mask = InternImageZeroInitLinear(channels, groups * self.num_points)
        self.input_proj = InternImageXavierLinear(channels, channels)
        self.output_proj = InternImageXavierLinear(channels, channels)
        if config.center_feature_scale:
            self.center_feature_scale_proj = InternImageZeroInitLinear(channels, groups)
        else:
            self.center_feature_scale_proj = None
        self.core = DCNv3Core(
            kernel_size=3,
            stride=1,
            pad=1,
            dilation=1,
            group=groups,
            group_channels=channels // groups,
            offset_scale=config.offset_scale,
            remove_center=config.remove_center,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = hidden_states.shape
        value = self.input_proj(hidden_states)
        # Offsets and weights come from the block input, not from the projected value.
        offset_features = self.dw_conv(hidden_states.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        offset_features = self.dw_act(self.dw_norm(offset_features))
        offset = self.offset(offset_features)
        mask = self.mask(offset_features).view(batch, height, width, self.groups, self.num_points)
        mask = softmax_last_dim(mask).view(batch, height, width, self.groups * self.num_points)
        output = self.core(value, offset, mask)
        if self.center_feature_scale_proj is not None:
            blend = torch.sigmoid(self.center_feature_scale_proj(offset_features))[..., None]
            grouped_shape = (batch, height, width, self.groups, channels // self.groups)
            output = torch.lerp(output.view(grouped_shape), value.view(grouped_shape), blend).view_as(value)
        return self.output_proj(output)


class InternImageMLP(nn.Module):
    def __init__(self, config: InternImageConfig, channels: int) -> None:
        super().__init__()
        hidden_channels = int(channels * config.mlp_ratio)
        self.fc1 = InternImageLinear(channels, hidden_channels)
        self.act = ACT_LAYERS[config.act_layer]()
        self.fc2 = InternImageLinear(hidden_channels, channels)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._fuses_fc1_activation(hidden_states):
            hidden_states = onednn_linear(hidden_states, self.fc1, self.act)
        else:
            hidden_states = self.act(self.fc1(hidden_states))
        return self.dropout(self.fc2(self.dropout(hidden_states)))

    def _fuses_fc1_activation(self, hidden_states: torch.Tensor) -> bool:
        """fc1 and the activation as one oneDNN op, unless either module was replaced (adapters, quantisation) or
        carries hooks (accelerate's offloading included), which the fused op would skip."""
        return (
            runs_on_onednn(hidden_states, self.fc1)
            and type(self.fc1) is InternImageLinear
            and _onednn_post_op(self.act) is not None
            and _called_plainly(self.fc1, self.act)
        )


class InternImageLayer(GradientCheckpointingLayer):
    """One block: a DCNv3 residual branch and an MLP residual branch, in the variant's norm placement.

    pre-norm (T): `x + f(norm(x))`; post-norm (S-XL, G): `x + norm(f(x))`, the norm on the branch output;
    res-post-norm (H): `x + post(f(norm(x)))`. An optional per-channel scale multiplies each branch.
    """

    def __init__(self, config: InternImageConfig, channels: int, groups: int, drop_path_rate: float) -> None:
        super().__init__()
        self.post_norm = config.post_norm
        self.norm1 = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.dcn = InternImageDCNv3(config, channels, groups)
        self.norm2 = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.mlp = InternImageMLP(config, channels)
        self.drop_path = InternImageDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        if config.layer_scale is not None:
            self.layer_scale1 = nn.Parameter(torch.full((channels,), float(config.layer_scale)))
            self.layer_scale2 = nn.Parameter(torch.full((channels,), float(config.layer_scale)))
        else:
            self.layer_scale1 = self.layer_scale2 = None
        if config.res_post_norm:
            self.res_post_norm1 = nn.LayerNorm(channels, eps=config.layer_norm_eps)
            self.res_post_norm2 = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        else:
            self.res_post_norm1 = self.res_post_norm2 = None

    def _branch(self, hidden_states, norm, function, res_post_norm, scale) -> torch.Tensor:
        if self.post_norm:
            output = norm(function(hidden_states))
        else:
            output = function(norm(hidden_states))
            if res_post_norm is not None:
                output = res_post_norm(output)
        if scale is not None:
            output = scale * output
        return self.drop_path(output)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self._branch(
            hidden_states, self.norm1, self.dcn, self.res_post_norm1, self.layer_scale1
        )
        return hidden_states + self._branch(
            hidden_states, self.norm2, self.mlp, self.res_post_norm2, self.layer_scale2
        )


class InternImageDownsample(nn.Module):
    """3x3 stride-2 convolution without bias that doubles the width, then the configured norm."""

    def __init__(self, config: InternImageConfig, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = build_channels_last_norm(config, 2 * channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(hidden_states).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class InternImageStage(nn.Module):
    """A stage: its blocks, the extra norms inside stage 3 of H/G, the stage-end norm (T, H, G) and the
    downsampling into the next stage."""

    def __init__(
        self, config: InternImageConfig, stage_idx: int, drop_path_rates: list[float], downsample: bool
    ) -> None:
        super().__init__()
        channels = config.stage_channels[stage_idx]
        self.layers = nn.ModuleList(
            InternImageLayer(config, channels, config.groups[stage_idx], rate) for rate in drop_path_rates
        )
        block_ids = config.level2_post_norm_block_ids if config.level2_post_norm and stage_idx == 2 else []
        self.post_norm_positions = {block_id: position for position, block_id in enumerate(block_ids)}
        self.post_norms = nn.ModuleList(nn.LayerNorm(channels, eps=config.layer_norm_eps) for _ in block_ids)
        has_norm = not config.post_norm or config.center_feature_scale
        self.norm = nn.LayerNorm(channels, eps=config.layer_norm_eps) if has_norm else None
        self.downsample = InternImageDownsample(config, channels) if downsample else None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Map an NCHW input to (stage output, input of the next stage), both NCHW."""
        hidden_states = hidden_states.permute(0, 2, 3, 1)
        for block_id, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states)
            if block_id in self.post_norm_positions:
                hidden_states = self.post_norms[self.post_norm_positions[block_id]](hidden_states)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        stage_output = hidden_states.permute(0, 3, 1, 2)
        next_input = self.downsample(stage_output) if self.downsample is not None else None
        return stage_output, next_input


class InternImageEncoder(nn.Module):
    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        num_blocks = sum(config.depths)
        if config.drop_path_type == "uniform":
            rates = [config.drop_path_rate] * num_blocks
        else:
            rates = torch.linspace(0, config.drop_path_rate, num_blocks, device="cpu").tolist()
        self.stages = nn.ModuleList()
        for stage_idx, depth in enumerate(config.depths):
            stage_rates = rates[sum(config.depths[:stage_idx]) : sum(config.depths[: stage_idx + 1])]
            downsample = stage_idx < config.num_stages - 1
            self.stages.append(InternImageStage(config, stage_idx, stage_rates, downsample))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The NCHW output of every stage, after its stage-end norm and before downsampling."""
        stage_outputs = []
        for stage in self.stages:
            stage_output, hidden_states = stage(hidden_states)
            stage_outputs.append(stage_output)
        return tuple(stage_outputs)


class InternImageConvPooler(nn.Module):
    """Head of T-XL: 1x1 conv to `cls_scale` times the width, BatchNorm, activation, global average pool."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        in_channels = config.stage_channels[-1]
        self.out_channels = int(in_channels * config.cls_scale)
        self.conv = nn.Conv2d(in_channels, self.out_channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(self.out_channels)
        self.act = ACT_LAYERS[config.act_layer]()

    def forward(self, stage_outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        batch, _, height, width = stage_outputs[-1].shape
        if self.training and batch * height * width == 1:
            raise ValueError(
                "The classification head's BatchNorm cannot train on one value per channel: a batch of 1 image whose "
                "last stage is 1x1 (inputs of 32 pixels or fewer a side). Train with batches of 2 or more, or larger images."
            )
        return self.act(self.norm(self.conv(stage_outputs[-1]))).mean(dim=(2, 3))


class InternImageAttentionPool(nn.Module):
    """Cross-attention of the mean token over all tokens, without residual or MLP (the original's
    `AttentionPoolingBlock`)."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        dim = CLIP_PROJECTOR_DIM
        self.num_heads = CLIP_PROJECTOR_HEADS
        self.norm_q = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.norm_k = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.norm_v = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, CLIP_EMBED_DIM)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        head_dim = dim // self.num_heads
        query = self.q(self.norm_q(tokens.mean(dim=1, keepdim=True)))
        query = query.view(batch, 1, self.num_heads, head_dim).transpose(1, 2)
        key = self.k(self.norm_k(tokens)).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        value = self.v(self.norm_v(tokens)).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.proj(attended.transpose(1, 2).reshape(batch, dim))


class InternImageAttentionPooler(nn.Module):
    """Head of H/G: stage 4 upsampled by pixel shuffle plus stage 3, as tokens, pooled by cross-attention."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__()
        last_channels = config.stage_channels[-1]
        self.out_channels = CLIP_EMBED_DIM
        self.head_x4 = nn.Conv2d(last_channels, CLIP_PROJECTOR_DIM * 4, kernel_size=1)
        self.pixel_shuffle = nn.PixelShuffle(2)
        self.head_x3 = nn.Conv2d(last_channels // 2, CLIP_PROJECTOR_DIM, kernel_size=1)
        self.attention_pool = InternImageAttentionPool(config)
        self.fc_norm = nn.LayerNorm(CLIP_EMBED_DIM, eps=config.layer_norm_eps)

    def forward(self, stage_outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        features = self.pixel_shuffle(self.head_x4(stage_outputs[-1])) + self.head_x3(stage_outputs[-2])
        tokens = features.flatten(2).transpose(1, 2)
        return self.fc_norm(self.attention_pool(tokens))


def check_pixel_values(pixel_values: torch.Tensor | None, config: InternImageConfig, side_multiple: int = 1) -> None:
    """Raise a ValueError naming what is wrong with `pixel_values` before any layer sees it."""
    if pixel_values is None:
        raise ValueError("You have to specify pixel_values.")
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must be a 4-D batch (batch, channels, height, width); got shape {tuple(pixel_values.shape)}."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}. Raw images (e.g. uint8) must "
            "go through the image processor first (resize, rescale, normalize)."
        )
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[1]} channels in dimension 1, but the model expects "
            f"{config.num_channels} (config.num_channels). Channels-last images must be permuted to NCHW."
        )
    height, width = pixel_values.shape[-2:]
    if height < 1 or width < 1:
        raise ValueError(f"pixel_values is {height}x{width}: images need at least one pixel in each dimension.")
    if height % side_multiple or width % side_multiple:
        raise ValueError(
            f"pixel_values is {height}x{width}, but this model's attention-pooling head (use_clip_projector, as in "
            f"InternImage-H/G) needs height and width that are multiples of {side_multiple}."
        )


# Original module names -> this package's, applied in order to keys without a prefix. Each pattern carries at most
# one group, so the same table serves transformers' `key_mapping` at load time.
ORIGINAL_TO_HF_KEY_PATTERNS: dict[str, str] = {
    r"^head\.": "classifier.",
    r"^patch_embed\.norm(\d)\.1\.": r"embeddings.norm\1.",
    r"^patch_embed\.": "embeddings.",
    r"^levels\.(\d+)\.": r"encoder.stages.\1.",
    r"\.blocks\.(\d+)\.": r".layers.\1.",
    r"\.norm(\d)\.0\.": r".norm\1.",
    r"\.res_post_norm(\d)\.0\.": r".res_post_norm\1.",
    r"\.gamma(\d)$": r".layer_scale\1",
    r"\.dcn\.dw_conv\.0\.": ".dcn.dw_conv.",
    r"\.dcn\.dw_conv\.1\.1\.": ".dcn.dw_norm.",
    r"\.dcn\.center_feature_scale_proj_(weight|bias)$": r".dcn.center_feature_scale_proj.\1",
    r"\.post_norms\.(\d+)\.0\.": r".post_norms.\1.",
    r"(\.\d+)\.norm\.0\.": r"\1.norm.",
    r"\.downsample\.norm\.1\.": ".downsample.norm.",
    r"^conv_head\.0\.": "pooler.conv.",
    r"^conv_head\.1\.0\.": "pooler.norm.",
    r"^dcnv3_head_x4\.0\.": "pooler.head_x4.",
    r"^dcnv3_head_x3\.": "pooler.head_x3.",
    r"^clip_projector\.norm1_(q|k|v)\.0\.": r"pooler.attention_pool.norm_\1.",
    r"^clip_projector\.cross_dcn\.(q|k|v)_bias$": r"pooler.attention_pool.\1.bias",
    r"^clip_projector\.cross_dcn\.": "pooler.attention_pool.",
    r"^fc_norm\.0\.": "pooler.fc_norm.",
}

# Checkpoints in OpenGVLab's published Hub layout: every key under `model.`, `gamma1/2` already `layer_scale1/2`.
OPENGVLAB_HUB_KEY_MAPPING: dict[str, str] = {r"^model\.": "", **ORIGINAL_TO_HF_KEY_PATTERNS}


def convert_original_key(key: str) -> str:
    """Name in this package of an original (or OpenGVLab Hub layout) state-dict key, relative to the base model
    except for the classifier."""
    for pattern, replacement in OPENGVLAB_HUB_KEY_MAPPING.items():
        key = re.sub(pattern, replacement, key)
    return key


def _first(items: list[str], separator: str, limit: int = 20) -> str:
    """The first `limit` items joined, and how many more there are."""
    more = f"{separator}... and {len(items) - limit} more" if len(items) > limit else ""
    return separator.join(items[:limit]) + more


class InternImagePreTrainedModel(PreTrainedModel):
    config: InternImageConfig
    base_model_prefix = "internimage"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternImageLayer", "InternImageEmbeddings", "InternImageDownsample"]

    def post_init(self):
        super().post_init()
        if self.config.with_cp:
            # transformers 5.23 renamed the method (the old name warns); earlier releases have only the old one.
            enable = getattr(self, "activation_checkpointing_enable", None) or self.gradient_checkpointing_enable
            enable()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """As the original: Linear truncated normal, norms one/zero, convolutions PyTorch's default; DCNv3 offset and
        weight projections zero (a regular grid with uniform weights at start), its value/output projections
        xavier-uniform, the center-feature-scale projection zero (blend 0.5), layer scales at `config.layer_scale`."""
        if isinstance(module, InternImageZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, InternImageXavierLinear):
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, InternImageLayer) and module.layer_scale1 is not None:
            init.constant_(module.layer_scale1, self.config.layer_scale)
            init.constant_(module.layer_scale2, self.config.layer_scale)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; when the code files travel along (the package registers them),
        config.json maps all four Auto classes to them, so any of them loads the directory as remote code."""
        if self._auto_class is not None:
            self.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; checkpoints in OpenGVLab's Hub layout are renamed while loading."""
        kwargs.setdefault("key_mapping", OPENGVLAB_HUB_KEY_MAPPING)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Save in this package's layout, not in the layout the weights came in.
        model._weight_conversions = None
        return loaded

    def convert_original_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a state dict of the original implementation (the `'model'` entry of a training checkpoint) or of
        OpenGVLab's Hub repos (`model.` prefix, `layer_scale1/2`) to this model's names.

        The account is strict: a source key that nothing uses, a weight left unfilled or a shape that differs is a
        ValueError listing the keys, which is also what a checkpoint of another variant produces. Works on a model
        built on the meta device, so a conversion can be checked without allocating the weights.
        """
        expected = self.state_dict()
        converted = {}
        for key, tensor in state_dict.items():
            name = convert_original_key(key)
            if not name.startswith("classifier.") and self.base_model_prefix + "." + name in expected:
                name = self.base_model_prefix + "." + name
            converted[name] = (key, tensor)
        unused = sorted(key for name, (key, _) in converted.items() if name not in expected)
        missing = sorted(name for name in expected if name not in converted)
        mismatched = sorted(
            f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}"
            for name, (key, tensor) in converted.items()
            if name in expected and tensor.shape != expected[name].shape
        )
        problems = []
        if unused:
            problems.append(f"{len(unused)} checkpoint keys match no weight of the model: {_first(unused, ', ')}")
        if missing:
            problems.append(f"{len(missing)} model weights are not in the checkpoint: {_first(missing, ', ')}")
        if mismatched:
            problems.append(f"{len(mismatched)} shapes differ: {_first(mismatched, '; ')}")
        if problems:
            raise ValueError(
                f"The state dict does not fit this {type(self).__name__} (is it of another variant?). "
                + " | ".join(problems)
            )
        return {name: tensor for name, (_, tensor) in converted.items()}

    def load_original_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a state dict named as the original implementation or OpenGVLab's Hub repos, strictly (see
        `convert_original_state_dict`)."""
        self.load_state_dict(self.convert_original_state_dict(state_dict), strict=True)


class InternImageModel(InternImagePreTrainedModel):
    """InternImage trunk and pooling head. `pooler_output` is what the classifier's linear layer consumes."""

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__(config)
        self.embeddings = InternImageEmbeddings(config)
        self.encoder = InternImageEncoder(config)
        self.pooler = (
            InternImageAttentionPooler(config) if config.use_clip_projector else InternImageConvPooler(config)
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPoolingAndNoAttention:
        r"""
        Returns `last_hidden_state` (the last stage's output, NCHW), `pooler_output` and, if asked, `hidden_states`:
        the stem output and the four stage outputs, NCHW.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        check_pixel_values(pixel_values, self.config, side_multiple=32 if self.config.use_clip_projector else 1)

        embedding_output = self.embeddings(pixel_values)
        stage_outputs = self.encoder(embedding_output)
        pooled_output = self.pooler(stage_outputs)
        hidden_states = (embedding_output, *stage_outputs) if output_hidden_states else None

        if not return_dict:
            return tuple(v for v in (stage_outputs[-1], pooled_output, hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=stage_outputs[-1], pooler_output=pooled_output, hidden_states=hidden_states
        )


class InternImageForImageClassification(InternImagePreTrainedModel):
    accepts_loss_kwargs = False

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.internimage = InternImageModel(config)
        pooled_channels = self.internimage.pooler.out_channels
        self.classifier = nn.Linear(pooled_channels, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | ImageClassifierOutputWithNoAttention:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices for single-label classification, float targets for regression (`num_labels == 1`) or
            multi-hot vectors for multi-label classification (`config.problem_type`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.internimage(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                labels = torch.as_tensor(labels, device=logits.device)
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)

        if not return_dict:
            output = (logits, outputs.hidden_states) if outputs.hidden_states is not None else (logits,)
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class InternImageBackbone(BackboneMixin, InternImagePreTrainedModel):
    """Feature maps of the stem and stages (NCHW, strides 4 to 32) for detection and segmentation heads."""

    has_attentions = False

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__(config)
        self.embeddings = InternImageEmbeddings(config)
        self.encoder = InternImageEncoder(config)
        self.num_features = config.hidden_sizes
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BackboneOutput:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        check_pixel_values(pixel_values, self.config)

        embedding_output = self.embeddings(pixel_values)
        hidden_states = (embedding_output, *self.encoder(embedding_output))
        feature_maps = tuple(
            hidden_state for stage, hidden_state in zip(self.stage_names, hidden_states) if stage in self.out_features
        )
        if not return_dict:
            return (feature_maps, hidden_states) if output_hidden_states else (feature_maps,)
        return BackboneOutput(
            feature_maps=feature_maps, hidden_states=hidden_states if output_hidden_states else None, attentions=None
        )


__all__ = [
    "InternImagePreTrainedModel",
    "InternImageModel",
    "InternImageForImageClassification",
    "InternImageBackbone",
    "OPENGVLAB_HUB_KEY_MAPPING",
    "convert_original_key",
]
