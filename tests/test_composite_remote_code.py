"""Composite models with an InternImage backbone (UperNet, RT-DETR), shared as remote code: they load with
`trust_remote_code=True` in a process where this package cannot be imported."""

import textwrap

import pytest
import torch
from conftest import run_without_the_package
from transformers import (
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
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

    auto_class, directory, inputs, outputs = sys.argv[1:]
    model = getattr(transformers, auto_class).from_pretrained(directory, trust_remote_code=True).eval()
    backbone = model.backbone if hasattr(model, "backbone") else model.model.backbone.model
    assert type(backbone).__module__.startswith("transformers_modules"), type(backbone).__module__
    with torch.no_grad():
        output = model(torch.load(inputs))
    torch.save(output.logits, outputs)
    model.save_pretrained(directory + "-saved-again")
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


def rt_detr() -> RTDetrForObjectDetection:
    config = RTDetrConfig(
        backbone_config=backbone_config(out_features=["stage2", "stage3", "stage4"]),
        encoder_in_channels=[32, 64, 128],
        encoder_hidden_dim=32,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=1,
        decoder_attention_heads=1,
        num_queries=10,
        decoder_layers=1,
        num_labels=3,
        anchor_image_size=None,
    )
    return RTDetrForObjectDetection(config)


def load_without_the_package(auto_class: str, directory, pixel_values, work_dir) -> torch.Tensor:
    return run_without_the_package(LOAD_WITHOUT_THE_PACKAGE, [auto_class, directory], pixel_values, work_dir)


@pytest.mark.parametrize(
    "build, auto_class",
    [(upernet, AutoModelForSemanticSegmentation), (rt_detr, AutoModelForObjectDetection)],
    ids=["upernet", "rt-detr"],
)
def test_composite_loads_as_remote_code_without_the_package(build, auto_class, tmp_path):
    torch.manual_seed(0)
    model = share_as_remote_code(build()).eval()
    model.save_pretrained(tmp_path / "model")
    saved = sorted(path.name for path in (tmp_path / "model").glob("*.py"))
    assert saved == ["composite_internimage.py", "configuration_internimage.py", "dcnv3.py", "modeling_internimage.py"]
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).logits
    actual = load_without_the_package(auto_class.__name__, tmp_path / "model", pixel_values, tmp_path)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Re-saved there, the directory carries its code again.
    assert (tmp_path / "model-saved-again" / "composite_internimage.py").exists()
    # transformers' own config class is untouched: another UperNet saves no code.
    assert type(model.config).__module__.endswith("composite_internimage") and UperNetConfig._auto_class is None


def test_share_as_remote_code_refuses_models_without_an_internimage_backbone():
    with pytest.raises(ValueError, match="no InternImage backbone_config"):
        share_as_remote_code(InternImageForImageClassification(backbone_config()))
