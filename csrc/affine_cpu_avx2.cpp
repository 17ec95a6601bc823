// The affine kernels of affine_cpu_kernels.h again, for AVX2 and F16C (eight floats per vector
// instruction, 16-bit conversions eight at a time, streaming stores: FASTFLOW_CPU_AVX2);
// affine_cpu.cpp runs them on CPUs that have both, unless the AVX-512 ones are chosen.
#include "affine_cpu_deps.h"

#ifdef FASTFLOW_ISA_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define FASTFLOW_CPU_ISA avx2
#define FASTFLOW_CPU_AVX2 1
#include "affine_cpu_kernels.h"
#pragma GCC pop_options
#endif
