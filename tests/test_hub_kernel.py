"""The DCNv3 hub kernel (CPU variant, built locally) inside InternImage: fixtures, kernelize paths, fallback."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import KERNEL_DIR, PROJECT_ROOT, build_local, fixture_classifier, local_mapping
from kernels import LocalLayerRepository, Mode, use_kernel_mapping
from safetensors import safe_open
from test_reference_fixtures import OP_PARAMS, relative_error
from torch._inductor.utils import run_and_get_code
from transformers.activations import GELUActivation
from transformers.utils import is_kernels_available

import modeling_internimage.modeling_internimage as modeling
from modeling_internimage import (
    DCNV3_KERNEL_REPO_ID,
    DCNv3Core,
    DCNv3SoftmaxCore,
    InternImageConfig,
    InternImageForImageClassification,
    dcnv3_kernel_mapping,
    use_hub_kernels,
    uses_hub_kernel,
)


@pytest.mark.parametrize(
    "case",
    ["basic", "dilation2", "kernel5", "offset_scale2", "remove_center", "single_channel", "stride2", "wide_group"],
)
def test_cpu_kernel_matches_original_op_fixtures(kernel, case, fixtures_dir):
    with safe_open(fixtures_dir / "dcnv3_op" / f"{case}.safetensors", "pt") as f:
        params = json.loads(f.metadata()["params"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    inputs = [tensors[key].clone().requires_grad_() for key in ("input", "offset", "mask")]
    settings = [params[key] for key in OP_PARAMS]
    settings[-1] = bool(settings[-1])
    output = kernel.dcnv3(*inputs, *settings)
    output.backward(tensors["grad_output"])
    assert relative_error(output, tensors["output"]) <= 1e-5
    for tensor, key in zip(inputs, ("grad_input", "grad_offset", "grad_mask")):
        assert relative_error(tensor.grad, tensors[key]) <= 1e-5, key


def test_kernelize_with_local_repository_matches_pytorch(kernel_build):
    model, io = fixture_classifier("tiny_h")
    pixel_values = io["input0.pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values, output_hidden_states=True)
    use_hub_kernels(model, mapping=local_mapping(kernel_build), strict=True)
    assert uses_hub_kernel(model)
    with torch.no_grad():
        actual = model(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)
    for got, wanted in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, wanted, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.logits, io["input0.logits"], atol=1e-4, rtol=0)
    use_hub_kernels(model, enabled=False)
    assert not uses_hub_kernel(model)


def test_a_kernel_build_without_the_softmax_layer_leaves_the_model_on_pytorch(kernel_build, caplog):
    """A build from before the `DCNv3Softmax` layer has only `DCNv3`, which takes normalised weights: InternImage's
    cores, which hand over logits, must not run through it. They keep the PyTorch operator, with one warning."""
    model, io = fixture_classifier("tiny_t")
    mapping = {"DCNv3": {"cpu": LocalLayerRepository(kernel_build, layer_name="DCNv3")}}
    with caplog.at_level("WARNING", logger="modeling_internimage.hub_kernels"):
        use_hub_kernels(model, mapping=mapping)
    assert not uses_hub_kernel(model) and len(caplog.records) == 1
    assert "keeps the PyTorch DCNv3 operator" in caplog.records[0].getMessage()
    with torch.no_grad():
        logits = model(io["input0.pixel_values"]).logits
    torch.testing.assert_close(logits, io["input0.logits"], atol=1e-4, rtol=0)


def test_the_softmax_layer_is_the_fused_op(kernel_build):
    """With the kernel, each block makes one call of the fused op and no separate softmax ops run."""
    model, io = fixture_classifier("tiny_t")
    use_hub_kernels(model, mapping=local_mapping(kernel_build), strict=True)
    pixel_values = io["input0.pixel_values"]
    blocks = sum(isinstance(module, DCNv3SoftmaxCore) for module in model.modules())
    with torch.no_grad():
        assert _op_calls(lambda: model(pixel_values), "::dcnv3_softmax_forward") == blocks
        assert _op_calls(lambda: model(pixel_values), "aten::exp") == 0


def _op_calls(run, op_suffix: str) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    return sum(event.count for event in profiler.key_averages() if event.key.endswith(op_suffix))


def fused_everywhere(model, monkeypatch) -> None:
    """The MLP layer fuses only where the CPU has AVX-512 (a speed choice, `FUSED_LINEAR_PAYS`); its logic is tested
    on any CPU by setting the flag in the loaded kernel's layers module."""
    mlp = next(module for module in model.modules() if isinstance(module, modeling.InternImageMLP))
    monkeypatch.setattr(sys.modules[mlp.forward.__func__.__module__], "FUSED_LINEAR_PAYS", True)


def test_cpu_inference_runs_every_mlp_on_the_fused_layer(kernel_build, monkeypatch):
    model, io = fixture_classifier("tiny_t")
    pixel_values = io["input0.pixel_values"]
    mlps = [module for module in model.modules() if isinstance(module, modeling.InternImageMLP)]
    gelus = [module for module in model.modules() if isinstance(module, GELUActivation)]
    with torch.no_grad():
        expected = model(pixel_values).logits
        use_hub_kernels(model, mapping=local_mapping(kernel_build), strict=True)
        fused_everywhere(model, monkeypatch)
        assert _op_calls(lambda: model(pixel_values), "::linear_activation") == 2 * len(mlps)
        assert _op_calls(lambda: model(pixel_values), "aten::gelu") == len(gelus) - len(mlps)
        torch.testing.assert_close(model(pixel_values).logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected, io["input0.logits"], atol=1e-4, rtol=0)


def test_the_mlp_layer_stays_out_of_training_and_gradients(kernel_build, monkeypatch):
    model, io = fixture_classifier("tiny_t")
    pixel_values = io["input0.pixel_values"].clone().requires_grad_()
    use_hub_kernels(model.train(), mapping=local_mapping(kernel_build), strict=True)
    mlp = model.internimage.encoder.stages[0].layers[0].mlp
    assert uses_hub_kernel(model) and mlp.forward.__func__ is modeling.InternImageMLP.forward
    use_hub_kernels(model.eval(), mapping=local_mapping(kernel_build), strict=True)
    assert mlp.forward.__func__ is not modeling.InternImageMLP.forward
    fused_everywhere(model, monkeypatch)
    # Kernelized for inference, then asked for a saliency map: the MLPs keep autograd.
    assert _op_calls(lambda: model(pixel_values).logits.sum().backward(), "::linear_activation") == 0
    assert pixel_values.grad is not None and pixel_values.grad.abs().sum() > 0


def test_hooks_and_adapters_on_the_mlp_are_not_skipped(kernel_build, monkeypatch):
    """A forward hook, accelerate's hooks (they wrap `forward`) and peft's LoRA layers all still run."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from peft import LoraConfig, get_peft_model

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    model, io = fixture_classifier("tiny_t")
    pixel_values = io["input0.pixel_values"]
    use_hub_kernels(model, mapping=local_mapping(kernel_build), strict=True)
    fused_everywhere(model, monkeypatch)
    stages = model.internimage.encoder.stages
    captured, hook = [], CountingHook()
    stages[0].layers[0].mlp.fc1.register_forward_hook(lambda module, args, output: captured.append(output))
    add_hook_to_module(stages[1].layers[0].mlp.fc2, hook)
    with torch.no_grad():
        model(pixel_values)
    assert len(captured) == 1 and hook.calls == 1
    lora = get_peft_model(model, LoraConfig(target_modules=["fc1"], init_lora_weights=False))
    with torch.no_grad():
        adapted = lora(pixel_values=pixel_values).logits
        assert _op_calls(lambda: lora(pixel_values=pixel_values), "::linear_activation") == 0
        with lora.disable_adapter():
            assert not torch.allclose(lora(pixel_values=pixel_values).logits, adapted)


def test_training_mode_kernel_gives_pytorch_gradients(kernel_build):
    model, io = fixture_classifier("tiny_t")
    model.train()
    pixel_values, labels = io["input0.pixel_values"], torch.tensor([1, 7])
    model(pixel_values, labels=labels).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if "dcn" in name}
    model.zero_grad()
    use_hub_kernels(model, mapping=local_mapping(kernel_build), strict=True)
    assert uses_hub_kernel(model)
    model(pixel_values, labels=labels).loss.backward()
    for name, gradient in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, gradient, atol=1e-5, rtol=1e-4)


def test_torch_compile_of_kernelized_model_matches_eager(kernel_build, monkeypatch):
    """Both layers trace into one graph: the DCNv3 operator, and on the CPU the fused MLP op for every MLP."""
    model, io = fixture_classifier("tiny_t")
    use_hub_kernels(model, mapping=local_mapping(kernel_build), mode=Mode.INFERENCE | Mode.TORCH_COMPILE, strict=True)
    assert uses_hub_kernel(model)
    fused_everywhere(model, monkeypatch)
    mlps = [module for module in model.modules() if isinstance(module, modeling.InternImageMLP)]
    pixel_values = io["input0.pixel_values"]
    with torch.no_grad():
        eager = model(pixel_values).logits
        torch._dynamo.reset()
        compiled, sources = run_and_get_code(torch.compile(model, fullgraph=True), pixel_values)
    assert sum(source.count(".linear_activation.default(") for source in sources) == 2 * len(mlps)
    torch.testing.assert_close(compiled.logits, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("operator", ["pytorch", "cpu_kernel"])
@pytest.mark.parametrize("name", ["tiny_t", "tiny_s", "tiny_l", "tiny_h", "tiny_g", "tiny_t_remove_center"])
def test_bfloat16_autocast_inference_agrees_with_float32(kernel_build, name, operator):
    """CPU bf16 autocast keeps every fixture's predictions, and its logits within 1.5 % of their scale (about four
    bf16 roundings, 2**-8 each). An absolute 1e-2 is out of reach at these scales (largest logit 1 to 2.9, measured
    differences up to 0.028): the rounding is spread over all linear layers and convolutions, and keeping any one
    group of them in float32 changes the largest difference by less than a third."""
    model, io = fixture_classifier(name)
    if operator == "cpu_kernel":
        use_hub_kernels(model, mapping=local_mapping(kernel_build), strict=True)
    pixel_values = io["input0.pixel_values"]
    with torch.no_grad():
        reference = model(pixel_values).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(pixel_values).logits
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    assert (logits.float() - reference).abs().max() <= 1.5e-2 * reference.abs().max()


# transformers' use_kernels integration accepts only some kernels releases (5.23+ want kernels >= 0.18.2).
requires_transformers_kernels = pytest.mark.skipif(
    not is_kernels_available(), reason="this transformers release does not accept the installed kernels"
)


@requires_transformers_kernels
def test_from_pretrained_use_kernels_swaps_in_the_kernel(kernel_build, tmp_path):
    from transformers import AutoModelForImageClassification

    model, io = fixture_classifier("tiny_t")
    model.save_pretrained(tmp_path)
    with use_kernel_mapping(local_mapping(kernel_build)):
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path, use_kernels=True)
    assert uses_hub_kernel(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(io["input0.pixel_values"]).logits, io["input0.logits"], atol=1e-4, rtol=0)


PRODUCTION_SCRIPT = textwrap.dedent(
    """
    import logging, socket, sys
    import torch

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    socket.socket.connect = no_network
    socket.create_connection = no_network
    logging.basicConfig(level=logging.WARNING, format="WARNING:%(name)s:%(message)s")
    from modeling_internimage import InternImageConfig, InternImageModel, use_hub_kernels, uses_hub_kernel

    model = InternImageModel(InternImageConfig(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8])).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).pooler_output
    use_hub_kernels(model)
    with torch.no_grad():
        difference = (model(pixel_values).pooler_output - expected).abs().max().item()
    print(f"swapped={uses_hub_kernel(model)} difference={difference:.2e}")
    """
)


def run_production_mapping(tmp_path: Path, cache: Path, trusted: bool = True) -> subprocess.CompletedProcess:
    """`use_hub_kernels(model)` with the production LayerRepository(version=1), offline, against `cache`, the repo
    overridden to test-org/dcnv3 (whose code runs only with the explicit opt-in, `trusted`)."""
    (tmp_path / "production.py").write_text(PRODUCTION_SCRIPT)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "KERNELS_CACHE": str(cache),
        "INTERNIMAGE_DCNV3_KERNEL_REPO": "test-org/dcnv3",
    }
    env.pop("INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE", None)
    if trusted:
        env["INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE"] = "1"
    return subprocess.run(
        [sys.executable, str(tmp_path / "production.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cached_kernel_repo(kernel_build: Path, cache: Path, repo_id: str = "test-org/dcnv3") -> None:
    """`repo_id` at version 1 in an offline Hub cache, holding the local build."""
    repo = cache / ("kernels--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "v1").write_text(commit)
    shutil.copytree(kernel_build, repo / "snapshots" / commit / "build", ignore=shutil.ignore_patterns(".*"))


def test_production_repository_loads_from_offline_hub_cache(kernel_build, tmp_path):
    cached_kernel_repo(kernel_build, tmp_path / "cache")
    result = run_production_mapping(tmp_path, tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    swapped, difference = result.stdout.split()[-2:]
    assert swapped == "swapped=True"
    assert float(difference.split("=")[1]) <= 1e-5


def test_overridden_repository_runs_no_code_without_the_opt_in(kernel_build, tmp_path):
    cached_kernel_repo(kernel_build, tmp_path / "cache")
    result = run_production_mapping(tmp_path, tmp_path / "cache", trusted=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "swapped=False difference=0.00e+00" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING:modeling_internimage")]
    # One at import (the mapping is not registered), one where use_hub_kernels falls back; both say what to set.
    assert len(warnings) == 2 and all("INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE=1" in w for w in warnings), warnings
    assert "not registered" in warnings[0] and "keeps the PyTorch DCNv3 operator" in warnings[1]


def test_only_the_packages_own_kernel_repo_is_trusted_by_default(monkeypatch):
    monkeypatch.delenv("INTERNIMAGE_DCNV3_KERNEL_REPO", raising=False)
    monkeypatch.delenv("INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE", raising=False)
    assert dcnv3_kernel_mapping()["DCNv3"]["cpu"]._repo_id == DCNV3_KERNEL_REPO_ID
    with pytest.raises(ValueError, match="not the package's own"):
        dcnv3_kernel_mapping("someone/dcnv3")
    assert dcnv3_kernel_mapping("someone/dcnv3", trust_remote_code=True)["DCNv3"]["cuda"]._repo_id == "someone/dcnv3"
    monkeypatch.setenv("INTERNIMAGE_DCNV3_KERNEL_REPO", "someone/dcnv3")
    with pytest.raises(ValueError, match="INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE"):
        dcnv3_kernel_mapping()


def test_missing_kernel_falls_back_with_one_warning_and_no_network(tmp_path):
    (tmp_path / "empty-cache").mkdir()
    result = run_production_mapping(tmp_path, tmp_path / "empty-cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "swapped=False difference=0.00e+00" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING:modeling_internimage")]
    assert len(warnings) == 1 and "keeps the PyTorch DCNv3 operator" in warnings[0], result.stderr


def test_unsupported_device_falls_back_with_a_warning(caplog):
    model = InternImageForImageClassification(InternImageConfig(channels=8, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8]))
    mapping = {"DCNv3": {"cuda": LocalLayerRepository(KERNEL_DIR / "build", layer_name="DCNv3")}}
    with caplog.at_level("WARNING", logger="modeling_internimage.hub_kernels"):
        use_hub_kernels(model, mapping=mapping)
    assert not uses_hub_kernel(model)
    assert len(caplog.records) == 1 and "device 'cpu'" in caplog.records[0].getMessage()


def test_mismatching_layer_signature_is_caught(tmp_path, caplog):
    """A hub layer whose forward takes other arguments than the core's is refused by kernels' layer validation."""
    variant = tmp_path / "build" / "torch-cpu"  # a pure-Python (noarch) variant: no compiled op involved
    variant.mkdir(parents=True)
    metadata = {
        "name": "dcnv3",
        "id": "_dcnv3_signature_test",
        "version": 1,
        "license": "MIT",
        "backend": {"type": "cpu"},
        "python-depends": [],
    }
    (variant / "metadata.json").write_text(json.dumps(metadata))
    (variant / "__init__.py").write_text("from . import layers\n__all__ = ['layers']\n")
    (variant / "layers.py").write_text(
        "from torch import nn\n\n\nclass DCNv3Softmax(nn.Module):\n    def forward(self, value, offset):\n"
        "        return value\n"
    )
    model, _ = fixture_classifier("tiny_t")
    with pytest.raises(TypeError, match="does not match `DCNv3SoftmaxCore`: different number of arguments"):
        use_hub_kernels(model, mapping=local_mapping(tmp_path / "build"), strict=True)
    with caplog.at_level("WARNING", logger="modeling_internimage.hub_kernels"):
        use_hub_kernels(model, mapping=local_mapping(tmp_path / "build"))
    assert not uses_hub_kernel(model) and len(caplog.records) == 1


def test_hub_layers_source_matches_their_host_modules():
    """Without importing the compiled kernel: each hub layer keeps kernels' rules (one method, no state, only the
    flags kernels knows) and its host's forward arity, and reads only what the host module has."""
    import inspect

    hosts = {
        "DCNv3": DCNv3Core(),
        "DCNv3Softmax": DCNv3SoftmaxCore(),
        "InternImageMLP": modeling.InternImageMLP(InternImageConfig(channels=16, groups=[1, 2, 4, 8]), 16),
    }
    tree = ast.parse((KERNEL_DIR / "torch-ext" / "dcnv3" / "layers.py").read_text())
    layers = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert set(layers) == set(hosts)
    for name, layer in layers.items():
        host = hosts[name]
        assert type(host).kernel_layer_name == name
        methods = [node for node in layer.body if isinstance(node, ast.FunctionDef)]
        assigned = [target.id for node in layer.body if isinstance(node, ast.Assign) for target in node.targets]
        assert [method.name for method in methods] == ["forward"]
        assert set(assigned) <= {"can_torch_compile", "has_backward"}
        assert len(methods[0].args.args) == len(inspect.signature(type(host).forward).parameters)
        attributes = {node.target.id for node in layer.body if isinstance(node, ast.AnnAssign)}
        readable = set(vars(host)) | set(host._modules)
        assert attributes <= readable, (name, attributes - readable)


def test_build_toml_and_metadata_parse_with_the_kernels_library(kernel_build):
    from kernels._rust import Backend, Build, Metadata

    build = Build.open(KERNEL_DIR)
    assert set(build.general.backends) == {Backend.CPU, Backend.CUDA}
    for variant in kernel_build.iterdir():
        if (variant / "metadata.json").exists():
            metadata = Metadata.read_from_file(variant / "metadata.json")
            assert metadata.version == 1 and metadata.id.startswith("_dcnv3_")


def test_cuda_variant_is_compiled_for_sm80_and_sm90():
    """scripts/build_kernels.sh compiles the CUDA sources with nvcc (no GPU needed); CI runs it before the tests."""
    variants = [path for path in (KERNEL_DIR / "build").glob("torch*-cu*-*") if (path / "metadata.json").exists()]
    if not variants and os.environ.get("INTERNIMAGE_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("no CUDA variant built (no nvcc here); CI sets INTERNIMAGE_REQUIRE_CUDA_BUILD=1 and builds it")
    assert variants, "no CUDA variant built: run `bash scripts/build_kernels.sh cuda`"
    (variant,) = variants
    metadata = json.loads((variant / "metadata.json").read_text())
    assert metadata["backend"] == {"type": "cuda", "archs": ["8.0", "9.0"]}
    assert metadata["id"] == f"_dcnv3_cuda_{build_local.source_revision(KERNEL_DIR)}", "CUDA build is stale"
    library = (variant / f"{metadata['id']}.abi3.so").read_bytes()
    assert b"sm_80" in library and b"sm_90" in library
    assert b"dcnv3_forward_kernel" in library and b"dcnv3_backward_kernel" in library
    assert {path.name for path in variant.iterdir()} >= {"__init__.py", "layers.py", "_ops.py", "metadata.json"}


def test_build_revision_follows_the_kernel_sources_not_the_project(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    kernel_dir = tmp_path / "hub_kernels" / "dcnv3"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.cpp").write_text("int a;\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "kernel")
    kernel_commit = git("log", "-1", "--format=%h", "--abbrev=7")
    (tmp_path / "README.md").write_text("docs\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "docs")
    assert build_local.source_revision(kernel_dir) == kernel_commit
    (kernel_dir / "kernel.cpp").write_text("int b;\n")
    assert build_local.source_revision(kernel_dir) == f"{kernel_commit}_dirty"


@pytest.mark.parametrize("required", [False, True])
def test_cuda_build_without_nvcc_is_skipped_unless_required(required, tmp_path):
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "no-cuda"), "INTERNIMAGE_REQUIRE_CUDA_BUILD": str(int(required))}
    result = subprocess.run(
        ["bash", str(PROJECT_ROOT / "scripts" / "build_kernels.sh"), "cuda"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if required:
        assert result.returncode == 1 and "error: nvcc not found" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines() == [
            f"skipping the CUDA kernel build: no nvcc under {tmp_path / 'no-cuda'} (set CUDA_HOME, or "
            "INTERNIMAGE_REQUIRE_CUDA_BUILD=1 to fail)"
        ]


REGISTERED_MAPPING_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from kernels import Mode, kernelize
    from transformers import AutoModelForImageClassification
    from transformers.utils import is_kernels_available
    import modeling_internimage  # registers the DCNv3 kernel mapping with kernels
    from modeling_internimage import InternImageConfig, InternImageForImageClassification, uses_hub_kernel

    config = InternImageConfig(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8])
    model = InternImageForImageClassification(config).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).logits
    kernelize(model, mode=Mode.INFERENCE, device="cpu")
    with torch.no_grad():
        difference = (model(pixel_values).logits - expected).abs().max().item()
    model.save_pretrained(sys.argv[1])
    swapped = "untested"
    if is_kernels_available():  # transformers' integration accepts the installed kernels
        loaded = AutoModelForImageClassification.from_pretrained(sys.argv[1], use_kernels=True)
        swapped = uses_hub_kernel(loaded)
    print(f"kernelize={uses_hub_kernel(model)} difference={difference:.2e} use_kernels={swapped}")
    """
)


def test_import_registers_the_kernel_mapping_for_kernelize_and_use_kernels(kernel_build, tmp_path):
    """Without a use_kernel_mapping context: kernels.kernelize and from_pretrained(use_kernels=True) find the
    package's repo (here in an offline Hub cache holding the local build)."""
    cached_kernel_repo(kernel_build, tmp_path / "cache", DCNV3_KERNEL_REPO_ID)
    (tmp_path / "registered.py").write_text(REGISTERED_MAPPING_SCRIPT)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "KERNELS_CACHE": str(tmp_path / "cache"),
    }
    for variable in ("INTERNIMAGE_DCNV3_KERNEL_REPO", "INTERNIMAGE_DCNV3_KERNEL_TRUST_REMOTE_CODE"):
        env.pop(variable, None)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "registered.py"), str(tmp_path / "model")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernelized, difference, use_kernels = result.stdout.split()[-3:]
    assert kernelized == "kernelize=True"
    assert use_kernels == ("use_kernels=True" if is_kernels_available() else "use_kernels=untested")
    assert float(difference.split("=")[1]) <= 1e-5


def test_use_hub_kernels_false_keeps_the_pytorch_operator_and_says_why(tmp_path):
    """USE_HUB_KERNELS=NO (transformers' switch) leaves DCNv3Core undecorated: no kernel, one warning naming it."""
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING, format='WARNING:%(name)s:%(message)s')\n"
        "from modeling_internimage import InternImageConfig, InternImageModel, use_hub_kernels, uses_hub_kernel\n"
        "model = InternImageModel(InternImageConfig(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8]))\n"
        "use_hub_kernels(model)\n"
        "print(f'swapped={uses_hub_kernel(model)}')\n"
    )
    env = {**os.environ, "USE_HUB_KERNELS": "NO", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "swapped=False"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING:modeling_internimage")]
    assert len(warnings) == 1 and "USE_HUB_KERNELS" in warnings[0], result.stderr
