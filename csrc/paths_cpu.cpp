// Coefficient matrices of the built-in paths whose schedules are plain arithmetic: CondOT (and
// Target-CFM, the default and most used) and torchcfm's constant-noise path.
//
// fastflow/paths.py defines every path in PyTorch (differentiable in t, any device). On CPU those
// formulas are half a dozen tensor ops on B numbers, and each op's dispatch costs more than the
// affine kernel itself on a small batch. This file repeats the formulas operation for operation
// in double (the type paths.py computes them in on CPU), with no contraction, so the results are
// the same bits; tests/test_paths.py compares them, and triton_kernels/paths.py is the GPU twin.
// Only + - * / qualify: PyTorch's CPU sqrt, sin, exp and pow (MKL's vector math in the official
// builds) need not round like libm's, so LinearVP, the Schrodinger bridge, Cosine, VP and
// Polynomial stay in PyTorch.
#include "coefficients.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

namespace fastflow {
namespace {

// Rows (x_t, u_t) over columns (x0, x1[, noise]) at time t, row-major, for paths of K columns.
// Each line mirrors the expression of the same path in fastflow/paths.py.
void cond_ot(double t, const std::vector<double>& p, double* c) {
  const double slope = 1.0 - p[0];  // p = {sigma_min}
  c[0] = 1.0 - slope * t;
  c[1] = t;
  c[2] = -slope;
  c[3] = 1.0;
}

void constant_noise(double t, const std::vector<double>& p, double* c) {
  c[0] = 1.0 - t;
  c[1] = t;
  c[2] = p[0];  // p = {sigma}
  c[3] = -1.0;
  c[4] = 1.0;
  c[5] = 0.0;
}

struct NativePath {
  const char* name;
  int columns;
  size_t params;
  void (*entries)(double, const std::vector<double>&, double*);
};

constexpr NativePath kPaths[] = {
    {"cond_ot", 2, 1, cond_ot},
    {"constant_noise", 3, 1, constant_noise},
};

}  // namespace

at::Tensor path_coefficients_cpu(const at::Tensor& t, const std::string& path,
                                 const std::vector<double>& params, at::ScalarType dtype) {
  const NativePath* found = nullptr;
  for (const auto& p : kPaths)
    if (path == p.name) found = &p;
  TORCH_CHECK_VALUE(found != nullptr, "fastflow path_coefficients: no native path '", path, "'");
  TORCH_CHECK_VALUE(params.size() == found->params, "fastflow path_coefficients: '", path,
                    "' takes ", found->params, " parameters, got ", params.size());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.scalar_type() == at::kDouble && t.device().is_cpu(),
                    "fastflow path_coefficients: t must be a 1-D float64 CPU tensor, got ",
                    t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble,
                    "fastflow path_coefficients: dtype must be float32 or float64, got ", dtype);
  const int64_t groups = t.size(0), width = 2 * found->columns, stride = t.stride(0);
  at::Tensor out = at::empty({groups, 2, found->columns}, t.options().dtype(dtype));
  const double* times = t.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "path_coefficients_cpu", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    double row[6];
    for (int64_t g = 0; g < groups; ++g) {
      found->entries(times[g * stride], params, row);
      for (int64_t j = 0; j < width; ++j) dst[g * width + j] = static_cast<scalar_t>(row[j]);
    }
  });
  return out;
}

}  // namespace fastflow
