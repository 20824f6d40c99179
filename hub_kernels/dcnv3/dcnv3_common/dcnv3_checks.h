// Argument checks shared by the CPU and CUDA entry points: every problem is reported by name, before any kernel
// runs, instead of a crash or a silently wrong result.
#pragma once

#include <torch/all.h>

#include "dcnv3_common/dcnv3_sampling.h"

namespace dcnv3 {

inline Geometry check_arguments(const torch::Tensor& input, const torch::Tensor& offset, const torch::Tensor& mask,
                                int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                                int64_t group_channels, double offset_scale, bool remove_center) {
  TORCH_CHECK(input.dim() == 4, "dcnv3: input must be channels-last (N, H, W, C), got ", input.dim(), " dimensions");
  TORCH_CHECK(offset.dim() == 4 && mask.dim() == 4, "dcnv3: offset and mask must be 4-D (N, H_out, W_out, ...)");
  TORCH_CHECK(input.device() == offset.device() && input.device() == mask.device(),
              "dcnv3: input, offset and mask must be on one device, got ", input.device(), ", ", offset.device(),
              ", ", mask.device());
  TORCH_CHECK(input.scalar_type() == offset.scalar_type() && input.scalar_type() == mask.scalar_type(),
              "dcnv3: input, offset and mask must share a dtype, got ", input.scalar_type(), ", ",
              offset.scalar_type(), ", ", mask.scalar_type());
  TORCH_CHECK(kernel_h > 0 && kernel_w > 0 && stride_h > 0 && stride_w > 0 && dilation_h > 0 && dilation_w > 0,
              "dcnv3: kernel size, stride and dilation must be positive");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "dcnv3: padding must not be negative");
  TORCH_CHECK(group > 0 && group_channels > 0, "dcnv3: group and group_channels must be positive");
  TORCH_CHECK(!remove_center || (kernel_h % 2 == 1 && kernel_w % 2 == 1),
              "dcnv3: remove_center needs odd kernel sizes, got ", kernel_h, "x", kernel_w);
  TORCH_CHECK(input.size(3) == group * group_channels, "dcnv3: input has ", input.size(3),
              " channels in its last dimension, expected group * group_channels = ", group * group_channels);

  Geometry geo;
  geo.batch = input.size(0);
  geo.height_in = input.size(1);
  geo.width_in = input.size(2);
  geo.height_out = (geo.height_in + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) / stride_h + 1;
  geo.width_out = (geo.width_in + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) / stride_w + 1;
  geo.group = group;
  geo.group_channels = group_channels;
  geo.kernel_h = static_cast<int>(kernel_h);
  geo.kernel_w = static_cast<int>(kernel_w);
  geo.stride_h = static_cast<int>(stride_h);
  geo.stride_w = static_cast<int>(stride_w);
  geo.pad_h = static_cast<int>(pad_h);
  geo.pad_w = static_cast<int>(pad_w);
  geo.dilation_h = static_cast<int>(dilation_h);
  geo.dilation_w = static_cast<int>(dilation_w);
  geo.offset_scale = static_cast<float>(offset_scale);
  geo.remove_center = remove_center;
  TORCH_CHECK(geo.height_out > 0 && geo.width_out > 0, "dcnv3: input of ", geo.height_in, "x", geo.width_in,
              " is smaller than the kernel's reach");

  const int64_t points = geo.num_points();
  TORCH_CHECK(offset.size(0) == geo.batch && offset.size(1) == geo.height_out && offset.size(2) == geo.width_out &&
                  offset.size(3) == group * points * 2,
              "dcnv3: offset has shape ", offset.sizes(), ", expected [", geo.batch, ", ", geo.height_out, ", ",
              geo.width_out, ", ", group * points * 2, "]");
  TORCH_CHECK(mask.size(0) == geo.batch && mask.size(1) == geo.height_out && mask.size(2) == geo.width_out &&
                  mask.size(3) == group * points,
              "dcnv3: mask has shape ", mask.sizes(), ", expected [", geo.batch, ", ", geo.height_out, ", ",
              geo.width_out, ", ", group * points, "]");
  return geo;
}

inline void check_grad_output(const torch::Tensor& grad_output, const torch::Tensor& input, const Geometry& geo) {
  TORCH_CHECK(grad_output.device() == input.device() && grad_output.scalar_type() == input.scalar_type(),
              "dcnv3: grad_output must match input's device and dtype");
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == geo.batch && grad_output.size(1) == geo.height_out &&
                  grad_output.size(2) == geo.width_out && grad_output.size(3) == geo.channels(),
              "dcnv3: grad_output has shape ", grad_output.sizes(), ", expected the forward output's shape");
}

}  // namespace dcnv3
