"""The dispatcher ops of fastflow: schemas, device kernels, fake kernels and autograd, in one place.

    fastflow::affine(Tensor[] inputs, Tensor coeffs) -> Tensor[]
        outputs[m] = sum_k coeffs[g, m, k] * inputs[k], per group g of the inputs viewed as [G, n]
    fastflow::affine_out(Tensor[] inputs, Tensor coeffs, Tensor(a!)[] out) -> ()
        the same, written into preallocated tensors; here every stream may have its own float
        type (a sampler's fp32 state beside a bf16 model's output), and the last output may be an
        input (updated in place)
    fastflow::affine_dot(Tensor[] a, Tensor[] b, SymInt groups) -> Tensor
        dot[g, m, k] = sum_i a[m][g, i] * b[k][g, i], the reduction of affine's backward; its
        own backward is affine again, so the affine ops differentiate to any order
    fastflow::affine_sqnorm(Tensor[] inputs, Tensor coeffs) -> Tensor
        sq[g] = sum_i r[g, i]^2 with r = affine(inputs, coeffs) (one output), never written:
        the reduction of the fused losses
    fastflow::sinusoid(Tensor t, Tensor freqs, float scale, bool cos_first, SymInt dim,
                       ScalarType dtype) -> Tensor
        out[b] = [sin a, cos a] (or [cos a, sin a]) with a = (t[b] * freqs) * scale, [B, dim],
        dim = 2H or 2H + 1 (a zero last column): every sinusoidal time embedding
    fastflow::sinusoid_backward(Tensor grad, Tensor t, Tensor freqs, float scale, bool cos_first,
                                bool t_grad, bool freqs_grad) -> (Tensor, Tensor)
        its gradients to t and freqs (empty where not asked for), in one pass over grad; not
        differentiable itself: a double backward through it raises NotImplementedError
    fastflow::gaussian_out(Tensor ids, int seed, int step, Tensor(a!) out) -> ()
        out[b] = the sampler's standard normal noise of sample ids[b] at this step, a pure
        function of (seed, ids[b], step, element index) defined in fastflow/_noise.py

Coefficients are [G, M, K] in the math type (fp32, or fp64 when a stream is fp64). The public ops
(interpolation, conversions, losses) compute their coefficients from t in plain PyTorch, so
autograd reaches t, or, when t needs no gradient, with the backend's builders of the same
formulas (`coefficient_builder`); then they call these.

The device kernels are chosen per call by fastflow._backends. They are registered as one
CompositeExplicitAutograd kernel that picks the backend from the device and FASTFLOW_BACKEND.
"""
import collections
import functools

import torch
from torch._functorch.utils import (
    enable_single_level_autograd_function as _single_level_functions_allowed)
from torch.autograd.function import _SingleLevelFunction

from . import _backends
from ._checks import FLOAT_DTYPES, overlap

MAX_INPUTS = 5
MAX_OUTPUTS = 4

_lib = torch.library.Library("fastflow", "DEF")
_lib.define("affine(Tensor[] inputs, Tensor coeffs) -> Tensor[]")
_lib.define("affine_out(Tensor[] inputs, Tensor coeffs, Tensor(a!)[] out) -> ()")
_lib.define("affine_dot(Tensor[] a, Tensor[] b, SymInt groups) -> Tensor")
_lib.define("affine_sqnorm(Tensor[] inputs, Tensor coeffs) -> Tensor")
_lib.define("sinusoid(Tensor t, Tensor freqs, float scale, bool cos_first, SymInt dim, "
            "ScalarType dtype) -> Tensor")
_lib.define("sinusoid_backward(Tensor grad, Tensor t, Tensor freqs, float scale, bool cos_first, "
            "bool t_grad, bool freqs_grad) -> (Tensor, Tensor)")
_lib.define("gaussian_out(Tensor ids, int seed, int step, Tensor(a!) out) -> ()")


def math_dtype(*dtypes):
    """The type the kernels compute in for streams stored as `dtypes`: fp64 if one is fp64,
    else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_streams(tensors, what, count_limit, ref, one_dtype=True):
    if not 1 <= len(tensors) <= count_limit:
        raise ValueError(f"fastflow affine: expected 1 to {count_limit} {what}, got {len(tensors)}")
    for x in tensors:
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"fastflow affine: {what} must be floating point, got {x.dtype}")
        if (one_dtype and x.dtype != ref.dtype) or x.numel() != ref.numel() or x.device != ref.device:
            shared = "dtype, element count and device" if one_dtype else "element count and device"
            raise ValueError(f"fastflow affine: {what} must share {shared}; got "
                             f"{x.dtype}/{x.numel()}/{x.device} beside "
                             f"{ref.dtype}/{ref.numel()}/{ref.device}")


def _check_affine_args(inputs, coeffs, num_outputs, outputs=(), one_dtype=True):
    """The checks of csrc/affine_checks.cpp, for every backend: kernels index the coefficients
    by (group, output, input) and would read out of bounds on a mismatch. With one_dtype=False
    (affine_out) every stream may have its own float type."""
    ref = inputs[0] if inputs else None
    _check_streams(inputs, "inputs", MAX_INPUTS, ref, one_dtype)
    if outputs:
        _check_streams(outputs, "outputs", MAX_OUTPUTS, ref, one_dtype)
    elif not 1 <= num_outputs <= MAX_OUTPUTS:
        raise ValueError(f"fastflow affine: expected 1 to {MAX_OUTPUTS} outputs, got {num_outputs}")
    if coeffs.dim() != 3 or tuple(coeffs.shape[1:]) != (num_outputs, len(inputs)):
        raise ValueError(f"fastflow affine: coeffs must have shape [G, {num_outputs}, "
                         f"{len(inputs)}], got {list(coeffs.shape)}")
    math = math_dtype(*(x.dtype for x in (*inputs, *outputs)))
    if coeffs.dtype != math or coeffs.device != ref.device:
        raise ValueError(f"fastflow affine: coeffs must be {math} on {ref.device}, got "
                         f"{coeffs.dtype} on {coeffs.device}")
    _check_groups(ref, coeffs.shape[0])


def _check_groups(ref, groups):
    if groups < 0 or (groups == 0 and ref.numel() != 0) or (groups > 0 and ref.numel() % groups):
        raise ValueError(f"fastflow affine: {ref.numel()} elements do not split into {groups} "
                         f"groups")


def coefficient_matrix(entries, outputs, inputs, groups=None, dtype=None, device=None,
                       backend=None):
    """[G, outputs, inputs] coefficients from their entries, row by row: [G] tensors; or, with
    `groups` (G), `dtype` and `device` (a torch.device) given, any mix of numbers and tensors
    of G values (any shape) or of one, converted (a number is rounded to `dtype`, as PyTorch
    rounds a scalar operand). `backend`: the call's direct backend (see `direct_backend`), when
    its caller decided it.

    Stored entry-major, as a view of one [outputs * inputs, G] stack: stacking on the last
    dimension instead is a strided copy that costs ATen about 15 ns per entry on CPU, more than
    the kernel itself for small tensors. The CPU kernels read any strides; the GPU ones get the
    coefficients packed (`_packed_for`). A mix is assembled by the extension in one call where
    it may run (csrc/coefficient_matrix.cpp; not for the reference backend, which is plain
    PyTorch): from Python each entry would cost a few tensor ops of several microseconds each."""
    if len(entries) != outputs * inputs:
        raise ValueError(f"fastflow coefficient_matrix: expected {outputs} x {inputs} entries, "
                         f"got {len(entries)}")
    if groups is not None:
        if backend is None and _nobody_intercepts(
                [c for c in entries if isinstance(c, torch.Tensor)], device):
            # Gradients or not: the extension's ATen ops record them.
            backend = _backends.select(device)
        native = _backends.extension()[0] if backend not in (None, "reference") else None
        if native is not None:
            return native.coefficient_matrix(entries, outputs, inputs, groups, dtype, device)
        entries = [_column(c, groups, dtype, device) for c in entries]
    return torch.stack(entries).view(outputs, inputs, -1).permute(2, 0, 1)


def _column(entry, groups, dtype, device):
    """One entry of coefficient_matrix as a [groups] tensor."""
    if not isinstance(entry, torch.Tensor):
        return torch.full((groups,), entry, dtype=dtype, device=device)
    if entry.numel() not in (groups, 1):
        raise ValueError(f"fastflow coefficient_matrix: expected {groups} values or one, got "
                         f"{entry.numel()}")
    return entry.to(device=device, dtype=dtype).reshape(-1).expand(groups)


def _packed_for(backend, coeffs):
    return coeffs if backend == "cpu" else coeffs.contiguous()


def flat_layout(tensors, groups):
    """Whether the kernels may stream `tensors` in place though they are not contiguous: all
    share one shape and one dense layout with the batch outermost (channels_last, say), so each
    sample is one run of memory, its elements in the same order in every tensor, and each of
    the `groups` groups of coefficients covers whole samples. Per-sample coefficients then
    apply alike in any order of a sample's elements."""
    x = tensors[0] if tensors else None
    if (x is None or x.dim() < 2 or x.numel() == 0 or groups < 1 or x.shape[0] % groups
            or not _shared_dense_layout(tensors)):
        return False
    return x.shape[0] == 1 or x.stride(0) == x.numel() // x.shape[0]


def _shared_dense_layout(tensors):
    """Whether `tensors` share one shape and one dense layout other than the contiguous one (a
    permutation of a contiguous tensor's memory: channels_last, x.T). Fresh outputs then take it,
    as PyTorch's elementwise ops' do, on every backend (csrc/affine_cpu.cpp repeats the rule)."""
    x = tensors[0]
    if x.is_contiguous() or any(t.shape != x.shape or t.stride() != x.stride()
                                for t in tensors[1:]):
        return False
    run = 1   # dense: the strides, fastest first, are the running products of the sizes
    for stride, size in sorted((st, n) for st, n in zip(x.stride(), x.shape) if n != 1):
        if stride != run:
            return False
        run *= size
    return True


def flat_view(x):
    """The memory of x (in a flat_layout) as a contiguous [B, n] view."""
    n = x.numel() // x.shape[0]
    return x.as_strided((x.shape[0], n), (n, 1))


def _streamed(tensors, groups, kernels=None):
    """The tensors as `kernels` stream them: views of their own memory in a flat_layout, else
    as they are for kernels that take any layout, else contiguous (copies of the others)."""
    if flat_layout(tensors, groups):
        return [flat_view(x) for x in tensors]
    if kernels is not None and kernels.any_layout:
        return tensors
    return [x.contiguous() for x in tensors]


def _launch(name, inputs, coeffs, outputs):
    """Run backend `name`'s kernel on contiguous inputs, writing contiguous `outputs`: the
    backends without affine_fresh and affine_out (_Kernels), which the CPU backend's take the
    place of with any layout."""
    if name == "cuda" and len({x.dtype for x in (*inputs, *outputs)}) > 1:
        name = _backends.fallback_for_mixed_dtypes(inputs[0].device)
    inputs = [x.contiguous() for x in inputs]
    _backends.kernels(name).affine(inputs, _packed_for(name, coeffs), outputs)


def _empty_output(x, shape=None, dtype=None, layout_of_x=False):
    """A fresh tensor like `x` (or of `shape` and `dtype` on x's device), contiguous or with
    x's strides; large CPU ones get transparent huge pages (see csrc/huge_pages.cpp)."""
    if layout_of_x:
        out = torch.empty_like(x)
    else:
        out = torch.empty(x.shape if shape is None else shape, dtype=dtype or x.dtype,
                          device=x.device)
    if out.device.type == "cpu":
        ext, _ = _backends.extension()
        if ext is not None:
            ext.advise_huge_pages(out)
    return out


def _backend_of(streams):
    """The backend for a call on `streams`; "reference" for none, whose checks then raise."""
    return _backends.select(streams[0].device) if streams else "reference"


def _affine(inputs, coeffs, name=None):
    name = name or _backend_of(inputs)
    kernels = _backends.kernels(name)
    # Inputs in a flat_layout (channels_last, say) are read in place and the outputs get their
    # layout, as PyTorch's elementwise ops give: a contiguous copy would cost more than the pass.
    # Other dense layouts the outputs take too (the C++ kernels stream some in place, x.T).
    if kernels.affine_fresh is not None:
        # One call checks (as _check_affine_args does), allocates and runs, on inputs of any
        # layout (_Kernels.any_layout): on a small tensor the same steps in Python take ten
        # times the kernel.
        return kernels.affine_fresh(inputs, coeffs)
    flat = coeffs.dim() == 3 and flat_layout(inputs, coeffs.shape[0])
    _check_affine_args(inputs, coeffs, coeffs.shape[1] if coeffs.dim() == 3 else 0)
    keep = flat or _shared_dense_layout(inputs)
    outputs = [_empty_output(inputs[0], layout_of_x=keep) for _ in range(coeffs.shape[1])]
    if flat:
        _launch(name, [flat_view(x) for x in inputs], coeffs, [flat_view(o) for o in outputs])
    elif keep:   # through contiguous stand-ins
        _affine_out(inputs, coeffs, outputs, name)
    else:
        _launch(name, inputs, coeffs, outputs)
    return outputs


def _affine_out(inputs, coeffs, out, name=None):
    name = name or _backend_of(inputs)
    kernels = _backends.kernels(name)
    if kernels.affine_out is not None:   # all of the steps below in one call
        return kernels.affine_out(inputs, coeffs, out)
    _check_affine_args(inputs, coeffs, len(out), out, one_dtype=False)
    if not torch.is_inference_mode_enabled() and any(o.is_inference() for o in out):
        raise RuntimeError(_INFERENCE_OUTPUT)   # as csrc/affine_cpu.cpp, before writing
    if any(overlap(coeffs, o) for o in out):   # csrc's coefficients_apart
        coeffs = coeffs.clone()
    if coeffs.dim() == 3 and flat_layout([*inputs, *out], coeffs.shape[0]):
        inputs, out = [flat_view(x) for x in inputs], [flat_view(o) for o in out]
    staged = [o if _writable_in_place(o, inputs, m == len(out) - 1)
              else torch.empty_like(o, memory_format=torch.contiguous_format)
              for m, o in enumerate(out)]
    _check_separate(out)
    try:
        _launch(name, inputs, coeffs, staged)
        for o, buf in zip(out, staged):
            if buf is not o:
                o.copy_(buf)
    finally:   # even a failed call may have written some of them
        _written(out)


_INFERENCE_OUTPUT = ("fastflow affine: an output is an inference tensor (made under "
                     "torch.inference_mode), which cannot be written outside inference mode")


def _check_separate(outputs):
    """csrc/affine_checks.cpp's check that no two outputs share memory (their byte spans, as
    _checks.check_outputs compares them): written one after another, one would overwrite the
    other."""
    for i, y in enumerate(outputs):
        for j in range(i):
            if overlap(y, outputs[j]):
                raise ValueError(f"fastflow affine: outputs {j} and {i} share memory (their byte "
                                 f"spans intersect); expected separate tensors")


def _written(tensors):
    """Bump the version counters of tensors a kernel wrote in place, as PyTorch's in-place ops
    do: autograd then refuses a backward that saved one of them before the write, instead of
    reading the new values as if they were the old."""
    for x in tensors:
        if not x.is_inference():
            _increment_version(x)


def _writable_in_place(out, inputs, last):
    """Whether the kernels can write `out` directly: if contiguous. They read every input at an
    index before writing the last output there (earlier outputs may be written before the
    inputs are read again for the next), so an output that shares memory with an input is safe
    as the last output, exactly on top of it (same start, type and layout). Memory is compared
    by address, not storage: two storages may share it (numpy views). csrc/affine_cpu.cpp
    repeats the rule for the CPU backend's affine_out."""
    if not out.is_contiguous():
        return False
    for x in inputs:
        if overlap(x, out) and not (last and x.data_ptr() == out.data_ptr()
                                     and x.dtype == out.dtype and _same_layout(x, out)):
            return False
    return True


def _same_layout(a, b):
    """Whether every element of a lies at the same offset from its start as the same element
    (in row-major order) of b."""
    return (a.is_contiguous() and b.is_contiguous()) or (a.shape == b.shape
                                                          and a.stride() == b.stride())


def _check_dot_args(a, b, groups):
    _check_streams(a, "dot operands", MAX_OUTPUTS, a[0] if a else None)
    _check_streams(b, "dot operands", MAX_INPUTS, a[0])
    _check_groups(a[0], groups)


def _affine_dot(a, b, groups):
    kernels = _backends.kernels(_backend_of(a))
    if not kernels.checks_args:
        _check_dot_args(a, b, groups)
    streams = _streamed([*a, *b], groups)
    return kernels.affine_dot(streams[:len(a)], streams[len(a):], groups)


def _affine_sqnorm(inputs, coeffs, name=None):
    name = name or _backend_of(inputs)
    kernels = _backends.kernels(name)
    if not kernels.checks_args:
        _check_affine_args(inputs, coeffs, 1)
    groups = coeffs.shape[0] if coeffs.dim() == 3 else 0
    return kernels.affine_sqnorm(_streamed(inputs, groups, kernels), _packed_for(name, coeffs))


def _check_sinusoid_args(t, freqs, dim, dtype):
    """The checks of csrc/embedding_cpu.cpp, for every backend."""
    if t.dim() != 1 or t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"fastflow sinusoid: t must be a 1-D float32 or float64 tensor, got "
                         f"{t.dtype} of shape {list(t.shape)}")
    if freqs.dim() != 1 or freqs.dtype != t.dtype or freqs.device != t.device:
        raise ValueError(f"fastflow sinusoid: freqs must be 1-D {t.dtype} on {t.device}, got "
                         f"{freqs.dtype} of shape {list(freqs.shape)} on {freqs.device}")
    half = freqs.shape[0]
    if dim not in (2 * half, 2 * half + 1):
        raise ValueError(f"fastflow sinusoid: dim must be {2 * half} or {2 * half + 1} for "
                         f"{half} frequencies, got {dim}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"fastflow sinusoid: dtype must be floating point, got {dtype}")


def _sinusoid(t, freqs, scale, cos_first, dim, dtype):
    _check_sinusoid_args(t, freqs, dim, dtype)
    out = _empty_output(t, (t.shape[0], dim), dtype)
    kernels = _backends.kernels(_backends.select(t.device))
    kernels.sinusoid(t.contiguous(), freqs.contiguous(), scale, cos_first, out)
    return out


def _check_sinusoid_backward_args(grad, t, freqs):
    _check_sinusoid_args(t, freqs, grad.shape[-1] if grad.dim() == 2 else -1, grad.dtype)
    if grad.shape[0] != t.shape[0] or grad.device != t.device:
        raise ValueError(f"fastflow sinusoid: grad must have {t.shape[0]} rows on {t.device}, got "
                         f"{list(grad.shape)} on {grad.device}")


def _sinusoid_backward(grad, t, freqs, scale, cos_first, t_grad, freqs_grad):
    _check_sinusoid_backward_args(grad, t, freqs)
    kernels = _backends.kernels(_backends.select(t.device))
    return kernels.sinusoid_backward(grad.contiguous(), t.contiguous(), freqs.contiguous(), scale,
                                     cos_first, t_grad, freqs_grad)


def _check_gaussian_seed(seed):
    """Checked before any kernel: pybind would turn a seed beyond int64 into a TypeError."""
    if not -2**63 <= seed < 2**63:
        raise ValueError(f"fastflow gaussian: seed must be in [-2**63, 2**63) (a 64-bit two's "
                         f"complement), got {seed}")


def _check_gaussian_args(ids, out):
    """The checks of csrc/noise_cpu.cpp, for every backend."""
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise ValueError(f"fastflow gaussian: ids must be a 1-D int64 tensor, got {ids.dtype} of "
                         f"shape {list(ids.shape)}")
    if out.dtype not in FLOAT_DTYPES or out.dim() < 1 or out.shape[0] != ids.shape[0]:
        raise ValueError(f"fastflow gaussian: out must be a floating [B, ...] tensor with B = "
                         f"{ids.shape[0]} (one row per id), got {out.dtype} of shape "
                         f"{list(out.shape)}")
    if ids.device != out.device:
        raise ValueError(f"fastflow gaussian: ids must be on {out.device}, got {ids.device}")
    if out.shape[0] and out.numel() // out.shape[0] >= 2**31:
        raise ValueError(f"fastflow gaussian: a sample may have at most 2^31 - 1 elements, got "
                         f"{out.numel() // out.shape[0]}")


def _gaussian_out(ids, seed, step, out):
    _check_gaussian_seed(seed)
    kernels = _backends.kernels(_backends.select(out.device))
    if not kernels.checks_args:
        _check_gaussian_args(ids, out)
    # The noise is defined on each sample's elements in row-major order: fill a contiguous
    # buffer for any other layout.
    staged = out if out.is_contiguous() else torch.empty_like(
        out, memory_format=torch.contiguous_format)
    kernels.gaussian(ids.contiguous(), seed, step, staged)
    if staged is not out:
        out.copy_(staged)
    _written([out])


# Each op's kernel: registered for every device, and called directly by `_call` when the
# dispatcher would add nothing.
_KERNELS = {"affine": _affine, "affine_out": _affine_out, "affine_dot": _affine_dot,
            "affine_sqnorm": _affine_sqnorm, "sinusoid": _sinusoid,
            "sinusoid_backward": _sinusoid_backward, "gaussian_out": _gaussian_out}


def _without_forward_ad(name, kernel):
    """`kernel` (or a fake kernel, which torch.compile runs while it traces a jvp or jacfwd) as
    the dispatcher calls it, refusing forward-mode AD: torch.library has no forward-mode rule to
    register, so a tangent would be dropped silently (zeros). The public functions never bring
    one here: under forward AD they run the ops' PyTorch formulas (`transforming`). The
    sampler's noise, which nothing differentiates, goes as it is."""
    if name == "gaussian_out":
        return kernel

    def kernel_outside_forward_ad(*args, **kwargs):
        if _forward_ad._current_level >= 0:
            raise RuntimeError(
                f"torch.ops.fastflow.{name} has no forward-mode derivative (torch.func.jvp, "
                f"jacfwd, torch.autograd.forward_ad); call fastflow's public functions instead "
                f"(fastflow.interpolate, flow_matching_loss, convert, timestep_embedding, ...), "
                f"which compute it with PyTorch's operators there")
        return kernel(*args, **kwargs)
    return kernel_outside_forward_ad


for _name, _kernel in _KERNELS.items():
    _lib.impl(_name, _without_forward_ad(_name, _kernel), "CompositeExplicitAutograd")


def _affine_fake(inputs, coeffs):
    _check_affine_args(inputs, coeffs, coeffs.shape[1] if coeffs.dim() == 3 else 0)
    x = inputs[0]
    if _shared_dense_layout(inputs):   # as _affine: the inputs' layout
        return [torch.empty_like(x) for _ in range(coeffs.shape[1])]
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(coeffs.shape[1])]


def _affine_out_fake(inputs, coeffs, out):
    _check_affine_args(inputs, coeffs, len(out), out, one_dtype=False)


def _affine_dot_fake(a, b, groups):
    _check_dot_args(a, b, groups)
    dtype = math_dtype(*(x.dtype for x in (*a, *b)))
    return a[0].new_empty((groups, len(a), len(b)), dtype=dtype)


def _affine_sqnorm_fake(inputs, coeffs):
    _check_affine_args(inputs, coeffs, 1)
    return coeffs.new_empty((coeffs.shape[0],))


def _gaussian_out_fake(ids, seed, step, out):
    _check_gaussian_seed(seed)
    _check_gaussian_args(ids, out)


def _sinusoid_fake(t, freqs, scale, cos_first, dim, dtype):
    _check_sinusoid_args(t, freqs, dim, dtype)
    return t.new_empty((t.shape[0], dim), dtype=dtype)


def _sinusoid_backward_fake(grad, t, freqs, scale, cos_first, t_grad, freqs_grad):
    _check_sinusoid_backward_args(grad, t, freqs)
    return t.new_empty((t.shape[0] if t_grad else 0,)), freqs.new_empty(
        (freqs.shape[0] if freqs_grad else 0,))


_FAKES = {"affine": _affine_fake, "affine_out": _affine_out_fake, "affine_dot": _affine_dot_fake,
          "affine_sqnorm": _affine_sqnorm_fake, "gaussian_out": _gaussian_out_fake,
          "sinusoid": _sinusoid_fake, "sinusoid_backward": _sinusoid_backward_fake}
for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"fastflow::{_name}")(_without_forward_ad(_name, _fake))


def _sinusoid_setup_context(ctx, inputs, output):
    t, freqs, scale, cos_first, _, _ = inputs
    ctx.scale, ctx.cos_first = scale, cos_first
    ctx.t_grad, ctx.freqs_grad = t.requires_grad, freqs.requires_grad
    ctx.save_for_backward(t, freqs)


def _sinusoid_grad(ctx, grad):
    t, freqs = ctx.saved_tensors
    t_grad, freqs_grad = ctx.t_grad, ctx.freqs_grad
    grad_t, grad_freqs = sinusoid_backward(
        grad, t, freqs, ctx.scale, ctx.cos_first, t_grad, freqs_grad)
    return (grad_t if t_grad else None), (grad_freqs if freqs_grad else None), None, None, None, None


def _sinusoid_double_backward(ctx, grad_t, grad_freqs):
    # Without a formula PyTorch would only warn and treat the kernels' gradients as constants:
    # every second derivative through an embedding would silently come back zero.
    raise NotImplementedError(
        "double backward through fastflow's sinusoidal embeddings is not supported "
        "(fastflow::sinusoid_backward has no derivative); for higher-order gradients in t or "
        "the frequencies, compute the embedding with plain PyTorch ops, such as "
        "fastflow.reference.timestep_embedding or fastflow.reference.fourier_embedding")


torch.library.register_autograd("fastflow::sinusoid_backward", _sinusoid_double_backward)


def take(x, dim, indices):
    """x at `indices` (increasing) along dim: a view when they are a run, as they usually are.
    Never an index tensor: one made from a list would be copied from the host, a sync on GPUs."""
    if indices[-1] - indices[0] + 1 == len(indices):
        return x.narrow(dim, indices[0], len(indices))
    return torch.cat([x.narrow(dim, i, 1) for i in indices], dim)


def _affine_setup_context(ctx, inputs, output):
    xs, coeffs = inputs
    ctx.input_needs_grad = [x.requires_grad for x in xs]
    ctx.coeffs_needs_grad = coeffs.requires_grad
    # The inputs are needed only for the gradient of the coefficients.
    ctx.save_for_backward(coeffs, *(xs if coeffs.requires_grad else ()))
    ctx.set_materialize_grads(False)


def _affine_backward(ctx, grads):
    """Again affine (grad_in[k] = sum_m C[m, k] grad_out[m]) plus per-sample dot products
    (grad_C[m, k] = <grad_out[m], in[k]>). Outputs that got no gradient are skipped."""
    coeffs, *xs = ctx.saved_tensors
    grad_inputs = [None] * len(ctx.input_needs_grad)
    present = [m for m, g in enumerate(grads) if g is not None]
    if not present:
        return grad_inputs, None
    gs = [grads[m] for m in present]
    grad_inputs = _mixed(gs, take(coeffs, 1, present).transpose(1, 2), ctx.input_needs_grad)
    grad_coeffs = None
    if ctx.coeffs_needs_grad:
        dots = affine_dot(gs, xs, coeffs.shape[0])
        if len(present) == len(grads):
            grad_coeffs = dots
        else:   # out of place: batched gradients (is_grads_batched) cannot be copied into zeros
            zeros = coeffs.new_zeros(coeffs.shape[0], coeffs.shape[2])
            grad_coeffs = torch.stack([dots[:, present.index(m)] if m in present else zeros
                                       for m in range(len(grads))], dim=1)
    return grad_inputs, grad_coeffs


def _dot_setup_context(ctx, inputs, output):
    a, b, _ = inputs
    ctx.a_needs_grad = [x.requires_grad for x in a]
    ctx.b_needs_grad = [x.requires_grad for x in b]
    ctx.num_a = len(a)
    # Each side's gradient is the other side mixed: keep only what a wanted gradient reads.
    ctx.save_for_backward(*(a if any(ctx.b_needs_grad) else ()),
                          *(b if any(ctx.a_needs_grad) else ()))


def _dot_backward(ctx, grad):
    """Affine again, so differentiable again: with dot[g, m, k] = <a[m], b[k]> per group,
    grad_a[m] = sum_k grad[g, m, k] b[k] and grad_b[k] = sum_m grad[g, m, k] a[m]. grad is
    [G, M, K] in the math type of the streams (autograd casts it to the output's type), which
    is what affine takes as coefficients."""
    saved = ctx.saved_tensors
    a = saved[:ctx.num_a] if any(ctx.b_needs_grad) else ()
    b = saved[len(a):]
    return (_mixed(b, grad, ctx.a_needs_grad), _mixed(a, grad.transpose(1, 2), ctx.b_needs_grad),
            None)


def _mixed(streams, coeffs, needed):
    """affine(streams, coeffs) for the outputs that are `needed` (None for the others), at most
    MAX_OUTPUTS per call: a dot's b side, an affine's or a squared norm's inputs may be
    MAX_INPUTS streams that all need a gradient."""
    out = [None] * len(needed)
    wanted = [m for m, n in enumerate(needed) if n]
    for start in range(0, len(wanted), MAX_OUTPUTS):
        rows = wanted[start:start + MAX_OUTPUTS]
        for m, x in zip(rows, affine(streams, take(coeffs, 1, rows))):
            out[m] = x
    return out


def _sqnorm_setup_context(ctx, inputs, output):
    xs, coeffs = inputs
    ctx.input_needs_grad = [x.requires_grad for x in xs]
    ctx.coeffs_needs_grad = coeffs.requires_grad
    ctx.save_for_backward(coeffs, *xs)


def _sqnorm_backward(ctx, grad):
    coeffs, *xs = ctx.saved_tensors
    return sqnorm_gradients(coeffs, xs, grad[:, None], ctx.input_needs_grad,
                            ctx.coeffs_needs_grad)


def sqnorm_gradients(coeffs, xs, grad, input_needs_grad, coeffs_needs_grad):
    """The gradients of sq = affine_sqnorm(xs, coeffs) to the inputs that need them and to the
    coefficients, for grad = dL/dsq shaped [G, 1] (or [], the same for every group). With
    r = sum_j c_j x_j and L = g * sum_i r_i^2 per group: dL/dx_k = 2 g c_k r = sum_j
    (c_k 2 g c_j) x_j, again affine, and dL/dc_k = 2 g <r, x_k> = sum_j 2 g c_j <x_j, x_k>, from
    the inputs' Gram matrix."""
    row = coeffs[:, 0]                                    # [G, K]
    scaled = (2 * grad.to(coeffs.dtype)) * row            # [G, K]: 2 g c_j
    grad_inputs = _mixed(xs, row[:, :, None] * scaled[:, None, :], input_needs_grad)  # [G, K, K]
    grad_coeffs = None
    if coeffs_needs_grad:
        if xs[0].numel() == 0:
            # Groups without elements: a mean's g is then inf and the Gram matrix 0, whose
            # product would be NaN where the sum over no elements is 0.
            grad_coeffs = torch.zeros_like(coeffs)
        else:
            gram = affine_dot(xs, xs, coeffs.shape[0])  # [G, K, K]
            # Elementwise, not einsum: under autocast a matrix product would run in 16 bits.
            grad_coeffs = (gram * scaled[:, :, None]).sum(1)[:, None, :]
    return grad_inputs, grad_coeffs


# vmap: the op on the vmapped dimension folded into the groups. V vmapped samples of G groups
# each are V * G groups of the same size, so one call of the kernel serves them all (an
# ensemble over stack_module_state, per-example losses), where the plain PyTorch formulas take
# many passes (interpolate of [8, 64, 4096] under vmap: 7.7 ms against the kernel's 1.1 ms).
# Only the functional ops: vmap of an in-place write (out=, the sampler) stays refused.

def _batch_first(x, dim, size):
    """x with the vmapped dimension first: moved there, or repeated (a stride-0 view) when x
    is not vmapped."""
    return x.expand(size, *x.shape) if dim is None else x.movedim(dim, 0)


def _folded(xs, coeffs, in_dims, size):
    """Streams [V, ...] and coefficients [V * G, M, K] (group v * G + g is group g of sample v),
    and G."""
    xs_dims, coeffs_dim = in_dims
    xs = [_batch_first(x, d, size) for x, d in zip(xs, xs_dims)]
    coeffs = _batch_first(coeffs, coeffs_dim, size)
    groups = coeffs.shape[1]
    return xs, coeffs.reshape(size * groups, *coeffs.shape[2:]), groups


def _affine_vmap(info, in_dims, inputs, coeffs):
    xs, coeffs, _ = _folded(inputs, coeffs, in_dims, info.batch_size)
    outputs = affine(xs, coeffs)
    return outputs, [0] * len(outputs)


def _affine_sqnorm_vmap(info, in_dims, inputs, coeffs):
    xs, coeffs, groups = _folded(inputs, coeffs, in_dims, info.batch_size)
    return affine_sqnorm(xs, coeffs).view(info.batch_size, groups), 0


def _affine_dot_vmap(info, in_dims, a, b, groups):
    (a_dims, b_dims, _), size = in_dims, info.batch_size
    dots = affine_dot([_batch_first(x, d, size) for x, d in zip(a, a_dims)],
                      [_batch_first(x, d, size) for x, d in zip(b, b_dims)], size * groups)
    return dots.view(size, groups, *dots.shape[1:]), 0


def _sinusoid_vmap(info, in_dims, t, freqs, scale, cos_first, dim, dtype):
    t_dim, freqs_dim, size = *in_dims[:2], info.batch_size
    t = _batch_first(t, t_dim, size)
    if freqs_dim is None:   # the V * B times in one call
        out = sinusoid(t.reshape(-1), freqs, scale, cos_first, dim, dtype)
        return out.view(size, t.shape[1], dim), 0
    # Frequencies of each sample's own (an ensemble's learned Fourier features): a call each.
    freqs = freqs.movedim(freqs_dim, 0)
    return torch.stack([sinusoid(t[v], freqs[v], scale, cos_first, dim, dtype)
                        for v in range(size)]), 0


_VMAP_RULES = {"affine": _affine_vmap, "affine_sqnorm": _affine_sqnorm_vmap,
               "affine_dot": _affine_dot_vmap, "sinusoid": _sinusoid_vmap}


def _batching_kernel(name):
    """Op `name`'s kernel for the dispatcher's FuncTorchBatched key: its vmap rule, through
    `_vmapped` (torch.library.register_vmap's kernel flattens every call's arguments into
    pytrees, a third of a small per-sample gradient's time)."""
    def batching_kernel(*args):
        return _vmapped(name, _current_interpreter(), args, dispatched=True)
    return batching_kernel


for _name in _VMAP_RULES:
    _lib.impl(_name, _batching_kernel(_name), "FuncTorchBatched")

# (setup_context, backward) of the differentiable ops, in torch.library.register_autograd's
# signatures, which `_autograd_function` applies.
_AUTOGRAD = {"affine": (_affine_setup_context, _affine_backward),
             "affine_dot": (_dot_setup_context, _dot_backward),
             "affine_sqnorm": (_sqnorm_setup_context, _sqnorm_backward),
             "sinusoid": (_sinusoid_setup_context, _sinusoid_grad)}


def _autograd_function(name, route):
    """Op `name`'s autograd.Function (setup_context style). Its forward, by `route`: "direct",
    the op's kernel itself (for _call, which found that nothing but autograd must see the call,
    and skips the dispatcher's crossings into Python kernels); "grad", the op below the
    innermost grad transform (`_grad_lowered`, for _call under eager grads and vmaps);
    "dispatcher", the op below autograd (the dispatcher's Autograd kernel, `_autograd_kernel`).
    autograd.Function tracks only tensors passed directly, so list arguments travel expanded
    (`_flatten`), their lengths in `spec`."""
    setup_context, backward = _AUTOGRAD[name]
    op = getattr(torch.ops.fastflow, name).default

    def forward(spec, *flat):
        args = _unflatten(spec, flat)
        if route == "direct":
            out = _KERNELS[name](*args)
        else:
            # A Function's forward runs with gradients off, which would reach the transforms
            # below (the outer grad of grad of grad), as functorch's own single-level Functions
            # know: on again, for them; this level records nothing below autograd.
            with torch.enable_grad():
                if route == "grad":
                    out = _grad_lowered(name, _current_interpreter(), args)
                else:
                    with torch._C._AutoDispatchBelowAutograd():
                        out = op(*args)
        return tuple(out) if isinstance(out, list) else out   # a Function returns tensors

    def setup(ctx, inputs, output):
        spec, *flat = inputs
        ctx.listed = isinstance(output, tuple)
        setup_context(ctx, _unflatten(spec, flat), list(output) if ctx.listed else output)

    def backward_flat(ctx, *grads):
        grads = backward(ctx, list(grads) if ctx.listed else grads[0])
        return (None, *_flatten(grads if isinstance(grads, tuple) else (grads,))[1])

    # A single-level Function: applied by C++ directly, where torch.autograd.Function.apply
    # binds default arguments through inspect.signature first (about 10 us a call); the
    # dispatcher's kernel applies it as autograd does outside transforms (_autograd_kernel),
    # _call with no transform active, or at the innermost grad transform's level.
    suffix = "" if route == "dispatcher" else f"_{route}"
    return type(f"fastflow_{name}{suffix}", (_SingleLevelFunction,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(backward_flat)})


_DIRECT_FUNCTIONS = {name: _autograd_function(name, "direct") for name in _AUTOGRAD}
_GRAD_FUNCTIONS = {name: _autograd_function(name, "grad") for name in _AUTOGRAD}


def _autograd_kernel(name):
    """Op `name`'s kernel for the dispatcher's Autograd key: what torch.library.register_autograd
    registers, except under torch.func's grad transforms (grad, vjp, jacrev, met by
    torch.compile too while it traces a function applying them), where register_autograd's
    Function raises "must override the setup_context staticmethod" (pytorch/pytorch#168393).
    Here the Function is applied as autograd applies it outside transforms: a grad transform
    has already made the kernel's inputs tensors that record the gradient of its level, as it
    does for PyTorch's own operators, and the forward below autograd meets the transforms
    beneath (a vmap's rule: per-sample gradients)."""
    op = getattr(torch.ops.fastflow, name).default
    function = _autograd_function(name, "dispatcher")

    def autograd_kernel(*args):
        spec, flat = _flatten(args)
        if not (torch.is_grad_enabled() and any(
                x.requires_grad for x in flat if isinstance(x, torch.Tensor))):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)
        with _single_level_functions_allowed():
            out = function.apply(spec, *flat)
        return list(out) if isinstance(out, tuple) else out
    return autograd_kernel


for _name in _AUTOGRAD:
    _lib.impl(_name, _autograd_kernel(_name), "Autograd")


_DIRECT_DEVICE_TYPES = ("cpu", "cuda")
# Bound once: on a small tensor's call the attribute lookups cost as much as the checks.
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack
_tracing_state = torch._C._get_tracing_state
_increment_version = torch.autograd.graph.increment_version
_profiling = torch._C._autograd._profiler_enabled
_forward_ad = torch.autograd.forward_ad
_interpreter_stack = torch._C._functorch.get_interpreter_stack
_current_interpreter = torch._functorch.pyfunctorch.retrieve_current_functorch_interpreter
_VMAP = torch._C._functorch.TransformType.Vmap
_COMPOSING = (_VMAP, torch._C._functorch.TransformType.Grad)
# functorch's own helpers (torch.library.register_vmap's kernel uses the first two) to unwrap
# and wrap a level's batched tensors, and to see through wrappers.
_unwrap_batched = torch._C._functorch._unwrap_batched
_add_batch_dim = torch._C._functorch._add_batch_dim
_is_batched = torch._C._functorch.is_batchedtensor
_get_unwrapped = torch._C._functorch.get_unwrapped
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_maybe_level = torch._C._functorch.maybe_get_level
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_unwrap_for_grad = torch._C._functorch._unwrap_for_grad
_wrap_for_grad = torch._C._functorch._wrap_for_grad
# Inside the dispatcher's batching kernel (`_batching_kernel`), the rule's calls see the level's
# batching hidden, as torch.library's vmap kernel hides it.
_BATCHED_KEY = torch._C.DispatchKey.FuncTorchBatched
_BATCHING_OFF = functools.partial(torch._C._ExcludeDispatchKeyGuard,
                                  torch._C.DispatchKeySet(_BATCHED_KEY))


def _batching_excluded():
    return torch._C._dispatch_tls_is_dispatch_key_excluded(_BATCHED_KEY)


def transforming():
    """Whether a transform that cannot see into the kernels directly is active: a torch.func
    transform (grad, vmap, jvp, jacrev, ...) or forward-mode AD (a dual level). Their rules exist
    for PyTorch's own operators and for what the ops register: a vmap rule and autograd, no
    forward-mode rule (the kernels would drop the tangents of dual tensors). `_call` then runs
    the functional ops' vmap rules and autograd under vmaps and grads (`_ops_compose`), and
    otherwise their plain PyTorch formulas (`_transformable`), which every transform sees
    through. While torch.compile traces, its tracers take the ops as they are (fake kernels,
    registered autograd) under functorch interpreters of their own, except under forward-mode
    AD (a jvp, jacfwd or dual level inside the compiled code, which sets the dual level while
    it traces): the ops have no forward-mode rule there, and the traced graph would return
    zero tangents without a word, so the formulas are traced instead."""
    return _forward_ad._current_level >= 0 or (not _is_compiling()
                                               and _functorch_level() is not None)


# A vmap rule's `info`, as torch.library.register_vmap gives it (torch._functorch's VmapInfo).
_VmapInfo = collections.namedtuple("VmapInfo", ["batch_size", "randomness"])


def _ops_compose():
    """Whether every active transform is one the functional ops (`_VMAP_RULES`) compose with:
    vmap, through their vmap rules, and grad (vjp, jacrev, nested to any depth), through their
    autograd (`_GRAD_FUNCTIONS`, `_autograd_kernel`). Forward-mode AD (jvp, jacfwd, hessian, a
    dual level) has no rule to use."""
    # functorch's C++ interpreters: its Python ones cost a few microseconds each to make.
    return _forward_ad._current_level < 0 and all(
        interpreter.key() in _COMPOSING for interpreter in _interpreter_stack() or ())


def _only_transforms(tensors):
    """Whether eager torch.func transforms that the ops compose with (`_ops_compose`) are all
    that must see a call on `tensors` (no compiler, tracer, dispatch mode, tensor subclass or
    profiler), and the call is not a batching rule's inside the dispatcher's batching kernel,
    where the transforms may not be popped."""
    if (_is_compiling() or _dispatch_modes() or _profiling() or _tracing_state() is not None
            or _functorch_level() is None or not _ops_compose() or _batching_excluded()):
        return False
    return all(type(x) is torch.Tensor for x in tensors)


def _transform_to_lower(tensors):
    """The innermost transform when only eager vmaps and grads are active and nothing else must
    see a call on `tensors` (`_only_transforms`): the vmap or grad whose level `_vmapped` or
    `_grad_transformed` unwraps and pops. None otherwise: the op then takes the dispatcher,
    its Autograd and batching kernels (`_autograd_kernel`, `_batching_kernel`)."""
    return _current_interpreter() if _only_transforms(tensors) else None


def _vmapped(name, interpreter, args, dispatched=False):
    """Op `name` on `args` under the vmap `interpreter`: the op's rule (`_VMAP_RULES`) on the
    tensors unwrapped from the vmap's level, and the outputs wrapped back; what
    torch.library.register_vmap's kernel does, without its argument flattening (pytrees).
    From _call (`_transform_to_lower`), the vmap is popped meanwhile, so that the rule's own
    calls run the kernels directly, or meet the transform below (nested vmaps unwrap one level
    a call), without a trip through the dispatcher: together about 0.3 ms a call on CPU, more
    than the kernel below a few million elements. `dispatched`: the dispatcher's
    FuncTorchBatched kernel (a vmap beneath a grad, called through torch.ops or while a
    dispatch mode is active), which may not pop the vmap and hides the level's batching from
    the rule's calls instead."""
    level = interpreter.level()
    unwrapped, in_dims = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            a, dim = _unwrap_batched(a, level)
        elif isinstance(a, list):
            pairs = [_unwrap_batched(x, level) for x in a]
            a, dim = [x for x, _ in pairs], [d for _, d in pairs]
        else:
            dim = None
        unwrapped.append(a)
        in_dims.append(dim)
    with _BATCHING_OFF() if dispatched else interpreter.lower():
        if all(d is None or isinstance(d, list) and all(e is None for e in d) for d in in_dims):
            tensors = [x for x in _flatten(unwrapped)[1] if isinstance(x, torch.Tensor)]
            return _call(name, tensors, *unwrapped)   # nothing vmapped at this level
        info = _VmapInfo(batch_size=interpreter.batch_size(), randomness=interpreter.randomness())
        out, out_dims = _VMAP_RULES[name](info, in_dims, *unwrapped)
    if isinstance(out, list):
        return [_add_batch_dim(x, d, level) for x, d in zip(out, out_dims)]
    return _add_batch_dim(out, out_dims, level)


def _map_tensors(fn, args):
    """args with fn applied to each tensor, in lists too."""
    return [fn(a) if isinstance(a, torch.Tensor)
            else [fn(x) for x in a] if isinstance(a, list) else a for a in args]


def _grad_transformed(name, interpreter, args):
    """Op `name` on `args` under the grad transform `interpreter` (grad, vjp, jacrev), innermost:
    what its level does for PyTorch's own operators, without the dispatcher's two crossings
    into Python kernels (the Autograd kernel, then the backend's) and their argument
    conversions, half a small op's time under vjp on CPU. Tensors from outside the level become
    its constants (functorch's materialized wrappers), and where one of the level's tensors
    records a gradient, the op's Function records it (`_GRAD_FUNCTIONS`) around the op below
    the level (`_grad_lowered`)."""
    level = interpreter.level()

    args = _map_tensors(
        lambda x: x if _maybe_level(x) == level else _wrap_for_grad(x, level), args)
    spec, flat = _flatten(args)
    if torch.is_grad_enabled() and any(
            x.requires_grad for x in flat if isinstance(x, torch.Tensor)):
        with _single_level_functions_allowed():
            out = _GRAD_FUNCTIONS[name].apply(spec, *flat)
        return list(out) if isinstance(out, tuple) else out
    return _grad_lowered(name, interpreter, args)


def _grad_lowered(name, interpreter, args):
    """Op `name` on `args` (tensors of the grad transform `interpreter`'s level) below that level:
    on the tensors they wrap, with the level popped, so that the call runs the kernels directly
    or meets the transform beneath (a vmap: per-sample gradients); the outputs wrapped back."""
    level = interpreter.level()
    args = _map_tensors(lambda x: _unwrap_for_grad(x, level), args)
    with interpreter.lower():
        tensors = [x for x in _flatten(args)[1] if isinstance(x, torch.Tensor)]
        out = _call(name, tensors, *args)
    if isinstance(out, list):
        return [_wrap_for_grad(x, level) for x in out]
    return _wrap_for_grad(out, level)


def _transformed_value(x):
    """The plain tensor inside x's wrappers (vmap and grad transforms'), when none of its grad
    wrappers records a gradient: times from outside the transforms, made inside a grad from
    constants, or vmapped; None where a grad transform differentiates x. A vmapped x says it
    needs no gradient: the tensor it wraps knows."""
    while _is_wrapped(x):
        if not _is_batched(x) and x.requires_grad:
            return None
        x = _get_unwrapped(x)
    return x


def _build_lowered(build, first, *args):
    """A coefficient builder `build` on rows (`first`: times, or a path's coefficients) under the
    active vmaps and grads (`coefficient_builder` checked that no grad differentiates them),
    the transforms popped one at a time from the innermost: a vmap folds its dimension into the
    rows, so every vmapped sample's rows go in one call; a grad takes them as constants. Popped:
    the transforms would wrap the tensors the builder allocates, whose memory it then could not
    write."""
    if _functorch_level() is None:
        return build(first, *args)
    interpreter = _current_interpreter()
    level = interpreter.level()
    if interpreter.key() != _VMAP:
        if _maybe_level(first) == level:   # constant to this grad: its wrapper goes
            first = _get_unwrapped(first)
        with interpreter.lower():
            return _build_lowered(build, first, *args)
    x, dim = _unwrap_batched(first, level)
    with interpreter.lower():
        if dim is None:
            return _build_lowered(build, x, *args)
        x = x.movedim(dim, 0)
        out = _build_lowered(build, x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), *args)
        out = out.view(x.shape[0], x.shape[1], *out.shape[1:])
    return _add_batch_dim(out, 0, level)


def _nobody_intercepts(tensors, device=None):
    """Whether nothing but autograd must see an eager call of an op on `tensors` (on `device`,
    by default the first tensor's): no compiler or tracer, dispatch mode (FakeTensorMode),
    transform (`transforming`), tensor subclass, tensor it would misread (`_misread`), meta
    tensors or profiler. Then `_call` may skip the dispatcher: through it an affine call on 1K
    elements takes 10.5 us on CPU against 4.6 (two crossings into Python kernels: autograd,
    then the backend choice), with a gradient to record 23.6 us against 13.6, torch 2.13, one
    thread; more than the kernel. Every public op asks once per call, so this is kept to
    about 1 us."""
    for x in tensors:
        if type(x) is not torch.Tensor:
            return False
    if device is None:
        direct = tensors[0].is_cpu or tensors[0].is_cuda
    else:
        direct = device.type in _DIRECT_DEVICE_TYPES
    return (direct and not _is_compiling() and _dispatch_modes() == 0
            and _functorch_level() is None and _forward_ad._current_level < 0
            and _tracing_state() is None and not _profiling() and not _misread(tensors))


def _misread(tensors):
    """Whether a kernel would misread one of `tensors` through its data pointer: a tensor with
    the negative bit (x.conj().imag holds -x in memory; the dispatcher's fallback resolves it),
    batched gradients (`batched_gradients`) or a functorch wrapper leaked from a transform whose
    level has ended (no storage; functorch's dispatch unwraps it). One call into the
    extension where it is built: Python's Tensor.is_neg releases and retakes the GIL, about 1K
    instructions a tensor. Never while torch.compile traces, which cannot call the checks and
    has no such tensors."""
    return not _is_compiling() and _misread_check()(tensors)


@functools.lru_cache(maxsize=None)
def _misread_check():
    ext, _ = _backends.extension()
    if ext is not None:
        return ext.misread
    return lambda tensors: (batched_gradients(tensors)
                            or any(x.is_neg() or x.is_conj() or _is_wrapped(x) for x in tensors))


_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda x: False)


def batched_gradients(tensors):
    """Whether some of `tensors` are the batched gradients of torch.autograd.grad(
    is_grads_batched=True) (jacobian(vectorize=True), gradcheck's batched check): tensors
    without storage, under no functorch interpreter. Never while torch.compile traces (its
    tracer cannot call the check, and has no such tensors)."""
    return not _is_compiling() and any(map(_legacy_batched, tensors))


def capturing(device):
    """Whether a CUDA graph is being captured on `device`."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class DeviceCache:
    """Small device tensors built from plain values (the loss's constant rows, embedding
    frequencies, flow-map time grids), kept so that eager calls neither rebuild them nor copy
    them from the host every time. Bounded: a sweep over parameters empties it.

    Neither read nor filled while something traces the call (torch.compile or torch.jit.trace:
    the graph computes the values inline), a dispatch mode such as FakeTensorMode or a
    torch.func transform is active (their tensors have no data of their own), or a CUDA graph
    is being captured: a tensor first filled during capture holds its value only in replays,
    and a cached one evicted later would leave the graph reading freed memory. `build` then
    runs, and the graph records its ops. Under inference mode the entry is built as a normal
    tensor: an inference tensor in the cache would break every later call that autograd
    records ("Inference tensors cannot be saved for backward")."""

    def __init__(self, maxsize=64):
        # Entries are tensors, or anything with their device and is_cuda attributes.
        self.maxsize = maxsize
        self._entries = {}

    def get(self, key, device, build, direct=False):
        """The tensor for `key` (hashable, naming the device), from build() on `device`.
        `direct`: the caller found that nothing intercepts the call (`_nobody_intercepts`),
        which leaves only capture to check."""
        if capturing(device) or not direct and (
                _is_compiling() or _dispatch_modes() or _functorch_level() is not None
                or _tracing_state() is not None):
            return build()
        value = self._entries.get(key)
        if value is None:
            if len(self._entries) >= self.maxsize:
                self.clear()
            with torch.inference_mode(False):
                value = self._entries[key] = build()
        return value

    def clear(self):
        """Drop every entry. A CUDA entry may still be read by kernels in flight on another
        stream than the one it was built on (a Sampler warms up on a side stream, then runs on
        the main one), and the caching allocator would hand its memory to the building stream at
        once: the devices finish their work first. One host sync per `maxsize` new entries.

        The entries are swapped out for an empty dict first, in one step: another thread may
        insert an entry meanwhile (`get`), and iterating the dict it inserts into would raise
        "dictionary changed size during iteration". The old entries stay referenced until the
        devices are done with them."""
        entries, self._entries = self._entries, {}
        for device in {v.device for v in list(entries.values()) if v.is_cuda}:
            torch.cuda.synchronize(device)
        entries.clear()

    def discard(self, key, value):
        """Drop `key`'s entry if it is still `value` (another thread may have replaced it)."""
        if self._entries.get(key) is value:
            self._entries.pop(key, None)

    def __contains__(self, key):
        return key in self._entries

    def __len__(self):
        return len(self._entries)


def coefficient_builder(t, name, backend=None):
    """The backend's builder `name` (a field of _backends._Kernels, such as "path_coefficients")
    for coefficients from the times t (any float type, converted to float64 on load), or None
    where PyTorch must compute them: t needs a gradient, which must flow through PyTorch's
    formulas; something traces the call; or the backend has no such builder. The builders
    repeat those formulas in float64 and give their bits. `backend`: the call's direct backend
    (see `direct_backend`), when its caller decided it."""
    lowered = False
    if backend is None:
        if t.requires_grad and torch.is_grad_enabled():
            return None
        if not _nobody_intercepts((t,)):
            # Under vmaps and grads, times that no grad differentiates: `_build_lowered`.
            value = _transformed_value(t) if _only_transforms((t,)) else None
            if (value is None or type(value) is not torch.Tensor
                    or value.device.type not in _DIRECT_DEVICE_TYPES
                    or value.requires_grad and torch.is_grad_enabled() or _misread((value,))):
                return None
            lowered = True
        backend = _backends.select(t.device)
    build = getattr(_backends.kernels(backend), name)
    return functools.partial(_build_lowered, build) if build is not None and lowered else build


def _flatten(args):
    """(spec, flat): the arguments with each list expanded in place, and their lengths."""
    spec, flat = [], []
    for a in args:
        if isinstance(a, list):
            spec.append(len(a))
            flat.extend(a)
        else:
            spec.append(None)
            flat.append(a)
    return tuple(spec), flat


def _unflatten(spec, flat):
    args, i = [], 0
    for n in spec:
        args.append(flat[i] if n is None else list(flat[i:i + n]))
        i += 1 if n is None else n
    return args


def _call(name, tensors, *args, backend=None):
    """Op `name` on `args` (whose tensors are `tensors`): on `backend` directly when the caller
    decided it (`direct_backend`); else, when nothing but autograd must see the call, its kernel
    directly, or through its autograd.Function when there is a gradient to record; under
    transforms other than vmaps and grads (`transforming`, `_ops_compose`), or on batched
    gradients, its plain PyTorch formulas; under eager vmaps and grads, the innermost level
    popped: a vmap's rule (`_VMAP_RULES`) on the unwrapped tensors (`_vmapped`), a grad's
    Function around the op below it (`_grad_transformed`); else through torch.ops, whose
    Autograd and batching kernels run the same Functions and rules."""
    if backend is not None:
        return _KERNELS[name](*args, backend)
    if _nobody_intercepts(tensors):
        if not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)):
            return _KERNELS[name](*args)
        if name in _AUTOGRAD:
            spec, flat = _flatten(args)
            out = _DIRECT_FUNCTIONS[name].apply(spec, *flat)
            return list(out) if isinstance(out, tuple) else out
    if (transforming() and not (name in _VMAP_RULES and _ops_compose())
            or batched_gradients(tensors)):
        return _transformable(name, args)
    if name in _VMAP_RULES:
        interpreter = _transform_to_lower(tensors)
        if interpreter is not None:
            # A transform's saved tensors are dead wrappers once its level has ended (a vjp's
            # function, jacrev's backward): their values first, as functorch's dispatch takes.
            args = _map_tensors(_unwrap_if_dead, args)
            if interpreter.key() == _VMAP:
                return _vmapped(name, interpreter, args)
            return _grad_transformed(name, interpreter, args)
    return getattr(torch.ops.fastflow, name)(*args)


def _transformable(name, args):
    """Op `name`'s formulas in PyTorch's own operators, for transforms and batched gradients:
    fastflow.reference (the same math, the oracle of the tests; imported here, as it imports
    the paths, which import this module), the affine outputs in inputs[0]'s type as the kernels
    give them. sinusoid_backward serves sinusoid's registered backward, which only batched
    gradients bring here (transforms take sinusoid's formula itself)."""
    from . import reference
    if name == "sinusoid":
        *args, dtype = args
        return reference.sinusoid(*args).to(dtype)
    if name in ("affine", "affine_dot", "affine_sqnorm", "sinusoid_backward"):
        return getattr(reference, name)(*args)
    raise RuntimeError(f"fastflow: {name} (out=, in place) does not support torch.func "
                       f"transforms or forward-mode AD; call the op without out=")


def direct_backend(tensors):
    """The backend that runs every op of an eager call on `tensors` directly, decided once for
    the call: None when the ops must go through the dispatcher (something intercepts, see
    _nobody_intercepts) or record a gradient. A public op passes it as `backend` to the ops it
    makes and to coefficient_builder, which then skip their own checks and choice: on a small
    tensor those cost as much as the kernels (about 5 us per op on CPU)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return None
    return eager_backend(tensors)


def eager_backend(tensors):
    """direct_backend for a caller that records the gradient itself (an autograd.Function of
    its own) and so may run the kernels directly whether or not a gradient is needed."""
    return _backends.select(tensors[0].device) if _nobody_intercepts(tensors) else None


def affine(inputs, coeffs, backend=None):
    """``outputs[m] = sum_k coeffs[:, m, k] * inputs[k]`` (see the module docstring), on
    `backend` directly when the caller decided it (`direct_backend`)."""
    inputs = list(inputs)
    return _call("affine", (*inputs, coeffs), inputs, coeffs, backend=backend)


def affine_sqnorm(inputs, coeffs, backend=None):
    """Per-group sum of squares of ``sum_k coeffs[:, 0, k] * inputs[k]`` (see the module
    docstring), on `backend` directly when the caller decided it."""
    inputs = list(inputs)
    return _call("affine_sqnorm", (*inputs, coeffs), inputs, coeffs, backend=backend)


def affine_dot(a, b, groups):
    """``dot[g, m, k] = sum_i a[m][g, i] * b[k][g, i]`` (see the module docstring)."""
    a, b = list(a), list(b)
    return _call("affine_dot", (*a, *b), a, b, groups)


def affine_out(inputs, coeffs, out, backend=None):
    inputs, outputs = list(inputs), list(out)
    _call("affine_out", (*inputs, coeffs, *outputs), inputs, coeffs, outputs, backend=backend)
    return out


def takes_any_layout(device):
    """Whether affine_out_launcher's kernels on `device` take streams of any layout
    (_backends.kernels: any_layout), rather than contiguous ones only."""
    return not _is_compiling() and _backends.kernels(
        _backends.select(device)).any_layout


def affine_out_launcher(device, mixed_dtypes):
    """A function ``launch(inputs, coeffs, outputs)`` that runs affine_out's kernel directly,
    without the dispatcher, the argument checks and the backend choice of every call: for a
    caller that chose the backend once, validated its streams, passes contiguous tensors (any
    layout where `takes_any_layout`) and keeps to the aliasing rule (only the last output on top
    of an input). The sampler's loop uses it: there the ~0.1 ms of dispatch per call would be
    most of a step's overhead. Traced code (torch.compile) gets the op."""
    if _is_compiling():
        return lambda inputs, coeffs, out: torch.ops.fastflow.affine_out(inputs, coeffs, out)
    name = _backends.select(device)
    if name == "cuda" and mixed_dtypes:
        name = _backends.fallback_for_mixed_dtypes(device)
    return _backends.kernels(name).affine


def gaussian_out(ids, seed, step, out):
    """The sampler's noise of samples `ids` at `step` into out (see the module docstring and
    fastflow/_noise.py); seed in [-2**63, 2**63)."""
    _call("gaussian_out", (ids, out), ids, seed, step, out)
    return out


def sinusoid(t, freqs, scale, cos_first, dim, dtype):
    """``[sin a, cos a]`` (or ``[cos a, sin a]``) of ``a = (t[:, None] * freqs) * scale``, [B, dim]
    (see the module docstring)."""
    return _call("sinusoid", (t, freqs), t, freqs, float(scale), bool(cos_first), int(dim), dtype)


def sinusoid_backward(grad, t, freqs, scale, cos_first, t_grad, freqs_grad):
    """The gradients of ``sinusoid`` to t and freqs (see the module docstring)."""
    return _call("sinusoid_backward", (grad, t, freqs), grad, t, freqs, scale, cos_first, t_grad,
                 freqs_grad)
