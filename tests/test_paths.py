"""fastflow.paths against closed forms written out here (DESIGN.md section 3) and torchcfm's
formulas for the extra-noise paths."""
import math

import pytest
import torch

import fastflow
from fastflow import paths
from fastflow.reference import interpolate as reference_interpolate

from conftest import assert_close_to_reference

T_GRID = [0.0, 1e-3, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0]


def _vp(beta_min, beta_max):
    def schedule(t):
        big_t = (1 - t) ** 2 * (beta_max - beta_min) / 2 + (1 - t) * beta_min
        alpha = math.exp(-big_t / 2)
        return alpha, math.sqrt(1 - alpha ** 2)
    return schedule


# (path, t -> (alpha_t, sigma_t)) with the table of DESIGN.md section 3, in Python floats.
AFFINE_PATHS = [
    (paths.CondOT(), lambda t: (t, 1 - t)),
    (paths.CondOT(sigma_min=0.1), lambda t: (t, 1 - 0.9 * t)),
    (paths.Polynomial(1), lambda t: (t, 1 - t)),
    (paths.Polynomial(2.5), lambda t: (t ** 2.5, 1 - t ** 2.5)),
    (paths.Cosine(), lambda t: (math.sin(math.pi * t / 2), math.cos(math.pi * t / 2))),
    (paths.LinearVP(), lambda t: (t, math.sqrt(1 - t * t))),
    (paths.VP(), _vp(0.1, 20.0)),
    (paths.VP(beta_min=0.5, beta_max=5.0), _vp(0.5, 5.0)),
    (paths.VP(beta_min=1.0, beta_max=1.0), _vp(1.0, 1.0)),
    (paths.TargetCFM(0.05), lambda t: (t, 1 - 0.95 * t)),
    (paths.TargetCFM(1.0), lambda t: (t, 1.0)),
]
AFFINE_IDS = [repr(p) for p, _ in AFFINE_PATHS]


def _t(values=T_GRID, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def test_a_path_is_its_repr():
    # Errors, test ids and cache keys show the repr: it must be the call that makes the path.
    for path in [p for p, _ in AFFINE_PATHS] + NOISE_PATHS:
        again = eval(repr(path), vars(paths))
        assert paths.value_key(again) == paths.value_key(path), repr(path)


@pytest.mark.parametrize("path,closed_form", AFFINE_PATHS, ids=AFFINE_IDS)
def test_schedules_match_closed_form(path, closed_form):
    alpha, sigma, _, _ = path(_t())
    expected = torch.tensor([closed_form(t) for t in T_GRID], dtype=torch.float64)
    torch.testing.assert_close(alpha, expected[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigma, expected[:, 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", [p for p, _ in AFFINE_PATHS], ids=AFFINE_IDS)
def test_derivatives_match_autograd(path):
    # Endpoints included. Where autograd is not finite (LinearVP: -inf, VP: nan from 0 * inf at
    # t = 1) the derivative is infinite too; elsewhere the two agree.
    t = _t(requires_grad=True)
    alpha, sigma, d_alpha, d_sigma = path(t)
    for value, derivative in ((alpha, d_alpha), (sigma, d_sigma)):
        grad, = torch.autograd.grad(value.sum(), t, retain_graph=True)
        finite = grad.isfinite()
        torch.testing.assert_close(derivative[finite], grad[finite], rtol=1e-10, atol=1e-12)
        assert derivative[~finite].isinf().all()
    assert d_alpha.isfinite().all()


# (path, alpha(0), sigma(0), alpha(1), sigma(1), atol): VP reaches pure noise only approximately.
ENDS = [
    (paths.CondOT(), 0.0, 1.0, 1.0, 0.0, 0.0),
    (paths.CondOT(sigma_min=0.1), 0.0, 1.0, 1.0, 0.1, 1e-16),
    (paths.Polynomial(2.5), 0.0, 1.0, 1.0, 0.0, 0.0),
    (paths.Cosine(), 0.0, 1.0, 1.0, 0.0, 1e-15),
    (paths.LinearVP(), 0.0, 1.0, 1.0, 0.0, 0.0),
    (paths.TargetCFM(0.05), 0.0, 1.0, 1.0, 0.05, 1e-16),
    (paths.VP(), 0.0, 1.0, 1.0, 0.0, 1e-2),
]


@pytest.mark.parametrize("path,alpha0,sigma0,alpha1,sigma1,atol", ENDS,
                         ids=[repr(e[0]) for e in ENDS])
def test_ends_of_the_schedules(path, alpha0, sigma0, alpha1, sigma1, atol):
    alpha, sigma, _, _ = path(_t([0.0, 1.0]))
    torch.testing.assert_close(alpha, _t([alpha0, alpha1]), rtol=0, atol=atol)
    torch.testing.assert_close(sigma, _t([sigma0, sigma1]), rtol=0, atol=atol)


@pytest.mark.parametrize("path", [paths.Cosine(), paths.LinearVP(), paths.VP(),
                                  paths.VP(0.5, 5.0)], ids=repr)
def test_variance_preserving_paths(path):
    alpha, sigma, _, _ = path(_t())
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(alpha), rtol=0, atol=1e-14)


@pytest.mark.parametrize("path", [p for p, _ in AFFINE_PATHS], ids=AFFINE_IDS)
def test_coefficients_layout(path):
    # Rows (x_t, u_t), columns (x0, x1): x_t = sigma x0 + alpha x1, u_t = d_sigma x0 + d_alpha x1.
    t = _t([0.2, 0.6])
    alpha, sigma, d_alpha, d_sigma = path(t)
    expected = torch.stack([torch.stack([sigma, alpha], 1), torch.stack([d_sigma, d_alpha], 1)], 1)
    assert torch.equal(path.coefficients(t), expected)


def _torchcfm(path, x0, x1, t, eps):
    """(x_t, u_t) as torchcfm writes them, with t broadcast as [B, 1, ...]."""
    t = t.reshape(-1, *([1] * (x1.dim() - 1)))
    if isinstance(path, paths.ConstantNoise):                   # ConditionalFlowMatcher (I-CFM)
        return t * x1 + (1 - t) * x0 + path.sigma * eps, x1 - x0
    if isinstance(path, paths.SchrodingerBridge):
        s_t = path.sigma * torch.sqrt(t * (1 - t))
        x_t = t * x1 + (1 - t) * x0 + s_t * eps
        return x_t, x1 - x0 + (1 - 2 * t) / (2 * t * (1 - t) + 1e-8) * s_t * eps
    # TargetConditionalFlowMatcher, its Gaussian sample being x0.
    sigma = path.sigma_min
    s = 1 - (1 - sigma) * t
    x_t = t * x1 + s * x0
    return x_t, (x1 - (1 - sigma) * x_t) / s


NOISE_PATHS = [paths.ConstantNoise(), paths.ConstantNoise(0.3), paths.SchrodingerBridge(),
               paths.SchrodingerBridge(0.5), paths.TargetCFM(0.1), paths.TargetCFM(0.02)]


@pytest.mark.parametrize("path", NOISE_PATHS, ids=repr)
def test_torchcfm_formulas(backend, path):
    g = torch.Generator().manual_seed(0)
    x0, x1, eps = (torch.randn(5, 3, 4, generator=g, dtype=torch.float64).to(backend)
                   for _ in range(3))
    t = torch.tensor([0.0, 0.1, 0.5, 0.77, 1.0], dtype=torch.float64, device=backend)
    noise = eps if path.uses_noise else None
    expected = _torchcfm(path, x0, x1, t, eps if path.uses_noise else torch.zeros_like(x0))
    for fn in (reference_interpolate, fastflow.interpolate):
        for got, want in zip(fn(x0, x1, t, path=path, noise=noise), expected, strict=True):
            assert_close_to_reference(got, want, torch.float64)


# name -> (class, attributes that DESIGN.md or torchcfm's defaults fix)
NAMES = {
    "cond_ot": (paths.CondOT, {"sigma_min": 0.0}),
    "polynomial": (paths.Polynomial, {}),
    "cosine": (paths.Cosine, {}),
    "linear_vp": (paths.LinearVP, {}),
    "vp": (paths.VP, {"beta_min": 0.1, "beta_max": 20.0}),
    "target_cfm": (paths.TargetCFM, {"sigma_min": 0.0}),
    "constant_noise": (paths.ConstantNoise, {"sigma": 0.0}),
    "schrodinger_bridge": (paths.SchrodingerBridge, {"sigma": 1.0}),
}


@pytest.mark.parametrize("name", NAMES)
def test_get_path_by_name(name):
    cls, attributes = NAMES[name]
    path = paths.get_path(name)
    assert type(path) is cls
    assert attributes.items() <= vars(path).items()


def test_get_path_of_none_and_of_a_path():
    default = paths.get_path(None)
    assert type(default) is paths.CondOT and default.sigma_min == 0.0
    cosine = paths.Cosine()
    assert paths.get_path(cosine) is cosine


@pytest.mark.parametrize("arg,error", [("CondOT", ValueError), ("", ValueError), (3, TypeError),
                                       (paths.Cosine, TypeError)], ids=repr)
def test_get_path_rejects(arg, error):
    with pytest.raises(error, match="path: "):
        paths.get_path(arg)


BAD_ARGUMENTS = [
    (paths.CondOT, {"sigma_min": -0.1}, ValueError, "CondOT: sigma_min"),
    (paths.CondOT, {"sigma_min": 1.0}, ValueError, "CondOT: sigma_min"),
    (paths.CondOT, {"sigma_min": 1.5}, ValueError, "CondOT: sigma_min"),
    # It named CondOT's sigma_min, and refused torchcfm's sigma = 1.
    (paths.TargetCFM, {"sigma": 1.5}, ValueError, r"TargetCFM: sigma must be in \[0, 1\]"),
    (paths.TargetCFM, {"sigma": "0.1"}, TypeError, "TargetCFM: sigma must be a number"),
    (paths.VP, {"beta_min": 2.0, "beta_max": 1.0}, ValueError, "VP: need 0 <= beta_min <= beta_"),
    (paths.VP, {"beta_min": -0.1}, ValueError, "VP: need 0 <= beta_min"),
    # No noise at any t: u_t was 0 / 0 everywhere.
    (paths.VP, {"beta_min": 0.0, "beta_max": 0.0}, ValueError, "VP: need .* beta_max > 0"),
    (paths.Polynomial, {"n": "2"}, TypeError, "Polynomial: n must be a number"),
    (paths.Polynomial, {"n": None}, TypeError, "Polynomial: n must be a number"),
    (paths.Polynomial, {"n": True}, TypeError, "Polynomial: n must be a number"),
    (paths.ConstantNoise, {"sigma": -0.1}, ValueError, "ConstantNoise: sigma must be >= 0"),
    (paths.SchrodingerBridge, {"sigma": 0.0}, ValueError, "SchrodingerBridge: sigma must be pos"),
    (paths.SchrodingerBridge, {"sigma": -1.0}, ValueError, "SchrodingerBridge: sigma must be pos"),
    # Infinite parameters would give nan and inf coefficients without a word.
    (paths.Polynomial, {"n": float("inf")}, ValueError, "Polynomial: n must be finite"),
    (paths.VP, {"beta_max": float("inf")}, ValueError, "VP: beta_max must be finite"),
    (paths.ConstantNoise, {"sigma": float("inf")}, ValueError, "ConstantNoise: sigma must be fin"),
    (paths.SchrodingerBridge, {"sigma": float("inf")}, ValueError, "SchrodingerBridge: sigma must be f"),
    (paths.CondOT, {"sigma_min": float("nan")}, ValueError, "CondOT: sigma_min must be finite"),
    (paths.CondOT, {"sigma_min": "0.1"}, TypeError, "CondOT: sigma_min must be a number, got str"),
    (paths.SchrodingerBridge, {"sigma": "1"}, TypeError, "SchrodingerBridge: sigma must be a num"),
    (paths.VP, {"beta_min": None}, TypeError, "VP: beta_min must be a number"),
    # .item() would detach it: the loss then silently had no gradient to the parameter.
    (paths.CondOT, {"sigma_min": torch.tensor(0.1, requires_grad=True)}, ValueError,
     "CondOT: sigma_min is a tensor that requires grad"),
]


@pytest.mark.parametrize("cls,kwargs,error,message", BAD_ARGUMENTS,
                         ids=[f"{c.__name__}-{k}" for c, k, _, _ in BAD_ARGUMENTS])
def test_bad_constructor_arguments(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(**kwargs)


# The paths whose coefficients one call builds (csrc/paths_cpu.cpp, triton_kernels/paths.py), each
# beside parameters that exercise its formula: the arithmetic ones, which give PyTorch's bits,
# and those with sqrt, sin, exp or pow, whose libraries may round differently.
ARITHMETIC_PATHS = [paths.CondOT(), paths.CondOT(sigma_min=0.1), paths.TargetCFM(0.05),
                    paths.ConstantNoise(0.3), paths.ConstantNoise(0.0)]
TRANSCENDENTAL_PATHS = [paths.Polynomial(), paths.Polynomial(3.0), paths.Polynomial(0.7),
                        paths.Polynomial(0.5), paths.Polynomial(1.5),
                        paths.Cosine(), paths.LinearVP(), paths.VP(), paths.VP(0.5, 5.0),
                        paths.SchrodingerBridge(), paths.SchrodingerBridge(0.3)]
# Edge times, random ones, times outside [0, 1], infinities, nan.
NATIVE_TIMES = torch.cat([torch.tensor(T_GRID + [-0.5, 1.5, 1e-300, -math.inf, math.inf, math.nan],
                                       dtype=torch.float64),
                          torch.rand(997, generator=torch.Generator().manual_seed(3),
                                     dtype=torch.float64)])


def _native_and_formula(backend, path, dtype, times=NATIVE_TIMES):
    """The builder's coefficients (C++ on CPU, Triton under its interpreter; on a GPU, on the
    GPU) and the PyTorch formula's, at `times`. The builder's are None where the backend has
    none for the path (the reference backend; Polynomial under the Triton interpreter, which
    has no pow): then paths.coefficients must give the formula's bits."""
    from conftest import bits_equal

    assert type(path) in paths._NATIVE
    times = times.to(backend)
    name = fastflow._backends.select(times.device)
    build = fastflow._backends.kernels(name).path_coefficients
    native = build(times, *paths._NATIVE[type(path)](path), dtype, False) if build else None
    formula = path.coefficients(times).to(dtype)
    if native is None:
        assert name == "reference" or (name == "triton" and type(path) is paths.Polynomial)
        assert bits_equal(paths.coefficients(path, times, dtype), formula)
        return None, formula
    assert bits_equal(paths.coefficients(path, times, dtype), native)
    assert native.shape == formula.shape and native.dtype == dtype
    # The velocity loss's rows (1, -u_t), written by the same builder: u_t's bits, negated.
    residual = paths.velocity_residual(path, times, dtype)
    assert residual.shape == (len(times), 1, 1 + native.shape[2]) and residual.dtype == dtype
    assert bits_equal(residual[:, 0, 0], torch.ones_like(times, dtype=dtype))
    assert bits_equal(residual[:, 0, 1:], -native[:, 1])
    return native, formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ARITHMETIC_PATHS, ids=repr)
def test_native_coefficients_are_the_formula_bits(backend, path, dtype):
    from conftest import bits_equal

    native, formula = _native_and_formula(backend, path, dtype)
    assert native is None or bits_equal(native, formula)
    # An expanded (stride-0) t, as the loss passes for one time for the whole batch.
    one = NATIVE_TIMES[4:5].to(backend).expand(5)
    assert bits_equal(paths.coefficients(path, one, dtype), path.coefficients(one).to(dtype))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: sqrt(-x), 1/0
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", TRANSCENDENTAL_PATHS, ids=repr)
def test_native_coefficients_round_like_the_formula(backend, path, dtype):
    # To an ulp of the dtype in float32 (they agreed bit for bit on every time tried); in
    # float64 within the fp64 tolerance: VP's 1 - exp(-T) near t = 1 magnifies an ulp of exp.
    native, formula = _native_and_formula(backend, path, dtype)
    if native is None:
        return  # the formula's bits, checked above
    if dtype == torch.float32:
        torch.testing.assert_close(native, formula, rtol=2 ** -23, atol=0, equal_nan=True)
    else:
        scale = formula.abs().clamp(min=1).nan_to_num(1.0, 1.0, 1.0)
        torch.testing.assert_close(native / scale, formula / scale, rtol=0, atol=1e-12,
                                   equal_nan=True)


def _c_library():
    """The C library's exp, pow, sin, cos and sqrt, which csrc/paths_cpu.cpp falls back to
    (Python's math raises where they return inf, nan or 0)."""
    import ctypes

    libm = ctypes.CDLL(None)  # the interpreter's own symbols, the C library's among them
    for name, arity in (("exp", 1), ("pow", 2), ("sin", 1), ("cos", 1), ("sqrt", 1)):
        getattr(libm, name).restype = ctypes.c_double
        getattr(libm, name).argtypes = [ctypes.c_double] * arity
    return libm


def _ulps(a, b):
    """Distance in float64 ulps: 0 for equal bits (and for two NaNs), 1 for adjacent floats."""
    def order(x):
        bits = x.view(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFFFFFFFFFFFFFF), bits)
    return torch.where(a.isnan() & b.isnan(), 0, (order(a) - order(b)).abs())


def _vp_alpha(libm, t, beta_min=0.1, beta_max=20.0):
    s = 1.0 - t
    return libm.exp(-0.5 * (0.5 * (s * s) * (beta_max - beta_min) + s * beta_min))


def _uniform(low, high, count, seed):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(count, generator=g, dtype=torch.float64)


# (path, parameters, times inside vector_math.h's domain, times outside it, entry (row, column)
# -> (its formula with the C library's functions, ulps allowed inside the domain)).
VECTOR_MATH_CASES = [
    ("polynomial", [0.7], torch.logspace(-300, 3, 3001, dtype=torch.float64),
     [0.0, -0.0, -0.5, 1e-310],
     {(0, 1): (lambda m, t: m.pow(t, 0.7), 1), (1, 1): (lambda m, t: 0.7 * m.pow(t, 0.7 - 1.0), 2)}),
    # t^10 leaves the normal range (exp's domain) between 1e-33 and 1e-29.
    ("polynomial", [10.0],
     torch.cat([_uniform(0, 30, 3000, 1), torch.logspace(-33, -29, 1000, dtype=torch.float64)]),
     [0.0, -2.0, 1e-40, 1e80],
     {(0, 1): (lambda m, t: m.pow(t, 10.0), 1), (1, 1): (lambda m, t: 10.0 * m.pow(t, 9.0), 2)}),
    # Past |n| = 10 log's error would grow past an ulp of t^n: every sample takes the C library.
    ("polynomial", [40.0], _uniform(0, 30, 3000, 1), [],
     {(0, 1): (lambda m, t: m.pow(t, 40.0), 0), (1, 1): (lambda m, t: 40.0 * m.pow(t, 39.0), 0)}),
    ("polynomial", [1.5], _uniform(0, 2, 3000, 2), [0.0, -2.0],
     {(0, 1): (lambda m, t: m.pow(t, 1.5), 1), (1, 1): (lambda m, t: 1.5 * m.sqrt(t), 0)}),  # t ** 0.5 is sqrt
    ("cosine", [], torch.cat([_uniform(-4e4, 4e4, 3000, 3), torch.arange(-40000.0, 40001, 97)]),
     [5e4, -1e300],
     {(0, 0): (lambda m, t: m.cos(math.pi / 2 * t), 2), (0, 1): (lambda m, t: m.sin(math.pi / 2 * t), 2)}),
    ("vp", [0.1, 20.0], _uniform(-3, 2, 3000, 4), [-20.0, -1e3],
     {(0, 1): (_vp_alpha, 1)}),
]


@pytest.mark.parametrize("case", VECTOR_MATH_CASES, ids=lambda c: f"{c[0]}{c[1]}")
def test_vector_math_is_within_an_ulp_or_two_of_the_c_library(case):
    # The CPU builders compute exp, pow, sin and cos with branch-free polynomials
    # (csrc/vector_math.h) on a domain of ordinary arguments, and call the C library for the
    # rest (0, negatives, subnormals, infinities, nan, results that would underflow): those get
    # its bits exactly, whatever their neighbours in the batch.
    from conftest import compiled_extension

    name, params, inside, outside, entries = case
    libm = _c_library()
    outside = torch.tensor(outside + [math.inf, -math.inf, math.nan], dtype=torch.float64)
    t = torch.cat([inside, outside])[torch.randperm(len(inside) + len(outside),
                                                    generator=torch.Generator().manual_seed(0))]
    is_outside = torch.isin(t, outside) | t.isnan()
    c = compiled_extension().path_coefficients_cpu(t, name, params, torch.float64, False)
    for (row, column), (formula, allowed) in entries.items():
        expected = torch.tensor([formula(libm, v) for v in t.tolist()], dtype=torch.float64)
        distance = _ulps(c[:, row, column], expected)
        assert distance[~is_outside].max() <= allowed, (row, column)
        assert distance[is_outside].max() == 0, (row, column)


@pytest.mark.parametrize("n", [1.0, 2.0, 3.0])
def test_whole_polynomial_powers_give_pytorchs_bits_on_cpu(n):
    # torch.pow multiplies for the exponents 0 to 3 (t ** 2 is t * t), and so does the CPU
    # builder for n and n - 1 (whole_polynomial, no exp or log).
    from conftest import bits_equal

    path = paths.Polynomial(n)
    t = torch.cat([NATIVE_TIMES, _uniform(-3, 3, 1000, 6)])
    for dtype in (torch.float32, torch.float64):
        assert bits_equal(paths.coefficients(path, t, dtype, "cpu"),
                          path.coefficients(t).to(dtype))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: sqrt(-x), 1/0
@pytest.mark.parametrize("time_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ARITHMETIC_PATHS + TRANSCENDENTAL_PATHS, ids=repr)
def test_times_of_any_float_type_give_the_bits_of_their_float64_values(backend, path,
                                                                       time_dtype):
    # The builders read t in its own type (interpolate and convert pass it unconverted) and
    # widen it exactly; the PyTorch formulas get it converted to float64.
    from conftest import bits_equal

    times = NATIVE_TIMES.to(backend, time_dtype)
    for t in (times, times[::3]):  # contiguous, and strided
        for dtype in (torch.float32, torch.float64):
            assert bits_equal(paths.coefficients(path, t, dtype),
                              paths.coefficients(path, t.double(), dtype))


def test_native_coefficients_are_for_exact_types_only():
    class Steeper(paths.CondOT):
        def __call__(self, t):
            one = torch.ones_like(t)
            return 2 * t, 1 - 2 * t, 2 * one, -2 * one

    t = torch.rand(6, dtype=torch.float64)
    expected = Steeper().coefficients(t).float()
    assert torch.equal(paths.coefficients(Steeper(), t, torch.float32), expected)


def test_native_coefficients_leave_gradients_to_pytorch():
    t = torch.rand(6, dtype=torch.float64, requires_grad=True)
    coeffs = paths.coefficients(paths.CondOT(0.1), t, torch.float32)
    assert coeffs.grad_fn is not None
    coeffs.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(3, dtype=torch.float64), "sigmoid", [], torch.float32), "no native path"),
    ((torch.zeros(3, dtype=torch.float64), "cond_ot", [], torch.float32), "takes 1 parameters"),
    ((torch.zeros(3, dtype=torch.int64), "cond_ot", [0.0], torch.float32), "1-D floating-point"),
    ((torch.zeros(3, 1, dtype=torch.float64), "cond_ot", [0.0], torch.float32), "1-D floating"),
    ((torch.zeros(3, dtype=torch.float64), "cond_ot", [0.0], torch.float16), "float32 or float64"),
])
def test_native_coefficients_reject_bad_calls(args, message):
    from conftest import compiled_extension

    with pytest.raises(ValueError, match=message):
        compiled_extension().path_coefficients_cpu(*args, False)


def test_every_builder_refuses_16_bit_coefficients(backend):
    # The Triton builders stored 16-bit coefficients with one rounding (PyTorch's .to rounds
    # twice, through fp32) and their residual rows failed a static assert; the CPU's refuse.
    kernels = fastflow._backends.kernels(fastflow._backends.select(backend))
    t = torch.rand(3, dtype=torch.float64, device=backend)
    rows = torch.zeros(3, 2, 2, dtype=torch.float64, device=backend)
    builds = []
    if kernels.path_coefficients is not None:
        builds.append(lambda dtype: kernels.path_coefficients(t, "cond_ot", [0.0], dtype, False))
    if kernels.conversion_coefficients is not None:
        builds.append(lambda dtype: kernels.conversion_coefficients(rows, "epsilon", "velocity",
                                                                    1e-6, dtype))
    for build in builds:
        for dtype in (torch.float16, torch.bfloat16):
            with pytest.raises(ValueError, match="dtype must be float32 or float64"):
                build(dtype)


@pytest.mark.parametrize("path", [paths.ConstantNoise(0.5), paths.SchrodingerBridge(0.5),
                                  paths.CondOT(0.1)], ids=repr)
def test_integer_times_give_the_coefficients_of_their_float_values(path):
    # The noise paths built their matrix in t's type: sigma = 0.5 became 0 for integer t.
    t = torch.tensor([0, 1])
    assert torch.equal(path.coefficients(t), path.coefficients(t.float()))


def test_native_coefficients_of_a_large_batch_are_those_of_its_parts():
    # The C++ builders split their loop over the samples between threads from 16384 samples on
    # (one time per token, 2048 for the paths with exp, pow or sin); each sample's row must not
    # depend on the split, nor on whether its neighbours need the C library (t <= 0, inf, nan).
    from conftest import bits_equal

    t = torch.rand(40000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t[torch.randperm(40000, generator=torch.Generator().manual_seed(3))[:400]] = torch.tensor(
        [0.0, -1.0, math.inf, math.nan], dtype=torch.float64).repeat(100)
    x_t = torch.randn(40000, 2, generator=torch.Generator().manual_seed(2))
    for path in (paths.CondOT(0.1), paths.Cosine(), paths.SchrodingerBridge(0.5),
                 paths.Polynomial(0.7), paths.VP()):
        whole = paths.coefficients(path, t, torch.float32, "cpu")
        parts = [paths.coefficients(path, t[i:i + 5000], torch.float32, "cpu")
                 for i in range(0, 40000, 5000)]
        assert bits_equal(whole, torch.cat(parts))
    whole = fastflow.convert(x_t, x_t, t.float(), path="cosine")
    parts = [fastflow.convert(x_t[i:i + 5000], x_t[i:i + 5000], t[i:i + 5000].float(),
                              path="cosine") for i in range(0, 40000, 5000)]
    assert bits_equal(whole, torch.cat(parts))


def test_the_cpu_builders_take_float8_as_the_ops_do():
    # The coefficient matrix read float8 entries by hand with a dispatch that has no float8 (a
    # NotImplementedError); the path builder let float8 times reach the same dispatch.
    from conftest import bits_equal, compiled_extension

    t = torch.rand(4).to(torch.float8_e4m3fn)
    got = fastflow._ops.coefficient_matrix([t, 1.0], 1, 2, 4, torch.float32, t.device)
    assert bits_equal(got[:, 0, 0], t.float()) and bits_equal(got[:, 0, 1], torch.ones(4))
    with pytest.raises(ValueError, match=r"t must be a 1-D floating-point CPU tensor \(float16, bfloat16"):
        compiled_extension().path_coefficients_cpu(t, "cond_ot", [0.0], torch.float32, False)


def test_value_key_reads_no_instance_dict(monkeypatch):
    # torch.compile before PyTorch 2.13 cannot trace vars(path).items(): the key read it, a graph
    # break inside flow_matching_loss that fullgraph refused (test_losses' compiled steps).
    import builtins

    keys = {type(p): paths.value_key(p) for p in (paths.CondOT(0.1), paths.VP(0.2, 19.0))}

    def refuse(*args):
        raise AssertionError("vars() called")

    monkeypatch.setattr(builtins, "vars", refuse)
    assert paths.value_key(paths.CondOT(0.1)) == keys[paths.CondOT]
    assert paths.value_key(paths.VP(0.2, 19.0)) == keys[paths.VP]
    assert paths.value_key(paths.CondOT(0.2)) != keys[paths.CondOT]
