// exp, pow and sin/cos in double as straight-line operations that the auto-vectoriser turns into
// SIMD code, for the coefficient builders (paths_cpu.cpp), which call them once per sample: the
// C library's versions are scalar calls of 10 to 40 ns, more than the affine pass itself costs
// with a time per token.
//
// Each function is within an ulp of the exact result (two for sin and cos) on a domain of
// ordinary arguments (normal results, moderate angles and exponents) and adds
// a mask to `out_of_range` for any other argument (NaN and infinities included), whose value the
// caller must then take from the C library instead. The decision
// depends on the argument alone, so a value never depends on its neighbours in a batch.
// The reductions and polynomials are fdlibm's (e_exp.c, e_log.c, k_sin.c, k_cos.c; Sun
// Microsystems, freely redistributable), without their branches; log is carried as a sum of two
// doubles (to about 2^-57 absolute) so that pow = exp(n log t) keeps its last bits.
// They need -ffp-contract=off: the error-free products and sums rely on separate roundings.
#pragma once

#include "float_bits.h"

#include <cmath>
#include <cstdint>

namespace fastflow::vector_math {

// Every function here is [[gnu::always_inline]]: a call would stop the caller's loop
// vectorising, whatever the function's size.
[[gnu::always_inline]] inline uint64_t mask_unless(bool in_range) {
  return static_cast<uint64_t>(in_range) - 1;
}
// pick ? a : b with bit operations: GCC leaves `?:` on a loop-invariant condition a branch,
// which stops the loop vectorising.
[[gnu::always_inline]] inline double select(bool pick, double a, double b) {
  const uint64_t mask = 0 - static_cast<uint64_t>(pick);
  return f64_from_bits((f64_bits(a) & mask) | (f64_bits(b) & ~mask));
}

// Adding and subtracting 1.5 * 2^52 rounds a double of magnitude below 2^51 to an integer,
// which the sum then also holds, in two's complement, in its low mantissa bits.
constexpr double kRoundMagic = 0x1.8p52;

// ln 2 in two parts, the first with 21 trailing zero bits: k * kLn2Hi is exact for |k| < 2^21.
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;

// hi + lo = a + b exactly (Knuth's two-sum).
[[gnu::always_inline]] inline void two_sum(double a, double b, double& hi, double& lo) {
  hi = a + b;
  const double b_part = hi - a;
  lo = (a - (hi - b_part)) + (b - b_part);
}

// hi + lo = a * b exactly (Dekker's product, for |a|, |b| < 2^995).
[[gnu::always_inline]] inline void two_product(double a, double b, double& hi, double& lo) {
  constexpr double kSplit = 134217729.0;  // 2^27 + 1
  const double ca = kSplit * a, cb = kSplit * b;
  const double a_hi = ca - (ca - a), a_lo = a - a_hi;
  const double b_hi = cb - (cb - b), b_lo = b - b_hi;
  hi = a * b;
  lo = ((a_hi * b_hi - hi) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo;
}

// e^(x + tail), |tail| <= an ulp of x. In range: -708 <= x <= 709 (a normal result).
[[gnu::always_inline]] inline double exp(double x, double tail, uint64_t& out_of_range) {
  out_of_range |= mask_unless((x >= -708.0) & (x <= 709.0));
  const double shifted = x * 1.44269504088896338700 + kRoundMagic;  // x / ln 2
  const double k = shifted - kRoundMagic;
  // x + tail = k ln 2 + hi - lo, with |hi - lo| <= ln 2 / 2.
  const double hi = x - k * kLn2Hi, lo = k * kLn2Lo - tail;
  const double r = hi - lo, z = r * r;
  const double c =
      r - z * (1.66666666666666019037e-01 +
               z * (-2.77777777770155933842e-03 +
                    z * (6.61375632143793436117e-05 +
                         z * (-1.65339022054652515390e-06 + z * 4.13813679705723846039e-08))));
  const double e_r = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi);
  // 2^k from the exponent field; the shift drops the magic number's bits above k.
  return e_r * f64_from_bits((f64_bits(shifted) + 1023) << 52);
}

[[gnu::always_inline]] inline double exp(double x, uint64_t& out_of_range) {
  return exp(x, 0.0, out_of_range);
}

// log x as hi + lo to about 2^-57 absolute. In range: positive normal x.
[[gnu::always_inline]] inline void log(double x, double& hi, double& lo,
                                       uint64_t& out_of_range) {
  out_of_range |= mask_unless((x >= 0x1p-1022) & (x <= 0x1.fffffffffffffp1023));
  // x = 2^k m with m in [sqrt(2) / 2, sqrt(2)): shift the exponent field by sqrt(2) / 2's.
  const uint64_t shifted = f64_bits(x) + (0x3ff0000000000000 - 0x3fe6a09e00000000);
  const double k = f64_from_bits(0x4338000000000000 + (shifted >> 52) - 1023) - kRoundMagic;
  const double f = f64_from_bits((shifted & 0x000fffffffffffff) + 0x3fe6a09e00000000) - 1.0;
  // log(1 + f) = f - f^2 / 2 + s (f^2 / 2 + R(s^2)), s = f / (2 + f).
  double f2, f2_lo;
  two_product(f, f, f2, f2_lo);
  const double half_f2 = 0.5 * f2;
  const double s = f / (2.0 + f), z = s * s, w = z * z;
  const double r = z * (6.666666666666735130e-01 +
                        w * (2.857142874366239149e-01 +
                             w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01))) +
                   w * (3.999999999940941908e-01 +
                        w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
  // The large terms k ln2_hi + f - f^2 / 2 exactly, as two sums; the small ones in lo.
  double a, a_lo, b, b_lo;
  two_sum(k * kLn2Hi, f, a, a_lo);
  two_sum(a, -half_f2, b, b_lo);
  const double small = s * (half_f2 + r) + k * kLn2Lo - 0.5 * f2_lo;
  two_sum(b, (a_lo + b_lo) + small, hi, lo);
}

// t^n = e^(n log t). In range: positive normal t, |n| <= 10 and a normal result. log's error
// (up to about 2^-57 absolute, where s = f / (2 + f) is rounded at |f| near 0.41) grows n-fold
// in n log t: past |n| = 10 it would pass an ulp of the result (4 ulps at n = 40).
[[gnu::always_inline]] inline double pow(double t, double n, uint64_t& out_of_range) {
  double log_hi, log_lo, y, y_lo;
  log(t, log_hi, log_lo, out_of_range);
  two_product(n, log_hi, y, y_lo);
  out_of_range |= mask_unless(std::fabs(n) <= 10.0);
  return exp(y, y_lo + n * log_lo, out_of_range);
}

// sin x and cos x. In range: |x| <= 2^16.
[[gnu::always_inline]] inline void sin_cos(double x, double& sin, double& cos,
                                           uint64_t& out_of_range) {
  out_of_range |= mask_unless(std::fabs(x) <= 65536.0);
  // x = k pi/2 + r, |r| <= pi/4, with pi/2 in parts of 33 bits (k * part exact for |k| < 2^20)
  // and the rest, so that r keeps its relative accuracy next to a multiple of pi/2.
  const double shifted = x * 6.36619772367581382433e-01 + kRoundMagic;  // x * 2 / pi
  const double k = shifted - kRoundMagic;
  const double r = (((x - k * 1.57079632673412561417e+00) - k * 6.07710050630396597660e-11) -
                    k * 2.02226624871116645580e-21) -
                   k * 8.47842766036889956997e-32;
  const double z = r * r, w = z * z;
  const double sin_r =
      r + z * r *
              (-1.66666666666666324348e-01 +
               z * (8.33333333332248946124e-03 +
                    z * (-1.98412698298579493134e-04 +
                         z * (2.75573137070700676789e-06 +
                              z * (-2.50507602534068634195e-08 +
                                   z * 1.58969099521155010221e-10)))));
  const double tail =
      z * (4.16666666666666019037e-02 +
           z * (-1.38888888888741095749e-03 + z * 2.48015872894767294178e-05)) +
      w * w * (-2.75573143513906633035e-07 +
               z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11));
  const double half_z = 0.5 * z, one_minus = 1.0 - half_z;
  const double cos_r = one_minus + (((1.0 - one_minus) - half_z) + z * tail);
  // sin x = (sin r, cos r, -sin r, -cos r)[k mod 4]; cos x likewise, shifted by one.
  const uint64_t q = f64_bits(shifted), swap = 0 - (q & 1);
  const uint64_t s = (f64_bits(cos_r) & swap) | (f64_bits(sin_r) & ~swap);
  const uint64_t c = (f64_bits(sin_r) & swap) | (f64_bits(cos_r) & ~swap);
  sin = f64_from_bits(s ^ ((q & 2) << 62));
  cos = f64_from_bits(c ^ (((q + 1) & 2) << 62));
}

}  // namespace fastflow::vector_math
