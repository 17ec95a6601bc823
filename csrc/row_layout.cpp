// The layouts the CPU kernels stream in place: rows of contiguous elements at one stride apart
// (affine.h, row_length).
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

void on_streams(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs,
                c10::function_ref<void(const std::vector<at::Tensor>&,
                                       const std::vector<at::Tensor>&, int64_t)> kernel) {
  const int64_t row = row_length(inputs, outputs);
  if (row > 0) return kernel(inputs, outputs, row);
  std::vector<at::Tensor> in, out;
  for (const auto& x : inputs) in.push_back(x.contiguous());
  for (const auto& y : outputs)
    out.push_back(y.is_contiguous() ? y : at::empty(y.sizes(), y.options()));
  kernel(in, out, std::max<int64_t>(1, in[0].numel()));
  for (size_t m = 0; m < outputs.size(); ++m)
    if (!out[m].is_same(outputs[m])) outputs[m].copy_(out[m]);
}

}  // namespace fastflow
