"""The Trainer example scripts: a few steps each on small local data, offline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT
from PIL import Image
from transformers import AutoModelForImageClassification


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


def test_segmentation_trains_saves_and_reloads(tmp_path):
    results = run_semantic_segmentation.main(QUICK + ["--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert "eval_mean_iou" in saved and results["reload_max_difference"] <= 1e-5
    assert (tmp_path / "predictions.png").exists()


def test_detection_trains_saves_and_reloads(tmp_path):
    results = run_object_detection.main(QUICK + ["--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"eval_map", "eval_map_50"} <= set(saved) and results["reload_max_difference"] <= 1e-5
    assert (tmp_path / "predictions.png").exists()


@pytest.mark.parametrize(
    "script, backbone_of",
    [(run_semantic_segmentation, lambda model: model.backbone), (run_object_detection, lambda model: model.model.backbone.model)],
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
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(PROJECT_ROOT / "examples" / "run_image_classification.py"), *QUICK, "--output_dir", str(tmp_path),
         "--ddp_backend", "gloo"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "training with 2 process(es)" in result.stderr
    assert json.loads((tmp_path / "eval_results.json").read_text())["eval_accuracy"] >= 0
    AutoModelForImageClassification.from_pretrained(tmp_path)


def test_classification_under_accelerate_launch(tmp_path):
    """accelerate's DDP launcher (--multi_gpu); without GPUs its two processes train on the CPU over gloo."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534",
         str(PROJECT_ROOT / "examples" / "run_image_classification.py"), *QUICK, "--output_dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
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
    assert {"model.safetensors", "config.json", "modeling_internimage.py", "configuration_internimage.py",
            "dcnv3.py", "preprocessor_config.json", "README.md"} <= set(files)  # fmt: skip
    config = json.loads(open(files["config.json"].path).read())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_internimage.InternImageForImageClassification"
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
        run_image_classification.main(QUICK + ["--train_dir", str(tmp_path / "one_class"), "--output_dir",
                                               str(tmp_path / "b")])  # fmt: skip
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images")
    with pytest.raises(SystemExit, match="holds no images"):
        run_image_classification.main(QUICK + ["--train_dir", str(tmp_path / "empty"), "--output_dir",
                                               str(tmp_path / "c")])  # fmt: skip
    for name in "abc":
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())


def test_local_image_folder_classification(tmp_path):
    write_image_folder(tmp_path / "train", ["cat", "dog"])
    write_image_folder(tmp_path / "val", ["cat", "dog"], images_per_class=2)
    results = run_image_classification.main(
        ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val"), "--do_train", "--do_eval",
         "--num_train_epochs", "1", "--image_size", "32", "--remove_unused_columns", "false", "--use_cpu",
         "--report_to", "none", "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    assert "eval_accuracy" in results
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "out").config.id2label == {0: "cat", 1: "dog"}


def test_detection_box_outside_its_image_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "train" / "a.png")
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "train" / "b.png")
    rows = [{"file_name": "a.png", "image_id": 0, "objects": {"bbox": [[2.0, 2.0, 10.0, 10.0]], "category": [0]}},
            {"file_name": "b.png", "image_id": 1, "objects": {"bbox": [[30.0, 5.0, 20.0, 10.0]], "category": [1]}}]  # fmt: skip
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(SystemExit, match=r"box \[30.0, 5.0, 20.0, 10.0\] \(x, y, w, h\) lies outside its 40x40 image"):
        run_object_detection.main(["--train_dir", str(tmp_path / "train"), "--train_val_split", "0.5",
                                   "--output_dir", str(tmp_path / "out"), "--use_cpu"])  # fmt: skip


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
