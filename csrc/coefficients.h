// Coefficients in one call: computed from t on CPU, the matrices of the built-in paths
// (paths_cpu.cpp) and the rows of fastflow.convert (conversions_cpu.cpp);
// assembled on any device from numbers and tensors computed elsewhere (coefficient_matrix.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <string>
#include <variant>
#include <vector>

namespace fastflow {

// Samples per task of loops over samples: the builders' (one call per sample each, tens of
// nanoseconds with the first touch of the output), the loss's backward rows (loss_cpu.cpp).
constexpr int64_t kGroupGrain = 16384;

// An uninitialised [groups, rows, columns] coefficient tensor laid out entry-major ([rows,
// columns, groups] memory: each entry's values over the groups adjacent, which the CPU affine
// kernels load a vector at a time for small groups, affine_lanes), with huge pages once it is
// as large as a stream may be (a time per token), as fresh outputs get them.
at::Tensor entry_major_coefficients(int64_t groups, int64_t rows, int64_t columns,
                                    const at::TensorOptions& options);

// [G, 2, K] coefficients, rows (x_t, u_t) over columns (x0, x1[, noise]), of the path `path`
// (a name of fastflow.paths._NATIVE) with parameters `params` at the times t [G] (any float type,
// widened to double), in `dtype` (float32 or float64): what fastflow.paths computes with PyTorch
// in float64, to its bits where the formulas are arithmetic (see paths_cpu.cpp). With
// `residual`, the velocity loss's [G, 1, 1 + K] rows (1, -u_t) over (pred, x0, x1[, noise])
// instead, u_t rounded to dtype then negated.
at::Tensor path_coefficients_cpu(const at::Tensor& t, const std::string& path,
                                 const std::vector<double>& params, at::ScalarType dtype,
                                 bool residual);

// [G, 1, 2] coefficients over (x_t, pred) that turn a prediction of kind `src` into kind `dst`
// ("velocity", "epsilon", "data" or "score"), from the path's float64 coefficient matrix
// [G, 2, 2] (rows (x_t, u_t), columns (x0, x1)), divisors kept `eps` away from zero, in `dtype`
// (float32 or float64): the bits that fastflow.conversions computes with PyTorch.
at::Tensor conversion_coefficients_cpu(const at::Tensor& path_coeffs, const std::string& src,
                                       const std::string& dst, double eps, at::ScalarType dtype);

// One entry of coefficient_matrix: a number, or a tensor of G values (or one) of any shape.
using CoefficientEntry = std::variant<at::Tensor, double>;

// [G, outputs, inputs] coefficients in `dtype` on `device` from their entries, row by row (a
// view of an entry-major [outputs * inputs, G] tensor, as fastflow._ops.coefficient_matrix
// builds it); any device, recorded by autograd.
at::Tensor coefficient_matrix(const std::vector<CoefficientEntry>& entries, int64_t outputs,
                              int64_t inputs, int64_t groups, at::ScalarType dtype,
                              at::Device device);

}  // namespace fastflow
