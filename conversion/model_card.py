"""Model card (README.md) of a converted InternImage checkpoint."""

from modeling_internimage import InternImageConfig


# Paper and repository figures of the released ImageNet-1k classifiers (top-1 %, parameters, FLOPs).
RELEASED_RESULTS = {
    "t": ("83.5", "30M", "5G"),
    "s": ("84.2", "50M", "8G"),
    "b": ("84.9", "97M", "16G"),
    "l": ("87.7", "223M", "108G"),
    "xl": ("88.0", "335M", "163G"),
    "h": ("89.6", "1.08B", "1478G"),
    "g": ("90.1", "3B", "2700G"),
}

CITATION = """@inproceedings{wang2023internimage,
  title={InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions},
  author={Wang, Wenhai and Dai, Jifeng and Chen, Zhe and Huang, Zhenhang and Li, Zhiqi and Zhu, Xizhou and
          Hu, Xiaowei and Lu, Tong and Lu, Lewei and Li, Hongsheng and Wang, Xiaogang and Qiao, Yu},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={14408--14419},
  year={2023}
}"""


def render_model_card(
    config: InternImageConfig,
    *,
    variant: str | None,
    image_size: int,
    num_parameters: int,
    source_name: str,
    is_backbone: bool,
    repo_id: str | None,
    segmentor_labels: int | None = None,
) -> str:
    """Markdown with Hub metadata: what the checkpoint is, its figures, and how to load it with and without the
    package."""
    reference = repo_id or "path/to/this/directory"
    title = f"InternImage-{variant.upper()}" if variant else "InternImage"
    if segmentor_labels:
        task, pipeline_tag = f"UperNet semantic segmentor ({segmentor_labels} classes)", "image-segmentation"
        resolution = f"keep-ratio resize of the short side to {image_size}, sides rounded up to multiples of 32"
    elif is_backbone:
        task, pipeline_tag = "feature extraction backbone", "image-feature-extraction"
        resolution = f"{image_size} x {image_size} (bicubic shortest-edge resize, centre crop)"
    else:
        task, pipeline_tag = f"image classifier ({config.num_labels} classes)", "image-classification"
        resolution = f"{image_size} x {image_size} (bicubic shortest-edge resize, centre crop)"
    lines = [
        "---",
        "license: mit",
        "library_name: transformers",
        f"pipeline_tag: {pipeline_tag}",
        "tags: [internimage, dcnv3, vision]",
        "---",
        "",
        f"# {title} ({task})",
        "",
        f"Converted from `{source_name}` of the original InternImage release (OpenGVLab, CVPR 2023) with "
        "`conversion/convert_internimage_to_hf.py`; the conversion checked every weight and reproduced the "
        "converted model's outputs after reloading.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {title}: channels {config.channels}, depths {config.depths}, groups {config.groups} |",
        f"| evaluation transform | {resolution} |",
        f"| parameters (this checkpoint) | {num_parameters / 1e6:.1f} M |",
    ]
    if variant in RELEASED_RESULTS and not segmentor_labels:
        top1, params, flops = RELEASED_RESULTS[variant]
        lines.append(f"| paper: ImageNet-1k top-1 / params / FLOPs | {top1} % / {params} / {flops} |")
    lines += [
        "| license | MIT (as the original release) |",
        "",
        "## How to load",
        "",
        "With the package (`pip install internimage-hf`, then `import modeling_internimage`):",
        "",
        "```python",
        "import modeling_internimage  # registers InternImage with the Auto classes",
    ]
    if segmentor_labels:
        lines += [
            "from transformers import AutoModelForSemanticSegmentation, pipeline",
            f'model = AutoModelForSemanticSegmentation.from_pretrained("{reference}")',
            f'segmenter = pipeline("image-segmentation", model="{reference}")  # one mask per class present',
        ]
    elif is_backbone:
        lines += [
            "from modeling_internimage import InternImageBackbone",
            f'backbone = InternImageBackbone.from_pretrained("{reference}")',
            "features = backbone(pixel_values).feature_maps  # NCHW, strides 4/8/16/32",
        ]
    else:
        lines += [
            "from transformers import AutoImageProcessor, AutoModelForImageClassification",
            f'processor = AutoImageProcessor.from_pretrained("{reference}")',
            f'model = AutoModelForImageClassification.from_pretrained("{reference}")',
        ]
    lines += [
        "```",
        "",
        "Without the package, the code files in this repository load as remote code:",
        "",
        "```python",
        "from transformers import AutoModel",
        f'model = AutoModel.from_pretrained("{reference}", trust_remote_code=True)',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
