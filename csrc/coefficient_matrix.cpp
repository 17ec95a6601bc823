// The coefficient matrix of a fused pass from its entries, in one call.
//
// Callers such as fastflow.compat.torchcfm build each call's coefficients from a mix of numbers
// and per-sample tensors (torchcfm's 1 - t, t, sigma, -1, 1, ...). From Python every entry costs
// a few tensor ops (a fill, a conversion, a reshape, an expand) at several microseconds each,
// more than the fused kernel on a small batch; here they are ATen calls without the
// interpreter, and on CPU plain loops. Any device: elsewhere these are ATen ops (fills and
// copies), so they also run inside a CUDA graph capture, and autograd records the copies of
// tensors that need a gradient.
#include "coefficients.h"
#include "affine.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/GradMode.h>

#include <algorithm>

namespace fastflow {

namespace {

void check_count(const at::Tensor& values, int64_t groups) {
  TORCH_CHECK_VALUE(values.numel() == groups || values.numel() == 1,
                    "fastflow coefficient_matrix: expected ", groups, " values or one, got ",
                    values.numel());
}

// A number, or a tensor that a CPU column may be read from by hand: dense values of a streamed
// float type in host memory (float8 goes through copy_), and no gradient to record (autograd
// must see a copy of those).
bool readable_on_cpu(const CoefficientEntry& entry) {
  const at::Tensor* values = std::get_if<at::Tensor>(&entry);
  return values == nullptr ||
         (values->is_cpu() && values->is_contiguous() &&
          is_stream_type(values->scalar_type()) &&
          !(values->requires_grad() && c10::GradMode::is_enabled()));
}

// One column of G values from a readable entry, each rounded once to out_t, as copy_ and
// PyTorch's scalar operands round; one value broadcasts.
template <typename out_t>
void write_column(const CoefficientEntry& entry, out_t* column, int64_t groups) {
  if (const double* number = std::get_if<double>(&entry)) {
    std::fill_n(column, groups, static_cast<out_t>(*number));
    return;
  }
  const at::Tensor& values = std::get<at::Tensor>(entry);
  check_count(values, groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(),
                                  "coefficient_matrix", [&] {
    const scalar_t* src = values.const_data_ptr<scalar_t>();
    if (values.numel() == 1) {
      std::fill_n(column, groups, static_cast<out_t>(src[0]));
    } else {
      std::transform(src, src + groups, column, [](scalar_t v) { return static_cast<out_t>(v); });
    }
  });
}

}  // namespace

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
  const auto options = at::TensorOptions(dtype).device(device);
  if (device.is_cpu() && std::all_of(entries.begin(), entries.end(), readable_on_cpu)) {
    at::Tensor out = at::empty({outputs * inputs, groups}, options);
    AT_DISPATCH_FLOATING_TYPES(dtype, "coefficient_matrix", [&] {
      scalar_t* column = out.mutable_data_ptr<scalar_t>();
      for (const auto& entry : entries) {
        write_column(entry, column, groups);
        column += groups;
      }
    });
    return as_matrix(out);
  }
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
  at::Tensor out = at::empty({outputs * inputs, groups}, options);
  for (size_t i = 0; i < entries.size(); ++i) {
    at::Tensor column = out.select(0, static_cast<int64_t>(i));
    if (const double* number = std::get_if<double>(&entries[i])) {
      column.fill_(*number);  // rounded to dtype, as PyTorch rounds a scalar operand
      continue;
    }
    const at::Tensor& values = std::get<at::Tensor>(entries[i]);
    check_count(values, groups);
    column.copy_(values.reshape({-1}));  // converts type and device; one value broadcasts
  }
  return as_matrix(out);
}

}  // namespace fastflow
