// The affine kernels of affine_cpu_kernels.h again, for AVX-512 (F, BW and VL) on top of AVX2
// and F16C: FASTFLOW_CPU_AVX2's kernels with 16-bit streams converted sixteen at a time
// (FASTFLOW_CPU_AVX512). affine_cpu.cpp runs them on CPUs that have all of these, where
// PyTorch's own kernels run AVX-512 too.
#include "affine_cpu_deps.h"

#ifdef FASTFLOW_ISA_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,f16c,avx512f,avx512bw,avx512vl")
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*, which -Wmaybe-uninitialized
// reports in every caller (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTFLOW_CPU_ISA avx512
#define FASTFLOW_CPU_AVX2 1
#define FASTFLOW_CPU_AVX512 1
#include "affine_cpu_kernels.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
