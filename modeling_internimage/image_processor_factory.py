# Copyright 2026 The InternImage-HF authors. All rights reserved.
#
# Licensed under the MIT License.
"""A factory of transformers image processors configured as the original InternImage evaluation transform (no
processor class of its own: transformers' `BitImageProcessor` does the work and is what gets saved)."""

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.utils import is_torchvision_available

from .configuration_internimage import INTERNIMAGE_EVAL_RESOLUTION, normalize_variant_name


def build_image_processor(variant: str | None = None, size: int | None = None):
    """A `BitImageProcessor` doing the original eval transform: bicubic resize of the shortest edge to `size`,
    centre crop `size` x `size` (crop ratio 1.0), ImageNet mean/std.

    `size` defaults to the variant's evaluation resolution (T/S/B 224, L/XL 384, H 640, G 512). The torchvision
    backend is used where torchvision is installed, the PIL backend otherwise; both save as `BitImageProcessor`.
    """
    if size is None:
        if variant is None:
            raise ValueError("Give a variant name or an explicit size.")
        size = INTERNIMAGE_EVAL_RESOLUTION[normalize_variant_name(variant)]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"The image size must be a positive number of pixels; got {size!r}.")
    if is_torchvision_available():
        from transformers import BitImageProcessor as processor_class
    else:
        from transformers import BitImageProcessorPil as processor_class
    return processor_class(
        do_resize=True,
        size={"shortest_edge": size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


__all__ = ["build_image_processor"]
