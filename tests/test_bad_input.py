"""Bad input, surface by surface: the configuration, the model, the DCNv3 operator and its CPU kernel, and the
converter. Each case ends in a clear error naming the problem, in the same result as the PyTorch operator, or with
nothing lost; none in a crash deep inside torch or a silently wrong result. (The examples' cases are in
test_examples.py.)"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, load_fixture_case
from huggingface_hub.errors import StrictDataclassError
from kernels import LocalLayerRepository
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_internimage import (
    DCNv3Core,
    DCNv3SoftmaxCore,
    InternImageConfig,
    InternImageForImageClassification,
    build_image_processor,
    dcnv3_core_pytorch,
    use_hub_kernels,
    uses_hub_kernel,
)


sys.path.insert(0, str(PROJECT_ROOT / "conversion"))
import convert_internimage_to_hf as converter  # noqa: E402


SCRIPT = PROJECT_ROOT / "conversion" / "convert_internimage_to_hf.py"
SMALL = {"channels": 16, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8]}


# --- configuration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("channels", 0),
        ("channels", -16),
        ("channels", 16.0),
        ("channels", "16"),
        ("channels", True),
        ("groups", [1.0, 2, 4, 8]),
        ("depths", "1111"),
        ("depths", [1, 1, "2", 1]),
        ("dw_kernel_size", 3.0),
        ("layer_scale", "1e-5"),
        ("layer_scale", math.inf),
        ("remove_center", "no"),
        ("post_norm", 1),
        ("layer_norm_eps", 0.0),
        ("layer_norm_eps", -1e-6),
        ("offset_scale", math.nan),
        ("offset_scale", 0.0),
        ("offset_scale", -1.0),
        ("offset_scale", math.inf),
        ("mlp_ratio", 0.0),
        ("cls_scale", 0.0),
        ("num_labels", -1),
        ("num_classes", "ten"),
        ("drop_path_rate", 1.5),
        ("num_channels", 0),
        ("auto_map", "configuration_internimage.InternImageConfig"),
        ("act_layer", 3),
    ],
)
def test_config_values_that_cannot_build_a_sound_model_name_the_field(field, value):
    """Types are checked by `@strict` (as in transformers' own configs), values by `validate_architecture`."""
    named = "num_labels" if field == "num_classes" else field
    with pytest.raises((ValueError, StrictDataclassError), match=f"[`']{named}[`']"):
        InternImageConfig(**{**SMALL, field: value})


def test_integers_pass_for_float_fields():
    config = InternImageConfig(**SMALL, offset_scale=2, mlp_ratio=4)
    assert config.offset_scale == 2 and config.mlp_ratio == 4


def test_from_variant_names_a_missing_name():
    with pytest.raises(ValueError, match="variant"):
        InternImageConfig.from_variant(None)


def test_misspelled_field_is_warned_about():
    logger = logging.get_logger("modeling_internimage.configuration_internimage")
    with CaptureLogger(logger) as captured:
        config = InternImageConfig(**SMALL, offset_scal=2.0)
    assert "offset_scal" in captured.out and "offset_scale" in captured.out
    assert config.offset_scale == 1.0
    with CaptureLogger(logger) as captured:
        InternImageConfig(**SMALL, offset_scale=2.0)
    assert captured.out == ""


def test_bad_config_json_is_named_through_remote_code(tmp_path):
    InternImageForImageClassification(InternImageConfig(**SMALL, num_labels=3)).save_pretrained(tmp_path / "model")
    config_file = tmp_path / "model" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "channels": "16"}))
    script = (
        "import sys\nsys.modules['modeling_internimage'] = None\n"
        "from transformers import AutoModelForImageClassification\n"
        f"AutoModelForImageClassification.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode != 0
    assert "Field 'channels' expected int, got str (value: '16')" in result.stderr, result.stderr[-2000:]


# --- model ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_classifier():
    torch.manual_seed(0)
    return InternImageForImageClassification(InternImageConfig(**SMALL, num_labels=3))


@pytest.mark.parametrize("shape", [(1, 3, 0, 64), (2, 3, 64, 0)])
def test_empty_images_are_refused(small_classifier, shape):
    with pytest.raises(ValueError, match="at least one pixel"):
        small_classifier.eval()(torch.randn(*shape))


def test_training_the_batchnorm_head_on_a_single_value_is_explained(small_classifier):
    small_classifier.train()
    with pytest.raises(ValueError, match="batches of 2 or more"):
        small_classifier(torch.randn(1, 3, 32, 32), labels=torch.tensor([1]))
    assert small_classifier(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 2])).loss.isfinite()


def test_labels_as_a_python_list_are_accepted(small_classifier):
    small_classifier.eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        from_list = small_classifier(pixel_values, labels=[0, 2]).loss
        from_tensor = small_classifier(pixel_values, labels=torch.tensor([0, 2])).loss
    torch.testing.assert_close(from_list, from_tensor)


@pytest.mark.parametrize("size", [0, -224, 224.0, "224"])
def test_image_processor_needs_a_positive_pixel_size(size):
    with pytest.raises(ValueError, match="positive number of pixels"):
        build_image_processor(size=size)


# --- DCNv3 operator and CPU kernel ---------------------------------------------------------------------------------


def test_core_accepts_non_contiguous_offsets_and_weights():
    core = DCNv3Core(group=2, group_channels=4)
    value = torch.randn(1, 5, 6, 8)
    offset, mask = torch.randn(1, 6, 5, 36).transpose(1, 2), torch.rand(1, 6, 5, 18).transpose(1, 2)
    torch.testing.assert_close(core(value, offset, mask), core(value, offset.contiguous(), mask.contiguous()))


@pytest.mark.parametrize(
    "setting, value_shape, message",
    [
        ({}, (1, 0, 6, 8), "empty or smaller"),
        ({"pad": 0}, (1, 2, 6, 8), "smaller than the kernel's reach"),
        ({"stride": 0}, (1, 5, 6, 8), "`stride` must be a positive"),
        ({"dilation": 0}, (1, 5, 6, 8), "`dilation` must be a positive"),
        ({"pad": -1}, (1, 5, 6, 8), "`pad` must not be negative"),
    ],
)
@pytest.mark.parametrize("core_class", [DCNv3Core, DCNv3SoftmaxCore])
def test_core_settings_and_sizes_are_checked(setting, value_shape, message, core_class):
    core = core_class(group=2, group_channels=4, **setting)
    value = torch.randn(*value_shape)
    offset = torch.zeros(*value_shape[:3], 36)
    with pytest.raises(ValueError, match=message):
        core(value, offset, torch.ones(*value_shape[:3], 18))


@pytest.mark.parametrize("core_class", [DCNv3Core, DCNv3SoftmaxCore])
def test_core_names_a_mask_of_the_wrong_width(core_class):
    """The softmax core checks before it splits the logits by group: the error names the mask, not a reshape."""
    core = core_class(group=2, group_channels=4)
    value, offset = torch.randn(1, 5, 6, 8), torch.zeros(1, 5, 6, 36)
    with pytest.raises(ValueError, match="mask has shape \\(1, 5, 6, 17\\), expected \\(1, 5, 6, 18\\)"):
        core(value, offset, torch.ones(1, 5, 6, 17))


def test_use_hub_kernels_takes_a_mode_name(kernel_build):
    model = InternImageForImageClassification(InternImageConfig(**SMALL)).eval()
    mapping = {"DCNv3Softmax": {"cpu": LocalLayerRepository(kernel_build, layer_name="DCNv3Softmax")}}
    use_hub_kernels(model, mapping=mapping, mode="inference", strict=True)
    assert uses_hub_kernel(model)
    with pytest.raises(ValueError, match="mode must be a kernels.Mode or one of inference"):
        use_hub_kernels(model, mapping=mapping, mode="fast")


def _nonfinite_case(name: str, value, offset, mask):
    value, offset, mask, scale = value.clone(), offset.clone(), mask.clone(), 1.0
    if name == "inf value at the first pixel":
        value[0, 0, 0] = math.inf
    elif name == "nan value at the border":
        value[1, -1, 3] = math.nan
    elif name == "nan and inf offsets":
        offset[0, 2, 2, 0] = math.nan
        offset[1, 1, 4, 5] = math.inf
    elif name == "nan weight of a point outside the map":
        offset[0, 0, 0, 0:2] = -9.0
        mask[0, 0, 0, 0] = math.nan
    elif name == "nan offset_scale":
        scale = math.nan
    return value, offset, mask, scale


def _with_gradients(operator, value, offset, mask, group, depth, scale):
    value, offset, mask = (tensor.clone().requires_grad_() for tensor in (value, offset, mask))
    output = operator(value, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, group, depth, scale, False)
    output.backward(torch.ones_like(output))
    point_offset_finite = offset.grad.view(*offset.shape[:3], -1, 2).isfinite().all(-1)
    return output.detach(), value.grad, point_offset_finite, mask.grad


@pytest.mark.parametrize("group, depth", [(2, 16), (1, 64), (2, 5)])  # vectorised footprints, and the generic loop
@pytest.mark.parametrize(
    "case",
    [
        "inf value at the first pixel",
        "nan value at the border",
        "nan and inf offsets",
        "nan weight of a point outside the map",
        "nan offset_scale",
    ],
)
def test_kernel_propagates_non_finite_numbers_as_the_pytorch_operator(kernel, case, group, depth):
    """A non-finite value changes only the outputs whose footprint covers it, a non-finite location or weight gives
    NaN: the kernel's outputs and gradients are non-finite exactly where the PyTorch operator's are, and agree
    elsewhere."""
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(2, 6, 6, group * depth, generator=generator)
    offset = 0.8 * torch.randn(2, 6, 6, group * 18, generator=generator)
    mask = torch.rand(2, 6, 6, group * 9, generator=generator)
    inputs = _nonfinite_case(case, value, offset, mask)
    expected = _with_gradients(dcnv3_core_pytorch, *inputs[:3], group, depth, inputs[3])
    actual = _with_gradients(kernel.dcnv3, *inputs[:3], group, depth, inputs[3])
    assert (~expected[0].isfinite()).any(), "the case must produce non-finite outputs"
    for name, want, got in zip(["output", "value grad", "offset grad finite", "mask grad"], expected, actual):
        if want.dtype == torch.bool:
            assert torch.equal(got, want), name
            continue
        assert torch.equal(got.isfinite(), want.isfinite()), f"{name}: non-finite at other places"
        finite = want.isfinite()
        torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-4, msg=name)


# --- converter -----------------------------------------------------------------------------------------------------


def convert(*args) -> int:
    return converter.main([str(arg) for arg in args])


def tiny_t_args(fixtures_dir, output_dir, *extra, checkpoint=None, architecture=None):
    """Converter arguments for tiny_t's weights and architecture, either replaceable."""
    checkpoint = checkpoint or fixtures_dir / "models" / "tiny_t.safetensors"
    architecture = architecture or fixtures_dir / "models" / "tiny_t.json"
    return ["--checkpoint", checkpoint, "--original-config", architecture, "--output-dir", output_dir, *extra]


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error


@pytest.fixture
def existing_output(fixtures_dir, tmp_path):
    """A good converted directory that a failed conversion must leave as it is."""
    target = tmp_path / "out"
    assert convert(*tiny_t_args(fixtures_dir, target)) == 0
    return target, {path.name: path.read_bytes() for path in target.iterdir()}


def assert_unchanged(target: Path, contents: dict) -> None:
    assert {path.name: path.read_bytes() for path in target.iterdir()} == contents
    assert not [path for path in target.parent.iterdir() if path.name.startswith(f".{target.name}.")]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "-5"], "--image-size -5"),
        (["--max-shard-size", "abc"], "--max-shard-size 'abc'"),
        (["--push-to-hub", "not a/valid//id"], "--push-to-hub"),
        (["--label-file", "LABELS"], "does not parse"),
        (["--variant", "q"], "Unknown InternImage variant"),
    ],
)
def test_every_flag_is_checked_before_the_old_output_is_touched(
    flags, message, fixtures_dir, existing_output, tmp_path, capsys
):
    target, contents = existing_output
    (tmp_path / "labels.json").write_text("{not json")
    flags = [str(tmp_path / "labels.json") if flag == "LABELS" else flag for flag in flags]
    args = ["--checkpoint", fixtures_dir / "models" / "tiny_t.safetensors", "--output-dir", target, "--overwrite"]
    if "--variant" not in flags:
        args += ["--original-config", fixtures_dir / "models" / "tiny_t.json"]
    capsys.readouterr()
    assert convert(*args, *flags) == 2
    assert message in one_error_line(capsys)
    assert_unchanged(target, contents)


def test_a_directory_that_appears_during_the_conversion_is_kept(fixtures_dir, tmp_path, monkeypatch, capsys):
    target = tmp_path / "out"
    real_verify = converter.verify_reload

    def verify_while_another_writer_arrives(model, directory):
        target.mkdir()
        (target / "theirs.txt").write_text("another process")
        return real_verify(model, directory)

    monkeypatch.setattr(converter, "verify_reload", verify_while_another_writer_arrives)
    assert convert(*tiny_t_args(fixtures_dir, target)) == 2
    assert "appeared while converting" in one_error_line(capsys)
    assert_unchanged(target, {"theirs.txt": b"another process"})


def test_two_concurrent_conversions_to_one_target_one_wins(fixtures_dir, tmp_path):
    target = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), *map(str, tiny_t_args(fixtures_dir, target))]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(error for code, error in results if code == 2)
    assert "appeared while converting" in loser or "already exists" in loser
    assert (target / "model.safetensors").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out.")]


@pytest.mark.parametrize(
    "where", ["is the checkpoint directory", "holds the checkpoint", "is the cwd", "holds the cwd"]
)
def test_output_dir_overlapping_what_is_read_is_refused(where, fixtures_dir, tmp_path, monkeypatch, capsys):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        (source / name).write_bytes((fixtures_dir / "opengvlab_hub_format" / "tiny_s" / name).read_bytes())
    output = {
        "is the checkpoint directory": source,
        "holds the checkpoint": tmp_path,
        "is the cwd": Path("."),
        "holds the cwd": Path(".."),
    }[where]
    monkeypatch.chdir(source)
    before = sorted(path.name for path in source.iterdir())
    assert convert("--checkpoint", source, "--output-dir", output, "--overwrite") == 2
    assert "--output-dir" in one_error_line(capsys)
    assert sorted(path.name for path in source.iterdir()) == before


def test_output_under_a_file_is_one_line(fixtures_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "a_file" / "out")) == 2
    assert "not a writable directory" in one_error_line(capsys)


def test_an_existing_file_is_not_replaced_by_a_directory(fixtures_dir, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out", "--overwrite")) == 2
    assert "is a file, not a directory" in one_error_line(capsys)
    assert (tmp_path / "out").read_text() == "mine"


def test_replacing_keeps_a_whole_directory_in_place_at_every_instant(fixtures_dir, existing_output, tmp_path):
    """kill -9 at several points of a replacement (fractions of a whole run's time, most of them in its writing
    phase): the target always holds a whole old or new directory, and the next conversion leaves nothing behind."""
    target, _ = existing_output
    command = [sys.executable, str(SCRIPT), *map(str, tiny_t_args(fixtures_dir, target, "--overwrite"))]
    started = time.monotonic()
    subprocess.run(command, capture_output=True, check=True, timeout=300)
    whole_run = time.monotonic() - started
    for fraction in (0.5, 0.75, 0.85, 0.92, 0.97):
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + fraction * whole_run
        while time.monotonic() < deadline and run.poll() is None:
            assert (target / "config.json").exists() and (target / "model.safetensors").exists()
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert_logits_of_tiny_t(target)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out.")]


def assert_logits_of_tiny_t(model_dir: Path) -> None:
    from transformers import AutoModelForImageClassification

    _, _, io = load_fixture_case("tiny_t")
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io["input0.pixel_values"]).logits, io["input0.logits"], atol=1e-4, rtol=0)


def test_leftovers_of_a_killed_conversion_are_removed_and_reported(fixtures_dir, tmp_path, capsys):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    leftover = tmp_path / f".out.{finished.pid}-abc123.partial"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".out.{os.getpid()}-def456.partial"  # a conversion still running: left alone
    alive.mkdir()
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out")) == 0
    assert f"removed {leftover.name}" in capsys.readouterr().out
    assert not leftover.exists() and alive.exists()


def _torch_save(path: Path, payload) -> Path:
    torch.save(payload, path)
    return path


def _tiny_t_state_dict():
    return load_fixture_case("tiny_t")[1]


def test_non_finite_weights_are_named(fixtures_dir, tmp_path, capsys):
    state_dict = _tiny_t_state_dict()
    state_dict["levels.1.blocks.0.mlp.fc1.weight"][0, 0] = math.nan
    checkpoint = _torch_save(tmp_path / "nan.pth", {"model": state_dict})
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out", checkpoint=checkpoint)) == 2
    error = one_error_line(capsys)
    assert "encoder.stages.1.layers.0.mlp.fc1.weight" in error and "NaN" in error
    assert not (tmp_path / "out").exists()


def test_integer_tensors_where_weights_belong_are_named(fixtures_dir, tmp_path, capsys):
    state_dict = _tiny_t_state_dict()
    state_dict["head.weight"] = state_dict["head.weight"].long()
    checkpoint = _torch_save(tmp_path / "int.pth", {"model": state_dict})
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out", checkpoint=checkpoint)) == 2
    assert "classifier.weight is stored as torch.int64" in one_error_line(capsys)


def test_a_reload_check_giving_nan_fails(fixtures_dir, tmp_path, monkeypatch, capsys):
    real_outputs = converter.model_outputs
    calls = []

    def nan_after_reload(model, pixel_values):
        calls.append(model)
        outputs = real_outputs(model, pixel_values)
        return [output * math.nan for output in outputs] if len(calls) == 2 else outputs

    monkeypatch.setattr(converter, "model_outputs", nan_after_reload)
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out")) == 2
    assert "differ" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_bytes_flipped_inside_tensor_data_are_detected(fixtures_dir, tmp_path, capsys):
    original = fixtures_dir / "raw_checkpoints" / "tiny_t_classification.pth"
    data = bytearray(original.read_bytes())
    with zipfile.ZipFile(original) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    header = member.header_offset
    name_length, extra_length = (
        int.from_bytes(data[header + 26 : header + 28], "little"),
        int.from_bytes(data[header + 28 : header + 30], "little"),
    )
    position = header + 30 + name_length + extra_length + member.file_size // 2
    data[position] ^= 0xFF
    (tmp_path / "flipped.pth").write_bytes(bytes(data))
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out", checkpoint=tmp_path / "flipped.pth")) == 2
    assert f"member {member.filename} fails its CRC-32 check" in one_error_line(capsys)


def test_unsafe_pickle_keeps_torchs_line(fixtures_dir, tmp_path, capsys):
    class RunsACommand:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    checkpoint = _torch_save(tmp_path / "evil.pth", {"model": _tiny_t_state_dict(), "extra": RunsACommand()})
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out", checkpoint=checkpoint)) == 2
    assert "Trying to load unsupported GLOBAL posix.system" in one_error_line(capsys)


@pytest.mark.parametrize(
    "architecture, message",
    [
        ({"offset_scal": 2.0}, "offset_scal (did you mean offset_scale?)"),
        ({"channels": "16"}, "Field 'channels' expected int, got str (value: '16')"),
        ({"channels": 16.0}, "Field 'channels' expected int, got float (value: 16.0)"),
    ],
)
def test_architecture_json_keys_and_values_are_checked(architecture, message, fixtures_dir, tmp_path, capsys):
    kwargs = json.loads((fixtures_dir / "models" / "tiny_t.json").read_text())["original_constructor_kwargs"]
    (tmp_path / "arch.json").write_text(json.dumps({**kwargs, **architecture}))
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out", architecture=tmp_path / "arch.json")) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("MODEL: 5\n", "MODEL must be a mapping, got 5"),
        (
            "MODEL:\n  NUM_CLASSES: ten\n  INTERN_IMAGE:\n    CHANNELS: 16\n",
            "MODEL.NUM_CLASSES must be an integer, got 'ten'",
        ),
        ("MODEL:\n  INTERN_IMAGE:\n    CHANNELS: 16.0\n", "Field 'channels' expected int, got float (value: 16.0)"),
        ("MODEL:\n  INTERN_IMAGE:\n    CHANNELS: 16\n    DEPTHS: '1,1,2,1'\n", "Validation error for field 'depths'"),
        (
            "MODEL:\n  INTERN_IMAGE:\n    CHANNELS: 16\n    OFFSET_SCAL: 2.0\n",
            "offset_scal (did you mean offset_scale?)",
        ),
        ("DATA:\n  IMG_SIZE: big\nMODEL:\n  INTERN_IMAGE:\n    CHANNELS: 16\n", "DATA.IMG_SIZE must be an integer"),
    ],
)
def test_malformed_training_yaml_names_the_field(yaml_text, message, fixtures_dir, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml_text)
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out", architecture=tmp_path / "config.yaml")) == 2
    assert message in one_error_line(capsys)


def test_push_to_hub_offline_is_refused_before_converting(fixtures_dir, tmp_path, capsys):
    assert convert(*tiny_t_args(fixtures_dir, tmp_path / "out", "--push-to-hub", "someone/model")) == 2
    assert "HF_HUB_OFFLINE" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_batch_mode_reports_a_bad_file_and_converts_the_others(fixtures_dir, tmp_path, capsys):
    manifest = json.loads((fixtures_dir / "manifests" / "internimage_t.json").read_text())
    released = tmp_path / "released"
    released.mkdir()
    state_dict = {
        key: torch.zeros((), dtype=torch.long if key.endswith("num_batches_tracked") else torch.float32).expand(shape)
        for key, shape in manifest["state_dict_shapes"].items()
    }
    torch.save({"model": state_dict}, released / "internimage_t_1k_224.pth")
    (released / "internimage_s_1k_224.pth").write_text("not a checkpoint")
    assert convert("--batch-dir", released, "--output-dir", tmp_path / "converted") == 2
    output = capsys.readouterr()
    assert "error: internimage_s_1k_224.pth:" in output.err
    assert "batch: 1 converted, 1 failed (internimage_s_1k_224.pth)" in output.out
    assert [path.name for path in (tmp_path / "converted").iterdir()] == ["internimage_t_1k_224"]
