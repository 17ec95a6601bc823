"""fastflow.sample / Sampler: against the plain reference loop, torchdiffeq and diffusers'
Euler scheduler; convergence order on a Gaussian flow with an exact solution; guidance math;
intermediates, callbacks, capture; bad input."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastflow
from conftest import bits_equal
from fastflow import reference, sampling

METHODS = ["euler", "midpoint", "heun", "rk4", "rk4_38"]


class Net(torch.nn.Module):
    """A small smooth model of (x, t) with an optional additive condition y."""

    def __init__(self, dim=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, dim))
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        out = self.net.to(x.dtype)(torch.cat([x, t[:, None].to(x.dtype)], dim=1))
        return out if y is None else out + y.to(out.dtype)


def _scaled_error(out, ref):
    return ((out.double() - ref.double()).abs() / ref.double().abs().clamp(min=1)).max().item()


GUIDANCE = {
    "none": ({}, {}),
    "cfg": (dict(guidance_scale=2.5), dict(guidance_scale=2.5)),
    "per-sample": (dict(guidance_scale=torch.linspace(0, 3, 8)),
                   dict(guidance_scale=torch.linspace(0, 3, 8))),
    "zero-star": (dict(guidance_scale=3.0, guidance="cfg_zero_star", zero_init_steps=1),
                  dict(guidance_scale=3.0, cfg_zero_star=True, zero_init_steps=1)),
    "doubled": (dict(guidance_scale=2.0, doubled_batch=True),
                dict(guidance_scale=2.0, doubled_batch=True)),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prediction,convention", [("velocity", "t"), ("velocity", "sigma"),
                                                   ("epsilon", "t"), ("data", "sigma"),
                                                   ("score", "t")])
def test_matches_reference_loop(backend, method, prediction, convention):
    model = Net()
    x0 = torch.randn(8, 2, device=backend)
    model.to(backend)
    # Away from the ends, where noise and data predictions divide by alpha_t or sigma_t.
    grid = torch.linspace(0.05, 0.95, 5).tolist()
    y = torch.randn(8, 2, device=backend)
    for name, (ours, theirs) in GUIDANCE.items():
        kwargs = {"y": torch.cat([torch.zeros_like(y), y]) if name == "doubled" else y}
        common = dict(method=method, prediction=prediction, path="cosine",
                      time_convention=convention)
        with torch.no_grad():
            out = fastflow.sample(model, x0, time_grid=torch.tensor(grid), model_kwargs=kwargs,
                                  uncond_kwargs={}, **common, **ours)
            ref = reference.sample(model, x0, grid, model_kwargs=kwargs, uncond_kwargs={},
                                   **common, **theirs)
        assert out.dtype == x0.dtype and out.shape == x0.shape
        tol = 2e-6 if prediction == "velocity" else 1e-4  # conversions amplify rounding ~20x
        assert _scaled_error(out, ref) < tol, name


@settings(max_examples=300, deadline=None, derandomize=True)   # the same draws in every CI run
@given(method=st.sampled_from(METHODS), guidance=st.sampled_from(list(GUIDANCE)),
       prediction=st.sampled_from(["velocity", "epsilon", "data", "score"]),
       path=st.sampled_from(["cond_ot", "cosine", "vp", "linear_vp"]),
       convention=st.sampled_from(["t", "sigma"]), interval=st.booleans(),
       x_dtype=st.sampled_from([torch.float32, torch.float64]),
       state_dtype=st.sampled_from([None, torch.float32, torch.float64]),
       out_dtype=st.sampled_from([None, torch.float32, torch.float64]),
       steps=st.integers(1, 4), decreasing=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_random_combinations_of_options_match_the_reference_loop(
        method, guidance, prediction, path, convention, interval, x_dtype, state_dtype, out_dtype,
        steps, decreasing, seed):
    # The options one at a time are tested above; their combinations here. One of them (guided
    # rk4_38 with fp64 x_init, an fp32 state and an fp32 model) crashed in the kernel.
    g = torch.Generator().manual_seed(seed)
    grid = sorted((0.05 + 0.9 * torch.rand(steps + 1, generator=g, dtype=torch.float64)).tolist())
    grid = grid[::-1] if decreasing else grid
    if len(set(grid)) < len(grid):
        return
    net = Net()
    model = lambda x, t, y=None: net(x, t, y).to(out_dtype or x.dtype)  # noqa: E731
    x0, y = (torch.randn(8, 2, generator=g, dtype=x_dtype) for _ in range(2))
    ours, theirs = GUIDANCE[guidance]
    kwargs = {"y": torch.cat([torch.zeros_like(y), y]) if guidance == "doubled" else y}
    span = tuple(sorted((grid[0], grid[len(grid) // 2]))) if interval else None  # first half
    common = dict(method=method, prediction=prediction, path=path, time_convention=convention,
                  guidance_interval=span)
    state = state_dtype or (torch.float64 if x_dtype == torch.float64 else torch.float32)
    out = fastflow.sample(model, x0, time_grid=grid, model_kwargs=kwargs, uncond_kwargs={},
                          state_dtype=state_dtype, **common, **ours)
    ref = reference.sample(model, x0, grid, model_kwargs=kwargs, uncond_kwargs={},
                           state_dtype=state, **common, **theirs)
    assert out.dtype == x_dtype and out.shape == x0.shape
    exact = torch.float32 not in (x_dtype, state, out_dtype)
    tol = 1e-9 if exact else 2e-6 if prediction == "velocity" else 1e-4
    assert _scaled_error(out, ref) < tol


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_fp32_state_with_a_16_bit_model(backend, method, model_dtype):
    model = Net().to(backend)
    x0 = torch.randn(16, 2, device=backend).to(model_dtype)
    with torch.no_grad():
        out = fastflow.sample(model, x0, steps=8, method=method)
        ref = reference.sample(model, x0, torch.linspace(0, 1, 9).tolist(), method=method)
        low = reference.sample(model, x0, torch.linspace(0, 1, 9).tolist(), method=method,
                               state_dtype=model_dtype)
    assert out.dtype == model_dtype
    # The model sees the same rounded inputs: equal up to the final rounding to 16 bits.
    assert _scaled_error(out, ref) <= 2 ** -7
    exact = reference.sample(model, x0.float(), torch.linspace(0, 1, 9).tolist(), method=method)
    assert _scaled_error(out, exact) <= _scaled_error(low, exact) + 2 ** -8


class GaussianFlow:
    """The CondOT marginal velocity from N(0, 1) to N(m, s^2): affine in x, with the exact flow
    x(1) = m + s x(0)."""

    def __init__(self, m=0.7, s=0.4):
        self.m, self.s = m, s

    def __call__(self, x, t):
        t = t[:, None].to(x.dtype)
        var = t ** 2 * self.s ** 2 + (1 - t) ** 2
        d_var = 2 * t * self.s ** 2 - 2 * (1 - t)
        return self.m + d_var / (2 * var) * (x - t * self.m)


def _rates(field, x0, truth, method, steps):
    errors = [(fastflow.sample(field, x0, steps=n, method=method) - truth).abs().max().item()
              for n in steps]
    return [math.log2(e0 / e1) for e0, e1 in zip(errors, errors[1:])]


ORDERS = [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4), ("rk4_38", 4)]


@pytest.mark.parametrize("method,order", ORDERS)
def test_convergence_order_on_a_gaussian_flow(method, order):
    """At least the method's order against the exact solution (midpoint's leading error term
    happens to vanish on this flow: it converges at order 3 here)."""
    flow = GaussianFlow(m=1.0, s=1.5)
    x0 = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rates = _rates(flow, x0, flow.m + flow.s * x0, method, (16, 32, 64))
    assert all(r > order - 0.25 for r in rates), rates


@pytest.mark.parametrize("method,order", ORDERS)
def test_convergence_order_on_a_nonlinear_field(method, order):
    field = lambda x, t: torch.cos(x) + t[:, None]  # noqa: E731
    x0 = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = fastflow.sample(field, x0, steps=2048, method="rk4")
    rates = _rates(field, x0, truth, method, (8, 16, 32))
    assert all(abs(r - order) < 0.25 for r in rates), rates


@pytest.mark.parametrize("ours,theirs", [("euler", "euler"), ("midpoint", "midpoint"),
                                          ("rk4_38", "rk4")])
def test_parity_with_torchdiffeq(ours, theirs):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    model = Net()
    x0 = torch.randn(32, 2)
    grid = torch.linspace(0, 1, 11)
    with torch.no_grad():
        out = fastflow.sample(model, x0, time_grid=grid, method=ours)
        ref = torchdiffeq.odeint(lambda t, x: model(x, t.expand(x.shape[0])), x0, grid,
                                 method=theirs)[-1]
    assert _scaled_error(out, ref) < 2e-6


def test_euler_on_diffusers_sigmas_is_diffusers_scheduler_loop():
    schedulers = pytest.importorskip("diffusers.schedulers.scheduling_flow_match_euler_discrete")
    scheduler = schedulers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(12)
    model = Net()
    x = torch.randn(8, 2)
    sigmas = fastflow.schedules.flow_match_sigmas(12, shift=3.0)
    with torch.no_grad():
        out = fastflow.sample(model, x, sigmas=sigmas, time_convention="sigma", time_scale=1000)
        for timestep in scheduler.timesteps:
            v = model(x, timestep.expand(x.shape[0]))
            x = scheduler.step(v, timestep, x).prev_sample
    assert _scaled_error(out, x) < 2e-6


def test_guidance_math_on_constant_predictions():
    """One Euler step from 0 with constant predictions u (unconditional) and c (conditional)."""
    u, c = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.5]])
    model = lambda x, t, cond: (c if cond else u).expand_as(x)  # noqa: E731
    x0 = torch.zeros(1, 2)
    out = fastflow.sample(model, x0, steps=1, guidance_scale=4.0,
                          model_kwargs={"cond": True}, uncond_kwargs={"cond": False})
    torch.testing.assert_close(out, u + 4.0 * (c - u))
    out = fastflow.sample(model, x0, steps=1, guidance_scale=4.0, guidance="cfg_zero_star",
                          model_kwargs={"cond": True}, uncond_kwargs={"cond": False})
    alpha = (c * u).sum() / (u * u).sum()
    torch.testing.assert_close(out, alpha * u + 4.0 * (c - alpha * u))
    out = fastflow.sample(model, x0, steps=1, guidance_scale=4.0, zero_init_steps=1,
                          model_kwargs={"cond": True}, uncond_kwargs={"cond": False})
    assert (out == 0).all()


def test_rank_one_states_are_guided_per_sample():
    """A state of one number per sample ([B]): CFG-Zero*'s projection is per sample there too,
    in the sampler and in the reference (which summed over the whole batch)."""
    u, c = torch.tensor([1.0, 2.0, -0.5]), torch.tensor([3.0, -1.0, 2.0])
    model = lambda x, t, cond: (c if cond else u).clone()  # noqa: E731
    alpha = c * u / (u * u + 1e-8)
    expected = alpha * u + 4.0 * (c - alpha * u)
    kwargs = dict(model_kwargs={"cond": True}, uncond_kwargs={"cond": False}, guidance_scale=4.0)
    out = fastflow.sample(model, torch.zeros(3), steps=1, guidance="cfg_zero_star", **kwargs)
    ref = reference.sample(model, torch.zeros(3), [0.0, 1.0], cfg_zero_star=True, **kwargs)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ref, expected.double(), check_dtype=False)
    net = lambda x, t, y=None: torch.sin(3 * x + t) + (0 if y is None else y)  # noqa: E731
    x0, y = torch.randn(8), torch.randn(8)
    grid = torch.linspace(0.05, 0.95, 5).tolist()
    for name, (ours, theirs) in GUIDANCE.items():
        kwargs = {"y": torch.cat([torch.zeros_like(y), y]) if name == "doubled" else y}
        out = fastflow.sample(net, x0, time_grid=torch.tensor(grid), model_kwargs=kwargs,
                              uncond_kwargs={}, **ours)
        ref = reference.sample(net, x0, grid, model_kwargs=kwargs, uncond_kwargs={}, **theirs)
        assert _scaled_error(out, ref) < 2e-6, name


def test_guidance_interval_skips_the_unconditional_call():
    model = Net()
    x0 = torch.randn(4, 2)
    y = torch.randn(4, 2)
    with torch.no_grad():
        out = fastflow.sample(model, x0, steps=10, guidance_scale=3.0,
                              guidance_interval=(0.25, 0.65), model_kwargs={"y": y},
                              uncond_kwargs={})
    # Steps start at 0, 0.1, ..., 0.9: four of them (0.3 .. 0.6) inside the interval.
    assert model.calls == 10 + 4
    ref = reference.sample(model, x0, torch.linspace(0, 1, 11).tolist(), guidance_scale=3.0,
                           guidance_interval=(0.25, 0.65), model_kwargs={"y": y},
                           uncond_kwargs={})
    assert _scaled_error(out, ref) < 2e-6


def test_per_step_guidance_scale():
    model = Net()
    x0, y = torch.randn(4, 2), torch.randn(4, 2)
    schedule = lambda t: 1.0 + 4.0 * t  # noqa: E731
    with torch.no_grad():
        out = fastflow.sample(model, x0, steps=5, guidance_scale=schedule, model_kwargs={"y": y},
                              uncond_kwargs={})
    x = x0.clone()
    grid = torch.linspace(0, 1, 6).tolist()
    with torch.no_grad():
        for t0, t1 in zip(grid[:-1], grid[1:]):
            t = torch.full((4,), t0)
            v_u, v_c = model(x, t), model(x, t, y=y)
            x = x + (t1 - t0) * (v_u + schedule(t0) * (v_c - v_u))
    assert _scaled_error(out, x) < 2e-6


def test_reverse_integration_inverts_the_forward_one():
    model = Net()
    x0 = torch.randn(16, 2, dtype=torch.float64)
    with torch.no_grad():
        data = fastflow.sample(model, x0, steps=40, method="rk4")
        back = fastflow.sample(model, data, steps=40, method="rk4", reverse=True)
        back_grid = fastflow.sample(model, data, time_grid=torch.linspace(1, 0, 41), method="rk4")
    assert (back - x0).abs().max() < 1e-6
    assert (back - back_grid).abs().max() < 1e-6


def test_intermediates_callback_and_reuse():
    model = Net()
    seen = []
    sampler = fastflow.Sampler(model, steps=6, method="midpoint", return_intermediates=True,
                               callback=lambda i, t, x: seen.append((i, t, x.clone())),
                               callback_every=2)
    x0 = torch.randn(5, 2)
    with torch.no_grad():
        final, trail = sampler(x0)
        again, _ = sampler(x0 + 1)
    assert trail.shape == (7, 5, 2) and torch.equal(trail[0], x0) and torch.equal(trail[-1], final)
    for n in range(1, 7):
        step = fastflow.sample(model, x0, time_grid=torch.linspace(0, 1, 7)[:n + 1],
                               method="midpoint")
        assert _scaled_error(trail[n], step) < 1e-6
    assert [i for i, _, _ in seen] == [2, 4, 6] * 2  # two calls
    assert [t for _, t, _ in seen[:3]] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert torch.equal(seen[2][2], final)
    assert not torch.equal(again, final)


def test_non_contiguous_and_channels_last_inputs():
    model = lambda x, t: -x + t[:, None, None, None]  # noqa: E731
    x0 = torch.randn(2, 3, 4, 5)
    want = fastflow.sample(model, x0, steps=3, method="heun")
    for x in (x0.to(memory_format=torch.channels_last), x0.transpose(2, 3).contiguous().transpose(2, 3)):
        torch.testing.assert_close(fastflow.sample(model, x, steps=3, method="heun"), want)
    strided = x0[:, :, ::2]   # not dense: the buffers are contiguous
    torch.testing.assert_close(fastflow.sample(model, strided, steps=3, method="heun"),
                               want[:, :, ::2])


@pytest.mark.parametrize("options", [dict(method="heun"), dict(guidance_scale=2.0, doubled_batch=True),
                                     dict(method="rk4", guidance_scale=2.0), dict(stochastic=True),
                                     dict(state_dtype=torch.float64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_state(options, dtype):
    # A channels_last x_init keeps its layout through the loop: the model reads channels_last
    # inputs, its channels_last outputs are streamed as they are, the result comes back in
    # that layout, and the numbers are those of the contiguous run, bit for bit.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    layouts = []

    def model(x, t, y=0.0):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return (conv(x.float()) * (1 - t[:, None, None, None]) + y).to(x.dtype)

    uncond = {} if "guidance_scale" in options and not options.get("doubled_batch") else None
    kwargs = {"y": 1.0} if uncond is not None else None
    x0 = torch.randn(3, 4, 6, 5).to(dtype)
    want = fastflow.sample(model, x0, steps=3, uncond_kwargs=uncond, model_kwargs=kwargs, **options)
    layouts.clear()
    x = x0.to(memory_format=torch.channels_last)
    got = fastflow.sample(model, x, steps=3, uncond_kwargs=uncond, model_kwargs=kwargs, **options)
    assert all(layouts) and got.is_contiguous(memory_format=torch.channels_last)
    assert bits_equal(got.contiguous(), want)
    # A model that returns contiguous tensors anyway: its outputs are copied into the layout.
    contiguous = lambda x, t, **kw: model(x, t, **kw).contiguous()  # noqa: E731
    got = fastflow.sample(contiguous, x, steps=3, uncond_kwargs=uncond, model_kwargs=kwargs, **options)
    assert bits_equal(got.contiguous(), want)


@pytest.mark.parametrize("options", [dict(method="heun"), dict(guidance_scale=2.0, doubled_batch=True),
                                     dict(method="rk4", guidance_scale=2.0, guidance="cfg_zero_star"),
                                     dict(stochastic=True)])
def test_model_outputs_in_any_layout(options):
    # A network that predicts a variance beside the velocity returns twice the channels, of which
    # the step reads a slice (streamed in place on CPU); a transposed output is copied. Either
    # way, the bits of a contiguous output.
    torch.manual_seed(0)
    weight = torch.randn(8, 4) / 4

    def model(x, t, y=0.0):
        out = torch.einsum("oc,bchw->bohw", weight, x) * (1 - t[:, None, None, None]) + y
        return out.contiguous()

    uncond = {} if "guidance_scale" in options and not options.get("doubled_batch") else None
    kwargs = {"y": 1.0} if uncond is not None else None
    x0 = torch.randn(3, 4, 6, 70)
    want = fastflow.sample(lambda x, t, **kw: model(x, t, **kw)[:, :4].contiguous(), x0, steps=3,
                           uncond_kwargs=uncond, model_kwargs=kwargs, **options)
    for layout in (lambda out: out[:, :4], lambda out: out[:, :4].transpose(2, 3).contiguous(
            ).transpose(2, 3)):
        got = fastflow.sample(lambda x, t, **kw: layout(model(x, t, **kw)), x0, steps=3,
                              uncond_kwargs=uncond, model_kwargs=kwargs, **options)
        assert bits_equal(got, want)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_a_batch_of_one_with_any_batch_stride(method):
    # One image permuted from HWC: dense, channels_last, its batch stride 3 (any stride is valid
    # for a batch of one). The doubled batch of guidance used to interleave its two halves.
    torch.manual_seed(0)
    model = lambda x, t: torch.sin(1.3 * x + 0.1) * (1 + t.view(-1, 1, 1, 1))  # noqa: E731
    x = torch.randn(4, 5, 3).permute(2, 0, 1)[None]
    assert x.stride() == (3, 1, 15, 3)
    for options in (dict(guidance_scale=2.0, doubled_batch=True), dict(guidance_scale=2.0),
                    dict()):
        uncond = {} if options and not options.get("doubled_batch") else None
        got = fastflow.sample(model, x, steps=3, method=method, uncond_kwargs=uncond, **options)
        want = fastflow.sample(model, x.contiguous(), steps=3, method=method,
                               uncond_kwargs=uncond, **options)
        assert bits_equal(got.contiguous(), want)


@pytest.mark.parametrize("options", [dict(guidance_scale=2.0, doubled_batch=True),
                                     dict(guidance_scale=1.0, doubled_batch=True),
                                     dict(guidance_scale=2.0), dict()])
def test_a_model_that_returns_its_input(options):
    # An identity or in-place model hands back the sampler's input buffer, which the fused
    # pass also writes: it must read the prediction first (it used to be off by 0.4 here).
    x0 = torch.randn(3, 4)
    uncond = {} if options and not options.get("doubled_batch") else None
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    through_numpy = lambda x, t: torch.from_numpy(x.numpy())  # noqa: E731  (another storage)
    for model in (lambda x, t: x, lambda x, t: torch.relu_(x), lambda x, t: x[:, :], through_numpy):
        got = fastflow.sample(model, x0, time_grid=grid, uncond_kwargs=uncond, **options)
        want = reference.sample(model, x0.clone(), grid, uncond_kwargs=uncond, **options)
        assert _scaled_error(got, want) < 1e-6


@pytest.mark.parametrize("x_dtype, state_dtype, out_dtype", [
    (torch.float64, torch.float32, torch.float32), (torch.float64, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16, torch.float32), (torch.float64, torch.float32, torch.bfloat16)])
def test_a_split_pass_with_a_state_narrower_than_its_tables(x_dtype, state_dtype, out_dtype):
    # Guided rk4_38 stages read more streams than one pass takes: the velocity is stored first
    # (Kcur). With fp64 x_init, an fp32 state and an fp32 model, that pass read and wrote fp32
    # streams alone and refused the fp64 tables ("coeffs must be Float for Float streams").
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(4, 3, generator=g).to(x_dtype) for _ in range(2))
    model = lambda x, t, y: (y.to(out_dtype) - x.to(out_dtype)) * (1 + t[:, None].to(out_dtype))  # noqa: E731
    grid = [0.0, 0.3, 0.7, 1.0]
    options = dict(method="rk4_38", guidance_scale=2.0, uncond_kwargs={"y": torch.zeros_like(y)},
                   model_kwargs={"y": y}, state_dtype=state_dtype)
    out = fastflow.sample(model, x, time_grid=grid, **options)
    ref = reference.sample(model, x, grid, **options)
    assert out.dtype == x_dtype
    assert _scaled_error(out, ref) < (1e-6 if state_dtype == torch.float32 else 2 ** -6)


def test_the_model_gets_times_in_the_type_of_its_input():
    # A float64 state beside a float32 model: t is float32, like x (a Linear on t needs it).
    seen = []
    model = lambda x, t: (seen.append((x.dtype, t.dtype)), -x)[1]  # noqa: E731
    for state_dtype, x_dtype in [(torch.float64, torch.float32), (None, torch.bfloat16),
                                 (None, torch.float64), (torch.float32, torch.float64)]:
        want = {(x_dtype, torch.float64 if x_dtype == torch.float64 else torch.float32)}
        seen.clear()
        fastflow.sample(model, torch.randn(2, 3, dtype=x_dtype), steps=2, state_dtype=state_dtype)
        assert set(seen) == want
        seen.clear()   # the reference loop alike (it gave fp64 x an fp32 t)
        reference.sample(model, torch.randn(2, 3, dtype=x_dtype), [0.0, 0.5, 1.0],
                         state_dtype=state_dtype or torch.float32)
        assert set(seen) == want


def test_a_list_grid_keeps_its_float64_digits():
    seen = []
    model = lambda x, t: (seen.append(t[0].item()), torch.ones_like(x))[1]  # noqa: E731
    x0 = torch.zeros(1, 1, dtype=torch.float64)
    # In float32 the first two times would both be 0.5: not strictly monotone.
    out = fastflow.sample(model, x0, time_grid=[0.5, 0.50000001, 1.0])
    assert seen == [0.5, 0.50000001] and out.item() == 0.5


def test_capture_runs_uncaptured_off_cuda():
    model = Net()
    x0 = torch.randn(4, 2)
    with torch.no_grad():
        assert torch.equal(fastflow.sample(model, x0, steps=4, capture=True),
                           fastflow.sample(model, x0, steps=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("options", [dict(method="heun", guidance_scale=2.0),
                                     dict(method="euler", guidance_scale=2.0, stochastic=True)],
                         ids=["heun-guided", "euler-guided-stochastic"])
def test_capture_replays_on_cuda_without_host_syncs(options):
    model = Net().cuda()
    y = torch.randn(64, 2, device="cuda")
    sampler = fastflow.Sampler(model, steps=20, capture=True, **options)
    eager = fastflow.Sampler(model, steps=20, **options)
    with torch.no_grad():
        sampler(torch.randn(64, 2, device="cuda"), uncond_kwargs={}, y=y)   # captures: syncs
        for seed in range(3):
            x0 = torch.randn(64, 2, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            torch.cuda.set_sync_debug_mode("error")   # the replays must not
            try:
                got = sampler(x0, uncond_kwargs={}, y=y)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert _scaled_error(got, eager(x0, uncond_kwargs={}, y=y)) < 1e-6


def test_capture_refuses_keyword_arguments_it_would_freeze():
    # A captured graph copies tensor arguments in before each replay; a tensor inside a list
    # would be read by address, stale, so such arguments are refused (and unhashable ones too).
    assert sampling._signature({"y": torch.zeros(2, 3), "scale": 2.0, "mode": None}) == (
        ("mode", None), ("scale", 2.0), ("y", (2, 3), torch.float32))
    for bad in ([torch.zeros(2)], (torch.zeros(2),), {"a": torch.zeros(2)}, [1, 2]):
        with pytest.raises(ValueError, match="capture: model keyword argument 'y'"):
            sampling._signature({"y": bad})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_outlives_the_plan_cache():
    # A captured graph reads its coefficient tables by address: evicting them from the plan
    # cache, and reusing their memory, must not change what a replay computes.
    model = Net().cuda()
    sampler = fastflow.Sampler(model, steps=8, method="rk4", capture=True)
    x0 = torch.randn(32, 2, device="cuda")
    with torch.no_grad():
        want = fastflow.Sampler(model, steps=8, method="rk4")(x0)
        sampler(x0)
        sampling._PLANS.clear()
        torch.cuda.empty_cache()
        for steps in range(1, 40):   # new tables, allocated where the old ones were
            fastflow.sample(model, x0, steps=steps, method="rk4")
        assert _scaled_error(sampler(x0), want) < 1e-6


def test_bad_input():
    model = Net()
    x0 = torch.randn(4, 2)
    cases = [
        (dict(steps=4, method="dopri5"), ValueError, "method: expected one of"),
        (dict(steps=4, method=["euler"]), ValueError, "method: expected one of"),
        (dict(steps=4, guidance=["cfg"], guidance_scale=2.0), ValueError, "guidance: expected"),
        (dict(), ValueError, "give exactly one, got none"),
        (dict(steps=4, time_grid=torch.linspace(0, 1, 5)), ValueError, "give exactly one"),
        (dict(steps=0), ValueError, "steps: expected a positive integer"),
        (dict(time_grid=torch.zeros(2, 3)), ValueError, "time_grid: expected a 1-D"),
        (dict(time_grid=torch.tensor([0.0, 0.5, 0.4, 1.0])), ValueError, "strictly monotone"),
        (dict(sigmas=torch.tensor([1.0, 0.3, 0.5, 0.0])), ValueError, "sigmas: expected a strictly"),
        (dict(time_grid=torch.tensor([0.0, float("inf")])), ValueError, "time_grid: expected finite"),
        (dict(steps=4, prediction="noise"), ValueError, "prediction: expected one of"),
        (dict(steps=4, time_convention="tau"), ValueError, "time_convention"),
        (dict(steps=4, guidance="apg", guidance_scale=2.0), ValueError, "guidance: expected"),
        (dict(steps=4, doubled_batch=True), ValueError, "doubled_batch: needs a guidance_scale"),
        (dict(steps=4, guidance_scale=2.0, guidance_interval=(0.8, 0.2)), ValueError,
         "guidance_interval"),
        (dict(time_grid=torch.linspace(0, 1, 5), reverse=True), ValueError, "reverse: only"),
        (dict(steps=4, method="heun", stochastic=True), ValueError, "stochastic: re-noising"),
        (dict(steps=4, zero_init_steps=-1), ValueError, "zero_init_steps: expected a non-neg"),
        (dict(steps=4, noise_seed=2 ** 64), ValueError, "noise_seed: expected an integer"),
        (dict(steps=4, noise_seed=1.7), ValueError, "noise_seed: expected an integer"),
        (dict(steps=4, state_dtype=torch.int32), TypeError, "state_dtype: expected None or"),
        (dict(steps=4, time_scale="x"), TypeError, "time_scale: expected a finite positive"),
        (dict(steps=4, time_scale=-1.0), ValueError, "time_scale: expected a finite positive"),
        (dict(steps=4, guidance_scale=2.0, guidance_interval=0.5), ValueError,
         r"guidance_interval: expected \(t_lo, t_hi\), got 0.5"),
        # Without a scale the interval went unread, and unchecked.
        (dict(steps=4, guidance_interval=(0.8, 0.2)), ValueError, "guidance_interval"),
        (dict(steps=4, guidance_interval="ab"), ValueError, "guidance_interval: expected"),
        (dict(steps=4, guidance_scale="3"), ValueError, "guidance_scale: expected a real number"),
        (dict(steps=4, guidance_scale=1 + 2j), ValueError, "guidance_scale: expected a real"),
        (dict(steps=4, guidance_scale=torch.tensor([])), ValueError, "guidance_scale: expected"),
        (dict(steps=4, guidance_scale=torch.ones(4, 1)), ValueError, "guidance_scale: expected"),
        (dict(steps=4, guidance_scale=float("nan")), ValueError, "guidance_scale: expected finite"),
        # True read as w = 1 (no guidance), [True, False] as (1, 0).
        (dict(steps=4, guidance_scale=True), ValueError, "guidance_scale: expected a real"),
        (dict(steps=4, guidance_scale=[True, False, True, True]), ValueError,
         "guidance_scale: expected a real number .* got a torch.bool tensor"),
        # These raised PyTorch's "Cannot copy out of meta tensor", naming no argument.
        (dict(steps=4, guidance_scale=torch.ones(4, device="meta")), ValueError,
         "guidance_scale: expected .* on meta"),
        (dict(time_grid=torch.linspace(0, 1, 5, device="meta")), ValueError,
         "time_grid: expected a grid of numbers, got a meta tensor"),
        (dict(steps=4, stochastic=True, path="schrodinger_bridge"), TypeError,
         "path: converting a 'velocity' prediction or re-noising needs an affine path"),
        # The data estimate of re-noising divides by alpha sigma' - sigma alpha', 0 at t = 0 here.
        (dict(steps=4, stochastic=True, path=fastflow.paths.Polynomial(2.0)), ValueError,
         "stochastic: re-noising cannot estimate the data from a velocity at t = 0"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            fastflow.sample(model, x0, **options)
    with pytest.raises(ValueError, match="uncond_kwargs: guidance needs"):
        fastflow.sample(model, x0, steps=2, guidance_scale=2.0)
    with pytest.raises(TypeError, match="model_kwargs: expected a dict .* got list"):
        fastflow.sample(model, x0, steps=2, model_kwargs=[1])
    with pytest.raises(ValueError, match="model_kwargs: 'sample_ids' is an argument of the "
                                         "sampler itself"):   # was "got multiple values"
        fastflow.sample(model, x0, steps=2, model_kwargs={"sample_ids": 1})
    with pytest.raises(TypeError, match="uncond_kwargs: expected a dict .* got tuple"):
        fastflow.sample(model, x0, steps=2, guidance_scale=2.0, uncond_kwargs=())
    with pytest.raises(ValueError, match=r"model: expected an output of shape \(4, 2\)"):
        fastflow.sample(lambda x, t: x[:, :1], x0, steps=2)
    with pytest.raises(TypeError, match="model: expected a callable"):
        fastflow.Sampler("model", steps=2)
    with pytest.raises(TypeError, match="x_init"):
        fastflow.sample(model, torch.zeros(4, 2, dtype=torch.long), steps=2)
    with pytest.raises(TypeError, match=r"unknown option 'y'; the model's keyword arguments go "
                                        r"in model_kwargs"):
        fastflow.sample(model, x0, steps=2, y=x0)
    with pytest.raises(ValueError, match="sample_ids: expected 4 integers"):
        fastflow.sample(model, x0, steps=2, stochastic=True, sample_ids=torch.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="model: expected a floating output"):
        fastflow.sample(lambda x, t: x.long(), x0, steps=2)
    # These named the kernel's "an input" and PyTorch's meta copy.
    with pytest.raises(ValueError, match="model: expected an output on cpu .* got meta"):
        fastflow.sample(lambda x, t: x.to("meta"), x0, steps=2)
    with pytest.raises(ValueError, match="sample_ids: expected 4 integers, got a torch.int64 "
                                         "tensor"):
        fastflow.sample(model, x0, steps=2, stochastic=True,
                        sample_ids=torch.arange(4, device="meta"))
    with pytest.raises(ValueError, match="time_grid: expected a 1-D floating grid .* got '01'"):
        fastflow.sample(model, x0, time_grid="01")
    # Unused without stochastic, but a wrong argument all the same (it was ignored).
    with pytest.raises(ValueError, match="sample_ids: expected 4 integers"):
        fastflow.sample(model, x0, steps=2, sample_ids=["a", "b", "c", "d"])


def test_guidance_scales_are_one_per_sample():
    model = lambda x, t, c: torch.full_like(x, c)  # noqa: E731
    kwargs = dict(steps=1, uncond_kwargs={"c": 0.0}, model_kwargs={"c": 1.0})
    for scales in (torch.tensor([2.0, 5.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])):
        with pytest.raises(ValueError, match=r"guidance_scale: expected one scale per sample "
                                             r"\(3\), got"):
            fastflow.sample(model, torch.zeros(3, 4), guidance_scale=scales, **kwargs)
    sampler = fastflow.Sampler(model, steps=1, guidance_scale=torch.tensor([2.0, 5.0, 7.0]))
    out = sampler(torch.zeros(3, 4), uncond_kwargs={"c": 0.0}, c=1.0)
    assert torch.equal(out, torch.tensor([2.0, 5.0, 7.0])[:, None].expand(3, 4))
    as_list = fastflow.sample(model, torch.zeros(3, 4), guidance_scale=[2.0, 5.0, 7.0], **kwargs)
    assert torch.equal(as_list, out)
    with pytest.raises(ValueError, match="guidance_scale: expected one scale per sample"):
        sampler(torch.zeros(6, 4), uncond_kwargs={"c": 0.0}, c=1.0)


def test_a_scale_of_one_skips_the_unconditional_call():
    model = Net()
    x0, y = torch.randn(4, 2), torch.randn(4, 2)
    with torch.no_grad():
        out = fastflow.sample(model, x0, steps=5, method="heun", guidance_scale=1.0,
                              guidance="cfg_zero_star", model_kwargs={"y": y})
        assert model.calls == 10
        plain = fastflow.sample(model, x0, steps=5, method="heun", model_kwargs={"y": y})
    assert torch.equal(out, plain)


def test_guidance_interval_with_a_doubled_batch():
    model = Net()
    x0, y = torch.randn(4, 2), torch.randn(4, 2)
    grid = torch.linspace(0, 1, 9)
    common = dict(time_grid=grid, guidance_scale=3.0, guidance_interval=(0.2, 0.6))
    with torch.no_grad():
        doubled = fastflow.sample(model, x0, doubled_batch=True,
                                  model_kwargs={"y": torch.cat([torch.zeros_like(y), y])}, **common)
        twice = fastflow.sample(model, x0, model_kwargs={"y": y}, uncond_kwargs={}, **common)
        everywhere = fastflow.sample(model, x0, time_grid=grid, guidance_scale=3.0,
                                     model_kwargs={"y": y}, uncond_kwargs={})
    assert _scaled_error(doubled, twice) < 2e-6
    assert _scaled_error(doubled, everywhere) > 1e-3


def test_plans_of_user_paths_are_not_shared_by_repr():
    class MyPath(fastflow.paths.AffinePath):
        def __call__(self, t):
            return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)

    model = lambda x, t: 0.5 * x + 1  # noqa: E731
    x0, grid = torch.ones(2, 3), [0.2, 0.5, 0.9]
    first = fastflow.sample(model, x0, time_grid=torch.tensor(grid), prediction="epsilon",
                            path=MyPath())

    class MyPath(fastflow.paths.AffinePath):  # noqa: F811 (a notebook cell edited and re-run)
        def __call__(self, t):
            return t * t, 1 - t * t, 2 * t, -2 * t

    second = fastflow.sample(model, x0, time_grid=torch.tensor(grid), prediction="epsilon",
                             path=MyPath())
    assert repr(MyPath()) == "MyPath()" and not torch.allclose(first, second)
    want = reference.sample(model, x0, grid, prediction="epsilon", path=MyPath())
    assert _scaled_error(second, want) < 1e-6
    # Built-in paths are shared by value: a changed parameter is a new plan.
    path = fastflow.paths.Polynomial(2.0)
    a = fastflow.sample(model, x0, time_grid=torch.tensor(grid), prediction="data", path=path)
    path.n = 3.0
    b = fastflow.sample(model, x0, time_grid=torch.tensor(grid), prediction="data", path=path)
    assert _scaled_error(b, reference.sample(model, x0, grid, prediction="data", path=path)) < 1e-6
    assert not torch.allclose(a, b)


def test_sampling_records_no_gradient():
    model = Net()
    x0 = torch.randn(4, 2)
    out = fastflow.sample(model, x0, steps=3)
    assert not out.requires_grad   # the model's parameters need grad: no graph was kept
    with pytest.raises(ValueError, match="x_init: requires grad, but fastflow's sampler is not"):
        fastflow.sample(model, x0.requires_grad_(), steps=3)
    with torch.no_grad():
        assert torch.equal(fastflow.sample(model, x0, steps=3), out)


def test_a_float64_output_for_a_float32_state():
    model = Net()
    double = lambda x, t: model(x.double(), t.double())  # noqa: E731
    x0 = torch.randn(4, 2)
    with torch.no_grad():
        out = fastflow.sample(double, x0, steps=4, method="heun")
        ref = reference.sample(double, x0, torch.linspace(0, 1, 5).tolist(), method="heun")
    assert out.dtype == torch.float32 and _scaled_error(out, ref) < 2e-6


@pytest.mark.parametrize("path", ["cond_ot", "cosine", "vp", "linear_vp"])
@pytest.mark.parametrize("method", ["heun", "rk4", "rk4_38"])
def test_data_prediction_takes_a_midpoint_last_step_at_t_1(method, path):
    """sigma_1 = 0: a data prediction has no velocity at t = 1, where these methods would
    evaluate it; their last step is the midpoint rule instead."""
    model = Net()
    grid = torch.linspace(0, 1, 7).tolist()
    x0 = torch.randn(8, 2, dtype=torch.float64)
    with torch.no_grad():
        out = fastflow.sample(model, x0, time_grid=torch.tensor(grid), method=method,
                              prediction="data", path=path)
        ref = reference.sample(model, x0, grid[:-1], method=method, prediction="data", path=path,
                               state_dtype=torch.float64)
        ref = reference.sample(model, ref, grid[-2:], method="midpoint", prediction="data",
                               path=path, state_dtype=torch.float64)
    assert torch.isfinite(out).all() and _scaled_error(out, ref) < 1e-6


def test_predictions_are_never_converted_where_they_have_no_velocity():
    model = Net()
    x0 = torch.randn(4, 2)
    for options, t in [(dict(steps=4, prediction="epsilon"), "0"),
                       (dict(steps=4, prediction="score", method="rk4", path="cosine"), "0"),
                       (dict(steps=4, prediction="data", reverse=True), "1"),
                       (dict(time_grid=torch.tensor([1.0, 0.6, 0.0]), prediction="data"), "1")]:
        with pytest.raises(ValueError, match=f"cannot be turned into a velocity at t = {t} on"):
            fastflow.sample(model, x0, **options)
    # Inversion towards t = 0 of a noise prediction: the last step avoids t = 0.
    with torch.no_grad():
        out = fastflow.sample(model, x0, time_grid=torch.tensor([0.9, 0.5, 0.0]), method="heun",
                              prediction="epsilon", path="cosine")
    assert torch.isfinite(out).all()
    # The reference refuses the same grids (it converted there, through the clamped divisor).
    with pytest.raises(ValueError, match="'epsilon' prediction has no velocity at t = 0 on"):
        reference.sample(model, x0, [0.0, 0.5, 1.0], prediction="epsilon")


@pytest.mark.parametrize("options, reason, example", [
    # alpha_t = t^3 is 1e-9 at t = 1e-3: the message suggested the grid it refused.
    (dict(time_grid=torch.tensor([1e-3, 0.5, 1.0]), prediction="epsilon",
          path=fastflow.paths.Polynomial(3.0)), r"alpha_t = 1e-09 there, below 1e-06", "0.05"),
    # alpha_1 = 1 there: the derivative of sigma_t is what is infinite, not a vanishing alpha.
    (dict(time_grid=torch.tensor([1.0, 0.5, 0.1]), prediction="epsilon", path="linear_vp"),
     r"alpha_t' = 1, sigma_t' = -inf there", "0.999"),
    (dict(time_grid=torch.tensor([0.0, 0.5, 0.9]), prediction="data",
          path=fastflow.paths.Polynomial(0.5)), r"alpha_t' = inf, sigma_t' = -inf there", "0.001"),
])
def test_refusals_say_why_and_suggest_a_grid_that_works(options, reason, example):
    with pytest.raises(ValueError, match=f"{reason}\\), where .* e.g. at t = {example}$"):
        fastflow.Sampler(Net(), **options)
    start = float(example)
    grid = torch.tensor([start, 0.5, 1 - start if start > 0.5 else 0.9])
    fastflow.Sampler(Net(), **{**options, "time_grid": grid})   # the suggestion is accepted


@pytest.mark.parametrize("prediction", ["velocity", "epsilon", "data", "score"])
@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_zero_init_steps_hold_the_state_whatever_the_prediction(prediction, method):
    # CFG-Zero*'s zero init skips the first steps' motion: a zero noise prediction was a
    # velocity x / t (the state scaled 100x from t = 1e-3), a zero data prediction -x / (1 - t).
    calls = []
    model = lambda x, t: calls.append(t) or torch.sin(x)  # noqa: E731
    x = torch.randn(3, 4, dtype=torch.float64)
    grid = [0.0, 0.4, 0.7, 0.9]   # t = 0 has no velocity for noise or score predictions
    out = fastflow.sample(model, x, time_grid=grid[:2], method=method, prediction=prediction,
                          zero_init_steps=1)
    assert bits_equal(out, x) and not calls
    got = fastflow.sample(model, x, time_grid=grid, method=method, prediction=prediction,
                          path="cosine", zero_init_steps=1)
    want = reference.sample(model, x, grid, method=method, prediction=prediction, path="cosine",
                            zero_init_steps=1, state_dtype=torch.float64)
    assert _scaled_error(got, want) < 1e-12


def test_the_reference_takes_the_samplers_last_step_and_empty_batches():
    # It evaluated a data prediction at t = 1 (through the clamped sigma_t), where the sampler
    # takes a midpoint last step; CFG-Zero* reshaped an empty batch to [0, -1].
    model = lambda x, t: x * 0.99 + 0.1  # noqa: E731
    x = torch.randn(4, 3, dtype=torch.float64)
    got = fastflow.sample(model, x, time_grid=[0.1, 0.5, 1.0], method="heun", prediction="data")
    want = reference.sample(model, x, [0.1, 0.5, 1.0], method="heun", prediction="data",
                            state_dtype=torch.float64)
    assert _scaled_error(got, want) < 1e-12
    empty = torch.zeros(0, 3)
    out = reference.sample(lambda x, t, y=0: x + y, empty, [0.0, 1.0], guidance_scale=2.0,
                           cfg_zero_star=True, uncond_kwargs={"y": 1})
    assert out.shape == (0, 3)


def test_stochastic_sampling_renoises_with_batch_independent_noise():
    # Elementwise, so that the model's own output does not depend on the batch (a Linear's
    # matrix product may round a row differently in another batch size).
    model = lambda x, t: torch.tanh(x) * (1 - t[:, None]) - x  # noqa: E731
    x0 = torch.randn(6, 2)
    with torch.no_grad():
        out = fastflow.sample(model, x0, steps=5, stochastic=True, noise_seed=3)
        # The formula, with the same noise.
        x = x0.clone()
        grid = torch.linspace(0, 1, 6).tolist()
        for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
            v = model(x, torch.full((6,), t0))
            eps = fastflow._noise.gaussian(3, torch.arange(6), i, x.shape)
            x = t1 * (x + (1 - t0) * v) + (1 - t1) * eps
        assert _scaled_error(out, x) < 2e-6
        # A sample's result does not depend on the batch it was drawn in.
        alone = fastflow.sample(model, x0[[4, 1]], steps=5, stochastic=True, noise_seed=3,
                                sample_ids=torch.tensor([4, 1]))
        assert torch.equal(alone, out[[4, 1]])
        other_seed = fastflow.sample(model, x0, steps=5, stochastic=True, noise_seed=4)
        assert not torch.allclose(other_seed, out)


def test_stochastic_sampling_renoises_on_the_path():
    """x' = alpha_t' x1^ + sigma_t' eps: a perfect data prediction started on the cosine path
    ends at the data, whatever the noise."""
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    path = fastflow.paths.Cosine()
    alpha, sigma, _, _ = path(torch.tensor(0.5, dtype=torch.float64))
    x = alpha * mu + sigma * torch.randn(16, 2, dtype=torch.float64)
    out = fastflow.sample(lambda x, t: mu.expand_as(x), x, time_grid=torch.tensor([0.5, 0.75, 1.0]),
                          prediction="data", path=path, stochastic=True)
    torch.testing.assert_close(out, mu.expand_as(out))


def test_flow_map_sampler_copies_its_grid_once():
    # The grid goes to the device on the first call only (on a GPU a copy from the host makes
    # the host wait): later calls with the same grid read the same device tensor.
    from fastflow.flow_map import _device_times

    calls = []
    phi = lambda x, s, t: (calls.append((s, t)), x + (t - s)[:, None])[1]  # noqa: E731
    x0 = torch.randn(3, 2)
    first = fastflow.sample_flow_map(phi, x0, time_grid=[0.0, 0.25, 1.0])
    again = fastflow.sample_flow_map(phi, x0, time_grid=[0.0, 0.25, 1.0])
    assert torch.equal(first, again)
    times = _device_times((0.0, 0.25, 1.0), x0.device, torch.float32)
    assert all(s.untyped_storage().data_ptr() == times.untyped_storage().data_ptr()
               for s, _ in calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flow_map_sampler_does_not_sync_on_cuda_after_its_first_call():
    phi = lambda x, s, t: x + (t - s)[:, None]  # noqa: E731
    x0 = torch.randn(3, 2, device="cuda")
    fastflow.sample_flow_map(phi, x0, steps=3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastflow.sample_flow_map(phi, x0, steps=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_flow_map_sampler_composes_jumps():
    # phi(x, s, t) = x + (t - s) * c: exact for a constant velocity c, any number of jumps.
    c = torch.tensor([[0.5, -1.0]])
    calls = []
    phi = lambda x, s, t: (calls.append((s[0].item(), t[0].item())), x + (t - s)[:, None] * c)[1]  # noqa: E731
    x0 = torch.randn(3, 2)
    torch.testing.assert_close(fastflow.sample_flow_map(phi, x0), x0 + c)
    assert calls == [(0.0, 1.0)]
    calls.clear()
    torch.testing.assert_close(fastflow.sample_flow_map(phi, x0, steps=4), x0 + c)
    assert [s for s, _ in calls] == pytest.approx([0, 0.25, 0.5, 0.75])
    back = fastflow.sample_flow_map(phi, x0 + c, time_grid=[1.0, 0.5, 0.0])
    torch.testing.assert_close(back, x0)
    with pytest.raises(ValueError, match="model: expected the map to return"):
        fastflow.sample_flow_map(lambda x, s, t: x[:, :1], x0)
    with pytest.raises(ValueError, match=r"model: expected the map to return a torch.float32 "
                                         r"tensor .* got a torch.strided torch.float64"):
        fastflow.sample_flow_map(lambda x, s, t: x.double(), x0)
    # A map's output on another device (meta here) or sparse was returned as it was.
    for wrong in (lambda x, s, t: torch.empty_like(x, device="meta"), lambda x, s, t: x.to_sparse()):
        with pytest.raises(ValueError, match="model: expected the map to return .* on cpu"):
            fastflow.sample_flow_map(wrong, x0)
    with pytest.raises(TypeError, match="model: expected a callable"):
        fastflow.sample_flow_map(3, x0)
    with pytest.raises(TypeError, match="model: expected a dense output, got a torch.sparse_coo"):
        fastflow.sample(lambda x, t: x.to_sparse(), x0, steps=2)   # a storage error before
    for dtype in (torch.int64, torch.float8_e4m3fn):
        with pytest.raises(TypeError, match=f"x_init: expected a float tensor .* got a {dtype}"):
            fastflow.sample_flow_map(phi, torch.zeros(2, 3).to(dtype))
        with pytest.raises(TypeError, match=f"x_init: expected a float tensor .* got a {dtype}"):
            fastflow.sample(lambda x, t: x, torch.zeros(2, 3).to(dtype), steps=2)


def test_flow_map_sampler_gives_times_in_the_math_type():
    """As flow_map_loss does in training: fp64 times for fp64 states, fp32 otherwise."""
    seen = []
    phi = lambda x, s, t: (seen.append((s.dtype, t.dtype)), x)[1]  # noqa: E731
    for dtype, want in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.float32)]:
        seen.clear()
        fastflow.sample_flow_map(phi, torch.zeros(2, 3, dtype=dtype), steps=2)
        assert seen == [(want, want)] * 2


def test_a_plan_built_under_inference_mode_serves_autograd_later():
    # The coefficient and time tables are cached across samplers: built under inference_mode
    # they were inference tensors, and a model that differentiates inside (a guidance
    # gradient) failed in every later run with the same options.
    sampling._PLANS.clear()
    w = torch.randn(4)

    def model(x, t):
        with torch.enable_grad():
            xg = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(((xg * w) * t[:, None]).sum(), xg)
        return -g

    x = torch.randn(3, 4)
    with torch.inference_mode():
        want = fastflow.Sampler(lambda x, t: -w * t[:, None], steps=3)(x)
    torch.testing.assert_close(fastflow.Sampler(model, steps=3)(x), want)


def test_the_plan_cache_keeps_every_option_apart():
    # Samplers with equal options share their tables (_PLANS). An option missing from the key
    # hands a sampler another's tables: zero_init_steps was, so a plain run after a zero-init
    # one skipped its first step. Each sampler, run with every other one's plan cached, must
    # give what it gives alone.
    model = Net()
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    grid = [0.1, 0.4, 0.7, 0.9]
    guided = dict(time_grid=grid, guidance_scale=2.0)
    variants = [
        dict(time_grid=grid), dict(time_grid=grid, method="heun"),
        dict(time_grid=[0.1, 0.5, 0.7, 0.9]), dict(time_grid=grid[::-1]),
        dict(sigmas=[0.9, 0.6, 0.3, 0.1]), dict(steps=3), dict(steps=3, reverse=True),
        dict(time_grid=grid, prediction="epsilon", path="cosine"),
        dict(time_grid=grid, prediction="epsilon", path="vp"),
        dict(time_grid=grid, prediction="data", path="cosine"),
        dict(time_grid=grid, time_convention="sigma"), dict(time_grid=grid, time_scale=1000.0),
        guided, dict(guided, guidance_scale=3.0), dict(guided, guidance="cfg_zero_star"),
        dict(guided, guidance_interval=(0.3, 0.8)),
        dict(guided, guidance_scale=torch.tensor([1.0, 2.0, 3.0, 4.0])),
        dict(guided, doubled_batch=True),
        dict(time_grid=grid, zero_init_steps=1), dict(time_grid=grid, zero_init_steps=2),
        dict(time_grid=grid, prediction="epsilon", path="cosine", zero_init_steps=1),
        dict(time_grid=grid, stochastic=True), dict(time_grid=grid, stochastic=True, noise_seed=1),
        dict(time_grid=grid, state_dtype=torch.float64),
    ]

    def run(options):
        if options.get("doubled_batch"):
            return fastflow.Sampler(model, **options)(x, y=torch.cat([torch.zeros_like(y), y]))
        uncond = {} if "guidance_scale" in options else None
        return fastflow.Sampler(model, **options)(x, uncond_kwargs=uncond, y=y)

    alone = []
    for options in variants:
        sampling._PLANS.clear()
        alone.append(run(options))
    for order in (range(len(variants)), reversed(range(len(variants)))):
        for i in order:
            assert bits_equal(run(variants[i]), alone[i]), variants[i]


def _decay(x, t):   # a model that pickles
    return -x * t[:, None]


def test_a_copy_of_a_used_sampler_samples_as_it_does():
    # deepcopy (an EMA or trainer copy) bumped the copied time table's version counter, and the
    # copy's first call blamed the model for writing into its t.
    import copy
    import pickle

    sampler = fastflow.Sampler(_decay, steps=4, method="heun")
    x = torch.randn(3, 2)
    want = sampler(x)
    for clone in (copy.deepcopy(sampler), pickle.loads(pickle.dumps(sampler))):
        assert bits_equal(clone(x), want) and bits_equal(clone(x), want)

    def writes_its_t(x, t):   # and a copy still catches a model that writes into its t
        t.mul_(2)
        return -x
    used = fastflow.Sampler(writes_its_t, steps=2)
    with pytest.raises(RuntimeError, match="modified its t in place"):
        used(torch.randn(1, 2))
    with pytest.raises(RuntimeError, match="modified its t in place"):
        copy.deepcopy(used)(torch.randn(1, 2))


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_zero_init_steps_never_read_the_model(method):
    # CFG-Zero*'s first steps use a zero prediction: a model singular at t = 0 (log-t Fourier
    # features) made the whole sample NaN when its output was multiplied by 0 instead.
    W = torch.randn(8)
    model = lambda x, t, y=0.0: (-x + y  # noqa: E731
                                 + fastflow.fourier_embedding(t, W, log=True).mean(1, keepdim=True))
    x, grid = torch.randn(2, 3), [0.0, 0.25, 0.5, 0.75, 1.0]
    for options in (dict(), dict(guidance_scale=3.0, doubled_batch=True)):
        got = fastflow.sample(model, x, time_grid=grid, method=method, zero_init_steps=1,
                              guidance="cfg_zero_star", **options)
        want = reference.sample(model, x, grid, method=method, zero_init_steps=1,
                                cfg_zero_star=True, **options)
        assert torch.isfinite(got).all() and _scaled_error(got, want) < 1e-6


@pytest.mark.parametrize("options", [dict(), dict(guidance_scale=2.0, doubled_batch=True),
                                     dict(guidance_scale=2.0, uncond_kwargs={})], ids=str)
def test_a_model_output_with_the_negative_bit_is_read_as_its_values(options):
    # Its memory holds minus its values (as x.conj().imag's does): the passes read the memory.
    x = torch.randn(3, 4)
    with_bit = lambda x, t: torch._neg_view(x * 0.5)  # noqa: E731  (values -x / 2)
    plain = lambda x, t: -(x * 0.5)  # noqa: E731
    for method in ("euler", "heun"):
        assert bits_equal(fastflow.sample(with_bit, x, steps=3, method=method, **options),
                          fastflow.sample(plain, x, steps=3, method=method, **options))


@pytest.mark.parametrize("inference", [False, True], ids=["grad mode", "inference mode"])
def test_a_model_that_writes_into_its_t_gets_an_error(inference):
    # A batch of one's t is a writable view of the shared time table: t.mul_(1000) changed the
    # times of every later call, this sampler's and other samplers' with the same options.
    def scaling_in_place(x, t):
        t.mul_(1000)
        return -x

    x = torch.randn(1, 3)
    with torch.inference_mode(inference):
        for method in ("euler", "heun"):
            want = fastflow.sample(lambda x, t: -x, x, steps=4, method=method)
            with pytest.raises(RuntimeError, match="model: it modified its t in place"):
                fastflow.sample(scaling_in_place, x, steps=4, method=method)
            seen = []
            fastflow.sample(lambda x, t: (seen.append(t.item()), -x)[1], x, steps=4,
                            method=method)
            assert max(seen) <= 1.0   # the table was rebuilt
            assert bits_equal(fastflow.sample(lambda x, t: -x, x, steps=4, method=method), want)


def test_the_host_tables_ignore_the_default_device():
    # They were built wherever torch.set_default_device pointed: with "meta" (or "cuda" beside
    # CPU data) the samplers and schedules failed. "meta" stands for any other device here.
    x = torch.randn(3, 4)
    runs = {
        "sample": lambda: fastflow.sample(lambda x, t: -x, x, steps=3, method="heun"),
        "guided sample": lambda: fastflow.sample(lambda x, t, c=1.0: -c * x, x, steps=3,
                                                 guidance_scale=[1.5, 2.0, 2.5],
                                                 uncond_kwargs={"c": 0.5}),
        "stochastic epsilon": lambda: fastflow.sample(lambda x, t: -x, x, prediction="epsilon",
                                                      time_grid=[0.1, 0.5, 0.9], stochastic=True),
        "grid": lambda: fastflow.Sampler(lambda x, t: -x, time_grid=[0.0, 0.5, 1.0])(x),
        "flow map": lambda: fastflow.sample_flow_map(lambda x, s, t: x * t[:, None], x, steps=2),
        "schedule": lambda: fastflow.schedules.flow_match_sigmas(5, shift=3.0),
        "custom schedule": lambda: fastflow.schedules.flow_match_sigmas(None, sigmas=[1.0, 0.5]),
    }
    want = {name: run() for name, run in runs.items()}
    with torch.device("meta"):
        for name, run in runs.items():
            assert bits_equal(run(), want[name]), name


def test_an_empty_batch_takes_empty_per_sample_scales():
    # The scales of an empty batch (a rank's empty shard in sample_distributed) were refused.
    x = torch.zeros(0, 3)
    out = fastflow.sample(lambda x, t: -x, x, steps=2, guidance_scale=torch.zeros(0),
                          uncond_kwargs={})
    assert out.shape == (0, 3)
    with pytest.raises(ValueError, match=r"expected one scale per sample \(2\), got 0"):
        fastflow.sample(lambda x, t: -x, torch.zeros(2, 3), steps=2,
                        guidance_scale=torch.zeros(0), uncond_kwargs={})


def test_a_list_of_scales_keeps_its_float64_digits():
    # It went through float32 (2.1 became 2.0999999046): a list of equal scales then differed
    # from the single scale, and sample_distributed (which shards a float64 copy) from sample.
    x = torch.randn(3, 4)
    model = lambda x, t, c=1.0: -c * x  # noqa: E731
    kwargs = dict(steps=3, uncond_kwargs={"c": 0.5})
    assert bits_equal(fastflow.sample(model, x, guidance_scale=[2.1] * 3, **kwargs),
                      fastflow.sample(model, x, guidance_scale=2.1, **kwargs))
