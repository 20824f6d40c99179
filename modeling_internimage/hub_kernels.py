# Copyright 2026 The InternImage-HF authors. All rights reserved.
#
# Licensed under the MIT License.
"""The compiled DCNv3 from the Hugging Face kernels hub, swapped into a loaded model with one call.

`use_hub_kernels(model)` replaces the forward of every `DCNv3SoftmaxCore` by the hub kernel's `DCNv3Softmax` layer
(CUDA on a GPU; C++ on a CPU, where the softmax over the points is fused into the aggregation; a plain `DCNv3Core`
by the `DCNv3` layer) and, in CPU inference, the forward of every `InternImageMLP` by the kernel's layer of that name
(oneDNN linear layers, fc1 fused with its activation). Where no kernel can be had (offline with an empty cache, a torch
version without a build, an unsupported device) the model keeps the PyTorch operator and one warning says why; with
`HF_HUB_OFFLINE=1` nothing is fetched. The swap is per instance and undone by calling again with `enabled=False`.
"""

import logging
import os
from types import MethodType

import torch
from kernels import (
    Device,
    KernelizeFallback,
    LayerRepository,
    Mode,
    kernelize,
    use_kernel_mapping,
)
from transformers.utils import ENV_VARS_TRUE_VALUES

from .dcnv3 import DCNv3Core


logger = logging.getLogger(__name__)

# The hub repo publishing the kernel (hub_kernels/dcnv3 built with kernel-builder), pinned to its major version 1.
# It is the only repo whose code is trusted by default: another one, named by argument or by the environment
# variable INTERNIMAGE_DCNV3_KERNEL_REPO, runs only with `trust_remote_code=True` or with
# INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE=1. A commit can be pinned with `revision` or
# INTERNIMAGE_DCNV3_KERNEL_REVISION (instead of the version).
DCNV3_KERNEL_REPO_ID = "internimage-hf/dcnv3"
DCNV3_KERNEL_VERSION = 1
DCNV3_LAYER_NAME = "DCNv3"
# InternImage's cores: weights as logits, the softmax over the points done by the layer. A kernel build that predates
# this layer leaves them on the PyTorch operator (with the usual warning), never runs them through `DCNv3`.
DCNV3_SOFTMAX_LAYER_NAME = "DCNv3Softmax"
DCNV3_LAYER_NAMES = (DCNV3_LAYER_NAME, DCNV3_SOFTMAX_LAYER_NAME)
KERNEL_DEVICES = ("cuda", "cpu")
# The MLP's layer (fused oneDNN linear layers) is built in the CPU variant only, and runs in inference only.
MLP_LAYER_NAME = "InternImageMLP"
MODES_BY_NAME = {"inference": Mode.INFERENCE, "training": Mode.TRAINING, "torch_compile": Mode.TORCH_COMPILE}


def dcnv3_kernel_mapping(
    repo_id: str | None = None,
    version: int | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool | None = None,
) -> dict:
    """kernels mapping of the `DCNv3` and `DCNv3Softmax` layers (CUDA and CPU) and of the `InternImageMLP` layer
    (CPU) to a hub repo.

    Without arguments: the package's own repo at version 1, whose code is trusted. A repo given here or through
    INTERNIMAGE_DCNV3_KERNEL_REPO needs `trust_remote_code=True` (or INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE=1);
    otherwise this raises a ValueError. The check is made here because kernels skips its own publisher check offline.
    """
    repo_id = repo_id or os.environ.get("INTERNIMAGE_DCNV3_KERNEL_REPO") or DCNV3_KERNEL_REPO_ID
    revision = revision or os.environ.get("INTERNIMAGE_DCNV3_KERNEL_REVISION") or None
    if trust_remote_code is None:
        trust_remote_code = (
            os.environ.get("INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE", "").upper() in ENV_VARS_TRUE_VALUES
        )
    if repo_id != DCNV3_KERNEL_REPO_ID and not trust_remote_code:
        raise ValueError(
            f"the DCNv3 kernel repo {repo_id} is not the package's own ({DCNV3_KERNEL_REPO_ID}); running its code "
            "needs trust_remote_code=True or INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE=1"
        )

    def repository(layer_name: str) -> LayerRepository:
        return LayerRepository(
            repo_id,
            layer_name=layer_name,
            revision=revision,
            version=None if revision else (version or DCNV3_KERNEL_VERSION),
            trust_remote_code=True if trust_remote_code else [DCNV3_KERNEL_REPO_ID],
        )

    return {
        **{name: {device: repository(name) for device in KERNEL_DEVICES} for name in DCNV3_LAYER_NAMES},
        MLP_LAYER_NAME: {"cpu": repository(MLP_LAYER_NAME)},
    }


def _as_mode(mode: Mode | str) -> Mode:
    """A kernels `Mode`, also from its name ("inference", "training", "inference|torch_compile")."""
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, str):
        names = [name.strip().lower() for name in mode.split("|")]
        if names and all(name in MODES_BY_NAME for name in names):
            combined = MODES_BY_NAME[names[0]]
            for name in names[1:]:
                combined = combined | MODES_BY_NAME[name]
            return combined
    raise ValueError(
        f"mode must be a kernels.Mode or one of {', '.join(MODES_BY_NAME)} (combined with '|'); got {mode!r}."
    )


def _model_device(model: torch.nn.Module) -> str:
    parameter = next(model.parameters(), None)
    return parameter.device.type if parameter is not None else "cpu"


def _restore_pytorch_forward(model: torch.nn.Module) -> None:
    for module in model.modules():
        if getattr(type(module), "kernel_layer_name", None) in (*DCNV3_LAYER_NAMES, MLP_LAYER_NAME):
            module.forward = MethodType(type(module).forward, module)


def _without_other_layers(model: torch.nn.Module, mapping: dict) -> dict:
    """`mapping` plus an empty entry for every other hub layer in the model (transformers' activations are some), so
    that kernelize keeps their forward without a warning per module: this helper is about InternImage's layers."""
    names = {getattr(type(module), "kernel_layer_name", None) for module in model.modules()}
    return {**{name: {} for name in names if name is not None}, **mapping}


def use_hub_kernels(
    model: torch.nn.Module,
    *,
    enabled: bool = True,
    mapping: dict | None = None,
    mode: Mode | str | None = None,
    strict: bool = False,
) -> torch.nn.Module:
    """Run the model's DCNv3 with the hub kernel for its device, in place (and, in CPU inference, its MLPs with the
    kernel's fused linear layers); returns the model.

    Call it again after moving the model to another device, or after `train()` / `eval()` when the kernel should
    follow the mode (training needs the kernel's backward). `mapping` replaces the production mapping (e.g. a
    `LocalLayerRepository` of a local build). With `strict=True` a kernel that cannot be loaded raises instead of
    falling back. `mode` is a kernels `Mode` or its name ("inference", "training", "inference|torch_compile").
    """
    if not enabled:
        _restore_pytorch_forward(model)
        return model
    mode = _as_mode(mode) if mode is not None else (Mode.TRAINING if model.training else Mode.INFERENCE)
    if getattr(DCNv3Core, "kernel_layer_name", None) is None:
        return _keep_pytorch_operator(model, "hub kernels are disabled (USE_HUB_KERNELS) for this process", strict)
    if mapping is None:
        try:
            mapping = dcnv3_kernel_mapping()
        except ValueError as error:
            return _keep_pytorch_operator(model, str(error), strict, ValueError)
    device = _model_device(model)
    if not any(_covers(key, device) for name in DCNV3_LAYER_NAMES for key in mapping.get(name, {})):
        return _keep_pytorch_operator(model, f"no DCNv3 hub kernel for device '{device}'", strict)
    # The MLP layer has no backward and no CUDA build: it falls back by design, in strict mode too.
    fallback = KernelizeFallback.DEFAULT if strict else KernelizeFallback.ALL
    try:
        with use_kernel_mapping(_without_other_layers(model, mapping), inherit_mapping=False):
            kernelize(model, mode=mode, device=device, use_fallback=fallback)
    except Exception as error:  # kernels raises several types (offline, trust, version); all mean "no kernel"
        _restore_pytorch_forward(model)
        if strict:
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.warning("DCNv3 hub kernel unavailable (%s); InternImage keeps the PyTorch DCNv3 operator.", reason)
        return model
    if not uses_hub_kernel(model):
        if strict:
            _restore_pytorch_forward(model)
            raise RuntimeError(f"no compatible DCNv3 hub kernel build (torch {torch.__version__}, {device}, {mode})")
        logger.warning(
            "No compatible DCNv3 hub kernel build for this system (torch %s, %s, mode %s); InternImage keeps the "
            "PyTorch DCNv3 operator.",
            torch.__version__,
            device,
            mode,
        )
    return model


def _keep_pytorch_operator(
    model: torch.nn.Module, reason: str, strict: bool, error_type: type[Exception] = RuntimeError
) -> torch.nn.Module:
    """Why no kernel can run: raised in strict mode, else one warning (the model keeps the PyTorch operator)."""
    if strict:
        raise error_type(reason)
    logger.warning("%s; InternImage keeps the PyTorch DCNv3 operator.", reason)
    return model


def _covers(key: str | Device, device: str) -> bool:
    return (key.type if isinstance(key, Device) else key) == device


def uses_hub_kernel(model: torch.nn.Module) -> bool:
    """Whether the model's DCNv3 cores currently run a hub kernel's forward."""
    cores = [module for module in model.modules() if isinstance(module, DCNv3Core)]
    return bool(cores) and all(module.forward.__func__ is not type(module).forward for module in cores)


__all__ = [
    "DCNV3_KERNEL_REPO_ID",
    "DCNV3_KERNEL_VERSION",
    "dcnv3_kernel_mapping",
    "use_hub_kernels",
    "uses_hub_kernel",
]
