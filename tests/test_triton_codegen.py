"""The Triton kernels compile for Hopper (sm_90) and become the code they were written to be.

No GPU is needed: tests/hopper_codegen.py runs Triton's whole pipeline, ptxas included, for an
sm_90 target, through the launchers' own grids and launch options, and reports what each kernel
became. It runs in a subprocess because this one has TRITON_INTERPRET=1 set (conftest.py).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fastflow import _backends

SCRIPT = os.path.join(os.path.dirname(__file__), "hopper_codegen.py")


def _has_nvidia_backend():
    try:
        return importlib.util.find_spec("triton.backends.nvidia") is not None
    except ImportError:
        return False


@pytest.fixture(scope="module")
def report():
    if not _has_nvidia_backend():
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    # A Triton that fastflow does not run (older than 3.6, as torch 2.7 pins 3.3): its language
    # differs, and the kernels need not compile under it.
    kernels, why = _backends._triton()
    if kernels is None:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def _kernels(report, *families):
    return [r for r in report if r["kernel"].strip("_").split("_")[0] in families]


def _own_arithmetic(reports):
    """The cases whose arithmetic is all fastflow's: no libdevice function but sqrt."""
    return [r for r in reports if "libdevice" not in r["case"]]


def test_every_case_compiles(report):
    spec = importlib.util.spec_from_file_location("hopper_codegen", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert [r["case"] for r in report] == [name for name, _ in script._cases()]
    assert all(r["num_warps"] == 4 for r in report)


def test_no_register_spills(report):
    # The sinusoid kernels are left out: libdevice's sin and cos keep an array on the stack for
    # the Payne-Hanek reduction of huge arguments, a path that timesteps never take (so are the
    # path coefficients that call libdevice). So is the conversion kernel (one thread per
    # sample): its fp64 divisions call the IEEE division's slow path, a subroutine that saves a
    # few registers on the stack.
    for r in _own_arithmetic(_kernels(report, "affine", "dot", "sqnorm", "path", "gaussian")):
        assert r["stack_bytes"] in (0, None), r


def test_streams_move_16_bytes_per_access(report):
    # Every stream goes through 128-bit loads and stores, the width that saturates HBM. Only the
    # reductions over tiny samples (rows of n = 2) cannot: their rows start at any element.
    for r in _kernels(report, "affine"):
        assert max(r["load_bytes"]) == 16 and r["store_bytes"] == [16], r
    for r in _kernels(report, "dot", "sqnorm"):
        if "one group per row" in r["case"]:
            assert max(r["load_bytes"]) == 16, r
    for r in _kernels(report, "gaussian"):   # noise written, nothing streamed in
        if "image samples" in r["case"]:
            assert r["store_bytes"] == [16], r


def test_no_fma_contraction(report):
    # Products and sums round separately, as on the CPU and in eager PyTorch (LAUNCH_OPTIONS).
    # Left out: the path coefficients that call libdevice's exp, sin, cos or pow, whose
    # polynomials are written with fma on purpose.
    # The noise too: its ln and cos are fastflow's polynomials, the same bits as on the CPU.
    kernels = _own_arithmetic(_kernels(report, "affine", "dot", "sqnorm", "path", "conversion",
                                       "gaussian"))
    assert any(r["kernel"] == "_conversion_kernel" for r in kernels)
    assert any(r["kernel"] == "_path_coefficients_kernel" for r in kernels)
    assert any(r["kernel"] == "_gaussian_kernel" for r in kernels)
    for r in kernels:
        assert r["fma"] == 0, r


def test_conversion_divisions_round_correctly(report):
    # The conversion rows give PyTorch's bits only if every fp64 division is IEEE (div.rn).
    kernels = _kernels(report, "conversion")
    assert len(kernels) == 3
    for r in kernels:
        assert r["inexact_div"] == 0, r
