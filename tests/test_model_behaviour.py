"""Behaviour a transformers user relies on: save/load, remote code, dtypes, compile/export/ONNX, clear errors."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROJECT_ROOT, load_fixture_case, run_as_remote_code
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification

import modeling_internimage.modeling_internimage as modeling
from modeling_internimage import (
    InternImageBackbone,
    InternImageConfig,
    InternImageForImageClassification,
    InternImageModel,
)


def tiny_config(**overrides) -> InternImageConfig:
    values = dict(channels=8, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_labels=5)
    return InternImageConfig(**{**values, **overrides})


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight a non-trivial value, so zero-initialised offsets cannot hide a path."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor + 0.05 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


@pytest.fixture
def classifier() -> InternImageForImageClassification:
    torch.manual_seed(0)
    return trained_like(InternImageForImageClassification(tiny_config()))


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_save_and_reload_reproduces_outputs(classifier, pixel_values, tmp_path):
    classifier.save_pretrained(tmp_path)
    saved = sorted(os.listdir(tmp_path))
    assert saved == [
        "config.json",
        "configuration_internimage.py",
        "dcnv3.py",
        "model.safetensors",
        "modeling_internimage.py",
    ]
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoBackbone"}

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is InternImageForImageClassification
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, classifier(pixel_values).logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(base(pixel_values).pooler_output, classifier.internimage(pixel_values).pooler_output)
    backbone = AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path, out_indices=[1, 2, 3, 4]))
    assert isinstance(backbone, InternImageBackbone)
    backbone = InternImageBackbone.from_pretrained(tmp_path, out_indices=[1, 2, 3, 4]).eval()
    with torch.no_grad():
        expected = classifier(pixel_values, output_hidden_states=True).hidden_states[1:]
        for actual, wanted in zip(backbone(pixel_values).feature_maps, expected):
            assert torch.equal(actual, wanted)


def test_remote_code_loads_without_the_package(classifier, pixel_values, tmp_path):
    model_dir = tmp_path / "model"
    classifier.save_pretrained(model_dir)
    outputs = run_as_remote_code(model_dir, pixel_values, tmp_path)
    with torch.no_grad():
        assert torch.equal(outputs["logits"], classifier(pixel_values).logits)
        assert torch.equal(outputs["pooled"], classifier.internimage(pixel_values).pooler_output)
        assert torch.equal(outputs["features"], classifier.internimage(pixel_values).last_hidden_state)


def test_push_to_hub_uploads_code_config_and_weights(classifier, monkeypatch):
    import transformers.utils.hub as hub

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

    uploaded = {}

    def capture_upload(self, working_dir, repo_id, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(working_dir))
        uploaded["config"] = json.loads(open(os.path.join(working_dir, "config.json")).read())

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: _EmptyCard())
    monkeypatch.setattr(type(classifier), "_upload_modified_files", capture_upload)
    classifier.push_to_hub("someone/internimage-tiny")
    assert uploaded["repo_id"] == "someone/internimage-tiny"
    assert {
        "config.json",
        "model.safetensors",
        "modeling_internimage.py",
        "configuration_internimage.py",
        "dcnv3.py",
    } <= set(uploaded["files"])
    assert uploaded["config"]["auto_map"]["AutoBackbone"] == "modeling_internimage.InternImageBackbone"


class _EmptyCard:
    def save(self, path):
        open(path, "w").write("---\nlibrary_name: transformers\n---\n")


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_forward_agrees_with_float32(dtype, tolerance):
    model, _, io = _fixture_model("tiny_h")
    pixel_values = io["input0.pixel_values"]
    with torch.no_grad():
        reference = model(pixel_values).logits
        half = model.to(dtype)(pixel_values.to(dtype)).logits
    assert half.dtype == dtype
    scale = reference.abs().max()
    assert ((half.float() - reference).abs().max() / scale).item() < tolerance


# Where torch has oneDNN the fast path must be live: these tests fail, not skip, if the op's check rejects it.
requires_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


def _op_calls(run, op_name: str) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    return sum(event.count for event in profiler.key_averages() if event.key == op_name)


@requires_onednn
def test_cpu_inference_runs_linear_layers_on_onednn_with_plain_results(classifier, pixel_values, monkeypatch):
    linear_layers = [module for module in classifier.modules() if isinstance(module, modeling.InternImageLinear)]
    gelus = [module for module in classifier.modules() if isinstance(module, torch.nn.GELU)]
    mlps = [module for module in classifier.modules() if isinstance(module, modeling.InternImageMLP)]
    with torch.no_grad():
        fast = classifier(pixel_values).logits
        assert _op_calls(lambda: classifier(pixel_values), "mkldnn::_linear_pointwise") == len(linear_layers)
        # Every GELU but the MLPs' (fused into fc1) runs on its own.
        assert _op_calls(lambda: classifier(pixel_values), "aten::gelu") == len(gelus) - len(mlps)
        monkeypatch.setattr(modeling, "runs_on_onednn", lambda *args: False)
        plain = classifier(pixel_values).logits
        assert _op_calls(lambda: classifier(pixel_values), "mkldnn::_linear_pointwise") == 0
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_a_onednn_op_that_disagrees_with_aten_is_not_used(classifier, pixel_values, monkeypatch):
    """The oneDNN op is private to torch: one whose meaning changed must leave the model on ATen, not corrupt it."""
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, b, *post_op: F.linear(x, w, b))
    modeling.onednn_linear_op.cache_clear()
    try:
        assert modeling.onednn_linear_op() is None
        with torch.no_grad():
            calls = _op_calls(lambda: classifier(pixel_values), "aten::linear")
        assert calls == len([module for module in classifier.modules() if isinstance(module, torch.nn.Linear)])
    finally:
        modeling.onednn_linear_op.cache_clear()


@requires_onednn
def test_the_onednn_check_does_not_follow_the_default_dtype():
    previous = torch.get_default_dtype()
    modeling.onednn_linear_op.cache_clear()
    try:
        torch.set_default_dtype(torch.float64)  # oneDNN has no float64 linear: a probe in float64 would fail
        assert modeling.onednn_linear_op() is not None
    finally:
        torch.set_default_dtype(previous)
        modeling.onednn_linear_op.cache_clear()


@requires_onednn
def test_fused_mlp_computes_the_exact_gelu(classifier, monkeypatch):
    mlp = classifier.internimage.encoder.stages[0].layers[0].mlp
    hidden_states = 3 * torch.randn(2, 16, 16, mlp.fc1.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = mlp(hidden_states)
        monkeypatch.setattr(modeling, "runs_on_onednn", lambda *args: False)
        torch.testing.assert_close(fused, mlp(hidden_states), atol=1e-5, rtol=1e-5)


@requires_onednn
@pytest.mark.parametrize("wanted", ["weights", "pixels"])
def test_linear_layers_keep_autograd_where_gradients_are_wanted(classifier, pixel_values, wanted):
    if wanted == "pixels":  # saliency on a frozen model
        classifier.requires_grad_(False)
        pixel_values.requires_grad_()
    calls = _op_calls(lambda: classifier(pixel_values).logits.sum().backward(), "mkldnn::_linear_pointwise")
    assert calls == 0
    fc1 = classifier.internimage.encoder.stages[0].layers[0].mlp.fc1
    gradient = pixel_values.grad if wanted == "pixels" else fc1.weight.grad
    assert gradient is not None and gradient.abs().sum() > 0


@requires_onednn
def test_hooks_on_the_mlp_still_fire_in_cpu_inference(classifier, pixel_values):
    fc1 = classifier.internimage.encoder.stages[0].layers[0].mlp.fc1
    captured = []
    fc1.register_forward_hook(lambda module, args, output: captured.append((args[0], output)))
    with torch.no_grad():
        classifier(pixel_values)
    ((inputs, output),) = captured
    torch.testing.assert_close(output, F.linear(inputs, fc1.weight, fc1.bias))  # before the activation


@requires_onednn
def test_accelerate_hooks_on_the_mlp_still_run_in_cpu_inference(classifier, pixel_values):
    """accelerate's offloading wraps `forward` itself (no torch hook): the fused fc1+GELU must not go around it."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    hook = CountingHook()
    add_hook_to_module(classifier.internimage.encoder.stages[0].layers[0].mlp.fc1, hook)
    with torch.no_grad():
        classifier(pixel_values)
    assert hook.calls == 1


@requires_onednn
def test_cpu_autocast_keeps_the_plain_linear_layers(classifier, pixel_values):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _op_calls(lambda: classifier(pixel_values), "mkldnn::_linear_pointwise") == 0


def _fixture_model(name):
    description, state_dict, io = load_fixture_case(name)
    model = InternImageForImageClassification(InternImageConfig(**description["original_constructor_kwargs"]))
    model.load_original_state_dict(state_dict)
    return model.eval(), description, io


def test_torch_compile_matches_eager(classifier, pixel_values):
    compiled = torch.compile(classifier, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(pixel_values).logits, classifier(pixel_values).logits, atol=1e-5, rtol=1e-5
        )


def test_torch_export_runs_and_matches(classifier, pixel_values):
    exported = torch.export.export(classifier, args=(), kwargs={"pixel_values": pixel_values})
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(pixel_values=pixel_values).logits, classifier(pixel_values).logits
        )


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, _, io = _fixture_model("tiny_g")
    pixel_values = io["input0.pixel_values"]

    class LogitsOnly(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values).logits

    path = tmp_path / "internimage.onnx"
    torch.onnx.export(
        LogitsOnly(model),
        (pixel_values,),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamo=True,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": pixel_values.numpy()})
    np.testing.assert_allclose(logits, io["input0.logits"].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.randn(1, 4, 32, 32), "4 channels"),
        (torch.randn(3, 32, 32), "4-D"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "floating-point"),
        (torch.randn(1, 32, 32, 3), "channels"),
    ],
)
def test_bad_pixel_values_are_named(classifier, pixel_values, message):
    with pytest.raises(ValueError, match=message):
        classifier(pixel_values)


def test_clip_head_needs_sides_multiple_of_32():
    model, _, _ = _fixture_model("tiny_g")
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))
    backbone = InternImageBackbone(model.config)
    assert len(backbone(torch.randn(1, 3, 48, 64)).feature_maps) == 1


def test_state_dict_of_another_variant_is_rejected():
    _, state_dict, _ = load_fixture_case("tiny_h")
    model = InternImageForImageClassification(tiny_config(num_labels=10))
    with pytest.raises(ValueError, match="another variant") as error:
        model.load_original_state_dict(state_dict)
    message = str(error.value)
    assert "checkpoint keys match no weight" in message and "model weights are not in the checkpoint" in message
    assert "levels.0.downsample.conv.weight: checkpoint (64, 32, 3, 3) vs model (16, 8, 3, 3)" in message


def test_missing_and_unexpected_keys_are_listed():
    _, state_dict, _ = load_fixture_case("tiny_t")
    model = InternImageForImageClassification(
        InternImageConfig(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_labels=10)
    )
    broken = dict(state_dict)
    broken.pop("levels.1.blocks.0.dcn.offset.weight")
    broken["levels.9.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        model.load_original_state_dict(broken)
    assert "levels.9.extra" in str(error.value)
    assert "internimage.encoder.stages.1.layers.0.dcn.offset.weight" in str(error.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(channels=10, groups=[3, 2, 4, 8]), "groups"),
        (dict(depths=[1, 1, 2]), "depths"),
        (dict(level2_post_norm=True, level2_post_norm_block_ids=[5]), "level2_post_norm_block_ids"),
        (dict(norm_layer="GN"), "norm_layer"),
        (dict(act_layer="tanh"), "act_layer"),
        (dict(core_op="DCNv4"), "core_op"),
        (dict(res_post_norm=True, layer_scale=1.0), "res_post_norm"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_init_weights_follow_the_original():
    config = tiny_config(layer_scale=1e-5, post_norm=True, center_feature_scale=True)
    model = InternImageForImageClassification(config)
    layer = model.internimage.encoder.stages[1].layers[0]
    for projection in (layer.dcn.offset, layer.dcn.mask, layer.dcn.center_feature_scale_proj):
        assert torch.count_nonzero(projection.weight) == 0 and torch.count_nonzero(projection.bias) == 0
    bound = (6 / (2 * 16)) ** 0.5  # xavier-uniform for a 16x16 projection
    assert 0 < layer.dcn.input_proj.weight.abs().max() <= bound
    assert torch.all(layer.layer_scale1 == 1e-5)
    assert layer.mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_missing_weights_are_initialised_after_loading(tmp_path):
    config = tiny_config(layer_scale=1e-5, post_norm=True)
    source = trained_like(InternImageForImageClassification(config))
    source.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    dropped = [key for key in weights if ".dcn.offset." in key or "layer_scale" in key]
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    model = InternImageForImageClassification.from_pretrained(tmp_path)
    state = model.state_dict()
    for key in dropped:
        expected = torch.zeros_like(state[key]) if ".dcn.offset." in key else torch.full_like(state[key], 1e-5)
        assert torch.equal(state[key], expected), key


def test_gradient_checkpointing_gives_the_same_gradients(pixel_values):
    labels = torch.tensor([1, 3])
    gradients = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = trained_like(InternImageForImageClassification(tiny_config(with_cp=with_cp))).train()
        # transformers 5.23 renamed the property (the old name warns); earlier releases have only the old one.
        name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else None
        assert getattr(model, name or "is_gradient_checkpointing") == with_cp
        model(pixel_values, labels=labels).loss.backward()
        gradients.append(model.internimage.embeddings.conv1.weight.grad)
    torch.testing.assert_close(gradients[0], gradients[1])


@pytest.mark.parametrize(
    "num_labels, problem_type, labels",
    [
        (5, "single_label_classification", torch.tensor([0, 4])),
        (5, "multi_label_classification", torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])),
        (1, "regression", torch.tensor([0.5, -1.0])),
    ],
)
def test_loss_matches_problem_type(num_labels, problem_type, labels, pixel_values):
    model = trained_like(InternImageForImageClassification(tiny_config(num_labels=num_labels)))
    outputs = model(pixel_values, labels=labels)
    logits = outputs.logits
    if problem_type == "single_label_classification":
        expected = torch.nn.functional.cross_entropy(logits, labels)
    elif problem_type == "multi_label_classification":
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    else:
        expected = torch.nn.functional.mse_loss(logits.squeeze(), labels)
    assert model.config.problem_type == problem_type
    torch.testing.assert_close(outputs.loss, expected)


def test_meta_device_build_of_the_largest_variant():
    with torch.device("meta"):
        model = InternImageModel(InternImageConfig.from_variant("g"))
    assert sum(p.numel() for p in model.parameters()) > 3e9
    assert "InternImageLayer" in model._no_split_modules


def test_package_files_use_relative_imports_only():
    package = PROJECT_ROOT / "modeling_internimage"
    for path in package.glob("*.py"):
        text = path.read_text()
        assert "import modeling_internimage" not in text and "from modeling_internimage" not in text, path


def test_upernet_with_internimage_backbone_trains_and_reloads(tmp_path):
    from transformers import AutoModelForSemanticSegmentation, UperNetConfig, UperNetForSemanticSegmentation

    backbone_config = tiny_config(out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(
        backbone_config=backbone_config, num_labels=3, hidden_size=16, auxiliary_in_channels=None, auxiliary_channels=8
    )
    model = UperNetForSemanticSegmentation(config)
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))
    outputs = model(pixel_values, labels=labels)
    assert outputs.logits.shape == (2, 3, 64, 64)
    outputs.loss.backward()
    assert model.backbone.embeddings.conv1.weight.grad is not None
    model.eval().save_pretrained(tmp_path)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits)


@pytest.mark.parametrize("save_head_norm", [False, True])
def test_lora_keeps_the_heads_batchnorm_statistics_only_in_modules_to_save(save_head_norm, tmp_path):
    """The T-XL head's BatchNorm statistics change in training but are no trainable parameters: a LoRA adapter
    without `pooler.norm` in `modules_to_save` reloads to other logits (the README's fine-tuning note)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = InternImageForImageClassification(tiny_config(num_labels=3))
    base.save_pretrained(tmp_path / "base")
    modules_to_save = ["classifier", "pooler.norm"] if save_head_norm else ["classifier"]
    lora = LoraConfig(r=4, target_modules=["fc1", "fc2", "input_proj", "output_proj"], modules_to_save=modules_to_save)
    model = get_peft_model(base, lora)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pixel_values, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        model(pixel_values=pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(tmp_path / "adapter")
    base_again = InternImageForImageClassification.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base_again, tmp_path / "adapter").eval()
    with torch.no_grad():
        difference = (reloaded(pixel_values=pixel_values).logits - model(pixel_values=pixel_values).logits).abs().max()
    assert (difference <= 1e-6) == save_head_norm, difference
