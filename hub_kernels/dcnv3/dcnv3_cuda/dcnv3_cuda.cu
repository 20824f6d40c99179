// DCNv3 on CUDA.
//
// Work item = (output pixel, group). A block takes several items; a power-of-two team of up to 32 consecutive
// lanes serves each item, every lane owning VEC contiguous channels of the group (16-byte loads where the group
// width and alignment allow). The items' offsets and weights are read from global memory once, turned into
// bilinear footprints in shared memory, and shared by the team. Accumulation is in float (double for double).
// The backward scatters value gradients with atomics (float32 buffer for half types), so it refuses
// torch.use_deterministic_algorithms(True) through PyTorch's standard alert; the offset and weight gradients are
// reduced within the team by warp shuffles.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include <type_traits>
#include <vector>

#include "dcnv3_common/dcnv3_checks.h"
#include "dcnv3_common/dcnv3_sampling.h"

namespace {

using dcnv3::Geometry;

constexpr int kMaxThreads = 256;
constexpr int kMaxItemsPerBlock = 64;

// One sampling point as the team needs it: the top-left corner, the fractional position, the mask weight (NaN for a
// non-finite location), which of the four corners lie inside the map (bit k for corner k) and whether the location
// is not finite (kNonFiniteLocation). coord_t is the accumulation type.
template <typename coord_t>
struct PointSample {
  int x0, y0;
  coord_t fx, fy, mask;
  int inside_corners;
};

constexpr int kAllCornersInside = 15;
constexpr int kNonFiniteLocation = 16;

struct Launch {
  int team;             // lanes per item (power of two, <= 32)
  int items_per_block;  // items sharing a block
  int threads;          // team * items_per_block
  size_t shared_bytes;
  int64_t blocks;
};

int next_power_of_two(int64_t value) {
  int power = 1;
  while (power < value && power < 32) power <<= 1;
  return power;
}

template <typename coord_t>
Launch plan_launch(const Geometry& geo, int vec) {
  Launch launch;
  launch.team = next_power_of_two(geo.group_channels / vec);
  launch.items_per_block = std::min<int>(kMaxItemsPerBlock, kMaxThreads / launch.team);
  launch.threads = launch.team * launch.items_per_block;
  launch.shared_bytes = sizeof(PointSample<coord_t>) * launch.items_per_block * geo.num_points();
  const int64_t items = geo.batch * geo.height_out * geo.width_out * geo.group;
  launch.blocks = std::min<int64_t>((items + launch.items_per_block - 1) / launch.items_per_block, 65535LL * 32);
  return launch;
}

// Fills shared memory with the footprints of the block's items [first, first + count), all points.
template <typename scalar_t, typename coord_t>
__device__ void stage_points(const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                             const Geometry& geo, int64_t first, int count, PointSample<coord_t>* samples) {
  const int points = geo.num_points();
  for (int slot = threadIdx.x; slot < count * points; slot += blockDim.x) {
    const int local_item = slot / points, p = slot % points;
    const int64_t item = first + local_item;
    const int64_t pixel = item / geo.group;
    const int64_t w = pixel % geo.width_out, h = (pixel / geo.width_out) % geo.height_out;
    const int64_t row = item * points + p;
    const auto fp = dcnv3::footprint<coord_t>(geo, h, w, p, static_cast<coord_t>(offset[row * 2]),
                                              static_cast<coord_t>(offset[row * 2 + 1]), coord_t(1));
    PointSample<coord_t> sample;
    sample.x0 = static_cast<int>(fp.x0);
    sample.y0 = static_cast<int>(fp.y0);
    sample.fx = fp.fx;
    sample.fy = fp.fy;
    sample.mask = fp.finite ? static_cast<coord_t>(mask[row]) : dcnv3::quiet_nan<coord_t>();
    sample.inside_corners = fp.finite ? 0 : kNonFiniteLocation;
    if (fp.inside) {
      for (int k = 0; k < 4; ++k) {
        if (dcnv3::corner_inside(geo, fp.y0, fp.x0, k)) sample.inside_corners |= 1 << k;
      }
    }
    samples[slot] = sample;
  }
}

template <typename coord_t>
__device__ __forceinline__ void corner_weights(const PointSample<coord_t>& s, coord_t weight[4]) {
  weight[0] = (1 - s.fy) * (1 - s.fx);
  weight[1] = (1 - s.fy) * s.fx;
  weight[2] = s.fy * (1 - s.fx);
  weight[3] = s.fy * s.fx;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t value[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* pointer) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(pointer);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    dcnv3_forward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset,
                         const scalar_t* __restrict__ mask, scalar_t* __restrict__ output, const Geometry geo,
                         const int team, const int items_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  PointSample<acc_t>* samples = reinterpret_cast<PointSample<acc_t>*>(shared_raw);
  const int points = geo.num_points();
  const int64_t items = geo.batch * geo.height_out * geo.width_out * geo.group;
  const int64_t channels = geo.channels();
  const int chunks = static_cast<int>(geo.group_channels / VEC);
  const int local_item = threadIdx.x / team, lane = threadIdx.x % team;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * items_per_block; first < items;
       first += static_cast<int64_t>(gridDim.x) * items_per_block) {
    const int count = items - first < items_per_block ? static_cast<int>(items - first) : items_per_block;
    __syncthreads();  // the previous round's samples are no longer read
    stage_points(offset, mask, geo, first, count, samples);
    __syncthreads();
    if (local_item >= count) continue;
    const int64_t item = first + local_item;
    const int64_t pixel = item / geo.group, g = item % geo.group;
    const int64_t n = pixel / (geo.height_out * geo.width_out);
    const PointSample<acc_t>* item_samples = samples + local_item * points;
    for (int chunk = lane; chunk < chunks; chunk += team) {
      acc_t acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = 0;
      const int64_t channel = g * geo.group_channels + static_cast<int64_t>(chunk) * VEC;
      for (int p = 0; p < points; ++p) {
        const PointSample<acc_t> s = item_samples[p];
        acc_t weight[4];
        corner_weights(s, weight);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!(s.inside_corners & (1 << k))) continue;
          const int64_t row = (n * geo.height_in + s.y0 + (k >> 1)) * geo.width_in + s.x0 + (k & 1);
          const auto pack = load_pack<scalar_t, VEC>(value + row * channels + channel);
          const acc_t w = s.mask * weight[k];
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] += w * static_cast<acc_t>(pack.value[v]);
        }
        if (s.inside_corners != kAllCornersInside) {  // zero padding: mask * 0, NaN for a non-finite mask
          const acc_t padding = s.mask * acc_t(0);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] += padding;
        }
      }
      Pack<scalar_t, VEC> result;
#pragma unroll
      for (int v = 0; v < VEC; ++v) result.value[v] = static_cast<scalar_t>(acc[v]);
      *reinterpret_cast<Pack<scalar_t, VEC>*>(output + pixel * channels + channel) = result;
    }
  }
}

// Adds VEC consecutive value gradients. Hopper adds 16 bytes of float in one atomic (a quarter of the atomic
// operations, which bound the backward); other devices and types add element by element.
template <typename grad_t, int VEC>
__device__ __forceinline__ void atomic_add_pack(grad_t* target, const grad_t (&values)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<grad_t, float> && VEC % 4 == 0) {
#pragma unroll
    for (int v = 0; v < VEC; v += 4) {
      atomicAdd(reinterpret_cast<float4*>(target + v),
                make_float4(values[v], values[v + 1], values[v + 2], values[v + 3]));
    }
    return;
  } else if constexpr (std::is_same_v<grad_t, float> && VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(target), make_float2(values[0], values[1]));
    return;
  }
#endif
#pragma unroll
  for (int v = 0; v < VEC; ++v) atomicAdd(target + v, values[v]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t team_sum(acc_t value, int team) {
  for (int stride = team / 2; stride > 0; stride /= 2) value += __shfl_xor_sync(0xffffffffu, value, stride);
  return value;
}

template <typename scalar_t, typename grad_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    dcnv3_backward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset,
                          const scalar_t* __restrict__ mask, const scalar_t* __restrict__ grad_output,
                          grad_t* __restrict__ grad_value, scalar_t* __restrict__ grad_offset,
                          scalar_t* __restrict__ grad_mask, const Geometry geo, const int team,
                          const int items_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  PointSample<acc_t>* samples = reinterpret_cast<PointSample<acc_t>*>(shared_raw);
  const int points = geo.num_points();
  const int64_t items = geo.batch * geo.height_out * geo.width_out * geo.group;
  const int64_t channels = geo.channels();
  const int chunks = static_cast<int>(geo.group_channels / VEC);
  const int local_item = threadIdx.x / team, lane = threadIdx.x % team;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * items_per_block; first < items;
       first += static_cast<int64_t>(gridDim.x) * items_per_block) {
    const int count = items - first < items_per_block ? static_cast<int>(items - first) : items_per_block;
    __syncthreads();
    stage_points(offset, mask, geo, first, count, samples);
    __syncthreads();
    // Every lane of a team takes part in the shuffles, also lanes of items past `count` (with zeros).
    const bool active = local_item < count;
    const int64_t item = first + (active ? local_item : 0);
    const int64_t pixel = item / geo.group, g = item % geo.group;
    const int64_t n = pixel / (geo.height_out * geo.width_out);
    const PointSample<acc_t>* item_samples = samples + (active ? local_item : 0) * points;
    for (int p = 0; p < points; ++p) {
      const PointSample<acc_t> s = item_samples[p];
      acc_t weight[4];
      corner_weights(s, weight);
      acc_t sample_dot = 0, x_dot = 0, y_dot = 0;
      for (int chunk = lane; active && chunk < chunks; chunk += team) {
        const int64_t channel = g * geo.group_channels + static_cast<int64_t>(chunk) * VEC;
        const auto upstream = load_pack<scalar_t, VEC>(grad_output + pixel * channels + channel);
        acc_t corner_dot[4] = {0, 0, 0, 0};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!(s.inside_corners & (1 << k))) continue;
          const int64_t row = (n * geo.height_in + s.y0 + (k >> 1)) * geo.width_in + s.x0 + (k & 1);
          const auto pack = load_pack<scalar_t, VEC>(value + row * channels + channel);
          const acc_t scatter = s.mask * weight[k];
          grad_t contribution[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const acc_t g_v = static_cast<acc_t>(upstream.value[v]);
            corner_dot[k] += g_v * static_cast<acc_t>(pack.value[v]);
            contribution[v] = static_cast<grad_t>(scatter * g_v);
          }
          atomic_add_pack<grad_t, VEC>(grad_value + row * channels + channel, contribution);
        }
        sample_dot += weight[0] * corner_dot[0] + weight[1] * corner_dot[1] + weight[2] * corner_dot[2] +
                      weight[3] * corner_dot[3];
        acc_t d_x, d_y;
        dcnv3::location_gradient(s.fx, s.fy, corner_dot[0], corner_dot[1], corner_dot[2], corner_dot[3], d_x,
                                        d_y);
        x_dot += d_x;
        y_dot += d_y;
      }
      sample_dot = team_sum(sample_dot, team);
      x_dot = team_sum(x_dot, team);
      y_dot = team_sum(y_dot, team);
      if (active && lane == 0) {
        const int64_t row = item * points + p;
        const acc_t scale = static_cast<acc_t>(geo.offset_scale) * s.mask;
        // A non-finite location samples NaN; a non-finite mask weight alone leaves the sample finite.
        const bool nan_sample = s.inside_corners & kNonFiniteLocation;
        grad_mask[row] = static_cast<scalar_t>(nan_sample ? dcnv3::quiet_nan<acc_t>() : sample_dot);
        grad_offset[row * 2] = static_cast<scalar_t>(scale * x_dot);
        grad_offset[row * 2 + 1] = static_cast<scalar_t>(scale * y_dot);
      }
    }
  }
}

// Widest vector of at most `max_elements` (and 16 bytes) dividing the group width, for which every access stays
// aligned.
template <typename scalar_t>
int vector_width(const Geometry& geo, std::initializer_list<const void*> pointers, int max_elements) {
  for (int vec = std::min<int>(max_elements, 16 / sizeof(scalar_t)); vec > 1; vec /= 2) {
    bool aligned = geo.group_channels % vec == 0;
    for (const void* pointer : pointers) {
      aligned &= reinterpret_cast<uintptr_t>(pointer) % (vec * sizeof(scalar_t)) == 0;
    }
    if (aligned) return vec;
  }
  return 1;
}

// The backward gives a lane at most 4 channels: 8 half-type channels made teams of 2 lanes, blocks of 128 threads
// (items per block are capped for shared memory) and twice the atomics in a row per lane.
constexpr int kBackwardMaxVec = 4;

template <typename Body>
void with_vector_width(int vec, Body&& body) {
  switch (vec) {
    case 8: return body(std::integral_constant<int, 8>{});
    case 4: return body(std::integral_constant<int, 4>{});
    case 2: return body(std::integral_constant<int, 2>{});
    default: return body(std::integral_constant<int, 1>{});
  }
}

}  // namespace

torch::Tensor dcnv3_forward_cuda(const torch::Tensor& input, const torch::Tensor& offset, const torch::Tensor& mask,
                                 int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                 int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                                 int64_t group_channels, double offset_scale, bool remove_center) {
  const Geometry geo = dcnv3::check_arguments(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                              pad_w, dilation_h, dilation_w, group, group_channels, offset_scale,
                                              remove_center);
  TORCH_CHECK(input.is_cuda(), "dcnv3_forward_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto value = input.contiguous(), offsets = offset.contiguous(), masks = mask.contiguous();
  auto output = torch::empty({geo.batch, geo.height_out, geo.width_out, geo.channels()}, input.options());
  if (output.numel() == 0) return output;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_forward_cuda", [&] {
    const int vec = vector_width<scalar_t>(geo, {value.data_ptr(), output.data_ptr()}, 8);
    with_vector_width(vec, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const Launch launch = plan_launch<at::opmath_type<scalar_t>>(geo, VEC);
      dcnv3_forward_kernel<scalar_t, VEC><<<launch.blocks, launch.threads, launch.shared_bytes, stream>>>(
          value.data_ptr<scalar_t>(), offsets.data_ptr<scalar_t>(), masks.data_ptr<scalar_t>(),
          output.data_ptr<scalar_t>(), geo, launch.team, launch.items_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

// The softmax runs as ATen's before the kernel; fusing it into the kernel's per-point weights is left for a session
// with a GPU to measure it on (the CPU kernel fuses it).
torch::Tensor dcnv3_softmax_forward_cuda(const torch::Tensor& input, const torch::Tensor& offset,
                                         const torch::Tensor& mask_logits, int64_t kernel_h, int64_t kernel_w,
                                         int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                         int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                                         double offset_scale, bool remove_center) {
  const Geometry geo = dcnv3::check_arguments(input, offset, mask_logits, kernel_h, kernel_w, stride_h, stride_w,
                                              pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
                                              offset_scale, remove_center);
  const auto weights =
      mask_logits.reshape({geo.batch, geo.height_out, geo.width_out, geo.group, geo.num_points()})
          .softmax(-1, at::toOpMathType(mask_logits.scalar_type()))
          .to(mask_logits.scalar_type())
          .reshape(mask_logits.sizes());
  return dcnv3_forward_cuda(input, offset, weights, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                            dilation_w, group, group_channels, offset_scale, remove_center);
}

std::vector<torch::Tensor> dcnv3_backward_cuda(const torch::Tensor& input, const torch::Tensor& offset,
                                               const torch::Tensor& mask, const torch::Tensor& grad_output,
                                               int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                               int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                                               int64_t group, int64_t group_channels, double offset_scale,
                                               bool remove_center) {
  const Geometry geo = dcnv3::check_arguments(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                              pad_w, dilation_h, dilation_w, group, group_channels, offset_scale,
                                              remove_center);
  dcnv3::check_grad_output(grad_output, input, geo);
  TORCH_CHECK(input.is_cuda(), "dcnv3_backward_cuda: tensors must be on a CUDA device");
  at::globalContext().alertNotDeterministic("dcnv3_backward_cuda");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto value = input.contiguous(), offsets = offset.contiguous(), masks = mask.contiguous();
  const auto upstream = grad_output.contiguous();
  // Value gradients of half types are summed (atomically) in float32, then rounded once.
  auto grad_value = torch::zeros(input.sizes(), input.options().dtype(at::toOpMathType(input.scalar_type())));
  auto grad_offset = torch::zeros_like(offsets);
  auto grad_mask = torch::zeros_like(masks);
  if (upstream.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int vec = vector_width<scalar_t>(geo, {value.data_ptr(), upstream.data_ptr()}, kBackwardMaxVec);
      with_vector_width(vec, [&](auto width) {
        constexpr int VEC = decltype(width)::value;
        const Launch launch = plan_launch<acc_t>(geo, VEC);
        dcnv3_backward_kernel<scalar_t, acc_t, VEC><<<launch.blocks, launch.threads, launch.shared_bytes, stream>>>(
            value.data_ptr<scalar_t>(), offsets.data_ptr<scalar_t>(), masks.data_ptr<scalar_t>(),
            upstream.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>(), grad_offset.data_ptr<scalar_t>(),
            grad_mask.data_ptr<scalar_t>(), geo, launch.team, launch.items_per_block);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {grad_value.to(input.scalar_type()), grad_offset, grad_mask};
}
