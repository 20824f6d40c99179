"""Run the kernel tree's benchmarks (`hub_kernels/dcnv3/benchmarks`, kernels' own runner) and write their table with
the bytes each workload moves as a fraction of the device's copy bandwidth, measured in the same run.

    python benchmarks/kernel_benchmark_tables.py --output-dir OUT [--iterations 50]

Writes OUT/kernel_benchmarks.json (kernels' result format) and OUT/kernel_benchmarks.md. kernels' runner is loaded
from its file, not through `kernels.cli`, whose package imports the signature verifier (sigstore), which the GPU
image does not have.
"""

import argparse
import datetime
import importlib.util
import json
import time
from pathlib import Path

import kernels
import torch


KERNEL_TREE = Path(__file__).resolve().parents[1] / "hub_kernels" / "dcnv3"
# Workload shapes of hub_kernels/dcnv3/benchmarks/benchmark_dcnv3.py: batch 8, 16 channels a group, 9 points.
STAGES = {"Stage1": (56, 4), "Stage2": (28, 8), "Stage3": (14, 16), "Stage4": (7, 32)}
BATCH, GROUP_CHANNELS, POINTS = 8, 16, 9


def kernels_benchmark_runner():
    path = Path(kernels.__file__).parent / "cli" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("kernels_benchmark_runner", path)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def copy_bandwidth(device: str) -> float:
    """Bytes read plus bytes written per second by a 256 MiB tensor copy on `device`."""
    source = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    synchronize()
    return 2 * source.numel() * 10 / (time.perf_counter() - start)


def moved_bytes(workload: str) -> int:
    """float32 bytes of the inputs read once and the outputs written once; the backward also reads the upstream
    gradient and writes the three input gradients."""
    stage, kind = workload.split(".")
    size, groups = STAGES[stage]
    pixels = BATCH * size * size
    value = pixels * groups * GROUP_CHANNELS
    forward = 4 * (2 * value + pixels * groups * POINTS * 3)  # value, output; offsets (x, y) and weights
    return forward if kind == "forward" else 3 * forward


def table(results: list[dict], bandwidth: float, device: str) -> str:
    lines = [
        f"Copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write) on {device}.",
        "",
        "| workload | mean (ms) | GB moved | fraction of copy bandwidth | verified |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        mean_ms = result["timingResults"]["mean_ms"]
        size = moved_bytes(result["workload"])
        fraction = size / (mean_ms * 1e-3) / bandwidth
        verified = result["verified"]
        lines.append(f"| {result['workload']} | {mean_ms:.3f} | {size / 1e9:.3f} | {fraction:.0%} | {verified} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    json_path = args.output_dir / "kernel_benchmarks.json"
    kernels_benchmark_runner().run_benchmark(
        repo_id=str(KERNEL_TREE), branch=None, version=None, iterations=args.iterations, warmup=args.warmup,
        output=str(json_path),
    )  # fmt: skip
    results = json.loads(json_path.read_text())["results"]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = (
        f"dcnv3 kernel benchmarks, {datetime.date.today()}, {name}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), `python benchmarks/kernel_benchmark_tables.py`\n\n"
    )
    markdown = header + table(results, copy_bandwidth(device), device)
    (args.output_dir / "kernel_benchmarks.md").write_text(markdown)
    print(markdown)
    if not all(result["verified"] for result in results):
        raise SystemExit("a workload does not match the reference")


if __name__ == "__main__":
    main()
