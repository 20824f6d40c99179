"""DCNv3 CPU kernel against the pure-PyTorch operator of `modeling_internimage`, at the four stage shapes of
InternImage-T (batch 8, 224x224 input), measured in one run. Prints per-stage medians and the ratio over a whole
network pass (each stage weighted by its number of blocks: 4, 4, 18, 4); with `--compile`, also the PyTorch operator
under torch.compile (static shapes; compiled in the untimed first call).

    .venv/bin/python benchmarks/benchmark_dcnv3_cpu.py [--build hub_kernels/dcnv3/build] [--repeats 7] [--compile]
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from kernels import get_local_kernel

from modeling_internimage.dcnv3 import dcnv3_core_pytorch


# (height = width, groups, blocks) of InternImage-T's stages at 224x224; 16 channels per group.
T_STAGES = [(56, 4, 4), (28, 8, 4), (14, 16, 18), (7, 32, 4)]
PHASES = ("fwd", "bwd")


def stage_inputs(size: int, groups: int, batch: int = 8, generator: torch.Generator | None = None):
    """Value, offsets of about half a pixel (trained InternImage offsets are of that order) and softmax weights."""
    value = torch.randn(batch, size, size, groups * 16, generator=generator)
    offset = 0.5 * torch.randn(batch, size, size, groups * 18, generator=generator)
    mask = torch.randn(batch, size, size, groups, 9, generator=generator).softmax(-1).flatten(-2)
    return value, offset, mask


def median_ms(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(op, inputs, settings, repeats):
    """(forward ms, backward ms) of `op`; backward alone, from a forward whose graph is rebuilt each time."""
    with torch.inference_mode():
        forward = median_ms(lambda: op(*inputs, *settings), repeats)
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    upstream = torch.randn_like(inputs[0])

    def backward_only():
        output = op(*leaves, *settings)
        start = time.perf_counter()
        output.backward(upstream)
        return time.perf_counter() - start

    backward_only()
    backward = 1000 * statistics.median(backward_only() for _ in range(repeats))
    return forward, backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--build", type=Path, default=Path(__file__).resolve().parents[1] / "hub_kernels" / "dcnv3" / "build"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--compile", action="store_true", help="also time the PyTorch operator under torch.compile (static shapes)"
    )
    args = parser.parse_args()
    kernel = get_local_kernel(args.build)
    operators = {"torch": dcnv3_core_pytorch, "kernel": kernel.dcnv3}
    if args.compile:
        operators["compiled"] = torch.compile(dcnv3_core_pytorch, dynamic=False)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, batch 8")
    names = list(operators)
    ratio_pairs = [("torch", "kernel")] + [("compiled", "torch")] * args.compile
    header = "".join(f"{name + ' ' + phase:>{len(name) + 6}}" for phase in PHASES for name in names)
    ratios = "".join(f"{top + '/' + bottom + ' fwd, bwd':>20}" for top, bottom in ratio_pairs)
    print(f"{'stage':<18}{header}{ratios}")
    totals = {(name, phase): 0.0 for name in names for phase in PHASES}
    for size, groups, blocks in T_STAGES:
        inputs = stage_inputs(size, groups, generator=generator)
        settings = (3, 3, 1, 1, 1, 1, 1, 1, groups, 16, 1.0, False)
        times = {}
        for name, op in operators.items():
            times[name, "fwd"], times[name, "bwd"] = measure(op, inputs, settings, args.repeats)
            for phase in PHASES:
                totals[name, phase] += blocks * times[name, phase]
        print(f"{f'{size}x{size}, G={groups}':<18}{format_row(times, names, ratio_pairs)}")
    print(f"{'network (x blocks)':<18}{format_row(totals, names, ratio_pairs)}")


def format_row(times: dict, names: list[str], ratio_pairs: list[tuple[str, str]]) -> str:
    cells = "".join(f"{times[name, phase]:>{len(name) + 6}.2f}" for phase in PHASES for name in names)
    ratios = "".join(
        f"{times[top, 'fwd'] / times[bottom, 'fwd']:>14.2f}{times[top, 'bwd'] / times[bottom, 'bwd']:>6.2f}"
        for top, bottom in ratio_pairs
    )
    return cells + ratios


if __name__ == "__main__":
    main()
