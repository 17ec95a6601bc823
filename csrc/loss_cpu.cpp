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
// which this one repeats for its case: dL/dpred = 2 g w_g / divisor * residual, one affine pass.
#include "affine.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

namespace fastflow {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

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
    return squares.sum() / divisor;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    std::vector<at::Tensor> inputs = ctx->get_saved_variables();
    at::Tensor scale = grads[0] * (2.0 / ctx->saved_data["divisor"].toDouble());
    if (ctx->saved_data["weighted"].toBool()) {
      scale = scale * inputs.back();  // [G, 1, 1]
      inputs.pop_back();
    }
    const at::Tensor coeffs = inputs.back();
    inputs.pop_back();
    const at::Tensor rows = coeffs * scale;
    at::Tensor grad_pred;
    if (at::GradMode::is_enabled()) {
      // A double backward: the same map in recorded ATen ops, which autograd differentiates.
      const int64_t groups = coeffs.size(0);
      grad_pred = at::zeros({groups, inputs[0].numel() / groups}, rows.options());
      for (size_t k = 0; k < inputs.size(); ++k)
        grad_pred = grad_pred + rows.select(1, 0).narrow(1, k, 1) * inputs[k].reshape({groups, -1});
      grad_pred = grad_pred.to(inputs[0].scalar_type()).view_as(inputs[0]);
    } else {
      grad_pred = affine_fresh_cpu(inputs, rows)[0];
    }
    return {grad_pred, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor pred_loss_cpu(const at::Tensor& pred, const std::vector<at::Tensor>& data,
                         const at::Tensor& coeffs, const std::optional<at::Tensor>& weight,
                         double divisor) {
  return PredLoss::apply(pred, data, coeffs, weight, divisor);
}

}  // namespace fastflow
