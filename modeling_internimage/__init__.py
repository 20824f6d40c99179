# Copyright 2026 The InternImage-HF authors. All rights reserved.
#
# Licensed under the MIT License.
"""InternImage for transformers. Importing the package registers the model type `internimage` with the Auto
classes and the DCNv3 kernel mapping with kernels; saved models carry their code files and an `auto_map`, so they
also load as Hub remote code."""

import logging

from kernels import register_kernel_mapping
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    DeformableDetrConfig,
    DFineConfig,
    Mask2FormerConfig,
    RTDetrConfig,
    RTDetrV2Config,
    UperNetConfig,
)

from .composite_internimage import share_as_remote_code, shareable_config_class
from .configuration_internimage import INTERNIMAGE_EVAL_RESOLUTION, INTERNIMAGE_VARIANTS, InternImageConfig
from .dcnv3 import DCNv3Core, DCNv3SoftmaxCore, dcnv3_core_pytorch
from .hub_kernels import DCNV3_KERNEL_REPO_ID, dcnv3_kernel_mapping, use_hub_kernels, uses_hub_kernel
from .image_processing_internimage import InternImageSegmentationImageProcessor
from .image_processor_factory import build_image_processor
from .modeling_internimage import (
    OPENGVLAB_HUB_KEY_MAPPING,
    InternImageBackbone,
    InternImageForImageClassification,
    InternImageModel,
    InternImagePreTrainedModel,
    convert_original_key,
)


AutoConfig.register(InternImageConfig.model_type, InternImageConfig)
AutoModel.register(InternImageConfig, InternImageModel)
AutoModelForImageClassification.register(InternImageConfig, InternImageForImageClassification)
AutoBackbone.register(InternImageConfig, InternImageBackbone)
# The segmentors' processor is found by its class name in preprocessor_config.json (UperNet directories).
AutoImageProcessor.register(InternImageConfig, slow_image_processor_class=InternImageSegmentationImageProcessor)

# Saving writes the code files and an auto_map naming these classes (remote code for `trust_remote_code=True`).
InternImageConfig.register_for_auto_class("AutoConfig")
InternImageModel.register_for_auto_class("AutoModel")
InternImageForImageClassification.register_for_auto_class("AutoModelForImageClassification")
InternImageBackbone.register_for_auto_class("AutoBackbone")

# Composite models shared as remote code save their own model type (`upernet_internimage`, ...): registering the
# usual ones lets such directories load here without trust_remote_code (share_as_remote_code registers any other).
for composite_config_class in (UperNetConfig, Mask2FormerConfig, RTDetrConfig, RTDetrV2Config, DFineConfig,
                               DeformableDetrConfig):  # fmt: skip
    shareable_config_class(composite_config_class)

# So that `kernels.kernelize(model, ...)` and `from_pretrained(..., use_kernels=True)` find the DCNv3 kernel without a
# `use_kernel_mapping` context (`use_hub_kernels` brings its own mapping and does not depend on this).
try:
    register_kernel_mapping(dcnv3_kernel_mapping())
except ValueError as error:  # an overridden kernel repo without the trust opt-in
    logging.getLogger(__name__).warning("DCNv3 kernel mapping not registered: %s", error)

__all__ = [
    "DCNV3_KERNEL_REPO_ID",
    "INTERNIMAGE_EVAL_RESOLUTION",
    "INTERNIMAGE_VARIANTS",
    "OPENGVLAB_HUB_KEY_MAPPING",
    "DCNv3Core",
    "DCNv3SoftmaxCore",
    "InternImageBackbone",
    "InternImageConfig",
    "InternImageForImageClassification",
    "InternImageModel",
    "InternImagePreTrainedModel",
    "InternImageSegmentationImageProcessor",
    "build_image_processor",
    "convert_original_key",
    "dcnv3_core_pytorch",
    "dcnv3_kernel_mapping",
    "use_hub_kernels",
    "share_as_remote_code",
    "uses_hub_kernel",
]
