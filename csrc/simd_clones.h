// Runtime ISA dispatch for hot loops. The extension is built without -march flags so that it
// runs on any x86-64 CPU; a function marked FASTFLOW_SIMD_CLONES is compiled twice, for the
// baseline and for AVX2, and the loader picks the clone the CPU supports. The clone is named by
// its feature: GCC resolves an "arch=haswell" clone by exact CPU model, so every other AVX2 CPU
// (later Intel, all AMD) would run the baseline. With -ffp-contract=off both clones round
// identically. GCC on x86-64 only; elsewhere the baseline alone is built. Mark plain
// (non-template) functions with simple loops.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTFLOW_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTFLOW_SIMD_CLONES
#endif
