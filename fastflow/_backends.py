"""The backends, what each needs, and which one runs a given call.

    reference  plain PyTorch (fastflow.reference): any device, always there
    cpu        the C++ kernels of the compiled extension fastflow._C, on CPU tensors
    triton     the Triton kernels (fastflow._triton), on CUDA tensors, or on CPU tensors under
               TRITON_INTERPRET=1 (how the tests check them without a GPU)
    cuda       the CUDA C++ kernels of fastflow._C, where the extension was built with CUDA

CPU tensors go to ``cpu`` when the extension is built, else to ``reference``; CUDA tensors go to
``triton``, else ``cuda``, else ``reference``. ``FASTFLOW_BACKEND=<name>`` forces one, read at
every call, and fails loudly when the forced backend cannot run on the tensors it is given.
"""
import importlib
import os
import re
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

NAMES = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "FASTFLOW_BACKEND"
TRITON_OLDEST = (3, 6)   # the oldest Triton the kernels are written for


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run in this process, and why (not)."""

    name: str
    available: bool
    reason: str

    def __str__(self):
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


@lru_cache(maxsize=None)
def extension():
    """The compiled module fastflow._C, or the reason it cannot be loaded."""
    if os.environ.get("FASTFLOW_SKIP_EXTENSION", "0") == "1":
        return None, "extension not built (FASTFLOW_SKIP_EXTENSION=1)"
    try:
        return importlib.import_module("fastflow._C"), None
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "fastflow._C":
            return None, f"extension not built ({exc})"
        # Built, but it does not load: most often compiled against another torch than this one
        # (an undefined symbol after `pip install -U torch`). Say so once, rather than running
        # every CPU op on the unfused reference without a word.
        why = (f"extension does not load ({exc}); rebuild it against torch {torch.__version__}: "
               "pip install --no-build-isolation --no-deps --force-reinstall fastflow "
               "(or -e . in a checkout)")
        warnings.warn(f"fastflow: the C++ kernels are not used, the reference runs instead: {why}",
                      RuntimeWarning, stacklevel=2)
        return None, why


@lru_cache(maxsize=None)
def _triton():
    """The Triton kernel modules (affine, embedding, paths, conversions, noise), or the reason
    they cannot be imported."""
    try:
        import triton
    except ImportError as exc:
        return None, f"triton not importable ({exc})"
    found = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    if found is None or (int(found[1]), int(found[2])) < TRITON_OLDEST:
        # Older Tritons (3.0 to 3.5, as torch 2.4 to 2.9 pin them) fail inside the kernels.
        return None, (f"triton {getattr(triton, '__version__', '?')} is older than "
                      f"{'.'.join(map(str, TRITON_OLDEST))}, the oldest the kernels support")
    try:
        return tuple(importlib.import_module(f"fastflow._triton.{name}")
                     for name in ("affine", "embedding", "paths", "conversions", "noise")), None
    except ImportError as exc:   # triton imports: fastflow's kernel modules do not
        return None, (f"fastflow's Triton kernels do not import with triton "
                      f"{triton.__version__} ({exc})")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _status(name, device_type):
    """(available, reason) of backend `name` for tensors on `device_type` ("cpu", "cuda", ...)."""
    if name == "reference":
        return True, "plain PyTorch"
    if name == "cpu":
        ext, why = extension()
        if ext is None:
            return False, why
        return device_type == "cpu", "C++ kernels" if device_type == "cpu" else "CPU tensors only"
    if name == "triton":
        mod, why = _triton()
        if mod is None:
            return False, why
        if device_type == "cuda":
            return True, "Triton kernels"
        if device_type == "cpu" and _interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1)"
        return False, "no CUDA device" if device_type == "cpu" else f"no Triton for {device_type}"
    if name == "cuda":
        ext, why = extension()
        if ext is None:
            return False, why
        if not ext.cuda_built:
            return False, "extension built without CUDA"
        return device_type == "cuda", "CUDA C++ kernels" if device_type == "cuda" else "no CUDA device"
    raise ValueError(f"{ENV_VAR} must be one of {', '.join(NAMES)}; got {name!r}")


def backends():
    """Report every backend for this process: ``{name: BackendStatus}``.

    A backend is available if it can run on the default device of its kind (CUDA where a GPU is
    present, else CPU). Example::

        >>> for status in fastflow.backends().values():
        ...     print(status)
        reference: available (plain PyTorch)
        cpu: available (C++ kernels, avx2 instruction set)
        triton: unavailable (no CUDA device)
        cuda: unavailable (extension built without CUDA)
    """
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    report = {}
    for name in NAMES:
        kind = "cpu" if name == "cpu" else device_type
        report[name] = BackendStatus(name, *_status(name, kind))
    if report["cpu"].available:  # which build of the kernels this CPU runs
        isa = extension()[0].cpu_isa()
        report["cpu"] = replace(report["cpu"], reason=f"C++ kernels, {isa} instruction set")
    return report


def select(device):
    """Name of the backend that runs a call on tensors of `device`."""
    forced = _forced().strip().lower()
    if forced:
        available, reason = _status(forced, device.type)
        if not available:
            raise RuntimeError(f"{ENV_VAR}={forced} cannot run on {device} tensors: {reason}")
        return forced
    return _default(device.type)


def _forced():
    """The value of ENV_VAR, read at every call: tests and users may set it at run time. From
    os.environ's own dict where it has one: through the Mapping protocol the lookup of a
    variable that is not set raises and catches a KeyError, about 0.7 us, most of the choice."""
    if _ENVIRON is None:
        return os.environ.get(ENV_VAR, "")
    value = _ENVIRON.get(_ENV_KEY)
    return "" if value is None else os.environ.decodevalue(value)


_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON is not None else None


@lru_cache(maxsize=None)
def _default(device_type):
    """The backend for `device_type` when none is forced: fixed for the process, as what it
    depends on (which modules import) is."""
    for name in _DEFAULT_ORDER.get(device_type, ()):
        if _status(name, device_type)[0]:
            return name
    return "reference"


_DEFAULT_ORDER = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


def fallback_for_mixed_dtypes(device):
    """The CUDA C++ kernel takes one float type for all streams: mixed calls go to Triton where
    it can run, else to the reference."""
    return "triton" if _status("triton", device.type)[0] else "reference"


def kernels(name):
    """The kernels of backend `name`: a _Kernels."""
    return _KERNELS[name]()


@dataclass(frozen=True)
class _Kernels:
    """A backend's kernels. Those that write take their outputs last; the others return."""

    affine: object               # (inputs, coeffs, outputs)
    affine_dot: object           # (a, b, groups) -> [G, len(a), len(b)]
    affine_sqnorm: object        # (inputs, coeffs) -> [G]
    sinusoid: object             # (t, freqs, scale, cos_first, out)
    sinusoid_backward: object    # (grad, t, freqs, scale, cos_first, t_grad, freqs_grad)
    gaussian: object             # (ids, seed, step, out): the sampler's noise, fastflow/_noise.py
    # Optional. (t, path, params, dtype, residual) -> the coefficients of a path of
    # fastflow.paths._NATIVE at times t of any float type, or None for a path it cannot build;
    # `residual`: the velocity loss's rows (fastflow.paths.velocity_residual).
    path_coefficients: object = None
    # (path_coeffs, src, dst, eps, dtype) -> fastflow.convert's rows, or None where PyTorch
    # computes them.
    conversion_coefficients: object = None
    # (inputs, coeffs) -> affine into outputs it allocates, after checking the arguments.
    affine_fresh: object = None
    # (inputs, coeffs, outputs): the whole of an eager fastflow::affine_out call (checks,
    # outputs that alias inputs written through stand-ins, version counters bumped).
    affine_out: object = None
    # (pred, data, coeffs, weight, divisor) -> sum over groups of weight * affine_sqnorm([pred,
    # *data], coeffs) (weight None or one per group) / divisor, as an autograd node
    # differentiable in pred (fastflow.losses).
    pred_loss: object = None
    # (values) -> the losses' sum over the groups, in an order the thread count does not change.
    ordered_sum: object = None
    # Whether the kernels check their arguments themselves (the C++ ones do).
    checks_args: bool = False
    # Whether affine and affine_sqnorm take streams of any layout (the C++ ones stream rows of
    # contiguous elements at one stride apart, and memory with the batch moved inward, in place,
    # and copy other layouts themselves: csrc/affine.h) rather than contiguous ones.
    any_layout: bool = False


def _reference_kernels():
    from . import reference

    def affine(inputs, coeffs, outputs):
        # Results in the math type, rounded once by the copy into each output's own type.
        for out, value in zip(outputs, reference.affine(inputs, coeffs, dtype=coeffs.dtype)):
            out.copy_(value)

    def sinusoid(t, freqs, scale, cos_first, out):
        out.copy_(reference.sinusoid(t, freqs, scale, cos_first, out.shape[1]))

    def gaussian(ids, seed, step, out):
        out.copy_(reference.gaussian(seed, ids, step, out.shape))

    return _Kernels(affine, reference.affine_dot, reference.affine_sqnorm, sinusoid,
                    reference.sinusoid_backward, gaussian)


def _cpu_kernels():
    ext = extension()[0]
    return _Kernels(ext.affine_cpu, ext.affine_dot_cpu, ext.affine_sqnorm_cpu, ext.sinusoid_cpu,
                    ext.sinusoid_backward_cpu, ext.gaussian_cpu, ext.path_coefficients_cpu,
                    ext.conversion_coefficients_cpu, ext.affine_fresh_cpu, ext.affine_out_cpu,
                    ext.pred_loss_cpu, ext.ordered_sum_cpu, checks_args=True, any_layout=True)


def _cuda_kernels():
    # Only the affine map has a CUDA C++ kernel: the rest is Triton's where it is installed, else
    # the reference's.
    rest = _triton_kernels() if _triton()[0] is not None else _reference_kernels()
    return replace(rest, affine=extension()[0].affine_cuda)


def _triton_kernels():
    affine, embedding, paths, conversions, noise = _triton()[0]
    return _Kernels(affine.affine, affine.affine_dot, affine.affine_sqnorm, embedding.sinusoid,
                    embedding.sinusoid_backward, noise.gaussian, paths.path_coefficients,
                    conversions.conversion_coefficients)


_KERNELS = {
    "reference": lru_cache(maxsize=None)(_reference_kernels),
    "cpu": lru_cache(maxsize=None)(_cpu_kernels),
    "cuda": lru_cache(maxsize=None)(_cuda_kernels),
    "triton": lru_cache(maxsize=None)(_triton_kernels),
}
