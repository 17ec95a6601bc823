// Runtime ISA dispatch. The extension is built without -march flags so that it runs on any x86-64
// CPU; its hot loops also get AVX2 and AVX-512 versions, picked at run time by the CPU's features:
//  - FASTFLOW_SIMD_CLONES marks a plain (non-template) function with simple loops: GCC compiles
//    it three times, for the baseline, AVX2 and AVX-512F, and the loader picks the best clone
//    the CPU supports. The clones are named by their feature: GCC resolves an "arch=haswell"
//    clone by exact CPU model, so every other AVX2 CPU (later Intel, all AMD) would run the
//    baseline. The AVX-512 clone (eight doubles a vector where AVX2 has four) against the AVX2
//    one, one thread on an AMD EPYC with AVX-512: a path's coefficients for 262144 times 1.7x
//    faster on VP (two exps: 4.3 -> 2.6 ns a time), 1.4x on Cosine, level on the paths of
//    + - * / alone; the sampler's noise 1.55x (1M values), sinusoidal embeddings 1.36x.
//  - FASTFLOW_ISA_KERNELS is set where a whole translation unit of templates can be compiled
//    again for AVX2 or AVX-512 with `#pragma GCC target` (affine_cpu_avx2.cpp,
//    affine_cpu_avx512.cpp, affine_cpu_avx512_bf16.cpp).
// With -ffp-contract=off every version rounds identically. GCC on x86-64 only; elsewhere the
// baseline alone is built.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTFLOW_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define FASTFLOW_ISA_KERNELS 1
#else
#define FASTFLOW_SIMD_CLONES
#endif
