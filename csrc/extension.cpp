// Entry point of fastflow._C. The op schemas, fake kernels and autograd live in
// fastflow/_ops.py; this module only exposes the compiled kernels, which that module calls from
// the dispatcher's CPU and CUDA kernels. Import torch before importing this module.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "affine.h"
#include "embedding.h"
#include "coefficients.h"
#include "noise.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastflow compiled kernels (CPU, and CUDA where built)";
  m.attr("max_inputs") = fastflow::kMaxInputs;
  m.attr("max_outputs") = fastflow::kMaxOutputs;
  m.def("affine_cpu", &fastflow::affine_cpu, "outputs[m] = sum_k coeffs[g, m, k] * inputs[k]");
  m.def("affine_out_cpu", &fastflow::affine_out_cpu,
        "affine_cpu as an eager affine_out call: outputs on inputs staged, versions bumped");
  m.def("outputs_acceptable", &fastflow::outputs_acceptable,
        "whether fastflow._checks.check_outputs would accept these out= tensors");
  m.def("affine_fresh_cpu", &fastflow::affine_fresh_cpu,
        "affine_cpu into fresh outputs like inputs[0] (one float type for all streams)");
  m.def("affine_dot_cpu", &fastflow::affine_dot_cpu, "per-group dot products [G, len(a), len(b)]");
  m.def("affine_sqnorm_cpu", &fastflow::affine_sqnorm_cpu,
        "per-group sum of squares of sum_k coeffs[g, 0, k] * inputs[k]");
  m.def("pred_loss_cpu", &fastflow::pred_loss_cpu,
        "sum of weight * affine_sqnorm_cpu([pred, *data], coeffs) / divisor, differentiable in "
        "pred alone");
  m.def("ordered_sum_cpu", &fastflow::ordered_sum_cpu,
        "sum of a 1-D float tensor in fp64, in an order independent of the thread count");
  m.def("sinusoid_cpu", &fastflow::sinusoid_cpu,
        "out[b] = [sin a, cos a] (or [cos a, sin a]) with a = (t[b] * freqs) * scale");
  m.def("sinusoid_backward_cpu", &fastflow::sinusoid_backward_cpu,
        "(grad_t, grad_freqs) of sinusoid_cpu");
  m.def("gaussian_cpu", &fastflow::gaussian_cpu,
        "out[b] = the sampler's standard normal noise of sample ids[b] at this step");
  m.def("path_coefficients_cpu", &fastflow::path_coefficients_cpu,
        "[G, 2, K] coefficients of a built-in path, as fastflow.paths computes them, or the "
        "velocity loss's [G, 1, 1 + K] residual rows (1, -u_t)");
  m.def("conversion_coefficients_cpu", &fastflow::conversion_coefficients_cpu,
        "[G, 1, 2] rows of fastflow.convert from a path's coefficient matrix, the same bits");
  m.def("coefficient_matrix", &fastflow::coefficient_matrix,
        "[G, outputs, inputs] coefficients from numbers and per-sample tensors, any device");
  m.def("misread", &fastflow::misread,
        "whether a kernel would misread a tensor: negative or conjugate bit, legacy batched");
  m.def("cpu_isa", &fastflow::cpu_isa, "instruction set of the CPU affine kernels");
  m.def("set_cpu_isa", &fastflow::set_cpu_isa,
        "run the CPU affine kernels with 'baseline', 'avx2', 'avx512' or 'avx512_bf16'");
  m.def("advise_huge_pages", &fastflow::advise_huge_pages,
        "ask for transparent huge pages behind a fresh CPU tensor of at least 4 MB");
  m.attr("streaming_store_min_bytes") = fastflow::kStreamingMinBytes;
  m.def("row_length", &fastflow::row_length,
        "the row length the CPU kernels stream these tensors in; 0 when they copy them");
  m.attr("min_row") = fastflow::kMinRow;
  m.def("batch_period", &fastflow::batch_period,
        "the period of the groups when the CPU kernels stream these tensors' memory in order "
        "(the batch moved inward; ordered: for sums over the groups); 0 when they do not");
#ifdef FASTFLOW_WITH_CUDA
  m.attr("cuda_built") = true;
  m.def("affine_cuda", &fastflow::affine_cuda, "outputs[m] = sum_k coeffs[g, m, k] * inputs[k]");
#else
  m.attr("cuda_built") = false;
#endif
}
