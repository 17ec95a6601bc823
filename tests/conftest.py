"""Shared fixtures: the backends to test, the dtype tolerance table, comparison helpers, and a
recorder of the ops that reach the dispatcher.

On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors; it
must be set before Triton compiles anything, hence here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fastflow  # noqa: E402
from fastflow import _backends  # noqa: E402

# Max abs error against the fp64 reference, scaled by max(1, |ref|) (DESIGN.md section 8).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOLERANCE)


def _backend_devices():
    """(backend, device) pairs to test: every backend on every device it can serve here."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(name, dev) for dev in devices for name in _backends.NAMES
            if not (name == "cpu" and dev != "cpu") and not (name == "cuda" and dev != "cuda")
            and not (name == "triton" and dev == "cpu" and torch.cuda.is_available())]


@pytest.fixture(params=_backend_devices(), ids=lambda p: f"{p[0]}-{p[1]}")
def backend(request, monkeypatch):
    """Force one backend for the test; yields the device its tensors must live on."""
    name, device = request.param
    available, reason = _backends._status(name, device)
    if not available:
        pytest.skip(f"{name} on {device}: {reason}")
    monkeypatch.setenv(_backends.ENV_VAR, name)
    return torch.device(device)


def assert_close_to_reference(actual, expected, dtype):
    """|actual - expected| / max(1, |expected|) <= TOLERANCE[dtype], with expected in fp64."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    if actual.numel() == 0:
        return
    a = actual.double().cpu()
    e = expected.double().cpu()
    err = ((a - e).abs() / e.abs().clamp(min=1.0)).max().item()
    assert err <= TOLERANCE[dtype], f"scaled error {err:.3g} > {TOLERANCE[dtype]:.1g} for {dtype}"


class RecordOps(TorchDispatchMode):
    """Within its `with` block, records every op that reaches the dispatcher (`ops`)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def names(self):
        """The ops' names without overload, e.g. "lift_fresh"."""
        return {func.overloadpacket.__name__ for func in self.ops}


def compiled_extension():
    """fastflow._C, or skip the test where it is not built."""
    ext, reason = _backends.extension()
    if ext is None:
        pytest.skip(reason)
    return ext


def bits_equal(a, b):
    """Same dtype, shape, device and bits (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point():
        view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)
