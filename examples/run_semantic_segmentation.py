"""Semantic segmentation with transformers' UperNet on an InternImage backbone (the paper's ADE20K setup),
trained with Trainer.

    python examples/run_semantic_segmentation.py                        # offline demo: digits pasted on canvases
    python examples/run_semantic_segmentation.py --dataset_name scene_parse_150 --model_name_or_path \\
        converted/internimage-t-1k-224 --id2label_file ade20k-id2label.json --reduce_labels --output_dir out ...
    python examples/run_semantic_segmentation.py --train_dir data/train --validation_dir data/val ...

Local folders hold `images/` and `masks/` (PNG class-index maps with the same file stems: single-channel images
of mode L, P or I whose pixel values are class ids, 255 for "ignore"; colour masks are refused). --model_name_or_path
is an InternImage directory or Hub id (its backbone weights are used), a saved UperNet+InternImage directory, or
a preset to train from scratch. Metrics land in <output_dir>/eval_results.json (`eval_mean_iou`), predictions
overlaid on validation images in <output_dir>/predictions.png.
"""

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, Features, load_dataset
from datasets import Image as ImageFeature
from example_utils import (
    ExampleError,
    MirroredDataArguments,
    ModelArguments,
    augmentation_seed,
    backbone_config,
    check_image_files,
    check_image_size,
    denormalized_image,
    enable_hub_kernels,
    finish_run,
    finish_splits,
    image_processor,
    is_preset,
    load_metric,
    load_pretrained_backbone,
    log_run_setup,
    make_trainer,
    parse_example_arguments,
    prepare_output_dir,
    publish,
    read_id2label,
    require_columns,
    reseeded_in_workers,
    train_and_evaluate,
)
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForSemanticSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    set_seed,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from modeling_internimage import share_as_remote_code  # (the import registers InternImage with the Auto classes)


logger = logging.getLogger(__name__)
BACKBONE_STAGES = ["stage1", "stage2", "stage3", "stage4"]
DEMO_DEFAULTS = (
    "--num_train_epochs 18 --learning_rate 2e-3 --per_device_train_batch_size 8 --per_device_eval_batch_size 32 "
    "--eval_strategy no --weight_decay 0.01 --warmup_steps 30"
).split()


@dataclass
class DataTrainingArguments(MirroredDataArguments):
    label_column_name: str = field(default="mask", metadata={"help": "Column holding the class-index masks"})
    id2label_file: str | None = field(default=None, metadata={"help": "JSON {id: name} of the classes"})
    reduce_labels: bool = field(default=False, metadata={"help": "Map 0 to 255 (ignored) and shift labels down"})
    image_size: int = field(default=512, metadata={"help": "Training crop size (multiple of 32)"})
    decode_hidden_size: int = field(default=512, metadata={"help": "UperNet width when training the head new"})


def parse_arguments(argv: list[str]):
    # Digits must not be mirrored.
    demo = DEMO_DEFAULTS + "--horizontal_flip_probability 0 --image_size 96 --decode_hidden_size 64".split()
    return parse_example_arguments(DataTrainingArguments, argv, demo)


def folder_dataset(directory: str, role: str) -> Dataset:
    images_dir, masks_dir = Path(directory) / "images", Path(directory) / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise ExampleError(f"--{role} {directory} needs images/ and masks/ subfolders")
    images = sorted(path for path in images_dir.iterdir() if path.is_file())
    if not images:
        raise ExampleError(f"--{role} {directory}/images holds no images")
    masks = {path.stem: path for path in masks_dir.iterdir() if path.is_file()}
    missing = [path.name for path in images if path.stem not in masks]
    if missing:
        raise ExampleError(f"--{role}: no mask in {masks_dir} for {', '.join(missing[:5])}")
    check_image_files([*images, *(masks[path.stem] for path in images)], role)
    features = Features({"image": ImageFeature(), "mask": ImageFeature()})
    return Dataset.from_dict(
        {"image": [str(p) for p in images], "mask": [str(masks[p.stem]) for p in images]}, features=features
    )


def load_data(data_args: DataTrainingArguments, seed: int) -> tuple[DatasetDict, dict[int, str]]:
    id2label = None
    if data_args.dataset_name:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_dir:
        dataset = DatasetDict(train=folder_dataset(data_args.train_dir, "train_dir"))
        if data_args.validation_dir:
            dataset["validation"] = folder_dataset(data_args.validation_dir, "validation_dir")
    else:
        from digits_data import DIGIT_NAMES, digits_scenes

        # 960 canvases rather than 240 at the same step count, with larger (32-pixel) digits, 2-4 per canvas: strokes
        # of several pixels at the head's stride 4, and four times the scenes to generalise from.
        dataset = digits_scenes(num_images=960, digit_scale=4, digits_per_image=(2, 4))
        id2label = {0: "background", **{idx + 1: name for idx, name in enumerate(DIGIT_NAMES)}}
    dataset = finish_splits(dataset, data_args, seed)
    require_columns(
        dataset["train"],
        {"image_column_name": data_args.image_column_name, "label_column_name": data_args.label_column_name},
    )
    if data_args.id2label_file:
        id2label = read_id2label(data_args.id2label_file)
    # Local masks are all checked; of a Hub dataset, a sample of each split.
    everything = data_args.train_dir is not None
    largest = {split: largest_class_id(dataset[split], data_args, everything) for split in ("train", "validation")}
    if id2label is None:  # the classes present in the training masks
        id2label = {idx: str(idx) for idx in range(largest["train"] + 1)}
    if data_args.reduce_labels:
        id2label = {idx - 1: name for idx, name in id2label.items() if idx > 0}
    if len(id2label) < 2:
        raise ExampleError("the masks hold fewer than two classes; segmentation needs at least two")
    for split, class_id in largest.items():
        if class_id - int(data_args.reduce_labels) >= len(id2label):
            raise ExampleError(
                f"{split} masks hold class id {class_id}, but there are {len(id2label)} classes "
                "(--id2label_file, --reduce_labels)"
            )
    return dataset, id2label


def mask_class_ids(mask: Image.Image) -> np.ndarray:
    """The class-index array of a mask; colour masks are refused (their luminance is no class id)."""
    if mask.mode not in ("L", "P", "I", "I;16", "1"):
        raise ExampleError(
            f"masks must be single-channel class-index images (mode L, P or I); got a {mask.mode} "
            "mask. Convert colour masks to class ids first"
        )
    return np.asarray(mask, dtype=np.int64)


def largest_class_id(split, data_args: DataTrainingArguments, everything: bool) -> int:
    """The largest class id (255, "ignore", excepted) in the split's masks (all, or the first 200)."""
    rows = split if everything else split.select(range(min(200, len(split))))
    largest = 0
    for mask in rows[data_args.label_column_name]:
        ids = mask_class_ids(mask)
        ids = ids[ids != 255]
        largest = max(largest, int(ids.max()) if ids.size else 0)
    return largest


def build_model(model_args: ModelArguments, data_args: DataTrainingArguments, id2label: dict[int, str]):
    label2id = {name: idx for idx, name in id2label.items()}
    name = model_args.model_name_or_path
    if not is_preset(name):
        source_config = AutoConfig.from_pretrained(
            name,
            trust_remote_code=model_args.trust_remote_code,
            token=model_args.token,
            revision=model_args.model_revision,
        )
        if isinstance(source_config, UperNetConfig):
            return pretrained_segmentor(name, source_config, model_args, id2label)
    config = UperNetConfig(
        backbone_config=backbone_config(model_args, BACKBONE_STAGES),
        num_labels=len(id2label),
        id2label=id2label,
        label2id=label2id,
        hidden_size=data_args.decode_hidden_size,
        auxiliary_in_channels=None,
        auxiliary_channels=max(data_args.decode_hidden_size // 2, 16),
        use_auxiliary_head=True,
    )
    model = UperNetForSemanticSegmentation(config)
    load_pretrained_backbone(model.backbone, model_args, BACKBONE_STAGES)
    return model


def pretrained_segmentor(name: str, source_config, model_args: ModelArguments, id2label: dict[int, str]):
    """A whole UperNet to fine-tune (a converted checkpoint or an earlier run): with the dataset's classes it keeps
    its heads; with other classes only the two classifier layers start anew, the rest is kept."""
    same_classes = source_config.id2label == id2label
    if not same_classes:
        logger.info(
            "%s has %d classes, the dataset %d: decode_head.classifier and auxiliary_head.classifier start anew, "
            "the backbone and the rest of both heads are kept",
            name,
            source_config.num_labels,
            len(id2label),
        )
    else:
        logger.info("%s has the dataset's classes: the whole segmentor is kept, heads included", name)
    model = AutoModelForSemanticSegmentation.from_pretrained(
        name,
        id2label=id2label,
        label2id={label: idx for idx, label in id2label.items()},
        ignore_mismatched_sizes=not same_classes or model_args.ignore_mismatched_sizes,
        trust_remote_code=model_args.trust_remote_code,
        token=model_args.token,
        revision=model_args.model_revision,
    )
    if not same_classes:  # also when the class count happens to match: other names are other classes
        for head in (model.decode_head, model.auxiliary_head):
            if head is not None:
                head.classifier.reset_parameters()
    return model


def make_transforms(data_args: DataTrainingArguments, seed: int):
    size = data_args.image_size
    normalize = A.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    crop_and_flip = [
        A.RandomResizedCrop(size=(size, size), scale=(0.5, 1.0)),
        A.HorizontalFlip(p=data_args.horizontal_flip_probability),
    ]
    train = reseeded_in_workers(A.Compose([*crop_and_flip, normalize], seed=seed))
    evaluate = A.Compose([A.Resize(size, size), normalize])

    def apply(batch, augment):
        pixel_values, labels = [], []
        for image, mask in zip(batch[data_args.image_column_name], batch[data_args.label_column_name]):
            mask = mask_class_ids(mask)
            if data_args.reduce_labels:
                mask = np.where(mask == 0, 255, mask - 1)
            out = augment(image=np.asarray(image.convert("RGB")), mask=mask)
            pixel_values.append(torch.from_numpy(out["image"]).permute(2, 0, 1))
            labels.append(torch.from_numpy(np.asarray(out["mask"], dtype=np.int64)))
        return {"pixel_values": pixel_values, "labels": labels}

    return (lambda batch: apply(batch, train)), (lambda batch: apply(batch, evaluate))


def collate(examples) -> dict:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.stack([example["labels"] for example in examples]),
    }


def mean_iou_function(num_labels: int):
    from torchmetrics.segmentation import MeanIoU

    metric, library = load_metric(
        "mean_iou", lambda: MeanIoU(num_classes=num_labels, input_format="index", per_class=False)
    )
    logger.info("mean IoU is computed by %s", library)

    def compute_metrics(prediction):
        predicted, labels = prediction.predictions, prediction.label_ids
        if library == "evaluate":
            scores = metric.compute(
                predictions=list(predicted),
                references=list(labels),
                num_labels=num_labels,
                ignore_index=255,
                reduce_labels=False,
            )
            return {"mean_iou": float(scores["mean_iou"]), "overall_accuracy": float(scores["overall_accuracy"])}
        valid = labels != 255
        metric.reset()
        metric.update(torch.from_numpy(np.where(valid, predicted, 0)), torch.from_numpy(np.where(valid, labels, 0)))
        return {"mean_iou": metric.compute().item(), "overall_accuracy": float((predicted == labels)[valid].mean())}

    return compute_metrics


def predicted_classes(logits, labels):
    """Upsample the logits to the label size and keep the class index (the metric needs nothing else)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)


def save_overlays(model, dataset, path: Path, count: int = 6) -> None:
    """Validation images with the predicted classes overlaid in colour, side by side."""
    palette = np.random.default_rng(0).integers(40, 255, size=(256, 3)).astype(np.uint8)
    palette[0] = 0
    tiles = []
    model.eval()
    for idx in range(min(count, len(dataset))):
        example = dataset[idx]
        with torch.no_grad():
            logits = model(example["pixel_values"][None].to(model.device)).logits
        predicted = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        pixels = denormalized_image(example["pixel_values"])
        colours = palette[predicted]
        blend = np.where(predicted[..., None] > 0, (0.45 * pixels + 0.55 * colours), pixels).astype(np.uint8)
        tiles.append(np.concatenate([pixels, blend], axis=0))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, output_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    check_image_size(data_args.image_size)
    if training_args.do_train and training_args.per_device_train_batch_size < 2:
        raise ExampleError(
            "--per_device_train_batch_size must be 2 or more: UperNet's pooling module ends in "
            "BatchNorm over 1x1 maps, which cannot train on a single image"
        )
    prepare_output_dir(training_args, output_args)
    set_seed(training_args.seed)  # the model's random initialisation follows --seed too
    log_run_setup(training_args)
    started = time.time()

    dataset, id2label = load_data(data_args, training_args.seed)
    model = share_as_remote_code(build_model(model_args, data_args, id2label))  # saves load without the package
    enable_hub_kernels(model, model_args)
    trainer = make_trainer(
        model,
        training_args,
        dataset,
        make_transforms(data_args, augmentation_seed(training_args)),
        data_collator=collate,
        compute_metrics=mean_iou_function(len(id2label)),
        preprocess_logits_for_metrics=predicted_classes,
        # Saved with the model: what pipeline("image-segmentation") preprocesses with (the evaluation transform).
        processing_class=image_processor("SegformerImageProcessor", data_args.image_size, do_reduce_labels=False),
    )
    results = train_and_evaluate(trainer, training_args)
    if training_args.do_eval and trainer.is_world_process_zero():
        save_overlays(trainer.model, dataset["validation"], Path(training_args.output_dir) / "predictions.png")
    publish(
        trainer,
        training_args,
        finetuned_from=model_args.model_name_or_path,
        tasks="image-segmentation",
        dataset=data_args.dataset_name or "scikit-learn digits scenes",
        tags=["upernet", "internimage"],
    )

    batch = collate([dataset["validation"][idx] for idx in range(min(2, len(dataset["validation"])))])
    return finish_run(
        trainer,
        training_args,
        results,
        auto_class=AutoModelForSemanticSegmentation,
        pixel_values=batch["pixel_values"],
        metric=("eval_mean_iou", "mean IoU"),
        started=started,
    )


if __name__ == "__main__":
    main()
