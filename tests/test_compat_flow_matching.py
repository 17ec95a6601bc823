"""fastflow.compat.flow_matching against flow_matching 1.0.10: its own path and solver test files
run against the drop-in; equality with the original schedulers, paths, conversions and
ODESolver; proof that the fused kernels and sampler did the work; what is delegated."""
import subprocess
import sys

import pytest
import torch

import fastflow
import peer_suites
from fastflow.compat.flow_matching import path as compat_path
from fastflow.compat.flow_matching import scheduler as compat_scheduler
from fastflow.compat.flow_matching import solver as compat_solver

REDIRECTS = {"flow_matching.path": "fastflow.compat.flow_matching.path",
             "flow_matching.path.scheduler": "fastflow.compat.flow_matching.scheduler",
             "flow_matching.solver": "fastflow.compat.flow_matching.solver"}
PEER_FILES = ["tests/path/test_path.py", "tests/path/test_schedule_transform.py",
              "tests/path/test_scheduler.py", "tests/solver/test_ode_solver.py",
              "tests/solver/test_discrete_solver.py", "tests/solver/test_riemannian_ode_solver.py"]
# flow_matching 1.0.10, as JUnit counts them: test_path 10, test_schedule_transform 1,
# test_scheduler 5, test_ode_solver 15 (7 tests and 8 subtests), test_discrete_solver 6,
# test_riemannian_ode_solver 13.
PEER_TESTS = 50

SCHEDULERS = [("CondOTScheduler", ()), ("PolynomialConvexScheduler", (2,)),
              ("PolynomialConvexScheduler", (0.7,)), ("VPScheduler", ()),
              ("VPScheduler", (0.5, 10.0)), ("LinearVPScheduler", ()), ("CosineScheduler", ())]
CONVERSIONS = ["target_to_velocity", "epsilon_to_velocity", "velocity_to_target",
               "epsilon_to_target", "velocity_to_epsilon", "target_to_epsilon"]
EXACT = (torch.float32, torch.float64)
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _fm():
    """The original modules (flow_matching.path, its scheduler, flow_matching.solver)."""
    pytest.importorskip("torchdiffeq", reason="needs torchdiffeq")
    pytest.importorskip("flow_matching", reason="needs flow_matching==1.0.10")
    import flow_matching.path
    import flow_matching.path.scheduler
    import flow_matching.solver
    return flow_matching.path, flow_matching.path.scheduler, flow_matching.solver


def _schedulers(name, args):
    _, sched, _ = _fm()
    return getattr(compat_scheduler, name)(*args), getattr(sched, name)(*args)


def _times(shape, dtype, seed=0):
    """Times inside (0, 1), away from the ends where conversions divide by zero."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64).mul(0.9).add(0.05).to(dtype)


def _randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_same(actual, expected, dtype=None):
    """Bit-equal for fp32 / fp64 data; within the dtype's tolerance (relative to fp64) for 16-bit
    data, where fastflow rounds once and flow_matching after every operator."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        actual.dtype, expected.dtype, actual.shape, expected.shape)
    dtype = dtype or actual.dtype
    if dtype in EXACT:
        assert torch.equal(actual, expected), (actual.double() - expected.double()).abs().max()
    else:
        torch.testing.assert_close(actual.double(), expected.double(), rtol=HALF_TOL[dtype] * 4,
                                   atol=HALF_TOL[dtype] * 4, equal_nan=True)


@pytest.fixture
def affine_calls(monkeypatch):
    """Records every fastflow._ops.affine / affine_out call as (inputs, outputs)."""
    calls = []
    real, real_out = fastflow._ops.affine, fastflow._ops.affine_out

    def spy(inputs, coeffs):
        calls.append((len(inputs), coeffs.shape[1]))
        return real(inputs, coeffs)

    def spy_out(inputs, coeffs, out):
        calls.append((len(inputs), len(out)))
        return real_out(inputs, coeffs, out)

    monkeypatch.setattr(fastflow._ops, "affine", spy)
    monkeypatch.setattr(fastflow._ops, "affine_out", spy_out)
    return calls


# ---------------------------------------------------------------------------- peer suite

def test_peer_suite(tmp_path):
    _fm()
    root = peer_suites.fetch("flow_matching", "1.0.10")
    result = peer_suites.run([root / f for f in PEER_FILES], REDIRECTS, tmp_path)
    assert result.failed == 0 and result.errors == 0 and result.passed >= PEER_TESTS, result.output


# ---------------------------------------------------------------------------- schedulers

@pytest.mark.parametrize("name,args", SCHEDULERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_schedulers_equal_the_original(name, args, dtype):
    ours, theirs = _schedulers(name, args)
    t = _times((3, 4), dtype)
    a, b = ours(t), theirs(t)
    for field in ("alpha_t", "sigma_t", "d_alpha_t", "d_sigma_t"):
        _assert_same(getattr(a, field), getattr(b, field))
    snr = a.alpha_t / a.sigma_t
    _assert_same(ours.snr_inverse(snr), theirs.snr_inverse(snr))
    if hasattr(theirs, "kappa_inverse"):
        _assert_same(ours.kappa_inverse(a.alpha_t), theirs.kappa_inverse(a.alpha_t))
        assert isinstance(ours, compat_scheduler.ConvexScheduler)


def test_scheduler_arguments_are_checked_like_the_original():
    with pytest.raises(AssertionError, match="positive"):
        compat_scheduler.PolynomialConvexScheduler(n=0)
    with pytest.raises(AssertionError, match="float or int"):
        compat_scheduler.PolynomialConvexScheduler(n="2")
    with pytest.raises(TypeError):
        compat_scheduler.Scheduler()          # abstract, as flow_matching's


def test_schedule_transformed_model_matches_the_original():
    _, sched, _ = _fm()

    class Model(torch.nn.Module):
        def forward(self, x, t, shift=0.0):
            return torch.sin(x) * t ** 2 + shift

    x = _randn((6, 3), torch.float32, 1)
    for t in (torch.tensor(0.3), _times((6, 1), torch.float32)):
        ours = compat_scheduler.ScheduleTransformedModel(
            Model(), compat_scheduler.CondOTScheduler(), compat_scheduler.CosineScheduler())
        theirs = sched.ScheduleTransformedModel(Model(), sched.CondOTScheduler(),
                                                sched.CosineScheduler())
        torch.testing.assert_close(ours(x=x, t=t, shift=0.5), theirs(x=x, t=t, shift=0.5),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(AssertionError, match="snr_inverse"):
        compat_scheduler.ScheduleTransformedModel(Model(), object(),
                                                  compat_scheduler.CosineScheduler())


# ---------------------------------------------------------------------------- paths

@pytest.mark.parametrize("name,args", SCHEDULERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5,), (4, 3), (3, 2, 5, 4)])
def test_sample_equals_the_original(name, args, dtype, shape, affine_calls):
    fm_path, _, _ = _fm()
    ours, theirs = _schedulers(name, args)
    x0, x1 = _randn(shape, dtype, 1), _randn(shape, dtype, 2)
    for t_dtype in (torch.float32, torch.float64):
        t = _times(shape[:1], t_dtype)
        a = compat_path.AffineProbPath(ours).sample(x_0=x0, x_1=x1, t=t)
        b = fm_path.AffineProbPath(theirs).sample(x_0=x0, x_1=x1, t=t)
        assert isinstance(a, compat_path.PathSample)
        _assert_same(a.x_t, b.x_t, dtype)
        _assert_same(a.dx_t, b.dx_t, dtype)
        assert a.x_0 is x0 and a.x_1 is x1 and a.t is t
    # One pass per sample, producing x_t and dx_t from (x_0, x_1).
    assert affine_calls == [(2, 2), (2, 2)]


@pytest.mark.parametrize("name,args", SCHEDULERS)
@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_conversions_equal_the_original(name, args, conversion, dtype, affine_calls):
    fm_path, _, _ = _fm()
    ours, theirs = _schedulers(name, args)
    shape = (4, 3, 5)
    pred, x_t = _randn(shape, dtype, 3), _randn(shape, dtype, 4)
    # t broadcasts against the data as flow_matching lets it: per sample, per element, one for
    # all, and along trailing dimensions (the kernel then takes one coefficient group per
    # element).
    t_shapes = [(4, 1, 1), (4, 3, 5), (), (1, 1, 5), (5,), (4, 3, 1)]
    for t_shape in t_shapes:
        for t_dtype in (torch.float32, torch.float64):
            t = _times(t_shape, t_dtype, seed=len(t_shape))
            a = getattr(compat_path.AffineProbPath(ours), conversion)(pred, x_t, t)
            b = getattr(fm_path.AffineProbPath(theirs), conversion)(pred, x_t, t)
            _assert_same(a, b, dtype)
    # One fused pass per conversion.
    assert len(affine_calls) == len(t_shapes) * 2 and all(c == (2, 1) for c in affine_calls)


def test_combine_equals_the_eager_expression_for_mixed_coefficients(affine_calls):
    """The fused map behind every method: numbers, 0-d tensors and tensors of different
    (leading-dimension) shapes in one row give the eager expression's result bit for bit."""
    x, y = _randn((4, 3, 5), torch.float32, 1), _randn((4, 3, 5), torch.float32, 2)
    rows = [[0.25, _times((4, 1, 1), torch.float32)],
            [torch.tensor(1.5), _times((1, 3, 1), torch.float32, 1)],
            [_times((4, 3, 5), torch.float32, 2), -2.0]]
    outputs = compat_path._combine(rows, [x, y])
    for row, out in zip(rows, outputs):
        _assert_same(out, row[0] * x + row[1] * y)
    assert affine_calls == [(2, 3)]


def test_broadcast_data_runs_the_eager_expression(affine_calls):
    """Inputs of two shapes (flow_matching broadcasts them) or t with more dimensions than the
    data: flow_matching's eager expression, same result."""
    fm_path, _, _ = _fm()
    x_t = _randn((4, 3, 5), torch.float32, 1)
    for pred, t in ((_randn((4, 1, 5), torch.float32, 2), _times((4, 1, 1), torch.float32)),
                    (_randn((4, 3, 5), torch.float32, 2), _times((2, 4, 1, 1), torch.float32))):
        a = compat_path.CondOTProbPath().target_to_velocity(pred, x_t, t)
        b = fm_path.CondOTProbPath().target_to_velocity(pred, x_t, t)
        _assert_same(a, b)
    assert affine_calls == []


def test_cond_ot_prob_path_is_the_cond_ot_affine_path():
    x0, x1 = _randn((6, 4), torch.float32, 1), _randn((6, 4), torch.float32, 2)
    t = _times(6, torch.float32)
    a = compat_path.CondOTProbPath().sample(x0, x1, t)
    assert isinstance(compat_path.CondOTProbPath().scheduler, compat_scheduler.CondOTScheduler)
    # The CondOT line bit for bit: (1 - t) x0 + t x1 and x1 - x0.
    assert torch.equal(a.x_t, (1 - t)[:, None] * x0 + t[:, None] * x1)
    assert torch.equal(a.dx_t, -torch.ones_like(t)[:, None] * x0 + torch.ones_like(t)[:, None] * x1)


def test_round_trips_through_every_prediction():
    path = compat_path.AffineProbPath(compat_scheduler.CosineScheduler())
    x0, x1 = _randn((8, 3), torch.float64, 1), _randn((8, 3), torch.float64, 2)
    t = _times(8, torch.float64)
    s = path.sample(x0, x1, t)
    tt = t[:, None]
    torch.testing.assert_close(path.velocity_to_target(s.dx_t, s.x_t, tt), x1)
    torch.testing.assert_close(path.velocity_to_epsilon(s.dx_t, s.x_t, tt), x0)
    torch.testing.assert_close(path.target_to_velocity(x1, s.x_t, tt), s.dx_t)
    torch.testing.assert_close(path.epsilon_to_velocity(x0, s.x_t, tt), s.dx_t)
    torch.testing.assert_close(path.target_to_epsilon(x1, s.x_t, tt), x0)
    torch.testing.assert_close(path.epsilon_to_target(x0, s.x_t, tt), x1)


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float64])
def test_gradients_equal_the_original(t_dtype):
    fm_path, sched, _ = _fm()
    grads = []
    for lib, schedulers in ((compat_path, compat_scheduler), (fm_path, sched)):
        x0 = _randn((5, 3), torch.float32, 1).requires_grad_()
        x1 = _randn((5, 3), torch.float32, 2).requires_grad_()
        t = _times(5, t_dtype).requires_grad_()
        path = lib.AffineProbPath(schedulers.VPScheduler())
        s = path.sample(x0, x1, t)
        v = path.epsilon_to_velocity(s.x_t, s.dx_t, t[:, None])
        (s.x_t.sum() + (s.dx_t ** 2).sum() + (0.3 * v).sum()).backward()
        grads.append((x0.grad, x1.grad, t.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sample_checks_shapes_like_the_original():
    path = compat_path.CondOTProbPath()
    x = torch.randn(10, 5)
    with pytest.raises(AssertionError):
        path.sample(x, x, torch.rand(5))
    with pytest.raises(AssertionError):
        path.sample(x, x, torch.rand(10, 1))
    path.assert_sample_shape(x, x, torch.rand(10))


def test_functorch_transforms_run_the_eager_expression():
    fm_path, _, _ = _fm()
    x0, x1, t = torch.randn(4, 5, 3), torch.randn(4, 5, 3), torch.rand(4, 5)
    ours = torch.vmap(lambda a, b, c: compat_path.CondOTProbPath().sample(a, b, c).x_t)
    theirs = torch.vmap(lambda a, b, c: fm_path.CondOTProbPath().sample(a, b, c).x_t)
    assert torch.equal(ours(x0, x1, t), theirs(x0, x1, t))


def test_compiles_without_graph_breaks(affine_calls):
    path = compat_path.AffineProbPath(compat_scheduler.CosineScheduler())

    def train_step(x0, x1, t):
        s = path.sample(x0, x1, t)
        return s.x_t, s.dx_t, path.epsilon_to_velocity(s.x_t, s.dx_t, t[:, None])

    # Seeded, and away from t = 0 where epsilon_to_velocity divides by alpha_t: Inductor's sin
    # and cos may differ from eager's in the last bit, which 1 / alpha_t would magnify.
    x0, x1 = _randn((8, 16), torch.float32, 1), _randn((8, 16), torch.float32, 2)
    t = _times(8, torch.float32)
    compiled = torch.compile(train_step, fullgraph=True)(x0, x1, t)
    for a, b in zip(compiled, train_step(x0, x1, t)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_delegated_path_names_are_the_originals_and_accept_our_schedulers():
    fm_path, _, _ = _fm()
    for name in ("GeodesicProbPath", "MixtureDiscreteProbPath", "DiscretePathSample"):
        assert getattr(compat_path, name) is getattr(fm_path, name)
    # flow_matching's mixture path asserts a ConvexScheduler: ours is registered as one.
    compat_path.MixtureDiscreteProbPath(compat_scheduler.CondOTScheduler())
    assert isinstance(fm_path.CondOTProbPath(), compat_path.ProbPath)
    assert isinstance(compat_path.CondOTProbPath(), fm_path.ProbPath)
    with pytest.raises(AttributeError):
        compat_path.NoSuchPath


def test_scheduler_module_is_importable_under_the_path_prefix():
    from fastflow.compat.flow_matching.path.scheduler import CosineScheduler
    assert CosineScheduler is compat_scheduler.CosineScheduler


# ---------------------------------------------------------------------------- ODESolver

class _Field(torch.nn.Module):
    """A nonlinear field that reads its extras, recording what it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, scale=1.0):
        self.calls.append((tuple(x.shape), x.dtype, tuple(t.shape), t.dtype))
        return torch.sin(x) * t * scale - 0.3 * x


GRIDS = [
    (torch.tensor([0.0, 1.0]), 0.1),
    (torch.tensor([0.0, 0.25, 0.33, 1.0]), 0.1),       # requested times between grid points
    (torch.tensor([1.0, 0.6, 0.0]), 0.07),             # backwards
    (torch.linspace(0, 1, 7), None),                   # the time grid itself
    (torch.tensor([1.0, 0.3, 0.2]), None),
    (torch.tensor([0.4, 0.5, 0.6]), 0.05),             # torchdiffeq's grid ends in a 0-length step
    (torch.tensor([0.8, 0.2], dtype=torch.float64), 0.05),   # ... and a tiny backward one
]


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "rk4"])
@pytest.mark.parametrize("grid,step_size", GRIDS, ids=range(len(GRIDS)))
@pytest.mark.parametrize("shape", [(4, 3), (3,), (2, 3, 2, 2)])
@pytest.mark.parametrize("return_intermediates", [False, True])
def test_ode_solver_equals_the_original(method, grid, step_size, shape, return_intermediates):
    _, _, fm_solver = _fm()
    x = _randn(shape, torch.float32, 5)
    ours, theirs = _Field(), _Field()
    a = compat_solver.ODESolver(ours).sample(x, step_size, method=method, time_grid=grid,
                                             return_intermediates=return_intermediates, scale=0.7)
    b = fm_solver.ODESolver(theirs).sample(x, step_size, method=method, time_grid=grid,
                                           return_intermediates=return_intermediates, scale=0.7)
    assert a.shape == b.shape and a.dtype == b.dtype
    if method == "euler" and grid.dtype == torch.float32:
        assert torch.equal(a, b), (a - b).abs().max()
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    # The model saw what flow_matching's sees: x shaped like x_init, a 0-d t in its dtype, the
    # extras (a missing `scale` would change every value).
    assert set(ours.calls) == {(shape, torch.float32, (), torch.float32)}


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "rk4"])
def test_ode_solver_fp64_equals_the_original(method):
    _, _, fm_solver = _fm()
    x = _randn((5, 2), torch.float64, 6)
    grid = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    a = compat_solver.ODESolver(_Field()).sample(x, 0.03, method=method, time_grid=grid,
                                                 return_intermediates=True)
    b = fm_solver.ODESolver(_Field()).sample(x, 0.03, method=method, time_grid=grid,
                                             return_intermediates=True)
    if method == "euler":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ode_solver_16_bit_is_at_least_as_accurate_as_the_original(dtype):
    _, _, fm_solver = _fm()
    x = _randn((64, 8), torch.float32, 7).to(dtype)
    exact = fm_solver.ODESolver(_Field()).sample(x.double(), 0.02, method="midpoint")
    ours = compat_solver.ODESolver(_Field()).sample(x, 0.02, method="midpoint")
    theirs = fm_solver.ODESolver(_Field()).sample(x, 0.02, method="midpoint")
    assert ours.dtype == dtype
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    assert err_ours <= max(err_theirs, HALF_TOL[dtype])


def test_ode_solver_runs_on_the_fused_sampler(monkeypatch):
    """No torchdiffeq, no flow_matching ODESolver: fastflow's sampler and its fused passes."""
    _, _, fm_solver = _fm()
    import flow_matching.solver.ode_solver as fm_ode
    import torchdiffeq

    def forbidden(*args, **kwargs):
        raise AssertionError("torchdiffeq ran")

    monkeypatch.setattr(torchdiffeq, "odeint", forbidden)
    monkeypatch.setattr(fm_ode, "odeint", forbidden)
    runs, launches = [], []
    real_call = fastflow.sampling.Sampler.__call__
    real_launcher = fastflow._ops.affine_out_launcher

    def call(self, *args, **kwargs):
        runs.append((self.method, len(self.grid) - 1))
        return real_call(self, *args, **kwargs)

    def launcher(*args, **kwargs):
        launch = real_launcher(*args, **kwargs)

        def counted(inputs, coeffs, out):
            launches.append(len(inputs))
            return launch(inputs, coeffs, out)
        return counted

    monkeypatch.setattr(fastflow.sampling.Sampler, "__call__", call)
    monkeypatch.setattr(fastflow._ops, "affine_out_launcher", launcher)
    x = torch.randn(4, 3)
    for method, fastflow_method, stages in [("euler", "euler", 1), ("midpoint", "midpoint", 2),
                                            ("heun2", "heun", 2), ("rk4", "rk4_38", 4)]:
        runs.clear()
        launches.clear()
        compat_solver.ODESolver(_Field()).sample(x, 0.1, method=method,
                                                 time_grid=torch.tensor([0.0, 0.5, 1.0]),
                                                 return_intermediates=True)
        assert runs == [(fastflow_method, 10)]
        assert len(launches) >= 10 * stages


def test_ode_solver_delegates_what_the_sampler_does_not_run(monkeypatch):
    _, _, fm_solver = _fm()
    import flow_matching.solver.ode_solver as fm_ode

    delegated = []
    real_sample = fm_ode.ODESolver.sample

    def sample(self, *args, **kwargs):
        delegated.append(kwargs["method"])
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(fm_ode.ODESolver, "sample", sample)
    model = _Field()
    solver = compat_solver.ODESolver(model)
    x = torch.randn(4, 3)
    for method, step in (("dopri5", None), ("heun3", 0.1), ("explicit_adams", 0.1)):
        a = solver.sample(x, step, method=method)
        b = real_sample(fm_ode.ODESolver(model), x_init=x, step_size=step, method=method)
        torch.testing.assert_close(a, b)
    assert delegated == ["dopri5", "heun3", "explicit_adams"]
    # Gradients through the solve: flow_matching's solver, with autograd.
    param = torch.nn.Parameter(torch.tensor(1.0))
    result = compat_solver.ODESolver(lambda x, t: x * 0 + param).sample(
        torch.zeros(2), 0.1, enable_grad=True)
    result.sum().backward()
    assert delegated[-1] == "euler" and param.grad.item() == pytest.approx(2.0)
    # compute_likelihood is flow_matching's.
    x_1, log_p = compat_solver.ODESolver(_Field()).compute_likelihood(
        torch.zeros(1, 2), lambda x: -0.5 * (x ** 2).sum(1), 0.1)
    assert x_1.shape == (1, 2) and log_p.shape == (1,)


def test_ode_solver_without_autograd_by_default():
    x = torch.randn(2, requires_grad=True)
    out = compat_solver.ODESolver(lambda x, t: x * 0 + 1).sample(x, 0.1)
    assert not out.requires_grad
    torch.testing.assert_close(out, x.detach() + 1)


def test_ode_solver_unbatched_and_scalar_states():
    # dx/dt = 3 t^2 from 0 to 1 adds 1, whatever the shape of x.
    for x in (torch.tensor([1.0, 0.0]), torch.tensor(2.0), torch.zeros(2, 1, 3)):
        seen = []

        def model(x, t):
            seen.append(x.shape)
            return torch.ones_like(x) * 3 * t ** 2
        out = compat_solver.ODESolver(model).sample(x, 0.001, method="midpoint")
        assert out.shape == x.shape and set(seen) == {x.shape}
        torch.testing.assert_close(out, x + 1, rtol=0, atol=1e-5)


def test_ode_solver_channels_last_state():
    _, _, fm_solver = _fm()
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)

    def model(x, t):
        return torch.sin(x) * t
    a = compat_solver.ODESolver(model).sample(x, 0.1, method="rk4")
    b = fm_solver.ODESolver(model).sample(x, 0.1, method="rk4")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_delegated_solver_names_are_the_originals():
    _, _, fm_solver = _fm()
    import flow_matching.solver.discrete_solver as discrete
    import flow_matching.solver.riemannian_ode_solver as riemannian
    assert compat_solver.MixtureDiscreteEulerSolver is discrete.MixtureDiscreteEulerSolver
    assert compat_solver.RiemannianODESolver is riemannian.RiemannianODESolver
    assert isinstance(compat_solver.ODESolver(_Field()), fm_solver.Solver)
    assert issubclass(compat_solver.RiemannianODESolver, compat_solver.Solver)


def test_delegation_without_flow_matching_says_what_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "flow_matching" or n.startswith("flow_matching.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flow_matching", None)     # import flow_matching fails
    solver = compat_solver.ODESolver(_Field())
    with pytest.raises(ImportError, match="pip install"):
        solver.sample(torch.randn(2, 2), None, method="dopri5")
    with pytest.raises(ImportError, match="flow_matching"):
        compat_path.GeodesicProbPath
    # The fused parts need no flow_matching.
    solver.sample(torch.randn(2, 2), 0.5)
    compat_path.CondOTProbPath().sample(torch.randn(2, 2), torch.randn(2, 2), torch.rand(2))


def test_import_hook_finds_the_peers_submodules_under_a_redirect():
    _fm()
    code = (
        "import importlib, sys\n"
        f"for name, target in {REDIRECTS!r}.items():\n"
        "    sys.modules[name] = importlib.import_module(target)\n"
        "from flow_matching.path import GeodesicProbPath, MixtureDiscreteProbPath\n"
        "from flow_matching.path.scheduler import CondOTScheduler\n"
        "from flow_matching.solver.riemannian_ode_solver import RiemannianODESolver\n"
        "import flow_matching.path.geodesic as g, flow_matching.solver as s\n"
        "assert s.__name__ == 'fastflow.compat.flow_matching.solver'\n"
        "assert g.__file__.endswith('geodesic.py') and 'fastflow' not in g.__file__\n"
        "MixtureDiscreteProbPath(CondOTScheduler())\n")
    _runs_in_a_fresh_process(code)


def _runs_in_a_fresh_process(code):
    """Run `code` in a new interpreter (imports are process-wide state) and check it passes."""
    done = subprocess.run([sys.executable, "-c", code + "print('ok')\n"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("fastflow_first", [True, False])
def test_isinstance_holds_after_plain_imports_in_either_order(fastflow_first):
    # Before, the classes were linked only once a delegated feature had been used: right after
    # the imports, isinstance failed and flow_matching refused fastflow's schedulers.
    _fm()
    ours = ("from fastflow.compat.flow_matching.scheduler import PolynomialConvexScheduler\n"
            "from fastflow.compat.flow_matching.scheduler import ScheduleTransformedModel\n"
            "from fastflow.compat.flow_matching.scheduler import SchedulerOutput as Output\n"
            "from fastflow.compat.flow_matching.path import CondOTProbPath\n"
            "from fastflow.compat.flow_matching.solver import ODESolver\n")
    theirs = ("from flow_matching.path import MixtureDiscreteProbPath, ProbPath\n"
              "from flow_matching.path.scheduler import ConvexScheduler, CondOTScheduler\n"
              "from flow_matching.solver import Solver\n"
              "from flow_matching.utils import ModelWrapper\n")
    code = ((ours + theirs if fastflow_first else theirs + ours)
            + "assert isinstance(CondOTProbPath(), ProbPath)\n"
              "assert isinstance(PolynomialConvexScheduler(2.0), ConvexScheduler)\n"
              "assert isinstance(ODESolver(lambda x, t: x), Solver)\n"
              "s = PolynomialConvexScheduler(2.0)\n"
              "assert isinstance(ScheduleTransformedModel(lambda x, t: x, s, s), ModelWrapper)\n"
              "import torch\n"
              "assert isinstance(CondOTScheduler()(torch.rand(2)), Output)\n"
              "MixtureDiscreteProbPath(scheduler=PolynomialConvexScheduler(2.0))\n"
              "import inspect, flow_matching.path.path as m\n"
              "assert 'class ProbPath' in inspect.getsource(m)\n")
    _runs_in_a_fresh_process(code)
