// The per-sample affine kernel family (DESIGN.md section 1).
//
// For K inputs and M outputs of one element count, viewed as [G, N] (G groups, usually the batch):
//
//     out[m][g, i] = sum_k coeffs[g, m, k] * in[k][g, i]
//
// with the sum taken in the order k = 0, 1, ..., K-1 in the math type (fp32, or fp64 when a
// stream is fp64) and no fused multiply-add, so that CPU results equal the eager PyTorch
// expressions bit for bit. The CPU kernel takes each stream in its own float type (a sampler
// keeps its state in fp32 and reads a bf16 model's output in the same pass) and layout
// (on_streams); the other kernels take one type for all, contiguous. affine_dot is the reduction that the backward needs:
//
//     dot[g, m, k] = sum_i a[m][g, i] * b[k][g, i]
//
// computed in a fixed order, so the result is the same bits whatever the thread count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastflow {

// Arity limits of the compiled kernels; the Python layer checks the same numbers. Five inputs
// cover a guided multistage sampler step: state, stage input, two model outputs, accumulator.
constexpr int64_t kMaxInputs = 5;
constexpr int64_t kMaxOutputs = 4;

// How the CPU kernels (affine family, embeddings, noise) split their loops. kGrain: the smallest
// span worth handing to another thread, about where OpenMP's fork-join cost is repaid on two
// cores (larger ranges are split evenly over all threads). kTile: elements per register/L1
// tile inside a task. kLanes: independent accumulators of a sum, which lets the compiler
// vectorise it without reassociating, so that no instruction set changes the result.
constexpr int64_t kGrain = 1 << 14;
constexpr int64_t kTile = 256;
constexpr int kLanes = 8;

void affine_cpu(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                const std::vector<at::Tensor>& outputs);
// The whole of an eager fastflow::affine_out call on CPU tensors (fastflow/_ops.py, _affine_out)
// in one call from Python, whose own steps cost five times the kernel on a small tensor: the
// checks; outputs that share memory with an input written through stand-ins, but the last
// output exactly on top of an input (the kernels read an index of every input before writing
// the last output there); their version counters bumped, as in-place ops do, even when the
// kernels fail part way.
void affine_out_cpu(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                    const std::vector<at::Tensor>& outputs);
// affine_cpu into fresh outputs like inputs[0], all streams of one float type. One call from
// Python: for a small tensor, checks and allocation done in Python cost ten times the kernel.
std::vector<at::Tensor> affine_fresh_cpu(const std::vector<at::Tensor>& inputs,
                                         const at::Tensor& coeffs);
at::Tensor affine_dot_cpu(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                          int64_t groups);
// sum_i (sum_k coeffs[g, 0, k] * in[k][g, i])^2 per group g: the squared norm of one affine
// output, never written out. The reduction of the fused losses.
at::Tensor affine_sqnorm_cpu(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs);
// sum_g weight[g] * affine_sqnorm_cpu([pred, *data], coeffs)[g] / divisor (weight optional),
// differentiable in pred alone: the fused loss's eager training step as a C++ autograd node
// (loss_cpu.cpp).
at::Tensor pred_loss_cpu(const at::Tensor& pred, const std::vector<at::Tensor>& data,
                         const at::Tensor& coeffs, const std::optional<at::Tensor>& weight,
                         double divisor);
// The sum of a 1-D float or double tensor, 0-d in its type, summed in fp64 in the affine
// family's fixed order (affine_dot's chunks and lanes), whatever the thread count and
// instruction set, where ATen's sum splits by threads beyond 32K values: the losses' sum over
// the groups (loss_cpu.cpp, fastflow/losses.py).
at::Tensor ordered_sum_cpu(const at::Tensor& values);

// Calls f(std::integral_constant<int, K>{}, std::integral_constant<int, M>{}) for runtime k, m
// within the arity limits, so that every kernel is compiled with its loops over K and M unrolled.
// Callers validate k and m first (check_affine_args); other values call nothing.
template <typename F, int K = 1, int M = 1>
void dispatch_arity(int64_t k, int64_t m, F&& f) {
  if constexpr (K <= kMaxInputs && M <= kMaxOutputs) {
    if (k == K && m == M) {
      f(std::integral_constant<int, K>{}, std::integral_constant<int, M>{});
    } else if (M < kMaxOutputs) {
      dispatch_arity<F, K, M + 1>(k, m, std::forward<F>(f));
    } else {
      dispatch_arity<F, K + 1, 1>(k, m, std::forward<F>(f));
    }
  }
}

// The instruction set the CPU affine kernels run with, where PyTorch runs its own kernels with
// AVX-512: "avx512_bf16" on CPUs with AVX-512 (F, BW, VL, DQ), AVX512_BF16, AVX2 and F16C, else
// "avx512" on CPUs with AVX-512 (F, BW, VL), AVX2 and F16C; otherwise "avx2" on CPUs with AVX2
// and F16C, else "baseline" (and "baseline" alone where the build has only those kernels). All
// give the same bits; set_cpu_isa switches between the available ones (the tests run each).
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);
// The entry points of one instruction set's kernels (affine_cpu_kernels.h), on checked arguments
// of any layout; affine_cpu.cpp runs those of the chosen one.
struct IsaKernels {
  const char* name;
  void (*affine)(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                 const std::vector<at::Tensor>& outputs, int64_t row, int64_t period,
                 bool may_stream);
  void (*dot)(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, int64_t groups,
              at::Tensor& sums);
  void (*sqnorm)(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs, int64_t row,
                 int64_t period, at::Tensor& sums);
  void (*narrow_floats)(const float* src, int64_t n, at::ScalarType type, void* dst);
  double (*total)(const at::Tensor& values);
};
// n fp32 values rounded to the 16-bit float type `type` (kHalf or kBFloat16) into dst, as c10
// rounds, with the affine kernels' conversions: eight or sixteen values per instruction with
// AVX2 or AVX-512. For the CPU kernels outside this family that write 16-bit outputs.
void narrow_floats(const float* src, int64_t n, at::ScalarType type, void* dst);
// Total output bytes from which the AVX2 and AVX-512 affine kernels write fp32 and fp64 outputs
// into existing tensors (out=, in-place updates) with streaming stores (affine_cpu_kernels.h):
// twice the 32 MB last-level cache of the machines measured, so that outputs an op would find
// in cache are left there.
constexpr int64_t kStreamingMinBytes = int64_t(64) << 20;

// Hint the kernel to back a fresh CPU tensor with transparent huge pages (no-op elsewhere) if it
// holds at least kHugePageMinBytes: below that the faults saved are too few.
void advise_huge_pages(const at::Tensor& t);
constexpr int64_t kHugePageMinBytes = int64_t(4) << 20;
// A fresh tensor like `like`, advised huge pages: contiguous, or with like's strides where
// `keep_layout` (a dense layout, such as batch_period's).
at::Tensor fresh_output(const at::Tensor& like, bool keep_layout);

#ifdef FASTFLOW_WITH_CUDA
void affine_cuda(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                 const std::vector<at::Tensor>& outputs);
#endif

// The float types the kernels stream: fp16, bf16, fp32, fp64 (not the float8 types, which
// at::isFloatingType also counts).
inline bool is_stream_type(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

// Shared argument checks: every kernel entry point validates its tensors so that a bad call
// from Python raises instead of reading out of bounds. `one_dtype` requires a single float type
// for all streams; otherwise each may have its own. The GPU kernels take contiguous streams,
// the CPU ones any layout (on_streams).
void check_affine_args(const std::vector<at::Tensor>& inputs, const at::Tensor& coeffs,
                       const std::vector<at::Tensor>& outputs, c10::DeviceType device,
                       bool one_dtype = true);

// The coefficients as the kernels may read them while they write `outputs`: `coeffs` itself, or a
// copy when it shares memory with an output (a view of one), whose writes would change the
// coefficients of the elements after them.
at::Tensor coefficients_apart(const at::Tensor& coeffs, const std::vector<at::Tensor>& outputs);

// Whether the byte spans of a and b, from first element to the end of the last, intersect
// (fastflow._checks.overlap): none does for an empty tensor.
bool spans_intersect(const at::Tensor& a, const at::Tensor& b);

// Whether fastflow._checks.check_outputs would accept `outputs` as the out= of a public op whose
// reference stream is `ref` and whose tensor arguments are `inputs`, so that it may skip its own
// checks (a microsecond per rule in Python). False for any doubt, which sends the call to those
// checks: tensors the dispatcher must see (fake, subclasses, functorch wrappers) included.
bool outputs_acceptable(const std::vector<at::Tensor>& outputs, const at::Tensor& ref,
                        const std::vector<at::Tensor>& inputs);

// The CPU kernels of affine and affine_sqnorm stream, beside contiguous tensors, tensors made of
// rows of L contiguous elements at one stride apart: a slice of a wider tensor (out[:, :C] of a
// [B, 2C, H, W] buffer: rows of C * H * W elements at stride 2C * H * W) or an input broadcast
// over the batch (one row repeated at stride 0). Streaming them in place saves the copy to
// contiguous memory, which costs more than the pass itself.
//
// row_length gives the row length L that all streams of a call can be read and written in: the
// element count when all are contiguous; 0 when one has no view as rows of a common length,
// when an output's rows would overlap, or when the rows are shorter than kMinRow elements.
// row_stride gives the stride between x's rows of that length.
int64_t row_length(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs);
int64_t row_stride(const at::Tensor& x, int64_t row);
// Shorter rows are copied instead: each piece of a row is a span of its own in the kernels, whose
// setup costs about 300 instructions (callgrind, interpolate), about what a 2 -> 2 map of 64
// fp32 elements takes from memory; at 64 the rows ran 1.5x faster than the copies (4M elements).
constexpr int64_t kMinRow = 64;

// The kernels also stream in place tensors that hold a contiguous tensor's memory with the batch
// (dimension 0) moved inward: x.movedim(0, d).is_contiguous() for some d > 0, such as x.T of a
// [N, B] tensor (the batch innermost) or a [B, T, C] view of a sequence-first [T, B, C] one.
// Memory is then periods of B * inner elements (inner: the product of the sizes after d), one
// per index of the dimensions before d, each holding every sample's `inner` elements: the
// G groups' runs of period / G elements start over in each period (affine_kernel).
// batch_period gives that period for streams all of one shape and strides in such a layout,
// whose `groups` groups each cover whole samples (`ordered`, for sums over each group, whose
// bits depend on the order of their terms: one sample each, whose elements memory holds in
// their order) and whose runs are one element (the columns of x.T) or at least kMinRow; the
// element count, not `ordered`, in any dense layout for one group, or with the batch outermost
// (channels_last: each group's samples one run of memory); 0 otherwise.
int64_t batch_period(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs,
                     int64_t groups, bool ordered);

// kernel(inputs, outputs, row, period) on streams that it can stream as rows of `row` elements,
// in groups whose runs repeat every `period` elements: the call's own where row_length allows
// (period: the element count), their memory as one row where batch_period allows, else
// contiguous copies of the inputs and, for the outputs that are not contiguous, contiguous
// stand-ins, copied into them afterwards. `groups` and `ordered`: as for batch_period.
void on_streams(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs,
                int64_t groups, bool ordered,
                c10::function_ref<void(const std::vector<at::Tensor>&,
                                       const std::vector<at::Tensor>&, int64_t, int64_t)> kernel);

// affine_dot's: a and b (1 to kMaxOutputs and 1 to kMaxInputs tensors) of one float type, element
// count and device, contiguous, in `groups` groups.
void check_dot_args(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                    int64_t groups);

// Whether a kernel would misread one of `tensors` through its data pointer: memory that holds
// other values than the tensor's (the negative or conjugate bit) or none of its own (functorch's
// tensors: the legacy batched ones of batched gradients, or wrappers leaked from a transform
// whose level has ended). Such calls go through the dispatcher, which resolves, unbatches or
// unwraps them (fastflow._ops._misread).
bool misread(const std::vector<at::Tensor>& tensors);

// The floating type the kernels compute in: fp64 when a stream is stored in fp64, else fp32.
at::ScalarType math_type(const std::vector<at::Tensor>& inputs,
                         const std::vector<at::Tensor>& outputs);

}  // namespace fastflow
