"""Reading every kind of checkpoint the InternImage project released, without running code from the file.

A source yields a state dict in the original naming (or OpenGVLab's Hub naming, which the package maps as well),
what kind of network it holds (a classifier or a detection/segmentation backbone), and whatever architecture
description travels with it.
"""

import difflib
import json
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file


class ConversionError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# Real training checkpoints carry their yacs training config (`yacs.config.CfgNode`, a dict subclass). It is the
# one class beyond tensors and plain containers that loading may rebuild, and it is rebuilt as a plain OrderedDict:
# no code of yacs (or of the file) runs, and yacs need not be installed.
CHECKPOINT_ALLOWED_GLOBALS = [(OrderedDict, "yacs.config.CfgNode")]
DOWNSTREAM_BACKBONE_PREFIX = "backbone."

# Keyword arguments of the original `InternImage.__init__`. The original swallows any other key in `**kwargs`; here
# one is an error, since a misspelled key (`offset_scal`) would otherwise silently build another architecture.
ORIGINAL_CONSTRUCTOR_KWARGS = frozenset({
    "core_op", "channels", "depths", "groups", "num_classes", "mlp_ratio", "drop_rate", "drop_path_rate",
    "drop_path_type", "act_layer", "norm_layer", "layer_scale", "offset_scale", "post_norm", "cls_scale", "with_cp",
    "dw_kernel_size", "use_clip_projector", "level2_post_norm", "level2_post_norm_block_ids", "res_post_norm",
    "center_feature_scale", "remove_center",
})  # fmt: skip


@dataclass
class CheckpointSource:
    """What a checkpoint file or directory holds, ready for conversion."""

    state_dict: dict[str, torch.Tensor]
    is_backbone: bool = False
    dropped_keys: list[str] = field(default_factory=list)
    architecture: dict[str, Any] | None = None  # original constructor kwargs, where the source carries them
    image_size: int | None = None
    is_segmentor: bool = False  # an mmseg UperNet: backbone and heads, all kept
    meta: Any = None  # what an mmseg checkpoint carries beside its weights (config text, class names)


def load_source(path: str | Path) -> CheckpointSource:
    """Read a `.pth`/`.pt`/`.bin` training or mmdet/mmseg checkpoint, a `.safetensors` state dict, or a directory
    in OpenGVLab's Hub layout (config.json plus safetensors weights)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _load_hub_directory(path)
    if path.suffix == ".safetensors":
        return CheckpointSource(state_dict=_load_safetensors(path))
    return _from_training_checkpoint(_load_pickled_checkpoint(path), path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(f"{path} is not a readable safetensors file ({error})") from None


def _check_zip_members(path: Path) -> None:
    """torch.save writes a zip archive whose members carry CRC-32 checksums: bytes changed inside the tensor data
    (a bad disk, an interrupted copy) are found here instead of becoming wrong weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            corrupted = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({error})") from None
    if corrupted is not None:
        raise ConversionError(f"{path} is corrupted: member {corrupted} fails its CRC-32 check")


def _unpickling_reason(error: Exception) -> str:
    """torch's line naming the refused global (e.g. `Trying to load unsupported GLOBAL posix.system ...`), else
    its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(error).__name__)


def _load_pickled_checkpoint(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise ConversionError(f"{path} is not a PyTorch checkpoint (not a torch.save zip archive, or truncated)")
    _check_zip_members(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except torch.serialization.pickle.UnpicklingError as error:
        reason = _unpickling_reason(error)
        raise ConversionError(
            f"{path} holds objects other than tensors and the training config, refused for safety ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint (truncated or another format: {reason})")


def _from_training_checkpoint(checkpoint: Any, path: Path) -> CheckpointSource:
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    if "state_dict" in checkpoint:  # mmdet / mmseg: backbone weights beside neck and head weights
        if isinstance(checkpoint["state_dict"], dict) and is_upernet_segmentor(checkpoint["state_dict"]):
            state_dict = _tensors_only(checkpoint["state_dict"], path)
            return CheckpointSource(state_dict=state_dict, is_segmentor=True, meta=checkpoint.get("meta"))
        return _downstream_backbone(checkpoint["state_dict"], path)
    for entry in ("model", "module"):
        if entry in checkpoint:
            state_dict = checkpoint[entry]
            break
    else:
        state_dict = checkpoint
    state_dict = _tensors_only(state_dict, path)
    architecture, image_size = _architecture_from_training_config(checkpoint.get("config"), f"{path} config")
    return CheckpointSource(state_dict=state_dict, architecture=architecture, image_size=image_size)


def is_upernet_segmentor(state_dict: dict) -> bool:
    """An mmseg `EncoderDecoder` with a `UPerHead` decode head (the paper's ADE20K and Cityscapes models)."""
    return any(str(key).startswith("decode_head.psp_modules.") for key in state_dict)


def _tensors_only(state_dict: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConversionError(f"{path} has no state dict (looked under 'state_dict', 'model', 'module' and the top)")
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors where weights were expected: {not_tensors[:5]}")
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _downstream_backbone(state_dict: Any, path: Path) -> CheckpointSource:
    state_dict = _tensors_only(state_dict, path)
    backbone = {
        key.removeprefix(DOWNSTREAM_BACKBONE_PREFIX): value
        for key, value in state_dict.items()
        if key.startswith(DOWNSTREAM_BACKBONE_PREFIX)
    }
    if not backbone:
        raise ConversionError(f"{path} has a 'state_dict' but no '{DOWNSTREAM_BACKBONE_PREFIX}' weights")
    dropped = sorted(key for key in state_dict if not key.startswith(DOWNSTREAM_BACKBONE_PREFIX))
    return CheckpointSource(state_dict=backbone, is_backbone=True, dropped_keys=dropped)


def _load_hub_directory(path: Path) -> CheckpointSource:
    config_path = path / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{path} is a directory without config.json (expected a Hub model directory)")
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise ConversionError(f"{path} has no .safetensors weights")
    state_dict = {}
    for weight_file in weight_files:
        state_dict.update(_load_safetensors(weight_file))
    config = json.loads(config_path.read_text())
    return CheckpointSource(state_dict=state_dict, architecture=config)


def _section(config: dict, key: str, where: str) -> dict:
    section = config.get(key) or {}
    if not isinstance(section, dict):
        raise ConversionError(f"{where}: {key} must be a mapping, got {section!r}")
    return section


def _number(value: Any, field: str, kind: type, where: str) -> Any:
    """`value` as an int or float; a bool, a string or a float with a fraction where an int belongs is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConversionError(f"{where}: {field} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _architecture_from_training_config(config: Any, where: str) -> tuple[dict[str, Any] | None, int | None]:
    """Constructor kwargs and image size from the original yacs training config (as carried in checkpoints or
    written in the repository's `configs/*.yaml`)."""
    if not isinstance(config, dict):
        return None, None
    model = _section(config, "MODEL", where)
    architecture = {
        key.lower(): _yaml_scalar(value) for key, value in _section(model, "INTERN_IMAGE", f"{where} MODEL").items()
    }
    check_constructor_keys(architecture, f"{where} MODEL.INTERN_IMAGE")
    if "NUM_CLASSES" in model:
        architecture["num_classes"] = _number(model["NUM_CLASSES"], "MODEL.NUM_CLASSES", int, where)
    if "DROP_PATH_RATE" in model:
        architecture["drop_path_rate"] = _number(model["DROP_PATH_RATE"], "MODEL.DROP_PATH_RATE", float, where)
    image_size = _section(config, "DATA", where).get("IMG_SIZE")
    return architecture, _number(image_size, "DATA.IMG_SIZE", int, where) if image_size is not None else None


def check_constructor_keys(architecture: dict[str, Any], where: str) -> None:
    """Refuse keys the original constructor does not take, naming the nearest known one."""
    unknown = sorted(key for key in architecture if key not in ORIGINAL_CONSTRUCTOR_KWARGS)
    if unknown:
        hints = []
        for key in unknown:
            nearest = difflib.get_close_matches(key, ORIGINAL_CONSTRUCTOR_KWARGS, n=1)
            hints.append(f"{key} (did you mean {nearest[0]}?)" if nearest else key)
        raise ConversionError(f"{where}: unknown architecture keys {', '.join(hints)}")


def _yaml_scalar(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` as a string; the original configs write layer scales that way."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_architecture_file(path: str | Path) -> tuple[dict[str, Any], int | None]:
    """Constructor kwargs from an original training YAML (`configs/internimage_t_1k_224.yaml`) or a JSON of the
    original constructor's keyword arguments (bare, or under `original_constructor_kwargs`)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"architecture file {path} does not exist")
    try:
        if path.suffix == ".json":
            description = json.loads(path.read_text())
            if not isinstance(description, dict):
                raise ConversionError(f"architecture file {path} must hold a JSON object of constructor arguments")
            architecture = description.get("original_constructor_kwargs", description)
            if not isinstance(architecture, dict):
                raise ConversionError(f"architecture file {path}: original_constructor_kwargs must be an object")
            check_constructor_keys(architecture, str(path))
            return architecture, None
        architecture, image_size = _architecture_from_training_config(yaml.safe_load(path.read_text()), str(path))
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConversionError(f"architecture file {path} does not parse: {str(error).splitlines()[0]}") from None
    if not architecture:
        raise ConversionError(f"{path} has no MODEL.INTERN_IMAGE section")
    return architecture, image_size
