// sin and cos on a reduced argument |r| <= pi/4 (Cephes' minimax polynomials), and of
// r + q pi/2 by the quadrant q, as single fp32 operations in a fixed order (never contracted:
// -ffp-contract=off), branch free so that loops using them vectorise. Shared by the embeddings
// (embedding_cpu.cpp) and the sampler's noise (noise_cpu.cpp), whose bits
// fastflow/reference/_noise.py and triton_kernels/noise.py repeat operation for operation.
#pragma once

#include "float_bits.h"

#include <cstdint>

namespace fastflow {

// Adding and subtracting 1.5 * 2^23 rounds a float of magnitude below 2^22 to an integer: the
// quadrant of a reduction.
constexpr float kRoundMagic = 12582912.0f;

// sin r and cos r, with z = r * r.
inline float sin_poly(float r, float z) {
  return ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
}
inline float cos_poly(float z) {
  return ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z *
             z -
         0.5f * z + 1.0f;
}

// sin(r + q pi/2) = (sin r, cos r, -sin r, -cos r)[q mod 4]; cos likewise, shifted by one.
inline float sin_of_quadrant(int32_t q, float sin_r, float cos_r) {
  const uint32_t bits = select(mask_if(q & 1), f32_bits(cos_r), f32_bits(sin_r));
  return f32_from_bits(bits ^ (static_cast<uint32_t>(q & 2) << 30));
}
inline float cos_of_quadrant(int32_t q, float sin_r, float cos_r) {
  const uint32_t bits = select(mask_if(q & 1), f32_bits(sin_r), f32_bits(cos_r));
  return f32_from_bits(bits ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

}  // namespace fastflow
