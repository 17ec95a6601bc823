// Runtime ISA dispatch. The extension is built without -march flags so that it runs on any x86-64
// CPU; its hot loops also get AVX2 versions, picked at run time on CPUs that have AVX2:
//  - FASTFLOW_SIMD_CLONES marks a plain (non-template) function with simple loops: GCC compiles
//    it twice, for the baseline and for AVX2, and the loader picks the clone the CPU supports.
//    The clone is named by its feature: GCC resolves an "arch=haswell" clone by exact CPU model,
//    so every other AVX2 CPU (later Intel, all AMD) would run the baseline.
//  - FASTFLOW_ISA_KERNELS is set where a whole translation unit of templates can be compiled
//    again for AVX2 or AVX-512 with `#pragma GCC target` (affine_cpu_avx2.cpp,
//    affine_cpu_avx512.cpp, affine_cpu_avx512_bf16.cpp).
// With -ffp-contract=off every version rounds identically. GCC on x86-64 only; elsewhere the
// baseline alone is built.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTFLOW_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#define FASTFLOW_ISA_KERNELS 1
#else
#define FASTFLOW_SIMD_CLONES
#endif
