#pragma once

#include <torch/all.h>

#include <optional>
#include <string>
#include <vector>

// Arguments follow the original DCNv3 operator (without its im2col_step, which this implementation does not need).
#define DCNV3_FORWARD_ARGS                                                                                          \
  const torch::Tensor &input, const torch::Tensor &offset, const torch::Tensor &mask, int64_t kernel_h,            \
      int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,      \
      int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale, bool remove_center
#define DCNV3_BACKWARD_ARGS                                                                                         \
  const torch::Tensor &input, const torch::Tensor &offset, const torch::Tensor &mask,                              \
      const torch::Tensor &grad_output, int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,    \
      int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels, \
      double offset_scale, bool remove_center

#if defined(CPU_KERNEL)
torch::Tensor dcnv3_forward_cpu(DCNV3_FORWARD_ARGS);
torch::Tensor dcnv3_softmax_forward_cpu(DCNV3_FORWARD_ARGS);
std::vector<torch::Tensor> dcnv3_backward_cpu(DCNV3_BACKWARD_ARGS);
torch::Tensor linear_activation_cpu(const torch::Tensor &input, const torch::Tensor &weight,
                                    const std::optional<torch::Tensor> &bias, const std::string &activation);
#endif

#if defined(CUDA_KERNEL) || defined(ROCM_KERNEL)
torch::Tensor dcnv3_forward_cuda(DCNV3_FORWARD_ARGS);
torch::Tensor dcnv3_softmax_forward_cuda(DCNV3_FORWARD_ARGS);
std::vector<torch::Tensor> dcnv3_backward_cuda(DCNV3_BACKWARD_ARGS);
#endif
