// Sinusoidal time embeddings (DESIGN.md section 5): one kernel for the diffusers, ADM/DiT and
// Gaussian-Fourier conventions, which differ only in the frequencies, a scale and the order of
// the halves. For t [B] and freqs [H] in the math type (fp32, or fp64):
//
//     a[b, j] = (t[b] * freqs[j]) * scale                (two roundings, as eager PyTorch does)
//     out[b, :] = [sin a, cos a] or [cos a, sin a], plus a zero column when out has 2H + 1
//
// out is [B, 2H] or [B, 2H + 1] in any float type. The backward reads the gradient of out once
// and returns what is asked of
//
//     grad_t[b] = scale * sum_j freqs[j] * dA[b, j]      grad_freqs[j] = scale * sum_b t[b] * dA[b, j]
//     dA = grad_sin * cos a - grad_cos * sin a
//
// summed in a fixed order (the same bits whatever the thread count).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastflow {

void sinusoid_cpu(const at::Tensor& t, const at::Tensor& freqs, double scale, bool cos_first,
                  const at::Tensor& out);

// (grad_t [B], grad_freqs [H]) in the math type; a gradient not asked for comes back empty.
std::tuple<at::Tensor, at::Tensor> sinusoid_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& t,
                                                         const at::Tensor& freqs, double scale,
                                                         bool cos_first, bool need_t,
                                                         bool need_freqs);

}  // namespace fastflow
