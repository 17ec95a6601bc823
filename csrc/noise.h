// The sampler's counter-based Gaussian noise (fastflow/_noise.py states the definition): row b
// of out ([B, ...], any float type, contiguous) gets the standard normal values of sample
// ids[b] (int64) at `step`, each a pure function of (seed, ids[b], step, element index). The
// same bits as fastflow/reference/_noise.py and triton_kernels/noise.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastflow {

void gaussian_cpu(const at::Tensor& ids, int64_t seed, int64_t step, const at::Tensor& out);

}  // namespace fastflow
