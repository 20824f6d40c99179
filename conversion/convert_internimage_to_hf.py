"""Convert an original InternImage checkpoint into a transformers model directory (or Hub repo), verified.

    python conversion/convert_internimage_to_hf.py --checkpoint PATH (--variant NAME | --original-config FILE)
        --output-dir DIR [--overwrite] [--push-to-hub REPO_ID]
    python conversion/convert_internimage_to_hf.py --batch-dir DIR_OF_RELEASED_FILES --output-dir ROOT

PATH is a classification training checkpoint (`.pth`, weights under 'model' or 'module' or bare, with or without
the pickled training config), an mmdet/mmseg checkpoint (its backbone becomes an InternImageBackbone), a
`.safetensors` state dict, or a directory or Hub repo in OpenGVLab's transformers layout. Nothing is unpickled
beyond tensors, plain containers and the training config. The result is written to a temporary directory beside
DIR, reloaded and compared with the converted model, and only then renamed into place.
"""

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from checkpoint_sources import (
    CheckpointSource,
    ConversionError,
    load_architecture_file,
    load_source,
)
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import StrictDataclassError

# The parser save_pretrained applies to max_shard_size (through split_torch_state_dict_into_shards), so that a size
# it would refuse is refused before anything is written.
from huggingface_hub.serialization._base import parse_size_to_int
from huggingface_hub.utils import HFValidationError, validate_repo_id
from model_card import render_model_card
from original_state_dict import convert_original_state_dict
from output_directory import check_output_target, remove_leftovers, write_atomically
from PIL import Image
from segmentation import PAPER_TEST_SCALE, segmentor_architecture, segmentor_key_name, upernet_config
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    UperNetForSemanticSegmentation,
)
from transformers.utils import logging

from modeling_internimage import (
    INTERNIMAGE_EVAL_RESOLUTION,
    INTERNIMAGE_VARIANTS,
    InternImageBackbone,
    InternImageConfig,
    InternImageForImageClassification,
    InternImageSegmentationImageProcessor,
    build_image_processor,
    share_as_remote_code,
)
from modeling_internimage.configuration_internimage import normalize_variant_name


# The released classification files -> (variant, evaluation resolution).
RELEASED_CHECKPOINTS = {
    "internimage_t_1k_224.pth": ("t", 224),
    "internimage_s_1k_224.pth": ("s", 224),
    "internimage_b_1k_224.pth": ("b", 224),
    "internimage_l_22kto1k_384.pth": ("l", 384),
    "internimage_xl_22kto1k_384.pth": ("xl", 384),
    "internimage_h_22kto1k_640.pth": ("h", 640),
    "internimage_g_22kto1k_512.pth": ("g", 512),
    "internimage_l_22k_192to384.pth": ("l", 384),
    "internimage_xl_22k_192to384.pth": ("xl", 384),
    "internimage_h_jointto22k_384.pth": ("h", 384),
    "internimage_g_pretrainto22k_384.pth": ("g", 384),
    # ADE20K UperNet segmentors -> (variant, short side of the test resize)
    "upernet_internimage_t_512_160k_ade20k.pth": ("t", 512),
    "upernet_internimage_s_512_160k_ade20k.pth": ("s", 512),
    "upernet_internimage_b_512_160k_ade20k.pth": ("b", 512),
    "upernet_internimage_l_640_160k_ade20k.pth": ("l", 640),
    "upernet_internimage_xl_640_160k_ade20k.pth": ("xl", 640),
    "upernet_internimage_h_896_160k_ade20k.pth": ("h", 896),
}
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BACKBONE_STAGES = ["stage1", "stage2", "stage3", "stage4"]
VERIFY_SIZE = 224
VERIFY_TOLERANCE = 1e-4
SMALLEST_IMAGE_SIZE = 32  # one pixel at the last stage's stride
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="checkpoint file, model directory or Hub repo id to convert")
    what.add_argument("--batch-dir", type=Path, help="directory holding released checkpoint files (batch mode)")
    arch = parser.add_mutually_exclusive_group()
    arch.add_argument("--variant", help="released architecture: t, s, b, l, xl, h or g")
    arch.add_argument("--original-config", type=Path, help="original training YAML, or JSON of constructor kwargs")
    parser.add_argument("--output-dir", type=Path, required=True, help="directory to write (batch: parent directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the converted directory to this Hub repo")
    parser.add_argument("--label-file", type=Path, help="class names: a text file (one per line) or id2label JSON")
    parser.add_argument("--image-size", type=int, help="evaluation resolution (default: the variant's)")
    parser.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float32", help="storage dtype")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (H and G get several)")
    parser.add_argument("--dry-run", action="store_true", help="check keys and shapes only; write nothing")
    return parser.parse_args(argv)


def resolve_checkpoint(checkpoint: str) -> Path:
    """A local path, or the snapshot of a Hub repo id (OpenGVLab's transformers-format repos)."""
    path = Path(checkpoint)
    if path.exists() or not HUB_REPO_ID.match(checkpoint):
        return path
    try:
        return Path(snapshot_download(checkpoint, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:  # noqa: BLE001 - any Hub failure is reported as one line
        raise ConversionError(f"could not fetch {checkpoint} from the Hub: {str(error).splitlines()[0]}") from None


def detect_variant(config: InternImageConfig) -> str | None:
    for name, preset in INTERNIMAGE_VARIANTS.items():
        if all(getattr(config, key) == preset[key] for key in ("channels", "depths", "groups")):
            return name
    return None


def read_labels(path: Path) -> dict[int, str]:
    """Class names from a text file (one per line) or an id2label JSON object with ids 0 .. n-1."""
    if not path.is_file():
        raise ConversionError(f"label file {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix != ".json":
            labels = dict(enumerate(line.strip() for line in text.splitlines() if line.strip()))
        else:
            mapping = json.loads(text)
            if not isinstance(mapping, dict) or not all(isinstance(name, str) for name in mapping.values()):
                raise ValueError("expected a JSON object mapping class ids to names")
            labels = {int(idx): name for idx, name in mapping.items()}
    except (UnicodeDecodeError, ValueError) as error:
        raise ConversionError(f"label file {path} does not parse: {str(error).splitlines()[0]}") from None
    if not labels or sorted(labels) != list(range(len(labels))):
        raise ConversionError(
            f"label file {path} must name classes 0 to n-1 without gaps; it has ids {sorted(labels)[:10]}"
        )
    return labels


def validate_arguments(args: argparse.Namespace) -> None:
    """Every flag checked before anything is read, written or removed."""
    if args.image_size is not None and args.image_size < SMALLEST_IMAGE_SIZE:
        raise ConversionError(f"--image-size {args.image_size} must be at least {SMALLEST_IMAGE_SIZE} pixels")
    try:
        shard_bytes = parse_size_to_int(args.max_shard_size)
    except ValueError:
        shard_bytes = 0
    if shard_bytes <= 0:
        raise ConversionError(f"--max-shard-size {args.max_shard_size!r} is not a size such as 2GB or 500MB")
    if args.push_to_hub is not None:
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as error:
            raise ConversionError(f"--push-to-hub {args.push_to_hub!r} is not a valid repo id: {error}") from None
        if hub_is_offline():
            raise ConversionError("--push-to-hub needs the Hub, but HF_HUB_OFFLINE is set")
    if args.variant:
        _variant_key(args.variant)


def hub_is_offline() -> bool:
    return constants.HF_HUB_OFFLINE


def build_config(
    source: CheckpointSource, args: argparse.Namespace, labels: dict[int, str] | None
) -> tuple[InternImageConfig, str | None, int]:
    """The architecture from the flags, else from what the source carries; label count from the head."""
    image_size = None
    if args.variant:
        architecture = dict(INTERNIMAGE_VARIANTS[_variant_key(args.variant)])
    elif args.original_config:
        architecture, image_size = load_architecture_file(args.original_config)
    elif source.architecture and "channels" in source.architecture:
        architecture, image_size = dict(source.architecture), source.image_size
    else:
        raise ConversionError("the checkpoint does not describe its architecture; give --variant or --original-config")
    architecture = {key: value for key, value in architecture.items() if key not in ("architectures", "auto_map")}
    if source.is_backbone:
        architecture.update(out_features=BACKBONE_STAGES, num_classes=0)
        if any(key.endswith(".gamma1") for key in source.state_dict):
            # Downstream configs give every variant layer scales (T included), so its backbone has them.
            architecture["layer_scale"] = architecture.get("layer_scale") or 1.0
    else:
        head = source.state_dict.get("head.weight", source.state_dict.get("model.head.weight"))
        if head is not None and "num_classes" not in architecture and "num_labels" not in architecture:
            architecture["num_classes"] = head.shape[0]
    config = checked_config(architecture, "architecture")
    if not source.is_backbone:
        config.id2label = labels or {idx: str(idx) for idx in range(config.num_labels)}
        if len(config.id2label) != config.num_labels:
            raise ConversionError(
                f"label file {args.label_file} names {len(config.id2label)} classes, the checkpoint's head has "
                f"{config.num_labels}"
            )
        config.label2id = {name: idx for idx, name in config.id2label.items()}
    variant = _variant_key(args.variant) if args.variant else detect_variant(config)
    image_size = args.image_size or image_size or INTERNIMAGE_EVAL_RESOLUTION.get(variant, 224)
    return config, variant, image_size


def _variant_key(name: str) -> str:
    try:
        return normalize_variant_name(name)
    except ValueError as error:
        raise ConversionError(str(error)) from None


def checked_config(architecture: dict, what: str) -> InternImageConfig:
    """The InternImageConfig of `architecture`; its type and value checks (`@strict`) end as one ConversionError."""
    try:
        return InternImageConfig.from_dict(architecture)
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise ConversionError(f"invalid {what}: {' '.join(str(error).split())}") from None


def fill_weights(
    model: torch.nn.Module, state_dict: dict, dry_run: bool, name_of: Callable[[str], str] | None = None
) -> torch.nn.Module:
    """`model`, built on the meta device, with the checkpoint's weights after a strict check of every key and shape
    (so a mismatch is found before any weight is allocated); in a dry run the weights stay unallocated."""
    try:
        converted = convert_original_state_dict(model, state_dict, name_of)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    check_weight_values(converted, model.state_dict())
    if not dry_run:
        converted = {name: tensor.contiguous() for name, tensor in converted.items()}
        model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def build_segmentor(
    source: CheckpointSource, args: argparse.Namespace, labels: dict[int, str] | None
) -> tuple[UperNetForSemanticSegmentation, str | None, InternImageSegmentationImageProcessor]:
    """An mmseg UperNet checkpoint as `UperNetForSemanticSegmentation`: the backbone from the flags, else from the
    checkpoint's own config; the heads and the test transform from that config, else the paper's settings."""
    where = str(args.checkpoint)
    backbone_arch, heads, test_scale, classes = segmentor_architecture(source.meta, where)
    if args.variant:
        # The released segmentation configs give their backbones layer scales (T included, whose classifier has
        # none), except H, whose res-post-norm excludes them.
        backbone_arch = dict(INTERNIMAGE_VARIANTS[_variant_key(args.variant)])
        if not backbone_arch.get("res_post_norm"):
            backbone_arch["layer_scale"] = 1.0
    elif args.original_config:
        backbone_arch, _ = load_architecture_file(args.original_config)
    elif not backbone_arch:
        raise ConversionError("the checkpoint does not carry its config; give --variant or --original-config")
    backbone = checked_config(
        {**backbone_arch, "out_features": BACKBONE_STAGES, "num_classes": 0}, "backbone architecture"
    )
    num_classes = source.state_dict["decode_head.conv_seg.weight"].shape[0]
    labels = labels or (dict(enumerate(classes)) if classes else {idx: str(idx) for idx in range(num_classes)})
    if len(labels) != num_classes:
        raise ConversionError(f"{len(labels)} class names for a decode head of {num_classes} classes")
    config = upernet_config(backbone, heads, source.state_dict, num_classes)
    config.id2label, config.label2id = labels, {name: idx for idx, name in labels.items()}
    with torch.device("meta"):
        model = UperNetForSemanticSegmentation(config)
    fill_weights(model, source.state_dict, args.dry_run, segmentor_key_name(model))
    share_as_remote_code(model)  # the directory then loads with trust_remote_code=True without the package
    variant = _variant_key(args.variant) if args.variant else detect_variant(backbone)
    short, long = test_scale or PAPER_TEST_SCALE.get(variant, (512, 2048))
    if args.image_size:
        short, long = args.image_size, 4 * args.image_size
    processor = InternImageSegmentationImageProcessor(size={"shortest_edge": short, "longest_edge": long})
    return model, variant, processor


def check_weight_values(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Floating-point weights must arrive as finite floating-point tensors."""
    for name, tensor in converted.items():
        if not expected[name].is_floating_point():
            continue
        if not tensor.is_floating_point():
            raise ConversionError(f"weight {name} is stored as {tensor.dtype}; the model needs floating point")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            count = finite.numel() - int(finite.sum())
            raise ConversionError(f"weight {name} holds {count} NaN or infinite values of {tensor.numel()}")


def fixed_test_image(size: int = 320) -> Image.Image:
    """A deterministic test picture (checkerboard over colour ramps) for the top-5 print-out."""
    y, x = np.mgrid[0:size, 0:size]
    checker = ((x // 40 + y // 40) % 2).astype(np.float32)
    rgb = np.stack([x / size, y / size, checker], axis=-1)
    return Image.fromarray((255 * rgb).astype(np.uint8))


def model_outputs(model: torch.nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        outputs = model(pixel_values.to(model.dtype))
    return list(outputs.feature_maps) if isinstance(model, InternImageBackbone) else [outputs.logits]


def reload(model: torch.nn.Module, directory: Path):
    """The written directory loaded back the way users load it."""
    if isinstance(model, InternImageBackbone):
        return InternImageBackbone.from_pretrained(directory, output_loading_info=True)
    if isinstance(model, UperNetForSemanticSegmentation):
        return AutoModelForSemanticSegmentation.from_pretrained(directory, output_loading_info=True)
    return AutoModelForImageClassification.from_pretrained(directory, output_loading_info=True)


def verify_reload(model: torch.nn.Module, directory: Path) -> float:
    """Reload the written directory and return the largest output difference on a fixed input."""
    reloaded, info = reload(model, directory)
    left_over = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if left_over:
        raise ConversionError(f"the written directory does not reload cleanly: {left_over}")
    pixel_values = torch.randn(1, 3, VERIFY_SIZE, VERIFY_SIZE, generator=torch.Generator().manual_seed(0))
    expected, actual = model_outputs(model, pixel_values), model_outputs(reloaded.eval(), pixel_values)
    difference = max((a.float() - e.float()).abs().max().item() for a, e in zip(actual, expected))
    if not difference <= VERIFY_TOLERANCE:  # NaN fails too
        raise ConversionError(f"the reloaded model's outputs differ from the converted model's by {difference:.2e}")
    return difference


def top5(model: InternImageForImageClassification, image_size: int) -> list[tuple[str, float]]:
    processor = build_image_processor(size=image_size)
    pixel_values = processor(fixed_test_image(), return_tensors="pt")["pixel_values"]
    probabilities = model_outputs(model, pixel_values)[0].float().softmax(-1)[0]
    scores, indices = probabilities.topk(min(5, probabilities.numel()))
    return [(model.config.id2label[idx], score) for idx, score in zip(indices.tolist(), scores.tolist())]


def convert(args: argparse.Namespace, checkpoint: Path, output_dir: Path, log: Callable[[str], None] = print) -> None:
    if not args.dry_run:
        if output_dir.exists() and not args.overwrite:
            raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it")
        inputs = {"checkpoint": checkpoint, "--original-config": args.original_config, "--label-file": args.label_file}
        check_output_target(output_dir, inputs)
    labels = read_labels(args.label_file) if args.label_file else None
    source = load_source(resolve_checkpoint(str(checkpoint)))
    if source.is_segmentor:
        model, variant, processor = build_segmentor(source, args, labels)
        config, image_size = model.config.backbone_config, processor.size["shortest_edge"]
        kind = f"UperNet segmentor with {model.config.num_labels} classes"
    else:
        config, variant, image_size = build_config(source, args, labels)
        with torch.device("meta"):
            model = (InternImageBackbone if source.is_backbone else InternImageForImageClassification)(config)
        fill_weights(model, source.state_dict, args.dry_run)
        processor = build_image_processor(size=image_size)
        kind = "backbone" if source.is_backbone else f"classifier with {config.num_labels} classes"
    log(f"{checkpoint}: InternImage-{(variant or 'custom').upper()} {kind}, all {len(source.state_dict)} keys mapped")
    if source.dropped_keys:
        log(f"left out {len(source.dropped_keys)} neck/head keys: {', '.join(source.dropped_keys)}")
    if args.dry_run:
        log("dry run: nothing written")
        return
    model.to(STORAGE_DTYPES[args.dtype])
    predictions = None if source.is_backbone or source.is_segmentor else top5(model, image_size)

    def write(directory: Path) -> None:
        model.save_pretrained(directory, max_shard_size=args.max_shard_size)
        processor.save_pretrained(directory)
        card = render_model_card(
            config,
            variant=variant,
            image_size=image_size,
            num_parameters=model.num_parameters(),
            source_name=Path(checkpoint).name,
            is_backbone=source.is_backbone,
            repo_id=args.push_to_hub,
            segmentor_labels=model.config.num_labels if source.is_segmentor else None,
        )
        (directory / "README.md").write_text(card)
        log(f"reloaded the written directory: outputs agree (max difference {verify_reload(model, directory):.1e})")

    remove_leftovers(output_dir, log)
    write_atomically(output_dir, args.overwrite, write)
    if predictions:
        log("top-5 on the fixed test image: " + ", ".join(f"{name} {score:.3f}" for name, score in predictions))
    log(f"wrote {output_dir}")
    if args.push_to_hub:
        push_to_hub(output_dir, args.push_to_hub, log)


def push_to_hub(directory: Path, repo_id: str, log: Callable[[str], None]) -> None:
    """Create the repo if needed and upload the directory as one commit."""
    api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, repo_type="model", exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            repo_type="model",
            commit_message="Add InternImage checkpoint converted with internimage-hf",
        )
    except Exception as error:  # noqa: BLE001 - network, auth and permission failures: one line each
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(f"{directory} was written, but pushing it to {repo_id} failed: {reason}") from None
    log(f"pushed {directory} to {repo_id}")


def convert_batch(args: argparse.Namespace) -> int:
    """Convert every released checkpoint present in `args.batch_dir` into `args.output_dir/<file stem>`."""
    if not args.batch_dir.is_dir():
        raise ConversionError(f"batch directory {args.batch_dir} does not exist")
    converted, failures = [], []
    for file_name, (variant, image_size) in RELEASED_CHECKPOINTS.items():
        checkpoint = args.batch_dir / file_name
        if not checkpoint.exists():
            print(f"skipped {file_name}: not in {args.batch_dir}")
            continue
        one = argparse.Namespace(
            **{**vars(args), "variant": variant, "image_size": args.image_size or image_size, "push_to_hub": None}
        )
        try:
            convert(one, checkpoint, args.output_dir / checkpoint.stem)
            converted.append(file_name)
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
            failures.append(file_name)
            print(f"error: {file_name}: {one_line(error)}", file=sys.stderr)
    print(
        f"batch: {len(converted)} converted, {len(failures)} failed"
        + (f" ({', '.join(failures)})" if failures else "")
    )
    return 2 if failures else 0


def one_line(error: Exception) -> str:
    """The message of a ConversionError, or the type and first line of any other error."""
    if isinstance(error, ConversionError):
        return str(error)
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    verbosity, progress_bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # transformers' load reports would bury the conversion's own report
    logging.disable_progress_bar()
    try:
        validate_arguments(args)
        if args.batch_dir:
            return convert_batch(args)
        convert(args, Path(args.checkpoint), args.output_dir)
        return 0
    except Exception as error:  # noqa: BLE001 - every failure ends as one line and exit status 2
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    finally:
        logging.set_verbosity(verbosity)
        if progress_bars:
            logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
