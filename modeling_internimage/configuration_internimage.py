# Copyright 2026 The InternImage-HF authors. All rights reserved.
#
# Licensed under the MIT License.
"""InternImage model configuration."""

import difflib
import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import auto_docstring, logging


logger = logging.get_logger(__name__)


# The seven released ImageNet classifiers (InternImage paper, Table 1; OpenGVLab training configs). Group width is
# channels * 2**i / groups[i]: 16 for T-XL, 32 for H and G.
INTERNIMAGE_VARIANTS: dict[str, dict[str, Any]] = {
    "t": {"channels": 64, "depths": [4, 4, 18, 4], "groups": [4, 8, 16, 32], "drop_path_rate": 0.1},
    "s": {
        "channels": 80, "depths": [4, 4, 21, 4], "groups": [5, 10, 20, 40], "layer_scale": 1e-5, "post_norm": True,
        "dw_kernel_size": 3, "drop_path_rate": 0.4,
    },
    "b": {
        "channels": 112, "depths": [4, 4, 21, 4], "groups": [7, 14, 28, 56], "layer_scale": 1e-5, "post_norm": True,
        "dw_kernel_size": 3, "drop_path_rate": 0.5,
    },
    "l": {
        "channels": 160, "depths": [5, 5, 22, 5], "groups": [10, 20, 40, 80], "layer_scale": 1e-5, "post_norm": True,
        "offset_scale": 2.0, "dw_kernel_size": 3, "drop_path_rate": 0.1,
    },
    "xl": {
        "channels": 192, "depths": [5, 5, 24, 5], "groups": [12, 24, 48, 96], "layer_scale": 1e-5, "post_norm": True,
        "offset_scale": 2.0, "dw_kernel_size": 3, "drop_path_rate": 0.2,
    },
    "h": {
        "channels": 320, "depths": [6, 6, 32, 6], "groups": [10, 20, 40, 80], "res_post_norm": True,
        "dw_kernel_size": 5, "level2_post_norm": True, "level2_post_norm_block_ids": [5, 11, 17, 23, 29],
        "center_feature_scale": True, "use_clip_projector": True, "drop_path_rate": 0.2,
    },
    "g": {
        "channels": 512, "depths": [2, 2, 48, 4], "groups": [16, 32, 64, 128], "post_norm": True,
        "dw_kernel_size": 5, "level2_post_norm": True, "level2_post_norm_block_ids": [5, 11, 17, 23, 29, 35, 41, 47],
        "center_feature_scale": True, "use_clip_projector": True, "drop_path_rate": 0.4,
    },
}  # fmt: skip

# Evaluation resolution of each released classifier (shortest-edge resize and centre crop to this size).
INTERNIMAGE_EVAL_RESOLUTION: dict[str, int] = {"t": 224, "s": 224, "b": 224, "l": 384, "xl": 384, "h": 640, "g": 512}

SUPPORTED_NORM_LAYERS = ("LN", "BN")
SUPPORTED_ACT_LAYERS = ("GELU", "ReLU", "SiLU")
# `core_op` of OpenGVLab configs: both names denote the same operator here.
SUPPORTED_CORE_OPS = ("DCNv3", "DCNv3_pytorch")

# What a saved model's config.json maps to this package's files when they travel as Hub remote code.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_internimage.InternImageConfig",
    "AutoModel": "modeling_internimage.InternImageModel",
    "AutoModelForImageClassification": "modeling_internimage.InternImageForImageClassification",
    "AutoBackbone": "modeling_internimage.InternImageBackbone",
}


def normalize_variant_name(name: str) -> str:
    """Map `"t"`, `"T"`, `"internimage-t"`, `"internimage_t"` to the key of `INTERNIMAGE_VARIANTS`."""
    if not isinstance(name, str):
        raise ValueError(f"The InternImage variant must be a name such as 't' or 'internimage-b'; got {name!r}.")
    key = name.lower().removeprefix("internimage").lstrip("-_")
    if key not in INTERNIMAGE_VARIANTS:
        raise ValueError(f"Unknown InternImage variant {name!r}; choose one of {', '.join(INTERNIMAGE_VARIANTS)}.")
    return key


@auto_docstring(
    checkpoint="OpenGVLab/internimage_t_1k_224",
    custom_intro="""
    Configuration of an InternImage model: the classifier, the base model and the backbone. The defaults give
    InternImage-T, whose released classifier is [OpenGVLab/internimage_t_1k_224](https://huggingface.co/OpenGVLab/internimage_t_1k_224).
    Field names follow the original implementation, so the `config.json` files OpenGVLab published on the Hub load as
    they are (their `num_classes` sets `num_labels`; `with_cp` enables gradient checkpointing).
    """,
)
@strict
class InternImageConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    channels (`int`, *optional*, defaults to 64):
        Width of the first stage; stage `i` has `channels * 2**i`.
    depths (`list[int]`, *optional*, defaults to `[4, 4, 18, 4]`):
        Blocks per stage.
    groups (`list[int]`, *optional*, defaults to `[4, 8, 16, 32]`):
        DCNv3 groups per stage.
    mlp_ratio (`float`, *optional*, defaults to 4.0):
        MLP hidden width over block width.
    offset_scale (`float`, *optional*, defaults to 1.0):
        Scale of the sampling grid and of the offsets.
    layer_scale (`float`, *optional*):
        Initial value of the per-channel residual scales; `None` for none.
    post_norm (`bool`, *optional*, defaults to `False`):
        Normalise each residual branch output (S/B/L/XL/G).
    res_post_norm (`bool`, *optional*, defaults to `False`):
        Normalise branch input and output (H).
    dw_kernel_size (`int`, *optional*):
        Depthwise kernel of the offset branch; `None` means 3.
    level2_post_norm (`bool`, *optional*, defaults to `False`):
        Extra norms inside the third stage (H/G).
    level2_post_norm_block_ids (`list[int]`, *optional*):
        Blocks of the third stage followed by an extra norm.
    center_feature_scale (`bool`, *optional*, defaults to `False`):
        Blend the DCNv3 output with its input (H/G).
    use_clip_projector (`bool`, *optional*, defaults to `False`):
        Attention-pooling head of H/G.
    remove_center (`bool`, *optional*, defaults to `False`):
        Drop the centre sampling point (8 points).
    cls_scale (`float`, *optional*, defaults to 1.5):
        Width of the 1x1 conv head over the last stage's width.
    drop_rate (`float`, *optional*, defaults to 0.0):
        Dropout in the MLPs.
    drop_path_rate (`float`, *optional*, defaults to 0.0):
        Stochastic depth rate of the last block.
    drop_path_type (`str`, *optional*, defaults to `"linear"`):
        `"linear"` ramps the stochastic depth rate over the blocks up to `drop_path_rate`, `"uniform"` uses it
        everywhere.
    act_layer (`str`, *optional*, defaults to `"GELU"`):
        `"GELU"`, `"ReLU"` or `"SiLU"` (`hidden_act` gives transformers' name of it).
    norm_layer (`str`, *optional*, defaults to `"LN"`):
        Norm of the stem, downsampling and offset branch: `"LN"` or `"BN"`.
    core_op (`str`, *optional*, defaults to `"DCNv3"`):
        Kept for OpenGVLab configs; the operator is chosen at run time (PyTorch, or a hub kernel through
        `kernels.kernelize`).
    with_cp (`bool`, *optional*, defaults to `False`):
        Enable gradient checkpointing when the model is built.

    Example:
    ```python
    >>> from modeling_internimage import InternImageConfig, InternImageForImageClassification

    >>> # An InternImage-T configuration (the defaults), and the released S with 10 classes
    >>> configuration = InternImageConfig()
    >>> small = InternImageConfig.from_variant("s", num_labels=10)

    >>> # A model with random weights from the configuration
    >>> model = InternImageForImageClassification(configuration)

    >>> # Accessing the model configuration
    >>> configuration = model.config
    ```"""

    model_type = "internimage"

    num_channels: int = 3
    channels: int = 64
    depths: list[int] | tuple[int, ...] = (4, 4, 18, 4)
    groups: list[int] | tuple[int, ...] = (4, 8, 16, 32)
    mlp_ratio: float | int = 4.0
    offset_scale: float | int = 1.0
    layer_scale: float | int | None = None
    post_norm: bool = False
    res_post_norm: bool = False
    dw_kernel_size: int | None = None
    level2_post_norm: bool = False
    level2_post_norm_block_ids: list[int] | None = None
    center_feature_scale: bool = False
    use_clip_projector: bool = False
    remove_center: bool = False
    cls_scale: float | int = 1.5
    drop_rate: float | int = 0.0
    drop_path_rate: float | int = 0.0
    drop_path_type: str = "linear"
    act_layer: str = "GELU"
    norm_layer: str = "LN"
    layer_norm_eps: float | int = 1e-6
    initializer_range: float | int = 0.02
    core_op: str = "DCNv3"
    with_cp: bool = False
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        num_classes = kwargs.pop("num_classes", None)
        if num_classes is not None and self.id2label is None and "num_labels" not in kwargs:
            kwargs["num_labels"] = num_classes
        num_labels = kwargs.get("num_labels")
        if num_labels is not None and (not _is_int(num_labels) or num_labels < 0):
            raise ValueError(f"`num_labels` (or `num_classes`) must be an integer >= 0; got {num_labels!r}.")
        if "auto_map" in kwargs:
            if not isinstance(kwargs["auto_map"], dict):
                raise ValueError(f"`auto_map` must map Auto class names to classes; got {kwargs['auto_map']!r}.")
            # OpenGVLab's auto_map also names a class our files do not define; save_pretrained writes ours.
            known = set(REMOTE_CODE_AUTO_MAP.values())
            kwargs["auto_map"] = {k: v for k, v in kwargs["auto_map"].items() if v in known}
        _warn_about_near_misses(kwargs)
        self.depths = list(self.depths)
        self.groups = list(self.groups)
        if self.level2_post_norm_block_ids is not None:
            self.level2_post_norm_block_ids = list(self.level2_post_norm_block_ids)
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    @classmethod
    def from_variant(cls, name: str, **kwargs) -> "InternImageConfig":
        """Configuration of a released variant (`"t"`, `"s"`, `"b"`, `"l"`, `"xl"`, `"h"`, `"g"`), with overrides."""
        return cls(**{**INTERNIMAGE_VARIANTS[normalize_variant_name(name)], **kwargs})

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_channels(self) -> list[int]:
        return [self.channels * 2**idx for idx in range(self.num_stages)]

    @property
    def num_points(self) -> int:
        """Sampling points per group of the 3x3 DCNv3."""
        return 9 - int(self.remove_center)

    @property
    def hidden_act(self) -> str:
        """`act_layer` as transformers names activations (`ACT2FN`): `"gelu"` (exact), `"relu"` or `"silu"`."""
        return self.act_layer.lower()

    @property
    def hidden_sizes(self) -> list[int]:
        """Channels of each entry of `hidden_states`: the stem and the stages."""
        return [self.channels, *self.stage_channels]

    def validate_architecture(self) -> None:
        """Raise a ValueError naming the first field whose value cannot build a model. `@strict` runs it after
        `__init__` and before saving (wrapped in a `StrictDataclassClassValidationError`), as it checks each field's
        type against its annotation when it is set."""
        for name in ("num_channels", "channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {getattr(self, name)}.")
        for name in ("mlp_ratio", "offset_scale", "cls_scale", "layer_norm_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0; got {value}.")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`{name}` must lie in [0, 1); got {getattr(self, name)}.")
        if not (math.isfinite(self.initializer_range) and self.initializer_range >= 0):
            raise ValueError(f"`initializer_range` must be a finite number >= 0; got {self.initializer_range}.")
        if self.layer_scale is not None and not math.isfinite(self.layer_scale):
            raise ValueError(f"`layer_scale` must be a finite number or None; got {self.layer_scale}.")
        if len(self.depths) != len(self.groups):
            raise ValueError(
                f"`depths` ({len(self.depths)} entries) and `groups` ({len(self.groups)} entries) must have the "
                "same length: one entry per stage."
            )
        if len(self.depths) < 1 or any(depth < 1 for depth in self.depths):
            raise ValueError(f"`depths` must list at least one stage, each of one block or more; got {self.depths}.")
        if self.channels % 2:
            raise ValueError(f"`channels` must be even (the stem's first conv has channels / 2); got {self.channels}.")
        for idx, (width, group) in enumerate(zip(self.stage_channels, self.groups)):
            if group < 1 or width % group:
                raise ValueError(
                    f"`groups[{idx}]` = {group} does not divide the {width} channels of stage {idx + 1} "
                    f"(`channels` = {self.channels} times 2**{idx})."
                )
        if self.level2_post_norm:
            if self.num_stages < 3:
                raise ValueError("`level2_post_norm` needs a third stage; `depths` has fewer than 3 entries.")
            bad_ids = [idx for idx in self.level2_post_norm_block_ids or [] if not 0 <= idx < self.depths[2]]
            if self.level2_post_norm_block_ids is None or bad_ids:
                raise ValueError(
                    "`level2_post_norm_block_ids` must list block indices of stage 3 (0 to "
                    f"{self.depths[2] - 1}); got {self.level2_post_norm_block_ids}."
                )
        if self.norm_layer not in SUPPORTED_NORM_LAYERS:
            raise ValueError(f"`norm_layer` must be one of {SUPPORTED_NORM_LAYERS}; got {self.norm_layer!r}.")
        if self.act_layer not in SUPPORTED_ACT_LAYERS:
            raise ValueError(f"`act_layer` must be one of {SUPPORTED_ACT_LAYERS}; got {self.act_layer!r}.")
        if self.core_op not in SUPPORTED_CORE_OPS:
            raise ValueError(f"`core_op` must be one of {SUPPORTED_CORE_OPS}; got {self.core_op!r}.")
        if self.drop_path_type not in ("linear", "uniform"):
            raise ValueError(f"`drop_path_type` must be 'linear' or 'uniform'; got {self.drop_path_type!r}.")
        if self.dw_kernel_size is not None and (self.dw_kernel_size < 1 or self.dw_kernel_size % 2 == 0):
            raise ValueError(f"`dw_kernel_size` must be a positive odd number; got {self.dw_kernel_size}.")
        if self.use_clip_projector and self.num_stages != 4:
            raise ValueError("`use_clip_projector` needs exactly 4 stages (it pools stages 3 and 4).")
        if self.res_post_norm and (self.post_norm or self.layer_scale is not None):
            raise ValueError(
                "`res_post_norm` cannot be combined with `post_norm` or `layer_scale`: the original silently ignores "
                "it then. Set `res_post_norm=False`."
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _architecture_fields() -> dict[str, Any]:
    """The annotated fields InternImageConfig adds to PreTrainedConfig (out_features/indices excepted)."""
    return {name: kind for name, kind in InternImageConfig.__annotations__.items() if not name.startswith("_")}


def _warn_about_near_misses(unknown: dict[str, Any]) -> None:
    """transformers keeps unknown config keys as attributes; one that looks like a misspelled field would silently
    leave the field at its default, so it gets a warning."""
    fields = list(_architecture_fields())
    for key in unknown:
        nearest = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
        if nearest and key not in fields:
            logger.warning(
                f"InternImageConfig got the unknown argument `{key}`; did you mean `{nearest[0]}`? It is kept as an "
                "attribute but does not change the architecture."
            )


__all__ = ["InternImageConfig", "INTERNIMAGE_VARIANTS", "INTERNIMAGE_EVAL_RESOLUTION", "REMOTE_CODE_AUTO_MAP"]
