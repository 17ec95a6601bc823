// The coefficient matrix of a fused pass from its entries, in one call.
//
// Callers such as fastflow.compat.torchcfm build each call's coefficients from a mix of numbers
// and per-sample tensors (torchcfm's 1 - t, t, sigma, -1, 1, ...). From Python every entry costs
// a few tensor ops (a fill, a conversion, a reshape, an expand) at several microseconds each,
// more than the fused kernel on a small batch; here they are ATen calls without the
// interpreter. Any device: these are ATen ops (fills and copies), so they also run inside a
// CUDA graph capture, and autograd records the copies of tensors that need a gradient.
#include "coefficients.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>

namespace fastflow {

at::Tensor coefficient_matrix(const std::vector<CoefficientEntry>& entries, int64_t outputs,
                              int64_t inputs, int64_t groups, at::ScalarType dtype,
                              at::Device device) {
  TORCH_CHECK_VALUE(outputs * inputs == static_cast<int64_t>(entries.size()),
                    "fastflow coefficient_matrix: expected ", outputs, " x ", inputs,
                    " entries, got ", entries.size());
  // Entry-major, as _ops.coefficient_matrix stores it: [outputs * inputs, G], viewed below.
  const auto as_matrix = [&](const at::Tensor& entry_major) {
    return entry_major.view({outputs, inputs, groups}).permute({2, 0, 1});
  };
  // Only tensors of one value per group on one device (every coefficient computed from t in
  // PyTorch): one stack and one conversion, instead of a copy per entry. The stack promotes
  // to a type that holds every entry exactly, so each is still rounded once.
  std::vector<at::Tensor> columns;
  for (const auto& entry : entries) {
    const at::Tensor* values = std::get_if<at::Tensor>(&entry);
    if (values == nullptr || values->numel() != groups ||
        (!columns.empty() && values->device() != columns[0].device()))
      break;
    columns.push_back(values->reshape({-1}));
  }
  if (columns.size() == entries.size() && !columns.empty())
    return as_matrix(at::stack(columns).to(device, dtype));
  at::Tensor out = at::empty({outputs * inputs, groups}, at::TensorOptions(dtype).device(device));
  for (size_t i = 0; i < entries.size(); ++i) {
    at::Tensor column = out.select(0, static_cast<int64_t>(i));
    if (const double* number = std::get_if<double>(&entries[i])) {
      // Rounded to dtype, as PyTorch rounds a scalar operand. On CPU written directly: fill_
      // costs a few microseconds of dispatch per call, more than all the rest here.
      if (device.is_cpu()) {
        AT_DISPATCH_FLOATING_TYPES(dtype, "coefficient_matrix", [&] {
          std::fill_n(column.mutable_data_ptr<scalar_t>(), groups, static_cast<scalar_t>(*number));
        });
      } else {
        column.fill_(*number);
      }
      continue;
    }
    const at::Tensor& values = std::get<at::Tensor>(entries[i]);
    TORCH_CHECK_VALUE(values.numel() == groups || values.numel() == 1,
                      "fastflow coefficient_matrix: expected ", groups, " values or one, got ",
                      values.numel());
    column.copy_(values.reshape({-1}));  // converts type and device; one value broadcasts
  }
  return as_matrix(out);
}

}  // namespace fastflow
