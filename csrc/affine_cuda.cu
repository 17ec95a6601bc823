// CUDA kernel of the affine family (DESIGN.md sections 1 and 9). The op is memory bound, so the
// kernel does little besides moving bytes: threads stream 128-bit vectors of every input and
// output through a grid-stride loop over a grid that just fills the GPU, with no division per
// element and the coefficients loaded once per vector. Products and sums are rounded separately
// (no FMA contraction), in the order k = 0..K-1, so fp32 and fp64 results equal the CPU kernel's
// bit for bit, and eager PyTorch's.
#include "affine.h"

#include <ATen/Dispatch.h>

// c10's CUDA headers rather than ATen/cuda/CUDAContext.h, which also pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers that a minimal CUDA toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastflow {
namespace {

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;

// Lets the compiler emit one 128-bit load or store for N elements.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vector {
  T v[N];
};

// __fmul_rn and friends are never contracted into an FMA, whatever -fmad says.
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }

template <typename scalar_t, typename math_t, int K, int M>
struct AffineArgs {
  const scalar_t* in[K];
  scalar_t* out[M];
  const math_t* coeffs;  // [G, M, K]
  int64_t numel;
  int64_t n;  // elements per group
};

// out[m] for one element, given its K inputs and the M*K coefficients of its group.
template <typename scalar_t, typename math_t, int K, int M>
__device__ __forceinline__ void combine(const math_t (&x)[K], const math_t* c, scalar_t (&y)[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    math_t acc = mul(c[m * K], x[0]);
#pragma unroll
    for (int k = 1; k < K; ++k) acc = add(acc, mul(c[m * K + k], x[k]));
    y[m] = static_cast<scalar_t>(acc);
  }
}

template <typename math_t, int K, int M>
__device__ __forceinline__ void load_coeffs(const math_t* coeffs, int64_t g, math_t (&c)[M * K]) {
#pragma unroll
  for (int i = 0; i < M * K; ++i) c[i] = __ldg(coeffs + g * (M * K) + i);
}

// vectorized: every stream is 16-byte aligned, so elements [0, numel / V * V) go through V-wide
// vectors; the rest (the tail, or everything when unaligned) goes element by element.
template <typename scalar_t, typename math_t, int K, int M>
__global__ void __launch_bounds__(kThreads)
    affine_kernel(const AffineArgs<scalar_t, math_t, K, M> a, const bool vectorized) {
  constexpr int V = kVectorBytes / sizeof(scalar_t);
  using Vec = Vector<scalar_t, V>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t scalar_begin = 0;

  if (vectorized) {
    const int64_t vectors = a.numel / V;
    // Element v * V is element r of group g. A 64-bit division is a long instruction sequence on
    // the GPU, so divide once per thread and advance (g, r) by the fixed stride in the loop.
    const int64_t step_g = stride * V / a.n, step_r = stride * V % a.n;
    int64_t g = tid * V / a.n, r = tid * V % a.n;
    for (int64_t v = tid; v < vectors; v += stride) {
      // Issue every load before any math: K requests in flight per thread.
      Vec x[K];
#pragma unroll
      for (int k = 0; k < K; ++k) x[k] = reinterpret_cast<const Vec*>(a.in[k])[v];

      // Elements [0, left) of the vector belong to group g. Usually left >= V and the
      // coefficients are loaded once; a vector that crosses into later groups (samples shorter
      // than V, or n not a multiple of V) switches them at each boundary.
      int64_t ge = g, left = a.n - r;
      math_t c[M * K];
      load_coeffs<math_t, K, M>(a.coeffs, ge, c);
      Vec y[M];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (e == left) {
          ++ge;
          left += a.n;
          load_coeffs<math_t, K, M>(a.coeffs, ge, c);
        }
        math_t xe[K];
        scalar_t ye[M];
#pragma unroll
        for (int k = 0; k < K; ++k) xe[k] = static_cast<math_t>(x[k].v[e]);
        combine<scalar_t, math_t, K, M>(xe, c, ye);
#pragma unroll
        for (int m = 0; m < M; ++m) y[m].v[e] = ye[m];
      }
#pragma unroll
      for (int m = 0; m < M; ++m) reinterpret_cast<Vec*>(a.out[m])[v] = y[m];

      g += step_g;
      r += step_r;
      if (r >= a.n) {
        r -= a.n;
        ++g;
      }
    }
    scalar_begin = vectors * V;
  }

  for (int64_t j = scalar_begin + tid; j < a.numel; j += stride) {
    math_t xe[K];
    scalar_t ye[M];
#pragma unroll
    for (int k = 0; k < K; ++k) xe[k] = static_cast<math_t>(a.in[k][j]);
    combine<scalar_t, math_t, K, M>(xe, a.coeffs + (j / a.n) * (M * K), ye);
#pragma unroll
    for (int m = 0; m < M; ++m) a.out[m][j] = ye[m];
  }
}

template <typename scalar_t, int K, int M>
void launch_affine(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                   const std::vector<at::Tensor>& outputs) {
  using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr int V = kVectorBytes / sizeof(scalar_t);
  AffineArgs<scalar_t, math_t, K, M> a;
  bool vectorized = true;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; };
  for (int k = 0; k < K; ++k) {
    a.in[k] = inputs[k].const_data_ptr<scalar_t>();
    vectorized = vectorized && aligned(a.in[k]);
  }
  for (int m = 0; m < M; ++m) {
    a.out[m] = outputs[m].mutable_data_ptr<scalar_t>();
    vectorized = vectorized && aligned(a.out[m]);
  }
  a.coeffs = coeffs.const_data_ptr<math_t>();
  a.numel = inputs[0].numel();
  a.n = a.numel / coeffs.size(0);

  // As many threads as there is work, capped at what the SMs hold at full occupancy: enough
  // loads in flight to saturate DRAM, and each thread amortises its setup (two divisions) over
  // many vectors. Where registers limit residency (the largest K and M) the surplus blocks run
  // as further rounds of equal size.
  const int64_t work = vectorized ? (a.numel + V - 1) / V : a.numel;
  const int device = inputs[0].get_device();
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t wave = static_cast<int64_t>(sms) * (threads_per_sm / kThreads);
  const auto blocks = static_cast<unsigned>(std::min((work + kThreads - 1) / kThreads, wave));
  affine_kernel<scalar_t, math_t, K, M>
      <<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, vectorized);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void affine_cuda(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                 const std::vector<at::Tensor>& outputs) {
  check_affine_args(inputs, coeffs, outputs, c10::kCUDA);
  if (inputs[0].numel() == 0) return;
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs[0].scalar_type(), "affine_cuda",
                                  [&] {
    dispatch_arity(inputs.size(), outputs.size(), [&](auto k, auto m) {
      launch_affine<scalar_t, decltype(k)::value, decltype(m)::value>(
          inputs, coefficients_apart(coeffs, outputs), outputs);
    });
  });
}

}  // namespace fastflow
