"""What the three Trainer scripts share: model sources, the backbone under a task head, output-directory safety,
the Trainer over train/validation splits, metrics with an offline fallback, argument checks, image export, and the
final save-reload check."""

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from PIL import Image
from transformers import AutoConfig, HfArgumentParser, Trainer, TrainingArguments
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import is_torchvision_available
from transformers.utils import logging as hf_logging

from modeling_internimage import InternImageBackbone, InternImageConfig
from modeling_internimage.configuration_internimage import normalize_variant_name


logger = logging.getLogger(__name__)

# Presets trained from scratch: a released architecture ("t" ... "g"), or "tiny", InternImage-T's block design at
# a width and depth that train in minutes on a CPU.
TINY_PRESET = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8], "drop_path_rate": 0.0}


class ExampleError(SystemExit):
    """Bad arguments or data, reported before training starts as one line."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="tiny",
        metadata={
            "help": "A converted directory, a Hub id (OpenGVLab's repos included), or a preset to train from "
            "scratch: tiny, t, s, b, l, xl, h, g."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's"})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloaded models"})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit)"})
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor name or path"})
    token: str | None = field(default=None, metadata={"help": "Hub token (else the stored login)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from a Hub repo"})
    ignore_mismatched_sizes: bool = field(default=True, metadata={"help": "Replace a head of another size"})
    use_hub_kernels: bool = field(default=False, metadata={"help": "Run DCNv3 with the kernels-hub kernel"})


@dataclass
class DataArguments:
    """Data flags every script takes; each script's own dataclass adds its task's."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (default: embedded digits)"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name"})
    train_dir: str | None = field(default=None, metadata={"help": "Local training data (layout: see the script)"})
    validation_dir: str | None = field(default=None, metadata={"help": "Local validation data"})
    train_val_split: float = field(default=0.15, metadata={"help": "Validation fraction when there is none"})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set"})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images"})


@dataclass
class MirroredDataArguments(DataArguments):
    """Data flags of the tasks whose labels survive a horizontal flip (classes, masks)."""

    horizontal_flip_probability: float = field(
        default=0.5, metadata={"help": "Random horizontal flips (0 for data that must not be mirrored, e.g. digits)"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.horizontal_flip_probability <= 1.0:
            raise ExampleError(
                f"--horizontal_flip_probability {self.horizontal_flip_probability} must lie between 0 and 1"
            )


@dataclass
class OutputArguments:
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output directory"})


# Training settings every embedded demo shares (each script adds its own schedule); offline, on the CPU, seeded.
COMMON_DEMO_FLAGS = (
    "--do_train --do_eval --save_strategy no --logging_steps 20 --lr_scheduler_type cosine --use_cpu --report_to none "
    "--seed 0"
).split()


def parse_example_arguments(data_class, argv: list[str], demo_defaults: list[str]):
    """(model, data, output, training) arguments. Without a dataset the embedded demo runs, with the common demo
    flags and `demo_defaults` in front so that any flag given still wins."""
    if not any(flag in argv for flag in ("--dataset_name", "--train_dir")):
        argv = COMMON_DEMO_FLAGS + demo_defaults + argv
    parser = HfArgumentParser((ModelArguments, data_class, OutputArguments, TrainingArguments))
    arguments = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hf_logging.set_verbosity_warning()
    model_args, data_args, _, training_args = arguments
    check_model_source(model_args.model_name_or_path)
    for flag in ("max_train_samples", "max_eval_samples"):
        if getattr(data_args, flag) is not None and getattr(data_args, flag) < 1:
            raise ExampleError(f"--{flag} {getattr(data_args, flag)} must be at least 1")
    if training_args.remove_unused_columns:
        # The transforms run on the fly (set_transform) and read the raw image and label columns, which Trainer
        # would otherwise drop before they run.
        logger.info("setting --remove_unused_columns false: the on-the-fly transforms need the raw columns")
        training_args.remove_unused_columns = False
    return arguments


def check_model_source(name: str) -> None:
    """A preset, an existing directory, or something that can be a Hub id; a missing local path says so."""
    if is_preset(name) or Path(name).exists():
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    try:
        validate_repo_id(name)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise ExampleError(
            f"--model_name_or_path {name} is neither an existing directory, a preset (tiny, t, s, b, "
            "l, xl, h, g), nor a Hub id"
        )


def read_id2label(path: str) -> dict[int, str]:
    """Class names from a JSON object {id: name} with ids 0 .. n-1."""
    try:
        mapping = json.loads(Path(path).read_text())
        id2label = {int(idx): name for idx, name in mapping.items()}
    except (OSError, ValueError, AttributeError) as error:
        raise ExampleError(f"--id2label_file {path} is not a JSON object of class ids to names ({error})") from None
    if not id2label or sorted(id2label) != list(range(len(id2label))):
        raise ExampleError(
            f"--id2label_file {path} must number its classes 0 to n-1 without gaps; it has ids {sorted(id2label)[:10]}"
        )
    if not all(isinstance(name, str) for name in id2label.values()):
        raise ExampleError(f"--id2label_file {path}: every class name must be a string")
    return id2label


def check_image_files(paths, role: str) -> None:
    """Decode every local image once before training, so that a damaged file is named now, not mid-epoch."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ExampleError(f"--{role}: {path} is not a readable image ({error})") from None


def load_image_folders(data_args: DataArguments):
    """--train_dir (and --validation_dir) as imagefolder datasets (class subfolders, or a metadata.jsonl)."""
    from datasets import load_dataset

    data_files = {"train": str(Path(data_args.train_dir) / "**")}
    if data_args.validation_dir:
        data_files["validation"] = str(Path(data_args.validation_dir) / "**")
    return load_dataset("imagefolder", data_files=data_files)


def finish_splits(dataset, data_args: DataArguments, seed: int):
    """Carve a validation split out of train when there is none, and apply the sample limits."""
    if "validation" not in dataset:
        split = dataset["train"].train_test_split(test_size=data_args.train_val_split, seed=seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            dataset[name] = dataset[name].select(range(min(limit, len(dataset[name]))))
    return dataset


def train_and_evaluate(trainer, training_args: TrainingArguments) -> dict:
    """Train (resuming if asked), save the model, metrics and state; evaluate before and after training. Returns
    the final evaluation metrics (also in <output_dir>/eval_results.json; before training: untrained_results.json)."""
    results = {}
    if training_args.do_train and training_args.do_eval:
        before = trainer.evaluate(metric_key_prefix="untrained")
        logger.info("before training: %s", {k: round(v, 4) for k, v in before.items() if isinstance(v, float)})
        trainer.save_metrics("untrained", before, combined=False)
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        results = trainer.evaluate()
        trainer.log_metrics("eval", results)
        trainer.save_metrics("eval", results)
    return results


def augmentation_seed(training_args: TrainingArguments) -> int:
    """The seed of this process's albumentations pipeline: --seed, offset by the process index so that the ranks of
    a distributed run do not augment their different samples with one sequence of draws."""
    return training_args.seed + training_args.process_index


def reseeded_in_workers(pipeline: A.BaseCompose) -> Callable[..., dict]:
    """`pipeline` (seeded), reseeded in each DataLoader worker from its own seed and the one torch gives that worker
    (different for each worker and epoch, and repeatable for a --seed). A worker process starts with a copy of the
    parent's generator, untouched, so without this every worker and every epoch would draw the same augmentations
    (--dataloader_num_workers)."""
    process_seed = pipeline.seed

    def augment(**data) -> dict:
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            worker_seed = int(np.random.SeedSequence([process_seed, worker.seed]).generate_state(1)[0])
            if pipeline.seed != worker_seed:
                pipeline.set_random_seed(worker_seed)
        return pipeline(**data)

    return augment


def image_processor(class_name: str, size: int, **settings):
    """transformers' image processor `class_name` resizing to `size` x `size` with ImageNet mean and std, as the
    examples' evaluation transform does, so that pipelines preprocess a saved model's inputs alike (the torchvision
    backend where torchvision is installed, the PIL one otherwise)."""
    import transformers

    name = class_name if is_torchvision_available() else f"{class_name}Pil"
    return getattr(transformers, name)(
        size={"height": size, "width": size},
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_normalize=True,
        **settings,
    )


def publish(trainer, training_args: TrainingArguments, **card) -> None:
    """Push to the Hub with a model card (--push_to_hub), or write the card locally."""
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    elif trainer.is_world_process_zero():
        trainer.create_model_card(**card)


def is_preset(name: str) -> bool:
    if name.lower() == "tiny":
        return True
    try:
        normalize_variant_name(name)
    except ValueError:
        return False
    return True


def preset_config(name: str, **kwargs) -> InternImageConfig:
    if name.lower() == "tiny":
        return InternImageConfig(**TINY_PRESET, **kwargs)
    return InternImageConfig.from_variant(name, **kwargs)


def load_config(model_args: ModelArguments, **kwargs):
    """The configuration to build or fine-tune: a preset, or the pretrained model's (with `kwargs` applied)."""
    if model_args.config_name is None and is_preset(model_args.model_name_or_path):
        return preset_config(model_args.model_name_or_path, **kwargs)
    return AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        **kwargs,
    )


def backbone_config(model_args: ModelArguments, out_features: list[str]) -> InternImageConfig:
    """The InternImage configuration (preset or pretrained) to put under a detection or segmentation head, returning
    the stages `out_features`."""
    config = load_config(model_args)
    if not isinstance(config, InternImageConfig):
        raise ExampleError(
            f"{model_args.model_name_or_path} is a {config.model_type} model, not InternImage or the "
            "script's task model on an InternImage backbone"
        )
    return InternImageConfig.from_dict({**config.to_dict(), "out_features": out_features, "out_indices": None})


def load_pretrained_backbone(backbone: torch.nn.Module, model_args: ModelArguments, out_features: list[str]) -> None:
    """Start a new task model's backbone from the pretrained InternImage's weights (presets train from scratch)."""
    if is_preset(model_args.model_name_or_path):
        return
    pretrained = InternImageBackbone.from_pretrained(
        model_args.model_name_or_path, out_features=out_features, token=model_args.token
    )
    backbone.load_state_dict(pretrained.state_dict())


def check_image_size(size: int) -> None:
    if size < 32 or size % 32:
        raise ExampleError(f"--image_size {size} must be a multiple of 32 (the backbone's stride)")


def prepare_output_dir(training_args: TrainingArguments, output_args: OutputArguments) -> None:
    """Never write into a non-empty output directory (transformers' default is `trainer_output`) unless asked to
    overwrite or resume."""
    output_dir = Path(training_args.output_dir)
    resuming = training_args.resume_from_checkpoint is not None
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_args.overwrite_output_dir or resuming):
        raise ExampleError(
            f"output directory {output_dir} is not empty; pass --overwrite_output_dir or --resume_from_checkpoint"
        )


def make_trainer(model: torch.nn.Module, training_args: TrainingArguments, dataset, transforms, **trainer_kwargs):
    """Trainer over the dataset's train and validation splits (each only where the run trains or evaluates), with
    `transforms` = (train, eval) applied on the fly."""
    train_transform, eval_transform = transforms
    if training_args.do_train:
        avoid_single_sample_batches(training_args, len(dataset["train"]))
    dataset["train"].set_transform(train_transform)
    dataset["validation"].set_transform(eval_transform)
    if training_args.torch_compile and training_args.do_train:
        keep_inductor_from_reordering_scatters()
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        **trainer_kwargs,
    )


def keep_inductor_from_reordering_scatters() -> None:
    """Switch off inductor's reordering of a graph for peak memory. On torch 2.13 it can move the scatter of an
    upsampling's backward (UperNet's final resize) after the kernel that reads its result: a compiled UperNet then
    trains with every gradient zero, silently (`tests/test_compile.py` keeps the reproduction)."""
    import torch._inductor.config

    torch._inductor.config.reorder_for_peak_memory = False


def avoid_single_sample_batches(training_args: TrainingArguments, train_size: int) -> None:
    """BatchNorm layers (UperNet's pooling module, detection heads, InternImage's classification head) cannot train
    on a batch of one sample; drop an incomplete last batch that would hold a single one."""
    per_process = math.ceil(train_size / training_args.world_size)
    if training_args.per_device_train_batch_size > 1 and per_process % training_args.per_device_train_batch_size == 1:
        logger.info(
            "dropping each epoch's last training batch: it would hold a single sample (%d samples per "
            "process, batches of %d)",
            per_process,
            training_args.per_device_train_batch_size,
        )
        training_args.dataloader_drop_last = True


def log_run_setup(training_args: TrainingArguments) -> None:
    logger.info(
        "training with %d process(es) on %s, output in %s",
        training_args.world_size,
        training_args.device,
        training_args.output_dir,
    )


def require_columns(dataset, columns: dict[str, str]) -> None:
    """`columns` maps a role to the column name given; each must exist."""
    for role, name in columns.items():
        if name not in dataset.column_names:
            raise ExampleError(
                f"--{role} '{name}' is not a column of the dataset (columns: {', '.join(dataset.column_names)})"
            )


def load_metric(name: str, torchmetrics_factory):
    """`evaluate.load(name)` where it can be loaded, else the given torchmetrics metric (offline). Returns the
    metric object and the library that computes it, which the scripts log."""
    try:
        import evaluate

        return evaluate.load(name), "evaluate"
    except Exception as error:  # offline, or not on this evaluate version
        logger.info("evaluate.load(%r) unavailable (%s); using torchmetrics", name, str(error).splitlines()[0])
        return torchmetrics_factory(), "torchmetrics"


def enable_hub_kernels(model: torch.nn.Module, model_args: ModelArguments) -> None:
    if model_args.use_hub_kernels:
        from modeling_internimage import use_hub_kernels

        use_hub_kernels(model)


def denormalized_image(pixel_values: torch.Tensor) -> np.ndarray:
    """A normalised (C, H, W) tensor back to an (H, W, 3) uint8 image."""
    pixels = pixel_values.permute(1, 2, 0).numpy() * np.array(IMAGENET_DEFAULT_STD) + np.array(IMAGENET_DEFAULT_MEAN)
    return (pixels * 255).clip(0, 255).astype(np.uint8)


def check_reload(
    model: torch.nn.Module, model_class, output_dir: str, pixel_values: torch.Tensor, output: str = "logits"
) -> float:
    """Reload the saved model with `model_class.from_pretrained` and return the largest difference of `output`."""
    reloaded = model_class.from_pretrained(output_dir).to(model.device).eval()
    model.eval()
    pixel_values = pixel_values.to(model.device)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values)
        actual = reloaded(pixel_values=pixel_values)
    return (getattr(actual, output) - getattr(expected, output)).abs().max().item()


def finish_run(
    trainer,
    training_args: TrainingArguments,
    results: dict,
    *,
    auto_class,
    pixel_values: torch.Tensor,
    metric: tuple[str, str],
    started: float,
    output: str = "logits",
) -> dict:
    """The scripts' common ending: after training, the main process reloads the saved model with `auto_class`,
    compares `output` on `pixel_values` and prints a summary with `metric` (result key, name); then every rank
    waits for the others and the process group closes."""
    if training_args.do_train and trainer.is_world_process_zero():
        difference = check_reload(trainer.model, auto_class, training_args.output_dir, pixel_values, output)
        results["reload_max_difference"] = difference
        key, name = metric
        print(
            f"\nsummary: validation {name} {results.get(key, float('nan')):.4f}, {time.time() - started:.0f} s, "
            f"model in {training_args.output_dir} (reloaded with {auto_class.__name__}, max {output} difference "
            f"{difference:.1e})"
        )
    finish_distributed()
    return results


def finish_distributed() -> None:
    """Wait for every rank, then close the process group: a rank that exits while another still works (e.g. rank
    0's reload check) would otherwise abort in gloo's threads at interpreter exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
