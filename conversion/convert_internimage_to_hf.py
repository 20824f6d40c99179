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
import shutil
import sys
import tempfile
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
from huggingface_hub import HfApi, snapshot_download
from model_card import render_model_card
from PIL import Image
from transformers import AutoModelForImageClassification
from transformers.utils import logging

from modeling_internimage import (
    INTERNIMAGE_EVAL_RESOLUTION,
    INTERNIMAGE_VARIANTS,
    InternImageBackbone,
    InternImageConfig,
    InternImageForImageClassification,
    build_image_processor,
)
from modeling_internimage.configuration_internimage import normalize_variant_name


# The released files (reference doc section 4.1) -> (variant, evaluation resolution).
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
}
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BACKBONE_STAGES = ["stage1", "stage2", "stage3", "stage4"]
VERIFY_SIZE = 224
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


def read_labels(path: Path, num_labels: int) -> dict[int, str]:
    if not path.is_file():
        raise ConversionError(f"label file {path} does not exist")
    if path.suffix == ".json":
        labels = {int(idx): name for idx, name in json.loads(path.read_text()).items()}
    else:
        labels = dict(enumerate(line.strip() for line in path.read_text().splitlines() if line.strip()))
    if sorted(labels) != list(range(num_labels)):
        raise ConversionError(f"label file {path} names {len(labels)} classes, the checkpoint's head has {num_labels}")
    return labels


def build_config(source: CheckpointSource, args: argparse.Namespace) -> tuple[InternImageConfig, str | None, int]:
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
    try:
        config = InternImageConfig.from_dict(architecture)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"invalid architecture: {error}") from None
    if not source.is_backbone:
        config.id2label = (
            read_labels(args.label_file, config.num_labels)
            if args.label_file
            else {idx: str(idx) for idx in range(config.num_labels)}
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


def convert_weights(source: CheckpointSource, config: InternImageConfig, dry_run: bool) -> torch.nn.Module:
    """The model with the checkpoint's weights, after a strict check of every key and shape (on the meta device
    first, so a mismatch is found before any weight is allocated)."""
    model_class = InternImageBackbone if source.is_backbone else InternImageForImageClassification
    with torch.device("meta"):
        model = model_class(config)
    try:
        converted = model.convert_original_state_dict(source.state_dict)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    if not dry_run:
        converted = {name: tensor.contiguous() for name, tensor in converted.items()}
        model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


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


def verify_reload(model: torch.nn.Module, directory: Path) -> float:
    """Reload the written directory and return the largest output difference on a fixed input."""
    if isinstance(model, InternImageBackbone):
        reloaded, info = InternImageBackbone.from_pretrained(directory, output_loading_info=True)
    else:
        reloaded, info = AutoModelForImageClassification.from_pretrained(directory, output_loading_info=True)
    left_over = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if left_over:
        raise ConversionError(f"the written directory does not reload cleanly: {left_over}")
    pixel_values = torch.randn(1, 3, VERIFY_SIZE, VERIFY_SIZE, generator=torch.Generator().manual_seed(0))
    expected, actual = model_outputs(model, pixel_values), model_outputs(reloaded.eval(), pixel_values)
    difference = max((a.float() - e.float()).abs().max().item() for a, e in zip(actual, expected))
    if difference > 1e-4:
        raise ConversionError(f"the reloaded model's outputs differ from the converted model's by {difference:.2e}")
    return difference


def top5(model: InternImageForImageClassification, image_size: int) -> list[tuple[str, float]]:
    processor = build_image_processor(size=image_size)
    pixel_values = processor(fixed_test_image(), return_tensors="pt")["pixel_values"]
    probabilities = model_outputs(model, pixel_values)[0].float().softmax(-1)[0]
    scores, indices = probabilities.topk(min(5, probabilities.numel()))
    return [(model.config.id2label[idx], score) for idx, score in zip(indices.tolist(), scores.tolist())]


def write_atomically(target: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Run `write` into a temporary directory beside `target`, then rename it into place; a failure removes it."""
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        write(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert(args: argparse.Namespace, checkpoint: Path, output_dir: Path, log: Callable[[str], None] = print) -> None:
    if output_dir.exists() and not args.overwrite and not args.dry_run:
        raise ConversionError(f"{output_dir} already exists; pass --overwrite to replace it")
    source = load_source(resolve_checkpoint(str(checkpoint)))
    config, variant, image_size = build_config(source, args)
    model = convert_weights(source, config, args.dry_run)
    kind = "backbone" if source.is_backbone else f"classifier with {config.num_labels} classes"
    log(f"{checkpoint}: InternImage-{(variant or 'custom').upper()} {kind}, all {len(source.state_dict)} keys mapped")
    if source.dropped_keys:
        log(f"left out {len(source.dropped_keys)} neck/head keys: {', '.join(source.dropped_keys)}")
    if args.dry_run:
        log("dry run: nothing written")
        return
    model.to(STORAGE_DTYPES[args.dtype])

    def write(directory: Path) -> None:
        model.save_pretrained(directory, max_shard_size=args.max_shard_size)
        build_image_processor(size=image_size).save_pretrained(directory)
        card = render_model_card(
            config, variant=variant, image_size=image_size, num_parameters=model.num_parameters(),
            source_name=Path(checkpoint).name, is_backbone=source.is_backbone, repo_id=args.push_to_hub,
        )  # fmt: skip
        (directory / "README.md").write_text(card)
        log(f"reloaded the written directory: outputs agree (max difference {verify_reload(model, directory):.1e})")

    write_atomically(output_dir, args.overwrite, write)
    if not source.is_backbone:
        log("top-5 on the fixed test image: " + ", ".join(f"{name} {score:.3f}" for name, score in top5(model, image_size)))
    log(f"wrote {output_dir}")
    if args.push_to_hub:
        push_to_hub(output_dir, args.push_to_hub, log)


def push_to_hub(directory: Path, repo_id: str, log: Callable[[str], None]) -> None:
    """Create the repo if needed and upload the directory as one commit."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, repo_type="model", exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=directory, repo_type="model",
                      commit_message="Add InternImage checkpoint converted with internimage-hf")  # fmt: skip
    log(f"pushed {directory} to {repo_id}")


def convert_batch(args: argparse.Namespace) -> int:
    """Convert every released checkpoint present in `args.batch_dir` into `args.output_dir/<file stem>`."""
    if not args.batch_dir.is_dir():
        raise ConversionError(f"batch directory {args.batch_dir} does not exist")
    failures = 0
    for file_name, (variant, image_size) in RELEASED_CHECKPOINTS.items():
        checkpoint = args.batch_dir / file_name
        if not checkpoint.exists():
            print(f"skipped {file_name}: not in {args.batch_dir}")
            continue
        one = argparse.Namespace(**{**vars(args), "variant": variant, "image_size": args.image_size or image_size,
                                    "push_to_hub": None})  # fmt: skip
        try:
            convert(one, checkpoint, args.output_dir / checkpoint.stem)
        except ConversionError as error:
            failures += 1
            print(f"error: {file_name}: {error}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    verbosity, progress_bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # transformers' load reports would bury the conversion's own report
    logging.disable_progress_bar()
    try:
        if args.batch_dir:
            return convert_batch(args)
        convert(args, Path(args.checkpoint), args.output_dir)
        return 0
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        logging.set_verbosity(verbosity)
        if progress_bars:
            logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
