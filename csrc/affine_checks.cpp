#include "affine.h"

namespace fastflow {

at::ScalarType math_type(const std::vector<at::Tensor>& inputs,
                         const std::vector<at::Tensor>& outputs) {
  for (const auto* streams : {&inputs, &outputs})
    for (const auto& x : *streams)
      if (x.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

void check_affine_args(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                       const std::vector<at::Tensor>& outputs, c10::DeviceType device,
                       bool one_dtype) {
  const auto k = static_cast<int64_t>(inputs.size());
  const auto m = static_cast<int64_t>(outputs.size());
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxInputs, "fastflow affine: expected 1 to ", kMaxInputs,
                    " inputs, got ", k);
  TORCH_CHECK_VALUE(m >= 1 && m <= kMaxOutputs, "fastflow affine: expected 1 to ", kMaxOutputs,
                    " outputs, got ", m);
  const auto& ref = inputs[0];
  auto check_stream = [&](const at::Tensor& x, const char* what) {
    const auto type = x.scalar_type();
    TORCH_CHECK_VALUE(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                          type == at::kBFloat16,
                      "fastflow affine: ", what,
                      " must be float16, bfloat16, float32 or float64, got ", type);
    TORCH_CHECK_VALUE(x.device().type() == device, "fastflow affine: ", what, " is on ",
                      x.device(), ", expected a ", c10::DeviceTypeName(device), " tensor");
    TORCH_CHECK_VALUE(x.device() == ref.device(), "fastflow affine: ", what, " is on ",
                      x.device(), ", the first input on ", ref.device());
    TORCH_CHECK_VALUE(!one_dtype || type == ref.scalar_type(), "fastflow affine: ", what,
                      " has dtype ", type, ", expected ", ref.scalar_type());
    TORCH_CHECK_VALUE(x.numel() == ref.numel(), "fastflow affine: ", what, " has ", x.numel(),
                      " elements, expected ", ref.numel());
    TORCH_CHECK_VALUE(x.is_contiguous(), "fastflow affine: ", what, " must be contiguous");
  };
  for (const auto& x : inputs) check_stream(x, "an input");
  for (const auto& y : outputs) check_stream(y, "an output");

  TORCH_CHECK_VALUE(coeffs.dim() == 3 && coeffs.size(1) == m && coeffs.size(2) == k,
                    "fastflow affine: coeffs must have shape [G, ", m, ", ", k, "], got ",
                    coeffs.sizes());
  const auto math = math_type(inputs, outputs);
  TORCH_CHECK_VALUE(coeffs.scalar_type() == math, "fastflow affine: coeffs must be ", math,
                    " for ", ref.scalar_type(), " streams, got ", coeffs.scalar_type());
  TORCH_CHECK_VALUE(coeffs.device() == ref.device(), "fastflow affine: coeffs is on ",
                    coeffs.device(), ", inputs on ", ref.device());
  // The CPU kernels read coefficients through their strides (callers build them entry-major,
  // a cheap layout to produce); the GPU kernels want them packed.
  TORCH_CHECK_VALUE(device == c10::kCPU || coeffs.is_contiguous(),
                    "fastflow affine: coeffs must be contiguous");
  const int64_t groups = coeffs.size(0);
  TORCH_CHECK_VALUE(groups >= 1 || ref.numel() == 0,
                    "fastflow affine: coeffs needs at least one group for non-empty inputs");
  TORCH_CHECK_VALUE(groups == 0 || ref.numel() % groups == 0, "fastflow affine: ", ref.numel(),
                    " elements do not split into ", groups, " groups");
}

}  // namespace fastflow
