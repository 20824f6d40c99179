# Copyright 2026 The InternImage-HF authors. All rights reserved.
#
# Licensed under the MIT License.
"""Image processor of InternImage's UperNet segmentors: the test transform of the paper's mmsegmentation models."""

import math

from transformers.image_utils import ChannelDimension, SizeDict, get_image_size
from transformers.models.segformer.image_processing_pil_segformer import (
    SegformerImageProcessorKwargs,
    SegformerImageProcessorPil,
)


def mmseg_test_size(height: int, width: int, short_side: int, long_side: int, size_divisor: int) -> tuple[int, int]:
    """(height, width) of mmsegmentation's test resize: keep the aspect ratio, scale so that the short side reaches
    `short_side` unless the long side would pass `long_side` (mmcv rounds half up), then round each side up to a
    multiple of `size_divisor` (`ResizeToMultiple`)."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    scaled_height, scaled_width = int(height * scale + 0.5), int(width * scale + 0.5)
    return (
        size_divisor * math.ceil(scaled_height / size_divisor),
        size_divisor * math.ceil(scaled_width / size_divisor),
    )


class InternImageSegmentationImageProcessorKwargs(SegformerImageProcessorKwargs, total=False):
    r"""
    size_divisor (`int`, *optional*, defaults to 32):
        Each side of the resized image is rounded up to a multiple of it.
    """

    size_divisor: int


class InternImageSegmentationImageProcessor(SegformerImageProcessorPil):
    """mmsegmentation's test transform of the paper's UperNet models: a keep-ratio resize to `size["shortest_edge"]`
    (512 for ADE20K T/S/B, 640 for L/XL, 896 for H, 1024 for Cityscapes) capped by `size["longest_edge"]`, sides
    rounded up to a multiple of `size_divisor`, ImageNet mean and std. Segmentation maps are resized alike (nearest),
    and `post_process_semantic_segmentation` turns logits into class maps at the requested sizes."""

    valid_kwargs = InternImageSegmentationImageProcessorKwargs
    size = {"shortest_edge": 512, "longest_edge": 2048}
    default_to_square = False
    size_divisor = 32

    def resize(self, image, size: SizeDict, resample=None, **kwargs):
        height, width = get_image_size(image, channel_dim=ChannelDimension.FIRST)
        if size.shortest_edge and size.longest_edge:
            new_height, new_width = mmseg_test_size(
                height, width, size.shortest_edge, size.longest_edge, self.size_divisor
            )
            size = SizeDict(height=new_height, width=new_width)
        return super().resize(image, size, resample, **kwargs)


__all__ = ["InternImageSegmentationImageProcessor", "mmseg_test_size"]
