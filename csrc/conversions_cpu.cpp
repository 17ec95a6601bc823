// Coefficients of fastflow.convert: per sample, the row over (x_t, pred) that turns a prediction
// of kind src into one of kind dst, from the path's coefficient matrix.
//
// fastflow/conversions.py builds these rows with twenty-odd tensor ops on B numbers; on a small
// batch their dispatch costs more than the fused pass itself. This file repeats its formulas
// operation for operation in double (the type conversions.py computes them in), with no
// contraction: only + - * /, comparisons and min/max, each correctly rounded, so the results are
// the same bits. tests/test_conversions.py compares them; triton_kernels/conversions.py is the
// GPU twin.
#include "coefficients.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

namespace fastflow {
namespace {

enum class Kind { kVelocity, kEpsilon, kData, kScore };

Kind parse_kind(const std::string& name, const char* argument) {
  if (name == "velocity") return Kind::kVelocity;
  if (name == "epsilon") return Kind::kEpsilon;
  if (name == "data") return Kind::kData;
  TORCH_CHECK_VALUE(name == "score", "fastflow conversion_coefficients: ", argument,
                    " must be 'velocity', 'epsilon', 'data' or 'score', got '", name, "'");
  return Kind::kScore;
}

// conversions._safe: x moved away from 0 by at least eps, keeping its sign; nan stays nan.
double safe(double x, double eps) { return x < 0 ? std::min(x, -eps) : std::max(x, eps); }

// f(std::integral_constant<Kind, kind>{}): the kinds as constants, so that each pair of kinds
// gets a loop of its own, with no branch per sample (8 ns a sample at 256K samples, one time per
// token, for one loop of all; 1.3 to 2 ns for a pair's own).
template <typename F>
void with_kind(Kind kind, const F& f) {
  switch (kind) {
    case Kind::kVelocity: return f(std::integral_constant<Kind, Kind::kVelocity>{});
    case Kind::kEpsilon: return f(std::integral_constant<Kind, Kind::kEpsilon>{});
    case Kind::kData: return f(std::integral_constant<Kind, Kind::kData>{});
    case Kind::kScore: return f(std::integral_constant<Kind, Kind::kScore>{});
  }
}

// conversion_coefficients, line for line. Row entries are (x_t, pred) coefficients.
template <Kind src, Kind dst>
void conversion_row(double alpha, double sigma, double d_alpha, double d_sigma, double eps,
                    double* row) {
  double data[2], noise[2];
  if constexpr (src == Kind::kData) {
    data[0] = 0.0, data[1] = 1.0;
    const double safe_sigma = safe(sigma, eps);
    noise[0] = 1.0 / safe_sigma, noise[1] = -alpha / safe_sigma;
  } else if constexpr (src == Kind::kEpsilon) {
    noise[0] = 0.0, noise[1] = 1.0;
    const double safe_alpha = safe(alpha, eps);
    data[0] = 1.0 / safe_alpha, data[1] = -sigma / safe_alpha;
  } else if constexpr (src == Kind::kScore) {
    noise[0] = 0.0, noise[1] = -sigma;
    const double safe_alpha = safe(alpha, eps);
    data[0] = 1.0 / safe_alpha, data[1] = sigma * sigma / safe_alpha;
  } else {
    const double det = safe(alpha * d_sigma - sigma * d_alpha, eps);
    data[0] = d_sigma / det, data[1] = -sigma / det;
    noise[0] = -d_alpha / det, noise[1] = alpha / det;
  }
  const double safe_sigma = dst == Kind::kScore ? safe(sigma, eps) : 0.0;
  for (int j = 0; j < 2; ++j) {
    if constexpr (dst == Kind::kData) {
      row[j] = data[j];
    } else if constexpr (dst == Kind::kEpsilon) {
      row[j] = noise[j];
    } else if constexpr (dst == Kind::kScore) {
      row[j] = -noise[j] / safe_sigma;
    } else {
      row[j] = d_alpha * data[j] + d_sigma * noise[j];
    }
  }
}

}  // namespace

at::Tensor conversion_coefficients_cpu(const at::Tensor& path_coeffs, const std::string& src,
                                       const std::string& dst, double eps, at::ScalarType dtype) {
  const Kind from = parse_kind(src, "src"), to = parse_kind(dst, "dst");
  TORCH_CHECK_VALUE(path_coeffs.dim() == 3 && path_coeffs.size(1) == 2 &&
                        path_coeffs.size(2) == 2 && path_coeffs.scalar_type() == at::kDouble &&
                        path_coeffs.device().is_cpu(),
                    "fastflow conversion_coefficients: path_coeffs must be a [G, 2, 2] float64 "
                    "CPU tensor, got ", path_coeffs.scalar_type(), " of shape ",
                    path_coeffs.sizes(), " on ", path_coeffs.device());
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble,
                    "fastflow conversion_coefficients: dtype must be float32 or float64, got ",
                    dtype);
  const int64_t groups = path_coeffs.size(0);
  at::Tensor out = entry_major_coefficients(groups, 1, 2, path_coeffs.options().dtype(dtype));
  // Rows (x_t, u_t) over columns (x0, x1): [[sigma, alpha], [d_sigma, d_alpha]].
  const auto pc = path_coeffs.accessor<double, 3>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "conversion_coefficients_cpu", [&] {
    scalar_t* entries = out.mutable_data_ptr<scalar_t>();
    with_kind(from, [&](auto src) {
      with_kind(to, [&](auto dst) {
        at::parallel_for(0, groups, kGroupGrain, [&](int64_t begin, int64_t end) {
          double row[2];
          for (int64_t g = begin; g < end; ++g) {
            conversion_row<decltype(src)::value, decltype(dst)::value>(
                pc[g][0][1], pc[g][0][0], pc[g][1][1], pc[g][1][0], eps, row);
            entries[g] = static_cast<scalar_t>(row[0]);
            entries[groups + g] = static_cast<scalar_t>(row[1]);
          }
        });
      });
    });
  });
  return out;
}

}  // namespace fastflow
