// The affine kernels of affine_cpu_kernels.h again, for AVX2 and F16C (eight floats per vector
// instruction, 16-bit conversions eight at a time, streaming stores: FASTFLOW_CPU_AVX2);
// affine_cpu.cpp runs them on CPUs that have both.
// The headers are included first, outside the AVX2 region, so that nothing they define inline
// is compiled for AVX2 here and shared with the baseline code by the linker.
#include "affine.h"
#include "float_bits.h"
#include "simd_clones.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#ifdef FASTFLOW_AVX2_KERNELS
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define FASTFLOW_CPU_ISA avx2
#define FASTFLOW_CPU_AVX2 1
#include "affine_cpu_kernels.h"
#pragma GCC pop_options
#endif
