// Conversions between fp32 and the 16-bit float types, written as straight-line integer and
// float operations that the auto-vectoriser turns into SIMD code. They are the formulas c10
// uses (round to nearest even; for fp16 the FP16 library's scaling trick), so results equal
// eager PyTorch's bit for bit, but with every select written as a bit mask: c10's versions
// branch per element (or call out to a helper) and stay scalar, 5 to 10 times slower here.
// They need -ffp-contract=off: the fp16 rounding relies on separately rounded multiplies.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <cstdint>

namespace fastflow {

inline float f32_from_bits(uint32_t u) { return c10::bit_cast<float>(u); }
inline uint32_t f32_bits(float f) { return c10::bit_cast<uint32_t>(f); }
inline double f64_from_bits(uint64_t u) { return c10::bit_cast<double>(u); }
inline uint64_t f64_bits(double f) { return c10::bit_cast<uint64_t>(f); }
// -v by its sign bit, NaNs included: PyTorch's neg flips a NaN's sign, where the compiler may
// fold a negation into the operation that made v (-(a / b) into (-a) / b: exact, but a NaN
// keeps its sign).
inline float negated(float v) { return f32_from_bits(f32_bits(v) ^ 0x80000000u); }
inline double negated(double v) { return f64_from_bits(f64_bits(v) ^ (uint64_t{1} << 63)); }
// All ones where cond holds, else zero.
inline uint32_t mask_if(bool cond) { return 0u - static_cast<uint32_t>(cond); }
inline uint32_t select(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

inline float to_float(c10::BFloat16 v) { return f32_from_bits(static_cast<uint32_t>(v.x) << 16); }

inline c10::BFloat16 to_bfloat16(float v) {
  const uint32_t u = f32_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = mask_if(static_cast<int32_t>(u & 0x7FFFFFFFu) > 0x7F800000);
  return c10::BFloat16(static_cast<uint16_t>(select(nan, 0x7FC0u, rounded)),
                       c10::BFloat16::from_bits());
}

inline float to_float(c10::Half v) {
  const uint32_t w = static_cast<uint32_t>(v.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  // Signed compares on values shifted below 2^31: SSE2 has no unsigned 32-bit compare.
  const uint32_t subnormal = mask_if(static_cast<int32_t>(two_w >> 1) < (1 << 26));
  return f32_from_bits(sign | select(subnormal, f32_bits(denormalized), f32_bits(normalized)));
}

inline c10::Half to_half(float f) {
  const float magnitude = f < 0 ? -f : f;
  float base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = select(mask_if(static_cast<int32_t>(bias >> 1) < 0x38800000), 0x71000000u, bias);
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t nan = mask_if(static_cast<int32_t>(shl1_w >> 1) > 0x7F800000);
  return c10::Half(static_cast<uint16_t>((sign >> 16) | select(nan, 0x7E00u, nonsign)),
                   c10::Half::from_bits());
}

// Storage -> math and math -> storage for every type the kernels take.
template <typename math_t, typename scalar_t>
inline math_t load_as(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    return to_float(v);
  } else {
    return static_cast<math_t>(v);
  }
}

template <typename scalar_t, typename math_t>
inline scalar_t store_as(math_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return to_bfloat16(v);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return to_half(v);
  } else {
    return static_cast<scalar_t>(v);
  }
}

}  // namespace fastflow
