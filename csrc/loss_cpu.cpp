// The fused loss as an autograd node of its own in C++, for the eager training step on CPU.
//
//     loss = sum_g w_g sqnorm_g / divisor,   sqnorm_g = sum_i (sum_k coeffs[g, 0, k] * in[k][g, i])^2
//
// with in = (pred, x0, x1[, noise]), optional constant weights w, and only pred differentiable:
// the loss of fastflow's flow_matching_loss when it is one number (reduction "mean" or "sum")
// and the training step's gradient, to the network's output alone. Python's
// autograd.Function costs about 0.1 ms a step around a few microseconds of kernels on a small
// batch; this node costs what a built-in op's does. Everything else (per-sample losses,
// gradients to x0, x1, t or the weights) takes the Python node (fastflow/losses.py),
// which this one repeats for its case: dL/dpred = 2 g w_g c_g / divisor * residual, c_g =
// coeffs[g, 0, 0] (1 in the loss's rows (1, -target)), one affine pass.
#include "affine.h"
#include "coefficients.h"

#include <ATen/Dispatch.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

namespace fastflow {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// On a small batch the loss's arithmetic around its kernels (a division, a few scalings) costs
// more in ATen dispatch than in the kernels: these do it by hand, with ATen's roundings.

// The one sum of squares divided by `divisor`, as `squares.sum() / divisor` rounds it: a
// quotient in squares' type (float or double), the divisor converted to that type first.
at::Tensor divided(const at::Tensor& squares, double divisor) {
  at::Tensor loss = at::empty({}, squares.options());
  AT_DISPATCH_FLOATING_TYPES(squares.scalar_type(), "pred_loss", [&] {
    *loss.mutable_data_ptr<scalar_t>() =
        *squares.const_data_ptr<scalar_t>() / static_cast<scalar_t>(divisor);
  });
  return loss;
}

// dL/dpred's rows, coeffs * (grad * (2 / divisor) [* weight] * coeffs[:, :, :1]) as those ATen
// ops round them: [G, 1, K] like coeffs (in its layout: entry-major rows keep the kernel's
// vector path for small groups), all in coeffs' type, which grad (0-d) and weight ([G, 1, 1])
// share. Entry by entry, each over the groups: contiguous in the entry-major layout (a time
// per token).
at::Tensor scaled_rows(const at::Tensor& coeffs, const at::Tensor& grad, double divisor,
                       const at::Tensor& weight) {
  at::Tensor rows = at::empty_like(coeffs);
  const int64_t groups = coeffs.size(0), entries = coeffs.size(2);
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "pred_loss_backward", [&] {
    const scalar_t scale =
        *grad.const_data_ptr<scalar_t>() * static_cast<scalar_t>(2.0 / divisor);
    const scalar_t* c = coeffs.const_data_ptr<scalar_t>();
    scalar_t* r = rows.mutable_data_ptr<scalar_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const int64_t w_stride = weight.defined() ? weight.stride(0) : 0;
    const int64_t c_group = coeffs.stride(0), c_entry = coeffs.stride(2);
    const int64_t r_group = rows.stride(0), r_entry = rows.stride(2);
    at::parallel_for(0, groups, kGroupGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = 0; k < entries; ++k)
        for (int64_t g = begin; g < end; ++g) {
          const scalar_t s = (w ? scale * w[g * w_stride] : scale) * c[g * c_group];
          r[g * r_group + k * r_entry] = c[g * c_group + k * c_entry] * s;
        }
    });
  });
  return rows;
}

}  // namespace

// Named outside an anonymous namespace: the node's name, torch::autograd::CppNode<fastflow::
// PredLoss>, is what grad_fn.name() shows.
struct PredLoss : torch::autograd::Function<PredLoss> {
  // `data`: (x0, x1[, noise]), not tracked (a std::vector is not an input of the node).
  // `weight`: none, or one per group ([G], the coefficients' type).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pred,
                            const std::vector<at::Tensor>& data, const at::Tensor& coeffs,
                            const std::optional<at::Tensor>& weight, double divisor) {
    std::vector<at::Tensor> inputs{pred};
    inputs.insert(inputs.end(), data.begin(), data.end());
    at::Tensor squares = affine_sqnorm_cpu(inputs, coeffs);
    inputs.push_back(coeffs);
    if (weight) {
      squares = squares * *weight;
      inputs.push_back(weight->view({-1, 1, 1}));
    }
    ctx->save_for_backward(inputs);
    ctx->saved_data["divisor"] = divisor;
    ctx->saved_data["weighted"] = weight.has_value();
    return divided(squares.numel() == 1 ? squares : ordered_sum_cpu(squares), divisor);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    std::vector<at::Tensor> inputs = ctx->get_saved_variables();
    at::Tensor weight;  // [G, 1, 1]
    if (ctx->saved_data["weighted"].toBool()) {
      weight = inputs.back();
      inputs.pop_back();
    }
    const at::Tensor coeffs = inputs.back();
    inputs.pop_back();
    const double divisor = ctx->saved_data["divisor"].toDouble();
    at::Tensor grad_pred;
    const int64_t groups = coeffs.size(0);
    if (groups == 0) {   // an empty batch, whose rows the ATen form below cannot reshape
      grad_pred = at::zeros_like(inputs[0]);
    } else if (!at::GradMode::is_enabled() && grads[0].scalar_type() == coeffs.scalar_type() &&
               !at::isBatchedTensor(grads[0])) {
      // By hand on a plain gradient; a batched one (is_grads_batched) has no data to read.
      grad_pred = affine_fresh_cpu(inputs, scaled_rows(coeffs, grads[0], divisor, weight))[0];
    } else {
      // A double backward (or batched gradients): the same map in ATen ops, which autograd
      // differentiates.
      at::Tensor scale = grads[0] * (2.0 / divisor);
      if (weight.defined()) scale = scale * weight;
      const at::Tensor rows = coeffs * (scale * coeffs.narrow(2, 0, 1));
      grad_pred = at::zeros({groups, inputs[0].numel() / groups}, rows.options());
      for (size_t k = 0; k < inputs.size(); ++k)
        grad_pred = grad_pred + rows.select(1, 0).narrow(1, k, 1) * inputs[k].reshape({groups, -1});
      grad_pred = grad_pred.to(inputs[0].scalar_type()).view_as(inputs[0]);
    }
    return {grad_pred, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor pred_loss_cpu(const at::Tensor& pred, const std::vector<at::Tensor>& data,
                         const at::Tensor& coeffs, const std::optional<at::Tensor>& weight,
                         double divisor) {
  // The streams and coeffs are affine_sqnorm_cpu's to check; the weight is this node's: one
  // value per group, in the coefficients' type, which the backward reads it in.
  if (weight) {
    TORCH_CHECK_VALUE(coeffs.dim() == 3 && weight->dim() == 1 &&
                          weight->size(0) == coeffs.size(0),
                      "fastflow pred_loss: expected a weight of shape [", coeffs.size(0),
                      "] (one per group of coeffs), got ", weight->sizes());
    TORCH_CHECK_VALUE(weight->scalar_type() == coeffs.scalar_type() && weight->is_cpu(),
                      "fastflow pred_loss: expected a CPU weight of the coefficients' type ",
                      coeffs.scalar_type(), ", got ", weight->scalar_type(), " on ",
                      weight->device());
  }
  return PredLoss::apply(pred, data, coeffs, weight, divisor);
}

}  // namespace fastflow
