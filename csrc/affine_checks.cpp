#include "affine.h"

#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

namespace fastflow {

at::ScalarType math_type(const std::vector<at::Tensor>& inputs,
                         const std::vector<at::Tensor>& outputs) {
  for (const auto* streams : {&inputs, &outputs})
    for (const auto& x : *streams)
      if (x.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

namespace {

// One streamed tensor `what` of operation `op`, beside the first one, `ref`.
void check_stream(const char* op, const at::Tensor& x, const char* what, const at::Tensor& ref,
                  c10::DeviceType device, bool one_dtype, bool any_layout = false) {
  const auto type = x.scalar_type();
  TORCH_CHECK_VALUE(is_stream_type(type), op, ": ", what,
                    " must be float16, bfloat16, float32 or float64, got ", type);
  TORCH_CHECK_VALUE(x.device().type() == device, op, ": ", what, " is on ", x.device(),
                    ", expected a ", c10::DeviceTypeName(device), " tensor");
  TORCH_CHECK_VALUE(x.device() == ref.device(), op, ": ", what, " is on ", x.device(),
                    ", the first on ", ref.device());
  TORCH_CHECK_VALUE(!one_dtype || type == ref.scalar_type(), op, ": ", what, " has dtype ", type,
                    ", expected ", ref.scalar_type());
  TORCH_CHECK_VALUE(x.numel() == ref.numel(), op, ": ", what, " has ", x.numel(),
                    " elements, expected ", ref.numel());
  TORCH_CHECK_VALUE(any_layout || x.is_contiguous(), op, ": ", what, " must be contiguous");
}

// The bytes from x's first element to the end of its last; 0 if it has none.
int64_t extent(const at::Tensor& x) {
  if (x.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t d = 0; d < x.dim(); ++d) last += (x.size(d) - 1) * x.stride(d);
  return (last + 1) * static_cast<int64_t>(x.element_size());
}

// Whether `groups` groups of consecutive elements cover `ref` (none for an empty tensor).
void check_groups(const char* op, const at::Tensor& ref, int64_t groups) {
  TORCH_CHECK_VALUE(groups >= 1 ? ref.numel() % groups == 0 : groups == 0 && ref.numel() == 0,
                    op, ": ", ref.numel(), " elements do not split into ", groups, " groups");
}

}  // namespace

bool spans_intersect(const at::Tensor& a, const at::Tensor& b) {
  const auto* a0 = static_cast<const char*>(a.const_data_ptr());
  const auto* b0 = static_cast<const char*>(b.const_data_ptr());
  const int64_t a_bytes = extent(a), b_bytes = extent(b);
  return a_bytes > 0 && b_bytes > 0 && a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

bool outputs_acceptable(const std::vector<at::Tensor>& outputs, const at::Tensor& ref,
                        const std::vector<at::Tensor>& inputs) {
  const bool grad = c10::GradMode::is_enabled();
  const bool inference_mode = c10::InferenceMode::is_enabled();
  // Tensors that the dispatcher must see (fake ones, subclasses, functorch's wrappers): Python.
  const auto plain_like_ref = [&](const at::Tensor& y) {
    return (y.is_cpu() || y.is_cuda()) && !y.unsafeGetTensorImpl()->is_python_dispatch() &&
           y.has_storage() && is_stream_type(y.scalar_type()) && y.dim() > 0 &&
           y.sizes() == ref.sizes() && y.scalar_type() == ref.scalar_type() &&
           y.device() == ref.device() && !(grad && y.requires_grad()) &&
           (inference_mode || !y.is_inference()) && !y.is_neg();
  };
  for (size_t i = 0; i < outputs.size(); ++i) {
    const at::Tensor& y = outputs[i];
    if (!plain_like_ref(y)) return false;
    for (int64_t d = 0; d < y.dim(); ++d)
      if (y.stride(d) == 0 && y.size(d) > 1) return false;
    for (size_t j = 0; j < i; ++j)
      if (y.is_same(outputs[j]) || spans_intersect(y, outputs[j])) return false;
  }
  if (grad)
    for (const auto& x : inputs)
      if (x.requires_grad()) return false;
  return true;
}

at::Tensor coefficients_apart(const at::Tensor& coeffs, const std::vector<at::Tensor>& outputs) {
  for (const auto& y : outputs)
    if (spans_intersect(coeffs, y)) return coeffs.clone();
  return coeffs;
}

bool misread(const std::vector<at::Tensor>& tensors) {
  for (const auto& x : tensors)
    if (x.is_neg() || x.is_conj() || x.key_set().has_any(c10::functorch_transforms_ks))
      return true;
  return false;
}

void check_dot_args(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                    int64_t groups) {
  constexpr const char* op = "fastflow affine_dot";
  const auto m = static_cast<int64_t>(a.size()), k = static_cast<int64_t>(b.size());
  TORCH_CHECK_VALUE(m >= 1 && m <= kMaxOutputs, op, ": expected 1 to ", kMaxOutputs,
                    " tensors in a, got ", m);
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxInputs, op, ": expected 1 to ", kMaxInputs,
                    " tensors in b, got ", k);
  for (const auto& x : a) check_stream(op, x, "a tensor of a", a[0], c10::kCPU, true);
  for (const auto& x : b) check_stream(op, x, "a tensor of b", a[0], c10::kCPU, true);
  check_groups(op, a[0], groups);
}

void check_affine_args(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                       const std::vector<at::Tensor>& outputs, c10::DeviceType device,
                       bool one_dtype) {
  constexpr const char* op = "fastflow affine";
  const auto k = static_cast<int64_t>(inputs.size());
  const auto m = static_cast<int64_t>(outputs.size());
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxInputs, op, ": expected 1 to ", kMaxInputs, " inputs, got ",
                    k);
  TORCH_CHECK_VALUE(m >= 1 && m <= kMaxOutputs, op, ": expected 1 to ", kMaxOutputs,
                    " outputs, got ", m);
  const auto& ref = inputs[0];
  const bool any_layout = device == c10::kCPU;
  for (const auto& x : inputs) check_stream(op, x, "an input", ref, device, one_dtype, any_layout);
  for (const auto& y : outputs) check_stream(op, y, "an output", ref, device, one_dtype, any_layout);
  // The outputs are written one after another: one that shared memory with another would
  // overwrite (part of) it. Their byte spans must be disjoint, as for interpolate's out=
  // (fastflow._checks.check_outputs).
  for (int64_t i = 1; i < m; ++i)
    for (int64_t j = 0; j < i; ++j)
      TORCH_CHECK_VALUE(!spans_intersect(outputs[i], outputs[j]), op, ": outputs ", j, " and ",
                        i, " share memory (their byte spans intersect); expected separate "
                        "tensors");

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
  check_groups(op, ref, coeffs.size(0));
}

}  // namespace fastflow
