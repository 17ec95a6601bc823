// Entry points of the CPU affine kernels: argument checks, then the kernels of one instruction
// set (affine_cpu_kernels.h): the baseline, compiled here, AVX2 (affine_cpu_avx2.cpp), AVX-512
// (affine_cpu_avx512.cpp) or AVX-512 with AVX512_BF16 (affine_cpu_avx512_bf16.cpp) on CPUs that
// have them. All give the same bits; set_cpu_isa lets the tests run each.
#include "affine_cpu_deps.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/ScopeExit.h>

#include <atomic>
#include <string>
#include <vector>

#define FASTFLOW_CPU_ISA baseline
#include "affine_cpu_kernels.h"

namespace fastflow {

#ifdef FASTFLOW_ISA_KERNELS
namespace avx2 {  // affine_cpu_avx2.cpp
extern const IsaKernels kKernels;
}
namespace avx512 {  // affine_cpu_avx512.cpp
extern const IsaKernels kKernels;
}
namespace avx512_bf16 {  // affine_cpu_avx512_bf16.cpp
extern const IsaKernels kKernels;
}
#endif

namespace {

// The instruction sets this CPU and build can run, best last.
std::vector<const IsaKernels*> available_isas() {
  std::vector<const IsaKernels*> isas{&baseline::kKernels};
#ifdef FASTFLOW_ISA_KERNELS
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    isas.push_back(&avx2::kKernels);
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
      isas.push_back(&avx512::kKernels);
      if (__builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16"))
        isas.push_back(&avx512_bf16::kKernels);
    }
  }
#endif
  return isas;
}

// The best available, but not AVX-512 where PyTorch runs its own kernels without it (a CPU
// it does not trust with AVX-512, or ATEN_CPU_CAPABILITY set lower): whatever reason PyTorch
// has, it holds for these kernels too.
const IsaKernels* default_isa() {
  auto isas = available_isas();
  // at::get_cpu_capability() names it: "DEFAULT", "AVX2", "AVX512" on x86-64.
  if (at::get_cpu_capability().rfind("AVX512", 0) != 0) {
    while (std::string(isas.back()->name).rfind("avx512", 0) == 0) isas.pop_back();
  }
  return isas.back();
}

std::atomic<const IsaKernels*> g_isa{default_isa()};

const IsaKernels& isa() { return *g_isa.load(std::memory_order_relaxed); }

}  // namespace

std::string cpu_isa() { return isa().name; }

void set_cpu_isa(const std::string& name) {
  std::string names;
  for (const IsaKernels* kernels : available_isas()) {
    if (name == kernels->name) {
      g_isa = kernels;
      return;
    }
    names += std::string(names.empty() ? "'" : ", '") + kernels->name + "'";
  }
  TORCH_CHECK_VALUE(false, "fastflow set_cpu_isa: expected one of ", names,
                    " (what this CPU and build support), got '", name, "'");
}

void narrow_floats(const float* src, int64_t n, at::ScalarType type, void* dst) {
  isa().narrow_floats(src, n, type, dst);
}

at::Tensor ordered_sum_cpu(const at::Tensor& values) {
  TORCH_CHECK_VALUE(values.dim() == 1 && values.is_cpu() &&
                        (values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble),
                    "fastflow ordered_sum: expected a 1-D float32 or float64 CPU tensor, got ",
                    values.scalar_type(), " of shape ", values.sizes(), " on ", values.device());
  const at::Tensor x = values.contiguous();
  return at::scalar_tensor(isa().total(x), x.options());
}

namespace {

// The kernels of the chosen instruction set, on checked arguments of any layout. `fresh`: the
// outputs were just allocated (their pages not yet touched), which rules out streaming stores.
void run_affine(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                const std::vector<at::Tensor>& outputs, bool fresh) {
  if (inputs[0].numel() == 0) return;
  on_streams(inputs, outputs, coeffs.size(0), /*ordered=*/false,
             [&](const auto& in, const auto& out, int64_t row, int64_t period) {
    isa().affine(in, coeffs, out, row, period, !fresh);
  });
}

void check_out_args(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                    const std::vector<at::Tensor>& outputs) {
  check_affine_args(inputs, coeffs, outputs, c10::kCPU, /*one_dtype=*/false);
  for (const auto& y : outputs)
    TORCH_CHECK_VALUE(at::has_internal_overlap(y) != at::MemOverlap::Yes,
                      "fastflow affine: an output has elements that share memory (strides ",
                      y.strides(), " for shape ", y.sizes(), ")");
}

// Whether the kernels may write output y directly (fastflow/_ops.py, _writable_in_place): it
// shares no memory with an input, or, as the last output, lies exactly on top of one.
bool writable_in_place(const at::Tensor& y, bool last, const std::vector<at::Tensor>& inputs) {
  for (const auto& x : inputs)
    if (spans_intersect(x, y) &&
        !(last && x.const_data_ptr() == y.const_data_ptr() &&
          x.scalar_type() == y.scalar_type() && x.sizes() == y.sizes() &&
          x.strides() == y.strides()))
      return false;
  return true;
}

}  // namespace

void affine_cpu(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                const std::vector<at::Tensor>& outputs) {
  check_out_args(inputs, coeffs, outputs);
  run_affine(inputs, coefficients_apart(coeffs, outputs), outputs, /*fresh=*/false);
}

void affine_out_cpu(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                    const std::vector<at::Tensor>& outputs) {
  check_out_args(inputs, coeffs, outputs);
  // PyTorch's rule for in-place writes, checked before anything is written.
  for (const auto& y : outputs)
    TORCH_CHECK(!y.is_inference() || c10::InferenceMode::is_enabled(),
                "fastflow affine: an output is an inference tensor (made under "
                "torch.inference_mode), which cannot be written outside inference mode");
  const auto bump_versions = c10::make_scope_exit([&] {
    for (const auto& y : outputs)
      if (!y.is_inference()) y.unsafeGetTensorImpl()->bump_version();
  });
  std::vector<at::Tensor> staged;
  for (size_t m = 0; m < outputs.size(); ++m) {
    const at::Tensor& y = outputs[m];
    staged.push_back(writable_in_place(y, m + 1 == outputs.size(), inputs)
                         ? y : at::empty(y.sizes(), y.options()));
  }
  run_affine(inputs, coefficients_apart(coeffs, outputs), staged, /*fresh=*/false);
  for (size_t m = 0; m < outputs.size(); ++m)
    if (!staged[m].is_same(outputs[m])) outputs[m].copy_(staged[m]);
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
  // In the inputs' layout where they share one dense layout (fastflow/_ops.py,
  // _shared_dense_layout), as PyTorch's elementwise ops give theirs; else contiguous.
  bool keep_layout = !inputs[0].is_contiguous() && inputs[0].is_non_overlapping_and_dense();
  for (const auto& x : inputs)
    keep_layout = keep_layout && x.sizes() == inputs[0].sizes() &&
                  x.strides() == inputs[0].strides();
  std::vector<at::Tensor> outputs;
  for (int64_t i = 0; i < m; ++i) outputs.push_back(fresh_output(inputs[0], keep_layout));
  check_affine_args(inputs, coeffs, outputs, c10::kCPU);
  run_affine(inputs, coeffs, outputs, /*fresh=*/true);
  return outputs;
}

at::Tensor affine_dot_cpu(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                          int64_t groups) {
  check_dot_args(a, b, groups);
  const auto math = math_type(a, b);
  // Accumulate in fp64 (products of fp32 values are exact there) and round once at the end.
  at::Tensor sums = at::zeros({groups, static_cast<int64_t>(a.size()),
                               static_cast<int64_t>(b.size())}, a[0].options().dtype(at::kDouble));
  if (a[0].numel() != 0) {
    isa().dot(a, b, groups, sums);
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
  const auto stream = [&](const at::Tensor& c, at::Tensor& out) {
    on_streams(inputs, {}, c.size(0), /*ordered=*/true,
               [&](const auto& in, const auto&, int64_t row, int64_t period) {
      isa().sqnorm(in, c, row, period, out);
    });
  };
  const int64_t batch = inputs[0].dim() > 0 && inputs[0].numel() ? inputs[0].size(0) : 0;
  if (groups < batch && batch % groups == 0 &&
      batch_period(inputs, {}, batch, /*ordered=*/true) > 0) {
    // Groups of several samples in a layout with the batch inward (a loss over the whole batch
    // of x.T): streamed in place as per-sample sums, then added up per group in sample order.
    // The value of the contiguous path, its terms summed in another order.
    const int64_t per_group = batch / groups;
    at::Tensor samples = at::zeros({batch}, sums.options());
    stream(coeffs.repeat_interleave(per_group, 0), samples);
    const double* s = samples.const_data_ptr<double>();
    for (int64_t b = 0; b < batch; ++b) sum[b / per_group] += s[b];
  } else if (inputs[0].numel() != 0) {
    stream(coeffs, sums);
  }
  if (math_type(inputs, {}) == at::kDouble) return sums;
  at::Tensor rounded = at::empty({groups}, sums.options().dtype(at::kFloat));
  std::transform(sum, sum + groups, rounded.mutable_data_ptr<float>(),
                 [](double v) { return static_cast<float>(v); });
  return rounded;
}

}  // namespace fastflow
