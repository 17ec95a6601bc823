"""fastflow.backends(), backend selection and FASTFLOW_BACKEND, and the fallback when the
extension is not built."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import fastflow
from fastflow import _backends

SKIP_EXTENSION = os.environ.get("FASTFLOW_SKIP_EXTENSION", "0") == "1"


def test_backends_reports_every_backend_with_a_reason():
    report = fastflow.backends()
    assert list(report) == ["reference", "cpu", "triton", "cuda"]
    for name, status in report.items():
        assert isinstance(status, fastflow.BackendStatus)
        assert status.name == name and isinstance(status.available, bool)
        assert isinstance(status.reason, str) and status.reason
        assert str(status) == (f"{name}: {'available' if status.available else 'unavailable'} "
                               f"({status.reason})")
    assert report["reference"].available


def test_cpu_backend_is_built():
    # A broken build must fail here rather than silently fall back to the reference.
    status = fastflow.backends()["cpu"]
    if SKIP_EXTENSION:
        assert not status.available and "extension not built" in status.reason
    else:
        assert status.available, status.reason
        assert _backends.select(torch.device("cpu")) == "cpu"


# The loops that simd_clones.h compiles again for AVX2: each path builder's tile, the
# embedding's sin and cos, the sampler's noise.
AVX2_CLONES = ["cond_ot_tile", "polynomial_tile", "whole_polynomial_tile", "cosine_tile",
               "linear_vp_tile", "vp_tile", "constant_noise_tile", "schrodinger_bridge_tile",
               "gaussian_tile", "sincos_fast"]


def test_the_avx2_clones_are_vectorised():
    # Nothing in a result shows a clone that lost its vector code: a lambda that GCC kept out
    # of line (so compiled without the clone's AVX2) left Polynomial's tile with 2 ymm
    # instructions against 1823, found by reading the disassembly, as this does: each clone
    # must hold packed arithmetic on 256-bit registers (a clone that loses it in one of its
    # variants only would pass).
    import platform

    from conftest import compiled_extension

    if platform.machine() != "x86_64" or not (shutil.which("nm") and shutil.which("objdump")):
        pytest.skip("needs x86-64 and binutils (nm, objdump)")
    library = compiled_extension().__file__
    symbols = subprocess.run(["nm", library], capture_output=True, text=True, check=True).stdout
    clones = [(name, line.split()[-1]) for name in AVX2_CLONES for line in symbols.splitlines()
              if line.endswith(".avx2") and re.search(rf"\d{name}E", line)]
    if not clones:
        pytest.skip("an extension built without AVX2 clones (not GCC)")
    assert {name for name, _ in clones} == set(AVX2_CLONES)
    for name, symbol in clones:   # (overloads: one symbol each)
        code = subprocess.run(["objdump", "-d", f"--disassemble={symbol}", library],
                              capture_output=True, text=True, check=True).stdout
        packed = re.findall(r"\tv(?:add|sub|mul|div)p[sd]\s[^\n]*ymm", code)
        assert len(packed) >= 2, (name, symbol)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a CPU-only machine")
def test_gpu_backends_on_a_cpu_machine():
    report = fastflow.backends()
    assert not report["cuda"].available
    if not SKIP_EXTENSION:   # the extension may hold the CUDA kernels (built with nvcc here)
        from conftest import compiled_extension
        built = compiled_extension().cuda_built
        assert report["cuda"].reason == ("no CUDA device" if built else
                                         "extension built without CUDA")
    # The test session runs Triton in its interpreter (see conftest.py).
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    assert report["triton"].available == (interpreting and _backends._triton()[0] is not None)


def test_default_selection_without_the_variable(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    assert _backends.select(torch.device("cpu")) == ("reference" if SKIP_EXTENSION else "cpu")
    assert _backends.select(torch.device("meta")) == "reference"


@pytest.mark.parametrize("value,expected", [("reference", "reference"),
                                            (" Reference ", "reference"), ("", None)])
def test_forcing_is_read_at_every_call(monkeypatch, value, expected):
    monkeypatch.setenv(_backends.ENV_VAR, value)
    default = "reference" if SKIP_EXTENSION else "cpu"
    assert _backends.select(torch.device("cpu")) == (expected or default)


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv(_backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="FASTFLOW_BACKEND must be one of .*'bogus'"):
        _backends.select(torch.device("cpu"))
    with pytest.raises(ValueError, match="FASTFLOW_BACKEND"):
        fastflow.interpolate(torch.randn(2, 3), torch.randn(2, 3), 0.5)


def test_forced_cuda_on_cpu_tensors(monkeypatch):
    monkeypatch.setenv(_backends.ENV_VAR, "cuda")
    reason = _backends._status("cuda", "cpu")[1]
    assert reason
    message = rf"FASTFLOW_BACKEND=cuda cannot run on cpu tensors: .*{re.escape(reason)}"
    with pytest.raises(RuntimeError, match=message):
        fastflow.interpolate(torch.randn(2, 3), torch.randn(2, 3), 0.5)


def test_forced_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(_backends.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="FASTFLOW_BACKEND=triton cannot run on cpu tensors"):
        _backends.select(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _backends._triton()[0] is not None:
        assert _backends.select(torch.device("cpu")) == "triton"


def test_forced_cpu_on_other_devices(monkeypatch):
    monkeypatch.setenv(_backends.ENV_VAR, "cpu")
    with pytest.raises(RuntimeError, match="FASTFLOW_BACKEND=cpu cannot run on meta tensors"):
        _backends.select(torch.device("meta"))


_WITHOUT_EXTENSION = textwrap.dedent("""
    import sys
    import torch
    import fastflow
    status = fastflow.backends()["cpu"]
    assert not status.available and "extension not built" in status.reason, status
    assert "fastflow._C" not in sys.modules
    assert fastflow._backends.select(torch.device("cpu")) == "reference"
    x0, x1, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.rand(4)
    x_t, u_t = fastflow.interpolate(x0, x1, t)
    tt = t[:, None, None]
    assert torch.equal(x_t, tt * x1 + (1 - tt) * x0) and torch.equal(u_t, x1 - x0)
    print("ok", status)
""")


def test_import_and_interpolate_without_the_extension():
    env = {k: v for k, v in os.environ.items() if k != _backends.ENV_VAR}
    env["FASTFLOW_SKIP_EXTENSION"] = "1"
    result = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok cpu: unavailable (extension not built")


def test_an_extension_that_does_not_load_is_reported(monkeypatch):
    # A _C built against another torch (an undefined symbol after `pip install -U torch`) made
    # every CPU op fall back to the reference silently, reported as "extension not built".
    def unloadable(name):
        raise ImportError(f"{name}.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                          "_ZN5torch8autograd13_wrap_outputs")

    monkeypatch.delenv("FASTFLOW_SKIP_EXTENSION", raising=False)
    monkeypatch.setattr(_backends, "importlib", types.SimpleNamespace(import_module=unloadable))
    with pytest.warns(RuntimeWarning, match="rebuild it against torch"):
        ext, why = _backends.extension.__wrapped__()
    assert ext is None and "undefined symbol" in why and "not built" not in why


def test_a_missing_extension_is_reported_quietly(monkeypatch, recwarn):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.delenv("FASTFLOW_SKIP_EXTENSION", raising=False)
    monkeypatch.setattr(_backends, "importlib", types.SimpleNamespace(import_module=missing))
    ext, why = _backends.extension.__wrapped__()
    assert ext is None and why.startswith("extension not built")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_triton_older_than_the_kernels_is_not_used(monkeypatch):
    # torch 2.4 brings Triton 3.0: the backend was reported
    # available and chosen for CUDA tensors, and every kernel failed inside Triton.
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.0.0"))
    mods, why = _backends._triton.__wrapped__()
    assert mods is None and "3.0.0" in why and "older" in why


def test_kernels_that_do_not_import_are_not_blamed_on_triton(monkeypatch):
    # Triton itself imports (and is new enough): a failure in fastflow's kernel modules must not
    # be reported as "triton not importable".
    def failing(name):
        raise ImportError(f"cannot import name 'libdevice' (while importing {name})")

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.9.0"))
    monkeypatch.setattr(_backends, "importlib", types.SimpleNamespace(import_module=failing))
    mods, why = _backends._triton.__wrapped__()
    assert mods is None and "libdevice" in why
    assert "triton not importable" not in why and "3.9.0" in why
