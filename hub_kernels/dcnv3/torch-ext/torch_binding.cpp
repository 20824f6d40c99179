#include <torch/library.h>

#include "registration.h"
#include "torch_binding.h"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "dcnv3_forward(Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, int stride_h, "
      "int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, int group_channels, "
      "float offset_scale, bool remove_center) -> Tensor");
  // The same with the weights given as logits, normalised by a softmax over each group's points (InternImage's use).
  ops.def(
      "dcnv3_softmax_forward(Tensor input, Tensor offset, Tensor mask_logits, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, "
      "int group_channels, float offset_scale, bool remove_center) -> Tensor");
  ops.def(
      "dcnv3_backward(Tensor input, Tensor offset, Tensor mask, Tensor grad_output, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, "
      "int group_channels, float offset_scale, bool remove_center) -> Tensor[]");
#if defined(CPU_KERNEL)
  ops.impl("dcnv3_forward", torch::kCPU, &dcnv3_forward_cpu);
  ops.impl("dcnv3_softmax_forward", torch::kCPU, &dcnv3_softmax_forward_cpu);
  ops.impl("dcnv3_backward", torch::kCPU, &dcnv3_backward_cpu);
  // Inference only (no autograd formula): the InternImageMLP layer uses it where no gradient is wanted.
  ops.def("linear_activation(Tensor input, Tensor weight, Tensor? bias, str activation) -> Tensor");
  ops.impl("linear_activation", torch::kCPU, &linear_activation_cpu);
#elif defined(CUDA_KERNEL) || defined(ROCM_KERNEL)
  ops.impl("dcnv3_forward", torch::kCUDA, &dcnv3_forward_cuda);
  ops.impl("dcnv3_softmax_forward", torch::kCUDA, &dcnv3_softmax_forward_cuda);
  ops.impl("dcnv3_backward", torch::kCUDA, &dcnv3_backward_cuda);
#endif
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
