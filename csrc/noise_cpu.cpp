// CPU kernel of the sampler's noise (see noise.h). Integer hashing and Box-Muller with
// branch-free polynomials for ln and cos (Cephes'), in a loop that the compiler vectorises and
// clones for AVX2 and AVX-512 (simd_clones.h): about 3 ns per value on one core with AVX2, 2 ns
// with AVX-512, where the same formulas as ~100 tensor ops took 100 ns. Every operation is an
// integer operation or one correctly rounded fp32 add, multiply or square root, never
// contracted (-ffp-contract=off), in the order of fastflow/reference/_noise.py, so the bits
// equal the reference's on every CPU.
#include "noise.h"
#include "affine.h"
#include "float_bits.h"
#include "simd_clones.h"
#include "sincos_poly.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace fastflow {
namespace {

// Wellons' lowbias32.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// The chains of fastflow._noise.sample_keys: their state after the seed's two words...
struct SeedState {
  uint32_t h[2];
};

SeedState seed_state(int64_t seed) {
  constexpr uint32_t kStarts[2] = {0x6A09E667u, 0xBB67AE85u};  // fastflow._noise.CHAIN_STARTS
  const uint64_t s = static_cast<uint64_t>(seed);
  SeedState state;
  for (int c = 0; c < 2; ++c)
    state.h[c] = mix32(mix32(kStarts[c] ^ static_cast<uint32_t>(s)) ^
                       static_cast<uint32_t>(s >> 32));
  return state;
}

// ...then after the sample id's two words and the step: one chain's key.
uint32_t sample_key(uint32_t state, int64_t id, uint32_t step) {
  const uint64_t bits = static_cast<uint64_t>(id);
  const uint32_t h =
      mix32(mix32(static_cast<uint32_t>(bits) ^ state) ^ static_cast<uint32_t>(bits >> 32));
  return mix32(h ^ step);
}

// The top 24 bits as a float in (0, 1]: (k + 0.5) / 2^24, the sum rounded to float.
inline float uniform(uint32_t bits) {
  return (static_cast<float>(static_cast<int32_t>(bits >> 8)) + 0.5f) * 0x1.0p-24f;
}

// ln u for normal positive u: Cephes' logf without branches.
inline float log_positive(float u) {
  const uint32_t bits = f32_bits(u);
  const float m = f32_from_bits((bits & 0x007FFFFFu) | 0x3F000000u);  // u = m 2^e, m in [1/2, 1)
  const bool small = m < 0.707106781186547524f;
  const float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126 - (small ? 1 : 0));
  const float x = f32_from_bits(select(mask_if(small), f32_bits(m + m), f32_bits(m))) - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f * x + -1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x + -1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x + -1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x + -2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = (y * x) * z;
  y = y + -2.12194440e-4f * e;
  y = y + -0.5f * z;
  return (x + y) + 0.693359375f * e;
}

// cos(2 pi u) for u in [0, 1]: u less its nearest quarter turn k / 4 (exact), the sin and cos
// polynomials on the remainder, then the quadrant.
inline float cos_two_pi(float u) {
  const float k = (4.0f * u + kRoundMagic) - kRoundMagic;
  const int32_t q = static_cast<int32_t>(k);
  const float x = (u - k * 0.25f) * 6.283185307179586f;
  const float z = x * x;
  return cos_of_quadrant(q, sin_poly(x, z), cos_poly(z));
}

// z[j] for the elements first, ..., first + n - 1 of a sample with the keys k0, k1.
FASTFLOW_SIMD_CLONES
void gaussian_tile(uint32_t k0, uint32_t k1, uint32_t first, int64_t n, float* z) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t i = first + static_cast<uint32_t>(j);
    const float u1 = uniform(mix32(k0 ^ mix32((2 * i) ^ k1)));
    const float u2 = uniform(mix32(k0 ^ mix32((2 * i + 1) ^ k1)));
    z[j] = std::sqrt(-2.0f * log_positive(u1)) * cos_two_pi(u2);
  }
}

template <typename scalar_t>
void gaussian_kernel(const int64_t* ids, SeedState seed, uint32_t step, int64_t batch, int64_t n,
                     scalar_t* out) {
  at::parallel_for(0, batch * n, kGrain, [&](int64_t begin, int64_t end) {
    float z[kTile];
    for (int64_t b = begin / n; b * n < end; ++b) {
      const uint32_t k0 = sample_key(seed.h[0], ids[b], step);
      const uint32_t k1 = sample_key(seed.h[1], ids[b], step);
      const int64_t lo = std::max(begin, b * n), hi = std::min(end, (b + 1) * n);
      for (int64_t j0 = lo; j0 < hi; j0 += kTile) {
        const int64_t count = std::min(kTile, hi - j0);
        gaussian_tile(k0, k1, static_cast<uint32_t>(j0 - b * n), count, z);
        if constexpr (std::is_same_v<scalar_t, float>) {
          std::copy(z, z + count, out + j0);
        } else if constexpr (sizeof(scalar_t) == 2) {
          narrow_floats(z, count, c10::CppTypeToScalarType<scalar_t>::value, out + j0);
        } else {
          for (int64_t j = 0; j < count; ++j) out[j0 + j] = static_cast<scalar_t>(z[j]);
        }
      }
    }
  });
}

}  // namespace

void gaussian_cpu(const at::Tensor& ids, int64_t seed, int64_t step, const at::Tensor& out) {
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.scalar_type() == at::kLong,
                    "fastflow gaussian: ids must be a 1-D int64 tensor, got ", ids.scalar_type(),
                    " of shape ", ids.sizes());
  TORCH_CHECK_VALUE(is_stream_type(out.scalar_type()) && out.dim() >= 1 &&
                        out.size(0) == ids.numel(),
                    "fastflow gaussian: out must be a floating [B, ...] tensor with B = ",
                    ids.numel(), " (one row per id), got ", out.scalar_type(), " of shape ",
                    out.sizes());
  for (const at::Tensor* x : {&ids, &out}) {
    TORCH_CHECK_VALUE(x->device().is_cpu(), "fastflow gaussian: expected CPU tensors, got one on ",
                      x->device());
    TORCH_CHECK_VALUE(x->is_contiguous(), "fastflow gaussian: tensors must be contiguous");
  }
  const int64_t batch = ids.numel();
  if (out.numel() == 0) return;
  const int64_t n = out.numel() / batch;
  TORCH_CHECK_VALUE(n < (int64_t(1) << 31), "fastflow gaussian: a sample may have at most "
                    "2^31 - 1 elements, got ", n);
  const uint32_t step_word = static_cast<uint32_t>(static_cast<uint64_t>(step));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gaussian_cpu", [&] {
    gaussian_kernel<scalar_t>(ids.const_data_ptr<int64_t>(), seed_state(seed), step_word, batch, n,
                              out.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace fastflow
