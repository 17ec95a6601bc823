"""fastflow.interpolate on every backend against the reference, plus its edge cases and errors."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastflow
from fastflow import paths
from fastflow.reference import interpolate as reference_interpolate

from conftest import DTYPES, assert_close_to_reference, compiled_extension

ALL_PATHS = [paths.CondOT(), paths.CondOT(sigma_min=0.1), paths.Polynomial(3.0), paths.Cosine(),
             paths.LinearVP(), paths.VP(), paths.TargetCFM(0.05), paths.ConstantNoise(0.2),
             paths.SchrodingerBridge(0.7)]


def _make(shape, dtype, device, path, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    x1 = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    noise = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if path.uses_noise else None
    # Away from the ends, where some paths have infinite derivatives (tested separately).
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = (0.1 + 0.8 * torch.rand(shape[0], generator=g)).to(device=device, dtype=t_dtype)
    return x0, x1, t, noise


def _fp64_reference(x0, x1, t, path, noise):
    up = (lambda x: None if x is None else x.double())
    return reference_interpolate(up(x0), up(x1), t.double(), path, up(noise))


@pytest.mark.parametrize("path", ALL_PATHS, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_fp64_reference(backend, path, dtype):
    x0, x1, t, noise = _make((4, 3, 33), dtype, backend, path)
    x_t, u_t = fastflow.interpolate(x0, x1, t, path=path, noise=noise)
    ref_x, ref_u = _fp64_reference(x0, x1, t, path, noise)
    assert_close_to_reference(x_t, ref_x, dtype)
    assert_close_to_reference(u_t, ref_u, dtype)


@pytest.mark.parametrize("t_form", ["batch", "column", "float", "0-d", "one"])
def test_cond_ot_is_bit_identical_to_eager_on_cpu(t_form, monkeypatch):
    for name in ("cpu", "reference"):
        monkeypatch.setenv("FASTFLOW_BACKEND", name)
        x0, x1 = torch.randn(2, 5, 7, 9), torch.randn(2, 5, 7, 9)
        t_batch = torch.rand(5)
        t = {"batch": t_batch, "column": t_batch.view(5, 1, 1), "float": 0.3, "0-d": t_batch[0],
             "one": t_batch[:1]}[t_form]
        x0, x1 = x0[0], x1[1]
        tt = t if not torch.is_tensor(t) or t.dim() == 0 else t.reshape(-1, 1, 1)
        x_t, u_t = fastflow.interpolate(x0, x1, t)
        assert torch.equal(x_t, tt * x1 + (1 - tt) * x0), name
        assert torch.equal(u_t, x1 - x0), name


@pytest.mark.parametrize("shape", [(1,), (7,), (1, 1), (3, 1, 5), (2, 3, 4, 5), (2, 1, 3, 1, 5),
                                   (1, 4097), (5, 1000), (0,), (0, 3), (3, 0, 2)], ids=str)
def test_shapes(backend, shape):
    path = paths.SchrodingerBridge(0.5)
    x0, x1, t, noise = _make(shape, torch.float32, backend, path) if shape[0] else (
        torch.randn(shape, device=backend), torch.randn(shape, device=backend),
        torch.rand(0, device=backend), torch.randn(shape, device=backend))
    x_t, u_t = fastflow.interpolate(x0, x1, t, path=path, noise=noise)
    ref_x, ref_u = _fp64_reference(x0, x1, t, path, noise)
    assert_close_to_reference(x_t, ref_x, torch.float32)
    assert_close_to_reference(u_t, ref_u, torch.float32)


def test_non_contiguous_and_broadcast_inputs(backend):
    base = torch.randn(6, 5, 4, device=backend)
    x0 = base.transpose(1, 2)                                  # permuted, [6, 4, 5]
    x1 = torch.randn(6, 4, 10, device=backend)[..., ::2]       # strided
    noise = torch.randn(1, 4, 5, device=backend).expand(6, 4, 5)  # stride-0 batch
    t = torch.rand(6, 2, device=backend)[:, 0]                  # strided t
    path = paths.ConstantNoise(0.3)
    x_t, u_t = fastflow.interpolate(x0, x1, t, path=path, noise=noise)
    ref_x, ref_u = _fp64_reference(x0, x1, t, path, noise)
    assert_close_to_reference(x_t, ref_x, torch.float32)
    assert_close_to_reference(u_t, ref_u, torch.float32)


def test_many_tiny_samples(backend):
    # 2-D toy data: blocks span many samples and gather their coefficients per element.
    x0, x1, t, _ = _make((3000, 2), torch.float32, backend, paths.Cosine())
    x_t, u_t = fastflow.interpolate(x0, x1, t, path="cosine")
    ref_x, ref_u = _fp64_reference(x0, x1, t, paths.Cosine(), None)
    assert_close_to_reference(x_t, ref_x, torch.float32)
    assert_close_to_reference(u_t, ref_u, torch.float32)


@pytest.mark.parametrize("path", ALL_PATHS, ids=repr)
def test_gradients_match_reference_autograd(backend, path):
    x0, x1, t, noise = _make((3, 2, 5), torch.float64, backend, path, seed=1)
    leaves = [x.clone().requires_grad_() for x in (x0, x1, t) + ((noise,) if noise is not None else ())]
    ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    w_x, w_u = torch.randn_like(x0), torch.randn_like(x0)

    def loss(fn, xs):
        x_t, u_t = fn(xs[0], xs[1], xs[2], path, xs[3] if len(xs) > 3 else None)
        return (x_t * w_x).sum() + (u_t * w_u).sum()

    grads = torch.autograd.grad(loss(fastflow.interpolate, leaves), leaves)
    ref_grads = torch.autograd.grad(loss(reference_interpolate, ref_leaves), ref_leaves)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_gradient_of_one_output_only(backend):
    x0, x1, t, _ = _make((4, 6), torch.float32, backend, paths.CondOT())
    t.requires_grad_()
    x1.requires_grad_()
    x_t, _ = fastflow.interpolate(x0, x1, t)
    x_t.sum().backward()
    torch.testing.assert_close(t.grad, (x1 - x0).sum(1).detach())
    torch.testing.assert_close(x1.grad, t.detach()[:, None].expand(4, 6))
    assert x0.grad is None


def test_gradcheck(backend):
    x0, x1, t, noise = _make((2, 3), torch.float64, backend, paths.SchrodingerBridge())
    inputs = tuple(x.requires_grad_() for x in (x0, x1, t, noise))
    fn = (lambda a, b, s, n: fastflow.interpolate(a, b, s, path="schrodinger_bridge", noise=n))
    assert torch.autograd.gradcheck(fn, inputs)


def test_out_matches_fresh_outputs_and_is_returned(backend):
    x0, x1, t, _ = _make((3, 65), torch.float32, backend, paths.Cosine())
    buffers = (torch.empty_like(x1), torch.empty_like(x1))
    x_t, u_t = fastflow.interpolate(x0, x1, t, path="cosine", out=buffers)
    assert x_t is buffers[0] and u_t is buffers[1]
    ref = fastflow.interpolate(x0, x1, t, path="cosine")
    assert torch.equal(x_t, ref[0]) and torch.equal(u_t, ref[1])


def test_out_may_alias_inputs_or_be_strided(backend):
    x0, x1, t, _ = _make((3, 40), torch.float32, backend, paths.VP())
    expected = fastflow.interpolate(x0, x1, t, path="vp")
    strided = torch.empty(3, 80, device=backend)[:, ::2]
    a, b = x0.clone(), x1.clone()
    x_t, u_t = fastflow.interpolate(a, b, t, path="vp", out=(b, a))  # outputs swap the inputs
    assert torch.equal(x_t, expected[0]) and torch.equal(u_t, expected[1])
    fastflow.interpolate(x0, x1, t, path="vp", out=(strided, torch.empty_like(x1)))
    assert torch.equal(strided, expected[0])


@pytest.mark.parametrize("alias", ["x_t on x0, u_t on x1", "u_t on x0", "x_t on x1",
                                   "x_t on a view of x0"])
def test_out_may_update_an_input_in_place(backend, alias):
    x0, x1, t, _ = _make((3, 8), torch.float32, backend, paths.Cosine())
    expected = fastflow.interpolate(x0, x1, t, path="cosine")
    a, b, spare = x0.clone(), x1.clone(), torch.empty_like(x1)
    out = {"x_t on x0, u_t on x1": (a, b), "u_t on x0": (spare, a), "x_t on x1": (b, spare),
           "x_t on a view of x0": (a.view(3, 8), spare)}[alias]
    x_t, u_t = fastflow.interpolate(a, b, t, path="cosine", out=out)
    assert torch.equal(x_t, expected[0]) and torch.equal(u_t, expected[1])


@pytest.mark.parametrize("alias", ["x_t", "u_t"])
def test_out_may_alias_an_input_through_another_storage(backend, alias):
    # Two numpy views of one array are two storages over the same memory: the overlap must be
    # seen by address (x_t written over x0 before u_t read it, silently, when it was not).
    if backend.type != "cpu":
        pytest.skip("numpy memory is host memory")
    np = pytest.importorskip("numpy")
    memory = np.random.default_rng(0).standard_normal(8 + 24).astype(np.float32)
    x0 = torch.from_numpy(memory)[8:].view(3, 8)
    on_x0 = torch.from_numpy(memory[8:]).view(3, 8)
    assert on_x0.data_ptr() == x0.data_ptr()
    assert on_x0.untyped_storage().data_ptr() != x0.untyped_storage().data_ptr()
    x1, t = torch.randn(3, 8), torch.rand(3)
    expected = reference_interpolate(x0.clone(), x1, t)
    spare = torch.empty(3, 8)
    x_t, u_t = fastflow.interpolate(x0, x1, t, out=(on_x0, spare) if alias == "x_t" else
                                    (spare, on_x0))
    assert torch.equal(x_t, expected[0]) and torch.equal(u_t, expected[1])


def _outputs_sharing_memory(x0):
    """Pairs of outputs like x0 ([2, 6]) that overlap in memory, by name."""
    device = x0.device
    o, flat, wide = (torch.empty(2, 6, device=device), torch.empty(18, device=device),
                     torch.empty(2, 12, device=device))
    return {"one tensor twice": (o, o), "x0 twice": (x0, x0), "two views of one tensor": (o, o[:]),
            "partly overlapping": (flat[:12].view(2, 6), flat[6:].view(2, 6)),
            "strided, partly overlapping": (wide[:, :6], wide[:, 3:9]),
            # Share no element, but their spans overlap: refused too (see check_outputs).
            "interleaved": (wide[:, ::2], wide[:, 1::2])}


@pytest.mark.parametrize("case", ["one tensor twice", "x0 twice", "two views of one tensor",
                                  "partly overlapping", "strided, partly overlapping",
                                  "interleaved"])
def test_out_rejects_outputs_that_share_memory(backend, case):
    x0, x1, t, _ = _make((2, 6), torch.float32, backend, paths.CondOT())
    before = x0.clone()
    with pytest.raises(ValueError, match=r"out: out\[0\] and out\[1\] overlap in memory"):
        fastflow.interpolate(x0, x1, t, out=_outputs_sharing_memory(x0)[case])
    assert torch.equal(x0, before)   # refused before anything was written


def test_out_may_be_separate_slices_of_one_buffer(backend):
    x0, x1, t, _ = _make((2, 6), torch.float32, backend, paths.CondOT())
    expected = fastflow.interpolate(x0, x1, t)
    buf = torch.empty(2, 2, 6, device=backend)
    fastflow.interpolate(x0, x1, t, out=(buf[0], buf[1]))
    assert torch.equal(buf[0], expected[0]) and torch.equal(buf[1], expected[1])


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("kind", ["leaf", "non-leaf"])
def test_out_requiring_grad_is_refused_in_grad_mode(backend, which, kind):
    x0, x1, t, _ = _make((2, 6), torch.float32, backend, paths.CondOT())
    weights = torch.zeros(2, 6, device=backend, requires_grad=True)
    out = [torch.empty_like(x1), torch.empty_like(x1)]
    out[which] = weights if kind == "leaf" else weights * 1
    with pytest.raises(RuntimeError, match=rf"out: .*automatic differentiation, but out\[{which}\] "
                                           r"requires grad"):
        fastflow.interpolate(x0, x1, t, out=out)
    assert not out[which].detach().any()   # refused before anything was written
    with torch.no_grad():                  # PyTorch's rule: without grad mode, out= may write it
        got = fastflow.interpolate(x0, x1, t, out=out)
    assert torch.equal(got[which], fastflow.interpolate(x0, x1, t)[which])


def test_out_bumps_the_version_of_what_it_writes(backend):
    # As PyTorch's in-place ops: a buffer that autograd saved and out= then rewrote makes the
    # backward raise, instead of differentiating with the new values (silently wrong gradients
    # when one step filled the same buffers twice, on the cpu and triton backends).
    x0, x1, t, _ = _make((8, 3), torch.float32, backend, paths.CondOT())
    w = torch.randn(3, device=backend, requires_grad=True)
    buf = (torch.empty_like(x1), torch.empty_like(x1))
    x_t, _ = fastflow.interpolate(x0, x1, t, out=buf)
    loss = (x_t * w).sum()                       # saves x_t, which is buf[0]
    versions = [b._version for b in buf]
    fastflow.interpolate(x1, x0, t, out=buf)
    assert all(b._version > v for b, v in zip(buf, versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.inference_mode():                 # inference tensors have no version to bump
        out = (torch.empty_like(x1), torch.empty_like(x1))
        fastflow.interpolate(x0, x1, t, out=out)


def test_out_refuses_what_pytorch_refuses_before_writing(backend):
    x0, x1, t, _ = _make((3, 4), torch.float32, backend, paths.CondOT())
    other = torch.zeros_like(x1)
    with torch.inference_mode():
        frozen = torch.zeros_like(x1)
    with pytest.raises(RuntimeError, match="out.0.: an inference tensor"):
        fastflow.interpolate(x0, x1, t, out=(frozen, other))
    expanded = torch.zeros(1, 4, device=backend).expand(3, 4)
    with pytest.raises(ValueError, match=r"out\[0\]: an expanded tensor"):
        fastflow.interpolate(x0, x1, t, out=(expanded, other))
    assert not other.any() and not frozen.any()   # nothing written


def _out_cases(x0, x1):
    """out= pairs for [3, 4] fp32 streams, by name: each accepted (None) or the error it gets."""
    other, buf, wide = torch.zeros_like(x1), torch.zeros(2, 3, 4), torch.zeros(3, 8)
    with torch.inference_mode():
        frozen = torch.zeros_like(x1)
    return {
        "fresh": ((torch.empty_like(x1), other), None),
        "slices of one buffer": ((buf[0], buf[1]), None),
        "the inputs, swapped": ((x1, x0), None),
        "strided": ((wide[:, :4], other), None),
        "one tensor twice": ((other, other), "overlap in memory"),
        "interleaved": ((wide[:, ::2], wide[:, 1::2]), "overlap in memory"),
        "partly overlapping": ((wide[:, :4], wide[:, 2:6]), "overlap in memory"),
        "requires grad": ((torch.zeros_like(x1, requires_grad=True), other), "requires grad"),
        "inference tensor": ((frozen, other), "inference tensor"),
        "expanded": ((torch.zeros(1, 4).expand(3, 4), other), "expanded tensor"),
        "negative bit": ((torch._neg_view(torch.zeros_like(x1)), other), "negative bit"),
        "fp64": ((x1.double(), other), "expected dtype"),
        "shape": ((other, torch.zeros(4, 3)), "expected shape"),
        "meta": ((other, torch.empty(3, 4, device="meta")), "expected a tensor on cpu"),
    }


def test_the_extension_accepts_exactly_the_outs_that_check_outputs_accepts():
    """check_outputs asks the extension first (one call where its rules cost a microsecond each
    in Python) and skips them when it accepts: it must refuse everything they refuse."""
    ext = compiled_extension()
    x0, x1, t, _ = _make((3, 4), torch.float32, "cpu", paths.CondOT())
    for case, (out, error) in _out_cases(x0, x1).items():
        assert ext.outputs_acceptable(out, x1, (x0, x1, t)) == (error is None), case
        if error is None:
            fastflow.interpolate(x0, x1, t, out=out)
        else:
            with pytest.raises((ValueError, TypeError, RuntimeError), match=error):
                fastflow.interpolate(x0, x1, t, out=out)
    out = (torch.empty_like(x1), torch.empty_like(x1))
    assert not ext.outputs_acceptable(out, x1, (x0.requires_grad_(), x1, t))
    with torch.no_grad():   # outside grad mode, gradients do not matter
        assert ext.outputs_acceptable(out, x1, (x0, x1, t))
    with FakeTensorMode() as mode:   # left to Python, which the tracers' tensors need
        fake = tuple(mode.from_tensor(o) for o in out)
        assert not ext.outputs_acceptable(fake, x1, (x1,))


# Dense layouts other than the contiguous one, as memory order: channels_last; the batch
# innermost (x.T); sequence first (a [B, T, C] view of [T, B, C] memory).
DENSE_LAYOUTS = {
    "channels_last": (0, 2, 3, 1),
    "batch innermost": (1, 2, 3, 0),
    "sequence first": (1, 0, 2, 3),
}


@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
def test_dense_layouts_in_dense_layouts_out(backend, layout):
    """As PyTorch's elementwise ops: the outputs keep the inputs' layout (eager, and traced:
    the fake kernel gives the same strides), CondOT's bits are the eager formula's."""
    x0, x1, t, _ = _make((3, 4, 2, 5), torch.float32, backend, paths.CondOT())
    order = DENSE_LAYOUTS[layout]
    x0, x1 = (x.permute(order).contiguous().permute([order.index(d) for d in range(4)])
              for x in (x0, x1))
    assert not x0.is_contiguous()
    tt = t[:, None, None, None]
    want = (tt * x1 + (1 - tt) * x0, x1 - x0)
    got = fastflow.interpolate(x0, x1, t)
    compiled = torch.compile(fastflow.interpolate, fullgraph=True, backend="aot_eager")(x0, x1, t)
    for g, c, w in zip(got, compiled, want):
        assert g.stride() == c.stride() == w.stride() == x0.stride()
        assert torch.equal(g, w) and torch.equal(c, w)
    with FakeTensorMode() as mode:   # what a compiler plans with: the fake kernel's strides
        fake = fastflow.interpolate(*(mode.from_tensor(x) for x in (x0, x1, t)))
    assert all(f.stride() == x0.stride() for f in fake)


def test_torch_compile_fullgraph(backend):
    x0, x1, t, _ = _make((4, 3, 8), torch.float32, backend, paths.Cosine())
    t.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x0, x1, t):
        x_t, u_t = fastflow.interpolate(x0, x1, t, path=paths.Cosine())
        return ((x_t - u_t) ** 2).mean()

    loss = step(x0, x1, t)
    loss.backward()
    t_ref = t.detach().clone().requires_grad_()
    x_ref, u_ref = reference_interpolate(x0, x1, t_ref, paths.Cosine())
    ref = ((x_ref - u_ref) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(t.grad, t_ref.grad)


def test_torch_compile_inductor_with_out(backend):
    x0, x1, t, _ = _make((4, 16), torch.float32, backend, paths.CondOT())
    out = (torch.empty_like(x1), torch.empty_like(x1))
    compiled = torch.compile(lambda a, b, s: fastflow.interpolate(a, b, s, out=out), fullgraph=True)
    compiled(x0, x1, t)
    tt = t[:, None]
    torch.testing.assert_close(out[0], tt * x1 + (1 - tt) * x0)
    torch.testing.assert_close(out[1], x1 - x0)


def test_torch_compile_refuses_one_tensor_as_both_outputs():
    # The tracer cannot read addresses: of the overlaps, it sees only the same tensor twice.
    x = torch.randn(2, 4)
    out = torch.empty_like(x)
    compiled = torch.compile(lambda a, b, o: fastflow.interpolate(a, b, 0.5, out=(o, o)),
                             backend="eager")
    with pytest.raises(ValueError, match=r"out\[0\] and out\[1\] overlap"):
        compiled(x, x, out)


@pytest.mark.parametrize("t", [-0.0, 0.0, 1.0])
@pytest.mark.parametrize("path", [paths.CondOT(), paths.Cosine(), paths.Polynomial(2.0)], ids=repr)
def test_ends_of_the_path(path, t):
    x0, x1 = torch.randn(2, 3), torch.randn(2, 3)
    x_t, _ = fastflow.interpolate(x0, x1, t, path=path)
    torch.testing.assert_close(x_t, x1 if t == 1.0 else x0, atol=1e-7, rtol=0)


def test_infinite_derivative_at_the_end_follows_the_formula():
    x0, x1 = torch.randn(2, 3), torch.randn(2, 3)
    _, u_t = fastflow.interpolate(x0, x1, 1.0, path="vp")
    _, ref_u = reference_interpolate(x0, x1, 1.0, "vp")
    assert torch.equal(u_t.isnan(), ref_u.isnan()) and torch.equal(u_t.isinf(), ref_u.isinf())


class TestBadInput:
    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="x0: expected shape"):
            fastflow.interpolate(torch.randn(2, 3), torch.randn(2, 4), 0.5)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="x0: expected dtype torch.float32"):
            fastflow.interpolate(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3), 0.5)

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="x0: expected a tensor on cpu"):
            fastflow.interpolate(torch.randn(2, 3, device="meta"), torch.randn(2, 3), 0.5)

    def test_sparse_data(self):   # a storage error from the kernel before
        x = torch.randn(2, 3).to_sparse()
        with pytest.raises(TypeError, match="x1: expected a dense tensor, got a torch.sparse_coo"):
            fastflow.interpolate(x, x, 0.5)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
    def test_non_float_data(self, dtype):
        x = torch.zeros(2, 3, dtype=dtype)
        with pytest.raises(TypeError, match="x1: expected a float16, bfloat16, float32 or float64"):
            fastflow.interpolate(x, x, 0.5)

    def test_integer_t(self):
        with pytest.raises(TypeError, match="t: expected a floating-point tensor"):
            fastflow.interpolate(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]))

    @pytest.mark.parametrize("shape", [(3,), (2, 3), (1, 2), (2, 1, 1, 1)])
    def test_t_of_wrong_length_or_shape(self, shape):
        with pytest.raises(ValueError, match=r"t: expected a scalar, shape \[2\]|t: has 4 dim"):
            fastflow.interpolate(torch.randn(2, 3), torch.randn(2, 3), torch.rand(shape))

    def test_t_on_another_device(self):
        with pytest.raises(ValueError, match="t: expected a tensor on cpu"):
            fastflow.interpolate(torch.randn(2, 3), torch.randn(2, 3), torch.rand(2, device="meta"))

    def test_zero_dim_data(self):
        with pytest.raises(ValueError, match="x1: expected a tensor with a batch dimension"):
            fastflow.interpolate(torch.tensor(1.0), torch.tensor(2.0), 0.5)

    def test_unknown_path_name(self):
        with pytest.raises(ValueError, match="path: unknown name 'straight'"):
            fastflow.interpolate(torch.randn(2, 3), torch.randn(2, 3), 0.5, path="straight")

    def test_path_of_wrong_type(self):
        with pytest.raises(TypeError, match="path: expected a fastflow.paths.Path"):
            fastflow.interpolate(torch.randn(2, 3), torch.randn(2, 3), 0.5, path=3)

    @pytest.mark.parametrize("n", [-1.0, 0, -2])
    def test_non_positive_polynomial_power(self, n):
        with pytest.raises(ValueError, match="Polynomial: n must be positive"):
            paths.Polynomial(n)

    def test_noise_missing_or_unexpected(self):
        x = torch.randn(2, 3)
        with pytest.raises(ValueError, match="noise: .* needs a noise tensor"):
            fastflow.interpolate(x, x, 0.5, path="schrodinger_bridge")
        with pytest.raises(ValueError, match="noise: .* has no noise term"):
            fastflow.interpolate(x, x, 0.5, noise=x)
        with pytest.raises(ValueError, match="noise: expected shape"):
            fastflow.interpolate(x, x, 0.5, path="constant_noise", noise=torch.randn(2, 2))

    def test_bad_out(self):
        x = torch.randn(2, 3)
        with pytest.raises(TypeError, match="out: expected a pair"):
            fastflow.interpolate(x, x, 0.5, out=torch.empty(2, 3))
        with pytest.raises(ValueError, match=r"out\[1\]: expected shape"):
            fastflow.interpolate(x, x, 0.5, out=(torch.empty(2, 3), torch.empty(3, 2)))
        with pytest.raises(RuntimeError, match="does not support automatic differentiation"):
            fastflow.interpolate(x.requires_grad_(), x, 0.5, out=(torch.empty(2, 3), torch.empty(2, 3)))
