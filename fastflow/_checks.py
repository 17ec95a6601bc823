"""Argument checks shared by the public ops: each error names the argument and what was expected."""
import math
import numbers
import operator

import torch

from . import _backends

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_stream(x, name):
    """A floating tensor of rank >= 1 that the kernels can stream."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, "
                        f"got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a tensor with a batch dimension, got a 0-d tensor")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense tensor, got a {x.layout} one (x.to_dense())")


def check_like(x, ref, name, ref_name):
    """`x` is a tensor with the shape, dtype and device of `ref`."""
    check_stream(x, name)
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), "
                         f"got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), "
                         f"got {x.device}")


def check_outputs(outs, names, ref, ref_name, inputs):
    """The tensors of an ``out=`` argument, one per name in `names` ("out[0]", ...): each like
    `ref`; no two overlapping in memory; and, while grad mode is on, none of them and no input
    requiring grad (PyTorch's rule for out=: writing into a tensor records no gradient).

    Overlap: the outputs are written one after another, so one that shares memory with another
    would overwrite (part of) it. Each output's span, from its first to its last byte, must be
    disjoint from the others': separate slices of one buffer pass, views that interleave are
    refused too (their spans overlap though no element is shared; telling the two apart costs
    more than the call). An output may alias an INPUT: the kernels read each element before
    writing it, or work from a copy (fastflow._ops._writable_in_place). While torch.compile
    traces the call only the same tensor passed twice is caught: the tracer cannot read
    addresses."""
    if _extension_accepts(outs, ref, inputs):
        return
    grad = torch.is_grad_enabled()
    compiling = torch.compiler.is_compiling()   # the tracer knows no inference tensors
    inference = compiling or torch.is_inference_mode_enabled()
    for o, name in zip(outs, names):
        check_like(o, ref, name, ref_name)
        if grad and o.requires_grad:
            raise _not_differentiable(name)
        if not inference and o.is_inference():   # PyTorch's rule for every in-place write
            raise RuntimeError(f"{name}: an inference tensor (made under torch.inference_mode) "
                               f"cannot be written outside inference mode")
        if not compiling and o.is_neg():   # PyTorch's fallback cannot write a list of them
            raise ValueError(f"{name}: a tensor with the negative bit (its memory holds minus "
                             f"its values, as x.conj().imag does); expected a plain tensor: "
                             f"write into one, then copy")
        if any(stride == 0 and size > 1 for size, stride in zip(o.shape, o.stride())):
            raise ValueError(f"{name}: an expanded tensor (a stride of 0) would have several "
                             f"elements written to one memory location; expected a tensor "
                             f"with memory of its own, e.g. torch.empty_like(x1)")
    if grad and any(x.requires_grad for x in inputs):
        raise _not_differentiable("an input")
    for i in range(1, len(outs)):
        for j in range(i):
            if outs[i] is outs[j] or (not compiling and overlap(outs[i], outs[j])):
                raise ValueError(f"out: {names[j]} and {names[i]} overlap in memory (first to "
                                 f"last element); expected separate tensors (an output may "
                                 f"alias an input, not another output)")


def _extension_accepts(outs, ref, inputs):
    """Whether the extension finds that check_outputs would accept `outs`, in one call
    (csrc/affine_checks.cpp, outputs_acceptable): in Python its rules cost about a microsecond
    each. A refusal, or any doubt, leaves the call to them, which name what is wrong. Never while
    torch.compile traces, which cannot call it."""
    if _is_compiling():
        return False
    ext = _backends.extension()[0]
    return (ext is not None and all(type(o) is torch.Tensor for o in outs)
            and ext.outputs_acceptable(outs, ref, inputs))


_is_compiling = torch.compiler.is_compiling


def _not_differentiable(culprit):
    """The error of an out= call that autograd would have to record: `culprit` requires grad."""
    return RuntimeError(f"out: writing into out= does not support automatic differentiation, but "
                        f"{culprit} requires grad; call it under torch.no_grad(), or without out= "
                        f"for differentiable outputs")


def overlap(a, b):
    """Whether the byte spans of two tensors on one device intersect. Addresses, not storages:
    two storages may share memory too (torch.frombuffer, DLPack). No device sync. False for
    tensors without addresses: meta and fake tensors (address 0), functorch's wrappers (which
    raise)."""
    try:
        start_a, start_b = a.data_ptr(), b.data_ptr()
    except RuntimeError:
        return False
    if start_a == 0 or start_b == 0:
        return False
    end_a, end_b = start_a + _extent(a), start_b + _extent(b)
    # Half-open spans: neither empty, each starting before the other ends.
    return start_a < end_a and start_b < end_b and start_a < end_b and start_b < end_a


def _extent(x):
    """The number of bytes from x's first element to the end of its last; 0 if it has none."""
    if x.is_contiguous():
        return x.nbytes
    if x.numel() == 0:
        return 0
    # sum((size - 1) * stride), without a Python loop: 0.85 us against 1.07 us a tensor.
    strides = x.stride()
    return (sum(map(operator.mul, x.shape, strides)) - sum(strides) + 1) * x.element_size()


def describe(x):
    """What x is, for an error message: a tensor's dtype and shape, else its type."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def is_integer(value):
    """A Python (or NumPy) integer; not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def real_number(value, name, why="it is taken as a constant (no gradient would reach it)"):
    """value as a float: a finite real number (a Python or NumPy number, or a one-element tensor
    that does not require grad). `name` begins each error; `why` says why a tensor that
    requires grad is refused."""
    # Comparisons, not math.isfinite, which torch.compile cannot trace on the symbolic floats
    # that dynamic=True makes of float arguments and defaults (NaN fails both).
    if type(value) is float and -math.inf < value < math.inf:   # the usual case, no ABC check
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        if value.requires_grad:   # .item() would detach it silently
            raise ValueError(f"{name} is a tensor that requires grad, but {why}: pass a number, "
                             f"or the tensor detached")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_callable(value, name, signature):
    """`value` is callable, as `signature` (e.g. "model(x, t)") says it is called."""
    if not callable(value):
        raise TypeError(f"{name}: expected a callable {signature}, got {type(value).__name__}")


def as_device(device, name="device"):
    """None, or `device` (a torch.device, a string such as "cuda:0", or an index) as a
    torch.device. Checked first because ``Tensor.to(device)`` also takes a dtype or a tensor,
    and would then convert the values instead of moving them."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            return torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"{name}: {err}") from None
    raise TypeError(f"{name}: expected a torch.device or a string such as 'cuda', got "
                    f"{describe(device)}")


def check_positive(x, name):
    """A finite positive Python (or NumPy) number; not a tensor, whose value only a device sync
    could check."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a finite positive number, got {type(x).__name__}")
    if not 0 < x < math.inf:
        raise ValueError(f"{name}: expected a finite positive number, got {x!r}")


def batch_time(t, x, name="t", keep_type=False):
    """t as a 1-D tensor of length 1 (one time for the whole batch) or B = x.shape[0], on x's
    device, in a dtype fit for computing coefficients (`formula_time`).

    Accepts a Python number, a 0-d tensor, or a tensor of shape [B] or [B, 1, ..., 1] with at
    most x.dim() dimensions. Gradients flow back to a tensor t. With keep_type, a tensor t keeps
    its float type, for ``paths.coefficients`` and the conversions, whose native builders read
    any and convert on load: that saves the call a conversion (a kernel launch on a GPU).
    """
    if check_time(t, x, name) is None:
        return torch.full((1,), float(t), dtype=formula_dtype(x.device), device=x.device)
    t = (t if t.dim() == 1 else t.reshape(-1)).to(x.device)
    return t if keep_type and t.dtype in FLOAT_DTYPES else formula_time(t)


def formula_time(t):
    """t in the type the paths' PyTorch formulas compute in: fp64 where the device has it."""
    return t.to(formula_dtype(t.device))


def formula_dtype(device):
    """The type the paths' PyTorch formulas compute t in on `device`."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_time(t, x, name="t"):
    """The checks of batch_time, without its conversion: t itself if it is a tensor, None if it
    is a number."""
    if not isinstance(t, torch.Tensor):   # first: an ABC's isinstance costs a microsecond
        if isinstance(t, numbers.Real) and not isinstance(t, bool):
            return None
        raise TypeError(f"{name}: expected a float or a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    batch = x.shape[0]
    if t.numel() != 1:
        per_sample = t.dim() >= 1 and t.shape[0] == batch and t.numel() == batch
        if not per_sample or t.dim() > x.dim():
            raise ValueError(f"{name}: expected a scalar, shape [{batch}] or [{batch}, 1, ...] "
                             f"(one time per sample of a batch of {batch}), got shape "
                             f"{tuple(t.shape)}")
    elif t.dim() > x.dim():
        raise ValueError(f"{name}: has {t.dim()} dimensions, more than the {x.dim()} of the data")
    if t.device != x.device:
        if t.numel() != 1 or t.device.type != "cpu":
            raise ValueError(f"{name}: expected a tensor on {x.device}, got {t.device}")
    return t


def path_inputs(path, x0, x1, noise):
    """The streams a path reads, (x0, x1[, noise]), after checking them against x1."""
    check_stream(x1, "x1")
    check_like(x0, x1, "x0", "x1")
    if not path.uses_noise:
        if noise is not None:
            raise ValueError(f"noise: {path!r} has no noise term; pass noise=None or use "
                             f"ConstantNoise / SchrodingerBridge")
        return [x0, x1]
    if noise is None:
        raise ValueError(f"noise: {path!r} needs a noise tensor like x1 (the one that built "
                         f"x_t), e.g. torch.randn_like(x1)")
    check_like(noise, x1, "noise", "x1")
    return [x0, x1, noise]
