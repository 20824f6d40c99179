"""Agreement with outputs of the original implementation (../shared/fixtures/original)."""

import json

import pytest
import torch
from conftest import MODEL_FIXTURES, VARIANTS, load_fixture_case
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageClassification

from modeling_internimage import (
    InternImageBackbone,
    InternImageConfig,
    InternImageForImageClassification,
    InternImageModel,
    convert_original_key,
    dcnv3_core_pytorch,
)


OP_PARAMS = (
    "kernel_h",
    "kernel_w",
    "stride_h",
    "stride_w",
    "pad_h",
    "pad_w",
    "dilation_h",
    "dilation_w",
    "group",
    "group_channels",
    "offset_scale",
    "remove_center",
)
HUB_CONFIG_OF_VARIANT = {
    "t": "internimage_t_1k_224",
    "s": "internimage_s_1k_224",
    "b": "internimage_b_1k_224",
    "l": "internimage_l_22kto1k_384",
    "xl": "internimage_xl_22kto1k_384",
    "h": "internimage_h_22kto1k_640",
    "g": "internimage_g_22kto1k_512",
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def classifier_from_fixture(name: str) -> tuple[InternImageForImageClassification, dict, dict]:
    description, state_dict, io = load_fixture_case(name)
    config = InternImageConfig(**description["original_constructor_kwargs"])
    model = InternImageForImageClassification(config).eval()
    model.load_original_state_dict(state_dict)
    return model, description, io


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_model_matches_original(name, fixtures_dir):
    model, description, io = classifier_from_fixture(name)
    assert sum(p.numel() for p in model.parameters()) == description["num_parameters"]
    backbone = InternImageBackbone(
        InternImageConfig(**description["original_constructor_kwargs"], out_indices=[1, 2, 3, 4])
    ).eval()
    backbone.load_state_dict(model.internimage.state_dict(), strict=False)
    for idx in range(len(description["inputs"])):
        pixel_values = io[f"input{idx}.pixel_values"]
        with torch.no_grad():
            outputs = model(pixel_values, output_hidden_states=True)
            pooled = model.internimage(pixel_values).pooler_output
            feature_maps = backbone(pixel_values).feature_maps
        torch.testing.assert_close(outputs.logits, io[f"input{idx}.logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(pooled, io[f"input{idx}.pooled"], atol=1e-4, rtol=0)
        assert len(outputs.hidden_states) == 5
        for stage in range(4):
            expected = io[f"input{idx}.stage{stage}"]
            torch.testing.assert_close(outputs.hidden_states[stage + 1], expected, atol=1e-4, rtol=0)
            torch.testing.assert_close(feature_maps[stage], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "case",
    ["basic", "dilation2", "kernel5", "offset_scale2", "remove_center", "single_channel", "stride2", "wide_group"],
)
def test_dcnv3_op_matches_original(case, fixtures_dir):
    with safe_open(fixtures_dir / "dcnv3_op" / f"{case}.safetensors", "pt") as f:
        params = json.loads(f.metadata()["params"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    inputs = [tensors[key].clone().requires_grad_() for key in ("input", "offset", "mask")]
    output = dcnv3_core_pytorch(*inputs, *(params[key] for key in OP_PARAMS))
    output.backward(tensors["grad_output"])
    assert relative_error(output, tensors["output"]) <= 1e-5
    for tensor, key in zip(inputs, ("grad_input", "grad_offset", "grad_mask")):
        assert relative_error(tensor.grad, tensors[key]) <= 1e-5, key


@pytest.mark.parametrize("case", ["basic", "remove_center", "wide_group"])
def test_dcnv3_op_with_softmax_is_the_op_on_softmax_weights(case, fixtures_dir):
    """`softmax=True` (how InternImage calls the operator) normalises the mask over each group's points, as the
    original module's `F.softmax` before its operator; values and gradients through the logits."""
    with safe_open(fixtures_dir / "dcnv3_op" / f"{case}.safetensors", "pt") as f:
        params = json.loads(f.metadata()["params"])
        value, offset = f.get_tensor("input"), f.get_tensor("offset")
    settings = [params[key] for key in OP_PARAMS]
    torch.manual_seed(0)
    logits = (4 * torch.randn(offset.shape[:-1] + (offset.shape[-1] // 2,), dtype=torch.float64)).requires_grad_()
    weights = torch.softmax(logits.unflatten(-1, (params["group"], -1)), -1).flatten(-2)
    value, offset = value.double(), offset.double()
    expected = dcnv3_core_pytorch(value, offset, weights, *settings)
    output = dcnv3_core_pytorch(value, offset, logits, *settings, softmax=True)
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=1e-12)
    grad_output = torch.randn_like(output)
    (expected_grad,) = torch.autograd.grad(expected, logits, grad_output)
    (grad,) = torch.autograd.grad(output, logits, grad_output)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_released_architecture_matches_manifest(variant, fixtures_dir):
    manifest = json.loads((fixtures_dir / "manifests" / f"internimage_{variant}.json").read_text())
    config = AutoConfig.from_pretrained(fixtures_dir / "opengvlab_hub_configs" / HUB_CONFIG_OF_VARIANT[variant])
    with torch.device("meta"):
        model = InternImageForImageClassification(config)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]

    model_shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    mapped = {}
    for key, shape in manifest["state_dict_shapes"].items():
        name = convert_original_key(key)
        name = name if name.startswith("classifier.") else f"internimage.{name}"
        assert name not in mapped, f"{key} and {mapped.get(name)} map to the same weight {name}"
        mapped[name] = key
        assert model_shapes.get(name) == list(shape), f"{key} -> {name}: {model_shapes.get(name)} vs {shape}"
    assert set(mapped) == set(model_shapes)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_preset_equals_published_config(variant, fixtures_dir):
    published = AutoConfig.from_pretrained(fixtures_dir / "opengvlab_hub_configs" / HUB_CONFIG_OF_VARIANT[variant])
    preset = InternImageConfig.from_variant(variant)
    fields = (
        "channels",
        "depths",
        "groups",
        "layer_scale",
        "offset_scale",
        "post_norm",
        "res_post_norm",
        "level2_post_norm",
        "level2_post_norm_block_ids",
        "center_feature_scale",
        "use_clip_projector",
        "remove_center",
        "mlp_ratio",
        "cls_scale",
    )
    for field in fields:
        assert getattr(preset, field) == getattr(published, field), field
    assert (preset.dw_kernel_size or 3) == (published.dw_kernel_size or 3)


@pytest.mark.parametrize("name", ["tiny_s", "tiny_l"])
def test_opengvlab_hub_layout_loads_with_auto_class(name, fixtures_dir):
    model, info = AutoModelForImageClassification.from_pretrained(
        fixtures_dir / "opengvlab_hub_format" / name, output_loading_info=True
    )
    assert isinstance(model, InternImageForImageClassification)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _, _, io = load_fixture_case(name)
    with torch.no_grad():
        logits = model(io["input0.pixel_values"]).logits
    torch.testing.assert_close(logits, io["input0.logits"], atol=1e-4, rtol=0)


def test_opengvlab_hub_layout_state_dict_loads_strictly(fixtures_dir):
    from safetensors.torch import load_file

    _, _, io = load_fixture_case("tiny_s")
    config = AutoConfig.from_pretrained(fixtures_dir / "opengvlab_hub_format" / "tiny_s")
    model = InternImageForImageClassification(config).eval()
    model.load_original_state_dict(load_file(fixtures_dir / "opengvlab_hub_format" / "tiny_s" / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(io["input0.pixel_values"]).logits, io["input0.logits"], atol=1e-4, rtol=0)


def test_published_config_fields_are_read(fixtures_dir):
    config = AutoConfig.from_pretrained(fixtures_dir / "opengvlab_hub_configs" / "internimage_l_22k_384")
    assert isinstance(config, InternImageConfig)
    assert config.num_labels == 21841
    assert config.offset_scale == 2.0
    assert set(config.auto_map.values()) <= {
        "configuration_internimage.InternImageConfig",
        "modeling_internimage.InternImageModel",
    }


def test_base_model_loads_backbone_weights_of_classifier(tmp_path):
    model, _, io = classifier_from_fixture("tiny_t")
    model.save_pretrained(tmp_path)
    base = InternImageModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        stage4 = base(io["input0.pixel_values"]).last_hidden_state
    torch.testing.assert_close(stage4, io["input0.stage3"], atol=1e-4, rtol=0)
