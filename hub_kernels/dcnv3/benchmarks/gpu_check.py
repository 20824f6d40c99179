"""One-shot GPU validation of the CUDA DCNv3 kernel (run by scripts/gpu_check.sh on a lent GPU machine).

1. Correctness against the pure-PyTorch operator in float32, float16 and bfloat16 on fresh random inputs whose
   sampling points partly fall outside the image and stay off the integer grid (`off_grid_offsets`), at several
   shapes (odd batch, remove_center, kernel 5, offset_scale 2, group widths 8/16/32).
2. torch.autograd.gradcheck in float64 on small sizes; deterministic-mode refusal of the backward.
3. Forward and backward times, beside the PyTorch operator's, at InternImage-T and -B stage shapes (batch 32 at
   224), with the achieved memory bandwidth (bytes of the inputs read once and outputs written once) as a fraction
   of the device's measured copy bandwidth.

    python hub_kernels/dcnv3/benchmarks/gpu_check.py --build hub_kernels/dcnv3/build
Exits non-zero if a check fails.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[3]


def import_path(name: str, init_file: Path, package_dir: Path | None = None):
    """Import a module or package from a file, without `kernels` or this package's `__init__` (the GPU image has
    neither installed)."""
    locations = [str(package_dir)] if package_dir else None
    spec = importlib.util.spec_from_file_location(name, init_file, submodule_search_locations=locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_cuda_variant(build: Path):
    variant = next(path for path in sorted(build.glob("torch*-cu*")) if (path / "metadata.json").exists())
    name = json.loads((variant / "metadata.json").read_text())["id"]
    return import_path(name, variant / "__init__.py", variant)


dcnv3_core_pytorch = import_path("internimage_dcnv3", ROOT / "modeling_internimage" / "dcnv3.py").dcnv3_core_pytorch


STAGES = {"T": [(56, 4), (28, 8), (14, 16), (7, 32)], "B": [(56, 7), (28, 14), (14, 28), (7, 56)]}


def settings(group, depth, kernel=3, pad=1, offset_scale=1.0, remove_center=False):
    return (kernel, kernel, 1, 1, pad, pad, 1, 1, group, depth, offset_scale, remove_center)


def inputs(batch, size, group, depth, points, dtype, offset_std=2.0):
    value = torch.randn(batch, size, size, group * depth, device="cuda", dtype=dtype)
    offset = offset_std * torch.randn(batch, size, size, group * points * 2, device="cuda", dtype=dtype)
    mask = torch.rand(batch, size, size, group * points, device="cuda", dtype=dtype)
    return value, offset, mask


def off_grid_offsets(shape, offset_scale: float, dtype) -> torch.Tensor:
    """Offsets that put every sampling point 0.05 to 0.95 input pixels past an integer position: at integer positions
    bilinear sampling has kinks where either one-sided derivative is right, and in half precision offsets land there
    often enough for implementations to pick different sides. Whole parts up to 4 pixels put points of the border
    pixels outside the map."""
    whole = torch.randint(-4, 5, shape, device="cuda")
    fraction = 0.05 + 0.9 * torch.rand(shape, device="cuda")
    return ((whole + fraction) / offset_scale).to(dtype)


def check_correctness(kernel) -> bool:
    ok = True
    cases = [
        dict(group=4, depth=16),
        dict(group=2, depth=32, offset_scale=2.0),
        dict(group=3, depth=8, remove_center=True),
        dict(group=2, depth=16, kernel=5, pad=2),
    ]
    for case in cases:
        args = settings(
            case["group"],
            case["depth"],
            case.get("kernel", 3),
            case.get("pad", 1),
            case.get("offset_scale", 1.0),
            case.get("remove_center", False),
        )
        points = args[0] * args[1] - int(args[-1])
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
            value, offset, mask = inputs(3, 17, case["group"], case["depth"], points, dtype)
            tensors = (value, off_grid_offsets(offset.shape, args[10], dtype), mask)
            leaves = [t.clone().requires_grad_() for t in tensors]
            reference_leaves = [t.float().clone().requires_grad_() for t in tensors]
            output = kernel.dcnv3(*leaves, *args)
            reference = dcnv3_core_pytorch(*reference_leaves, *args)
            upstream = torch.randn_like(output)
            output.backward(upstream)
            reference.backward(upstream.float())
            errors = [((output.float() - reference).abs().max() / reference.abs().max()).item()]
            errors += [
                ((a.grad.float() - b.grad).abs().max() / b.grad.abs().max()).item()
                for a, b in zip(leaves, reference_leaves)
            ]
            passed = max(errors) <= tolerance
            ok &= passed
            print(
                f"{'ok ' if passed else 'FAIL'} {case} {str(dtype):15} rel. errors out/value/offset/mask "
                + " ".join(f"{e:.1e}" for e in errors)
            )
    return ok


def check_gradients(kernel) -> bool:
    args = settings(2, 4)
    tensors = [t.requires_grad_() for t in inputs(2, 5, 2, 4, 9, torch.float64, offset_std=1.0)]
    passed = torch.autograd.gradcheck(lambda v, o, m: kernel.dcnv3(v, o, m, *args), tensors, eps=1e-6, atol=1e-5)
    print(f"{'ok ' if passed else 'FAIL'} gradcheck float64")
    torch.use_deterministic_algorithms(True)
    try:
        kernel.dcnv3(*tensors, *args).sum().backward()
        refused = False
    except RuntimeError as error:
        refused = "deterministic" in str(error)
    finally:
        torch.use_deterministic_algorithms(False)
    print(f"{'ok ' if refused else 'FAIL'} backward refuses deterministic mode")
    return passed and refused


def time_ms(function, repeats=20) -> float:
    function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def copy_bandwidth() -> float:
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() / (time_ms(lambda: target.copy_(source)) * 1e-3)


def benchmark(kernel, batch: int) -> None:
    peak = copy_bandwidth()
    print(f"device copy bandwidth {peak / 1e9:.0f} GB/s; batch {batch}, float32 and bfloat16")
    print(
        f"{'model':<6}{'stage':<14}{'dtype':<10}{'fwd ms':>8}{'fwd BW':>8}{'bwd ms':>8}{'bwd BW':>8}"
        f"{'torch fwd':>10}{'torch bwd':>10}"
    )
    for model, stages in STAGES.items():
        for size, group in stages:
            for dtype in (torch.float32, torch.bfloat16):
                args = settings(group, 16)
                value, offset, mask = inputs(batch, size, group, 16, 9, dtype, offset_std=0.5)
                forward = time_ms(lambda: kernel.dcnv3(value, offset, mask, *args))
                leaves = [t.clone().requires_grad_() for t in (value, offset, mask)]
                output = kernel.dcnv3(*leaves, *args)
                upstream = torch.randn_like(output)
                backward = time_ms(lambda: torch.autograd.grad(output, leaves, upstream, retain_graph=True))
                torch_forward = time_ms(lambda: dcnv3_core_pytorch(value, offset, mask, *args), repeats=5)
                torch_output = dcnv3_core_pytorch(*leaves, *args)
                torch_backward = time_ms(
                    lambda: torch.autograd.grad(torch_output, leaves, upstream, retain_graph=True), repeats=5
                )
                size_of = value.element_size()
                forward_bytes = (2 * value.numel() + offset.numel() + mask.numel()) * size_of
                backward_bytes = 2 * forward_bytes + value.numel() * 4  # inputs + grads, float32 value accumulator
                print(
                    f"{model:<6}{f'{size}x{size} G={group}':<14}{str(dtype)[6:]:<10}{forward:>8.3f}"
                    f"{forward_bytes / (forward * 1e-3) / peak:>8.0%}{backward:>8.3f}"
                    f"{backward_bytes / (backward * 1e-3) / peak:>8.0%}{torch_forward:>10.3f}"
                    f"{torch_backward:>10.3f}"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=Path(__file__).resolve().parents[1] / "build")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    kernel = load_cuda_variant(args.build)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    ok = check_correctness(kernel)
    ok &= check_gradients(kernel)
    benchmark(kernel, args.batch)
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
