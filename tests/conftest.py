"""Shared test set-up: offline Hub, the reference fixtures, and transformers' own common test mixins.

The mixins ship in the transformers source distribution on the package index, not in the wheel; they are fetched
once into `.cache/` (git-ignored) for the installed version, with stubs for the few modules of the GitHub tree they
import but do not need for a vision model.
"""

import os


os.environ["HF_HUB_OFFLINE"] = "1"

import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402


PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures" / "original"
COMMON_TESTS_PACKAGE = "hf_common_tests"
COMMON_TEST_STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}


def _fetch_common_tests(target: Path) -> None:
    """Download the transformers sdist of the installed version and keep its top-level `tests/*.py`."""
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"transformers=={version}",
                "-d",
                download_dir,
            ],
            check=True,
        )
        archive = next(Path(download_dir).glob("transformers-*.tar.gz"))
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        with tarfile.open(archive) as tar:
            prefix = f"transformers-{version}/tests/"
            for member in tar.getmembers():
                relative = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and member.isfile() and "/" not in relative:
                    member.name = relative
                    tar.extract(member, staging, filter="data")
        for stub_path, text in {**COMMON_TEST_STUBS, "__init__.py": ""}.items():
            path = staging / stub_path
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        staging.rename(target)


def import_common_tests(module: str):
    """Import a module of transformers' common tests (e.g. `test_modeling_common`) for the installed version."""
    cache = PROJECT_ROOT / ".cache" / f"transformers-{transformers.__version__}-tests"
    package_dir = cache / COMMON_TESTS_PACKAGE
    if not package_dir.exists():
        cache.mkdir(parents=True, exist_ok=True)
        _fetch_common_tests(package_dir)
    if str(cache) not in sys.path:
        sys.path.insert(0, str(cache))
    return importlib.import_module(f"{COMMON_TESTS_PACKAGE}.{module}")


def load_fixture_case(name: str) -> tuple[dict, dict, dict]:
    """(description, original state dict, inputs and outputs) of a model fixture."""
    from safetensors.torch import load_file

    models = FIXTURES / "models"
    description = json.loads((models / f"{name}.json").read_text())
    return description, load_file(models / f"{name}.safetensors"), load_file(models / f"{name}.io.safetensors")


def fixture_classifier(name: str):
    """A model fixture's classifier with the original weights loaded, in eval mode, and its inputs and outputs."""
    from modeling_internimage import InternImageConfig, InternImageForImageClassification

    description, state_dict, io = load_fixture_case(name)
    model = InternImageForImageClassification(InternImageConfig(**description["original_constructor_kwargs"]))
    model.load_original_state_dict(state_dict)
    return model.eval(), io


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_internimage"] = None  # the package must not be importable here
    import torch
    from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification

    directory, inputs, outputs = sys.argv[1:]
    pixel_values = torch.load(inputs)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    results = {}
    if config.architectures != ["InternImageBackbone"]:
        classifier = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True).eval()
        assert type(classifier).__module__.startswith("transformers_modules"), type(classifier).__module__
        base = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
        with torch.no_grad():
            results["logits"] = classifier(pixel_values).logits
            results["pooled"] = base(pixel_values).pooler_output
    # AutoBackbone.from_pretrained takes any local path for a Hub id (transformers 5.22/5.23), so resolve the
    # remote class through from_config and load the weights with it.
    backbone_class = type(AutoBackbone.from_config(config, trust_remote_code=True))
    assert backbone_class.__module__.startswith("transformers_modules"), backbone_class.__module__
    backbone = backbone_class.from_pretrained(directory).eval()
    with torch.no_grad():
        results["features"] = backbone(pixel_values).feature_maps[-1]
    torch.save(results, outputs)
    """
)


def run_without_the_package(script: str, arguments: list, pixel_values, work_dir: Path):
    """Run `script` (which blocks `import modeling_internimage`) in a fresh Python process with `arguments`, then the
    path of `pixel_values` saved and the path its outputs are to be saved to; return those outputs."""
    import torch

    torch.save(pixel_values, work_dir / "inputs.pt")
    (work_dir / "without_the_package.py").write_text(script)
    env = {**os.environ, "HF_MODULES_CACHE": str(work_dir / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    command = [sys.executable, str(work_dir / "without_the_package.py"), *map(str, arguments),
               str(work_dir / "inputs.pt"), str(work_dir / "outputs.pt")]  # fmt: skip
    result = subprocess.run(command, cwd=work_dir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work_dir / "outputs.pt")


def run_as_remote_code(model_dir: Path, pixel_values, work_dir: Path) -> dict:
    """Load `model_dir` through the Auto classes with trust_remote_code in a Python process where this package
    cannot be imported; return its outputs on `pixel_values` (`logits`, `pooled`, last `features`)."""
    return run_without_the_package(REMOTE_CODE_SCRIPT, [model_dir], pixel_values, work_dir)


MODEL_FIXTURES = ["tiny_t", "tiny_t_remove_center", "tiny_s", "tiny_l", "tiny_h", "tiny_g"]
VARIANTS = ["t", "s", "b", "l", "xl", "h", "g"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.exists():
        pytest.fail(f"Reference fixtures not found at {FIXTURES}; the repository expects ../shared beside it.")
    return FIXTURES


sys.path.insert(0, str(PROJECT_ROOT / "hub_kernels"))
import build_local  # noqa: E402


KERNEL_DIR = PROJECT_ROOT / "hub_kernels" / "dcnv3"


@pytest.fixture(scope="session")
def kernel_build() -> Path:
    """The CPU variant of the kernel for the installed torch, built now unless already there."""
    variant = KERNEL_DIR / "build" / build_local.variant_name("cpu")
    if not (variant / "metadata.json").exists():
        build_local.build_variant("dcnv3", "cpu", [])
    return KERNEL_DIR / "build"


def local_mapping(build: Path) -> dict:
    """The kernels mapping of the CPU layers in a local build (the package's mapping names the Hub repo)."""
    from kernels import LocalLayerRepository

    layers = ("DCNv3", "DCNv3Softmax", "InternImageMLP")
    return {layer: {"cpu": LocalLayerRepository(build, layer_name=layer)} for layer in layers}


@pytest.fixture(scope="session")
def kernel(kernel_build):
    from kernels import get_local_kernel

    return get_local_kernel(kernel_build)
