"""Composite models with an InternImage backbone (UperNet, Mask2Former, RT-DETR, D-FINE, Deformable DETR), shared
as remote code: they load with `trust_remote_code=True` in a process where this package cannot be imported, and
without it they say so."""

import json
import textwrap

import pytest
import torch
from conftest import run_without_the_package
from transformers import (
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DFineConfig,
    DFineForObjectDetection,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    RTDetrConfig,
    RTDetrForObjectDetection,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from modeling_internimage import InternImageConfig, InternImageForImageClassification, share_as_remote_code


LOAD_WITHOUT_THE_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_internimage"] = None  # the package must not be importable here
    import torch
    import transformers

    auto_class, output_name, directory, inputs, outputs = sys.argv[1:]
    model = getattr(transformers, auto_class).from_pretrained(directory, trust_remote_code=True).eval()
    (backbone,) = [module for module in model.modules() if type(module).__name__ == "InternImageBackbone"]
    assert type(backbone).__module__.startswith("transformers_modules"), type(backbone).__module__
    with torch.no_grad():
        output = model(torch.load(inputs))
    torch.save(output[output_name], outputs)
    model.save_pretrained(directory + "-saved-again")
    """
)

LOAD_WITHOUT_TRUST = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_internimage"] = None
    import torch
    import transformers

    auto_class, directory, inputs, outputs = sys.argv[1:]
    try:
        getattr(transformers, auto_class).from_pretrained(directory)
    except Exception as error:
        torch.save(f"{type(error).__name__}: {error}", outputs)
    """
)


def backbone_config(**kwargs) -> InternImageConfig:
    return InternImageConfig(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], **kwargs)


def upernet() -> UperNetForSemanticSegmentation:
    config = UperNetConfig(
        backbone_config=backbone_config(out_features=["stage1", "stage2", "stage3", "stage4"]),
        num_labels=3,
        hidden_size=16,
        auxiliary_channels=8,
    )
    return UperNetForSemanticSegmentation(config)


def mask2former() -> Mask2FormerForUniversalSegmentation:
    config = Mask2FormerConfig(
        backbone_config=backbone_config(out_features=["stage1", "stage2", "stage3", "stage4"]),
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=10,
        num_labels=3,
    )
    return Mask2FormerForUniversalSegmentation(config)


def detr_sizes(**kwargs) -> dict:
    """The small widths shared by the DETR-family test models (transformers ties the box heads of two or more
    decoder layers, and refuses one)."""
    widths = {"d_model": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 10, "decoder_layers": 2}
    return {"backbone_config": backbone_config(out_features=["stage2", "stage3", "stage4"]), "num_labels": 3,
            **widths, **kwargs}  # fmt: skip


def hybrid_encoder_detector(config_class, model_class):
    """A small RT-DETR-style detector (RT-DETR, D-FINE: a hybrid encoder over the three last stages)."""
    config = config_class(
        **detr_sizes(encoder_hidden_dim=32, encoder_in_channels=[32, 64, 128], decoder_in_channels=[32, 32, 32]),
        encoder_attention_heads=1,
        decoder_attention_heads=1,
        anchor_image_size=None,
    )
    return model_class(config)


def rt_detr() -> RTDetrForObjectDetection:
    return hybrid_encoder_detector(RTDetrConfig, RTDetrForObjectDetection)


def d_fine() -> DFineForObjectDetection:
    return hybrid_encoder_detector(DFineConfig, DFineForObjectDetection)


def deformable_detr() -> DeformableDetrForObjectDetection:
    config = DeformableDetrConfig(
        **detr_sizes(encoder_layers=1), encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=3
    )
    return DeformableDetrForObjectDetection(config)


def load_without_the_package(auto_class: str, directory, pixel_values, work_dir, output_name: str = "logits"):
    """The output `output_name` of the model in `directory` on `pixel_values`, loaded with `auto_class` and
    trust_remote_code in a process where the package cannot be imported."""
    arguments = [auto_class, output_name, directory]
    return run_without_the_package(LOAD_WITHOUT_THE_PACKAGE, arguments, pixel_values, work_dir)


COMPOSITES = [
    (upernet, AutoModelForSemanticSegmentation, "logits"),
    (mask2former, AutoModelForUniversalSegmentation, "class_queries_logits"),
    (rt_detr, AutoModelForObjectDetection, "logits"),
    (d_fine, AutoModelForObjectDetection, "logits"),
    (deformable_detr, AutoModelForObjectDetection, "logits"),
]
COMPOSITE_IDS = ["upernet", "mask2former", "rt-detr", "d-fine", "deformable-detr"]


@pytest.mark.parametrize("build, auto_class, output_name", COMPOSITES, ids=COMPOSITE_IDS)
def test_composite_loads_as_remote_code_without_the_package(build, auto_class, output_name, tmp_path):
    torch.manual_seed(0)
    model = share_as_remote_code(build()).eval()
    model.save_pretrained(tmp_path / "model")
    saved = sorted(path.name for path in (tmp_path / "model").glob("*.py"))
    assert saved == ["composite_internimage.py", "configuration_internimage.py", "dcnv3.py", "modeling_internimage.py"]
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values)[output_name]
    actual = load_without_the_package(auto_class.__name__, tmp_path / "model", pixel_values, tmp_path, output_name)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Re-saved there, the directory carries its code again.
    assert (tmp_path / "model-saved-again" / "composite_internimage.py").exists()
    # transformers' own config class is untouched: another model of the same kind saves no code.
    base_config_class = type(model.config).__mro__[1]
    assert type(model.config).__module__.endswith("composite_internimage") and base_config_class._auto_class is None
    # A model type of its own, so that transformers asks for trust_remote_code rather than using its own class.
    saved_config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved_config["model_type"] == f"{base_config_class.model_type}_internimage"
    # Where the package is imported, the directory loads without remote code, to the same outputs.
    reloaded = auto_class.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values)[output_name], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build, auto_class", [(upernet, AutoModelForSemanticSegmentation),
                                               (rt_detr, AutoModelForObjectDetection)], ids=["upernet", "rt-detr"])  # fmt: skip
def test_composite_without_trust_remote_code_asks_for_it(build, auto_class, tmp_path):
    share_as_remote_code(build()).save_pretrained(tmp_path / "model")
    arguments = [auto_class.__name__, tmp_path / "model"]
    error = run_without_the_package(LOAD_WITHOUT_TRUST, arguments, torch.zeros(1), tmp_path)
    assert error.startswith("ValueError") and "trust_remote_code=True" in error, error
    assert "KeyError" not in error


def test_rt_detr_checkpoint_layout_survives_sharing(tmp_path):
    """RT-DETR renames some weights between its checkpoint layout and its modules; a model loaded from a plain
    RT-DETR directory, then shared, saves and reloads every weight."""
    torch.manual_seed(0)
    rt_detr().save_pretrained(tmp_path / "plain")
    model = share_as_remote_code(RTDetrForObjectDetection.from_pretrained(tmp_path / "plain")).eval()
    model.save_pretrained(tmp_path / "shared")
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path / "shared").eval()
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, msg=name)


def test_share_as_remote_code_refuses_models_without_an_internimage_backbone():
    with pytest.raises(ValueError, match="no InternImage backbone_config"):
        share_as_remote_code(InternImageForImageClassification(backbone_config()))
