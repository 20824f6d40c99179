"""Tests of the dcnv3 kernel on its own: against a direct reference, with opcheck, gradcheck and torch.compile.

The kernel is loaded as users load it, `kernels.get_kernel("internimage-hf/dcnv3", version=1)`, with
`LOCAL_KERNELS` pointing that repo at a local build (default `../build`, or DCNV3_KERNEL_BUILD), so these tests
exercise what would be published.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernels import get_kernel
from torch._inductor.utils import run_and_get_code


REPO_ID = "internimage-hf/dcnv3"
KERNEL_ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("DCNV3_KERNEL_BUILD", Path(__file__).resolve().parents[1] / "build"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def kernel():
    with pytest.MonkeyPatch.context() as environment:
        if "LOCAL_KERNELS" not in os.environ:
            if not BUILD.is_dir():
                pytest.fail(f"no kernel build at {BUILD}: run `python hub_kernels/build_local.py dcnv3 --backend cpu`")
            environment.setenv("LOCAL_KERNELS", f"{REPO_ID}={BUILD}")
        yield get_kernel(REPO_ID, version=1)


def settings(group, group_channels, kernel_size=3, stride=1, pad=1, dilation=1, offset_scale=1.0, remove_center=False):
    return (
        kernel_size,
        kernel_size,
        stride,
        stride,
        pad,
        pad,
        dilation,
        dilation,
        group,
        group_channels,
        offset_scale,
        remove_center,
    )


def reference_dcnv3(value, offset, mask, settings_):
    """The DCNv3 definition computed point by point in float64 (slow, obviously right)."""
    kh, kw, sh, sw, ph, pw, dh, dw, group, depth, scale, remove_center = settings_
    value, offset, mask = value.double(), offset.double(), mask.double()
    batch, height, width, _ = value.shape
    _, out_h, out_w, _ = offset.shape
    points = [(ix, iy) for ix in range(kw) for iy in range(kh)]
    if remove_center:
        points.pop((kh * kw - 1) // 2)
    half_w, half_h = dw * (kw - 1) // 2, dh * (kh - 1) // 2
    padded = torch.nn.functional.pad(value, (0, 0, 1, 1, 1, 1))  # one pixel of zeros around the map
    output = value.new_zeros(batch, out_h, out_w, group * depth)
    ys, xs = torch.meshgrid(torch.arange(out_h), torch.arange(out_w), indexing="ij")
    for g in range(group):
        for p, (ix, iy) in enumerate(points):
            index = g * len(points) + p
            x = xs * sw - pw + half_w + scale * (ix * dw - half_w + offset[..., 2 * index])
            y = ys * sh - ph + half_h + scale * (iy * dh - half_h + offset[..., 2 * index + 1])
            x0, y0 = x.floor(), y.floor()
            inside = ((x > -1) & (y > -1) & (x < width) & (y < height)).double()
            for cy, cx in ((0, 0), (0, 1), (1, 0), (1, 1)):
                weight = (1 - (x - x0 - cx).abs()) * (1 - (y - y0 - cy).abs()) * inside
                rows = (y0 + cy).clamp(-1, height).long() + 1
                cols = (x0 + cx).clamp(-1, width).long() + 1
                sample = padded[torch.arange(batch)[:, None, None], rows, cols, g * depth : (g + 1) * depth]
                output[..., g * depth : (g + 1) * depth] += (mask[..., index] * weight)[..., None] * sample
    return output


def random_inputs(batch, height, width, group, depth, points, device="cpu", dtype=torch.float32, seed=0, out=None):
    generator = torch.Generator().manual_seed(seed)
    out_h, out_w = out or (height, width)
    value = torch.randn(batch, height, width, group * depth, generator=generator)
    offset = 2.5 * torch.randn(batch, out_h, out_w, group * points * 2, generator=generator)  # some fall outside
    mask = torch.rand(batch, out_h, out_w, group * points, generator=generator)
    return [tensor.to(device=device, dtype=dtype) for tensor in (value, offset, mask)]


CASES = [
    dict(group=4, group_channels=16),
    dict(group=2, group_channels=32, offset_scale=2.0),
    dict(group=3, group_channels=5, remove_center=True),
    dict(group=2, group_channels=16, remove_center=True),
    dict(group=2, group_channels=8, kernel_size=5, pad=2),
    dict(group=1, group_channels=7, stride=2),
    dict(group=2, group_channels=3, dilation=2, pad=2),
]


def output_size(size, case):
    k, s, p, d = case.get("kernel_size", 3), case.get("stride", 1), case.get("pad", 1), case.get("dilation", 1)
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(kernel, device, case):
    args = settings(**case)
    points = args[0] * args[1] - int(args[-1])
    out = (output_size(9, case), output_size(11, case))
    value, offset, mask = random_inputs(2, 9, 11, case["group"], case["group_channels"], points, device, out=out)
    torch.testing.assert_close(
        kernel.dcnv3(value, offset, mask, *args).double().cpu(),
        reference_dcnv3(value, offset, mask, args).cpu(),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_float32_gradients_match_reference(kernel, device, case):
    """Float32 backward (on the CPU, group widths of 8, 16 and 32 take the vectorised-footprint path) against float64
    autograd through the reference; offsets of a few pixels put many points at and beyond the border."""
    args = settings(**case)
    points = args[0] * args[1] - int(args[-1])
    out = (output_size(9, case), output_size(11, case))
    inputs = random_inputs(2, 9, 11, case["group"], case["group_channels"], points, device, out=out)
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    reference_leaves = [tensor.double().cpu().requires_grad_() for tensor in inputs]
    upstream = torch.randn(2, *out, case["group"] * case["group_channels"], generator=torch.Generator().manual_seed(1))
    kernel.dcnv3(*leaves, *args).backward(upstream.to(device))
    reference_dcnv3(*reference_leaves, args).backward(upstream.double())
    for leaf, reference in zip(leaves, reference_leaves):
        scale = reference.grad.abs().max().item()
        torch.testing.assert_close(leaf.grad.double().cpu(), reference.grad, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_accumulates_in_float32(kernel, device, dtype, tolerance):
    args = settings(4, 16)
    value, offset, mask = random_inputs(2, 12, 10, 4, 16, 9, device, dtype)
    output = kernel.dcnv3(value, offset, mask, *args)
    assert output.dtype == dtype
    expected = reference_dcnv3(value, offset, mask, args)
    assert ((output.double().cpu() - expected.cpu()).abs().max() / expected.abs().max()).item() < tolerance


def off_grid_offsets(shape, offset_scale, seed=0):
    """Offsets that put every sampling point 0.05 to 0.95 pixels past an integer position: at integer positions
    bilinear sampling has kinks where either one-sided derivative is right, and in half precision offsets land there
    often enough for implementations to pick different sides. Whole parts up to 4 pixels put points of the border
    pixels outside the map."""
    generator = torch.Generator().manual_seed(seed)
    whole = torch.randint(-4, 5, shape, generator=generator)
    return (whole + 0.05 + 0.9 * torch.rand(shape, generator=generator)) / offset_scale


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[4]])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_output_and_gradients_match_reference(kernel, device, case, dtype, tolerance):
    """Output and the three gradients in half precision, relative to their largest float64 reference value."""
    args = settings(**case)
    points = args[0] * args[1] - int(args[-1])
    value, offset, mask = random_inputs(3, 17, 17, case["group"], case["group_channels"], points)
    offset = off_grid_offsets(offset.shape, args[10])
    inputs = [tensor.to(dtype) for tensor in (value, offset, mask)]
    leaves = [tensor.to(device).requires_grad_() for tensor in inputs]
    reference_leaves = [tensor.detach().double().requires_grad_() for tensor in inputs]
    output = kernel.dcnv3(*leaves, *args)
    reference = reference_dcnv3(*reference_leaves, args)
    upstream = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    output.backward(upstream.to(device))
    reference.backward(upstream.double())
    pairs = [(output, reference)] + [(leaf.grad, ref.grad) for leaf, ref in zip(leaves, reference_leaves)]
    for name, (got, expected) in zip(["output", "value", "offset", "mask"], pairs):
        assert got.dtype == dtype, name
        error = (got.double().cpu() - expected).abs().max() / expected.abs().max()
        assert error.item() <= tolerance, (name, error.item())


def reference_softmax(mask_logits, group):
    """Softmax over each group's points in float64, as InternImage's module computes it before the operator."""
    return mask_logits.double().unflatten(-1, (group, -1)).softmax(-1).flatten(-2)


# Logits within the kernel's direct-exponential range (|l| <= 80), and beyond it, where the pixel takes the
# max-shifted formula.
LOGIT_SCALES = [3.0, 150.0]


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("logit_scale", LOGIT_SCALES)
def test_softmax_forward_matches_softmax_then_reference(kernel, device, case, logit_scale):
    args = settings(**case)
    points = args[0] * args[1] - int(args[-1])
    out = (output_size(9, case), output_size(11, case))
    value, offset, mask = random_inputs(2, 9, 11, case["group"], case["group_channels"], points, device, out=out)
    logits = logit_scale * (2 * mask - 1)
    torch.testing.assert_close(
        kernel.dcnv3_softmax(value, offset, logits, *args).double().cpu(),
        reference_dcnv3(value, offset, reference_softmax(logits, case["group"]), args).cpu(),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2), (torch.float64, 1e-12)])
def test_softmax_forward_in_other_dtypes(kernel, device, dtype, tolerance):
    args = settings(4, 16)
    value, offset, mask = random_inputs(2, 12, 10, 4, 16, 9, device, dtype)
    logits = 4 * mask - 2
    output = kernel.dcnv3_softmax(value, offset, logits, *args)
    assert output.dtype == dtype
    expected = reference_dcnv3(value, offset, reference_softmax(logits, 4), args)
    assert ((output.double().cpu() - expected.cpu()).abs().max() / expected.abs().max()).item() < tolerance


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[:3])
def test_softmax_gradcheck(kernel, device, case):
    args = settings(**{**case, "group_channels": 2})
    points = args[0] * args[1] - int(args[-1])
    inputs = [t.requires_grad_() for t in random_inputs(1, 5, 6, case["group"], 2, points, device, torch.float64)]
    assert torch.autograd.gradcheck(lambda v, o, m: kernel.dcnv3_softmax(v, o, m, *args), inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_float32_gradients_match_reference(kernel, device):
    args = settings(4, 16)
    inputs = random_inputs(2, 9, 11, 4, 16, 9, device)
    inputs[2] = 6 * inputs[2] - 3
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    reference_leaves = [tensor.double().cpu().requires_grad_() for tensor in inputs]
    upstream = torch.randn(2, 9, 11, 64, generator=torch.Generator().manual_seed(1))
    kernel.dcnv3_softmax(*leaves, *args).backward(upstream.to(device))
    value, offset, logits = reference_leaves
    reference_dcnv3(value, offset, reference_softmax(logits, 4), args).backward(upstream.double())
    for leaf, reference in zip(leaves, reference_leaves):
        scale = reference.grad.abs().max().item()
        torch.testing.assert_close(leaf.grad.double().cpu(), reference.grad, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group, depth", [(2, 16), (2, 5)])
def test_softmax_of_non_finite_logits_behaves_as_pytorch_softmax(kernel, device, group, depth):
    """A NaN logit, or +inf, makes that item NaN (as `Tensor.softmax` does); -inf gives its point weight 0 and the
    item stays finite; other items, and other groups of the same pixel, are untouched."""
    args = settings(group, depth)
    value, offset, mask = random_inputs(2, 7, 7, group, depth, 9, device)
    logits = 4 * mask - 2
    logits[0, 1, 2, 3] = float("nan")  # group 0
    logits[1, 4, 4, 9 + 2] = float("inf")  # group 1
    logits[1, 5, 0, 4] = -float("inf")  # group 0
    output = kernel.dcnv3_softmax(value, offset, logits, *args)
    expected = reference_dcnv3(value, offset, reference_softmax(logits, group), args)
    assert torch.equal(output.isnan().cpu(), expected.isnan())
    assert output.isnan().sum() == 2 * depth
    torch.testing.assert_close(output.nan_to_num().double().cpu(), expected.nan_to_num(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CPU backward is deterministic (test below)")
def test_cuda_backward_refuses_deterministic_mode(kernel):
    """The CUDA backward accumulates with atomics: under `torch.use_deterministic_algorithms` it must say so."""
    args = settings(2, 4)
    leaves = [tensor.requires_grad_() for tensor in random_inputs(2, 5, 5, 2, 4, 9, "cuda", torch.float64)]
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            kernel.dcnv3(*leaves, *args).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[:3])
def test_gradcheck(kernel, device, case):
    args = settings(**case)
    points = args[0] * args[1] - int(args[-1])
    inputs = [t.requires_grad_() for t in random_inputs(1, 5, 6, case["group"], 2, points, device, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda v, o, m: kernel.dcnv3(v, o, m, *settings(**{**case, "group_channels": 2})), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(kernel, device):
    args = settings(2, 8)
    inputs = random_inputs(2, 6, 7, 2, 8, 9, device)
    torch.library.opcheck(kernel.ops.dcnv3_forward, (*inputs, *args))
    torch.library.opcheck(kernel.ops.dcnv3_softmax_forward, (*inputs, *args))
    upstream = torch.randn(2, 6, 7, 16, device=device)
    torch.library.opcheck(kernel.ops.dcnv3_backward, (*inputs, upstream, *args))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group, depth", [(2, 16), (1, 64), (2, 5)])
def test_non_finite_value_reaches_only_the_outputs_whose_footprint_covers_it(kernel, device, group, depth):
    """Zero padding is never read: an Inf in the first pixel makes exactly the outputs non-finite that a 1 there
    changes (random offsets put no point exactly on an integer position, where a corner has weight 0)."""
    args = settings(group, depth)
    _, offset, mask = random_inputs(2, 7, 7, group, depth, 9, device)
    probe = torch.zeros(2, 7, 7, group * depth, device=device)
    probe[0, 0, 0] = 1.0
    covered = kernel.dcnv3(probe, offset, mask, *args) != 0
    assert covered.any() and not covered.all()
    probe[0, 0, 0] = float("inf")
    assert torch.equal(~kernel.dcnv3(probe, offset, mask, *args).isfinite(), covered)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group, depth", [(2, 16), (2, 5)])
@pytest.mark.parametrize("where", ["offset", "mask"])
def test_non_finite_offset_or_weight_gives_nan_there(kernel, device, group, depth, where):
    """A NaN offset, or a NaN weight of a point outside the map, makes that pixel's group NaN, with NaN offset
    gradients for the point (as `mask * grid_sample(...)` does); nothing else changes."""
    args = settings(group, depth)
    value, offset, mask = random_inputs(2, 7, 7, group, depth, 9, device)
    offset[1, 3, 4, 18 + 2 * 5] = -50.0  # group 1, point 5: far outside the map
    if where == "offset":
        offset[1, 3, 4, 18 + 2 * 5 + 1] = float("nan")
    else:
        mask[1, 3, 4, 9 + 5] = float("nan")
    leaves = [tensor.clone().requires_grad_() for tensor in (value, offset, mask)]
    output = kernel.dcnv3(*leaves, *args)
    output.sum().backward()
    expected = torch.zeros_like(output, dtype=torch.bool)
    expected[1, 3, 4, depth : 2 * depth] = True
    assert torch.equal(~output.isfinite(), expected)
    bad_offsets = ~leaves[1].grad.isfinite()
    assert bad_offsets[1, 3, 4, 28:30].all() and bad_offsets.sum() == 2
    assert leaves[0].grad.isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("function", ["dcnv3", "dcnv3_softmax"])
def test_torch_compile_fullgraph(kernel, device, function):
    args = settings(2, 8)
    inputs = random_inputs(2, 6, 7, 2, 8, 9, device)
    operator = getattr(kernel, function)
    compiled = torch.compile(lambda v, o, m: operator(v, o, m, *args) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), 2 * operator(*inputs, *args))


def test_large_batch_not_a_multiple_of_anything(kernel):
    args = settings(1, 4)
    inputs = random_inputs(257, 3, 3, 1, 4, 9)
    output = kernel.dcnv3(*inputs, *args)
    torch.testing.assert_close(output[256:], kernel.dcnv3(*[t[256:] for t in inputs], *args))


def test_backward_is_deterministic(kernel):
    args = settings(2, 8)
    inputs = [t.requires_grad_() for t in random_inputs(2, 8, 8, 2, 8, 9)]
    grads = []
    for _ in range(2):
        for tensor in inputs:
            tensor.grad = None
        kernel.dcnv3(*inputs, *args).sum().backward()
        grads.append([tensor.grad.clone() for tensor in inputs])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v, o, m: (v[..., :-1], o, m), "expected group \\* group_channels"),
        (lambda v, o, m: (v, o[..., :-2], m), "offset has shape"),
        (lambda v, o, m: (v, o, m[:1]), "mask has shape"),
        (lambda v, o, m: (v, o.double(), m), "share a dtype"),
        (lambda v, o, m: (v[0], o, m), "channels-last"),
    ],
)
@pytest.mark.parametrize("function", ["dcnv3", "dcnv3_softmax"])
def test_bad_arguments_are_named(kernel, change, message, function):
    inputs = change(*random_inputs(2, 6, 6, 2, 8, 9))
    with pytest.raises(RuntimeError, match=message):
        getattr(kernel, function)(*inputs, *settings(2, 8))


def test_remove_center_needs_odd_kernel(kernel):
    inputs = random_inputs(1, 6, 6, 1, 4, 15, out=(7, 7))
    with pytest.raises(RuntimeError, match="odd kernel"):
        kernel.dcnv3(*inputs, 4, 4, 1, 1, 2, 2, 1, 1, 1, 4, 1.0, True)


def test_benchmark_reference_matches_the_test_reference():
    """The `grid_sample` reference the benchmarks verify against computes the DCNv3 definition."""
    path = KERNEL_ROOT / "benchmarks" / "benchmark_dcnv3.py"
    spec = importlib.util.spec_from_file_location("benchmark_dcnv3", path)
    benchmarks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmarks)
    value, offset, mask = (tensor.double() for tensor in random_inputs(2, 7, 6, 3, 4, 9))
    expected = reference_dcnv3(value, offset, mask, settings(3, 4))
    torch.testing.assert_close(benchmarks.dcnv3_reference(value, offset, mask, 3), expected)


def test_kernels_benchmark_runs_and_verifies_every_workload(tmp_path):
    """`kernels benchmark <this tree>` (the build under it) runs every workload and each matches the reference."""
    if not (KERNEL_ROOT / "build").is_dir():
        pytest.fail("no kernel build under the tree: run `python hub_kernels/build_local.py dcnv3 --backend cpu`")
    command = [sys.executable, "-c", "from kernels.cli import main; main()", "benchmark", str(KERNEL_ROOT),
               "--iterations", "1", "--warmup", "0", "--output", str(tmp_path / "results.json")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    workloads = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(workloads) == 8 and all(workload["verified"] for workload in workloads)


# The MLP layer's fused linear (CPU variant only): exactly what nn.Linear and the activation compute.
ACTIVATIONS = {
    "none": lambda x: x,
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}


def mlp_weights(in_features=24, out_features=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    return weight, torch.randn(out_features, generator=generator)


@pytest.mark.kernels_ci
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_linear_activation_matches_linear_then_activation(kernel, activation):
    weight, bias = mlp_weights()
    inputs = 3 * torch.randn(2, 5, 7, 24, generator=torch.Generator().manual_seed(1))
    fused = kernel.ops.linear_activation(inputs, weight, bias, activation)
    expected = ACTIVATIONS[activation](torch.nn.functional.linear(inputs, weight, bias))
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    if torch.backends.mkldnn.is_available():  # the fast path is live, not the ATen fallback
        run = lambda: kernel.ops.linear_activation(inputs, weight, bias, activation)  # noqa: E731
        assert _op_calls(run, "mkldnn::_linear_pointwise") == 1


@pytest.mark.kernels_ci
@pytest.mark.parametrize("layout", ["transposed", "no bias", "float64", "empty"])
def test_linear_activation_handles_any_input(kernel, layout):
    weight, bias = mlp_weights()
    inputs = torch.randn(3, 4, 24, generator=torch.Generator().manual_seed(2))
    if layout == "transposed":
        inputs = torch.randn(3, 24, 4).transpose(1, 2)
    elif layout == "no bias":
        bias = None
    elif layout == "float64":
        inputs, weight, bias = inputs.double(), weight.double(), bias.double()
    elif layout == "empty":
        inputs = inputs[:0]
    fused = kernel.ops.linear_activation(inputs, weight, bias, "gelu")
    expected = torch.nn.functional.gelu(torch.nn.functional.linear(inputs, weight, bias))
    assert fused.dtype == inputs.dtype and fused.shape == expected.shape
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.kernels_ci
def test_linear_activation_opcheck(kernel):
    """Schema, fake (meta) implementation and dispatch agree, as torch.compile needs."""
    weight, bias = mlp_weights()
    inputs = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(4))
    for activation in ACTIVATIONS:
        torch.library.opcheck(kernel.ops.linear_activation, (inputs, weight, bias, activation))


def test_linear_activation_names_a_bad_activation_or_shape(kernel):
    weight, bias = mlp_weights()
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        kernel.ops.linear_activation(torch.randn(2, 24), weight, bias, "tanh")
    with pytest.raises(RuntimeError, match="input has 23 features but the weight expects 24"):
        kernel.ops.linear_activation(torch.randn(2, 23), weight, bias, "gelu")


class HostMLP(torch.nn.Module):
    """What the layer is kernelized onto: InternImage's MLP in the attributes the layer reads."""

    def __init__(self, hidden_act="gelu"):
        super().__init__()
        self.hidden_act = hidden_act
        self.fc1, self.fc2 = torch.nn.Linear(24, 40), torch.nn.Linear(40, 24)
        self.act = {"gelu": torch.nn.GELU(), "relu": torch.nn.ReLU(), "silu": torch.nn.SiLU()}[hidden_act]
        self.dropout = torch.nn.Dropout(0.0)

    def forward(self, hidden_states):
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))


@pytest.mark.kernels_ci
def test_mlp_layer_compiles_into_one_graph_with_the_fused_op(kernel, monkeypatch):
    """Under torch.compile the layer's checks trace without a graph break, and the graph calls the fused op."""
    monkeypatch.setattr(kernel.layers, "FUSED_LINEAR_PAYS", True)
    host = HostMLP().eval()
    host.forward = kernel.layers.InternImageMLP.forward.__get__(host)
    inputs = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    with torch.no_grad():
        output, sources = run_and_get_code(torch.compile(host, fullgraph=True), inputs)
        torch.testing.assert_close(output, HostMLP.forward(host, inputs), atol=1e-5, rtol=1e-5)
    assert sum(source.count(".linear_activation.default(") for source in sources) == 2


def _op_calls(run, op_suffix):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    return sum(event.count for event in profiler.key_averages() if event.key.endswith(op_suffix))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("hidden_act", ["gelu", "relu", "silu"])
def test_mlp_layer_fuses_in_inference_and_steps_aside_otherwise(kernel, hidden_act, monkeypatch):
    """Fused in float32 inference; the host's own layers for gradients and autocast. (Where it fuses at all is a
    speed choice, `FUSED_LINEAR_PAYS`: CPUs with AVX-512; it is set here so the logic is tested on any CPU.)"""
    assert kernel.layers.FUSED_LINEAR_PAYS == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    monkeypatch.setattr(kernel.layers, "FUSED_LINEAR_PAYS", True)
    host = HostMLP(hidden_act).eval()
    layer_forward = kernel.layers.InternImageMLP.forward.__get__(host)
    inputs = torch.randn(2, 6, 6, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _op_calls(lambda: layer_forward(inputs), "::linear_activation") == 2
        torch.testing.assert_close(layer_forward(inputs), host(inputs), atol=1e-5, rtol=1e-5)
    # Gradients wanted, or bfloat16 autocast: the host's own layers run.
    assert _op_calls(lambda: layer_forward(inputs).sum().backward(), "::linear_activation") == 0
    assert host.fc1.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _op_calls(lambda: layer_forward(inputs), "::linear_activation") == 0
