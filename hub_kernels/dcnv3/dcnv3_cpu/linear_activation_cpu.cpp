// A linear layer with its bias and activation in one oneDNN primitive, for float32 inference on the CPU: ATen's
// addmm first copies the bias into the output, and the activation is then another pass over the widest tensor of
// an InternImage block. oneDNN's fused linear is reached through the dispatcher, where torch registers it (as
// `mkldnn::_linear_pointwise`, the op torch.compile emits for CPU inference); it is not part of torch's C++ API, so
// each build of this kernel (one per torch version) checks the op is there and, if not, computes the same result
// with ATen.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/all.h>

#include <optional>
#include <string>

namespace {

struct PostOp {
  const char* attribute;
  std::optional<std::string> algorithm;
};

PostOp post_op_of(const std::string& activation) {
  if (activation == "none") return {"none", std::string("")};
  if (activation == "gelu") return {"gelu", std::string("none")};  // exact (erf) GELU, as InternImage uses
  if (activation == "relu") return {"relu", std::string("")};
  if (activation == "silu") return {"swish", std::string("")};
  TORCH_CHECK(false, "linear_activation: unknown activation '", activation, "' (none, gelu, relu or silu)");
}

torch::Tensor aten_linear_activation(const torch::Tensor& input, const torch::Tensor& weight,
                                     const std::optional<torch::Tensor>& bias, const std::string& activation) {
  auto output = at::linear(input, weight, bias);
  if (activation == "gelu") return at::gelu_(output);
  if (activation == "relu") return at::relu_(output);
  if (activation == "silu") return at::silu_(output);
  return output;
}

const c10::OperatorHandle* onednn_linear_pointwise() {
  static const std::optional<c10::OperatorHandle> handle =
      c10::Dispatcher::singleton().findOp(c10::OperatorName("mkldnn::_linear_pointwise", ""));
  return handle.has_value() ? &*handle : nullptr;
}

}  // namespace

torch::Tensor linear_activation_cpu(const torch::Tensor& input, const torch::Tensor& weight,
                                    const std::optional<torch::Tensor>& bias, const std::string& activation) {
  const PostOp post_op = post_op_of(activation);
  TORCH_CHECK(input.size(-1) == weight.size(1), "linear_activation: input has ", input.size(-1),
              " features but the weight expects ", weight.size(1));
  const bool fusable = input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                       (!bias.has_value() || bias->scalar_type() == at::kFloat) && input.numel() > 0;
  const c10::OperatorHandle* fused = fusable ? onednn_linear_pointwise() : nullptr;
  if (fused == nullptr) return aten_linear_activation(input, weight, bias, activation);
  torch::jit::Stack stack{input.contiguous(), weight,
                          bias,               std::string(post_op.attribute),
                          c10::List<std::optional<at::Scalar>>(), post_op.algorithm};
  fused->callBoxed(&stack);
  return stack[0].toTensor();
}
