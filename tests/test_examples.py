"""The Trainer example scripts: a few steps each on small local data, offline."""

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
    pipeline,
)


sys.path.insert(0, str(PROJECT_ROOT / "examples"))
import run_image_classification  # noqa: E402
import run_object_detection  # noqa: E402
import run_semantic_segmentation  # noqa: E402


QUICK = ["--num_train_epochs", "1", "--max_train_samples", "32", "--max_eval_samples", "16", "--logging_steps", "1"]


def test_classification_trains_saves_and_reloads(tmp_path):
    results = run_image_classification.main(QUICK + ["--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert 0.0 <= saved["eval_accuracy"] <= 1.0 and saved["eval_accuracy"] == results["eval_accuracy"]
    assert results["reload_max_difference"] <= 1e-5
    assert (tmp_path / "confusion_matrix.png").exists() and (tmp_path / "preprocessor_config.json").exists()
    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert model.config.id2label[7] == "7"


def demo_image(height: int = 70, width: int = 90) -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8))


def test_segmentation_trains_saves_and_reloads_into_a_pipeline(tmp_path):
    results = run_semantic_segmentation.main(QUICK + ["--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert "eval_mean_iou" in saved and results["reload_max_difference"] <= 1e-5
    assert (tmp_path / "predictions.png").exists()
    # The saved processor is the evaluation transform: the pipeline's class map is the model's on that input.
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    masks = segmenter(demo_image())
    assert masks and all(mask["mask"].size == (90, 70) for mask in masks)
    assert {mask["label"] for mask in masks} <= set(segmenter.model.config.id2label.values())
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert (
        processor.size["height"]
        == processor.size["width"]
        == run_semantic_segmentation.parse_arguments([])[1].image_size
    )


def test_detection_trains_saves_and_reloads_into_a_pipeline(tmp_path):
    results = run_object_detection.main(QUICK + ["--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"eval_map", "eval_map_50"} <= set(saved) and results["reload_max_difference"] <= 1e-5
    assert (tmp_path / "predictions.png").exists()
    detector = pipeline("object-detection", model=str(tmp_path), threshold=0.0)
    detections = detector(demo_image())
    assert detections, "at threshold 0 every query is a detection"
    labels = set(detector.model.config.id2label.values())
    for detection in detections:
        box = detection["box"]
        assert detection["label"] in labels and 0 <= detection["score"] <= 1
        assert 0 <= box["xmin"] <= box["xmax"] <= 90 and 0 <= box["ymin"] <= box["ymax"] <= 70


def tiny_detector(flags: list[str]):
    """The detection script's new RT-DETR on the `tiny` backbone, for two classes, as `flags` configure it."""
    from example_utils import ModelArguments

    _, data_args, _, _ = run_object_detection.parse_arguments(flags)
    return run_object_detection.build_model(ModelArguments(model_name_or_path="tiny"), data_args, ["a", "b"])


@pytest.mark.parametrize(
    "flags, denoising",
    [
        ([], 20),
        (["--num_denoising", "0"], 0),
        (["--train_dir", "unused", "--image_size", "96", "--num_queries", "30"], 60),
    ],
)
def test_detection_denoising_queries_follow_the_flag(flags, denoising):
    """The demo uses 20 denoising queries; elsewhere two per object query (30 give 60); `--num_denoising` sets them."""
    model = tiny_detector(flags)
    assert model.config.num_denoising == denoising
    assert hasattr(model.model, "denoising_class_embed") == (denoising > 0)


def test_detection_loss_with_paired_giou_equals_transformers_loss():
    """The demo's RT-DETR criterion, GIoU computed pair by pair, against transformers' own on the same outputs and the
    same denoising draw: every loss term (denoising and auxiliary ones included) and the gradients."""
    model = tiny_detector([]).train()
    pixel_values = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    labels = [
        {"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.9, 0.8]])},
    ]
    paired_criterion = run_object_detection.PairedBoxRTDetrLoss
    results = []
    for loss_function in (model.loss_function, run_object_detection.rt_detr_loss_with_paired_giou):
        model.loss_function = loss_function
        model.zero_grad()
        torch.manual_seed(0)
        with mock.patch.object(
            paired_criterion, "loss_boxes", autospec=True, side_effect=paired_criterion.loss_boxes
        ) as spy:
            outputs = model(pixel_values=pixel_values, labels=labels)
        assert spy.called == (loss_function is run_object_detection.rt_detr_loss_with_paired_giou)
        outputs.loss.backward()
        results.append((outputs.loss_dict, [parameter.grad.clone() for parameter in model.parameters()]))
    (reference_terms, reference_grads), (paired_terms, paired_grads) = results
    assert paired_terms.keys() == reference_terms.keys() and any("giou_dn" in key for key in paired_terms)
    for key, value in reference_terms.items():
        torch.testing.assert_close(paired_terms[key], value, msg=key)
    for paired, reference in zip(paired_grads, reference_grads):
        torch.testing.assert_close(paired, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("classes", ["same", "other"])
def test_segmentation_fine_tunes_a_converted_upernet(classes, fixtures_dir, tmp_path, caplog):
    """From a converted paper checkpoint: the whole segmentor is kept; with other classes only the classifiers
    start anew, and the log says which."""
    sys.path.insert(0, str(PROJECT_ROOT / "conversion"))
    import convert_internimage_to_hf as converter

    converted = tmp_path / "converted"
    checkpoint = fixtures_dir / "segmentation" / "seg_tiny_t.pth"
    assert converter.main(["--checkpoint", str(checkpoint), "--output-dir", str(converted)]) == 0
    original = AutoModelForSemanticSegmentation.from_pretrained(converted)
    _, data_args, _, _ = run_semantic_segmentation.parse_arguments([])
    from example_utils import ModelArguments

    id2label = dict(original.config.id2label) if classes == "same" else {0: "sky", 1: "road", 2: "tree"}
    with caplog.at_level("INFO"):
        model = run_semantic_segmentation.build_model(
            ModelArguments(model_name_or_path=str(converted)), data_args, id2label
        )
    assert model.config.id2label == id2label
    expected, loaded = original.state_dict(), model.state_dict()
    new = {key for key in loaded if "classifier" in key and not torch.equal(loaded[key], expected[key])}
    kept = [key for key in loaded if key not in new]
    assert all(torch.equal(loaded[key], expected[key]) for key in kept)
    if classes == "same":
        assert not new and "the whole segmentor is kept" in caplog.text
    else:
        assert new == {
            f"{head}.classifier.{p}" for head in ("decode_head", "auxiliary_head") for p in ("weight", "bias")
        }
        assert "decode_head.classifier and auxiliary_head.classifier start anew" in caplog.text


@pytest.mark.parametrize(
    "script, backbone_of",
    [
        (run_semantic_segmentation, lambda model: model.backbone),
        (run_object_detection, lambda model: model.model.backbone.model),
    ],
)
def test_task_models_start_from_the_pretrained_internimage(script, backbone_of, tmp_path):
    from example_utils import ModelArguments

    from modeling_internimage import InternImageConfig, InternImageModel

    torch.manual_seed(0)
    pretrained = InternImageModel(InternImageConfig(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8]))
    pretrained.save_pretrained(tmp_path)
    _, data_args, _, _ = script.parse_arguments([])
    labels = {0: "a", 1: "b", 2: "c"} if script is run_semantic_segmentation else ["a", "b", "c"]
    model = script.build_model(ModelArguments(model_name_or_path=str(tmp_path)), data_args, labels)
    expected, loaded = pretrained.state_dict(), backbone_of(model).state_dict()
    shared = [key for key in loaded if key in expected]
    assert len(shared) == len(loaded)
    assert all(torch.equal(loaded[key], expected[key]) for key in shared)


def test_output_directory_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty; pass --overwrite_output_dir"):
        run_image_classification.main(QUICK + ["--output_dir", str(tmp_path)])
    assert [path.name for path in tmp_path.iterdir()] == ["keep.txt"]


def test_classification_under_torchrun_with_two_processes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(PROJECT_ROOT / "examples" / "run_image_classification.py"),
            *QUICK,
            "--output_dir",
            str(tmp_path),
            "--ddp_backend",
            "gloo",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "training with 2 process(es)" in result.stderr
    assert json.loads((tmp_path / "eval_results.json").read_text())["eval_accuracy"] >= 0
    AutoModelForImageClassification.from_pretrained(tmp_path)


def test_classification_under_accelerate_launch(tmp_path):
    """accelerate's DDP launcher (--multi_gpu); without GPUs its two processes train on the CPU over gloo."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29534",
            str(PROJECT_ROOT / "examples" / "run_image_classification.py"),
            *QUICK,
            "--output_dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "training with 2 process(es)" in result.stderr
    AutoModelForImageClassification.from_pretrained(tmp_path)


def test_push_to_hub_uploads_weights_code_config_processor_and_card(tmp_path, monkeypatch):
    import transformers.trainer as trainer_module

    uploads = []

    class CapturingHubApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"someone/{repo_id.split('/')[-1]}"})()

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, {path.name: path for path in sorted(os.scandir(folder_path), key=str)}))

    monkeypatch.setattr(trainer_module, "hf_api", lambda: CapturingHubApi())
    run_image_classification.main(QUICK + ["--output_dir", str(tmp_path / "digits-model"), "--push_to_hub"])
    repo_id, files = uploads[-1]
    assert repo_id == "someone/digits-model"
    assert {
        "model.safetensors",
        "config.json",
        "modeling_internimage.py",
        "configuration_internimage.py",
        "dcnv3.py",
        "preprocessor_config.json",
        "README.md",
    } <= set(files)
    config = json.loads(open(files["config.json"].path).read())
    assert (
        config["auto_map"]["AutoModelForImageClassification"]
        == "modeling_internimage.InternImageForImageClassification"
    )
    assert "image-classification" in open(files["README.md"].path).read()


def write_image_folder(root, classes: list[str], images_per_class: int = 3):
    for name in classes:
        (root / name).mkdir(parents=True)
        for idx in range(images_per_class):
            pixels = np.random.default_rng(idx).integers(0, 255, size=(20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{idx}.png")


def test_bad_classification_arguments_stop_before_training(tmp_path):
    with pytest.raises(SystemExit, match="--image_column_name 'picture' is not a column"):
        run_image_classification.main(QUICK + ["--image_column_name", "picture", "--output_dir", str(tmp_path / "a")])
    write_image_folder(tmp_path / "one_class", ["cat"])
    with pytest.raises(SystemExit, match=r"has 1 class \(cat\); classification needs at least two"):
        run_image_classification.main(
            QUICK + ["--train_dir", str(tmp_path / "one_class"), "--output_dir", str(tmp_path / "b")]
        )
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images")
    with pytest.raises(SystemExit, match="holds no images"):
        run_image_classification.main(
            QUICK + ["--train_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "c")]
        )
    for name in "abc":
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())


def assert_trains_cat_and_dog(tmp_path, *data_flags):
    """A one-epoch classification run on local data at 32x32 whose saved model names the classes cat and dog."""
    flags = "--do_train --do_eval --num_train_epochs 1 --image_size 32 --use_cpu --report_to none".split()
    results = run_image_classification.main([*map(str, data_flags), *flags, "--output_dir", str(tmp_path / "out")])
    assert "eval_accuracy" in results
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "out").config.id2label == {0: "cat", 1: "dog"}


def test_local_image_folder_classification(tmp_path):
    write_image_folder(tmp_path / "train", ["cat", "dog"])
    write_image_folder(tmp_path / "val", ["cat", "dog"], images_per_class=2)
    assert_trains_cat_and_dog(tmp_path, "--train_dir", tmp_path / "train", "--validation_dir", tmp_path / "val")


def test_detection_box_outside_its_image_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "train" / "a.png")
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "train" / "b.png")
    rows = [
        {"file_name": "a.png", "image_id": 0, "objects": {"bbox": [[2.0, 2.0, 10.0, 10.0]], "category": [0]}},
        {"file_name": "b.png", "image_id": 1, "objects": {"bbox": [[30.0, 5.0, 20.0, 10.0]], "category": [1]}},
    ]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(SystemExit, match=r"box \[30.0, 5.0, 20.0, 10.0\] \(x, y, w, h\) lies outside its 40x40 image"):
        run_object_detection.main(
            [
                "--train_dir",
                str(tmp_path / "train"),
                "--train_val_split",
                "0.5",
                "--output_dir",
                str(tmp_path / "out"),
                "--use_cpu",
            ]
        )


def test_segmentation_folders_need_masks(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "train" / "images" / "x.png")
    with pytest.raises(SystemExit, match="no mask in .* for x.png"):
        run_semantic_segmentation.main(["--train_dir", str(tmp_path / "train"), "--output_dir", str(tmp_path / "o")])


def test_classification_uses_the_hub_kernel_when_asked(tmp_path, caplog):
    """--use_hub_kernels goes through use_hub_kernels; offline without a cached kernel it falls back and trains."""
    with caplog.at_level("WARNING", logger="modeling_internimage.hub_kernels"):
        results = run_image_classification.main(QUICK + ["--use_hub_kernels", "--output_dir", str(tmp_path)])
    fallbacks = [r for r in caplog.records if r.name == "modeling_internimage.hub_kernels"]
    assert len(fallbacks) == 1 and "keeps the PyTorch DCNv3 operator" in fallbacks[0].getMessage()
    assert torch.isfinite(torch.tensor(results["eval_loss"]))


# --- bad input to the examples: a clear error before training, or a run that works -----------------------------


def write_segmentation_folder(root, count=4, size=32, mask_mode="L", classes=3):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for idx in range(count):
        Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)).save(
            root / "images" / f"{idx}.png"
        )
        mask = Image.fromarray((np.arange(size * size).reshape(size, size) % classes).astype(np.uint8))
        mask.convert(mask_mode).save(root / "masks" / f"{idx}.png")


def write_detection_folder(root, rows):
    root.mkdir(parents=True)
    for idx in range(2):
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(root / f"{idx}.png")
    (root / "metadata.jsonl").write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows))


GOOD_RECORD = {"file_name": "0.png", "objects": {"bbox": [[2.0, 2.0, 10.0, 10.0]], "category": [0]}}


@pytest.mark.parametrize(
    "second_record, message",
    [
        ({"file_name": "1.png"}, "line 2: each record needs 'objects'"),
        ({"file_name": "1.png", "objects": {"bbox": [[1, 1, 5, 5]]}}, "line 2: each record needs 'objects' with"),
        (
            {"file_name": "1.png", "objects": {"bbox": [[1, 1, 5]], "category": [0]}},
            r"line 2: bbox \[1, 1, 5\] is not",
        ),
        ({"file_name": "1.png", "objects": {"bbox": [[1, 1, 5, 5]], "category": ["cat"]}}, "line 2: category 'cat'"),
        ("{not json", "line 2: not valid JSON"),
    ],
)
def test_detection_metadata_problems_name_file_and_line(second_record, message, tmp_path):
    write_detection_folder(tmp_path / "train", [GOOD_RECORD, second_record])
    with pytest.raises(SystemExit, match=f"metadata.jsonl, {message}"):
        run_object_detection.main(["--train_dir", str(tmp_path / "train"), "--output_dir", str(tmp_path / "out")])


def test_detection_metadata_without_any_object_is_refused(tmp_path):
    empty = {"file_name": "1.png", "objects": {"bbox": [], "category": []}}
    write_detection_folder(tmp_path / "train", [{**empty, "file_name": "0.png"}, empty])
    with pytest.raises(SystemExit, match="has no objects at all"):
        run_object_detection.main(["--train_dir", str(tmp_path / "train"), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize(
    "script, flags, message",
    [
        (
            run_object_detection,
            ["--num_queries", "300"],
            "--num_queries 300 must lie between 1 and the 189 encoder tokens",
        ),
        (run_object_detection, ["--num_queries", "0"], "--num_queries 0 must lie between 1"),
        (run_object_detection, ["--num_denoising", "-1"], "--num_denoising -1 must be 0"),
        (run_object_detection, ["--image_size", "0"], "--image_size 0 must be a multiple of 32"),
        (run_semantic_segmentation, ["--image_size", "0"], "--image_size 0 must be a multiple of 32"),
        (run_image_classification, ["--image_size", "0"], "--image_size 0 must be at least 32"),
        (run_image_classification, ["--max_train_samples", "0"], "--max_train_samples 0 must be at least 1"),
        (
            run_semantic_segmentation,
            ["--horizontal_flip_probability", "1.5"],
            "--horizontal_flip_probability 1.5 must lie between 0 and 1",
        ),
        (run_image_classification, ["--horizontal_flip_probability", "-1"], "must lie between 0 and 1"),
        (run_image_classification, ["--horizontal_flip_probability", "nan"], "nan must lie between 0 and 1"),
        (run_semantic_segmentation, ["--per_device_train_batch_size", "1"], "must be 2 or more"),
        (run_image_classification, ["--model_name_or_path", "./no/such/model"], "is neither an existing directory"),
        (run_object_detection, ["--model_name_or_path", "/no/such/dir"], "is neither an existing directory"),
    ],
)
def test_bad_flags_stop_before_training(script, flags, message, tmp_path):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        script.main(flags + ["--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("script", [run_semantic_segmentation, run_object_detection])
def test_id2label_file_with_gaps_is_refused(script, tmp_path):
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "background", "2": "cat"}))
    with pytest.raises(SystemExit, match="without gaps"):
        script.main(["--id2label_file", str(tmp_path / "id2label.json"), "--output_dir", str(tmp_path / "out")])


def test_segmentation_refuses_colour_masks(tmp_path):
    write_segmentation_folder(tmp_path / "train", mask_mode="RGB")
    with pytest.raises(SystemExit, match="single-channel class-index images .* got a RGB mask"):
        run_semantic_segmentation.main(["--train_dir", str(tmp_path / "train"), "--output_dir", str(tmp_path / "o")])


def test_segmentation_refuses_mask_values_beyond_the_classes(tmp_path):
    write_segmentation_folder(tmp_path / "train", classes=5)
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    with pytest.raises(SystemExit, match="train masks hold class id 4, but there are 3 classes"):
        run_semantic_segmentation.main(
            [
                "--train_dir",
                str(tmp_path / "train"),
                "--id2label_file",
                str(tmp_path / "id2label.json"),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )


def test_corrupt_image_is_named_before_training(tmp_path):
    write_segmentation_folder(tmp_path / "train")
    damaged = tmp_path / "train" / "images" / "2.png"
    damaged.write_bytes(damaged.read_bytes()[:60])
    with pytest.raises(SystemExit, match="2.png is not a readable image"):
        run_semantic_segmentation.main(["--train_dir", str(tmp_path / "train"), "--output_dir", str(tmp_path / "o")])


@pytest.mark.parametrize("script", [run_semantic_segmentation, run_object_detection])
def test_a_last_batch_of_one_sample_trains(script, tmp_path):
    """17 training samples in batches of 4: the last batch would hold one image, which BatchNorm cannot train on."""
    results = script.main(
        [
            "--max_train_samples",
            "17",
            "--max_eval_samples",
            "4",
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert np.isfinite(json.loads((tmp_path / "train_results.json").read_text())["train_loss"])
    assert "reload_max_difference" in results


def test_classification_with_named_labels_and_trainer_defaults(tmp_path):
    """Labels as names in a metadata.jsonl, and Trainer's default --remove_unused_columns true."""
    train = tmp_path / "train"
    train.mkdir()
    rows = []
    for idx in range(8):
        Image.fromarray(np.full((20, 20, 3), 30 * idx, dtype=np.uint8)).save(train / f"{idx}.png")
        rows.append({"file_name": f"{idx}.png", "label": "cat" if idx % 2 else "dog"})
    (train / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    assert_trains_cat_and_dog(tmp_path, "--train_dir", train, "--train_val_split", "0.25")


def test_detection_output_loads_as_remote_code_without_the_package(tmp_path):
    from test_composite_remote_code import load_without_the_package

    run_object_detection.main(QUICK + ["--output_dir", str(tmp_path / "out"), "--max_train_samples", "8"])
    model = AutoModelForObjectDetection.from_pretrained(tmp_path / "out").eval()
    pixel_values = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = model(pixel_values).logits
    actual = load_without_the_package("AutoModelForObjectDetection", tmp_path / "out", pixel_values, tmp_path)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("script", [run_semantic_segmentation, run_object_detection])
def test_dense_runs_are_deterministic_for_a_seed(script, tmp_path):
    """Same --seed, same metrics and weights (model init, albumentations' own generator, Trainer's shuffling);
    another seed, other weights."""
    from safetensors.torch import load_file

    def run(name: str, seed: int) -> tuple[dict, dict]:
        results = script.main(QUICK + ["--output_dir", str(tmp_path / name), "--seed", str(seed)])
        return results, load_file(tmp_path / name / "model.safetensors")

    (first, first_weights), (second, second_weights) = run("a", 3), run("b", 3)
    timings = ("runtime", "per_second", "time")
    metrics = [key for key in first if key.startswith("eval_") and not any(word in key for word in timings)]
    assert metrics and all(first[key] == second[key] for key in metrics), {k: (first[k], second[k]) for k in metrics}
    assert all(torch.equal(first_weights[key], second_weights[key]) for key in first_weights)
    _, other_weights = run("c", 4)
    assert not all(torch.equal(first_weights[key], other_weights[key]) for key in first_weights)


def augmented_epochs(seed: int, tmp_path) -> list[list[torch.Tensor]]:
    """Two epochs of the segmentation example's training transform over copies of one image, loaded by two
    DataLoader workers (one batch of two each), as the Trainer loads with --dataloader_num_workers 2."""
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    data_args = run_semantic_segmentation.parse_arguments(["--output_dir", str(tmp_path)])[1]
    mask = Image.fromarray(np.arange(70 * 90, dtype=np.uint8).reshape(70, 90) % 3)
    columns = {data_args.image_column_name: [demo_image()] * 4, data_args.label_column_name: [mask] * 4}
    features = Features({name: ImageFeature() for name in columns})
    dataset = Dataset.from_dict(columns, features=features)
    dataset.set_transform(run_semantic_segmentation.make_transforms(data_args, seed)[0])
    torch.manual_seed(seed)  # what the Trainer's set_seed does; DataLoader draws each epoch's worker seeds from it
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=2, collate_fn=run_semantic_segmentation.collate
    )
    return [[batch["pixel_values"] for batch in loader] for _ in range(2)]


def test_data_workers_draw_their_own_augmentations_repeatably(tmp_path):
    """Each worker process starts with a copy of the parent's albumentations generator: unless the examples reseed
    it per worker, both workers (same image) and both epochs would see identical crops and flips."""
    first_epoch, second_epoch = augmented_epochs(0, tmp_path)
    assert not torch.equal(first_epoch[0], first_epoch[1])  # batch 0 from worker 0, batch 1 from worker 1
    assert not any(torch.equal(first, second) for first, second in zip(first_epoch, second_epoch))
    again = augmented_epochs(0, tmp_path)
    assert all(torch.equal(first, repeat) for first, repeat in zip(first_epoch + second_epoch, again[0] + again[1]))


def test_compiled_training_switches_off_inductors_reordering_for_peak_memory(tmp_path):
    """The examples' workaround for torch 2.13's compiled UperNet training with zero gradients (reproduced in
    tests/test_compile.py): set for compiled training only."""
    import torch._inductor.config as inductor_config
    from datasets import Dataset, DatasetDict
    from example_utils import make_trainer
    from transformers import TrainingArguments

    splits = DatasetDict({split: Dataset.from_dict({"x": [1.0, 2.0]}) for split in ("train", "validation")})
    for compiled in (False, True):
        # patch() restores the process's setting afterwards (monkeypatch's undo removed the config entry)
        with inductor_config.patch(reorder_for_peak_memory=True):
            args = TrainingArguments(output_dir=str(tmp_path), do_train=True, torch_compile=compiled, report_to="none")
            make_trainer(torch.nn.Linear(1, 1), args, splits, (None, None))
            assert inductor_config.reorder_for_peak_memory is not compiled
