"""fastflow.convert: every pair of kinds on every affine path, against the reference formulas."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastflow
from fastflow import paths
from fastflow.conversions import KINDS
from fastflow.reference import convert as reference_convert

from conftest import DTYPES

AFFINE_PATHS = [paths.CondOT(), paths.CondOT(0.1), paths.Polynomial(2.0), paths.Cosine(),
                paths.LinearVP(), paths.VP()]
PAIRS = list(itertools.product(KINDS, KINDS))


def _data(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, x_t = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = (0.2 + 0.6 * torch.rand(shape[0], generator=g)).to(device=device, dtype=t_dtype)
    return pred, x_t, t


@pytest.mark.parametrize("src,dst", PAIRS, ids=str)
@pytest.mark.parametrize("path", AFFINE_PATHS, ids=repr)
def test_matches_fp64_reference(backend, path, src, dst):
    pred, x_t, t = _data((3, 17), torch.float32, backend)
    out = fastflow.convert(pred, x_t, t, path=path, src=src, dst=dst)
    ref = reference_convert(pred.double(), x_t.double(), t.double(), path, src, dst)
    # Conversions amplify rounding by the size of their coefficients (up to ~30 here).
    err = ((out.double() - ref).abs() / ref.abs().clamp(min=1)).max().item()
    assert err < 3e-5, err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(backend, dtype):
    pred, x_t, t = _data((4, 9), dtype, backend)
    out = fastflow.convert(pred, x_t, t, path="cosine", src="data", dst="epsilon")
    ref = reference_convert(pred.double(), x_t.double(), t.double(), "cosine", "data", "epsilon")
    assert out.dtype == dtype
    # The fp64 oracle sees the same rounded inputs; output rounding is the dtype's.
    scale = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    assert ((out.double() - ref).abs() / ref.abs().clamp(min=1)).max() < scale[dtype]


@pytest.mark.parametrize("path", AFFINE_PATHS, ids=repr)
def test_agrees_with_the_interpolation_it_inverts(path):
    x0, x1 = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.8 + 0.1
    x_t, u_t = fastflow.interpolate(x0, x1, t, path=path)
    sigma = path(t)[1][:, None]
    for src, truth in (("data", x1), ("epsilon", x0), ("velocity", u_t), ("score", -x0 / sigma)):
        for dst, want in (("data", x1), ("epsilon", x0), ("velocity", u_t), ("score", -x0 / sigma)):
            got = fastflow.convert(truth, x_t, t, path=path, src=src, dst=dst)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"{src} -> {dst}")


@settings(max_examples=60, deadline=None)
@given(path=st.sampled_from(AFFINE_PATHS), src=st.sampled_from(KINDS), dst=st.sampled_from(KINDS),
       t=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_round_trip(path, src, dst, t, seed):
    pred, x_t, _ = _data((2, 5), torch.float64, "cpu", seed)
    there = fastflow.convert(pred, x_t, t, path=path, src=src, dst=dst)
    back = fastflow.convert(there, x_t, t, path=path, src=dst, dst=src)
    torch.testing.assert_close(back, pred, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("t", [0.0, 1.0])
@pytest.mark.parametrize("src,dst", PAIRS, ids=str)
def test_ends_stay_finite(src, dst, t):
    pred, x_t = torch.randn(2, 4), torch.randn(2, 4)
    for path in ("cond_ot", "cosine", "polynomial"):
        out = fastflow.convert(pred, x_t, t, path=path, src=src, dst=dst)
        ref = reference_convert(pred, x_t, t, path, src, dst)
        assert torch.isfinite(out).all(), (path, src, dst, t)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gradients_match_reference_autograd(backend):
    pred, x_t, t = _data((3, 4), torch.float64, backend, seed=3)
    for src, dst in (("epsilon", "velocity"), ("velocity", "score"), ("score", "data")):
        leaves = [x.clone().requires_grad_() for x in (pred, x_t, t)]
        ref_leaves = [x.clone().requires_grad_() for x in (pred, x_t, t)]
        w = torch.randn_like(pred)
        out = fastflow.convert(*leaves, path="cosine", src=src, dst=dst)
        ref = reference_convert(*ref_leaves, "cosine", src, dst)
        grads = torch.autograd.grad((out * w).sum(), leaves)
        ref_grads = torch.autograd.grad((ref * w).sum(), ref_leaves)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


# One C++ (CPU) or Triton (GPU) call builds the rows when t needs no gradient
# (conversions._conversion_rows), from the path's coefficient matrix; it repeats the PyTorch
# formulas and must give their bits, on every path, at the ends of [0, 1] where the divisors are
# clamped, outside it, at nan, and with an eps large enough to decide the clamping. (The matrix
# itself comes from the path's builder, whose own agreement tests/test_paths.py checks.)
NATIVE_TIMES = torch.cat([
    torch.tensor([0.0, 1e-300, 1e-7, 0.5, 1 - 1e-7, 1.0, -0.5, 1.5, float("nan")],
                 dtype=torch.float64),
    torch.rand(247, generator=torch.Generator().manual_seed(5), dtype=torch.float64)])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: nan, 1/0
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", AFFINE_PATHS + [paths.TargetCFM(0.05)], ids=repr)
def test_native_rows_are_the_formula_bits(backend, path, dtype):
    from conftest import bits_equal
    from fastflow._ops import coefficient_builder
    from fastflow.conversions import _conversion_rows, conversion_coefficients

    times = NATIVE_TIMES.to(backend)
    build = coefficient_builder(times, "conversion_coefficients")  # None: the reference's
    for (src, dst), eps in itertools.product(PAIRS, (1e-6, 0.25)):
        formula = conversion_coefficients(path, times, src, dst, eps).to(dtype)
        if build is None:
            assert bits_equal(_conversion_rows(path, times, src, dst, eps, dtype), formula)
            continue
        native = build(path.coefficients(times), src, dst, float(eps), dtype)
        assert native.shape == formula.shape == (len(times), 1, 2) and native.dtype == dtype
        # NaNs agree in place; their sign depends on operand order, which the compilers choose.
        nan = formula.isnan()
        assert torch.equal(native.isnan(), nan), (src, dst, eps)
        assert bits_equal(native[~nan], formula[~nan]), (src, dst, eps)
        # The op's rows: the same builder on the path's built coefficients.
        built = build(paths.coefficients(path, times, torch.float64), src, dst, float(eps), dtype)
        assert bits_equal(_conversion_rows(path, times, src, dst, eps, dtype), built)


def test_native_rows_leave_gradients_to_pytorch():
    from fastflow.conversions import _conversion_rows

    t = torch.rand(5, dtype=torch.float64, requires_grad=True)
    rows = _conversion_rows(paths.CondOT(), t, "epsilon", "velocity", 1e-6, torch.float32)
    assert rows.grad_fn is not None
    rows.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(3, 2, 2, dtype=torch.float64), "noise", "data", 1e-6, torch.float32),
     "src must be"),
    ((torch.zeros(3, 2, 2, dtype=torch.float64), "data", "x1", 1e-6, torch.float32),
     "dst must be"),
    ((torch.zeros(3, 2, 2), "data", "score", 1e-6, torch.float32), r"\[G, 2, 2\] float64"),
    ((torch.zeros(3, 2, 3, dtype=torch.float64), "data", "score", 1e-6, torch.float32),
     r"\[G, 2, 2\] float64"),
    ((torch.zeros(3, 2, 2, dtype=torch.float64), "data", "score", 1e-6, torch.float16),
     "float32 or float64"),
])
def test_native_rows_reject_bad_calls(args, message):
    from conftest import compiled_extension

    with pytest.raises(ValueError, match=message):
        compiled_extension().conversion_coefficients_cpu(*args)


def test_torch_compile_fullgraph():
    pred, x_t, t = _data((4, 6), torch.float32, "cpu")
    compiled = torch.compile(lambda p, x, s: fastflow.convert(p, x, s, path="vp", src="epsilon",
                                                                dst="velocity"), fullgraph=True)
    torch.testing.assert_close(compiled(pred, x_t, t),
                               fastflow.convert(pred, x_t, t, path="vp", src="epsilon"))


@pytest.mark.parametrize("eps", [float("nan"), -1e-6, 0.0, float("inf")], ids=repr)
def test_eps_must_be_finite_and_positive(backend, eps):
    pred, x_t, _ = _data((3, 4), torch.float32, backend)
    t = torch.tensor([0.0, 0.5, 1.0], device=backend)   # t = 0 divides by a clamped alpha
    with pytest.raises(ValueError, match="eps: expected a finite positive number, got"):
        fastflow.convert(pred, x_t, t, eps=eps)


@pytest.mark.parametrize("eps", [None, "1e-6", True, torch.tensor(1e-6)], ids=repr)
def test_eps_must_be_a_number(eps):
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="eps: expected a finite positive number, got"):
        fastflow.convert(x, x, 0.5, eps=eps)


class TestBadInput:
    def test_unknown_kind(self):
        x = torch.randn(2, 3)
        with pytest.raises(ValueError, match="src: expected one of"):
            fastflow.convert(x, x, 0.5, src="noise")
        with pytest.raises(ValueError, match="dst: expected one of"):
            fastflow.convert(x, x, 0.5, dst="x0")

    def test_path_without_alpha_sigma(self):
        x = torch.randn(2, 3)
        with pytest.raises(TypeError, match="path: conversions need an affine path"):
            fastflow.convert(x, x, 0.5, path="schrodinger_bridge")

    def test_mismatched_x_t(self):
        with pytest.raises(ValueError, match="x_t: expected shape"):
            fastflow.convert(torch.randn(2, 3), torch.randn(2, 4), 0.5)


@pytest.mark.parametrize("src,dst", [("data", "data"), ("epsilon", "epsilon"),
                                     ("epsilon", "score"), ("score", "epsilon"),
                                     ("score", "score")])
def test_rows_that_never_read_x_t_ignore_its_non_finite_values(backend, src, dst):
    # 0 * inf is NaN: streaming x_t with its exact-zero coefficient turned a NaN or inf in it
    # into NaN outputs, where the formula (and the reference) never reads x_t.
    pred = torch.randn(2, 3, device=backend)
    x_t = torch.tensor([[float("nan"), float("inf"), 1.0]] * 2, device=backend)
    got = fastflow.convert(pred, x_t, 0.5, path="cosine", src=src, dst=dst)
    want = fastflow.reference.convert(pred, x_t, 0.5, path="cosine", src=src, dst=dst)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)
