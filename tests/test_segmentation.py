"""The paper's UperNet segmentors: mmseg checkpoints converted to transformers' UperNetForSemanticSegmentation,
checked against the original segmentation backbone under mmsegmentation's own heads (fixtures/segmentation)."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT, VARIANTS
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

from modeling_internimage import InternImageSegmentationImageProcessor


sys.path.insert(0, str(PROJECT_ROOT / "conversion"))
import convert_internimage_to_hf as converter  # noqa: E402
from segmentation import read_config_assignments  # noqa: E402


SEGMENTATION_CASES = ["seg_tiny_t", "seg_tiny_l"]


def convert(*args) -> int:
    return converter.main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory) -> dict:
    """Each segmentation fixture converted once, from the checkpoint alone (its meta carries the config)."""
    directories = {}
    for name in SEGMENTATION_CASES:
        directory = tmp_path_factory.mktemp("segmentors") / name
        checkpoint = fixtures_dir / "segmentation" / f"{name}.pth"
        assert convert("--checkpoint", checkpoint, "--output-dir", directory) == 0
        directories[name] = directory
    return directories


@pytest.mark.parametrize("name", SEGMENTATION_CASES)
def test_converted_upernet_matches_mmsegmentation(name, converted, fixtures_dir):
    io = load_file(fixtures_dir / "segmentation" / f"{name}.io.safetensors")
    model = AutoModelForSemanticSegmentation.from_pretrained(converted[name]).eval()
    with torch.no_grad():
        logits = model(io["pixel_values"]).logits
        features = model.backbone(io["pixel_values"]).feature_maps
        auxiliary_logits = model.auxiliary_head(features)
    torch.testing.assert_close(logits, io["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(auxiliary_logits, io["auxiliary_logits"], atol=1e-4, rtol=0)
    for index, feature in enumerate(features):
        torch.testing.assert_close(feature, io[f"features.{index}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", SEGMENTATION_CASES)
def test_architecture_and_labels_come_from_the_checkpoint(name, converted, fixtures_dir):
    description = json.loads((fixtures_dir / "segmentation" / f"{name}.json").read_text())
    checkpoint = torch.load(fixtures_dir / "segmentation" / f"{name}.pth", weights_only=True)
    config = json.loads((converted[name] / "config.json").read_text())
    backbone = config["backbone_config"]
    for key in ("channels", "depths", "groups", "layer_scale", "offset_scale", "post_norm"):
        assert backbone[key] == description["backbone"][key], key
    assert config["hidden_size"] == description["decode_head_channels"]
    assert config["auxiliary_channels"] == description["auxiliary_channels"]
    assert config["pool_scales"] == [1, 2, 3, 6]
    assert [config["id2label"][str(idx)] for idx in range(len(config["id2label"]))] == list(
        checkpoint["meta"]["CLASSES"]
    )


def test_the_config_text_is_read_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    text = (
        f"import os\nos.system('touch {marker}')\nmodel = dict(backbone=dict(channels=16, depths=[1, 1]), x=(1, 2))\n"
    )
    assert read_config_assignments(text, "test") == {
        "model": {"backbone": {"channels": 16, "depths": [1, 1]}, "x": [1, 2]}
    }
    assert not marker.exists()


def mmseg_resized_shape(height: int, width: int, img_scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg's test pipeline for `img_scale=(long, short)`: mmcv `Resize(keep_ratio=True)` (rescale_size with
    `int(x * scale + 0.5)`), then `ResizeToMultiple(size_divisor=32)` (mmcv's imresize_to_multiple: ceil)."""
    long_edge, short_edge = max(img_scale), min(img_scale)
    scale = min(long_edge / max(height, width), short_edge / min(height, width))
    new_width, new_height = int(width * float(scale) + 0.5), int(height * float(scale) + 0.5)
    return int(math.ceil(new_height / 32)) * 32, int(math.ceil(new_width / 32)) * 32


@pytest.mark.parametrize("img_scale", [(2048, 512), (2560, 640), (3584, 896), (2048, 1024)])
@pytest.mark.parametrize("height, width", [(512, 683), (1024, 1366), (200, 300), (500, 4000), (333, 333), (97, 61)])
def test_processor_reproduces_the_mmseg_test_resize(img_scale, height, width):
    processor = InternImageSegmentationImageProcessor(
        size={"shortest_edge": min(img_scale), "longest_edge": max(img_scale)}
    )
    image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape[-2:]) == mmseg_resized_shape(height, width, img_scale)


def test_pipeline_gives_one_labelled_mask_per_present_class_at_the_input_size(converted):
    directory = converted["seg_tiny_t"]
    image = Image.fromarray((np.random.RandomState(0).rand(90, 130, 3) * 255).astype(np.uint8))
    processor = AutoImageProcessor.from_pretrained(directory)
    assert isinstance(processor, InternImageSegmentationImageProcessor)
    model = AutoModelForSemanticSegmentation.from_pretrained(directory).eval()
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    (class_map,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[(90, 130)])
    results = pipeline("image-segmentation", model=str(directory))(image)
    assert sorted(result["label"] for result in results) == sorted(
        model.config.id2label[idx] for idx in class_map.unique().tolist()
    )
    for result in results:
        assert result["mask"].size == (130, 90)
        label_id = model.config.label2id[result["label"]]
        assert np.array_equal(np.array(result["mask"]) > 0, (class_map == label_id).numpy())


def released_segmentor_state_dict(manifest: dict, num_classes: int = 150) -> dict[str, torch.Tensor]:
    """Keys and shapes of a released ADE20K UperNet file: the classifier's backbone keys (layer scales added where
    the segmentation config sets them), mmseg's UPerHead at width 512 and FCNHead at 256 on stage 3."""
    kwargs = manifest["original_constructor_kwargs"]
    shapes = {
        f"backbone.{key}": shape
        for key, shape in manifest["state_dict_shapes"].items()
        if key.startswith(("patch_embed.", "levels."))
    }
    if kwargs.get("layer_scale") is None and not kwargs.get("res_post_norm"):
        for key, shape in list(shapes.items()):
            if key.endswith(".norm1.0.weight") and ".blocks." in key:
                block = key.removesuffix(".norm1.0.weight")
                shapes[f"{block}.gamma1"] = shapes[f"{block}.gamma2"] = shape
    widths = [kwargs["channels"] * 2**idx for idx in range(4)]

    def conv_module(prefix, out_channels, in_channels, kernel):
        shapes[f"{prefix}.conv.weight"] = [out_channels, in_channels, kernel, kernel]
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{name}"] = [out_channels]
        shapes[f"{prefix}.bn.num_batches_tracked"] = []

    for idx in range(4):
        conv_module(f"decode_head.psp_modules.{idx}.1", 512, widths[3], 1)
    conv_module("decode_head.bottleneck", 512, widths[3] + 4 * 512, 3)
    for idx in range(3):
        conv_module(f"decode_head.lateral_convs.{idx}", 512, widths[idx], 1)
        conv_module(f"decode_head.fpn_convs.{idx}", 512, 512, 3)
    conv_module("decode_head.fpn_bottleneck", 512, 4 * 512, 3)
    conv_module("auxiliary_head.convs.0", 256, widths[2], 3)
    for head, width in (("decode_head", 512), ("auxiliary_head", 256)):
        shapes[f"{head}.conv_seg.weight"], shapes[f"{head}.conv_seg.bias"] = [num_classes, width, 1, 1], [num_classes]
    return {
        key: torch.zeros((), dtype=torch.long if key.endswith("num_batches_tracked") else torch.float32).expand(shape)
        for key, shape in shapes.items()
    }


@pytest.mark.parametrize("variant", [variant for variant in VARIANTS if variant != "g"])
def test_released_upernet_key_layout_is_accounted_for(variant, fixtures_dir, tmp_path, capsys):
    """Without their config, the released files need --variant; every key maps one to one (checked on the meta
    device: no weight is allocated)."""
    manifest = json.loads((fixtures_dir / "manifests" / f"internimage_{variant}.json").read_text())
    state_dict = released_segmentor_state_dict(manifest)
    checkpoint = tmp_path / "upernet.pth"
    torch.save({"meta": {"CLASSES": [f"class {idx}" for idx in range(150)]}, "state_dict": state_dict}, checkpoint)
    assert convert("--checkpoint", checkpoint, "--output-dir", tmp_path / "out", "--dry-run") == 2
    assert "give --variant or --original-config" in capsys.readouterr().err
    args = ("--checkpoint", checkpoint, "--variant", variant, "--output-dir", tmp_path / "out", "--dry-run")
    assert convert(*args) == 0
    assert f"UperNet segmentor with 150 classes, all {len(state_dict)} keys mapped" in capsys.readouterr().out


def test_batch_mode_converts_segmentors_beside_classifiers(fixtures_dir, tmp_path, capsys):
    from test_conversion import synthetic_checkpoint

    manifest = json.loads((fixtures_dir / "manifests" / "internimage_t.json").read_text())
    released = tmp_path / "released"
    released.mkdir()
    synthetic_checkpoint(manifest, released / "internimage_t_1k_224.pth")
    upernet = {"meta": {}, "state_dict": released_segmentor_state_dict(manifest)}
    torch.save(upernet, released / "upernet_internimage_t_512_160k_ade20k.pth")
    assert convert("--batch-dir", released, "--output-dir", tmp_path / "converted", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "classifier with 1000 classes" in out and "UperNet segmentor with 150 classes" in out
    assert "batch: 2 converted, 0 failed" in out


def test_converted_upernet_loads_as_remote_code_without_the_package(converted, fixtures_dir, tmp_path):
    from test_composite_remote_code import load_without_the_package

    io = load_file(fixtures_dir / "segmentation" / "seg_tiny_t.io.safetensors")
    logits = load_without_the_package("AutoModelForSemanticSegmentation", converted["seg_tiny_t"], io["pixel_values"],
                                      tmp_path)  # fmt: skip
    torch.testing.assert_close(logits, io["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "meta, extra, message",
    [
        ({"config": "model = dict(backbone=dict(channels=16,)\n"}, [], "the config does not parse as Python"),
        ({"config": "model = dict(backbone=dict(channels=16, offset_scal=2.0))\n"}, [], "offset_scal (did you mean"),
        ({"CLASSES": ["only", "two"]}, ["--variant", "t"], "2 class names for a decode head of 150 classes"),
    ],
)
def test_bad_segmentor_metadata_is_one_line(meta, extra, message, fixtures_dir, tmp_path, capsys):
    manifest = json.loads((fixtures_dir / "manifests" / "internimage_t.json").read_text())
    checkpoint = tmp_path / "upernet.pth"
    torch.save({"meta": meta, "state_dict": released_segmentor_state_dict(manifest)}, checkpoint)
    assert convert("--checkpoint", checkpoint, "--output-dir", tmp_path / "out", "--dry-run", *extra) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error
