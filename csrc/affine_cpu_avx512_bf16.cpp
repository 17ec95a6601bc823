// The affine kernels of affine_cpu_kernels.h again, for AVX-512 with AVX512_BF16 (and DQ):
// affine_cpu_avx512.cpp's kernels with fp32 narrowed to bf16 by the hardware
// (FASTFLOW_CPU_AVX512_BF16). affine_cpu.cpp runs them where the CPU has these features
// (Cooper Lake, Sapphire Rapids and later, Zen 4 and later), in place of the AVX-512 ones.
#include "affine_cpu_deps.h"

#ifdef FASTFLOW_ISA_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*, which -Wmaybe-uninitialized
// reports in every caller (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTFLOW_CPU_ISA avx512_bf16
#define FASTFLOW_CPU_AVX2 1
#define FASTFLOW_CPU_AVX512 1
#define FASTFLOW_CPU_AVX512_BF16 1
#include "affine_cpu_kernels.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
