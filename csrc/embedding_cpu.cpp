// CPU kernels of the sinusoidal embeddings (see embedding.h).
//
// Eager PyTorch evaluates sin and cos with SLEEF's vectorised routines, so a scalar libm call per
// element would lose to it. The fp32 path computes sin and cos together from one shared range
// reduction, in a branch-free loop that the compiler vectorises and clones for AVX2 and AVX-512
// (simd_clones.h), so results do not depend on the CPU. Error: a few 1e-8 against sin
// and cos of the same fp32 argument, for |a| <= kFastLimit; rows whose arguments can exceed that
// (or are not finite) take the exact path: libm in double precision, rounded once.
#include "embedding.h"
#include "affine.h"
#include "float_bits.h"
#include "simd_clones.h"
#include "sincos_poly.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace fastflow {
namespace {

// pi/2 in three parts with 8, 11 and 24 significant bits (Cephes): k * part is exact for
// |k| < 2^13, which |a| <= kFastLimit guarantees, so the reduced argument is accurate to ~1e-7.
constexpr float kPio2A = 1.5703125f;
constexpr float kPio2B = 4.837512969970703125e-4f;
constexpr float kPio2C = 7.54978995489188216e-8f;
constexpr float kFastLimit = 8192.0f;

// s[j], c[j] = sin, cos of a = (t * f[j]) * scale, for |a| <= kFastLimit. Cody-Waite reduction
// a = k pi/2 + r, Cephes' minimax polynomials on |r| <= pi/4, and the quadrant k mod 4 applied
// with bit operations: sin a = (sin r, cos r, -sin r, -cos r)[k & 3], cos a likewise shifted.
FASTFLOW_SIMD_CLONES
void sincos_fast(float t, const float* f, float scale, int64_t n, float* s, float* c) {
  for (int64_t j = 0; j < n; ++j) {
    const float a = (t * f[j]) * scale;
    const float k = (a * 0.636619772367581343f + kRoundMagic) - kRoundMagic;
    const int32_t q = static_cast<int32_t>(k);
    const float r = ((a - k * kPio2A) - k * kPio2B) - k * kPio2C;
    const float z = r * r;
    const float sin_r = sin_poly(r, z), cos_r = cos_poly(z);
    s[j] = sin_of_quadrant(q, sin_r, cos_r);
    c[j] = cos_of_quadrant(q, sin_r, cos_r);
  }
}

// The exact path: the argument rounded as in the fast path, then libm in double.
template <typename math_t>
void sincos_exact(math_t t, const math_t* f, math_t scale, int64_t n, math_t* s, math_t* c) {
  for (int64_t j = 0; j < n; ++j) {
    const double a = (t * f[j]) * scale;
    s[j] = static_cast<math_t>(std::sin(a));
    c[j] = static_cast<math_t>(std::cos(a));
  }
}

// One row's tile. `bound` is max_j |f[j]|: (|t| * bound) * |scale|, rounded in the kernel's
// order, bounds every argument and its product t * f[j] (rounding is monotonic), so that an
// overflow there (inf times a tiny scale) also takes the exact path.
template <typename math_t>
void sincos_tile(math_t t, const math_t* f, math_t scale, math_t bound, int64_t n, math_t* s,
                 math_t* c) {
  if constexpr (std::is_same_v<math_t, float>) {
    if ((std::fabs(t) * bound) * std::fabs(scale) <= kFastLimit) {
      return sincos_fast(t, f, scale, n, s, c);
    }
  }
  sincos_exact(t, f, scale, n, s, c);
}

// max_j |f[j]|; NaN when a frequency is NaN, which sends every row to the exact path: the fast
// path would convert a NaN quadrant to int32, which is undefined behaviour.
template <typename math_t>
math_t argument_bound(const math_t* f, int64_t n) {
  math_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    const math_t a = std::fabs(f[j]);
    if (a > m || std::isnan(a)) m = a;   // once NaN, m stays NaN (a > NaN is false)
  }
  return m;
}

// Rows per task (forward) and per deterministic partial sum (backward): about kGrain elements.
int64_t rows_per_task(int64_t dim) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(dim, 1)); }

template <typename scalar_t, typename math_t>
void sinusoid_kernel(const at::Tensor& t, const at::Tensor& freqs, math_t scale, bool cos_first,
                     const at::Tensor& out) {
  const int64_t half = freqs.numel(), dim = out.size(1);
  const math_t* tp = t.const_data_ptr<math_t>();
  const math_t* f = freqs.const_data_ptr<math_t>();
  const math_t bound = argument_bound(f, half);
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, t.numel(), rows_per_task(dim), [&](int64_t b0, int64_t b1) {
    math_t s[kTile], c[kTile];
    for (int64_t b = b0; b < b1; ++b) {
      scalar_t* row = o + b * dim;
      scalar_t* sin_out = row + (cos_first ? half : 0);
      scalar_t* cos_out = row + (cos_first ? 0 : half);
      for (int64_t j0 = 0; j0 < half; j0 += kTile) {
        const int64_t n = std::min(kTile, half - j0);
        sincos_tile(tp[b], f + j0, scale, bound, n, s, c);
        if constexpr (std::is_same_v<math_t, float> && sizeof(scalar_t) == 2) {
          // The affine kernels' conversions: c10's formulas one value at a time made an fp16
          // embedding 2x slower than an fp32 one.
          narrow_floats(s, n, out.scalar_type(), sin_out + j0);
          narrow_floats(c, n, out.scalar_type(), cos_out + j0);
        } else {
          for (int64_t i = 0; i < n; ++i) sin_out[j0 + i] = store_as<scalar_t>(s[i]);
          for (int64_t i = 0; i < n; ++i) cos_out[j0 + i] = store_as<scalar_t>(c[i]);
        }
      }
      if (dim > 2 * half) row[2 * half] = scalar_t(0);
    }
  });
}

template <typename scalar_t, typename math_t>
void sinusoid_backward_kernel(const at::Tensor& grad, const at::Tensor& t,
                              const at::Tensor& freqs, math_t scale, bool cos_first,
                              math_t* grad_t, math_t* grad_f) {
  const int64_t batch = t.numel(), half = freqs.numel(), dim = grad.size(1);
  const math_t* tp = t.const_data_ptr<math_t>();
  const math_t* f = freqs.const_data_ptr<math_t>();
  const math_t bound = argument_bound(f, half);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  // grad_f is summed over rows in chunks fixed by the shape alone, then folded in order.
  const int64_t rows = rows_per_task(dim);
  const int64_t chunks = (batch + rows - 1) / rows;
  std::vector<math_t> partial(grad_f ? chunks * half : 0, math_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    math_t s[kTile], c[kTile], d[kTile];
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      math_t* part = grad_f ? partial.data() + chunk * half : nullptr;
      for (int64_t b = chunk * rows; b < std::min(batch, (chunk + 1) * rows); ++b) {
        const scalar_t* g_sin = g + b * dim + (cos_first ? half : 0);
        const scalar_t* g_cos = g + b * dim + (cos_first ? 0 : half);
        math_t lanes[kLanes] = {};
        for (int64_t j0 = 0; j0 < half; j0 += kTile) {
          const int64_t n = std::min(kTile, half - j0);
          sincos_tile(tp[b], f + j0, scale, bound, n, s, c);
          for (int64_t i = 0; i < n; ++i)
            d[i] = load_as<math_t>(g_sin[j0 + i]) * c[i] - load_as<math_t>(g_cos[j0 + i]) * s[i];
          if (grad_t)
            for (int64_t i = 0; i < n; ++i) lanes[i % kLanes] += d[i] * f[j0 + i];
          if (part)
            for (int64_t i = 0; i < n; ++i) part[j0 + i] += d[i] * tp[b];
        }
        if (grad_t) {
          math_t sum = 0;
          for (int l = 0; l < kLanes; ++l) sum += lanes[l];
          grad_t[b] = sum * scale;
        }
      }
    }
  });
  if (!grad_f) return;
  std::fill(grad_f, grad_f + half, math_t(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t j = 0; j < half; ++j) grad_f[j] += partial[chunk * half + j];
  for (int64_t j = 0; j < half; ++j) grad_f[j] *= scale;
}

void check_sinusoid_args(const at::Tensor& t, const at::Tensor& freqs, const at::Tensor& out,
                         const char* out_name) {
  TORCH_CHECK(t.dim() == 1, "fastflow sinusoid: t must be 1-D [B], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastflow sinusoid: t must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(freqs.dim() == 1 && freqs.scalar_type() == t.scalar_type(),
              "fastflow sinusoid: freqs must be 1-D ", t.scalar_type(), ", got ",
              freqs.scalar_type(), " of shape ", freqs.sizes());
  const int64_t half = freqs.numel();
  TORCH_CHECK(out.dim() == 2 && out.size(0) == t.numel() &&
                  (out.size(1) == 2 * half || out.size(1) == 2 * half + 1),
              "fastflow sinusoid: ", out_name, " must be [", t.numel(), ", ", 2 * half, "] or [",
              t.numel(), ", ", 2 * half + 1, "], got ", out.sizes());
  TORCH_CHECK(is_stream_type(out.scalar_type()), "fastflow sinusoid: ", out_name,
              " must be float16, bfloat16, float32 or float64, got ", out.scalar_type());
  for (const at::Tensor* x : {&t, &freqs, &out}) {
    TORCH_CHECK(x->device().is_cpu(), "fastflow sinusoid: expected CPU tensors, got one on ",
                x->device());
    TORCH_CHECK(x->is_contiguous(), "fastflow sinusoid: tensors must be contiguous");
  }
}

}  // namespace

void sinusoid_cpu(const at::Tensor& t, const at::Tensor& freqs, double scale, bool cos_first,
                  const at::Tensor& out) {
  check_sinusoid_args(t, freqs, out, "out");
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sinusoid_cpu", [&] {
    if (t.scalar_type() == at::kDouble) {
      sinusoid_kernel<scalar_t, double>(t, freqs, scale, cos_first, out);
    } else {
      sinusoid_kernel<scalar_t, float>(t, freqs, static_cast<float>(scale), cos_first, out);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sinusoid_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& t,
                                                         const at::Tensor& freqs, double scale,
                                                         bool cos_first, bool need_t,
                                                         bool need_freqs) {
  check_sinusoid_args(t, freqs, grad, "grad");
  at::Tensor grad_t = at::zeros({need_t ? t.numel() : 0}, t.options());
  at::Tensor grad_f = at::zeros({need_freqs ? freqs.numel() : 0}, freqs.options());
  if (grad.numel() == 0 || (!need_t && !need_freqs)) return {grad_t, grad_f};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "sinusoid_backward_cpu", [&] {
    auto run = [&](auto math_zero) {
      using math_t = decltype(math_zero);
      sinusoid_backward_kernel<scalar_t, math_t>(
          grad, t, freqs, static_cast<math_t>(scale), cos_first,
          need_t ? grad_t.mutable_data_ptr<math_t>() : nullptr,
          need_freqs ? grad_f.mutable_data_ptr<math_t>() : nullptr);
    };
    if (t.scalar_type() == at::kDouble) run(0.0); else run(0.0f);
  });
  return {grad_t, grad_f};
}

}  // namespace fastflow
