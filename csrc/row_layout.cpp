// The layouts the CPU kernels stream in place: rows of contiguous elements at one stride apart
// (affine.h, row_length), and contiguous memory with the batch moved inward (batch_period).
#include "affine.h"

#include <ATen/ops/empty.h>

#include <algorithm>

namespace fastflow {

namespace {

// The elements of x's innermost run of memory: the product of its innermost sizes while their
// strides are those of a contiguous tensor.
int64_t contiguous_run(const at::Tensor& x) {
  int64_t run = 1;
  for (int64_t d = x.dim() - 1; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (x.stride(d) != run) break;
    run *= x.size(d);
  }
  return run;
}

}  // namespace

int64_t row_stride(const at::Tensor& x, int64_t row) {
  if (x.is_contiguous()) return row;
  // The innermost dimensions must make up a row exactly, and the others one stride between rows.
  int64_t d = x.dim() - 1, run = 1;
  for (; d >= 0 && run < row; --d) {
    if (x.size(d) == 1) continue;
    if (x.stride(d) != run) return -1;
    run *= x.size(d);
  }
  if (run != row) return -1;
  int64_t stride = row, next = -1;  // next: the stride the next outer dimension must have
  for (; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (next < 0) {
      stride = x.stride(d);
    } else if (x.stride(d) != next) {
      return -1;
    }
    next = x.stride(d) * x.size(d);
  }
  return stride;
}

int64_t row_length(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs) {
  TORCH_CHECK_VALUE(!inputs.empty(), "fastflow row_length: expected at least one input");
  const int64_t numel = inputs[0].numel();
  for (const auto* streams : {&inputs, &outputs})
    for (const auto& x : *streams)
      TORCH_CHECK_VALUE(x.numel() == numel, "fastflow row_length: streams of ", numel,
                        " elements, got one of ", x.numel());
  if (numel == 0) return 1;  // nothing to stream; a length the kernels may divide by
  int64_t row = numel;
  for (const auto* streams : {&inputs, &outputs})
    for (const auto& x : *streams)
      if (!x.is_contiguous()) row = std::min(row, contiguous_run(x));
  if (row == numel) return row;
  if (row < kMinRow) return 0;
  for (const auto* streams : {&inputs, &outputs})
    for (const auto& x : *streams)
      if (row_stride(x, row) < 0) return 0;
  // Rows closer than their length would write some elements twice.
  for (const auto& y : outputs)
    if (numel > row && row_stride(y, row) < row) return 0;
  return row;
}

int64_t batch_period(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs,
                     int64_t groups, bool ordered) {
  TORCH_CHECK_VALUE(!inputs.empty(), "fastflow batch_period: expected at least one input");
  const at::Tensor& x = inputs[0];
  if (x.dim() < 2 || x.numel() == 0 || x.is_contiguous() || groups < 1 || x.size(0) % groups ||
      (ordered && groups != x.size(0)))
    return 0;
  // Memory that holds other values than the tensor's (the negative bit) is copied, which
  // resolves them.
  for (const auto* streams : {&inputs, &outputs})
    for (const auto& y : *streams)
      if (y.sizes() != x.sizes() || y.strides() != x.strides() || y.is_neg() || y.is_conj())
        return 0;
  // No order to keep, and each group one run of memory (one group, or the batch outermost as in
  // channels_last): memory in any dense layout, one period.
  if (!ordered && x.is_non_overlapping_and_dense() &&
      (groups == 1 || x.stride(0) * x.size(0) == x.numel()))
    return x.numel();
  for (int64_t d = 1; d < x.dim(); ++d) {
    if (!x.movedim(0, d).is_contiguous()) continue;
    int64_t inner = 1;
    for (int64_t i = d + 1; i < x.dim(); ++i) inner *= x.size(i);
    const int64_t period = x.size(0) * inner, run = period / groups;
    return run == 1 || run >= kMinRow ? period : 0;
  }
  return 0;
}

void on_streams(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs,
                int64_t groups, bool ordered,
                c10::function_ref<void(const std::vector<at::Tensor>&,
                                       const std::vector<at::Tensor>&, int64_t, int64_t)> kernel) {
  const int64_t numel = inputs[0].numel();
  const int64_t whole = std::max<int64_t>(1, numel);  // a length the kernels may divide by
  const int64_t row = row_length(inputs, outputs);
  if (row > 0) return kernel(inputs, outputs, row, whole);
  std::vector<at::Tensor> in, out;
  if (const int64_t period = batch_period(inputs, outputs, groups, ordered)) {
    // Their memory, in order, as contiguous streams: one row of periods.
    for (const auto& x : inputs) in.push_back(x.as_strided({numel}, {1}));
    for (const auto& y : outputs) out.push_back(y.as_strided({numel}, {1}));
    return kernel(in, out, numel, period);
  }
  for (const auto& x : inputs) in.push_back(x.contiguous());
  for (const auto& y : outputs)
    out.push_back(y.is_contiguous() ? y : at::empty(y.sizes(), y.options()));
  kernel(in, out, whole, whole);
  for (size_t m = 0; m < outputs.size(); ++m)
    if (!out[m].is_same(outputs[m])) outputs[m].copy_(out[m]);
}

}  // namespace fastflow
