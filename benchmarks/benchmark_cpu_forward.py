"""CPU forward latency of InternImage-T at 224 against transformers' ConvNeXt-T and Swin-T, built from config in the
same run. Prints milliseconds and ratios to ConvNeXt-T; not a test (timings depend on the machine).

    .venv/bin/python benchmarks/benchmark_cpu_forward.py [--batch-sizes 1 8] [--repeats 5] [--threads N]
"""

import argparse
import platform
import statistics
import time

import torch
from transformers import ConvNextConfig, ConvNextModel, SwinConfig, SwinModel

from modeling_internimage import InternImageConfig, InternImageModel


def median_latency_ms(model: torch.nn.Module, batch_size: int, repeats: int, warmup: int = 2) -> float:
    pixel_values = torch.randn(batch_size, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(warmup):
            model(pixel_values)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixel_values)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def build_models() -> dict[str, torch.nn.Module]:
    convnext = ConvNextModel(ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]))
    swin = SwinModel(SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7))
    internimage = InternImageModel(InternImageConfig.from_variant("t"))
    return {"ConvNeXt-T": convnext.eval(), "Swin-T": swin.eval(), "InternImage-T": internimage.eval()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build_models()
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':<16}{'batch':>6}{'ms':>10}{'x ConvNeXt-T':>15}")
    for batch_size in args.batch_sizes:
        latencies = {name: median_latency_ms(model, batch_size, args.repeats) for name, model in models.items()}
        for name, latency in latencies.items():
            ratio = latency / latencies["ConvNeXt-T"]
            print(f"{name:<16}{batch_size:>6}{latency:>10.1f}{ratio:>15.2f}")


if __name__ == "__main__":
    main()
