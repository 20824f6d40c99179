"""conversion/convert_internimage_to_hf.py on every kind of original checkpoint (../shared/fixtures/original)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import MODEL_FIXTURES, PROJECT_ROOT, VARIANTS, load_fixture_case, run_as_remote_code
from safetensors import safe_open
from transformers import AutoModelForImageClassification

from modeling_internimage import InternImageBackbone, InternImageConfig, InternImageForImageClassification


sys.path.insert(0, str(PROJECT_ROOT / "conversion"))
import convert_internimage_to_hf as converter  # noqa: E402
from original_state_dict import convert_original_state_dict  # noqa: E402


SCRIPT = PROJECT_ROOT / "conversion" / "convert_internimage_to_hf.py"


def convert(*args) -> int:
    return converter.main([str(arg) for arg in args])


def fixture_args(fixtures_dir, name, output_dir, *extra):
    """Converter arguments for a model fixture's state dict and constructor JSON."""
    models = fixtures_dir / "models"
    return ["--checkpoint", models / f"{name}.safetensors", "--original-config", models / f"{name}.json",
            "--output-dir", output_dir, *extra]  # fmt: skip


def assert_logits_match_fixture(model_dir, name):
    _, _, io = load_fixture_case(name)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(io["input0.pixel_values"]).logits
    torch.testing.assert_close(logits, io["input0.logits"], atol=1e-4, rtol=0)


def assert_nothing_written(parent, name):
    assert not (parent / name).exists()
    assert not [path for path in parent.iterdir() if path.name.startswith(f".{name}.")], "staging left behind"


def test_raw_training_checkpoint_converts_from_the_command_line(fixtures_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--checkpoint",
            str(fixtures_dir / "raw_checkpoints" / "tiny_t_classification.pth"),
            "--original-config",
            str(fixtures_dir / "models" / "tiny_t.json"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "top-5 on the fixed test image" in result.stdout
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "README.md",
        "config.json",
        "configuration_internimage.py",
        "dcnv3.py",
        "model.safetensors",
        "modeling_internimage.py",
        "preprocessor_config.json",
    ]
    assert_logits_match_fixture(tmp_path / "out", "tiny_t")


def test_checkpoint_with_pickled_training_config_converts(fixtures_dir, tmp_path):
    checkpoint = fixtures_dir / "raw_checkpoints" / "tiny_t_classification_with_config_object.pth"
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(checkpoint, weights_only=True)  # as it stands the file is refused; the converter's allow-list
    assert (
        convert(
            "--checkpoint",
            checkpoint,
            "--original-config",
            fixtures_dir / "models" / "tiny_t.json",
            "--output-dir",
            tmp_path / "out",
        )
        == 0
    )
    assert_logits_match_fixture(tmp_path / "out", "tiny_t")


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_safetensors_state_dict_with_constructor_json_converts(name, fixtures_dir, tmp_path):
    assert convert(*fixture_args(fixtures_dir, name, tmp_path / name)) == 0
    assert_logits_match_fixture(tmp_path / name, name)


def test_detection_checkpoint_becomes_a_backbone(fixtures_dir, tmp_path, capsys):
    assert (
        convert(
            "--checkpoint",
            fixtures_dir / "raw_checkpoints" / "tiny_t_mask_rcnn_coco.pth",
            "--original-config",
            fixtures_dir / "models" / "tiny_t.json",
            "--output-dir",
            tmp_path / "det",
        )
        == 0
    )
    report = capsys.readouterr().out
    for dropped in (
        "neck.lateral_convs.0.conv.weight",
        "rpn_head.rpn_conv.weight",
        "roi_head.bbox_head.fc_cls.weight",
    ):
        assert dropped in report
    backbone = InternImageBackbone.from_pretrained(tmp_path / "det").eval()
    _, _, io = load_fixture_case("tiny_t")
    with torch.no_grad():
        feature_maps = backbone(io["input0.pixel_values"]).feature_maps
    assert len(feature_maps) == 4
    for stage, feature_map in enumerate(feature_maps):
        torch.testing.assert_close(feature_map, io[f"input0.stage{stage}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["tiny_s", "tiny_l"])
def test_opengvlab_hub_layout_is_resaved_in_package_layout(name, fixtures_dir, tmp_path):
    assert convert("--checkpoint", fixtures_dir / "opengvlab_hub_format" / name, "--output-dir", tmp_path / name) == 0
    with safe_open(tmp_path / name / "model.safetensors", "pt") as weights:
        assert not [key for key in weights.keys() if key.startswith("model.")]
    assert_logits_match_fixture(tmp_path / name, name)


def test_original_training_yaml_gives_the_architecture(fixtures_dir, tmp_path):
    kwargs = json.loads((fixtures_dir / "models" / "tiny_t.json").read_text())["original_constructor_kwargs"]
    (tmp_path / "internimage_tiny.yaml").write_text(
        "DATA:\n  IMG_SIZE: 64\nMODEL:\n  TYPE: intern_image\n  NUM_CLASSES: 10\n  DROP_PATH_RATE: 0.1\n"
        "  INTERN_IMAGE:\n    CORE_OP: 'DCNv3'\n"
        f"    CHANNELS: {kwargs['channels']}\n    DEPTHS: {kwargs['depths']}\n    GROUPS: {kwargs['groups']}\n"
        "    MLP_RATIO: 4.0\n    OFFSET_SCALE: 1.0\n    POST_NORM: False\n"
    )
    assert (
        convert(
            "--checkpoint",
            fixtures_dir / "models" / "tiny_t.safetensors",
            "--original-config",
            tmp_path / "internimage_tiny.yaml",
            "--output-dir",
            tmp_path / "out",
        )
        == 0
    )
    assert_logits_match_fixture(tmp_path / "out", "tiny_t")
    processor_config = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor_config["crop_size"] == {"height": 64, "width": 64}


def test_label_names_storage_dtype_and_shards(fixtures_dir, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class number {idx}" for idx in range(10)))
    options = ["--label-file", labels, "--dtype", "bfloat16", "--max-shard-size", "5MB"]
    assert convert(*fixture_args(fixtures_dir, "tiny_h", tmp_path / "out", *options)) == 0
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    assert model.config.id2label[3] == "class number 3"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: mit" in card and "trust_remote_code=True" in card and "@inproceedings{wang2023internimage" in card


def synthetic_checkpoint(manifest: dict, path, edit=None):
    """A checkpoint with exactly the manifest's keys and shapes, zeros that take no memory (stride-0 views)."""
    state_dict = {
        key: torch.zeros((), dtype=torch.long if key.endswith("num_batches_tracked") else torch.float32).expand(shape)
        for key, shape in manifest["state_dict_shapes"].items()
    }
    if edit:
        edit(state_dict)
    torch.save({"model": state_dict}, path)
    return path


@pytest.mark.parametrize("variant", VARIANTS)
def test_released_key_layout_converts_with_variant(variant, fixtures_dir, tmp_path, capsys):
    manifest = json.loads((fixtures_dir / "manifests" / f"internimage_{variant}.json").read_text())
    checkpoint = synthetic_checkpoint(manifest, tmp_path / manifest["checkpoint_file"])
    # T is written in full; the larger ones are checked key by key without allocating their weights.
    extra = [] if variant == "t" else ["--dry-run"]
    assert convert("--checkpoint", checkpoint, "--variant", variant, "--output-dir", tmp_path / "out", *extra) == 0
    assert f"all {len(manifest['state_dict_shapes'])} keys mapped" in capsys.readouterr().out
    assert (tmp_path / "out").exists() == (variant == "t")


def _remove(key):
    return lambda state_dict: state_dict.pop(key)


def _add(key):
    return lambda state_dict: state_dict.__setitem__(key, torch.zeros(3))


def _reshape(key):
    return lambda state_dict: state_dict.__setitem__(key, torch.zeros(7, 7))


@pytest.mark.parametrize(
    "edit, named",
    [
        (_remove("levels.2.blocks.5.dcn.offset.weight"), "internimage.encoder.stages.2.layers.5.dcn.offset.weight"),
        (_add("levels.1.blocks.0.dcn.extra_proj.weight"), "levels.1.blocks.0.dcn.extra_proj.weight"),
        (_reshape("levels.3.blocks.1.mlp.fc2.weight"), "levels.3.blocks.1.mlp.fc2.weight"),
    ],
)
def test_key_or_shape_mismatch_is_named_and_nothing_is_written(edit, named, fixtures_dir, tmp_path, capsys):
    manifest = json.loads((fixtures_dir / "manifests" / "internimage_t.json").read_text())
    checkpoint = synthetic_checkpoint(manifest, tmp_path / "edited.pth", edit)
    (tmp_path / "target").mkdir()
    assert convert("--checkpoint", checkpoint, "--variant", "t", "--output-dir", tmp_path / "target" / "out") != 0
    error = capsys.readouterr().err
    assert named in error and error.count("\n") == 1
    assert_nothing_written(tmp_path / "target", "out")


@pytest.mark.parametrize("problem", ["truncated", "not_a_checkpoint", "missing", "existing_output"])
def test_bad_inputs_end_with_one_line_and_write_nothing(problem, fixtures_dir, tmp_path):
    checkpoint = fixtures_dir / "raw_checkpoints" / "tiny_t_classification.pth"
    if problem == "truncated":
        (tmp_path / "truncated.pth").write_bytes(checkpoint.read_bytes()[:200_000])
        checkpoint = tmp_path / "truncated.pth"
    elif problem == "not_a_checkpoint":
        (tmp_path / "notes.pth").write_text("not a checkpoint")
        checkpoint = tmp_path / "notes.pth"
    elif problem == "missing":
        checkpoint = tmp_path / "absent.pth"
    target = tmp_path / "out"
    if problem == "existing_output":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--checkpoint",
            str(checkpoint),
            "--original-config",
            str(fixtures_dir / "models" / "tiny_t.json"),
            "--output-dir",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    if problem == "existing_output":
        assert [path.name for path in target.iterdir()] == ["keep.txt"]
    else:
        assert_nothing_written(tmp_path, "out")


def test_overwrite_replaces_an_existing_directory(fixtures_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    assert convert(*fixture_args(fixtures_dir, "tiny_s", target, "--overwrite")) == 0
    assert not (target / "stale.txt").exists()
    assert_logits_match_fixture(target, "tiny_s")
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_failed_verification_leaves_nothing(fixtures_dir, tmp_path, monkeypatch):
    def broken_reload(model, directory):
        raise converter.ConversionError("simulated failure after writing")

    monkeypatch.setattr(converter, "verify_reload", broken_reload)
    assert (
        convert(
            "--checkpoint",
            fixtures_dir / "models" / "tiny_s.safetensors",
            "--original-config",
            fixtures_dir / "models" / "tiny_s.json",
            "--output-dir",
            tmp_path / "out",
        )
        != 0
    )
    assert_nothing_written(tmp_path, "out")


@pytest.mark.parametrize("name", ["tiny_t", "tiny_g"])
def test_converted_directory_loads_as_remote_code(name, fixtures_dir, tmp_path):
    assert convert(*fixture_args(fixtures_dir, name, tmp_path / "out")) == 0
    _, _, io = load_fixture_case(name)
    outputs = run_as_remote_code(tmp_path / "out", io["input0.pixel_values"], tmp_path)
    torch.testing.assert_close(outputs["logits"], io["input0.logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs["features"], io["input0.stage3"], atol=1e-4, rtol=0)


def test_push_to_hub_creates_repo_and_uploads_once(fixtures_dir, tmp_path, monkeypatch):
    calls = []

    class StandInHubApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploaded = {path.name: path.read_bytes() for path in folder_path.iterdir()}
            calls.append(("upload_folder", repo_id, uploaded))

    monkeypatch.setattr(converter, "HfApi", StandInHubApi)
    monkeypatch.setattr(converter, "hub_is_offline", lambda: False)  # the stand-in needs no network
    assert (
        convert(
            "--checkpoint",
            fixtures_dir / "opengvlab_hub_format" / "tiny_l",
            "--output-dir",
            tmp_path / "out",
            "--push-to-hub",
            "someone/internimage-tiny-l",
        )
        == 0
    )
    assert [call[0] for call in calls] == ["create_repo", "upload_folder"]
    assert calls[0][2]["exist_ok"] is True
    uploaded = calls[1][2]
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "modeling_internimage.py",
        "configuration_internimage.py",
        "dcnv3.py",
    } <= set(uploaded)
    assert "AutoModelForImageClassification" in json.loads(uploaded["config.json"])["auto_map"]
    assert b"someone/internimage-tiny-l" in uploaded["README.md"]


def test_batch_mode_converts_present_files_and_skips_absent(fixtures_dir, tmp_path, capsys):
    manifest = json.loads((fixtures_dir / "manifests" / "internimage_t.json").read_text())
    (tmp_path / "released").mkdir()
    synthetic_checkpoint(manifest, tmp_path / "released" / "internimage_t_1k_224.pth")
    assert convert("--batch-dir", tmp_path / "released", "--output-dir", tmp_path / "converted") == 0
    assert [path.name for path in (tmp_path / "converted").iterdir()] == ["internimage_t_1k_224"]
    assert "skipped internimage_g_22kto1k_512.pth" in capsys.readouterr().out
    config = json.loads((tmp_path / "converted" / "internimage_t_1k_224" / "config.json").read_text())
    assert config["channels"] == 64 and len(config["id2label"]) == 1000


def test_state_dict_of_another_variant_is_accounted_in_original_names():
    _, state_dict, _ = load_fixture_case("tiny_h")
    model = InternImageForImageClassification(
        InternImageConfig(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_labels=10)
    )
    with pytest.raises(ValueError, match="another variant") as error:
        convert_original_state_dict(model, state_dict)
    message = str(error.value)
    assert "checkpoint keys match no weight" in message and "model weights are not in the checkpoint" in message
    assert "levels.0.downsample.conv.weight: checkpoint (64, 32, 3, 3) vs model (32, 16, 3, 3)" in message


def test_missing_and_unexpected_keys_are_listed():
    _, state_dict, _ = load_fixture_case("tiny_t")
    with torch.device("meta"):  # as the converter checks a checkpoint: no weight allocated
        model = InternImageForImageClassification(
            InternImageConfig(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_labels=10)
        )
    broken = dict(state_dict)
    broken.pop("levels.1.blocks.0.dcn.offset.weight")
    broken["levels.9.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        convert_original_state_dict(model, broken)
    assert "levels.9.extra" in str(error.value)
    assert "internimage.encoder.stages.1.layers.0.dcn.offset.weight" in str(error.value)
