"""fastflow.compat.torchcfm against torchcfm 1.0.7: its own test files run against the drop-in,
bit-equality with the original classes on CPU, proof that the fused kernel did the work, and
the errors of bad input."""
import inspect
import sys
import warnings

import numpy as np
import pytest
import torch

import fastflow
import peer_suites
from fastflow.compat import torchcfm as compat

CLASSES = ["ConditionalFlowMatcher", "ExactOptimalTransportConditionalFlowMatcher",
           "TargetConditionalFlowMatcher", "SchrodingerBridgeConditionalFlowMatcher",
           "VariancePreservingConditionalFlowMatcher"]
OT_CLASSES = CLASSES[1], CLASSES[3]
# Fused passes per sample_location_and_conditional_flow: x_t and u_t together, except where
# torchcfm's u_t reads the rounded x_t (TargetCFM) or x_t - mu_t (Schrodinger bridge).
PASSES = dict(zip(CLASSES, [1, 1, 2, 3, 1]))
SIGMAS = [0.0, 5e-4, 0.5, 1.5, 0, 1]
SHAPES = [(1,), (3,), (2, 3), (3, 4, 5)]
PEER_TESTS = 129  # torchcfm 1.0.7: tests/test_conditional_flow_matcher.py 120, test_time_t.py 9


def _torchcfm():
    return pytest.importorskip("torchcfm.conditional_flow_matching",
                               reason="needs torchcfm==1.0.7 and pot")


def _pair(name, sigma):
    """The original and the drop-in, built alike (None for sigma where torchcfm refuses it)."""
    if name == "SchrodingerBridgeConditionalFlowMatcher" and sigma <= 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Schrodinger bridge's small-sigma warning
        return getattr(_torchcfm(), name)(sigma=sigma), getattr(compat, name)(sigma=sigma)


def _seeded(fn, *args, **kwargs):
    torch.manual_seed(1994)
    np.random.seed(1994)
    return fn(*args, **kwargs)


def _assert_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if isinstance(e, torch.Tensor):
            assert a.dtype == e.dtype and a.shape == e.shape, (a.dtype, e.dtype, a.shape, e.shape)
            assert torch.equal(a, e), f"max difference {(a.double() - e.double()).abs().max()}"
        else:
            assert a is e is None


@pytest.fixture
def fused_calls(monkeypatch):
    """Records the number of inputs of every fastflow._ops.affine call."""
    calls = []
    real = fastflow._ops.affine

    def spy(inputs, coeffs, backend=None):
        calls.append(len(inputs))
        return real(inputs, coeffs, backend)

    monkeypatch.setattr(fastflow._ops, "affine", spy)
    return calls


def test_peer_suite(tmp_path):
    _torchcfm()
    root = peer_suites.fetch("torchcfm", "1.0.7")
    result = peer_suites.run([root / "tests/test_conditional_flow_matcher.py",
                              root / "tests/test_time_t.py"],
                             {"torchcfm.conditional_flow_matching": "fastflow.compat.torchcfm"},
                             tmp_path)
    assert result.failed == 0 and result.errors == 0 and result.passed >= PEER_TESTS, result.output


def test_same_public_names_and_signatures():
    original = _torchcfm()
    public = [n for n, v in vars(original).items() if not n.startswith("_")
              and getattr(v, "__module__", None) == original.__name__]
    assert sorted(public) == sorted(compat.__all__)
    for name in public:
        ours, theirs = getattr(compat, name), getattr(original, name)
        if inspect.isfunction(theirs):
            assert inspect.signature(ours) == inspect.signature(theirs), name
            continue
        assert [c.__name__ for c in theirs.__mro__] == [
            c.__name__ for c in ours.__mro__ if not c.__name__.startswith("_")], name
        for attr, member in vars(theirs).items():
            if inspect.isfunction(member):
                assert inspect.signature(getattr(ours, attr)) == inspect.signature(member), \
                    f"{name}.{attr}"
    # The OTPlanSampler that torchcfm's module imports is reachable here too, and is torchcfm's.
    assert compat.OTPlanSampler is original.OTPlanSampler


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("given_t", [False, True], ids=["drawn_t", "given_t"])
@pytest.mark.parametrize("name", CLASSES)
def test_same_draws_and_bits_as_torchcfm(name, given_t, dtype, fused_calls):
    for sigma in SIGMAS:
        models = _pair(name, sigma)
        if models is None:
            continue
        for shape in SHAPES:
            x0, x1 = torch.randn(32, *shape, dtype=dtype), torch.randn(32, *shape, dtype=dtype)
            t = torch.rand(32, dtype=dtype) if given_t else None
            for return_noise in (False, True):
                theirs = _seeded(models[0].sample_location_and_conditional_flow, x0, x1, t=t,
                                 return_noise=return_noise)
                fused_calls.clear()
                ours = _seeded(models[1].sample_location_and_conditional_flow, x0, x1, t=t,
                               return_noise=return_noise)
                _assert_equal(ours, theirs)
                assert len(fused_calls) == PASSES[name]
                assert (ours[0] is t) if given_t else ours[0].dtype == dtype


def test_plain_icfm_takes_the_constant_noise_path(monkeypatch):
    # I-CFM's rows come from fastflow's ConstantNoise path where that gives torchcfm's bits (the
    # test above checks them), and only there: not for another matcher's rows, a tensor sigma,
    # or 16-bit data (whose t promotes in torchcfm's formulas).
    paths_taken = []
    real = compat.interpolate

    def spy(*args, **kwargs):
        paths_taken.append(kwargs["path"])
        return real(*args, **kwargs)

    monkeypatch.setattr(compat, "interpolate", spy)
    x0, x1 = torch.randn(8, 3), torch.randn(8, 3)
    compat.ConditionalFlowMatcher(0.25).sample_location_and_conditional_flow(x0, x1)
    assert [p.sigma for p in paths_taken] == [0.25]
    for matcher, data in ((compat.VariancePreservingConditionalFlowMatcher(0.25), (x0, x1)),
                          (compat.ConditionalFlowMatcher(torch.tensor(0.25)), (x0, x1)),
                          (compat.ConditionalFlowMatcher(0.25), (x0.half(), x1.half()))):
        matcher.sample_location_and_conditional_flow(*data)
    assert len(paths_taken) == 1


@pytest.mark.parametrize("return_noise", [False, True])
@pytest.mark.parametrize("name", OT_CLASSES)
def test_guided_matches_torchcfm(name, return_noise, fused_calls):
    theirs_fm, ours_fm = _pair(name, 0.5)
    x0, x1 = torch.randn(64, 2), torch.randn(64, 2)
    y0, y1 = torch.randint(10, (64, 1)), torch.randint(10, (64, 1))
    for y in ((y0, y1), (None, None)):
        theirs = _seeded(theirs_fm.guided_sample_location_and_conditional_flow, x0, x1, *y,
                         return_noise=return_noise)
        fused_calls.clear()
        ours = _seeded(ours_fm.guided_sample_location_and_conditional_flow, x0, x1, *y,
                       return_noise=return_noise)
        _assert_equal(ours, theirs)
        assert len(fused_calls) == PASSES[name]


@pytest.mark.parametrize("name", CLASSES)
def test_each_method_matches_torchcfm(name, fused_calls):
    """The public pieces one by one, t as [B], [B, 1] and (where torchcfm takes it) a float."""
    theirs_fm, ours_fm = _pair(name, 0.3)
    x0, x1, eps, xt = (torch.randn(17, 3, 5) for _ in range(4))
    for t in (torch.rand(17), torch.rand(17, 1, 1), 0.3):
        for method, args in [("compute_mu_t", (x0, x1, t)), ("sample_xt", (x0, x1, t, eps)),
                             ("compute_conditional_flow", (x0, x1, t, xt)),
                             ("compute_sigma_t", (t,)), ("compute_lambda", (t,))]:
            try:
                expected = getattr(theirs_fm, method)(*args)
            except TypeError:  # torch.sqrt of a float (Schrodinger bridge): same error here
                with pytest.raises(TypeError):
                    getattr(ours_fm, method)(*args)
                continue
            fused_calls.clear()
            actual = getattr(ours_fm, method)(*args)
            if isinstance(expected, torch.Tensor):
                _assert_equal([actual], [expected])
            else:
                assert actual == expected
            streamed = method not in ("compute_sigma_t", "compute_lambda")
            assert bool(fused_calls) == streamed, (method, fused_calls)


@pytest.mark.parametrize("name", CLASSES)
def test_subclass_overrides_are_honoured(name):
    """torchcfm composes sample_xt from compute_mu_t and compute_sigma_t: a subclass's own
    compute_sigma_t must change x_t here too."""
    def subclass(base):
        return type("Mine", (base,), {"compute_sigma_t": lambda self, t: 0.1 + t})

    theirs_fm, ours_fm = _pair(name, 0.5)
    theirs_fm.__class__, ours_fm.__class__ = subclass(type(theirs_fm)), subclass(type(ours_fm))
    x0, x1 = torch.randn(64, 2, 3), torch.randn(64, 2, 3)
    _assert_equal(_seeded(ours_fm.sample_location_and_conditional_flow, x0, x1, return_noise=True),
                  _seeded(theirs_fm.sample_location_and_conditional_flow, x0, x1,
                          return_noise=True))


@pytest.mark.parametrize("name", CLASSES)
def test_gradients_match_torchcfm(name):
    """Autograd reaches t (through the coefficients) and the data (through the kernel)."""
    grads = []
    for fm in _pair(name, 0.3):
        x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
        x1 = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
        t = torch.linspace(0.05, 0.95, 16, requires_grad=True)
        # The base class's method: no OT coupling, so the two see the same pairs.
        _, xt, ut = _seeded(type(fm).__mro__[-2].sample_location_and_conditional_flow, fm, x0,
                            x1, t)
        (xt.square().sum() + (ut * xt).sum()).backward()
        grads.append((t.grad, x1.grad))
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CLASSES)
def test_a_learnable_sigma_records_what_torchcfm_records(name):
    # x_t depends on a tensor sigma, u_t not (except through x_t for TargetCFM and the bridge):
    # the fused pass of both once recorded u_t as a function of sigma too.
    results = []
    for fm in _pair(name, 0.3):
        fm.sigma = torch.tensor(0.3, requires_grad=True)
        x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
        x1 = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
        t = torch.linspace(0.05, 0.95, 8)
        _, xt, ut = _seeded(type(fm).__mro__[-2].sample_location_and_conditional_flow, fm, x0,
                            x1, t)
        (xt.square().sum() + (ut * xt).sum()).backward()
        results.append((ut.requires_grad, xt.requires_grad, fm.sigma.grad))
    (ours_ut, ours_xt, ours_grad), (theirs_ut, theirs_xt, theirs_grad) = results[1], results[0]
    assert (ours_ut, ours_xt) == (theirs_ut, theirs_xt)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CLASSES)
def test_half_precision_close_to_fp32(name, dtype):
    """16-bit data are computed in fp32 and rounded once: close to torchcfm, not bit-equal."""
    theirs_fm, ours_fm = _pair(name, 0.5)
    x0, x1 = torch.randn(32, 4, 4).to(dtype), torch.randn(32, 4, 4).to(dtype)
    t = torch.rand(32).clamp(0.05, 0.95)
    # The noise ours draws (randn_like of the 16-bit x0), widened: a 16-bit randn is not the
    # fp32 one rounded in every PyTorch (before 2.13 the CPU draws of 16 or more differ).
    theirs_fm.sample_noise_like = lambda x: torch.randn_like(x, dtype=dtype).float()
    theirs = _seeded(type(theirs_fm).__mro__[-2].sample_location_and_conditional_flow, theirs_fm,
                     x0.float(), x1.float(), t)
    _, xt, ut = _seeded(type(ours_fm).__mro__[-2].sample_location_and_conditional_flow, ours_fm,
                        x0, x1, t.to(dtype))
    assert xt.dtype == ut.dtype == dtype
    for a, e in zip((xt, ut), theirs[1:]):
        torch.testing.assert_close(a.float(), e, rtol=2e-2, atol=5e-2)


def test_bad_input_raises_clear_errors():
    fm = compat.ConditionalFlowMatcher(sigma=0.1)
    x0, x1 = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"x1: expected shape \(4, 3\)"):
        fm.sample_location_and_conditional_flow(x0, torch.randn(4, 2))
    # torchcfm asserts; ours is also a ValueError that says what was wrong.
    for error in (ValueError, AssertionError):
        with pytest.raises(error, match="batch size.*5 times for a batch of 4"):
            fm.sample_location_and_conditional_flow(x0, x1, t=torch.rand(5))
    with pytest.raises(TypeError, match="t: expected a tensor"):
        fm.sample_location_and_conditional_flow(x0, x1, t=0.5)
    with pytest.raises(ValueError, match="one time per sample of the batch of 4"):
        fm.compute_mu_t(x0, x1, torch.rand(4, 2))
    with pytest.raises(TypeError, match="x0: expected floating-point tensors, got torch.int64"):
        fm.compute_conditional_flow(x0.long(), x1.long(), torch.rand(4), None)
    with pytest.raises(TypeError, match="t: expected floating-point tensors, got torch.complex64"):
        fm.compute_mu_t(x0, x1, torch.rand(4, dtype=torch.complex64))   # it blamed x0
    with pytest.raises(TypeError, match="x0: expected a tensor"):
        fm.compute_mu_t([1.0], x1, torch.rand(4))
    with pytest.raises(RuntimeError):  # torchcfm's own failure: no normal draw for integers
        fm.sample_location_and_conditional_flow(x0.long(), x1.long())
    # A meta t made TargetCFM's in-place division a no-op: u_t without its division.
    with pytest.raises(ValueError, match="t: expected a tensor on cpu"):
        compat.TargetConditionalFlowMatcher(0.5).compute_conditional_flow(
            x0, x1, torch.full((4,), 0.5, device="meta"), x1)
    for sigma in (0, -1.0):
        with pytest.raises(ValueError, match="strictly positive"):
            compat.SchrodingerBridgeConditionalFlowMatcher(sigma=sigma)


@pytest.mark.parametrize("name", CLASSES)
def test_a_numpy_sigma_works_as_its_float(name):
    # np.float32(0.5) became an array in pad_t_like_x, then a pybind11 argument error (torchcfm
    # fails there too): it now gives what float(sigma) gives.
    x0, x1, t = torch.randn(8, 3), torch.randn(8, 3), torch.rand(8)
    for value in (np.float32(0.5), np.float64(0.25), np.int64(1)):
        sampled = [_seeded(getattr(compat, name)(sigma=sigma).sample_location_and_conditional_flow,
                           x0, x1, t=t) for sigma in (value, float(value))]
        _assert_equal(*sampled)


def test_small_sigma_warns_like_torchcfm():
    _torchcfm()
    with pytest.warns(UserWarning, match="Small sigma"):
        compat.SchrodingerBridgeConditionalFlowMatcher(sigma=5e-4)


@pytest.mark.parametrize("missing, hint", [("torchcfm", "pip install"), ("ot", "pip install pot")])
def test_missing_ot_dependencies_say_what_to_install(monkeypatch, missing, hint):
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ImportError, match=hint):
        compat.ExactOptimalTransportConditionalFlowMatcher()
    with pytest.raises(ImportError, match=hint):
        getattr(compat, "OTPlanSampler")
    # The matchers without a plan need neither.
    t, xt, ut = compat.ConditionalFlowMatcher().sample_location_and_conditional_flow(
        torch.randn(2, 3), torch.randn(2, 3))
    assert xt.shape == ut.shape == (2, 3)


@pytest.mark.parametrize("name", ["ConditionalFlowMatcher", "TargetConditionalFlowMatcher",
                                  "VariancePreservingConditionalFlowMatcher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_output_dtypes_follow_pytorch_promotion(name, dtype):
    # A 0-d tensor sigma does not widen the data (u_t came back fp64 beside fp32 data), nor
    # does noise of another dtype widen I-CFM's u_t = x1 - x0.
    orig = _torchcfm()
    x0, x1, t = torch.randn(4, 3).to(dtype), torch.randn(4, 3).to(dtype), torch.rand(4)
    for sigma in (torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.25), 0.25):
        want = _seeded(getattr(orig, name)(sigma=sigma).sample_location_and_conditional_flow,
                       x0, x1, t=t)
        got = _seeded(getattr(compat, name)(sigma=sigma).sample_location_and_conditional_flow,
                      x0, x1, t=t)
        assert [x.dtype for x in got] == [x.dtype for x in want]

    class Wide(getattr(compat, name)):
        def sample_noise_like(self, x):
            return torch.randn_like(x, dtype=torch.float64)

    class WideOriginal(getattr(orig, name)):
        def sample_noise_like(self, x):
            return torch.randn_like(x, dtype=torch.float64)

    want = _seeded(WideOriginal(0.1).sample_location_and_conditional_flow, x0, x1, t=t)
    got = _seeded(Wide(0.1).sample_location_and_conditional_flow, x0, x1, t=t)
    assert [x.dtype for x in got] == [x.dtype for x in want]
