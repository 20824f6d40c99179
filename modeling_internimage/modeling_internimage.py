# Copyright 2026 The InternImage-HF authors. All rights reserved.
#
# Licensed under the MIT License.
"""PyTorch InternImage model (Wang et al., "InternImage: Exploring Large-Scale Vision Foundation Models with
Deformable Convolutions", CVPR 2023).

The trunk runs channels-last as the original does, held as tokens (N, H*W, C): norms, projections and residual
sums see a 3-D tensor, and only the convolutions and the DCNv3 operator see 4-D views of it. Every tensor handed out
(hidden states, feature maps, stage outputs) is NCHW, a view of the tokens the next layer consumes.

Why tokens and not (N, H, W, C): torch.compile's inductor (layout optimisation, on by default on the CPU) gives every
4-D tensor that feeds or follows a convolution the strides of a channels-last NCHW tensor. Applied to an (N, H, W, C)
tensor that makes H the fastest-moving dimension, so each norm wrote its output transposed and copied it back: the
compiled model ran slower than eager. 3-D tensors keep the layout they have.
"""

import math
import re
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_internimage import REMOTE_CODE_AUTO_MAP, InternImageConfig
from .dcnv3 import DCNv3SoftmaxCore, use_kernel_forward_from_hub


# Fixed by the released H/G checkpoints (the original hard-codes them too).
CLIP_PROJECTOR_DIM = 1024
CLIP_PROJECTOR_HEADS = 16
CLIP_EMBED_DIM = 768


class InternImageTokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of tokens (N, H*W, C)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens.transpose(1, 2)).transpose(1, 2)


def build_token_norm(config: InternImageConfig, num_channels: int) -> nn.Module:
    """The configured norm (`config.norm_layer`) over the channels of tokens (N, H*W, C)."""
    if config.norm_layer == "BN":
        return InternImageTokenBatchNorm(num_channels)
    return nn.LayerNorm(num_channels, eps=config.layer_norm_eps)


def to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """Tokens (N, H*W, C) of an NCHW feature map; a view where the map is channels-last in memory."""
    return feature_map.flatten(2).transpose(1, 2)


def to_feature_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The NCHW view (N, C, H, W) of tokens (N, H*W, C), for convolutions and for the feature maps handed out. Eager
    code takes the view as it is (channels-last memory, no copy). Under torch.compile with dynamic shapes, inductor
    (torch 2.13) fails on such views as convolution inputs and graph outputs (`tests/test_compile.py` keeps the
    reproduction), so there the view is made contiguous."""
    feature_map = tokens.transpose(1, 2).unflatten(2, (height, width))
    return feature_map.contiguous() if torch.compiler.is_compiling() else feature_map


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
        self.norm1 = build_token_norm(config, config.channels // 2)
        self.act = ACT2FN[config.hidden_act]
        self.conv2 = nn.Conv2d(config.channels // 2, config.channels, kernel_size=3, stride=2, padding=1)
        self.norm2 = build_token_norm(config, config.channels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.conv1(pixel_values)
        tokens = self.act(self.norm1(to_tokens(features)))
        features = self.conv2(to_feature_map(tokens, *features.shape[-2:]))
        return to_feature_map(self.norm2(to_tokens(features)), *features.shape[-2:])


class InternImageDCNv3(nn.Module):
    """DCNv3 block operator: value projection, offsets and softmax weights from a depthwise-conv branch, deformable
    aggregation by `DCNv3SoftmaxCore` (softmax over the points included), output projection."""

    def __init__(self, config: InternImageConfig, channels: int, groups: int) -> None:
        super().__init__()
        dw_kernel_size = config.dw_kernel_size or 3
        self.groups = groups
        self.num_points = config.num_points
        self.dw_conv = nn.Conv2d(
            channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2, groups=channels
        )
        self.dw_norm = build_token_norm(config, channels)
        self.dw_act = ACT2FN[config.hidden_act]
        self.offset = nn.Linear(channels, groups * self.num_points * 2)
        self.mask = nn.Linear(channels, groups * self.num_points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if config.center_feature_scale:
            self.center_feature_scale_proj = nn.Linear(channels, groups)
        else:
            self.center_feature_scale_proj = None
        self.core = DCNv3SoftmaxCore(
            kernel_size=3,
            stride=1,
            pad=1,
            dilation=1,
            group=groups,
            group_channels=channels // groups,
            offset_scale=config.offset_scale,
            remove_center=config.remove_center,
        )

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """DCNv3 over tokens (N, H*W, C) of an H x W map."""
        batch, length, channels = tokens.shape
        value = self.input_proj(tokens)
        # Offsets and weights come from the block input, not from the projected value.
        offset_features = to_tokens(self.dw_conv(to_feature_map(tokens, height, width)))
        offset_features = self.dw_act(self.dw_norm(offset_features))
        offset = self.offset(offset_features)
        mask_logits = self.mask(offset_features)
        spatial_shape = (batch, height, width, -1)
        output = self.core(value.view(spatial_shape), offset.view(spatial_shape), mask_logits.view(spatial_shape))
        output = output.reshape(batch, length, channels)
        if self.center_feature_scale_proj is not None:
            # Under autocast the projection may run in another precision than the value (torch.lerp needs one).
            blend = torch.sigmoid(self.center_feature_scale_proj(offset_features))[..., None].to(value.dtype)
            grouped_shape = (batch, length, self.groups, channels // self.groups)
            output = torch.lerp(output.view(grouped_shape), value.view(grouped_shape), blend).view_as(value)
        return self.output_proj(output)


@use_kernel_forward_from_hub("InternImageMLP")
class InternImageMLP(nn.Module):
    """fc1, activation, fc2. On the CPU the hub kernel's layer of this name (`kernelize` in inference mode) runs each
    linear layer as one oneDNN op with its bias, fc1 with the activation fused."""

    def __init__(self, config: InternImageConfig, channels: int) -> None:
        super().__init__()
        hidden_channels = int(channels * config.mlp_ratio)
        self.hidden_act = config.hidden_act
        self.fc1 = nn.Linear(channels, hidden_channels)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden_channels, channels)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))


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

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The block over tokens (N, H*W, C) of an H x W map."""
        dcn = partial(self.dcn, height=height, width=width)
        hidden_states = hidden_states + self._branch(
            hidden_states, self.norm1, dcn, self.res_post_norm1, self.layer_scale1
        )
        return hidden_states + self._branch(
            hidden_states, self.norm2, self.mlp, self.res_post_norm2, self.layer_scale2
        )


class InternImageDownsample(nn.Module):
    """3x3 stride-2 convolution without bias that doubles the width, then the configured norm."""

    def __init__(self, config: InternImageConfig, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = build_token_norm(config, 2 * channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        features = self.conv(hidden_states)
        return to_feature_map(self.norm(to_tokens(features)), *features.shape[-2:])


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
        height, width = hidden_states.shape[-2:]
        tokens = to_tokens(hidden_states)
        for block_id, layer in enumerate(self.layers):
            tokens = layer(tokens, height, width)
            if block_id in self.post_norm_positions:
                tokens = self.post_norms[self.post_norm_positions[block_id]](tokens)
        if self.norm is not None:
            tokens = self.norm(tokens)
        stage_output = to_feature_map(tokens, height, width)
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
        self.act = ACT2FN[config.hidden_act]

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
        return self.fc_norm(self.attention_pool(to_tokens(features)))


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


@auto_docstring
class InternImagePreTrainedModel(PreTrainedModel):
    config: InternImageConfig
    base_model_prefix = "internimage"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternImageLayer", "InternImageEmbeddings", "InternImageDownsample"]
    # `hidden_states`: the input of the first stage (the stem's output), then each stage's output, all NCHW.
    _can_record_outputs = {"hidden_states": InternImageStage}

    def post_init(self):
        super().post_init()
        if self.config.with_cp:
            # transformers 5.23 renamed the method (the old name warns); earlier releases have only the old one.
            enable = getattr(self, "activation_checkpointing_enable", None) or self.gradient_checkpointing_enable
            enable()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults (norms one/zero, BatchNorm statistics reset), then the original's choices: Linear
        truncated normal, convolutions PyTorch's default, layer scales at `config.layer_scale`; in DCNv3 the offset,
        weight and center-feature-scale projections zero (a regular grid with uniform weights and a 0.5 blend at
        start), the value and output projections xavier-uniform."""
        super()._init_weights(module)
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, InternImageLayer) and module.layer_scale1 is not None:
            init.constant_(module.layer_scale1, self.config.layer_scale)
            init.constant_(module.layer_scale2, self.config.layer_scale)
        elif isinstance(module, InternImageDCNv3):  # runs after its linear layers: children come first
            for projection in (module.offset, module.mask, module.center_feature_scale_proj):
                if projection is not None:
                    init.zeros_(projection.weight)
                    init.zeros_(projection.bias)
            for projection in (module.input_proj, module.output_proj):
                init.xavier_uniform_(projection.weight)
                init.zeros_(projection.bias)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # For custom code transformers skips modules without parameters of their own (InternImageDCNv3), guarding
        # against `_init_weights` that overwrite loaded weights in place. Every init here goes through
        # `transformers.initialization`, which leaves loaded weights alone, so nothing needs that guard.
        super()._initialize_weights(module, is_custom_code=False)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, in this package's key layout whatever layout the weights were loaded
        from (`save_original_format=False`: the OpenGVLab `key_mapping` of `from_pretrained` is not reverted). When the
        code files travel along (the package registers them), config.json maps all four Auto classes to them, so any
        of them loads the directory as remote code."""
        if self._auto_class is not None:
            self.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; checkpoints in OpenGVLab's Hub layout are renamed while loading."""
        kwargs.setdefault("key_mapping", OPENGVLAB_HUB_KEY_MAPPING)
        return super().from_pretrained(*args, **kwargs)

    def name_of_original_key(self, key: str) -> str:
        """This model's name for a key of an original state dict (or of OpenGVLab's Hub layout)."""
        name = convert_original_key(key)
        prefixed = f"{self.base_model_prefix}.{name}"
        if not name.startswith("classifier.") and hasattr(self, self.base_model_prefix):
            return prefixed
        return name

    def load_original_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a state dict of the original implementation (the `'model'` entry of a training checkpoint) or of
        OpenGVLab's Hub repos (`model.` prefix, `layer_scale1/2`), strictly: keys that nothing uses, weights left
        unfilled and shapes that differ are a ValueError listing them (also what a checkpoint of another variant
        gives). The converter (`conversion/`) checks a checkpoint in the original's names without loading it."""
        renamed = {self.name_of_original_key(key): tensor for key, tensor in state_dict.items()}
        try:
            self.load_state_dict(renamed, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"The state dict does not fit this {type(self).__name__} (is it of another variant?): {error}"
            ) from None


@auto_docstring(
    custom_intro="""
    The bare InternImage trunk with its pooling head; `pooler_output` is what the classifier's linear layer consumes.
    """
)
class InternImageModel(InternImagePreTrainedModel):
    def __init__(self, config: InternImageConfig) -> None:
        super().__init__(config)
        self.embeddings = InternImageEmbeddings(config)
        self.encoder = InternImageEncoder(config)
        self.pooler = (
            InternImageAttentionPooler(config) if config.use_clip_projector else InternImageConvPooler(config)
        )
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring
    def forward(
        self, pixel_values: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPoolingAndNoAttention:
        check_pixel_values(pixel_values, self.config, side_multiple=32 if self.config.use_clip_projector else 1)
        stage_outputs = self.encoder(self.embeddings(pixel_values))
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=stage_outputs[-1], pooler_output=self.pooler(stage_outputs)
        )


@auto_docstring(
    custom_intro="""
    InternImage with an image classification head (a linear layer on the pooled features), e.g. for ImageNet.
    """
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

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutputWithNoAttention:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices for single-label classification, float targets for regression (`num_labels == 1`) or
            multi-hot vectors for multi-label classification (`config.problem_type`).
        """
        outputs = self.internimage(pixel_values, return_dict=True, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                labels = torch.as_tensor(labels, device=logits.device)
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


@auto_docstring(
    custom_intro="""
    InternImage backbone: feature maps of the stem and stages (NCHW, strides 4 to 32) for detection and segmentation
    heads such as UperNet, Mask2Former or the DETR family.
    """
)
class InternImageBackbone(BackboneMixin, InternImagePreTrainedModel):
    has_attentions = False
    # Its forward returns every stage itself. Without this, BackboneMixin would install output-capturing hooks that
    # nothing reads, and each would break a torch.compile graph (they read a ContextVar).
    _can_record_outputs = None

    def __init__(self, config: InternImageConfig) -> None:
        super().__init__(config)
        self.embeddings = InternImageEmbeddings(config)
        self.encoder = InternImageEncoder(config)
        self.num_features = config.hidden_sizes
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    @auto_docstring
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        check_pixel_values(pixel_values, self.config)
        embedding_output = self.embeddings(pixel_values)
        hidden_states = (embedding_output, *self.encoder(embedding_output))
        feature_maps = tuple(
            hidden_state for stage, hidden_state in zip(self.stage_names, hidden_states) if stage in self.out_features
        )
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)


__all__ = [
    "InternImagePreTrainedModel",
    "InternImageModel",
    "InternImageForImageClassification",
    "InternImageBackbone",
    "OPENGVLAB_HUB_KEY_MAPPING",
    "convert_original_key",
]
