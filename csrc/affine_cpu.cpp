// Entry points of the CPU affine kernels: argument checks, then the kernels of one instruction
// set (affine_cpu_kernels.h): the baseline, compiled here, or AVX2 (affine_cpu_avx2.cpp) on CPUs
// that have it. Both give the same bits; set_cpu_isa lets the tests run each.
#include "affine.h"
#include "float_bits.h"
#include "simd_clones.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <type_traits>

#define FASTFLOW_CPU_ISA baseline
#include "affine_cpu_kernels.h"

namespace fastflow {

#ifdef FASTFLOW_AVX2_KERNELS
namespace avx2 {  // affine_cpu_avx2.cpp
void affine(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
            const std::vector<at::Tensor>& outputs, int64_t row, bool may_stream);
void dot(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, int64_t groups,
         at::Tensor& sums);
void sqnorm(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs, int64_t row,
            at::Tensor& sums);
void narrow_floats(const float* src, int64_t n, at::ScalarType type, void* dst);
}  // namespace avx2
#else
namespace avx2 = baseline;  // never chosen: avx2_available() is false
#endif

namespace {

bool avx2_available() {
#ifdef FASTFLOW_AVX2_KERNELS
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

std::atomic<bool> g_use_avx2{avx2_available()};

bool use_avx2() { return g_use_avx2.load(std::memory_order_relaxed); }

}  // namespace

std::string cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

void set_cpu_isa(const std::string& isa) {
  TORCH_CHECK_VALUE(isa == "baseline" || (isa == "avx2" && avx2_available()),
                    "fastflow set_cpu_isa: expected 'baseline'",
                    avx2_available() ? " or 'avx2'" : "",
                    " (what this CPU and build support), got '", isa, "'");
  g_use_avx2 = isa == "avx2";
}

void narrow_floats(const float* src, int64_t n, at::ScalarType type, void* dst) {
  if (use_avx2()) return avx2::narrow_floats(src, n, type, dst);
  baseline::narrow_floats(src, n, type, dst);
}

namespace {

// The kernels of the chosen instruction set, on checked arguments of any layout. `fresh`: the
// outputs were just allocated (their pages not yet touched), which rules out streaming stores.
void run_affine(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                const std::vector<at::Tensor>& outputs, bool fresh) {
  if (inputs[0].numel() == 0) return;
  on_streams(inputs, outputs, [&](const auto& in, const auto& out, int64_t row) {
    if (use_avx2()) return avx2::affine(in, coeffs, out, row, !fresh);
    baseline::affine(in, coeffs, out, row, !fresh);
  });
}

}  // namespace

void affine_cpu(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                const std::vector<at::Tensor>& outputs) {
  check_affine_args(inputs, coeffs, outputs, c10::kCPU, /*one_dtype=*/false);
  for (const auto& y : outputs)
    TORCH_CHECK_VALUE(at::has_internal_overlap(y) != at::MemOverlap::Yes,
                      "fastflow affine: an output has elements that share memory (strides ",
                      y.strides(), " for shape ", y.sizes(), ")");
  run_affine(inputs, coefficients_apart(coeffs, outputs), outputs, /*fresh=*/false);
}

std::vector<at::Tensor> affine_fresh_cpu(const std::vector<at::Tensor>& inputs,
                                         const at::Tensor& coeffs) {
  TORCH_CHECK_VALUE(!inputs.empty(), "fastflow affine: expected 1 to ", kMaxInputs,
                    " inputs, got 0");
  TORCH_CHECK_VALUE(coeffs.dim() == 3, "fastflow affine: coeffs must have shape [G, M, ",
                    inputs.size(), "], got ", coeffs.sizes());
  const int64_t m = coeffs.size(1);
  TORCH_CHECK_VALUE(m >= 1 && m <= kMaxOutputs, "fastflow affine: expected 1 to ", kMaxOutputs,
                    " outputs, got ", m);
  std::vector<at::Tensor> outputs;
  for (int64_t i = 0; i < m; ++i) outputs.push_back(fresh_output(inputs[0]));
  check_affine_args(inputs, coeffs, outputs, c10::kCPU);
  run_affine(inputs, coeffs, outputs, /*fresh=*/true);
  return outputs;
}

at::Tensor affine_dot_cpu(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                          int64_t groups) {
  check_dot_args(a, b, groups, c10::kCPU);
  const auto math = math_type(a, b);
  // Accumulate in fp64 (products of fp32 values are exact there) and round once at the end.
  at::Tensor sums = at::zeros({groups, static_cast<int64_t>(a.size()),
                               static_cast<int64_t>(b.size())}, a[0].options().dtype(at::kDouble));
  if (a[0].numel() != 0) {
    if (use_avx2()) {
      avx2::dot(a, b, groups, sums);
    } else {
      baseline::dot(a, b, groups, sums);
    }
  }
  return sums.to(math);
}

at::Tensor affine_sqnorm_cpu(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs) {
  TORCH_CHECK_VALUE(!inputs.empty(), "fastflow affine_sqnorm: needs at least one input");
  // A residual is affine's single output: the same checks, with a placeholder for it.
  check_affine_args(inputs, coeffs, {inputs[0]}, c10::kCPU);
  // The sums are G numbers: filled and rounded to the math type here rather than by ATen ops
  // (zeros, to), whose dispatch costs more than a small batch's whole reduction.
  const int64_t groups = coeffs.size(0);
  at::Tensor sums = at::empty({groups}, inputs[0].options().dtype(at::kDouble));
  double* sum = sums.mutable_data_ptr<double>();
  std::fill_n(sum, groups, 0.0);
  if (inputs[0].numel() != 0) {
    on_streams(inputs, {}, [&](const auto& in, const auto&, int64_t row) {
      if (use_avx2()) return avx2::sqnorm(in, coeffs, row, sums);
      baseline::sqnorm(in, coeffs, row, sums);
    });
  }
  if (math_type(inputs, {}) == at::kDouble) return sums;
  at::Tensor rounded = at::empty({groups}, sums.options().dtype(at::kFloat));
  std::transform(sum, sum + groups, rounded.mutable_data_ptr<float>(),
                 [](double v) { return static_cast<float>(v); });
  return rounded;
}

}  // namespace fastflow
