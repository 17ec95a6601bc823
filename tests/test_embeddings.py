"""Time embeddings: the fused op against the source formulas (diffusers, ADM/DiT, Gaussian Fourier
features), on every backend, with gradients, opcheck, compile and bad input."""
import itertools
import math

import numpy as np
import pytest
import torch

import fastflow
from fastflow import _backends, embeddings, reference
from fastflow.nn import FourierEmbedding, SinusoidalEmbedding, TimestepEmbedder

from conftest import TOLERANCE, assert_close_to_reference, bits_equal

# Every combination of diffusers' arguments, on odd and even widths.
DIMS = [1, 3, 8, 9, 64, 255, 256]
COMBOS = list(itertools.product([False, True], [0.0, 1.0, 0.5], [1.0, 1000.0], [10000, 100]))


def _timesteps(n, device, integer=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if integer:
        return torch.randint(0, 1000, (n,), generator=g).to(device)
    return (torch.rand(n, generator=g) * 1000).to(device)


def _sin_cos_oracle(a, cos_first, dim):
    """sin and cos in fp64 of the fp32 arguments the kernels must form: the fused op may differ
    from eager fp32 sin/cos by an ulp of either, never by the rounding of the argument."""
    a = a.double()
    halves = [a.cos(), a.sin()] if cos_first else [a.sin(), a.cos()]
    return torch.nn.functional.pad(torch.cat(halves, dim=1), (0, dim - 2 * a.shape[1]))


@pytest.mark.parametrize("dim", DIMS)
def test_timestep_embedding_matches_diffusers_formula(backend, dim):
    for integer, (flip, shift, scale, max_period) in zip(itertools.cycle([False, True]), COMBOS):
        if dim // 2 == shift:
            continue
        t = _timesteps(13, backend, integer)
        kwargs = dict(max_period=max_period, flip_sin_to_cos=flip, downscale_freq_shift=shift,
                      scale=scale)
        out = fastflow.timestep_embedding(t, dim, **kwargs)
        assert out.dtype == torch.float32 and out.shape == (13, dim)
        formula = reference.timestep_embedding(t, dim, **kwargs)
        assert_close_to_reference(out, formula, torch.float32)
        # The same arguments, rounded as diffusers rounds them; sin/cos in fp64.
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                               device=backend) / (half - shift))
        args = scale * (t[:, None].float() * freqs[None, :])
        assert_close_to_reference(out, _sin_cos_oracle(args, flip, dim), torch.float32)


def test_timestep_embedding_equals_diffusers():
    emb = pytest.importorskip("diffusers.models.embeddings")
    t = _timesteps(32, "cpu", integer=True)
    for dim, (flip, shift, scale, max_period) in itertools.product([3, 32, 320, 257], COMBOS):
        if dim // 2 == shift:
            continue
        kwargs = dict(flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
                      max_period=max_period)
        ours = fastflow.timestep_embedding(t, dim, **kwargs)
        theirs = emb.get_timestep_embedding(t, dim, **kwargs)
        assert_close_to_reference(ours, theirs, torch.float32)
    projection = emb.GaussianFourierProjection(64, scale=16.0, log=True, flip_sin_to_cos=True)
    sigmas = torch.rand(8) * 80 + 0.002
    ours = fastflow.fourier_embedding(sigmas, projection.weight, log=True, flip_sin_to_cos=True)
    assert_close_to_reference(ours, projection(sigmas), torch.float32)


@pytest.mark.parametrize("dim", [2, 5, 256])
@pytest.mark.parametrize("name", ["adm", "dit"])
def test_adm_and_dit_convention(backend, name, dim):
    t = torch.rand(9, device=backend)  # flow-matching times in [0, 1]
    out = fastflow.timestep_embedding(t, dim, **embeddings.convention(name))
    assert_close_to_reference(out, reference.adm_timestep_embedding(t, dim), torch.float32)
    module = SinusoidalEmbedding(dim, convention=name)
    assert torch.equal(module(t), out)


@pytest.mark.parametrize("log,flip", [(False, False), (True, False), (False, True)])
def test_fourier_embedding(backend, log, flip):
    g = torch.Generator().manual_seed(1)
    t = (torch.rand(11, generator=g) + 0.01).to(backend)
    W = (torch.randn(24, generator=g) * 16).to(backend)
    out = fastflow.fourier_embedding(t, W, log=log, flip_sin_to_cos=flip)
    assert out.shape == (11, 48)
    formula = reference.fourier_embedding(t, W, log=log, flip_sin_to_cos=flip)
    # Arguments reach ~2 pi * 64 * 4: the fp32 formula itself carries an ulp of them.
    assert_close_to_reference(out, formula, torch.float32)
    args = (torch.log(t) if log else t)[:, None] * W[None, :] * 2 * math.pi
    assert_close_to_reference(out, _sin_cos_oracle(args, flip, 48), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtypes(backend, dtype):
    t = torch.rand(6, device=backend) * 1000
    out = fastflow.timestep_embedding(t, 43, dtype=dtype)   # 21 frequencies: vectors and a tail
    assert out.dtype == dtype
    # Computed in fp32 (t is fp32), rounded once to the output dtype. (Not on the Triton
    # interpreter, which narrows to bf16 by truncation; compiled Triton rounds to nearest even.)
    if not (backend.type == "cpu" and _backends.select(backend) == "triton"):
        assert bits_equal(out, fastflow.timestep_embedding(t, 43).to(dtype))
    err = (out.double() - reference.timestep_embedding(t, 43).double()).abs().max().item()
    assert err <= max(TOLERANCE[dtype], TOLERANCE[torch.float32])


def test_float64_times_compute_in_float64(backend):
    t = torch.rand(7, dtype=torch.float64, device=backend) * 1000
    out = fastflow.timestep_embedding(t, 16, flip_sin_to_cos=True)
    half = 8
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - 1.0))
    args = t.cpu()[:, None] * freqs[None, :]
    assert out.dtype == torch.float64
    assert_close_to_reference(out, torch.cat([args.cos(), args.sin()], dim=1), torch.float64)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
def test_large_and_non_finite_arguments(backend):
    """Past the fast path's range (|a| > 8192) the CPU kernel switches to exact evaluation."""
    t = torch.tensor([1e5, -3e4, 8191.5, 2.5e6, 0.0], device=backend)
    out = fastflow.timestep_embedding(t, 20, downscale_freq_shift=0)
    # The kernel's frequencies, computed on the device: a CUDA exp may round one of them to
    # the other neighbour, which moves an argument of 1e6 by far more than the tolerance.
    freqs = embeddings._sinusoidal_frequencies(10, 1e4, 0.0, torch.float32, backend).cpu()
    args = t.cpu()[:, None] * freqs[None, :]
    assert_close_to_reference(out, _sin_cos_oracle(args, False, 20), torch.float32)
    bad = fastflow.timestep_embedding(torch.tensor([float("nan"), float("inf")], device=backend), 4)
    assert torch.isnan(bad).all()


def test_fast_path_accuracy_over_its_whole_range():
    a = torch.linspace(-8192, 8192, 200_001)
    out = fastflow._ops.sinusoid(a, torch.ones(1), 1.0, False, 2, torch.float32)
    exact = torch.stack([a.double().sin(), a.double().cos()], dim=1)
    assert (out.double() - exact).abs().max() < 2.5e-7


@pytest.mark.parametrize("shape", [(0,), (1,), (4,)])
def test_empty_and_tiny(backend, shape):
    t = torch.rand(shape, device=backend)
    for dim in (1, 2, 7):
        out = fastflow.timestep_embedding(t, dim, downscale_freq_shift=0)
        assert out.shape == (shape[0], dim)
        assert_close_to_reference(out, reference.timestep_embedding(t, dim, downscale_freq_shift=0),
                                  torch.float32)
    assert (fastflow.timestep_embedding(t, 1) == 0).all()


def test_non_contiguous_times(backend):
    t = torch.rand(20, device=backend)[::3]
    assert torch.equal(fastflow.timestep_embedding(t, 16),
                       fastflow.timestep_embedding(t.contiguous(), 16))


def test_gradcheck(backend):
    t = torch.rand(5, dtype=torch.float64, device=backend, requires_grad=True)
    W = torch.randn(6, dtype=torch.float64, device=backend, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, W: fastflow.fourier_embedding(t, W, flip_sin_to_cos=True), (t, W))
    assert torch.autograd.gradcheck(lambda t: fastflow.timestep_embedding(t, 9) * 3, (t,))


@pytest.mark.parametrize("wanted", ["t", "W", "both"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference_autograd(backend, wanted, out_dtype):
    g = torch.Generator().manual_seed(2)
    t0, W0 = torch.rand(64, generator=g).to(backend), torch.randn(40, generator=g).to(backend)
    t, W = t0.clone().requires_grad_(wanted != "W"), W0.clone().requires_grad_(wanted != "t")
    out = fastflow.fourier_embedding(t, W, dtype=out_dtype)
    grad = torch.randn(out.shape, generator=g).to(device=backend, dtype=out_dtype)
    out.backward(grad)
    rt, rW = t0.double().requires_grad_(), W0.double().requires_grad_()
    reference.fourier_embedding(rt, rW).backward(grad.double())
    # A sum over 40 (t) or 64 (W) terms of size up to 2 pi |W| |t|.
    if wanted != "W":
        torch.testing.assert_close(t.grad.double(), rt.grad, rtol=1e-4, atol=1e-4)
    else:
        assert t.grad is None
    if wanted != "t":
        torch.testing.assert_close(W.grad.double(), rW.grad, rtol=1e-4, atol=1e-4)
    else:
        assert W.grad is None


@pytest.mark.parametrize("embed", ["timestep", "fourier"])
def test_double_backward_raises_a_clear_error(backend, embed):
    # It is not supported: without this error the gradients that went through the fused
    # backward would silently count as constants (zero second derivatives).
    t = torch.rand(3, dtype=torch.float64, device=backend, requires_grad=True)
    W = torch.randn(2, dtype=torch.float64, device=backend, requires_grad=True)
    if embed == "timestep":
        out = fastflow.timestep_embedding(t, 5)
    else:
        out = fastflow.fourier_embedding(t, W)
    # A first-order gradient that records its graph is fine; differentiating it is not.
    (grad_t,) = torch.autograd.grad(out.square().sum(), t, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward through fastflow's "
                                                  "sinusoidal embeddings is not supported"):
        grad_t.sum().backward()


def test_backward_is_deterministic_across_thread_counts():
    t = torch.rand(3000, requires_grad=True)
    W = torch.randn(128, requires_grad=True)
    grad = torch.randn(3000, 256)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            t.grad = W.grad = None
            fastflow.fourier_embedding(t, W).backward(grad)
            results.append((t.grad.clone(), W.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for tg, wg in results[1:]:
        assert torch.equal(tg, results[0][0]) and torch.equal(wg, results[0][1])


def test_opcheck(backend):
    t = torch.rand(6, device=backend, requires_grad=True)
    freqs = torch.randn(5, device=backend, requires_grad=True)
    for args in [(t, freqs, 2 * math.pi, False, 10, torch.float32),
                 (t, freqs, 1.0, True, 11, torch.bfloat16)]:
        torch.library.opcheck(torch.ops.fastflow.sinusoid, args)
    grad = torch.randn(6, 11, device=backend)
    torch.library.opcheck(torch.ops.fastflow.sinusoid_backward,
                          (grad, t.detach(), freqs.detach(), 1.0, False, True, True))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_training_step(compile_backend):
    torch._dynamo.reset()
    embedder = TimestepEmbedder(32, 64)
    fourier = FourierEmbedding(64, scale=4.0, learnable=True)

    def loss(t):
        return embedder(t).square().mean() + fourier(t).sum()

    t = torch.rand(8)
    eager = loss(t)
    eager.backward()
    grads = [p.grad.clone() for p in (*embedder.parameters(), fourier.weight)]
    for p in (*embedder.parameters(), fourier.weight):
        p.grad = None
    compiled = torch.compile(loss, fullgraph=True, backend=compile_backend)(t)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, g in zip((*embedder.parameters(), fourier.weight), grads):
        torch.testing.assert_close(p.grad, g)


def test_compiled_with_dynamic_shapes():
    # dynamic=True traces float arguments and defaults as symbolic floats, on which the scale
    # checks called math.isfinite: a graph break that fullgraph refused, for every call.
    torch._dynamo.reset()
    embedder = TimestepEmbedder(16, 8)

    def embed(t, scale):
        return fastflow.timestep_embedding(t, 8, scale=scale) + embedder(t).sum()

    compiled = torch.compile(embed, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (3, 5):
        t = torch.rand(batch)
        torch.testing.assert_close(compiled(t, 2.0), embed(t, 2.0))


def test_a_dynamic_fourier_width_compiles_once():
    # The op took its width as an int, which specialised it: a recompile per width of W.
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fastflow.fourier_embedding, fullgraph=True, dynamic=True,
                             backend=counter)
    frames = []
    for width in (6, 10, 7):
        t, W = torch.rand(5, requires_grad=True), torch.randn(width, requires_grad=True)
        got, want = compiled(t, W), reference.fourier_embedding(t, W)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), (t, W)),
                                   torch.autograd.grad(want.sum(), (t, W)))
        frames.append(counter.frame_count)
    assert frames[1:] == frames[:1] * 2, frames


def test_timestep_embedder_on_meta_tensors():
    # It asked whether autocast was on for the meta device, which has none (a RuntimeError).
    out = TimestepEmbedder(32, 16).to("meta")(torch.rand(3, device="meta"))
    assert out.shape == (3, 32) and out.is_meta


def test_timestep_embedder_is_dit():
    torch.manual_seed(0)
    ours = TimestepEmbedder(48, 256)
    t = torch.rand(5) * 1000
    freq = reference.adm_timestep_embedding(t, 256)
    expected = ours.mlp(freq)
    torch.testing.assert_close(ours(t), expected, rtol=1e-5, atol=1e-5)
    assert sorted(ours.state_dict()) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]
    half = ours.to(torch.bfloat16)
    assert half(t).dtype == torch.bfloat16


def test_fourier_module_fixed_and_learned():
    fixed = FourierEmbedding(32, scale=16.0)
    learned = FourierEmbedding(32, scale=16.0, learnable=True, log=True)
    assert not fixed.weight.requires_grad and learned.weight.requires_grad
    assert "weight" in fixed.state_dict()
    t = torch.rand(4) + 0.1
    learned(t).sum().backward()
    assert learned.weight.grad.shape == (16,)
    assert_close_to_reference(fixed(t), reference.fourier_embedding(t, fixed.weight), torch.float32)
    # Cast to 16 bits, the module emits in t's and W's promoted type, as diffusers'
    # GaussianFourierProjection after .half() (it gave W's type for fp32 t), computed in fp32
    # from the 16-bit W and rounded once.
    for dtype in (torch.float16, torch.bfloat16):
        cast = FourierEmbedding(32, scale=16.0).to(dtype)
        for t_dtype in (dtype, torch.float32, torch.float64):
            out = cast(t.to(t_dtype))
            assert out.dtype == torch.promote_types(t_dtype, dtype)
            assert torch.equal(out, fastflow.fourier_embedding(t.to(t_dtype), cast.weight,
                                                               dtype=out.dtype))
        assert cast(t, dtype=torch.float16).dtype == torch.float16


def test_bad_input():
    t = torch.rand(4)
    with pytest.raises(ValueError, match="t: expected a 1-D"):
        fastflow.timestep_embedding(t[:, None], 8)
    with pytest.raises(TypeError, match="t: expected a 1-D tensor"):
        fastflow.timestep_embedding(torch.ones(4, dtype=torch.bool), 8)
    with pytest.raises(TypeError, match="t: expected"):
        fastflow.timestep_embedding([0.5], 8)
    for dim in (0, -2, 8.0, True):
        with pytest.raises(ValueError, match="dim: expected a positive integer"):
            fastflow.timestep_embedding(t, dim)
    with pytest.raises(ValueError, match="downscale_freq_shift: equal to dim // 2"):
        fastflow.timestep_embedding(t, 2)
    for bad in (0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_period: expected a finite positive number"):
            fastflow.timestep_embedding(t, 8, max_period=bad)
    with pytest.raises(TypeError, match="dtype"):
        fastflow.timestep_embedding(t, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="W: expected a 1-D floating tensor"):
        fastflow.fourier_embedding(t, torch.randn(2, 3))
    with pytest.raises(TypeError, match="W: expected a 1-D floating tensor"):
        fastflow.fourier_embedding(t, torch.arange(3))
    with pytest.raises(TypeError, match="W: expected a 1-D floating tensor"):
        fastflow.fourier_embedding(t, [1.0, 2.0])
    with pytest.raises(ValueError, match="convention"):
        SinusoidalEmbedding(8, convention="ddpm")
    with pytest.raises(ValueError, match="convention: expected one of"):
        embeddings.convention(["dit"])
    with pytest.raises(ValueError, match="dim: expected a positive even"):
        FourierEmbedding(7)
    with pytest.raises(ValueError, match="fastflow sinusoid: dim must be"):
        torch.ops.fastflow.sinusoid(t, torch.ones(3), 1.0, False, 9, torch.float32)
    with pytest.raises(ValueError, match="freqs must be 1-D"):
        torch.ops.fastflow.sinusoid(t, torch.ones(3, dtype=torch.float64), 1.0, False, 6,
                                    torch.float32)


def test_the_module_checks_its_arguments_without_running_a_backend(monkeypatch):
    # The constructor validates on the meta device: with a backend forced that cannot run on
    # CPU tensors (triton or cuda on a GPU machine), building the module must still work.
    monkeypatch.setenv(fastflow._backends.ENV_VAR, "cuda")
    assert SinusoidalEmbedding(8, convention="adm").dim == 8
    with pytest.raises(ValueError, match="downscale_freq_shift"):
        SinusoidalEmbedding(2, downscale_freq_shift=1)


def test_compiled_kernels_check_their_arguments():
    from conftest import compiled_extension

    ext = compiled_extension()
    t, f = torch.rand(4), torch.rand(3)
    with pytest.raises(RuntimeError, match="out must be"):
        ext.sinusoid_cpu(t, f, 1.0, False, torch.empty(4, 5))
    with pytest.raises(RuntimeError, match="freqs must be 1-D"):
        ext.sinusoid_cpu(t, f.double(), 1.0, False, torch.empty(4, 6))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.sinusoid_cpu(t, f, 1.0, False, torch.empty(6, 4).t())
    with pytest.raises(RuntimeError, match="grad must be"):
        ext.sinusoid_backward_cpu(torch.empty(3, 6), t, f, 1.0, False, True, True)


def test_meta_backward_checks_the_rows_as_the_kernels_do():
    grad, t, freqs = torch.randn(2, 8), torch.rand(3), torch.rand(4)
    for device in ("cpu", "meta"):
        with pytest.raises(ValueError, match="grad must have 3 rows"):
            torch.ops.fastflow.sinusoid_backward(grad.to(device), t.to(device), freqs.to(device),
                                                 1.0, False, True, True)


def test_the_backward_op_refuses_a_grad_on_another_device():
    # A meta grad beside CPU t and freqs sent the call to the fake kernel, whose outputs are
    # CPU tensors that nothing fills: uninitialised memory, on every backend.
    grad, t, freqs = torch.randn(3, 8), torch.rand(3), torch.rand(4)
    for a, b in (("meta", "cpu"), ("cpu", "meta")):
        with pytest.raises(ValueError,
                           match=f"grad must have 3 rows on {b}, got \\[3, 8\\] on {a}"):
            torch.ops.fastflow.sinusoid_backward(grad.to(a), t.to(b), freqs.to(b), 1.0, False,
                                                 True, True)


@pytest.mark.parametrize("kwargs,error,message", [
    # float(scale) detached it: the gradient that diffusers gives scale was silently dropped.
    ({"scale": torch.tensor(2.0, requires_grad=True)}, ValueError,
     "scale is a tensor that requires grad"),
    ({"scale": "2"}, TypeError, "scale must be a number, got str"),
    ({"scale": 1j}, TypeError, "scale must be a number, got complex"),
    ({"scale": torch.tensor([1.0, 2.0])}, TypeError, "scale must be a number, got Tensor"),
    ({"scale": float("nan")}, ValueError, "scale must be finite"),
    ({"downscale_freq_shift": "1"}, TypeError, "downscale_freq_shift must be a number, got str"),
    ({"max_period": True}, ValueError, "max_period: expected a finite positive number"),
])
def test_the_embedding_checks_its_numbers(kwargs, error, message):
    t = torch.tensor([1.0, 5.0])
    with pytest.raises(error, match=message):
        fastflow.timestep_embedding(t, 8, **kwargs)
    # A one-element tensor that needs no gradient is a number.
    assert bits_equal(fastflow.timestep_embedding(t, 8, scale=torch.tensor(2.0)),
                      fastflow.timestep_embedding(t, 8, scale=2.0))


def test_the_layers_check_their_arguments():
    assert FourierEmbedding(np.int64(8)).weight.shape == (4,)
    with pytest.raises(TypeError, match="scale must be a number, got str"):
        FourierEmbedding(8, scale="2")
    with pytest.raises(TypeError, match="scale must be a number, got Tensor"):
        FourierEmbedding(8, scale=torch.ones(2, 4))   # built a [2, 4] weight
    with pytest.raises(TypeError, match="t: expected a 1-D tensor of times, got list"):
        TimestepEmbedder(16)([0.1])


def test_timestep_embedder_asks_no_autocast_availability_on_cpu(monkeypatch):
    # torch.amp.is_autocast_available is opaque to torch.compile before PyTorch 2.13: asked on
    # every call, it broke the fullgraph compile of TimestepEmbedder there (test_compiled_*).
    def refuse(device_type):
        raise AssertionError(f"asked torch.amp.is_autocast_available({device_type!r})")

    embedder = TimestepEmbedder(16, 8)
    t = torch.rand(3)
    monkeypatch.setattr(torch.amp, "is_autocast_available", refuse)
    assert embedder(t).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert embedder(t).dtype == torch.bfloat16
