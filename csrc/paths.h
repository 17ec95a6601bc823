// Coefficient matrices of the built-in paths with arithmetic schedules (see paths_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace fastflow {

// [G, 2, K] coefficients, rows (x_t, u_t) over columns (x0, x1[, noise]), of the path `path`
// ("cond_ot" or "constant_noise") with parameters `params`
// at the float64 times t [G], in `dtype` (float32 or float64): the bits that
// fastflow.paths computes with PyTorch.
at::Tensor path_coefficients_cpu(const at::Tensor& t, const std::string& path,
                                 const std::vector<double>& params, at::ScalarType dtype);

}  // namespace fastflow
