// Coefficient matrices of the built-in paths, from t in one call.
//
// fastflow/paths.py defines every path in PyTorch (differentiable in t, any device). On CPU those
// formulas are 4 to 20 tensor ops on B numbers, and each op's dispatch costs more than the
// affine kernel itself on a small batch. This file repeats the formulas operation for operation
// in double (the type paths.py computes them in on CPU), with no contraction, a tile of samples
// at a time in loops that vectorise (AVX2 and AVX-512 clones, simd_clones.h):
// - CondOT, Target-CFM, the constant-noise path and Polynomial with n = 1, 2 or 3 (which
//   torch.pow computes by multiplication) are + - * / only: the results are PyTorch's bits;
// - exp, pow, sin and cos come from vector_math.h here (within an ulp or two of the C library,
//   which takes the arguments outside their domain: t <= 0 for pow, infinities, nan) and from
//   PyTorch's vector math there. Both round within an ulp or two, not always the same way, so
//   LinearVP, the other Polynomials, Cosine, VP and the Schrodinger bridge (sqrt and division
//   also enter them) agree with PyTorch to a few ulps of double where their formulas are well
//   conditioned. Rounded to float, the type of fp32, bf16 and fp16 streams' coefficients, they
//   agreed on every time tested. tests/test_paths.py checks both; triton_kernels/paths.py is
//   the GPU twin.
#include "coefficients.h"
#include "affine.h"
#include "float_bits.h"
#include "simd_clones.h"
#include "vector_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/MathConstants.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>

namespace fastflow {
namespace {

// A path's parameters (at most two), in order.
using Params = std::array<double, 2>;

// The functions the formulas call beyond + - * / and sqrt (which vectorises as it is): the C
// library's, for any argument, or vector_math.h's, which flag the arguments they do not take.
struct LibraryMath {
  static double exp(double x) { return std::exp(x); }
  static double pow(double t, double n) { return std::pow(t, n); }
  static void sin_cos(double x, double& sin, double& cos) {
    sin = std::sin(x);
    cos = std::cos(x);
  }
};

struct VectorMath {
  uint64_t out_of_range = 0;  // all ones once an argument needs the C library
  double exp(double x) { return vector_math::exp(x, out_of_range); }
  double pow(double t, double n) { return vector_math::pow(t, n, out_of_range); }
  void sin_cos(double x, double& sin, double& cos) {
    vector_math::sin_cos(x, sin, cos, out_of_range);
  }
};

// Rows (x_t, u_t) over columns (x0, x1[, noise]) at time t, row-major, for paths of K columns:
// (sigma, alpha, d_sigma, d_alpha) for the affine ones. Each line mirrors the expression of the
// same path in fastflow/paths.py. Always inlined: a call stops the tile's loop vectorising.
template <class Math>
[[gnu::always_inline]] inline void cond_ot(double t, const Params& p, double* c, Math&) {
  const double slope = 1.0 - p[0];  // p = {sigma_min}
  c[0] = 1.0 - slope * t;
  c[1] = t;
  c[2] = -slope;
  c[3] = 1.0;
}

// t ** n as torch.pow computes it on CPU, to its bits: by multiplication for n = 0 to 3, a
// square root for n = 1/2 and its reciprocal for n = -1/2 (NaN at t = -inf, where the C
// library's pow gives inf and 0); any other n through exp and log (Math::pow: within an ulp or
// two of torch.pow's, as its -1 and -2, which Polynomial's n > 0 never asks for). With kGeneral
// false, n must be a whole power (is_whole_power): the multiplications alone. The cases are
// computed, then selected, so that the loop vectorises.
bool is_whole_power(double n) { return n == 0.0 || n == 1.0 || n == 2.0 || n == 3.0; }

template <bool kGeneral, class Math>
[[gnu::always_inline]] inline double torch_pow(double t, double n, Math& math) {
  using vector_math::select;
  const double square = t * t;
  const double whole = select(n == 3.0, square * t,
                              select(n == 2.0, square, select(n == 1.0, t, 1.0)));
  if constexpr (!kGeneral) {
    return whole;
  } else {
    const double root = std::sqrt(t), inverse_root = 1.0 / root;
    const double other =
        select(n == 0.5, root, select(n == -0.5, inverse_root, math.pow(t, n)));
    return select(is_whole_power(n), whole, other);
  }
}

template <class Math, bool kGeneral = true>
[[gnu::always_inline]] inline void polynomial(double t, const Params& p, double* c, Math& math) {
  const double n = p[0];
  const double alpha = torch_pow<kGeneral>(t, n, math);
  const double d_alpha = n * torch_pow<kGeneral>(t, n - 1.0, math);
  c[0] = 1.0 - alpha;
  c[1] = alpha;
  c[2] = -d_alpha;
  c[3] = d_alpha;
}

// Polynomial with n = 1, 2 (the default) or 3: n and n - 1 whole powers, multiplications only.
template <class Math>
[[gnu::always_inline]] inline void whole_polynomial(double t, const Params& p, double* c,
                                                    Math& math) {
  polynomial<Math, false>(t, p, c, math);
}

template <class Math>
[[gnu::always_inline]] inline void cosine(double t, const Params&, double* c, Math& math) {
  constexpr double kHalfPi = c10::pi<double> / 2;  // math.pi / 2
  double sin, cos;
  math.sin_cos(kHalfPi * t, sin, cos);
  c[0] = cos;
  c[1] = sin;
  c[2] = -kHalfPi * sin;
  c[3] = kHalfPi * cos;
}

template <class Math>
[[gnu::always_inline]] inline void linear_vp(double t, const Params&, double* c, Math&) {
  const double sigma = std::sqrt(1.0 - t * t);
  c[0] = sigma;
  c[1] = t;
  c[2] = -t / sigma;
  c[3] = 1.0;
}

template <class Math>
[[gnu::always_inline]] inline void vp(double t, const Params& p, double* c, Math& math) {
  const double beta_min = p[0], spread = p[1] - p[0];  // p = {beta_min, beta_max}
  const double s = 1.0 - t;
  const double big_t = 0.5 * (s * s) * spread + s * beta_min, d_big_t = -s * spread - beta_min;
  const double alpha = math.exp(-0.5 * big_t), decay = math.exp(-big_t);
  const double sigma = std::sqrt(1.0 - decay);
  c[0] = sigma;
  c[1] = alpha;
  c[2] = 0.5 * d_big_t * decay / sigma;
  c[3] = -0.5 * d_big_t * alpha;
}

template <class Math>
[[gnu::always_inline]] inline void constant_noise(double t, const Params& p, double* c, Math&) {
  c[0] = 1.0 - t;
  c[1] = t;
  c[2] = p[0];  // p = {sigma}
  c[3] = -1.0;
  c[4] = 1.0;
  c[5] = 0.0;
}

template <class Math>
[[gnu::always_inline]] inline void schrodinger_bridge(double t, const Params& p, double* c, Math&) {
  const double s_t = p[0] * std::sqrt(t * (1.0 - t));  // p = {sigma}
  const double ratio = (1.0 - 2.0 * t) / (2.0 * t * (1.0 - t) + 1e-8);
  c[0] = 1.0 - t;
  c[1] = t;
  c[2] = s_t;
  c[3] = -1.0;
  c[4] = 1.0;
  c[5] = ratio * s_t;
}

// Samples per tile: the builders' loops run a tile at a time, times widened to double first.
constexpr int64_t kTile = 256;

// What a builder writes for a sample: its [2, K] matrix, rows (x_t, u_t) over (x0, x1[,
// noise]); or the loss's residual row (1, -u_t) over (pred, x0, x1[, noise]), 1 + K entries:
// the bits of the rounded u_t row negated.
enum class Rows { kMatrix, kResidual };

// Stores the entries of `row` (the sample's matrix) that kRows asks for, entry j at
// out[j * groups] (entry-major).
template <Rows kRows, int kColumns, typename out_t>
[[gnu::always_inline]] inline void store_entries(const double* row, out_t* out, int64_t groups) {
  if constexpr (kRows == Rows::kMatrix) {
    for (int j = 0; j < 2 * kColumns; ++j) out[j * groups] = static_cast<out_t>(row[j]);
  } else {
    out[0] = out_t(1);
    for (int j = 0; j < kColumns; ++j)
      out[(1 + j) * groups] = negated(static_cast<out_t>(row[kColumns + j]));
  }
}

// A path's entries for the times t[0, n) with vector math into out (entry-major), and in
// redo[i] whether sample i needs the C library instead; returns whether any does (a test per
// sample would wait on the vector stores).
template <Rows kRows, int kColumns, void (*kEntries)(double, const Params&, double*, VectorMath&),
          typename out_t>
[[gnu::always_inline]] inline bool vector_tile(const double* __restrict t, int64_t n,
                                               const Params p, out_t* __restrict out,
                                               int64_t groups, uint64_t* __restrict redo) {
  uint64_t any = 0;
  // The rows of `out` never overlap (groups >= n), which GCC cannot prove: without ivdep it
  // would check every pair at run time, and gives up beyond 10 pairs (3 columns, 6 rows).
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    VectorMath math;
    double row[2 * kColumns];
    kEntries(t[i], p, row, math);
    store_entries<kRows, kColumns>(row, out + i, groups);
    redo[i] = math.out_of_range;
    any |= math.out_of_range;
  }
  return any != 0;
}

// vector_tile with its choices made at run time: `out` holds doubles or floats, the matrix or
// the residual row.
template <int kColumns, void (*kEntries)(double, const Params&, double*, VectorMath&)>
[[gnu::always_inline]] inline bool any_tile(const double* t, int64_t n, const Params p, void* out,
                                            bool doubles, bool residual, int64_t groups,
                                            uint64_t* redo) {
  // (No lambda here: GCC may leave one out of line, compiled without the clone's instructions.)
  constexpr Rows kMatrix = Rows::kMatrix, kResidual = Rows::kResidual;
  auto* as_doubles = static_cast<double*>(out);
  auto* as_floats = static_cast<float*>(out);
  if (residual) {
    return doubles ? vector_tile<kResidual, kColumns, kEntries>(t, n, p, as_doubles, groups, redo)
                   : vector_tile<kResidual, kColumns, kEntries>(t, n, p, as_floats, groups, redo);
  }
  return doubles ? vector_tile<kMatrix, kColumns, kEntries>(t, n, p, as_doubles, groups, redo)
                 : vector_tile<kMatrix, kColumns, kEntries>(t, n, p, as_floats, groups, redo);
}

// One plain function per path, since simd_clones.h compiles those again per instruction set, not
// templates. The parameters come by value: stores through `out` cannot change them, so the loop
// reads them once.
#define FASTFLOW_VECTOR_TILE(path, columns)                                                  \
  FASTFLOW_SIMD_CLONES bool path##_tile(const double* t, int64_t n, Params p, void* out,     \
                                        bool doubles, bool residual, int64_t groups,         \
                                        uint64_t* redo) {                                    \
    return any_tile<columns, path<VectorMath>>(t, n, p, out, doubles, residual, groups, redo); \
  }
FASTFLOW_VECTOR_TILE(cond_ot, 2)
FASTFLOW_VECTOR_TILE(polynomial, 2)
FASTFLOW_VECTOR_TILE(whole_polynomial, 2)
FASTFLOW_VECTOR_TILE(cosine, 2)
FASTFLOW_VECTOR_TILE(linear_vp, 2)
FASTFLOW_VECTOR_TILE(vp, 2)
FASTFLOW_VECTOR_TILE(constant_noise, 3)
FASTFLOW_VECTOR_TILE(schrodinger_bridge, 3)
#undef FASTFLOW_VECTOR_TILE

using Tile = bool (*)(const double*, int64_t, Params, void*, bool, bool, int64_t, uint64_t*);

// Samples per task of fill: kGroupGrain for the arithmetic paths (under a nanosecond a sample),
// an eighth of it for those that take exp, pow or sin (3 to 8 ns), so that their smaller batches
// also use every core.
constexpr int64_t kTranscendentalGrain = kGroupGrain / 8;

// The coefficients of the times `t` into `out` (entry-major): [G, 2, columns], or with
// `residual` the loss's [G, 1, 1 + columns] rows (Rows). A tile of samples at a time: vector
// math for all, then the C library for the samples it flags.
template <int kColumns, void (*kEntries)(double, const Params&, double*, LibraryMath&),
          Tile kVectorTile, int64_t kGrain = kGroupGrain>
void fill(const at::Tensor& t, const Params& params, bool residual, at::Tensor& out) {
  const int64_t groups = t.size(0), stride = t.stride(0);
  // t in its own type, widened to double on load (exactly): the caller saves a conversion.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "path_times", [&] {
    using time_t = scalar_t;
    const time_t* times = t.const_data_ptr<time_t>();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "path_coefficients_cpu", [&] {
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      // Threads from kGrain samples on (one time per token: hundreds of thousands); a batch
      // below that runs inline, without the pool's cost.
      at::parallel_for(0, groups, kGrain, [&](int64_t begin, int64_t end) {
        double tile_t[kTile];
        uint64_t redo[kTile];
        for (int64_t g0 = begin; g0 < end; g0 += kTile) {
          const int64_t n = std::min(kTile, end - g0);
          for (int64_t i = 0; i < n; ++i) tile_t[i] = static_cast<double>(times[(g0 + i) * stride]);
          constexpr bool kDoubles = std::is_same_v<scalar_t, double>;
          if (!kVectorTile(tile_t, n, params, dst + g0, kDoubles, residual, groups, redo)) {
            continue;
          }
          for (int64_t i = 0; i < n; ++i) {
            if (!redo[i]) continue;
            double row[2 * kColumns];
            LibraryMath math;
            kEntries(tile_t[i], params, row, math);
            if (residual) {
              store_entries<Rows::kResidual, kColumns>(row, dst + g0 + i, groups);
            } else {
              store_entries<Rows::kMatrix, kColumns>(row, dst + g0 + i, groups);
            }
          }
        }
      });
    });
  });
}

// Polynomial's coefficients: by multiplication alone where n and n - 1 are both whole powers
// (n = 1, 2, 3), else through vector_math's pow (at least one of the two powers needs it).
void fill_polynomial(const at::Tensor& t, const Params& params, bool residual, at::Tensor& out) {
  if (is_whole_power(params[0]) && is_whole_power(params[0] - 1.0)) {
    return fill<2, whole_polynomial, whole_polynomial_tile>(t, params, residual, out);
  }
  fill<2, polynomial, polynomial_tile, kTranscendentalGrain>(t, params, residual, out);
}

struct NativePath {
  const char* name;
  int columns;
  size_t params;
  void (*fill)(const at::Tensor&, const Params&, bool, at::Tensor&);
};

constexpr NativePath kPaths[] = {
    {"cond_ot", 2, 1, fill<2, cond_ot, cond_ot_tile>},
    {"polynomial", 2, 1, fill_polynomial},
    {"cosine", 2, 0, fill<2, cosine, cosine_tile, kTranscendentalGrain>},
    {"linear_vp", 2, 0, fill<2, linear_vp, linear_vp_tile>},
    {"vp", 2, 2, fill<2, vp, vp_tile, kTranscendentalGrain>},
    {"constant_noise", 3, 1, fill<3, constant_noise, constant_noise_tile>},
    {"schrodinger_bridge", 3, 1, fill<3, schrodinger_bridge, schrodinger_bridge_tile>},
};

}  // namespace

at::Tensor entry_major_coefficients(int64_t groups, int64_t rows, int64_t columns,
                                    const at::TensorOptions& options) {
  at::Tensor out = at::empty({rows, columns, groups}, options).permute({2, 0, 1});
  advise_huge_pages(out);
  return out;
}

at::Tensor path_coefficients_cpu(const at::Tensor& t, const std::string& path,
                                 const std::vector<double>& params, at::ScalarType dtype,
                                 bool residual) {
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
  const auto options = t.options().dtype(dtype);
  at::Tensor out = residual ? entry_major_coefficients(t.size(0), 1, 1 + found->columns, options)
                            : entry_major_coefficients(t.size(0), 2, found->columns, options);
  Params p{};
  std::copy(params.begin(), params.end(), p.begin());
  found->fill(t, p, residual, out);
  return out;
}

}  // namespace fastflow
