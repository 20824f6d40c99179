"""Object detection with transformers' RT-DETR on an InternImage backbone, trained with Trainer.

Why RT-DETR: it is a DETR-family detector built on the same multi-scale deformable attention as Deformable DETR and
DINO (the paper's detectors; transformers loads that attention's kernel from the kernels hub for all of them), and
its hybrid encoder, IoU-aware query selection and denoising queries make it converge in a fraction of Deformable
DETR's epochs, which is what fine-tuning on a new dataset (and this script's CPU demo) needs.

    python examples/run_object_detection.py                          # offline demo: digits pasted on canvases
    python examples/run_object_detection.py --dataset_name cppe-5 --model_name_or_path converted/internimage-t-1k-224 \\
        --output_dir out --image_size 640 --num_train_epochs 30 ...
    python examples/run_object_detection.py --train_dir data/train --validation_dir data/val ...

Local folders are imagefolders with a metadata.jsonl (`file_name`, `image_id`, `objects` with COCO `bbox` [x, y,
w, h] in pixels and `category`); class names from --id2label_file. Metrics (COCO mAP by pycocotools) land in
<output_dir>/eval_results.json (`eval_map`, `eval_map_50`, ...), predicted boxes on validation images in
<output_dir>/predictions.png.
"""

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Sequence, load_dataset
from example_utils import (
    DataArguments,
    ExampleError,
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
    load_image_folders,
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
from PIL import Image, ImageDraw
from transformers import (
    AutoConfig,
    AutoModelForObjectDetection,
    RTDetrConfig,
    RTDetrForObjectDetection,
    set_seed,
)
from transformers.image_transforms import center_to_corners_format
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.loss import loss_rt_detr

from modeling_internimage import share_as_remote_code  # (the import registers InternImage with the Auto classes)


logger = logging.getLogger(__name__)
BACKBONE_STAGES = ["stage2", "stage3", "stage4"]
DEMO_DEFAULTS = (
    "--num_train_epochs 20 --learning_rate 2e-3 --per_device_train_batch_size 16 --per_device_eval_batch_size 32 "
    "--eval_strategy no --weight_decay 1e-4 --warmup_steps 50 --max_grad_norm 0.1 --num_denoising 20"
).split()


@dataclass
class DataTrainingArguments(DataArguments):
    objects_column_name: str = field(default="objects", metadata={"help": "Column with bbox and category"})
    id2label_file: str | None = field(default=None, metadata={"help": "JSON {id: name} of the classes"})
    image_size: int = field(default=640, metadata={"help": "Square training size (multiple of 32)"})
    detector_width: int = field(default=256, metadata={"help": "RT-DETR hidden size when its head is new"})
    num_queries: int = field(default=300, metadata={"help": "Object queries when the head is new"})
    decoder_layers: int = field(default=6, metadata={"help": "Decoder layers when the head is new"})
    num_denoising: int | None = field(
        default=None, metadata={"help": "Denoising queries when the head is new (default: 2 per query, at most 100)"}
    )


def parse_arguments(argv: list[str]):
    # Two decoder layers and a higher learning rate: a step costs a quarter less than with three layers at 1e-3, and
    # two of three seeds tried reached a higher mAP (the third stays low: benchmarks/RESULTS.md).
    demo = DEMO_DEFAULTS + "--image_size 96 --detector_width 64 --num_queries 30 --decoder_layers 2".split()
    return parse_example_arguments(DataTrainingArguments, argv, demo)


def load_data(data_args: DataTrainingArguments, seed: int):
    if data_args.dataset_name:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_dir:
        for role, directory in (("train_dir", data_args.train_dir), ("validation_dir", data_args.validation_dir)):
            if directory:
                check_metadata(Path(directory), role)
        dataset = load_image_folders(data_args)
    else:
        from digits_data import digits_scenes

        dataset = digits_scenes(num_images=960)  # four times the scenes of 240 at the same step count
    dataset = finish_splits(dataset, data_args, seed)
    require_columns(
        dataset["train"],
        {"image_column_name": data_args.image_column_name, "objects_column_name": data_args.objects_column_name},
    )
    return dataset, class_names(dataset, data_args)


def check_metadata(directory: Path, role: str) -> None:
    """Every record of a local folder's metadata.jsonl well formed (the file and line named otherwise), its images
    readable, and at least one box in all."""
    metadata = directory / "metadata.jsonl"
    if not metadata.is_file():
        raise ExampleError(f"--{role} {directory} has no metadata.jsonl (COCO-style boxes per image)")
    boxes, images = 0, []
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ExampleError(f"{metadata}, line {number}: not valid JSON ({error})") from None
        problem = record_problem(record)
        if problem:
            raise ExampleError(f"{metadata}, line {number}: {problem}")
        boxes += len(record["objects"]["bbox"])
        images.append(directory / record["file_name"])
    if boxes == 0:
        raise ExampleError(f"{metadata} has no objects at all; detection needs boxes to learn from")
    check_image_files(images, role)


def record_problem(record) -> str | None:
    """What is wrong with one metadata.jsonl record, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
        return "each record needs a 'file_name'"
    objects = record.get("objects")
    if not isinstance(objects, dict) or not {"bbox", "category"} <= set(objects):
        return "each record needs 'objects' with 'bbox' and 'category' lists"
    bboxes, categories = objects["bbox"], objects["category"]
    if not isinstance(bboxes, list) or not isinstance(categories, list) or len(bboxes) != len(categories):
        return "'objects' must hold lists 'bbox' and 'category' of the same length"
    for box in bboxes:
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            return f"bbox {box!r} is not four numbers [x, y, width, height]"
    for category in categories:
        if not isinstance(category, int) or isinstance(category, bool):
            return f"category {category!r} is not a class id (an integer; names go in --id2label_file)"
    return None


def class_names(dataset, data_args: DataTrainingArguments) -> list[str]:
    if data_args.id2label_file:
        id2label = read_id2label(data_args.id2label_file)
        return [id2label[idx] for idx in range(len(id2label))]
    category = dataset["train"].features[data_args.objects_column_name]["category"]
    feature = (
        category.feature if isinstance(category, Sequence) else category[0] if isinstance(category, list) else None
    )
    if isinstance(feature, ClassLabel):
        return feature.names
    largest = max(
        (max(objects["category"], default=-1) for objects in dataset["train"][data_args.objects_column_name])
    )
    return [str(idx) for idx in range(largest + 1)]


def check_boxes(dataset, data_args: DataTrainingArguments, num_classes: int) -> None:
    """Every box inside its image and every category known, before any training step."""
    for split in ("train", "validation"):
        for index, example in enumerate(dataset[split]):
            width, height = example[data_args.image_column_name].size
            objects = example[data_args.objects_column_name]
            for box, category in zip(objects["bbox"], objects["category"]):
                x, y, w, h = box
                if w <= 0 or h <= 0 or x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
                    raise ExampleError(
                        f"{split} example {index}: box {list(box)} (x, y, w, h) lies outside its "
                        f"{width}x{height} image"
                    )
                if not 0 <= category < num_classes:
                    raise ExampleError(
                        f"{split} example {index}: category {category} is not among the {num_classes} classes"
                    )


def paired_generalized_box_iou(boxes: torch.Tensor, other_boxes: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of `boxes[i]` with `other_boxes[i]`, both (N, 4) corners (x0, y0, x1, y1)."""
    top_left, bottom_right = boxes[:, :2], boxes[:, 2:]
    other_top_left, other_bottom_right = other_boxes[:, :2], other_boxes[:, 2:]
    overlap = torch.minimum(bottom_right, other_bottom_right) - torch.maximum(top_left, other_top_left)
    overlap_area = overlap.clamp(min=0).prod(1)
    hull_area = (torch.maximum(bottom_right, other_bottom_right) - torch.minimum(top_left, other_top_left)).prod(1)
    union = (bottom_right - top_left).prod(1) + (other_bottom_right - other_top_left).prod(1) - overlap_area
    return overlap_area / union - (hull_area - union) / hull_area


class PairedBoxRTDetrLoss(loss_rt_detr.RTDetrLoss):
    """RT-DETR's loss with the GIoU term computed for each matched (prediction, target) pair alone. transformers
    computes the GIoU matrix between all matched predictions and all their targets (denoising queries included,
    thousands a batch) and keeps its diagonal; that matrix and its backward took about a third of a demo step on the
    CPU. Same values (`tests/test_examples.py` compares the two)."""

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        predicted = outputs["pred_boxes"][self._get_source_permutation_idx(indices)]
        matched = torch.cat([target["boxes"][i] for target, (_, i) in zip(targets, indices)], dim=0)
        giou = paired_generalized_box_iou(center_to_corners_format(predicted), center_to_corners_format(matched))
        return {
            "loss_bbox": F.l1_loss(predicted, matched, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }


def rt_detr_loss_with_paired_giou(*args, **kwargs) -> tuple:
    """transformers' RT-DETR loss function (its splitting of denoising and auxiliary outputs kept as each release has
    it), with `PairedBoxRTDetrLoss` as the criterion it builds."""
    with mock.patch.object(loss_rt_detr, "RTDetrLoss", PairedBoxRTDetrLoss):
        return loss_rt_detr.RTDetrForObjectDetectionLoss(*args, **kwargs)


def build_model(model_args: ModelArguments, data_args: DataTrainingArguments, labels: list[str]):
    id2label = dict(enumerate(labels))
    label2id = {name: idx for idx, name in id2label.items()}
    name = model_args.model_name_or_path
    if not is_preset(name):
        source_config = AutoConfig.from_pretrained(
            name,
            trust_remote_code=model_args.trust_remote_code,
            token=model_args.token,
            revision=model_args.model_revision,
        )
        if source_config.model_type != "internimage":
            check_query_count(source_config.num_queries, data_args.image_size, f"{name}'s num_queries")
            return AutoModelForObjectDetection.from_pretrained(
                name,
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                token=model_args.token,
            )
    check_query_count(data_args.num_queries, data_args.image_size, "--num_queries")
    num_denoising = data_args.num_denoising
    if num_denoising is None:
        num_denoising = min(100, 2 * data_args.num_queries)
    elif num_denoising < 0:
        raise ExampleError(f"--num_denoising {num_denoising} must be 0 (no denoising queries) or more")
    backbone = backbone_config(model_args, BACKBONE_STAGES)
    width = data_args.detector_width
    config = RTDetrConfig(
        backbone_config=backbone,
        encoder_in_channels=backbone.stage_channels[1:],
        feat_strides=[8, 16, 32],
        encoder_hidden_dim=width,
        d_model=width,
        decoder_in_channels=[width] * 3,
        encoder_ffn_dim=4 * width,
        decoder_ffn_dim=4 * width,
        encoder_attention_heads=max(width // 32, 1),
        decoder_attention_heads=max(width // 32, 1),
        num_queries=data_args.num_queries,
        decoder_layers=data_args.decoder_layers,
        num_denoising=num_denoising,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
        anchor_image_size=None,
    )
    model = RTDetrForObjectDetection(config)
    load_pretrained_backbone(model.model.backbone.model, model_args, BACKBONE_STAGES)
    return model


def check_query_count(num_queries: int, image_size: int, what: str) -> None:
    """RT-DETR selects its queries among the encoder's tokens at strides 8, 16 and 32."""
    tokens = sum((image_size // stride) ** 2 for stride in (8, 16, 32))
    if not 1 <= num_queries <= tokens:
        raise ExampleError(
            f"{what} {num_queries} must lie between 1 and the {tokens} encoder tokens at "
            f"--image_size {image_size}: lower --num_queries or raise --image_size"
        )


def make_transforms(data_args: DataTrainingArguments, seed: int):
    size = data_args.image_size
    # Boxes are filtered once, after the last transform: only Affine moves them, so that equals filtering after each
    # transform (albumentations' default), at half the cost of a demo batch's augmentation.
    boxes = A.BboxParams(
        format="coco",
        label_fields=["category"],
        clip=True,
        min_area=4,
        min_visibility=0.3,
        check_each_transform=False,
    )
    normalize = A.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    train = reseeded_in_workers(
        A.Compose(
            [
                A.Resize(size, size),
                A.Affine(scale=(0.8, 1.2), translate_percent=0.1, p=0.7),
                A.RandomBrightnessContrast(p=0.3),
                normalize,
            ],
            bbox_params=boxes,
            seed=seed,
        )
    )
    evaluate = A.Compose([A.Resize(size, size), normalize], bbox_params=boxes)

    def apply(batch, augment):
        pixel_values, labels = [], []
        for image, objects in zip(batch[data_args.image_column_name], batch[data_args.objects_column_name]):
            out = augment(image=np.asarray(image.convert("RGB")), bboxes=objects["bbox"], category=objects["category"])
            pixel_values.append(torch.from_numpy(out["image"]).permute(2, 0, 1))
            xywh = torch.tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)) / size
            centers = torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], dim=1)  # DETR targets: cx, cy, w, h
            labels.append({"class_labels": torch.tensor(out["category"], dtype=torch.long), "boxes": centers})
        return {"pixel_values": pixel_values, "labels": labels}

    return (lambda batch: apply(batch, train)), (lambda batch: apply(batch, evaluate))


def collate(examples) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": [e["labels"] for e in examples],
    }


def detections(logits: torch.Tensor, boxes: torch.Tensor, size: int, top_k: int = 100) -> list[dict]:
    """RT-DETR's sigmoid scores, best (query, class) pairs first, boxes in pixels (x0, y0, x1, y1)."""
    results = []
    for image_logits, image_boxes in zip(logits, boxes):
        scores = image_logits.sigmoid().flatten()
        best = scores.topk(min(top_k, scores.numel()))
        queries, classes = best.indices // image_logits.shape[-1], best.indices % image_logits.shape[-1]
        corners = center_to_corners_format(image_boxes[queries]) * size
        results.append({"scores": best.values, "labels": classes, "boxes": corners})
    return results


def coco_map(predictions: list[dict], targets: list[dict], num_classes: int) -> dict[str, float]:
    """COCO box mAP with pycocotools (the reference implementation), from per-image predictions and targets with
    boxes in pixels (x0, y0, x1, y1)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box):
        x0, y0, x1, y1 = (float(v) for v in box)
        return [x0, y0, x1 - x0, y1 - y0]

    ground_truth = COCO()
    annotations = []
    for image_id, target in enumerate(targets):
        for label, box in zip(target["labels"], target["boxes"]):
            x, y, w, h = xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    ground_truth.dataset = {
        "images": [{"id": idx} for idx in range(len(targets))],
        "annotations": annotations,
        "categories": [{"id": idx} for idx in range(num_classes)],
    }
    ground_truth.createIndex()
    detected = [
        {"image_id": image_id, "category_id": int(label), "bbox": xywh(box), "score": float(score)}
        for image_id, found in enumerate(predictions)
        for label, box, score in zip(found["labels"], found["boxes"], found["scores"])
    ]
    if not detected or not annotations:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detected), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map": evaluation.stats[0], "map_50": evaluation.stats[1], "map_75": evaluation.stats[2]}


def map_function(image_size: int, num_classes: int):
    logger.info(
        "mAP is computed by pycocotools (COCO protocol; evaluate has no maintained detection metric and "
        "torchmetrics' needs torchvision)"
    )

    def compute_metrics(prediction):
        predicted, expected = [], []
        for batch_outputs, targets in zip(prediction.predictions, prediction.label_ids):
            logits, boxes = batch_outputs
            predicted += detections(torch.as_tensor(logits), torch.as_tensor(boxes), image_size)
            expected += [
                {
                    "labels": torch.as_tensor(t["class_labels"]),
                    "boxes": center_to_corners_format(torch.as_tensor(t["boxes"])) * image_size,
                }
                for t in targets
            ]
        return coco_map(predicted, expected, num_classes)

    return compute_metrics


def logits_and_boxes(outputs, labels):
    """Keep what the metric needs. Trainer hands over the output tuple without the loss; with labels it still
    starts with the loss dictionary, then logits and boxes."""
    logits, boxes = [value for value in outputs if not isinstance(value, dict)][:2]
    return logits, boxes


def save_predictions(model, dataset, size: int, names: list[str], path: Path, count: int = 6) -> None:
    """Validation images with their boxes above 0.35 confidence and class names."""
    tiles = []
    model.eval()
    for idx in range(min(count, len(dataset))):
        example = dataset[idx]
        with torch.no_grad():
            outputs = model(example["pixel_values"][None].to(model.device))
        (found,) = detections(outputs.logits.cpu(), outputs.pred_boxes.cpu(), size, top_k=10)
        tile = Image.fromarray(denormalized_image(example["pixel_values"])).resize((size * 2, size * 2))
        draw = ImageDraw.Draw(tile)
        for score, label, box in zip(found["scores"], found["labels"], found["boxes"]):
            if score < 0.35:
                continue
            draw.rectangle([float(v) * 2 for v in box], outline=(255, 60, 60), width=2)
            draw.text(
                (float(box[0]) * 2 + 2, float(box[1]) * 2 + 1), f"{names[label]} {score:.2f}", fill=(255, 255, 0)
            )
        tiles.append(np.asarray(tile))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, output_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    check_image_size(data_args.image_size)
    prepare_output_dir(training_args, output_args)
    set_seed(training_args.seed)  # the model's random initialisation follows --seed too
    log_run_setup(training_args)
    training_args.eval_do_concat_batches = False  # targets differ in length between images
    started = time.time()

    dataset, labels = load_data(data_args, training_args.seed)
    check_boxes(dataset, data_args, len(labels))
    model = share_as_remote_code(build_model(model_args, data_args, labels))  # saves load without the package
    enable_hub_kernels(model, model_args)
    if type(model) is RTDetrForObjectDetection:
        model.loss_function = rt_detr_loss_with_paired_giou
    trainer = make_trainer(
        model,
        training_args,
        dataset,
        make_transforms(data_args, augmentation_seed(training_args)),
        data_collator=collate,
        compute_metrics=map_function(data_args.image_size, len(labels)),
        preprocess_logits_for_metrics=logits_and_boxes,
        # Saved with the model: what pipeline("object-detection") preprocesses and post-processes with.
        processing_class=image_processor("RTDetrImageProcessor", data_args.image_size, do_pad=False),
    )
    results = train_and_evaluate(trainer, training_args)
    if training_args.do_eval and trainer.is_world_process_zero():
        save_predictions(
            trainer.model,
            dataset["validation"],
            data_args.image_size,
            labels,
            Path(training_args.output_dir) / "predictions.png",
        )
    publish(
        trainer,
        training_args,
        finetuned_from=model_args.model_name_or_path,
        tasks="object-detection",
        dataset=data_args.dataset_name or "scikit-learn digits scenes",
        tags=["rt-detr", "internimage"],
    )

    pixel_values = collate([dataset["validation"][0]])["pixel_values"]
    return finish_run(
        trainer,
        training_args,
        results,
        auto_class=AutoModelForObjectDetection,
        pixel_values=pixel_values,
        metric=("eval_map", "mAP"),
        started=started,
        output="pred_boxes",
    )


if __name__ == "__main__":
    main()
