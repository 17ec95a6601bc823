// Coefficient matrices of the built-in paths, from t in one call.
//
// fastflow/paths.py defines every path in PyTorch (differentiable in t, any device). On CPU those
// formulas are 4 to 20 tensor ops on B numbers, and each op's dispatch costs more than the
// affine kernel itself on a small batch. This file repeats the formulas operation for operation
// in double (the type paths.py computes them in on CPU), with no contraction:
// - CondOT, Target-CFM and the constant-noise path are + - * / only: the results are PyTorch's
//   bits;
// - sqrt, sin, cos, exp and pow come from the C library here and from PyTorch's vector math
//   there (whose t ** 3 is t * t * t). Both round within an ulp, but not always the same way
//   (on 0.1% to 25% of arguments in double, by function), so LinearVP, Polynomial, Cosine, VP
//   and the Schrodinger bridge agree with PyTorch to a few ulps of double where their formulas
//   are well conditioned. Rounded to float, the type of fp32, bf16 and fp16 streams'
//   coefficients, they agreed on every time tested. tests/test_paths.py checks both;
//   triton_kernels/paths.py is the GPU twin.
#include "coefficients.h"
#include "affine.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/MathConstants.h>

#include <algorithm>
#include <array>
#include <cmath>

namespace fastflow {
namespace {

// A path's parameters (at most two), in order.
using Params = std::array<double, 2>;

// Rows (x_t, u_t) over columns (x0, x1[, noise]) at time t, row-major, for paths of K columns:
// (sigma, alpha, d_sigma, d_alpha) for the affine ones. Each line mirrors the expression of the
// same path in fastflow/paths.py.
void cond_ot(double t, const Params& p, double* c) {
  const double slope = 1.0 - p[0];  // p = {sigma_min}
  c[0] = 1.0 - slope * t;
  c[1] = t;
  c[2] = -slope;
  c[3] = 1.0;
}

// t ** n as torch.pow takes it: a square root for n = 1/2 and its reciprocal for n = -1/2, which
// give NaN at t = -inf where the C library's pow gives inf and 0.
double torch_pow(double t, double n) {
  if (n == 0.5) return std::sqrt(t);
  if (n == -0.5) return 1.0 / std::sqrt(t);
  return std::pow(t, n);
}

void polynomial(double t, const Params& p, double* c) {
  const double n = p[0];
  const double alpha = torch_pow(t, n), d_alpha = n * torch_pow(t, n - 1.0);
  c[0] = 1.0 - alpha;
  c[1] = alpha;
  c[2] = -d_alpha;
  c[3] = d_alpha;
}

void cosine(double t, const Params&, double* c) {
  constexpr double kHalfPi = c10::pi<double> / 2;  // math.pi / 2
  const double angle = kHalfPi * t, sin = std::sin(angle), cos = std::cos(angle);
  c[0] = cos;
  c[1] = sin;
  c[2] = -kHalfPi * sin;
  c[3] = kHalfPi * cos;
}

void linear_vp(double t, const Params&, double* c) {
  const double sigma = std::sqrt(1.0 - t * t);
  c[0] = sigma;
  c[1] = t;
  c[2] = -t / sigma;
  c[3] = 1.0;
}

void vp(double t, const Params& p, double* c) {
  const double beta_min = p[0], spread = p[1] - p[0];  // p = {beta_min, beta_max}
  const double s = 1.0 - t;
  const double big_t = 0.5 * (s * s) * spread + s * beta_min, d_big_t = -s * spread - beta_min;
  const double alpha = std::exp(-0.5 * big_t), decay = std::exp(-big_t);
  const double sigma = std::sqrt(1.0 - decay);
  c[0] = sigma;
  c[1] = alpha;
  c[2] = 0.5 * d_big_t * decay / sigma;
  c[3] = -0.5 * d_big_t * alpha;
}

void constant_noise(double t, const Params& p, double* c) {
  c[0] = 1.0 - t;
  c[1] = t;
  c[2] = p[0];  // p = {sigma}
  c[3] = -1.0;
  c[4] = 1.0;
  c[5] = 0.0;
}

void schrodinger_bridge(double t, const Params& p, double* c) {
  const double s_t = p[0] * std::sqrt(t * (1.0 - t));  // p = {sigma}
  const double ratio = (1.0 - 2.0 * t) / (2.0 * t * (1.0 - t) + 1e-8);
  c[0] = 1.0 - t;
  c[1] = t;
  c[2] = s_t;
  c[3] = -1.0;
  c[4] = 1.0;
  c[5] = ratio * s_t;
}

using Entries = void (*)(double, const Params&, double*);

// The [G, 2, columns] coefficients of the times `t` into `out`: one loop per path (and float
// types), with the path's formulas inlined, so that the arithmetic ones vectorise. CondOT took
// 48 instructions a sample through a pointer per sample, 11 inlined (9 and 1.2 ns a sample at
// 256K samples, one time per token, where its pass over the streams takes 1 to 2 ns).
template <int kColumns, Entries kEntries>
void fill(const at::Tensor& t, const Params& params, at::Tensor& out) {
  constexpr int kWidth = 2 * kColumns;
  const int64_t groups = t.size(0), stride = t.stride(0);
  // t in its own type, widened to double on load (exactly): the caller saves a conversion.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "path_times", [&] {
    using time_t = scalar_t;
    const time_t* times = t.const_data_ptr<time_t>();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "path_coefficients_cpu", [&] {
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      // Threads from kGroupGrain samples on (one time per token: hundreds of thousands); a
      // batch below that runs inline, without the pool's cost.
      at::parallel_for(0, groups, kGroupGrain, [&](int64_t begin, int64_t end) {
        const Params p = params;  // a local copy: the stores below cannot change it
        for (int64_t g = begin; g < end; ++g) {
          double row[kWidth];
          kEntries(static_cast<double>(times[g * stride]), p, row);
          for (int j = 0; j < kWidth; ++j) dst[j * groups + g] = static_cast<scalar_t>(row[j]);
        }
      });
    });
  });
}

struct NativePath {
  const char* name;
  int columns;
  size_t params;
  void (*fill)(const at::Tensor&, const Params&, at::Tensor&);
};

constexpr NativePath kPaths[] = {
    {"cond_ot", 2, 1, fill<2, cond_ot>},
    {"polynomial", 2, 1, fill<2, polynomial>},
    {"cosine", 2, 0, fill<2, cosine>},
    {"linear_vp", 2, 0, fill<2, linear_vp>},
    {"vp", 2, 2, fill<2, vp>},
    {"constant_noise", 3, 1, fill<3, constant_noise>},
    {"schrodinger_bridge", 3, 1, fill<3, schrodinger_bridge>},
};

}  // namespace

at::Tensor entry_major_coefficients(int64_t groups, int64_t rows, int64_t columns,
                                    const at::TensorOptions& options) {
  at::Tensor out = at::empty({rows, columns, groups}, options).permute({2, 0, 1});
  if (out.nbytes() >= kHugePageMinBytes) advise_huge_pages(out);
  return out;
}

at::Tensor path_coefficients_cpu(const at::Tensor& t, const std::string& path,
                                 const std::vector<double>& params, at::ScalarType dtype) {
  const NativePath* found = nullptr;
  for (const auto& p : kPaths)
    if (path == p.name) found = &p;
  TORCH_CHECK_VALUE(found != nullptr, "fastflow path_coefficients: no native path '", path, "'");
  TORCH_CHECK_VALUE(params.size() == found->params, "fastflow path_coefficients: '", path,
                    "' takes ", found->params, " parameters, got ", params.size());
  TORCH_CHECK_VALUE(t.dim() == 1 && is_stream_type(t.scalar_type()) && t.device().is_cpu(),
                    "fastflow path_coefficients: t must be a 1-D floating-point CPU tensor "
                    "(float16, bfloat16, float32 or float64), got ",
                    t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble,
                    "fastflow path_coefficients: dtype must be float32 or float64, got ", dtype);
  at::Tensor out = entry_major_coefficients(t.size(0), 2, found->columns, t.options().dtype(dtype));
  Params p{};
  std::copy(params.begin(), params.end(), p.begin());
  found->fill(t, p, out);
  return out;
}

}  // namespace fastflow
