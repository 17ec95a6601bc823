// What affine_cpu_kernels.h uses, included by each instruction set's translation unit before
// its `#pragma GCC target`: nothing these headers define inline may be compiled for AVX2 or
// AVX-512 there and then shared with the baseline code by the linker.
#pragma once

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

#ifdef FASTFLOW_ISA_KERNELS
#include <immintrin.h>
#endif
