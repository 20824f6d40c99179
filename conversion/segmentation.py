"""mmsegmentation UperNet segmentors (the paper's ADE20K and Cityscapes models) as transformers'
`UperNetForSemanticSegmentation` with an InternImage backbone.

The checkpoint carries its resolved mmseg config as Python source (`meta['config']`); it is read by walking its
syntax tree, never executed. mmseg's `UPerHead` and `FCNHead` are what transformers' `UperNetHead` and
`UperNetFCNHead` port, so their weights map by two renamings (`conv_seg` -> `classifier`, `bn` -> `batch_norm`).
"""

import ast
import re
from collections.abc import Callable
from typing import Any

from checkpoint_sources import ConversionError, check_constructor_keys
from transformers import UperNetConfig, UperNetForSemanticSegmentation

from modeling_internimage import InternImageConfig


HEAD_KEY_PATTERNS = {r"\.conv_seg\.": ".classifier.", r"\.bn\.": ".batch_norm."}
BACKBONE_PREFIX = "backbone."
HEAD_PREFIXES = ("decode_head.", "auxiliary_head.")
# The paper's UperNet pooling (configs/ade20k/upernet_internimage_*.py), for checkpoints without their config; the
# head widths are read from the weights.
PAPER_POOL_SCALES = [1, 2, 3, 6]
# Test scale of the released configs, (short side, long side cap): ADE20K per backbone size; Cityscapes 1024/2048.
PAPER_TEST_SCALE = {"t": (512, 2048), "s": (512, 2048), "b": (512, 2048), "l": (640, 2560), "xl": (640, 2560),
                    "h": (896, 3584), "g": (896, 3584)}  # fmt: skip
# Keys of the mmseg backbone dict that are not architecture.
MMSEG_BACKBONE_EXTRAS = ("type", "pretrained", "init_cfg", "out_indices", "frozen_stages")


def read_config_assignments(text: str, where: str) -> dict[str, Any]:
    """The top-level `name = value` assignments of an mmcv config whose value is a literal, with `dict(...)` calls
    read as dictionaries. Nothing is executed; assignments that compute something are skipped."""
    try:
        tree = ast.parse(text)
    except SyntaxError as error:
        raise ConversionError(f"{where}: the config does not parse as Python ({error.msg}, line {error.lineno})")
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = _literal(node.value)
            except ValueError:
                continue
    return values


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        if any(keyword.arg is None for keyword in node.keywords):
            raise ValueError("dict(**...) refers to another name")
        return {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(element) for element in node.elts]
    return ast.literal_eval(node)


def _find_test_scale(value: Any) -> tuple[int, int] | None:
    """The `img_scale` of the first `MultiScaleFlipAug` step found in a test pipeline, as (short, long)."""
    if isinstance(value, dict):
        if value.get("type") == "MultiScaleFlipAug" and isinstance(value.get("img_scale"), list):
            scale = value["img_scale"]
            if len(scale) == 2 and all(isinstance(side, int) for side in scale):
                return min(scale), max(scale)
        value = list(value.values())
    if isinstance(value, list):
        return next((found for item in value if (found := _find_test_scale(item)) is not None), None)
    return None


def segmentor_architecture(meta: Any, where: str) -> tuple[dict, dict, tuple[int, int] | None, list[str] | None]:
    """From an mmseg checkpoint's `meta`: backbone constructor kwargs, head settings, test scale and class names
    (each None or empty where the checkpoint does not carry it)."""
    meta = meta if isinstance(meta, dict) else {}
    classes = meta.get("CLASSES")
    classes = [str(name) for name in classes] if isinstance(classes, (list, tuple)) and classes else None
    text = meta.get("config")
    if not isinstance(text, str):
        return {}, {}, None, classes
    config = read_config_assignments(text, f"{where} meta['config']")
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    backbone = {k: v for k, v in (model.get("backbone") or {}).items() if k not in MMSEG_BACKBONE_EXTRAS}
    if backbone:
        check_constructor_keys(backbone, f"{where} model.backbone")
    heads = {"decode_head": model.get("decode_head") or {}, "auxiliary_head": model.get("auxiliary_head") or {}}
    test_scale = _find_test_scale(config.get("test_pipeline")) or _find_test_scale(config.get("data"))
    return backbone, heads, test_scale, classes


def upernet_config(backbone: InternImageConfig, heads: dict, state_dict: dict, num_classes: int) -> UperNetConfig:
    """transformers' UperNet settings: the widths from the weights, the rest from the mmseg heads (else the paper's)."""
    decode, auxiliary = heads.get("decode_head") or {}, heads.get("auxiliary_head") or {}
    has_auxiliary = any(key.startswith("auxiliary_head.") for key in state_dict)
    if auxiliary.get("in_index", 2) != 2 or auxiliary.get("kernel_size", 3) != 3:
        raise ConversionError(
            "the auxiliary FCN head reads stage 3 with 3x3 convolutions in transformers' UperNet; this checkpoint's "
            f"reads in_index {auxiliary.get('in_index')} with kernel {auxiliary.get('kernel_size', 3)}"
        )
    num_convs = len({key.split(".")[2] for key in state_dict if key.startswith("auxiliary_head.convs.")})
    return UperNetConfig(
        backbone_config=backbone,
        hidden_size=int(state_dict["decode_head.bottleneck.conv.weight"].shape[0]),
        pool_scales=list(decode.get("pool_scales", PAPER_POOL_SCALES)),
        use_auxiliary_head=has_auxiliary,
        auxiliary_in_channels=backbone.stage_channels[2],
        auxiliary_channels=int(state_dict["auxiliary_head.conv_seg.weight"].shape[1]) if has_auxiliary else 256,
        auxiliary_num_convs=num_convs,
        auxiliary_concat_input=bool(auxiliary.get("concat_input", False)),
        num_labels=num_classes,
    )


def segmentor_key_name(model: UperNetForSemanticSegmentation) -> Callable[[str], str]:
    """The transformers name of an mmseg segmentor key: backbone keys through the package's original key mapping,
    head keys through `HEAD_KEY_PATTERNS`."""

    def name_of(key: str) -> str:
        if key.startswith(BACKBONE_PREFIX):
            return BACKBONE_PREFIX + model.backbone.name_of_original_key(key.removeprefix(BACKBONE_PREFIX))
        for pattern, replacement in HEAD_KEY_PATTERNS.items():
            key = re.sub(pattern, replacement, key) if key.startswith(HEAD_PREFIXES) else key
        return key

    return name_of
