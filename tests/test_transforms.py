"""torch.func transforms and forward-mode AD: under vmap and grad (vjp, jacrev, nested) the
kernels run, through the ops' vmap rules and autograd; elsewhere (forward-mode AD) the ops run
their plain PyTorch formulas (fastflow._ops.transforming), so every transform gets the
reference's derivatives; the in-place forms (out=, the sampler) refuse, and the drop-ins hand
the call to the originals."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import func

import fastflow
from fastflow import paths, reference

# forward_ad's first dual tensor loads PyTorch's jvp decompositions through torch.jit.script.
# Any category: a DeprecationWarning before PyTorch 2.14, a FutureWarning since.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

SHAPE = (4, 3, 2)


def _data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0, x1, pred = (torch.randn(SHAPE, generator=g, dtype=dtype) for _ in range(3))
    t = (0.1 + 0.8 * torch.rand(SHAPE[0], generator=g)).to(dtype)
    return x0, x1, pred, t


def _tangents(fn, primals, tangents):
    """The outputs' tangents of fn at primals along tangents, with torch.autograd.forward_ad."""
    with fwAD.dual_level():
        outs = fn(*[fwAD.make_dual(p, d) for p, d in zip(primals, tangents)])
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return [fwAD.unpack_dual(o).tangent for o in outs]


OPS = {
    "interpolate": (lambda x0, x1, t: fastflow.interpolate(x0, x1, t, "cosine"),
                    lambda x0, x1, t: reference.interpolate(x0, x1, t, "cosine")),
    "convert": (lambda x0, x1, t: fastflow.convert(x0, x1, t, "vp", src="epsilon", dst="velocity"),
                lambda x0, x1, t: reference.convert(x0, x1, t, "vp", src="epsilon",
                                                    dst="velocity")),
    "loss": (lambda x0, x1, t: fastflow.flow_matching_loss(x0 + x1, x0, x1, t, paths.CondOT()),
             lambda x0, x1, t: reference.flow_matching_loss(x0 + x1, x0, x1, t, paths.CondOT())),
    "weighted loss": (lambda x0, x1, t: fastflow.flow_matching_loss(x1, x0, x1, t, "cosine",
                                                                     weight=t),
                      lambda x0, x1, t: reference.flow_matching_loss(x1, x0, x1, t, "cosine",
                                                                      weight=t)),
    # The reference computes in fp32, as diffusers does; fastflow in t's type (fp64 here).
    "timestep_embedding": (lambda x0, x1, t: fastflow.timestep_embedding(t, 16),
                           lambda x0, x1, t: reference.timestep_embedding(t, 16).double()),
}
TOLERANCE = {"timestep_embedding": 1e-5}


@pytest.mark.parametrize("op", OPS)
def test_forward_mode_tangents_match_reference(backend, op):
    # Before: the kernels dropped the tangents of dual tensors (unpack_dual gave None).
    fused, ref = OPS[op]
    primals = [x.to(backend) for x in _data()[:2]] + [_data()[3].to(backend)]
    tangents = [torch.randn_like(p) for p in primals]
    got = _tangents(fused, primals, tangents)
    want = _tangents(ref, primals, tangents)
    assert all(g is not None for g in got)
    tol = TOLERANCE.get(op, 1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * 1e-2)


def test_func_grad_of_the_loss_matches_autograd(backend):
    x0, x1, pred, t = (x.to(backend) for x in _data(1))

    def loss(p, tt):
        return fastflow.flow_matching_loss(p, x0, x1, tt, "cosine")

    grads = func.grad(loss, argnums=(0, 1))(pred, t)
    leaves = [pred.clone().requires_grad_(), t.clone().requires_grad_()]
    want = torch.autograd.grad(reference.flow_matching_loss(leaves[0], x0, x1, leaves[1], "cosine"),
                               leaves)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_func_vmap_matches_the_batched_call(backend):
    x0, x1, pred, t = (x.to(backend) for x in _data(2))

    def one(a, b, tt):  # one sample as a batch of one
        x_t, u_t = fastflow.interpolate(a[None], b[None], tt, "linear_vp")
        v = fastflow.convert(a[None], x_t, tt, "linear_vp", src="epsilon", dst="velocity")
        return x_t[0], u_t[0], v[0], fastflow.timestep_embedding(tt[None], 8)[0]

    got = func.vmap(one)(x0, x1, t)
    x_t, u_t = fastflow.interpolate(x0, x1, t, "linear_vp")
    want = (x_t, u_t, fastflow.convert(x0, x_t, t, "linear_vp", src="epsilon", dst="velocity"),
            fastflow.timestep_embedding(t, 8))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# vmap alone runs the kernels (the vmapped dimension folded into the groups), never the
# formulas: each case against the loop of its calls, with the formulas made to raise.
_E, _B = 3, 4
VMAPPED = {
    "interpolate": lambda x0, x1, t, w: fastflow.interpolate(x0, x1, t, "vp"),
    "interpolate with noise": lambda x0, x1, t, w: fastflow.interpolate(
        x0, x1, t, "schrodinger_bridge", noise=x0.flip(-1)),
    "convert": lambda x0, x1, t, w: fastflow.convert(x0, x1, t, "cosine", src="data",
                                                     dst="velocity"),
    "loss": lambda x0, x1, t, w: fastflow.flow_matching_loss(x0 * x1, x0, x1, t, "cosine"),
    "loss per sample, weighted": lambda x0, x1, t, w: fastflow.flow_matching_loss(
        x0 * x1, x0, x1, t, "linear_vp", weight=w, reduction="none"),
    "timestep_embedding": lambda x0, x1, t, w: fastflow.timestep_embedding(t, 9),
    "fourier_embedding, own weights": lambda x0, x1, t, w: fastflow.fourier_embedding(t, w),
}
# in_dims of (x0, x1, t, w): all vmapped; the data alone; the times alone; dimension 1.
IN_DIMS = {"all": (0, 0, 0, 0), "data": (0, 0, None, None), "times": (None, None, 0, 0),
           "dim 1": (1, 1, 1, 1)}


def _route(monkeypatch, route, direct="_vmapped"):
    """Eager vmaps and grads pop their levels from _call (`_ops._vmapped`, `_grad_transformed`:
    `direct`); "dispatcher" makes the ops take the dispatcher's batching and Autograd kernels
    instead, as they do under a dispatch mode or a subclass. Returns the list that records the
    direct calls."""
    calls = []
    if route == "dispatcher":
        monkeypatch.setattr(fastflow._ops, "_transform_to_lower", lambda tensors: None)
    else:
        run = getattr(fastflow._ops, direct)
        monkeypatch.setattr(fastflow._ops, direct,
                            lambda *args: calls.append(args[0]) or run(*args))
    return calls


@pytest.mark.parametrize("route", ["direct", "dispatcher"])
@pytest.mark.parametrize("in_dims", IN_DIMS)
@pytest.mark.parametrize("case", VMAPPED)
def test_vmap_runs_the_kernels(backend, monkeypatch, case, in_dims, route):
    g = torch.Generator().manual_seed(7)
    x0, x1 = (torch.randn(_E, _B, 5, generator=g).to(backend) for _ in range(2))
    t = (0.1 + 0.8 * torch.rand(_E, _B, generator=g)).to(backend)
    w = torch.rand(_E, _B, generator=g).to(backend)
    if case.startswith("fourier"):
        w = torch.randn(_E, 6, generator=g).to(backend)
    dims = IN_DIMS[in_dims]
    args = [a[0] if d is None else a for a, d in zip((x0, x1, t, w), dims)]  # shared: one member's
    f = VMAPPED[case]
    want = [f(*(a if d is None else a[e] for a, d in zip(args, dims))) for e in range(_E)]
    want = [torch.stack(w) for w in zip(*want)] if isinstance(want[0], tuple) else torch.stack(want)
    monkeypatch.setattr(fastflow._ops, "_transformable", _raises)
    calls = _route(monkeypatch, route)
    got = func.vmap(f, in_dims=dims)(*(a if d is None else a.movedim(0, d)
                                        for a, d in zip(args, dims)))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert bool(calls) == (route == "direct")


@pytest.mark.parametrize("in_dims", IN_DIMS)
def test_vmap_builds_the_coefficients_in_one_call(monkeypatch, in_dims):
    # Under vmap the coefficients of every member come from the backend's builder in one call
    # (the vmapped times folded into its rows), not from the paths' twenty-odd tensor ops: the
    # formulas raise here. Nested vmaps too; with a t that needs a gradient, the formulas run.
    from fastflow import _backends
    if _backends.kernels(_backends.select(torch.device("cpu"))).path_coefficients is None:
        pytest.skip("the CPU backend has no coefficient builder (the extension is not built)")
    g = torch.Generator().manual_seed(3)
    x0, x1 = (torch.randn(2, _E, _B, 5, generator=g, dtype=torch.float64) for _ in range(2))
    t = (0.1 + 0.8 * torch.rand(2, _E, _B, generator=g)).double()
    dims = IN_DIMS[in_dims][:3]
    cases = [lambda a, b, s: fastflow.interpolate(a, b, s, "vp"),
             lambda a, b, s: fastflow.convert(a, b, s, "vp", src="data", dst="score"),
             lambda a, b, s: fastflow.flow_matching_loss(a * b, a, b, s, "vp", reduction="none")]
    def member(x, d, v, e):   # the input of member e of outer sample v
        return x[v, 0] if d is None else x[v, e]

    wants = [[[f(*(member(x, d, v, e) for x, d in zip((x0, x1, t), dims))) for e in range(_E)]
              for v in range(2)] for f in cases]
    monkeypatch.setattr(paths.VP, "coefficients", _raises)
    args = [x[:, 0] if d is None else x.movedim(1, d + 1) for x, d in zip((x0, x1, t), dims)]
    for f, want in zip(cases, wants):
        got = func.vmap(func.vmap(f, in_dims=dims))(*args)
        for v in range(2):
            for e in range(_E):
                one = [o[v, e] for o in got] if isinstance(got, tuple) else got[v, e]
                torch.testing.assert_close(one, want[v][e], rtol=1e-12, atol=1e-12)
    with pytest.raises(AssertionError, match="formulas ran"):
        func.vmap(cases[0])(x0[0], x1[0], t[0].requires_grad_())


def _raises(*args):
    raise AssertionError("the formulas ran under vmap alone")


def test_vmap_nested_chunked_and_over_constants(monkeypatch):
    monkeypatch.setattr(fastflow._ops, "_transformable", _raises)
    x0, x1, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4)
    want = fastflow.interpolate(x0.reshape(24, 5), x1.reshape(24, 5), t.reshape(24))
    got = func.vmap(func.vmap(fastflow.interpolate))(x0, x1, t)
    for g, w in zip(got, want):
        assert torch.equal(g, w.view(2, 3, 4, 5))
    got = func.vmap(fastflow.interpolate, chunk_size=1)(x0[0], x1[0], t[0])
    for g, w in zip(got, want):
        assert torch.equal(g, w[:12].view(3, 4, 5))
    # An op on tensors that are not vmapped, inside a vmapped function.
    got = func.vmap(lambda y: fastflow.interpolate(x0[0, 0], x1[0, 0], t[0, 0])[0] + y)(x0[0])
    assert torch.equal(got, fastflow.interpolate(x0[0, 0], x1[0, 0], t[0, 0])[0] + x0[0])


def test_gradients_through_vmap_match_the_loop():
    pred, x0, x1 = torch.randn(3, 4, 5, dtype=torch.float64).unbind(0)
    pred, x0, x1 = (x.reshape(2, 2, 5) for x in (pred, x0, x1))
    t = torch.rand(2, 2, dtype=torch.float64)

    def loss(p, s):
        return fastflow.flow_matching_loss(p, x0[0], x1[0], s, "vp", reduction="sum")

    leaves = [pred.clone().requires_grad_(), t.clone().requires_grad_()]
    func.vmap(loss, in_dims=(0, 0))(*leaves).sum().backward()
    looped = [pred.clone().requires_grad_(), t.clone().requires_grad_()]
    sum(loss(looped[0][e], looped[1][e]) for e in range(2)).backward()
    for a, b in zip(leaves, looped):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_ensembles_over_stacked_modules_run_the_kernels(monkeypatch):
    import copy
    torch.manual_seed(0)
    members = [fastflow.nn.FourierEmbedding(8, learnable=True) for _ in range(3)]
    params, buffers = func.stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    t = torch.rand(5)
    monkeypatch.setattr(fastflow._ops, "_transformable", _raises)
    got = func.vmap(lambda p, b: func.functional_call(base, (p, b), (t,)))(params, buffers)
    torch.testing.assert_close(got, torch.stack([m(t) for m in members]), rtol=0, atol=0)


def test_compiled_vmap_matches_eager():
    # torch.compile of a vmapped function stopped at the ops ("Batching rule not implemented
    # for fastflow::affine") before they had vmap rules.
    x0, x1, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.rand(3, 4)

    def per_member(a, b, s):
        x_t, u_t = fastflow.interpolate(a, b, s, "cosine")
        return (fastflow.flow_matching_loss(x_t, a, b, s, "cosine", reduction="none"),
                fastflow.timestep_embedding(s, 8), u_t)

    torch._dynamo.reset()
    got = torch.compile(func.vmap(per_member), backend="aot_eager", fullgraph=True)(x0, x1, t)
    torch.testing.assert_close(got, func.vmap(per_member)(x0, x1, t), rtol=0, atol=0)


def test_func_jvp_and_jacrev_in_t(backend):
    x0, x1, _, t = (x.to(backend) for x in _data(3))
    path = paths.VP()

    def fused(tt):
        return fastflow.interpolate(x0, x1, tt, path)[0]

    def ref(tt):
        return reference.interpolate(x0, x1, tt, path)[0]

    direction = torch.linspace(-1, 1, t.numel(), dtype=t.dtype, device=t.device)
    torch.testing.assert_close(func.jvp(fused, (t,), (direction,))[1],
                               func.jvp(ref, (t,), (direction,))[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(func.jacrev(fused)(t), func.jacrev(ref)(t), rtol=1e-10,
                               atol=1e-12)


def test_in_place_forms_refuse_under_transforms():
    x0, x1, _, t = _data(4)
    buffers = (torch.empty_like(x1), torch.empty_like(x1))
    with fwAD.dual_level():
        dual = fwAD.make_dual(x1, torch.ones_like(x1))
        with pytest.raises(RuntimeError, match="affine_out.*forward-mode AD"):
            fastflow.interpolate(x0, dual, t, out=buffers)
        with pytest.raises(RuntimeError, match="sampler does not run under torch.func"):
            fastflow.sample(lambda x, tt: -x, dual, steps=2)
    # Outside the dual level, the fused forms run again.
    fastflow.interpolate(x0, x1, t, out=buffers)
    torch.testing.assert_close(buffers[0], reference.interpolate(x0, x1, t)[0])


def test_the_registered_ops_refuse_forward_mode_ad():
    # torch.library has no forward-mode rule to register: called directly, the ops dropped the
    # tangent (zeros) without a word. The public functions compute it.
    a, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    c = torch.tensor([[[2.0, 0.5]], [[3.0, -1.0]]], dtype=torch.float64)
    ones = torch.ones_like(a)
    with pytest.raises(RuntimeError, match="fastflow.affine has no forward-mode derivative"):
        func.jvp(lambda x: torch.ops.fastflow.affine([x, b], c)[0], (a,), (ones,))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="affine_sqnorm has no forward"):
        torch.ops.fastflow.affine_sqnorm([fwAD.make_dual(a, ones), b], c)
    _, tangent = func.jvp(lambda x: fastflow._ops.affine([x, b], c)[0], (a,), (ones,))
    assert torch.equal(tangent, c[:, 0, :1].expand_as(a))


def test_batched_gradients_match_the_loop(backend):
    # torch.autograd.grad(is_grads_batched=True), as jacobian(vectorize=True) and gradcheck's
    # batched check use it, hands the backward storage-less tensors: it crashed in the kernels.
    x0, x1, pred, t = _data(6)
    t32 = t.float()
    cases = {
        "loss, one number": (lambda p: fastflow.flow_matching_loss(p, x0, x1, t), pred),
        "loss per sample": (lambda p: fastflow.flow_matching_loss(p, x0, x1, t, path="cosine",
                                                                  reduction="none"), pred),
        "interpolate in t": (lambda s: fastflow.interpolate(x0, x1, s, path="vp")[0], t),
        "interpolate in x0": (lambda x: fastflow.interpolate(x, x1, t)[1], x0),
        "convert": (lambda p: fastflow.convert(p, x1, t, path="vp", src="velocity", dst="data"),
                    pred),
        "timestep_embedding": (lambda s: fastflow.timestep_embedding(s, 9), t32),
        "fourier_embedding": (lambda w: fastflow.fourier_embedding(t, w), torch.randn(4).double()),
    }
    for name, (fn, x) in cases.items():
        batched = torch.autograd.functional.jacobian(fn, x.to(backend), vectorize=True)
        looped = torch.autograd.functional.jacobian(fn, x.to(backend))
        torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-6, msg=name)


def test_drop_in_solvers_hand_transforms_to_the_originals():
    pytest.importorskip("flow_matching")
    pytest.importorskip("diffusers")
    from fastflow.compat.diffusers import FlowMatchEulerDiscreteScheduler
    from fastflow.compat.flow_matching.solver import ODESolver

    x = torch.randn(4, 2, dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        out = ODESolver(velocity_model=lambda x, t: -x).sample(dual, step_size=0.1)
        # Euler on dx/dt = -x over [0, 1]: the tangent is (1 - h)^10.
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, torch.full_like(x, 0.9 ** 10))
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(4)
        step = scheduler.step(dual, scheduler.timesteps[0], dual).prev_sample
        dt = (scheduler.sigmas[1] - scheduler.sigmas[0]).double()
        torch.testing.assert_close(fwAD.unpack_dual(step).tangent, (1 + dt).expand_as(x))


def test_a_transformed_call_leaves_the_device_caches_clean():
    # The caches of constant rows and frequencies once kept the functorch-wrapped tensor a
    # call under grad built: every later eager call then raised (no storage).
    fastflow.losses._constant_rows.clear()
    fastflow.embeddings._frequencies.clear()
    x0, x1, pred, t = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.rand(2)
    torch.func.grad(fastflow.flow_matching_loss)(pred, x0, x1, t)
    torch.func.grad(lambda s: fastflow.timestep_embedding(s, 8).sum())(t)
    torch.testing.assert_close(fastflow.flow_matching_loss(pred, x0, x1, t),
                               fastflow.reference.flow_matching_loss(pred, x0, x1, t))
    torch.testing.assert_close(fastflow.timestep_embedding(t, 8),
                               fastflow.reference.timestep_embedding(t, 8))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_jit_trace_with_cold_caches():
    # The first traced run recorded the cache's build, the check run read the cached constant:
    # "Graphs differed across invocations".
    fastflow.embeddings._frequencies.clear()
    fastflow.losses._constant_rows.clear()
    t = torch.rand(4)
    traced = torch.jit.trace(fastflow.nn.TimestepEmbedder(32, 16), (t,))
    assert traced(t).shape == (4, 32)
    args = (torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), torch.rand(3))
    torch.jit.trace(lambda p, a, b, s: fastflow.flow_matching_loss(p, a, b, s), args)


# torch.compile of code that takes forward-mode derivatives (func.jvp, jacfwd, a dual level,
# as MeanFlow's target does): the traced ops have no forward-mode rule, so the compiled tangents
# came back as zeros (or None) without a word; they must equal eager's.
_X0, _X1 = torch.randn(4, 3), torch.randn(4, 3)
_T = torch.tensor([0.15, 0.4, 0.6, 0.85])
COMPILED = {
    "interpolate": lambda s: fastflow.interpolate(_X0, _X1, s, "cosine")[0],
    "loss": lambda s: fastflow.flow_matching_loss(_X0 * s[:, None], _X0, _X1, s, "cosine"),
    "convert": lambda s: fastflow.convert(_X0, _X1, s, "vp", src="epsilon", dst="velocity"),
    "timestep_embedding": lambda s: fastflow.timestep_embedding(s, 8),
}


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_jvp_matches_eager(name):
    f = COMPILED[name]
    tangent = torch.ones_like(_T)
    want = func.jvp(f, (_T,), (tangent,))[1]
    assert want.abs().max() > 0
    torch._dynamo.reset()
    got = torch.compile(lambda s: func.jvp(f, (s,), (torch.ones_like(s),)), backend="aot_eager",
                        fullgraph=True)(_T)[1]
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(func.jacfwd(f), backend="aot_eager",
                                             fullgraph=True)(_T), func.jacfwd(f)(_T))


def test_compiled_dual_level_matches_eager():
    def tangent_of(s):
        with fwAD.dual_level():
            out = fastflow.interpolate(_X0, _X1, fwAD.make_dual(s, torch.ones_like(s)), "vp")[0]
            return fwAD.unpack_dual(out).tangent

    torch._dynamo.reset()
    got = torch.compile(tangent_of, backend="aot_eager")(_T)
    assert got is not None
    torch.testing.assert_close(got, tangent_of(_T))


def test_compiled_code_without_forward_ad_keeps_the_fused_ops():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda s: fastflow.interpolate(_X0, _X1, s, "cosine"), backend=backend,
                  fullgraph=True)(_T)
    assert any(name.startswith("fastflow.affine") for name in seen), seen


def test_the_registered_ops_refuse_a_compiled_jvp():
    # Called directly, the ops refuse forward-mode AD in eager; traced by torch.compile they
    # returned zero tangents.
    b, c = torch.randn(4, 3), torch.randn(4, 1, 2)

    def jvp_of_op(a):
        return func.jvp(lambda x: torch.ops.fastflow.affine([x, b], c)[0], (a,),
                        (torch.ones_like(a),))

    torch._dynamo.reset()
    with pytest.raises(Exception, match="fastflow.affine has no forward-mode derivative"):
        torch.compile(jvp_of_op, backend="aot_eager", fullgraph=True)(torch.randn(4, 3))


# grad, vjp and jacrev compose with the functional ops' autograd (fastflow._ops._GRAD_FUNCTIONS):
# each case against the reference's derivatives, with the formulas made to raise (the
# embeddings' backward, fastflow::sinusoid_backward, keeps its formula under transforms).
GRADS = {
    "loss in pred and t": (lambda p, s, a, b: fastflow.flow_matching_loss(p, a, b, s, "cosine"),
                           lambda p, s, a, b: reference.flow_matching_loss(p, a, b, s, "cosine")),
    "weighted loss": (lambda p, s, a, b: fastflow.flow_matching_loss(p, a, b, s, "vp", weight=s),
                      lambda p, s, a, b: reference.flow_matching_loss(p, a, b, s, "vp", weight=s)),
    "interpolate": (
        lambda p, s, a, b: fastflow.interpolate(p, b, s, "linear_vp")[1].square().sum(),
        lambda p, s, a, b: reference.interpolate(p, b, s, "linear_vp")[1].square().sum()),
    "convert": (
        lambda p, s, a, b: fastflow.convert(p, b, s, "vp", src="epsilon", dst="data").sum(),
        lambda p, s, a, b: reference.convert(p, b, s, "vp", src="epsilon", dst="data").sum()),
}


def _per_sample(f):
    """grad of f in (pred, t) for each sample alone (a batch of one), vmapped over the batch."""
    def one(p, s, a, b):
        return f(p[None], s[None], a[None], b[None])
    return func.vmap(func.grad(one, argnums=(0, 1)))


def _of_pairs(f):
    """grad of f in (pred, t) summed over the batch vmapped as two pairs: a vmap beneath the
    grad, each member's call a batch of two."""
    def summed(*args):
        return func.vmap(f)(*(x.reshape(2, 2, *x.shape[1:]) for x in args)).sum()
    return func.grad(summed, argnums=(0, 1))


@pytest.mark.parametrize("route", ["direct", "dispatcher"])
@pytest.mark.parametrize("case", GRADS)
def test_grad_transforms_run_the_kernels(monkeypatch, case, route):
    fused, ref = GRADS[case]
    args = (torch.randn(4, 3), _T.clone(), _X0, _X1)
    transforms = [lambda f: func.grad(f, argnums=(0, 1)), _per_sample, _of_pairs,
                  lambda f: func.jacrev(f, argnums=(0, 1))]
    want = [transform(ref)(*args) for transform in transforms]
    monkeypatch.setattr(fastflow._ops, "_transformable", _raises)
    calls = _route(monkeypatch, route, direct="_grad_transformed")
    got = [transform(fused)(*args) for transform in transforms]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert bool(calls) == (route == "direct")


@pytest.mark.parametrize("case", GRADS)
def test_compiled_grad_matches_eager(case):
    # torch.compile of a function applying grad stopped at the ops: torch.library's autograd
    # Function has no setup_context, which functorch requires ("must override the setup_context
    # staticmethod", pytorch/pytorch#168393).
    fused, _ = GRADS[case]
    args = (torch.randn(4, 3), _T.clone(), _X0, _X1)
    def grad_of_grad(f):
        return func.grad(lambda *a: func.grad(f)(*a).square().sum())

    for transform in (lambda f: func.grad(f, argnums=(0, 1)), _per_sample, grad_of_grad):
        torch._dynamo.reset()
        got = torch.compile(transform(fused), backend="aot_eager", fullgraph=True)(*args)
        torch.testing.assert_close(got, transform(fused)(*args))



def test_inductor_compiles_grad_and_per_sample_gradients():
    # The default backend (the tests above use aot_eager, whose graphs run the ops as traced):
    # inductor calls the ops from its generated code, around its own fused kernels.
    fused, _ = GRADS["loss in pred and t"]
    args = (torch.randn(4, 3), _T.clone(), _X0, _X1)
    for transform in (lambda f: func.grad(f, argnums=(0, 1)), _per_sample):
        torch._dynamo.reset()
        got = torch.compile(transform(fused), fullgraph=True)(*args)
        torch.testing.assert_close(got, transform(fused)(*args))

@pytest.mark.parametrize("caller", ["torch.ops", "_call"])
def test_the_ops_under_grad_transforms(caller):
    # Called under grad, vmap(grad), jacrev and grad of grad, against the same sums and products
    # in PyTorch: as registered (the dispatcher's Autograd and batching kernels) and as the
    # public functions call them (_call, which pops the levels itself). Grad of grad came out
    # wrong (0 for the second derivative of (3x)^2) while the ops' Function ran its forward with
    # gradients off, which the outer grad's level beneath the dispatcher then inherited.
    lib = torch.ops.fastflow if caller == "torch.ops" else fastflow._ops
    g = torch.Generator().manual_seed(11)
    a, b, c = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    coeffs = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)

    def by_hand(x, k):
        return [k[:, m, 0, None] * x + k[:, m, 1, None] * b + k[:, m, 2, None] * c
                for m in range(k.shape[1])]

    def affine(x, k):
        return sum(o.square().sum() for o in lib.affine([x, b, c], k))

    def sqnorm(x, k):
        return lib.affine_sqnorm([x, b, c], k[:, :1]).sum()

    def dot(x, k):
        return (lib.affine_dot([x, b], [c, x], 4) * k[:, :, :2]).sum()

    def dot_by_hand(x, k):
        return sum((k[:, m, j, None] * u * v).sum() for m, u in enumerate((x, b))
                   for j, v in enumerate((c, x)))

    ops = {
        "affine": (affine, lambda x, k: sum(o.square().sum() for o in by_hand(x, k))),
        "affine_sqnorm": (sqnorm, lambda x, k: by_hand(x, k[:, :1])[0].square().sum()),
        "affine_dot": (dot, dot_by_hand),
    }
    members = coeffs * torch.rand(3, 1, 1, 1, generator=g, dtype=torch.float64)
    transforms = [(lambda f: func.grad(f, argnums=(0, 1)), coeffs),
                  (lambda f: func.vmap(func.grad(f, argnums=(0, 1)), in_dims=(None, 0)), members),
                  (lambda f: func.jacrev(f, argnums=(0, 1)), coeffs),
                  (lambda f: func.grad(lambda x, k: func.grad(f)(x, k).square().sum(),
                                       argnums=(0, 1)), coeffs),
                  (lambda f: func.jacrev(func.jacrev(f)), coeffs)]
    for name, (op, hand) in ops.items():
        for transform, k in transforms:
            torch.testing.assert_close(transform(op)(a, k), transform(hand)(a, k), rtol=1e-10,
                                       atol=1e-10, msg=name)


@pytest.mark.parametrize("route", ["direct", "dispatcher"])
@pytest.mark.parametrize("case", GRADS)
def test_nested_grads_of_the_public_functions_run_the_kernels(monkeypatch, case, route):
    fused, ref = GRADS[case]
    args = (torch.randn(4, 3, dtype=torch.float64), _T.double(), _X0.double(), _X1.double())

    def second(f):
        return func.grad(lambda p, s: func.grad(f, argnums=(0, 1))(p, s, *args[2:])[0].square()
                         .sum(), argnums=(0, 1))(*args[:2])

    want = second(ref)
    monkeypatch.setattr(fastflow._ops, "_transformable", _raises)
    calls = _route(monkeypatch, route, direct="_grad_transformed")
    torch.testing.assert_close(second(fused), want, rtol=1e-10, atol=1e-10)
    assert bool(calls) == (route == "direct")



@pytest.mark.parametrize("route", ["direct", "dispatcher"])
def test_a_vjp_taken_inside_a_grad_matches_the_reference(monkeypatch, route):
    # The vjp's function runs after its level has ended, inside the grad's: its saved tensors
    # are dead wrappers of the grad's live ones.
    x0, x1 = _X0.double(), _X1.double()
    t = _T.double()

    def outer(lib):
        def f(p):
            return (lib.interpolate(p, x1, t, "vp")[1].square().sum()
                    * lib.flow_matching_loss(p, x0, x1, t, "cosine"))

        def vjp_times_p(p):
            out, vjp_fn = func.vjp(f, p)
            return (vjp_fn(torch.ones_like(out))[0] * p).sum()
        return vjp_times_p

    p = torch.randn(4, 3, dtype=torch.float64)
    want = [func.grad(outer(reference))(p), func.jacrev(func.jacrev(outer(reference)))(p)]
    monkeypatch.setattr(fastflow._ops, "_transformable", _raises)
    calls = _route(monkeypatch, route, direct="_grad_transformed")
    got = [func.grad(outer(fastflow))(p), func.jacrev(func.jacrev(outer(fastflow)))(p)]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert bool(calls) == (route == "direct")



@pytest.mark.parametrize("route", ["direct", "dispatcher"])
def test_a_vjp_under_per_sample_gradients_matches_the_reference(monkeypatch, route):
    # Under a grad, each sample's vjp function runs after the vjp's level has ended, inside the
    # vmap's: its saved tensors are dead wrappers of that vmap's batched tensors (functorch's
    # "batched == nullptr" assert while the vmap route read them as they were).
    x0, x1 = _X0.double(), _X1.double()

    def summed(lib):
        def vjp_times_p(p, s, a, b):   # one sample
            out, vjp_fn = func.vjp(
                lambda q: lib.flow_matching_loss(q[None], a[None], b[None], s[None], "vp"), p)
            return (vjp_fn(torch.ones_like(out))[0] * p).sum()
        return lambda p, s: func.vmap(vjp_times_p)(p, s, x0, x1).sum()

    p, t = torch.randn(4, 3, dtype=torch.float64), _T.double()
    want = func.grad(summed(reference), argnums=(0, 1))(p, t)
    monkeypatch.setattr(fastflow._ops, "_transformable", _raises)
    calls = _route(monkeypatch, route)
    got = func.grad(summed(fastflow), argnums=(0, 1))(p, t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert bool(calls) == (route == "direct")

def test_tensors_leaked_from_a_grad_work_outside_it():
    # Tensors kept from inside a grad outlive its level: wrappers without storage, which
    # PyTorch's operators unwrap. The direct route read their data pointer ("Cannot access data
    # pointer of Tensor that doesn't have storage"); they take the dispatcher now.
    x, x0, x1, t = _X0, _X1, torch.randn(4, 3), _T
    leaked = []
    func.grad(lambda p: leaked.append((p * 1.0, t * 1.0)) or p.sum())(x)
    lx, lt = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(lx)
    cases = [lambda a, s, lib: lib.interpolate(a, x1, s, "vp")[0],
             lambda a, s, lib: lib.flow_matching_loss(a, x0, x1, s, "cosine"),
             lambda a, s, lib: lib.convert(a, x1, s, "vp", src="data", dst="velocity"),
             lambda a, s, lib: lib.timestep_embedding(s, 8),
             lambda a, s, lib: func.grad(lambda p: lib.flow_matching_loss(p, a, x1, s, "vp"))(x1)]
    for case in cases:
        torch.testing.assert_close(case(lx, lt, fastflow), case(x, t, reference), rtol=1e-5,
                                   atol=1e-5)

def test_grad_builds_the_coefficients_of_constant_times_in_one_call(monkeypatch):
    # Under grad, times it does not differentiate (from outside, or made inside from constants,
    # which functorch wraps; vmapped beneath it) are constants: the backend's builder makes their
    # rows, not the paths' twenty-odd tensor ops (made to raise here). Differentiated times take
    # the formulas.
    from fastflow import _backends
    if _backends.kernels(_backends.select(torch.device("cpu"))).path_coefficients is None:
        pytest.skip("the CPU backend has no coefficient builder (the extension is not built)")
    pred, x0, x1 = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    t = _T.double()
    cases = [lambda p, s: fastflow.flow_matching_loss(p, x0, x1, s, "vp"),
             lambda p, s: fastflow.flow_matching_loss(p, x0, x1, s * 1.0, "vp", weight=s),
             lambda p, s: fastflow.interpolate(x0, p, s, "vp")[1].square().sum(),
             lambda p, s: fastflow.convert(p, x1, s, "vp", src="data", dst="score").sum()]
    # Per-sample gradients: each sample's time vmapped beneath the grad.
    def one(q, a, b, u):
        return fastflow.flow_matching_loss(q[None], a[None], b[None], u[None], "vp")

    cases += [lambda p, s: func.vmap(func.grad(one))(p, x0, x1, s).square().sum()]
    want = [func.grad(f)(pred, t) for f in cases]
    monkeypatch.setattr(paths.VP, "coefficients", _raises)
    for f, w in zip(cases, want):
        torch.testing.assert_close(func.grad(f)(pred, t), w, rtol=1e-12, atol=1e-12)
    with pytest.raises(AssertionError, match="formulas ran"):
        func.grad(cases[0], argnums=1)(pred, t)


# Stacks of the transforms the ops compose with, differentiated once more at the top: every
# kind of wrapper the routes unwrap (live, dead after a vjp, batched, from levels outside) meets
# the ops somewhere. A random search of such stacks found the dead wrappers of a vjp under
# per-sample gradients.
def _stack_per_sample(f):
    return lambda p, s, a, b: func.vmap(
        lambda q, u, c, d: f(q[None], u[None], c[None], d[None]))(p, s, a, b).sum()


def _stack_grad_in_pred(f):
    return lambda p, s, a, b: func.grad(f)(p, s, a, b).square().sum()


def _stack_grad_in_t(f):
    return lambda p, s, a, b: func.grad(f, argnums=1)(p, s, a, b).square().sum()


def _stack_vjp(f):
    def vjp_times_p(p, s, a, b):
        out, vjp_fn = func.vjp(lambda q: f(q, s, a, b), p)
        return (vjp_fn(torch.ones_like(out))[0] * p).sum()
    return vjp_times_p


def _stack_vmap_of_two(f):
    return lambda p, s, a, b: func.vmap(f, in_dims=(0, 0, 0, None))(
        torch.stack([p, 0.5 * p]), torch.stack([s, 0.9 * s]), torch.stack([a, a]), b).sum()


_STACK_KINDS = [_stack_per_sample, _stack_grad_in_pred, _stack_grad_in_t, _stack_vjp,
                _stack_vmap_of_two]
_STACKED = {
    "loss": lambda lib, path: lambda p, s, a, b: lib.flow_matching_loss(p, a, b, s, path),
    "weighted loss": lambda lib, path: lambda p, s, a, b: lib.flow_matching_loss(
        p, a, b, s, path, weight=0.5 * s + 0.2),
    "interpolate": lambda lib, path: lambda p, s, a, b: (
        lib.interpolate(p, b, s, path)[0].square().sum() + lib.interpolate(a, p, s, path)[1].sum()),
    "convert": lambda lib, path: lambda p, s, a, b: lib.convert(
        p, b, s, path, src="data", dst="velocity").square().sum(),
}


_STACKS = [(first,) for first in _STACK_KINDS] + [
    (first, second) for first in _STACK_KINDS for second in _STACK_KINDS]


@pytest.mark.parametrize("case", _STACKED)
@pytest.mark.parametrize("stack", range(len(_STACKS)))
def test_stacks_of_transforms_match_the_reference(monkeypatch, stack, case):
    # Every stack of one or two (the first innermost), on each op, the paths taken in turn.
    path = ["cond_ot", "vp", "cosine", "linear_vp"][stack % 4]
    g = torch.Generator().manual_seed(stack)
    args = (torch.randn(3, 4, generator=g, dtype=torch.float64),
            0.1 + 0.8 * torch.rand(3, generator=g, dtype=torch.float64),
            torch.randn(3, 4, generator=g, dtype=torch.float64),
            torch.randn(3, 4, generator=g, dtype=torch.float64))
    fused, ref = _STACKED[case](fastflow, path), _STACKED[case](reference, path)
    for transform in _STACKS[stack]:
        fused, ref = transform(fused), transform(ref)
    want = func.grad(ref, argnums=(0, 1))(*args)
    monkeypatch.setattr(fastflow._ops, "_transformable", _raises)
    names = [t.__name__ for t in _STACKS[stack]]
    torch.testing.assert_close(func.grad(fused, argnums=(0, 1))(*args), want, rtol=1e-9,
                               atol=1e-9, msg=lambda m: f"{case} on {path} under {names}: {m}")
