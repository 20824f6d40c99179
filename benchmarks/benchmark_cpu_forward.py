"""CPU forward latency of InternImage-T at 224 against transformers' ConvNeXt-T and Swin-T, built from config in the
same run. Prints milliseconds and ratios to ConvNeXt-T; not a test (timings depend on the machine).

"InternImage-T (CPU kernel)" runs the hub kernel's CPU variant built locally
(`bash scripts/build_kernels.sh cpu`), when present. "InternImage-T (original op)" is the same model with the
original repository's PyTorch operator re-enacted step by step (padding, float32 reference grids, grid_sample over
(N*G, H*W, P) grids, mask multiply-sum, Tensor.softmax), so the gain of this package's operator is measured in the
same run. "InternImage-T (no DCNv3 op)" skips the deformable aggregation altogether (each core returns its input),
with the kernel's MLP layer where the kernel is built: the floor for any DCNv3 kernel. The hub kernel's CPU variant
also runs InternImage's MLPs (each linear layer one oneDNN op with its bias, fc1 fused with its GELU); "(CPU kernel,
DCNv3 only)" is InternImage-T without that, and "ConvNeXt-T (fused MLP)" gives transformers' ConvNeXt-T the kernel's
fused MLP, for a like-for-like reading. The models take turns, repeat by repeat, each timed in its steady state.

`--compile` adds ConvNeXt-T and InternImage-T (PyTorch operator, and CPU kernel) under `torch.compile` (static
shapes, compiled in the untimed first round). `--bf16` adds both models under CPU bf16 autocast; whether that can be
faster depends on the CPU having bf16 instructions (AVX-512 BF16 or AMX), which the printed capability tells.

Last, the fp32 GEMM floor: each model's multiply-adds (linear layers and convolutions, counted by torch's
FlopCounterMode) at the speed of one large sgemm measured in the same run, i.e. the time the model would take if all
of it ran at peak matrix-multiply speed and nothing else cost anything.

    .venv/bin/python benchmarks/benchmark_cpu_forward.py [--batch-sizes 1 8] [--repeats 5] [--threads N] [--breakdown]
        [--compile] [--bf16]
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import ConvNextConfig, ConvNextModel, SwinConfig, SwinModel
from transformers.models.convnext.modeling_convnext import ConvNextLayer

from modeling_internimage import DCNv3Core, InternImageConfig, InternImageModel, use_hub_kernels, uses_hub_kernel


KERNEL_BUILD = Path(__file__).resolve().parents[1] / "hub_kernels" / "dcnv3" / "build"


def original_style_dcnv3(core: DCNv3Core, value, offset, mask):
    """The original repository's `dcnv3_core_pytorch` algorithm (pad, normalise, grid_sample, weighted sum), re-enacted
    step by step for timing only."""
    kernel, pad, group, group_channels = core.kernel_size, core.pad, core.group, core.group_channels
    value = F.pad(value, [0, 0, pad, pad, pad, pad])
    batch, height_in, width_in, _ = value.shape
    _, height_out, width_out, _ = offset.shape
    half = (core.dilation * (kernel - 1)) // 2
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(half + 0.5, half + 0.5 + (height_out - 1) * core.stride, height_out, dtype=torch.float32),
        torch.linspace(half + 0.5, half + 0.5 + (width_out - 1) * core.stride, width_out, dtype=torch.float32),
        indexing="ij",
    )
    ref = torch.stack((ref_x.reshape(-1)[None] / width_in, ref_y.reshape(-1)[None] / height_in), -1)
    ref = ref.reshape(1, height_out, width_out, 1, 2)
    points = torch.linspace(-half, -half + (kernel - 1) * core.dilation, kernel, dtype=torch.float32)
    grid_x, grid_y = torch.meshgrid(points, points, indexing="ij")
    grid = torch.stack([grid_x / width_in, grid_y / height_in], -1).reshape(-1, 1, 2).repeat(1, group, 1)
    grid = grid.permute(1, 0, 2).reshape(1, 1, 1, group * kernel * kernel, 2)
    spatial_norm = torch.tensor([width_in, height_in]).reshape(1, 1, 1, 2).repeat(1, 1, 1, group * kernel * kernel)
    locations = (ref + grid * core.offset_scale).repeat(batch, 1, 1, 1, 1).flatten(3, 4)
    locations = locations + offset * core.offset_scale / spatial_norm
    num_points = kernel * kernel
    grids = (2 * locations - 1).view(batch, height_out * width_out, group, 2 * num_points).transpose(1, 2)
    grids = grids.flatten(0, 1).view(batch * group, height_out * width_out, num_points, 2)
    value = value.view(batch, height_in * width_in, group * group_channels).transpose(1, 2)
    value = value.reshape(batch * group, group_channels, height_in, width_in)
    sampled = F.grid_sample(value, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = mask.view(batch, height_out * width_out, group, num_points).transpose(1, 2)
    mask = mask.reshape(batch * group, 1, height_out * width_out, num_points)
    output = (sampled * mask).sum(-1).view(batch, group * group_channels, height_out * width_out)
    return output.transpose(1, 2).reshape(batch, height_out, width_out, -1).contiguous()


def check_original_style_op() -> None:
    """The re-enacted original must compute what this package's operator computes."""
    core = DCNv3Core(group=4, group_channels=16)
    value, offset, mask = torch.randn(2, 9, 11, 64), torch.randn(2, 9, 11, 72), torch.rand(2, 9, 11, 36)
    torch.testing.assert_close(original_style_dcnv3(core, value, offset, mask), core(value, offset, mask))


def with_core_forward(model: torch.nn.Module, forward) -> torch.nn.Module:
    """Route every DCNv3 core of `model` through `forward(core, value, offset, mask)`."""
    for module in model.modules():
        if isinstance(module, DCNv3Core):
            module.forward = lambda value, offset, mask, core=module: forward(core, value, offset, mask)
    return model


def original_style_softmax_dcnv3(core: DCNv3Core, value, offset, mask_logits):
    """The original module's `F.softmax` over the points, then its operator."""
    weights = F.softmax(mask_logits.unflatten(-1, (core.group, -1)), -1).flatten(-2)
    return original_style_dcnv3(core, value, offset, weights)


def with_original_style_op(model: torch.nn.Module) -> torch.nn.Module:
    """Route every DCNv3 core of `model` through the original algorithm (softmax included)."""
    return with_core_forward(model, original_style_softmax_dcnv3)


def timed_call_ms(model: torch.nn.Module, pixel_values: torch.Tensor) -> float:
    start = time.perf_counter()
    model(pixel_values)
    return 1000 * (time.perf_counter() - start)


def median_latencies_ms(models: dict[str, torch.nn.Module], batch_size: int, repeats: int, warmup: int = 1):
    """Median latency of each model in its steady state. The models take turns, so that the machine's drift touches
    all of them alike; each turn first runs one untimed forward, so that the allocator holds that model's working set
    (as when one model serves requests) rather than what the previous model left."""
    pixel_values = torch.randn(batch_size, 3, 224, 224)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name, model in models.items():
                timed_call_ms(model, pixel_values)
                elapsed = timed_call_ms(model, pixel_values)
                if round_index >= warmup:
                    times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def without_aggregation(model: torch.nn.Module) -> torch.nn.Module:
    """Make every DCNv3 core return its value input: the rest of InternImage-T at no cost for the deformable
    aggregation, i.e. the time no DCNv3 kernel can go below."""
    return with_core_forward(model, lambda core, value, offset, mask: value)


def with_fused_mlp(convnext: ConvNextModel, linear_activation) -> ConvNextModel:
    """ConvNeXt-T's MLPs on the hub kernel's fused linear op (pwconv1 with its exact GELU, pwconv2 with its bias)."""
    for layer in convnext.modules():
        if isinstance(layer, ConvNextLayer):
            layer.pwconv1.forward = lambda x, linear=layer.pwconv1: linear_activation(
                x, linear.weight, linear.bias, "gelu"
            )
            layer.act = nn.Identity()
            layer.pwconv2.forward = lambda x, linear=layer.pwconv2: linear_activation(
                x, linear.weight, linear.bias, "none"
            )
    return convnext


def check_fused_mlp(linear_activation) -> None:
    """ConvNeXt with the fused MLP must compute what transformers' ConvNeXt computes."""
    # Layer scale 1 instead of ConvNeXt's 1e-6 start, so that the MLPs' output is not scaled out of the comparison.
    config = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_scale_init_value=1.0)
    plain = ConvNextModel(config).eval()
    fused = with_fused_mlp(ConvNextModel(config).eval(), linear_activation)
    fused.load_state_dict(plain.state_dict())
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fused(pixel_values).last_hidden_state, plain(pixel_values).last_hidden_state)


def kernel_mapping(*layers: str) -> dict:
    from kernels import LocalLayerRepository

    return {layer: {"cpu": LocalLayerRepository(KERNEL_BUILD, layer_name=layer)} for layer in layers}


def build_models() -> dict[str, torch.nn.Module]:
    convnext_config = ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])
    convnext = ConvNextModel(convnext_config)
    swin = SwinModel(SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7))
    internimage = InternImageModel(InternImageConfig.from_variant("t")).eval()
    original = with_original_style_op(InternImageModel(InternImageConfig.from_variant("t")).eval())
    models = {
        "ConvNeXt-T": convnext.eval(),
        "Swin-T": swin.eval(),
        "InternImage-T": internimage,
        "InternImage-T (original op)": original,
    }
    if KERNEL_BUILD.is_dir():
        from kernels import get_local_kernel

        linear_activation = get_local_kernel(KERNEL_BUILD).ops.linear_activation
        check_fused_mlp(linear_activation)
        models["ConvNeXt-T (fused MLP)"] = with_fused_mlp(ConvNextModel(convnext_config).eval(), linear_activation)
        with_kernels = InternImageModel(InternImageConfig.from_variant("t")).eval()
        dcnv3_only = InternImageModel(InternImageConfig.from_variant("t")).eval()
        if uses_hub_kernel(use_hub_kernels(with_kernels, mapping=kernel_mapping("DCNv3Softmax", "InternImageMLP"))):
            models["InternImage-T (CPU kernel)"] = with_kernels
        if uses_hub_kernel(use_hub_kernels(dcnv3_only, mapping=kernel_mapping("DCNv3Softmax"))):
            models["InternImage-T (CPU kernel, DCNv3 only)"] = dcnv3_only
    # The floor of the fastest configuration: the kernel model (its MLP layer kept) with its cores then bypassed.
    floor = InternImageModel(InternImageConfig.from_variant("t")).eval()
    if "InternImage-T (CPU kernel)" in models:
        use_hub_kernels(floor, mapping=kernel_mapping("DCNv3Softmax", "InternImageMLP"))
    models["InternImage-T (no DCNv3 op)"] = without_aggregation(floor)
    return models


class Autocast(nn.Module):
    """`model` under CPU bf16 autocast."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(pixel_values)


def variant_models(models: dict[str, nn.Module], compiled: bool, bf16: bool) -> dict[str, nn.Module]:
    """Compiled and bf16-autocast rows of ConvNeXt-T and InternImage-T (PyTorch operator; CPU kernel where built).
    The compiled kernel model is kernelized for torch.compile (both layers declare support for it)."""
    variants = {}
    sources = {"ConvNeXt-T": models["ConvNeXt-T"], "InternImage-T": models["InternImage-T"]}
    if "InternImage-T (CPU kernel)" in models:
        sources["InternImage-T (CPU kernel)"] = models["InternImage-T (CPU kernel)"]
    for name, model in sources.items():
        if compiled:
            if "CPU kernel" in name:
                model = InternImageModel(InternImageConfig.from_variant("t")).eval()
                mapping = kernel_mapping("DCNv3Softmax", "InternImageMLP")
                use_hub_kernels(model, mapping=mapping, mode="inference|torch_compile", strict=True)
            variants[f"{name} (compiled)"] = torch.compile(model, dynamic=False)
        if bf16:
            variants[f"{name} (bf16 autocast)"] = Autocast(model)
    return variants


def sgemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matrix-multiply speed of this machine: a square sgemm of `size`, best of `repeats`."""
    left, right = torch.randn(size, size), torch.randn(size, size)
    torch.mm(left, right)
    best = min(timed_seconds(lambda: torch.mm(left, right)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def timed_seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def model_gflop(model: nn.Module, batch_size: int) -> float:
    """Floating-point operations of one forward (2 per multiply-add of linear layers and convolutions)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(batch_size, 3, 224, 224))
    return counter.get_total_flops() / 1e9


# The kernel's fused MLP op is opaque to FlopCounterMode: count the same architecture with the model's own layers.
FLOP_COUNT_SOURCE = {"InternImage-T (CPU kernel)": "InternImage-T"}


def print_gemm_floor(models: dict[str, nn.Module], latencies_ms: dict[str, float], batch_size: int) -> None:
    rate = sgemm_gflops()
    print(f"\nfp32 GEMM floor, batch {batch_size}: sgemm 2048^3 at {rate:.0f} GFLOP/s on this machine")
    print(f"{'model':<40}{'GFLOP':>8}{'floor ms':>10}{'ms':>10}{'x floor':>9}")
    for name in ("ConvNeXt-T", "InternImage-T", "InternImage-T (CPU kernel)"):
        if name in models:
            gflop = model_gflop(models[FLOP_COUNT_SOURCE.get(name, name)], batch_size)
            floor_ms = 1000 * gflop / rate
            latency = latencies_ms[name]
            print(f"{name:<40}{gflop:>8.1f}{floor_ms:>10.1f}{latency:>10.1f}{latency / floor_ms:>9.2f}")


# Top-level ATen ops (totals include their children, e.g. the bias copy inside a linear layer's addmm) per category.
OP_CATEGORIES = {
    "linear layers": ("aten::linear", "::linear_activation"),  # the latter with fused GELU where it is
    "GELU": ("aten::gelu",),
    "convolutions": ("aten::conv2d",),
    "LayerNorm": ("aten::layer_norm",),
    "DCNv3 op": ("::dcnv3_forward", "::dcnv3_softmax_forward"),
}


def op_breakdown_ms(model: torch.nn.Module, batch_size: int, repeats: int) -> dict[str, float]:
    """Milliseconds per forward spent in each of `OP_CATEGORIES`, and in everything else, under the profiler."""
    pixel_values = torch.randn(batch_size, 3, 224, 224)
    with torch.inference_mode():
        model(pixel_values)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(repeats):
                model(pixel_values)
    events = profiler.key_averages()
    total_us = sum(event.self_cpu_time_total for event in events)
    breakdown = {
        category: sum(event.cpu_time_total for event in events if event.key.endswith(suffixes))
        for category, suffixes in OP_CATEGORIES.items()
    }
    breakdown["everything else"] = total_us - sum(breakdown.values())
    breakdown["total"] = total_us
    return {category: time_us / 1000 / repeats for category, time_us in breakdown.items()}


def print_breakdown(models: dict[str, torch.nn.Module], batch_size: int, repeats: int) -> None:
    names = [name for name in ("ConvNeXt-T", "InternImage-T (CPU kernel)") if name in models]
    breakdowns = {name: op_breakdown_ms(models[name], batch_size, repeats) for name in names}
    print(f"\nms per forward by op category, batch {batch_size} (under the profiler)")
    print(f"{'category':<20}" + "".join(f"{name:>28}" for name in names))
    for category in [*OP_CATEGORIES, "everything else", "total"]:
        print(f"{category:<20}" + "".join(f"{breakdowns[name][category]:>28.1f}" for name in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--breakdown", action="store_true", help="also print time per op category (profiler)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--bf16", action="store_true", help="also time models under CPU bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    check_original_style_op()
    models = build_models()
    models.update(variant_models(models, args.compile, args.bf16))
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, {capability}"
    )
    print(f"{'model':<40}{'batch':>6}{'ms':>10}{'x ConvNeXt-T':>15}")
    for batch_size in args.batch_sizes:
        latencies = median_latencies_ms(models, batch_size, args.repeats)
        for name, latency in latencies.items():
            ratio = latency / latencies["ConvNeXt-T"]
            print(f"{name:<40}{batch_size:>6}{latency:>10.1f}{ratio:>15.2f}")
    print_gemm_floor(models, latencies, batch_size)  # the last batch size timed
    if args.breakdown:
        print_breakdown(models, max(args.batch_sizes), args.repeats)


if __name__ == "__main__":
    main()
