"""Fine-tune (or train from scratch) InternImage for image classification with transformers' Trainer.

    python examples/run_image_classification.py                       # offline demo: a tiny InternImage on digits
    python examples/run_image_classification.py --dataset_name beans --model_name_or_path converted/internimage-t-1k-224 \\
        --output_dir outputs/beans --do_train --do_eval --num_train_epochs 5 --learning_rate 1e-4
    python examples/run_image_classification.py --train_dir data/train --validation_dir data/val ...   # imagefolder

Without --dataset_name or --train_dir the embedded default is used: scikit-learn's handwritten digits, so the
command runs on a fresh machine without network. Metrics land in <output_dir>/eval_results.json, a confusion
matrix in <output_dir>/confusion_matrix.png.
"""

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from datasets import ClassLabel, load_dataset
from example_utils import (
    ExampleError,
    MirroredDataArguments,
    ModelArguments,
    augmentation_seed,
    check_image_files,
    enable_hub_kernels,
    finish_run,
    finish_splits,
    is_preset,
    load_config,
    load_image_folders,
    load_metric,
    log_run_setup,
    make_trainer,
    parse_example_arguments,
    prepare_output_dir,
    publish,
    require_columns,
    reseeded_in_workers,
    train_and_evaluate,
)
from PIL import Image, ImageDraw
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    set_seed,
)

import modeling_internimage  # noqa: F401  (registers InternImage with the Auto classes)
from modeling_internimage import InternImageForImageClassification, build_image_processor


logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Training settings of the embedded digits demo; any flag given on the command line wins.
DEMO_DEFAULTS = (
    "--num_train_epochs 15 --learning_rate 2e-3 --per_device_train_batch_size 32 --per_device_eval_batch_size 64 "
    "--eval_strategy epoch --weight_decay 0.05 --warmup_steps 40"
).split()


@dataclass
class DataTrainingArguments(MirroredDataArguments):
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels"})
    image_size: int | None = field(default=None, metadata={"help": "Training resolution (default: processor's)"})
    random_crop_scale: float = field(default=0.7, metadata={"help": "Smallest area fraction of random crops"})


def parse_arguments(argv: list[str]):
    # Digits must not be mirrored, and they are small: train at 64x64.
    demo = DEMO_DEFAULTS + "--horizontal_flip_probability 0 --image_size 64".split()
    return parse_example_arguments(DataTrainingArguments, argv, demo)


def check_image_folder(directory: str, role: str) -> None:
    """Images present and readable; without a metadata.jsonl (which labels them) at least two class folders."""
    path = Path(directory)
    if not path.is_dir():
        raise ExampleError(f"--{role} {directory} is not a directory")
    images = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ExampleError(f"--{role} {directory} holds no images (expected one subfolder of images per class)")
    classes = {image.parent.name for image in images}
    if len(classes) < 2 and not (path / "metadata.jsonl").is_file():
        raise ExampleError(f"--{role} {directory} has 1 class ({classes.pop()}); classification needs at least two")
    check_image_files(images, role)


def encode_string_labels(dataset, column: str):
    """Labels given as names (e.g. in a metadata.jsonl) become a class-label column, with one list of names for
    all splits."""
    if dataset["train"].features[column].dtype != "string":
        return dataset
    names = sorted({name for split in dataset.values() for name in split.unique(column)})
    logger.info("label column '%s' holds names; classes: %s", column, ", ".join(names))
    return dataset.cast_column(column, ClassLabel(names=names))


def load_data(data_args: DataTrainingArguments, seed: int):
    if data_args.dataset_name:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_dir:
        check_image_folder(data_args.train_dir, "train_dir")
        if data_args.validation_dir:
            check_image_folder(data_args.validation_dir, "validation_dir")
        dataset = load_image_folders(data_args)
    else:
        from digits_data import digits_classification

        dataset = digits_classification()
    dataset = finish_splits(dataset, data_args, seed)
    require_columns(
        dataset["train"],
        {"image_column_name": data_args.image_column_name, "label_column_name": data_args.label_column_name},
    )
    dataset = encode_string_labels(dataset, data_args.label_column_name)
    label_feature = dataset["train"].features[data_args.label_column_name]
    if not isinstance(label_feature, ClassLabel):
        raise ExampleError(
            f"--label_column_name '{data_args.label_column_name}' is not a class label column ({label_feature})"
        )
    if len(label_feature.names) < 2:
        raise ExampleError(
            f"the label column '{data_args.label_column_name}' has {len(label_feature.names)} class; "
            "classification needs at least two"
        )
    return dataset, label_feature.names


def load_model_and_processor(model_args: ModelArguments, labels: list[str], image_size: int | None):
    id2label = dict(enumerate(labels))
    label2id = {label: idx for idx, label in id2label.items()}
    config = load_config(model_args, num_labels=len(labels), id2label=id2label, label2id=label2id)
    if is_preset(model_args.model_name_or_path):
        model = InternImageForImageClassification(config)
        processor = build_image_processor(size=image_size or 224)
    else:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
        try:
            processor = AutoImageProcessor.from_pretrained(
                model_args.image_processor_name or model_args.model_name_or_path
            )
        except OSError:
            processor = build_image_processor(size=image_size or 224)
        if image_size is not None:
            processor = build_image_processor(size=image_size)
    return model, processor


def processor_size(processor) -> int:
    crop = getattr(processor, "crop_size", None) or {}
    return crop.get("height") or processor.size.get("shortest_edge") or processor.size["height"]


def make_transforms(data_args: DataTrainingArguments, processor, seed: int):
    size = processor_size(processor)
    augment = reseeded_in_workers(
        A.Compose(
            [
                A.SmallestMaxSize(max_size=size),
                A.RandomResizedCrop(size=(size, size), scale=(data_args.random_crop_scale, 1.0)),
                A.HorizontalFlip(p=data_args.horizontal_flip_probability),
            ],
            seed=seed,  # albumentations 2 draws from its own generator, which --seed does not reach otherwise
        )
    )

    def train_transform(batch):
        images = [
            augment(image=np.asarray(image.convert("RGB")))["image"] for image in batch[data_args.image_column_name]
        ]
        batch["pixel_values"] = list(processor(images, return_tensors="pt")["pixel_values"])
        return batch

    def eval_transform(batch):
        images = [image.convert("RGB") for image in batch[data_args.image_column_name]]
        batch["pixel_values"] = list(processor(images, return_tensors="pt")["pixel_values"])
        return batch

    return train_transform, eval_transform


def collate(examples, label_column: str) -> dict:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example[label_column] for example in examples]),
    }


def accuracy_function(num_labels: int):
    from torchmetrics.classification import MulticlassAccuracy

    metric, library = load_metric("accuracy", lambda: MulticlassAccuracy(num_classes=num_labels, average="micro"))
    logger.info("accuracy is computed by %s", library)

    def compute_metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=1)
        if library == "evaluate":
            return metric.compute(predictions=predicted, references=prediction.label_ids)
        return {"accuracy": metric(torch.from_numpy(predicted), torch.from_numpy(prediction.label_ids)).item()}

    return compute_metrics


def save_confusion_matrix(predictions: np.ndarray, labels: np.ndarray, names: list[str], path: Path) -> None:
    """A PNG confusion matrix (rows: true class, columns: predicted), darker cells for more images."""
    count = len(names)
    matrix = np.zeros((count, count), dtype=int)
    np.add.at(matrix, (labels, predictions.argmax(1)), 1)
    cell, margin = 36, 60
    image = Image.new("RGB", (margin + cell * count + 10, margin + cell * count + 10), "white")
    draw = ImageDraw.Draw(image)
    peak = max(matrix.max(), 1)
    for row in range(count):
        draw.text((5, margin + row * cell + cell // 3), names[row][:7], fill="black")
        draw.text((margin + row * cell + 4, 5), names[row][:5], fill="black")
        for column in range(count):
            shade = int(255 * (1 - matrix[row, column] / peak))
            box = [
                margin + column * cell,
                margin + row * cell,
                margin + (column + 1) * cell - 1,
                margin + (row + 1) * cell - 1,
            ]
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            draw.text((box[0] + 6, box[1] + 11), str(matrix[row, column]), fill="black" if shade > 120 else "white")
    draw.text((5, margin - 20), "true \\ predicted", fill="black")
    image.save(path)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, output_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    if data_args.image_size is not None and data_args.image_size < 32:
        raise ExampleError(f"--image_size {data_args.image_size} must be at least 32 pixels")
    prepare_output_dir(training_args, output_args)
    set_seed(training_args.seed)  # the model's random initialisation follows --seed too
    log_run_setup(training_args)
    started = time.time()

    dataset, labels = load_data(data_args, training_args.seed)
    model, processor = load_model_and_processor(model_args, labels, data_args.image_size)
    enable_hub_kernels(model, model_args)
    trainer = make_trainer(
        model,
        training_args,
        dataset,
        make_transforms(data_args, processor, augmentation_seed(training_args)),
        processing_class=processor,
        data_collator=lambda examples: collate(examples, data_args.label_column_name),
        compute_metrics=accuracy_function(len(labels)),
    )
    results = train_and_evaluate(trainer, training_args)
    if training_args.do_eval:
        prediction = trainer.predict(dataset["validation"], metric_key_prefix="confusion")  # every rank gathers
        if trainer.is_world_process_zero():
            save_confusion_matrix(
                prediction.predictions,
                prediction.label_ids,
                labels,
                Path(training_args.output_dir) / "confusion_matrix.png",
            )
    publish(
        trainer,
        training_args,
        finetuned_from=model_args.model_name_or_path,
        tasks="image-classification",
        dataset=data_args.dataset_name or "scikit-learn digits",
        tags=["image-classification", "internimage"],
    )

    batch = collate(
        [dataset["validation"][idx] for idx in range(min(4, len(dataset["validation"])))], data_args.label_column_name
    )
    return finish_run(
        trainer,
        training_args,
        results,
        auto_class=AutoModelForImageClassification,
        pixel_values=batch["pixel_values"],
        metric=("eval_accuracy", "accuracy"),
        started=started,
    )


if __name__ == "__main__":
    main()
