// The CPU kernels of the affine family, compiled once per instruction set: affine_cpu.cpp
// includes this for the baseline (no -march flags: any x86-64 or aarch64 CPU),
// affine_cpu_avx2.cpp for AVX2 and F16C (FASTFLOW_CPU_AVX2), affine_cpu_avx512.cpp for
// AVX-512 as well (FASTFLOW_CPU_AVX512, which implies FASTFLOW_CPU_AVX2) and
// affine_cpu_avx512_bf16.cpp for AVX512_BF16 on top (FASTFLOW_CPU_AVX512_BF16), each in its own
// namespace (FASTFLOW_CPU_ISA), and affine_cpu.cpp picks one at run time. The includer provides
// the includes (affine_cpu_deps.h), so that headers are compiled outside the target region.
//
// Streams all of one float type go group by group (affine_groups), a vector at a time, written
// with GCC vector types, or, in the math type in groups of 1, 2 or 4 elements, several groups a
// vector (affine_lanes); mixed types (converted to and from the math type a tile at a time, so
// each may have its own float type at the cost of one switch per tile), outputs written with
// streaming stores and the smallest groups go through the tiles of affine_span, whose loops are
// written so that the compiler's auto-vectoriser handles them (local tiles cannot alias the
// streamed tensors). -ffp-contract=off keeps results bit-identical to eager PyTorch. Reductions
// keep a fixed number of independent accumulators, so the vector width changes no result
// either: every instruction set gives the same bits. (Except a NaN's payload where two NaNs meet
// in one operation: which operand's the hardware keeps depends on the instruction, as it does in
// eager PyTorch between its vector and scalar loops.)

namespace fastflow {
namespace FASTFLOW_CPU_ISA {
namespace {


// Elements per deterministic partial sum of affine_dot (fixed, independent of thread count).
constexpr int64_t kDotChunk = 1 << 14;

// The [G, M, K] coefficients, read through their strides.
template <typename math_t>
struct Coeffs {
  const math_t* data;
  int64_t groups, group_stride, m_stride, k_stride;

  explicit Coeffs(const at::Tensor& c)
      : data(c.const_data_ptr<math_t>()), groups(c.size(0)), group_stride(c.stride(0)),
        m_stride(c.stride(1)), k_stride(c.stride(2)) {}
  const math_t* group(int64_t g) const { return data + g * group_stride; }
  math_t at(const math_t* group, int m, int k) const {
    return group[m * m_stride + k * k_stride];
  }
};

// A stream of any float type, moved a tile at a time between memory and math_t: rows of the
// call's row length (row_length), row_stride elements apart.
struct Stream {
  void* data;
  at::ScalarType type;
  int64_t row_stride;
  int64_t element_size;

  Stream() = default;
  Stream(const void* data, at::ScalarType type, int64_t row_stride)
      : data(const_cast<void*>(data)), type(type), row_stride(row_stride),
        element_size(static_cast<int64_t>(c10::elementSize(type))) {}
};

// The row of element j, without a division for the first row: that of every element of a call
// on contiguous streams, which would pay one per span otherwise.
inline int64_t row_of(int64_t j, int64_t row) { return j < row ? 0 : j / row; }

// The streams from element j on, to the end of j's row: what a span within one row indexes
// from 0.
template <size_t N>
std::array<Stream, N> from_element(std::array<Stream, N> streams, int64_t j, int64_t row) {
  const int64_t r = row_of(j, row), column = j - r * row;
  for (auto& s : streams)
    s.data = static_cast<char*>(s.data) + (r * s.row_stride + column) * s.element_size;
  return streams;
}

// The streams from element j of the row they point into on.
template <size_t N>
std::array<Stream, N> advanced(std::array<Stream, N> streams, int64_t j) {
  for (auto& s : streams) s.data = static_cast<char*>(s.data) + j * s.element_size;
  return streams;
}

// The ScalarType of a math type (float or double).
template <typename math_t>
constexpr at::ScalarType kMathType = std::is_same_v<math_t, double> ? at::kDouble : at::kFloat;

template <typename Visit>
void visit_float_type(at::ScalarType type, const Visit& visit) {
  switch (type) {
    case at::kFloat: return visit(float{});
    case at::kDouble: return visit(double{});
    case at::kHalf: return visit(c10::Half{});
    case at::kBFloat16: return visit(c10::BFloat16{});
    default: TORCH_CHECK(false, "fastflow affine: unsupported stream type ", type);
  }
}

// The 16-bit conversions. Without AVX2 they are float_bits.h's formulas, which the compiler
// vectorises where it can. With AVX2 (FASTFLOW_CPU_AVX2) they go eight values at a time: bf16
// through float_bits.h's integer arithmetic on vectors (one value at a time, bf16 ran 1.6x
// slower than fp16 at 1M elements), fp16 through F16C's instructions. F16C rounds as c10 does
// (to nearest even, overflow to inf, subnormals kept) and widens to the same bits for every
// input, NaNs included. Its narrowing differs on NaNs only: c10 gives every NaN the payload
// 0x7E00, the hardware keeps the top of the input's payload; a blend restores c10's, behind a
// branch that vectors without NaNs skip (fp16 at 1M elements, one thread: 1.35x faster with
// AVX2, 1.02x to 1.15x with AVX-512, than blending every vector). With
// AVX-512 (FASTFLOW_CPU_AVX512) the same sixteen at a time: at 1M elements of a 2 -> 2 map, one
// thread, bf16 1.2x and fp16 1.4x faster than eight at a time (the conversions, not memory,
// bound these streams). With AVX512_BF16 (FASTFLOW_CPU_AVX512_BF16) vcvtneps2bf16 narrows to
// bf16, rounding as c10 does, but it flushes subnormal inputs to zero and keeps the top of a
// NaN's payload: vectors holding either (one vfpclassps) take the integer arithmetic. At 1M
// elements of a bf16 2 -> 2 map, one thread, 1.48x faster than AVX-512's integer arithmetic.
#ifdef FASTFLOW_CPU_AVX2
constexpr bool kVector16 = true;
// Eight values as bits in a 128-bit register, so that the callers can load and store them whole
// or (with AVX-512) masked; the type tag picks the format.
__m256 widen8(__m128i h, c10::Half) { return _mm256_cvtph_ps(h); }
__m256 widen8(__m128i h, c10::BFloat16) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#ifdef FASTFLOW_CPU_AVX512_BF16
// vfpclassps's categories: quiet and signalling NaNs, subnormals.
constexpr int kNanOrSubnormal = 0x01 | 0x80 | 0x20;
#endif
__m128i narrow8(__m256 x, c10::Half) {
  const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
  const __m256 unordered = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  if (__builtin_expect(_mm256_testz_ps(unordered, unordered), 1)) return h;
  const __m256i nan = _mm256_castps_si256(unordered);
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan),
                                        _mm256_extracti128_si256(nan, 1));
  const __m128i c10_nan = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(int16_t(0x8000))),
                                       _mm_set1_epi16(0x7E00));
  return _mm_blendv_epi8(h, c10_nan, nan16);
}
__m128i narrow8(__m256 x, c10::BFloat16) {  // float_bits.h's to_bfloat16, eight at a time
#ifdef FASTFLOW_CPU_AVX512_BF16
  if (__builtin_expect(_mm256_fpclass_ps_mask(x, kNanOrSubnormal) == 0, 1))
    return reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(x));
#endif
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  const __m256i bits = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // Every lane holds at most 0xFFFF, so the saturating pack keeps it as it is.
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}
template <typename half_t>
__m256 widen8(const half_t* src) {
  return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)), half_t{});
}
template <typename half_t>
void narrow8(__m256 x, half_t* dst) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), narrow8(x, half_t{}));
}
#ifdef FASTFLOW_CPU_AVX512
constexpr bool kMaskedTails = true;  // load_first and store_first
// The same, sixteen values at a time.
__m512 widen16(__m256i h, c10::Half) { return _mm512_cvtph_ps(h); }
__m512 widen16(__m256i h, c10::BFloat16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
__m256i narrow16(__m512 x, c10::Half) {
  const __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  if (__builtin_expect(nan == 0, 1)) return h;
  const __m256i c10_nan = _mm256_or_si256(
      _mm256_and_si256(h, _mm256_set1_epi16(int16_t(0x8000))), _mm256_set1_epi16(0x7E00));
  return _mm256_mask_blend_epi16(nan, h, c10_nan);
}
__m256i narrow16(__m512 x, c10::BFloat16) {  // narrow8's, sixteen at a time
#ifdef FASTFLOW_CPU_AVX512_BF16
  if (__builtin_expect(_mm512_fpclass_ps_mask(x, kNanOrSubnormal) == 0, 1))
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
#endif
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(
      _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  // Every lane holds at most 0xFFFF, so the truncating narrowing keeps it as it is.
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0)));
}
template <typename half_t>
__m512 widen16(const half_t* src) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), half_t{});
}
template <typename half_t>
void narrow16(__m512 x, half_t* dst) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), narrow16(x, half_t{}));
}
#else
constexpr bool kMaskedTails = false;
#endif
#else
constexpr bool kVector16 = false;
constexpr bool kMaskedTails = false;
#endif

template <typename half_t>  // c10::Half or c10::BFloat16
void widen(const half_t* src, int64_t n, float* dst) {
  int64_t i = 0;
#ifdef FASTFLOW_CPU_AVX512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, widen16(src + i));
#endif
#ifdef FASTFLOW_CPU_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, widen8(src + i));
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}
template <typename half_t>
void narrow(const float* src, int64_t n, half_t* dst) {
  int64_t i = 0;
#ifdef FASTFLOW_CPU_AVX512
  for (; i + 16 <= n; i += 16) narrow16(_mm512_loadu_ps(src + i), dst + i);
#endif
#ifdef FASTFLOW_CPU_AVX2
  for (; i + 8 <= n; i += 8) narrow8(_mm256_loadu_ps(src + i), dst + i);
#endif
  for (; i < n; ++i) dst[i] = store_as<half_t>(src[i]);
}

// Streaming (non-temporal) stores, with AVX2 (FASTFLOW_CPU_AVX2), for calls that write at least
// kStreamingMinBytes into existing tensors: outputs far larger than the last-level cache leave
// it before anyone reads them. A plain store first reads the destination line (read for
// ownership); a streaming store writes it without reading, a third of a 2 -> 2 map's traffic.
// Not into fresh tensors: the kernel has just zeroed each page on its first touch, through the
// cache, and a streaming store then makes that dirty line travel to memory as well (the loss
// backward at 64M elements was 7% slower).
// Measured on 16M fp32 elements with out=: 13 to 17% faster (15.1 -> 12.8 ms; 12.9 -> 10.7 ms
// with THP_MEM_ALLOC_ENABLE=1), 64M elements 4 to 8%.
#ifdef FASTFLOW_CPU_AVX2
constexpr bool kCanStream = true;
void stream_tile(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 32; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}
void stream_tile(double* dst, const double* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 32; ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}
// Streaming stores are weakly ordered: fence them before the task reports its work done.
void fence_streams() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
template <typename math_t>
void stream_tile(math_t*, const math_t*, int64_t) {}
void fence_streams() {}
#endif

template <typename math_t>
void load_tile(const Stream& s, int64_t j0, int64_t n, math_t* dst) {
  visit_float_type(s.type, [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* src = static_cast<const scalar_t*>(s.data) + j0;
    if constexpr (std::is_same_v<math_t, float> && sizeof(scalar_t) == 2) {
      widen(src, n, dst);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = load_as<math_t>(src[i]);
    }
  });
}

template <typename math_t>
void store_tile(const Stream& s, int64_t j0, int64_t n, const math_t* src) {
  visit_float_type(s.type, [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* dst = static_cast<scalar_t*>(s.data) + j0;
    if constexpr (std::is_same_v<math_t, float> && sizeof(scalar_t) == 2) {
      narrow(src, n, dst);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = store_as<scalar_t>(src[i]);
    }
  });
}

// Groups smaller than this get their coefficients per element (see affine_span): below it,
// setting up a span per group (about 300 instructions) costs more than the table, 256 bytes of
// coefficients a group. Measured on 256K elements, one thread, 2 -> 2 maps: fp32 1.9x to 3.8x
// faster at n = 8 to 32, 1.2x at 48, level at 64; fp64 1.1x at 32, slower at 48.
template <typename math_t>
constexpr int kSmallGroup = 256 / sizeof(math_t);
// Groups of at least this many elements, on streams all in the math type, go group by group
// (affine_groups) rather than through the table or a span per group, unless the outputs take
// streaming stores. Measured on 256K to 768K elements, one thread, 2 -> 2 maps, against the
// path each took before: fp32 groups of 3 1.2x faster, 4 1.6x, 8 to 64 2.0x to 2.5x, 128 1.4x,
// 512 1.15x, level from 2048 on; fp64 groups of 2 1.5x, 4 2.1x, 64 1.2x, 128 to 8192 1.5x to
// 1.8x (a span computes one output after another, reading the inputs again for each). Groups of
// one element, and fp32 pairs, were faster with the table. Streams all in bf16 (or fp16 with
// AVX2) from groups of 8 on: bf16 1.8x to 2.1x faster at 8, 1.2x to 1.7x at 12 to 32, 1.1x at
// 128, level from 1024 on, fp16 2.2x to 2.5x at 8; under 8 elements the table was faster
// (1.2x to 1.4x at 3 to 5).
// With AVX-512, whose masked loads and stores end each group in one vector (load_first), the
// group-by-group path wins from smaller groups on: against the table, fp32 and fp64 pairs 1.1x
// faster, 16-bit groups of 3 1.1x to 1.3x, of 7 1.8x to 2.1x; single elements and 16-bit
// pairs stay 1.2x to 2.7x faster with the table.
template <typename math_t>
constexpr int kGroupLoopMin = kMaskedTails ? 2 : sizeof(math_t) == sizeof(float) ? 3 : 2;
constexpr int kConvertedGroupLoopMin = kMaskedTails ? 3 : 8;

// The coefficients of the elements [first, first + tile) of groups of n < kPad elements, element
// by element: those of element first + i at rows[(m * K + k) * row_length + kPad + i]. Each
// group's are written over kWidth >= n elements from its first one (before kPad for a group that
// starts before the tile), in a loop of fixed count: vector stores, and the next group's writes
// replace the excess. One division per tile and no branch per element: 2.6x fewer instructions at
// n = 4 than a walk element by element. kWidth is the smallest power of two >= n.
template <int kPad, int kWidth, int K, int MK, typename math_t>
void spread_groups(const Coeffs<math_t>& c, int64_t n, int64_t first, int64_t tile,
                   math_t* rows, int64_t row_length) {
  if constexpr (kWidth < kPad) {
    if (n > kWidth)
      return spread_groups<kPad, 2 * kWidth, K, MK>(c, n, first, tile, rows, row_length);
  }
  const int64_t g0 = first / n;
  for (int64_t a = kPad - (first - g0 * n), g = g0 % c.groups; a < kPad + tile; a += n) {
    const math_t* cg = c.group(g);
    for (int m = 0; m < MK / K; ++m)
      for (int k = 0; k < K; ++k)
        std::fill_n(rows + (m * K + k) * row_length + a, kWidth, c.at(cg, m, k));
    if (++g == c.groups) g = 0;  // the next period's first group
  }
}

// Streams stored in the math type are read and written in place; the others go through an L1
// tile, converted. Outputs are computed in order and each reads the inputs at an index before
// writing there, so the last output may lie exactly on top of an input (a sampler updates its
// state in place); earlier ones must not alias an input.
//
// The span is the elements [first, first + len), within one row of every stream, whose data
// point at element `first`. n is the group size. With kSpansGroups false, the span lies in one
// group and each tile uses that group's coefficients; with it true (small groups), a tile spans
// many groups and gets its coefficients per element, gathered into an L1 table first. Both
// compute each output with the same operations in the same order.
//
// With `streaming`, outputs in the math type are computed into the tile and written to memory
// with streaming stores.
template <typename math_t, int K, int M, bool kSpansGroups>
void affine_span(const std::array<Stream, K>& in, const std::array<Stream, M>& out,
                 const Coeffs<math_t>& c, int64_t n, int64_t first, int64_t len,
                 bool streaming) {
  constexpr int kPad = kSpansGroups ? kSmallGroup<math_t> : 0;
  // One group's coefficients, copied out of their strides once per span.
  math_t fixed[M * K];
  if constexpr (!kSpansGroups) {
    const math_t* cg = c.group(first / n % c.groups);
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) fixed[m * K + k] = c.at(cg, m, k);
  }
  // Small groups: each element's coefficients, element i of the tile at kPad + i. Groups that
  // start over every period (the batch innermost: affine_kernel), in a span longer than one: a
  // period of at most a tile goes in tiles of whole periods, which all start at the same point
  // of a period, so one table serves them all; a longer one gets the table of a whole period
  // once, which each tile (within one period) copies its part of.
  constexpr int64_t kRow = kTile + 2 * kPad;
  math_t c_tile[kSpansGroups ? M * K : 1][kSpansGroups ? kRow : 1];
  const int64_t period = n * c.groups;
  const bool one_table = kSpansGroups && period <= kTile;
  const bool period_table = kSpansGroups && !one_table && len > period;
  std::vector<math_t> table;
  if (period_table) {
    table.resize(M * K * (period + 2 * kPad));
    spread_groups<kPad, 1, K, M * K>(c, n, 0, period, table.data(), period + 2 * kPad);
  }
  const int64_t step = one_table ? kTile - kTile % period : kTile;
  for (int64_t j0 = 0, tile; j0 < len; j0 += tile) {
    tile = std::min(step, len - j0);
    math_t x_tile[K][kTile];
    math_t y_tile[kTile];
    if constexpr (kSpansGroups) {
      if (period_table) {
        const int64_t phase = (first + j0) % period;
        tile = std::min(tile, period - phase);
        for (int mk = 0; mk < M * K; ++mk)
          std::copy_n(&table[mk * (period + 2 * kPad) + kPad + phase], tile, &c_tile[mk][kPad]);
      } else if (j0 == 0 || !one_table) {
        spread_groups<kPad, 1, K, M * K>(c, n, first + j0, tile, &c_tile[0][0], kRow);
      }
    }
    const math_t* x[K];
    for (int k = 0; k < K; ++k) {
      if (in[k].type == kMathType<math_t>) {
        x[k] = static_cast<const math_t*>(in[k].data) + j0;
      } else {
        load_tile(in[k], j0, tile, x_tile[k]);
        x[k] = x_tile[k];
      }
    }
    for (int m = 0; m < M; ++m) {
      const bool direct = out[m].type == kMathType<math_t>;
      math_t* const dst = static_cast<math_t*>(out[m].data) + j0;
      math_t* y = direct && !streaming ? dst : y_tile;
      const auto coeff = [&](int k, int64_t i) {
        if constexpr (kSpansGroups) return c_tile[m * K + k][kPad + i];
        else return fixed[m * K + k];
      };
      for (int64_t i = 0; i < tile; ++i) {
        math_t acc = coeff(0, i) * x[0][i];
        for (int k = 1; k < K; ++k) acc = acc + coeff(k, i) * x[k][i];
        y[i] = acc;
      }
      if (!direct) {
        store_tile(out[m], j0, tile, y_tile);
      } else if (streaming) {
        stream_tile(dst, y_tile, tile);
      }
    }
  }
}

// The width of the group-by-group path's vectors: an AVX2 register, or an SSE2 (NEON) one on the
// baseline build, where 32-byte vectors were lowered to pairs slower than the tiles. 16-bit
// streams go sixteen floats (an AVX-512 register) at a time where AVX-512 converts them; the
// math type stays at AVX2's width there (64-byte vectors of fp32 ran 5 to 10% slower at 1M
// elements: those streams are bound by memory).
#ifdef FASTFLOW_CPU_AVX2
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif
#ifdef FASTFLOW_CPU_AVX512
constexpr int kConvertedBytes = 64;
#else
constexpr int kConvertedBytes = 32;
#endif

// kBytes of math_t as a GCC/Clang vector type, whose arithmetic is element by element with the
// scalar roundings. (Specialised per type: the attribute does not apply to a dependent type.)
template <typename math_t, int kBytes>
struct SimdOf;
template <int kBytes>
struct SimdOf<float, kBytes> { typedef float type __attribute__((vector_size(kBytes))); };
template <int kBytes>
struct SimdOf<double, kBytes> { typedef double type __attribute__((vector_size(kBytes))); };

// A Vector (a SimdOf, or math_t itself) of the values at p, stored as Storage, and back: moved
// as they are when Storage is math_t, else converted as c10 converts (eight or sixteen at a time
// with AVX2 or AVX-512).
template <typename Vector, typename math_t, typename Storage>
[[gnu::always_inline]] inline void load_vector(const Storage* p, Vector& v) {  // no vector ABI
  if constexpr (std::is_same_v<Storage, math_t>) {
    std::memcpy(&v, p, sizeof(Vector));
  } else if constexpr (std::is_same_v<Vector, math_t>) {
    v = load_as<math_t>(*p);
#ifdef FASTFLOW_CPU_AVX512
  } else if constexpr (sizeof(Vector) == sizeof(__m512)) {
    v = reinterpret_cast<Vector>(widen16(p));
#endif
#ifdef FASTFLOW_CPU_AVX2
  } else if constexpr (sizeof(Vector) == sizeof(__m256)) {
    v = reinterpret_cast<Vector>(widen8(p));
#endif
  } else {
    math_t lanes[sizeof(Vector) / sizeof(math_t)];
    for (size_t j = 0; j < std::size(lanes); ++j) lanes[j] = load_as<math_t>(p[j]);
    std::memcpy(&v, lanes, sizeof(Vector));
  }
}
template <typename Vector, typename math_t, typename Storage>
[[gnu::always_inline]] inline void store_vector(const Vector& v, Storage* p) {
  if constexpr (std::is_same_v<Storage, math_t>) {
    std::memcpy(p, &v, sizeof(Vector));
  } else if constexpr (std::is_same_v<Vector, math_t>) {
    *p = store_as<Storage>(v);
#ifdef FASTFLOW_CPU_AVX512
  } else if constexpr (sizeof(Vector) == sizeof(__m512)) {
    narrow16(reinterpret_cast<__m512>(v), p);
#endif
#ifdef FASTFLOW_CPU_AVX2
  } else if constexpr (sizeof(Vector) == sizeof(__m256)) {
    narrow8(reinterpret_cast<__m256>(v), p);
#endif
  } else {
    for (size_t j = 0; j < sizeof(Vector) / sizeof(math_t); ++j) p[j] = store_as<Storage>(v[j]);
  }
}

#ifdef FASTFLOW_CPU_AVX512
// The first `lanes` values of a vector (fewer than its width) at p, the other lanes zero, and
// back: masked loads and stores, which touch no memory past those values. For the ends of
// groups, in vectors of AVX2's width: eight floats (from fp32 or 16-bit streams) or four
// doubles.
template <typename Vector, typename math_t, typename Storage>
[[gnu::always_inline]] inline void load_first(const Storage* p, int lanes, Vector& v) {
  const __mmask8 mask = static_cast<__mmask8>((1u << lanes) - 1);
  if constexpr (std::is_same_v<Storage, float>) {
    v = reinterpret_cast<Vector>(_mm256_maskz_loadu_ps(mask, p));
  } else if constexpr (std::is_same_v<Storage, double>) {
    v = reinterpret_cast<Vector>(_mm256_maskz_loadu_pd(mask, p));
  } else {
    static_assert(sizeof(Vector) == sizeof(__m256));
    v = reinterpret_cast<Vector>(widen8(_mm_maskz_loadu_epi16(mask, p), Storage{}));
  }
}
template <typename Vector, typename math_t, typename Storage>
[[gnu::always_inline]] inline void store_first(const Vector& v, int lanes, Storage* p) {
  const __mmask8 mask = static_cast<__mmask8>((1u << lanes) - 1);
  if constexpr (std::is_same_v<Storage, float>) {
    _mm256_mask_storeu_ps(p, mask, reinterpret_cast<__m256>(v));
  } else if constexpr (std::is_same_v<Storage, double>) {
    _mm256_mask_storeu_pd(p, mask, reinterpret_cast<__m256d>(v));
  } else {
    _mm_mask_storeu_epi16(p, mask, narrow8(reinterpret_cast<__m256>(v), Storage{}));
  }
}
#endif

// The M outputs at y[m] + i, over the width of Vector, with the coefficients `fixed`; every
// input is read before any output is written. With kFirstLanes, over its first `lanes` lanes
// only (load_first, store_first).
template <typename Vector, bool kFirstLanes = false, int K, int M, typename math_t,
          typename Storage>
[[gnu::always_inline]] inline void affine_at(const Storage* const (&x)[K], Storage* const (&y)[M],
                                             const math_t* fixed, int64_t i, int lanes = 0) {
  static_assert(!kFirstLanes || kMaskedTails, "masked ends need AVX-512 (load_first)");
  // Unrolled, so that v stays in registers: GCC kept it on the stack from K = 3 on, loaded
  // through two 16-byte stores each (5x to 7x slower).
  Vector v[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
#ifdef FASTFLOW_CPU_AVX512
    if constexpr (kFirstLanes) {
      load_first<Vector, math_t>(x[k] + i, lanes, v[k]);
      continue;
    }
#endif
    load_vector<Vector, math_t>(x[k] + i, v[k]);
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    // A scalar times a vector multiplies every lane by it (0 + c would turn -0 into +0).
    Vector acc = fixed[m * K] * v[0];
#pragma GCC unroll 8
    for (int k = 1; k < K; ++k) acc = acc + fixed[m * K + k] * v[k];
#ifdef FASTFLOW_CPU_AVX512
    if constexpr (kFirstLanes) {
      store_first<Vector, math_t>(acc, lanes, y[m] + i);
      continue;
    }
#endif
    store_vector<Vector, math_t>(acc, y[m] + i);
  }
}

// Streams all stored as Storage (the math type, or one 16-bit type with fp32 math), group by
// group: each group's M K coefficients are read once and its elements computed with them,
// straight from and to the streams, all outputs per vector of inputs. Each group goes a vector
// at a time (kVectorBytes in the math type, kConvertedBytes for 16-bit streams), then ends:
//  - with AVX-512, in eight more elements (16-bit streams), then one masked vector;
//  - with AVX2, in half a vector then one element at a time (the math type), or in one vector
//    of eight through local copies (16-bit streams);
//  - on the baseline, in half a vector then one element at a time (the math type); 16-bit
//    streams go one element at a time throughout.
// The span lies in one row; its data point at element `first`. Written with vector types:
// given the same loop as scalars, the auto-vectoriser vectorised across vectors instead, with
// alias checks and spills, and run times moved by 1.7x between group sizes.
template <typename math_t, int K, int M, typename Storage>
void affine_groups(const std::array<Stream, K>& in, const std::array<Stream, M>& out,
                   const Coeffs<math_t>& c, int64_t n, int64_t first, int64_t len) {
  using Wide = typename SimdOf<math_t, kVectorBytes>::type;
  constexpr int kWide = sizeof(Wide) / sizeof(math_t);
  const Storage* x[K];
  Storage* y[M];
  for (int k = 0; k < K; ++k) x[k] = static_cast<const Storage*>(in[k].data);
  for (int m = 0; m < M; ++m) y[m] = static_cast<Storage*>(out[m].data);
  int64_t g = first / n, wrapped = g % c.groups;
  for (int64_t lo = 0; lo < len; ++g, wrapped = wrapped + 1 == c.groups ? 0 : wrapped + 1) {
    const int64_t hi = std::min(len, (g + 1) * n - first);
    const math_t* cg = c.group(wrapped);
    math_t fixed[M * K];
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) fixed[m * K + k] = c.at(cg, m, k);
    int64_t i = lo;
    if constexpr (std::is_same_v<Storage, math_t>) {
      for (; i + kWide <= hi; i += kWide) affine_at<Wide>(x, y, fixed, i);
#ifdef FASTFLOW_CPU_AVX512
      if (i < hi) affine_at<Wide, true>(x, y, fixed, i, static_cast<int>(hi - i));
#else
      using Narrow = typename SimdOf<math_t, kVectorBytes / 2>::type;
      constexpr int kNarrow = sizeof(Narrow) / sizeof(math_t);
      if (i + kNarrow <= hi) {
        affine_at<Narrow>(x, y, fixed, i);
        i += kNarrow;
      }
      for (; i < hi; ++i) affine_at<math_t>(x, y, fixed, i);
#endif
    } else if constexpr (kVector16) {
      using Converted = typename SimdOf<math_t, kConvertedBytes>::type;
      constexpr int kConverted = sizeof(Converted) / sizeof(math_t);
      for (; i + kConverted <= hi; i += kConverted) affine_at<Converted>(x, y, fixed, i);
#ifdef FASTFLOW_CPU_AVX512
      using Eight = typename SimdOf<math_t, 8 * sizeof(math_t)>::type;
      if (i + 8 <= hi) {
        affine_at<Eight>(x, y, fixed, i);
        i += 8;
      }
      if (i < hi) affine_at<Eight, true>(x, y, fixed, i, static_cast<int>(hi - i));
#else
      if (i < hi) {
        // The rest of the group as one vector, converted at once (c10's conversions cost
        // several ns each), into local copies written back element by element. Its inputs are
        // read in place while a whole vector lies in the span (the elements past the group are
        // converted and dropped); local copies of them are the last resort, since a vector load
        // from small stores waits for them to retire.
        const int64_t rest = hi - i;
        Storage xs[K][kConverted] = {}, ys[M][kConverted];
        const Storage* px[K];
        Storage* py[M];
        for (int k = 0; k < K; ++k) {
          px[k] = x[k] + i;
          if (i + kConverted > len) {
            for (int64_t j = 0; j < rest; ++j) xs[k][j] = x[k][i + j];
            px[k] = xs[k];
          }
        }
        for (int m = 0; m < M; ++m) py[m] = ys[m];
        affine_at<Converted>(px, py, fixed, 0);
        for (int m = 0; m < M; ++m)
          for (int64_t j = 0; j < rest; ++j) y[m][i + j] = ys[m][j];
      }
#endif
    } else {
      // Without AVX2, c10's conversions go one value at a time (vectors of them were slower).
      for (; i < hi; ++i) affine_at<math_t>(x, y, fixed, i);
    }
    lo = hi;
  }
}

// The kWide / kN values at p, one per group, each repeated over its group's kN lanes of a Wide
// vector: lane j gets p[j / kN]. Loaded into a 16-byte vector first (an 8-byte load through an
// integer, which GCC otherwise assembles on the stack and reads back whole, a stalled
// store-to-load forwarding), then shuffled.
template <int kN, typename Wide, typename math_t, size_t... J>
[[gnu::always_inline]] inline Wide repeated(const math_t* p, std::index_sequence<J...>) {
  constexpr int kGroups = sizeof(Wide) / sizeof(math_t) / kN;
  Wide v;
  if constexpr (kN == 1) {
    std::memcpy(&v, p, sizeof(Wide));
  } else {
    using Quad = typename SimdOf<math_t, 16>::type;
    Quad q;
    if constexpr (kGroups * sizeof(math_t) == 16) {
      std::memcpy(&q, p, 16);
    } else {
      static_assert(kGroups * sizeof(math_t) == 8);
      typedef int64_t Pair __attribute__((vector_size(16)));
      int64_t bits;
      std::memcpy(&bits, p, 8);
      q = reinterpret_cast<Quad>(Pair{bits, 0});
    }
    v = __builtin_shufflevector(q, q, static_cast<int>(J / kN)...);
  }
  return v;
}

// Streams all in the math type, in groups of kN elements, kN a divisor of the vector width
// below it (a time per token, 2-D points), with the coefficients of consecutive groups adjacent
// (group stride 1, as path_coefficients_cpu and coefficient_matrix lay them out). Each vector
// covers kWide / kN whole groups, whose values of one coefficient are loaded together and
// repeated over their groups' lanes: no per-element table (affine_span) and no vector per group
// (affine_groups), the other paths' costs for such groups. The span's ends, short of whole
// vectors, go group by group. Per element, the operations and their order are affine_at's: the
// same bits.
template <typename math_t, int K, int M, int kN>
void affine_lanes(const std::array<Stream, K>& in, const std::array<Stream, M>& out,
                  const Coeffs<math_t>& c, int64_t first, int64_t len) {
  using Wide = typename SimdOf<math_t, kVectorBytes>::type;
  constexpr int kWide = sizeof(Wide) / sizeof(math_t), kGroups = kWide / kN;
  static_assert(kWide % kN == 0 && kGroups > 1);
  const int64_t head = std::min(len, (kN - first % kN) % kN);
  const int64_t body_end = head + (len - head) / kWide * kWide;
  if (head > 0) affine_groups<math_t, K, M, math_t>(in, out, c, kN, first, head);
  const math_t* x[K];
  math_t* y[M];
  for (int k = 0; k < K; ++k) x[k] = static_cast<const math_t*>(in[k].data);
  for (int m = 0; m < M; ++m) y[m] = static_cast<math_t*>(out[m].data);
  const math_t* cg = c.group((first + head) / kN);
  for (int64_t i = head; i < body_end; i += kWide, cg += kGroups) {
    const auto coefficient = [&](int m, int k) {
      return repeated<kN, Wide>(cg + m * c.m_stride + k * c.k_stride,
                                std::make_index_sequence<kWide>{});
    };
    Wide v[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) std::memcpy(&v[k], x[k] + i, sizeof(Wide));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      Wide acc = coefficient(m, 0) * v[0];
#pragma GCC unroll 8
      for (int k = 1; k < K; ++k) acc = acc + coefficient(m, k) * v[k];
      std::memcpy(y[m] + i, &acc, sizeof(Wide));
    }
  }
  if (body_end < len) {
    affine_groups<math_t, K, M, math_t>(advanced(in, body_end), advanced(out, body_end), c, kN,
                                        first + body_end, len - body_end);
  }
}

// The streams are rows of `row` elements (row_length); group g's coefficients serve elements
// [g n, (g + 1) n) of every `period` of G n elements: the whole stream, or one memory row of a
// stream with the batch inside (batch_period), where the groups start over at each.
template <typename math_t, int K, int M>
void affine_kernel(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                   const std::vector<at::Tensor>& outputs, int64_t row, int64_t period,
                   bool may_stream) {
  std::array<Stream, K> in;
  std::array<Stream, M> out;
  for (int k = 0; k < K; ++k)
    in[k] = {inputs[k].const_data_ptr(), inputs[k].scalar_type(), row_stride(inputs[k], row)};
  for (int m = 0; m < M; ++m) {
    const auto& y = outputs[m];
    out[m] = {y.mutable_data_ptr(), y.scalar_type(), row_stride(y, row)};
  }
  const Coeffs<math_t> c(coeffs);
  const int64_t numel = inputs[0].numel();
  const int64_t n = period / coeffs.size(0);

  // Streams all of one type go group by group (affine_groups): in the math type (unless the
  // outputs take streaming stores), in bf16, or in fp16 where AVX2 converts it, with fp32 math.
  // Mixed types, streaming stores and the smallest groups go through the tiles of affine_span.
  constexpr bool kFloatMath = std::is_same_v<math_t, float>;
  const at::ScalarType type = inputs[0].scalar_type();
  bool one_type = true;
  for (const auto* streams : {&inputs, &outputs})
    for (const auto& x : *streams) one_type = one_type && x.scalar_type() == type;
  int64_t output_bytes = 0;
  for (const auto& y : outputs) output_bytes += y.nbytes();
  const bool streaming = kCanStream && may_stream && output_bytes >= kStreamingMinBytes;
  const bool direct = one_type && type == kMathType<math_t>;
  const bool converted = one_type && kFloatMath &&
                         (type == at::kBFloat16 || (type == at::kHalf && kVector16));
  const bool grouped = (direct && !streaming && n >= kGroupLoopMin<math_t>) ||
                       (converted && n >= kConvertedGroupLoopMin);
  const bool small = n < kSmallGroup<math_t>;
  // Groups of 1, 2 or 4 elements that tile a vector, coefficients adjacent: affine_lanes. At
  // 256K elements of a 2 -> 2 map, one thread, AVX-512 build, against the table (groups of 1;
  // 2 on AVX2) and the group-by-group path: fp32 groups of 1 3.6x, 2 4.2x, 4 2.5x faster;
  // fp64 groups of 1 2.2x, 2 2.0x.
  constexpr int kWide = kVectorBytes / sizeof(math_t);
  const bool lanes = direct && !streaming && n < kWide && kWide % n == 0 &&
                     c.group_stride == 1 && period == numel;
  const auto by_lanes = [&](const auto& x, const auto& y, int64_t lo, int64_t len) {
    if (n == 1) return affine_lanes<math_t, K, M, 1>(x, y, c, lo, len);
    if constexpr (kWide > 2) {
      if (n == 2) return affine_lanes<math_t, K, M, 2>(x, y, c, lo, len);
    }
    if constexpr (kWide > 4) affine_lanes<math_t, K, M, 4>(x, y, c, lo, len);
  };
  const auto groups = [&](const auto& x, const auto& y, int64_t lo, int64_t len) {
    if (direct) return affine_groups<math_t, K, M, math_t>(x, y, c, n, lo, len);
    if constexpr (kFloatMath) {
      if (type == at::kBFloat16) {
        return affine_groups<math_t, K, M, c10::BFloat16>(x, y, c, n, lo, len);
      }
      return affine_groups<math_t, K, M, c10::Half>(x, y, c, n, lo, len);
    }
  };
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    // A task may straddle rows and groups: walk it in spans within one row and, on the span
    // path, within one group, so that each span has fixed coefficients.
    for (int64_t lo = begin; lo < end;) {
      int64_t hi = std::min(end, (row_of(lo, row) + 1) * row);
      if (!small && !grouped) hi = std::min(hi, (lo / n + 1) * n);
      const auto x = from_element(in, lo, row);
      const auto y = from_element(out, lo, row);
      if (lanes) {
        by_lanes(x, y, lo, hi - lo);
      } else if (grouped) {
        groups(x, y, lo, hi - lo);
      } else if (small) {
        affine_span<math_t, K, M, true>(x, y, c, n, lo, hi - lo, streaming);
      } else {
        affine_span<math_t, K, M, false>(x, y, c, n, lo, hi - lo, streaming);
      }
      lo = hi;
    }
    if (streaming) fence_streams();
  });
}

// W sums per group, each over the group's n elements, in a fixed order: the group is cut into
// chunks of kDotChunk elements whatever the thread count, span(g, lo, hi, sums) writes the W
// sums of a chunk [lo, hi) of group g to sums[0..W), and the chunks of a group are folded in
// order. The same bits come out on one thread or many.
template <typename acc_t, int W, typename Span>
void grouped_sums(int64_t groups, int64_t n, acc_t* out, const Span& span) {
  const int64_t chunks = std::max<int64_t>(1, (n + kDotChunk - 1) / kDotChunk);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1));
  if (chunks == 1) {
    // Groups of one chunk (all but huge ones) sum straight into the result: no partials to
    // allocate and fold, which cost more than the sums themselves for many small groups.
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) span(g, g * n, (g + 1) * n, out + g * W);
    });
    return;
  }
  std::vector<acc_t> partial(static_cast<size_t>(groups * chunks * W), acc_t(0));
  at::parallel_for(0, groups * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / chunks;
      const int64_t lo = g * n + (task % chunks) * kDotChunk;
      span(g, lo, std::min(lo + kDotChunk, (g + 1) * n), partial.data() + task * W);
    }
  });
  for (int64_t g = 0; g < groups; ++g)
    for (int w = 0; w < W; ++w) {
      acc_t s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[(g * chunks + c) * W + w];
      out[g * W + w] = s;
    }
}

// kLanes independent accumulators, term i of a sum to lane i % kLanes, folded in order at the
// end: lets the compiler vectorise a reduction without reassociating it, so the vector width
// changes no result. The terms may come in several runs (the pieces of rows of a row view):
// each run continues the lanes where the last one stopped, so a sum has the same bits however
// its terms lie in memory.
template <typename acc_t>
struct Lanes {
  acc_t acc[kLanes] = {};
  int next = 0;  // the lane of the next term

  // Adds v(i) for i in [0, n). Counted from 0 with pointers at the run's start: affine_dot's sums
  // ran 2x to 3.7x faster at 64K to 1M elements than with indices counted from the span's start.
  template <typename Value>
  void add(int64_t n, const Value& v) {
    acc_t lane[kLanes];  // a local copy, which the compiler keeps in registers
    std::copy_n(acc, kLanes, lane);
    int64_t i = 0;
    for (; next != 0 && i < n; ++i, next = (next + 1) % kLanes) lane[next] += v(i);
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) lane[l] += v(i + l);
    for (; i < n; ++i, ++next) lane[next] += v(i);
    std::copy_n(lane, kLanes, acc);
  }

#ifdef FASTFLOW_CPU_AVX2
  // add() for the terms double(x) * double(y) of fp32 factors (x, y) = factors(i) computed from
  // 16-bit streams, eight terms at a time: the compiler does not vectorise c10::Half's
  // conversion inside a sum (fp16 ran 4.6x slower than bf16 at 1M elements). The two halves of
  // a vector are lanes 0-3 and 4-7 (with AVX-512, one vector of eight doubles: 16-bit squared
  // norms 1.1x to 1.2x faster at 1M), and every term takes the same operations in the same
  // order: the same bits. term(i) is the scalar term, which add() sums for the run's head (up to
  // lane 0) and tail.
  template <typename Factors, typename Term>
  void add_vector(int64_t n, const Factors& factors, const Term& term) {
    static_assert(std::is_same_v<acc_t, double> && kLanes == 8);
    int64_t i = std::min<int64_t>(n, (kLanes - next) % kLanes);
    add(i, term);
#ifdef FASTFLOW_CPU_AVX512
    __m512d lanes = _mm512_loadu_pd(acc);
    for (; i + kLanes <= n; i += kLanes) {
      const auto [x, y] = factors(i);
      lanes = _mm512_add_pd(lanes, _mm512_mul_pd(_mm512_cvtps_pd(x), _mm512_cvtps_pd(y)));
    }
    _mm512_storeu_pd(acc, lanes);
#else
    __m256d low = _mm256_loadu_pd(acc), high = _mm256_loadu_pd(acc + 4);
    for (; i + kLanes <= n; i += kLanes) {
      const auto [x, y] = factors(i);
      low = _mm256_add_pd(low, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)),
                                             _mm256_cvtps_pd(_mm256_castps256_ps128(y))));
      high = _mm256_add_pd(high, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)),
                                               _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1))));
    }
    _mm256_storeu_pd(acc, low);
    _mm256_storeu_pd(acc + 4, high);
#endif
    add(n - i, [&](int64_t j) { return term(i + j); });
  }
#endif

  acc_t fold() const {
    acc_t s = 0;
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    return s;
  }
};

// The Lanes sum of v(i), i in [0, n), in one run. A sum of at most kLanes terms is summed in
// order, without setting up the lanes (most of the cost for tiny groups): the same bits, as
// each lane would hold at most one term.
template <typename acc_t, typename Value>
acc_t lane_sum(int64_t n, const Value& v) {
  acc_t s = 0;
  if (n <= kLanes) {
    for (int64_t i = 0; i < n; ++i) s += v(i);
    return s;
  }
  Lanes<acc_t> lanes;
  lanes.add(n, v);
  return lanes.fold();
}

template <typename scalar_t, typename acc_t, int K, int M>
void dot_kernel(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                int64_t groups, at::Tensor& result) {
  std::array<const scalar_t*, M> pa;
  std::array<const scalar_t*, K> pb;
  for (int m = 0; m < M; ++m) pa[m] = a[m].const_data_ptr<scalar_t>();
  for (int k = 0; k < K; ++k) pb[k] = b[k].const_data_ptr<scalar_t>();
  grouped_sums<acc_t, M * K>(groups, a[0].numel() / groups, result.mutable_data_ptr<acc_t>(),
                             [&](int64_t, int64_t lo, int64_t hi, acc_t* sums) {
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) {
        const scalar_t* x = pa[m] + lo;
        const scalar_t* y = pb[k] + lo;
        const auto product = [&](int64_t i) {
          return load_as<acc_t>(x[i]) * load_as<acc_t>(y[i]);
        };
#ifdef FASTFLOW_CPU_AVX2
        if constexpr (sizeof(scalar_t) == 2 && std::is_same_v<acc_t, double>) {
          Lanes<double> lanes;
          lanes.add_vector(hi - lo, [&](int64_t i) {
            return std::pair(widen8(x + i), widen8(y + i));
          }, product);
          sums[m * K + k] = lanes.fold();
          continue;
        }
#endif
        sums[m * K + k] = lane_sum<acc_t>(hi - lo, product);
      }
  });
}

// The squared residuals r^2 of sqnorm_kernel for groups of one element per period (the batch
// innermost, x.T): period p is memory row p, group g's term at column g. Memory is walked in
// order, a block of columns at a time; term p of each column goes to lane p % kLanes of its sum,
// and the lanes are folded every kDotChunk terms, as grouped_sums and Lanes sum a group's terms
// wherever they lie: the same bits as on contiguous streams.
template <typename scalar_t, int K, typename math_t>
void sqnorm_columns(const std::array<Stream, K>& in, const Coeffs<math_t>& c, int64_t periods,
                    double* sums) {
  constexpr int64_t kBlock = 256;  // columns at a time: their lanes take 16 KB
  const int64_t groups = c.groups;
  at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / periods), [&](int64_t begin,
                                                                          int64_t end) {
    for (int64_t g0 = begin; g0 < end; g0 += kBlock) {
      const int64_t width = std::min(kBlock, end - g0);
      math_t cg[K][kBlock];
      for (int64_t j = 0; j < width; ++j)
        for (int k = 0; k < K; ++k) cg[k][j] = c.at(c.group(g0 + j), 0, k);
      double lanes[kLanes][kBlock] = {}, total[kBlock] = {};
      for (int64_t p = 0; p < periods; ++p) {
        const scalar_t* x[K];
        for (int k = 0; k < K; ++k)
          x[k] = static_cast<const scalar_t*>(in[k].data) + p * groups + g0;
        double* lane = lanes[p % kLanes];
        for (int64_t j = 0; j < width; ++j) {
          math_t r = cg[0][j] * load_as<math_t>(x[0][j]);
          for (int k = 1; k < K; ++k) r = r + cg[k][j] * load_as<math_t>(x[k][j]);
          lane[j] += static_cast<double>(r) * static_cast<double>(r);
        }
        if ((p + 1) % kDotChunk == 0 || p + 1 == periods) {  // a chunk's sums, folded in order
          for (int64_t j = 0; j < width; ++j) {
            double s = 0;
            for (int l = 0; l < kLanes; ++l) s += lanes[l][j];
            total[j] += s;
          }
          std::fill_n(&lanes[0][0], kLanes * kBlock, 0.0);
        }
      }
      std::copy_n(total, width, sums + g0);
    }
  });
}

// r^2 in fp64 for r = sum_k c[k] * x[k][i] in the math type, k = 0..K-1: the term of
// affine_sqnorm's sums, r computed exactly as affine computes an output.
template <typename math_t, int K, typename scalar_t>
[[gnu::always_inline]] inline double squared_residual(const math_t* c, const scalar_t* const* x,
                                                      int64_t i) {
  math_t r = c[0] * load_as<math_t>(x[0][i]);
  for (int k = 1; k < K; ++k) r = r + c[k] * load_as<math_t>(x[k][i]);
  return static_cast<double>(r) * static_cast<double>(r);
}

// The sums of sqnorm_kernel for contiguous streams in groups of at most kLanes elements (a time
// per token): one loop over the groups, each summed in order as lane_sum's shortcut sums it (the
// same bits), without grouped_sums' call and run walk per group, which cost 3 ns a group of 4.
// kN: the group size where the compiler may unroll it, else 0 (n at run time).
template <typename scalar_t, int K, int kN, typename math_t>
void sqnorm_small_groups(const std::array<Stream, K>& in, const Coeffs<math_t>& c, int64_t n,
                         double* sums) {
  const int64_t size = kN > 0 ? kN : n;
  at::parallel_for(0, c.groups, std::max<int64_t>(1, kGrain / size), [&](int64_t begin,
                                                                         int64_t end) {
    const scalar_t* x[K];
    for (int k = 0; k < K; ++k) x[k] = static_cast<const scalar_t*>(in[k].data);
    for (int64_t g = begin; g < end; ++g) {
      math_t cg[K];
      for (int k = 0; k < K; ++k) cg[k] = c.at(c.group(g), 0, k);
      double s = 0;
#pragma GCC unroll 8
      for (int64_t j = 0; j < size; ++j) s += squared_residual<math_t, K>(cg, x, g * size + j);
      sums[g] = s;
    }
  });
}

// Sum over each group of r^2, r = sum_k coeffs[g, 0, k] * in[k] computed exactly as affine
// computes an output (math type, order k = 0..K-1), the square accumulated in fp64. The inputs
// are rows of `row` elements (row_length), and each group's elements are runs of `period` / G
// elements, one per period (affine_kernel): a group's terms come in runs, one per piece of a
// row or per period.
template <typename scalar_t, int K>
void sqnorm_kernel(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs, int64_t row,
                   int64_t period, at::Tensor& result) {
  using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  std::array<Stream, K> in;
  for (int k = 0; k < K; ++k)
    in[k] = {inputs[k].const_data_ptr(), inputs[k].scalar_type(), row_stride(inputs[k], row)};
  const Coeffs<math_t> c(coeffs);
  const int64_t groups = coeffs.size(0), numel = inputs[0].numel();
  const int64_t n = numel / groups, run = period / groups;
  if (run == 1 && period < numel) {
    return sqnorm_columns<scalar_t, K>(in, c, numel / period, result.mutable_data_ptr<double>());
  }
  if (row == numel && period == numel && n <= kLanes) {
    double* sums = result.mutable_data_ptr<double>();
    switch (n) {
      case 1: return sqnorm_small_groups<scalar_t, K, 1>(in, c, n, sums);
      case 2: return sqnorm_small_groups<scalar_t, K, 2>(in, c, n, sums);
      case 4: return sqnorm_small_groups<scalar_t, K, 4>(in, c, n, sums);
      default: return sqnorm_small_groups<scalar_t, K, 0>(in, c, n, sums);
    }
  }
  grouped_sums<double, 1>(groups, n, result.mutable_data_ptr<double>(),
                          [&](int64_t g, int64_t lo, int64_t hi, double* sum) {
    math_t cg[K];
    for (int k = 0; k < K; ++k) cg[k] = c.at(c.group(g), 0, k);
    // f(x, len) for each run of [lo, hi), the piece of a row or of a period at x[k][0 .. len).
    const auto for_runs = [&](const auto& f) {
      std::array<const scalar_t*, K> x;
      if (row == numel && period == numel) {  // contiguous: one run, without a walk
        for (int k = 0; k < K; ++k) x[k] = static_cast<const scalar_t*>(in[k].data) + lo;
        return f(x, hi - lo);
      }
      if (period < numel) {  // term i of group g: in period i / run, at g * run + i % run
        for (int64_t i = lo - g * n; i < hi - g * n;) {
          const int64_t p = i / run, len = std::min((p + 1) * run, hi - g * n) - i;
          for (int k = 0; k < K; ++k)
            x[k] = static_cast<const scalar_t*>(in[k].data) + p * period + g * run + i % run;
          f(x, len);
          i += len;
        }
        return;
      }
      for (int64_t a = lo; a < hi;) {
        const int64_t b = std::min(hi, (row_of(a, row) + 1) * row);
        const auto streams = from_element(in, a, row);
        for (int k = 0; k < K; ++k) x[k] = static_cast<const scalar_t*>(streams[k].data);
        f(x, b - a);
        a = b;
      }
    };
    if (hi - lo <= kLanes) {  // lane_sum's shortcut for tiny groups
      double s = 0;
      for_runs([&](const auto& x, int64_t len) {
        for (int64_t i = 0; i < len; ++i) s += squared_residual<math_t, K>(cg, x.data(), i);
      });
      *sum = s;
      return;
    }
    Lanes<double> lanes;
    for_runs([&](const auto& x, int64_t len) {
      const auto term = [&](int64_t i) { return squared_residual<math_t, K>(cg, x.data(), i); };
#ifdef FASTFLOW_CPU_AVX2
      if constexpr (sizeof(scalar_t) == 2) {
        __m256 coeff[K];
        for (int k = 0; k < K; ++k) coeff[k] = _mm256_set1_ps(cg[k]);
        lanes.add_vector(len, [&](int64_t i) {
          __m256 r = _mm256_mul_ps(coeff[0], widen8(x[0] + i));
          for (int k = 1; k < K; ++k)
            r = _mm256_add_ps(r, _mm256_mul_ps(coeff[k], widen8(x[k] + i)));
          return std::pair(r, r);
        }, term);
        return;
      }
#endif
      lanes.add(len, term);
    });
    *sum = lanes.fold();
  });
}

}  // namespace

// The entry points of this instruction set, after the argument checks (affine_cpu.cpp).

void affine(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
            const std::vector<at::Tensor>& outputs, int64_t row, int64_t period,
            bool may_stream) {
  dispatch_arity(inputs.size(), outputs.size(), [&](auto k, auto m) {
    constexpr int K = decltype(k)::value, M = decltype(m)::value;
    if (coeffs.scalar_type() == at::kDouble) {
      affine_kernel<double, K, M>(inputs, coeffs, outputs, row, period, may_stream);
    } else {
      affine_kernel<float, K, M>(inputs, coeffs, outputs, row, period, may_stream);
    }
  });
}

void dot(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, int64_t groups,
         at::Tensor& sums) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "affine_dot_cpu",
                                  [&] {
    dispatch_arity(b.size(), a.size(), [&](auto k, auto m) {
      dot_kernel<scalar_t, double, decltype(k)::value, decltype(m)::value>(a, b, groups, sums);
    });
  });
}

void sqnorm(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs, int64_t row,
            int64_t period, at::Tensor& sums) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs[0].scalar_type(),
                                  "affine_sqnorm_cpu", [&] {
    dispatch_arity(inputs.size(), 1, [&](auto k, auto) {
      sqnorm_kernel<scalar_t, decltype(k)::value>(inputs, coeffs, row, period, sums);
    });
  });
}

void narrow_floats(const float* src, int64_t n, at::ScalarType type, void* dst) {
  if (type == at::kHalf) return narrow(src, n, static_cast<c10::Half*>(dst));
  TORCH_CHECK(type == at::kBFloat16, "fastflow narrow_floats: expected a 16-bit type, got ", type);
  narrow(src, n, static_cast<c10::BFloat16*>(dst));
}

// The fp64 sum of a contiguous 1-D float or double tensor, grouped_sums' order for one group.
double total(const at::Tensor& values) {
  double sum = 0;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ordered_sum_cpu", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    grouped_sums<double, 1>(1, values.numel(), &sum,
                            [&](int64_t, int64_t lo, int64_t hi, double* chunk) {
      *chunk = lane_sum<double>(hi - lo, [&](int64_t i) { return static_cast<double>(v[lo + i]); });
    });
  });
  return sum;
}

#define FASTFLOW_STRINGIFY(x) #x
#define FASTFLOW_NAME_OF(x) FASTFLOW_STRINGIFY(x)
extern const IsaKernels kKernels{FASTFLOW_NAME_OF(FASTFLOW_CPU_ISA), affine, dot, sqnorm,
                                 narrow_floats, total};
#undef FASTFLOW_NAME_OF
#undef FASTFLOW_STRINGIFY

}  // namespace FASTFLOW_CPU_ISA
}  // namespace fastflow
