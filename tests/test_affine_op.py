"""The dispatcher ops fastflow::affine, affine_out and affine_dot on every backend, and the
argument checks of the C++ kernels behind them."""
import ctypes
import itertools
import mmap
import os
import re

import pytest
import torch

import fastflow  # noqa: F401  (registers the ops)
from fastflow import _backends, _ops
from fastflow.reference import affine as reference_affine
from fastflow.reference import affine_dot as reference_affine_dot

from conftest import DTYPES, TOLERANCE, assert_close_to_reference, bits_equal, compiled_extension

ARITIES = list(itertools.product(range(1, _ops.MAX_INPUTS + 1), range(1, _ops.MAX_OUTPUTS + 1)))
DOT_ARITIES = [(1, 1), (1, 4), (4, 1), (2, 3), (4, 4)]

# (shape, per_sample): groups G = B = shape[0] when per_sample, else G = 1. Under the Triton
# interpreter a block holds 4096 elements and tiles one group when n >= 2048: n = 2 with many
# groups takes the per-element gather path (two blocks straddling groups), n > 4096 the
# tile-in-group path with a masked tail; G = 1 covers one huge group and one tiny one.
LAYOUTS = {
    "n2-G=B": ((2500, 2), True),
    "n4099-G=B": ((2, 4099), True),
    "n4500-G=1": ((3, 1500), False),
    "n15-G=1": ((3, 5), False),
}
# affine_dot under the Triton interpreter costs one program per group: fewer tiny groups.
DOT_LAYOUTS = {
    "n2-G=B": ((8, 2), True),
    "n4099-G=B": ((2, 4099), True),
    "n8198-G=1": ((2, 4099), False),
}


def _groups(shape, per_sample):
    return shape[0] if per_sample else 1


def _streams(count, shape, dtype, device, seed):
    """Inputs uniform in [-1, 1]: with sum_k |C[m, k]| <= 1 (see _coeffs) every partial sum
    stays in [-1, 1], so fp32 rounding is provably inside the 1e-6 tolerance."""
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1).to(device, dtype)
            for _ in range(count)]


def _coeffs(groups, m, k, dtype, device, seed=100):
    g = torch.Generator().manual_seed(seed)
    c = 2 * torch.rand(groups, m, k, generator=g, dtype=torch.float64) - 1
    c = c / c.abs().sum(dim=2, keepdim=True)
    return c.to(device=device, dtype=_ops.math_dtype(dtype))


def _case(k, m, shape, per_sample, dtype, device):
    inputs = _streams(k, shape, dtype, device, seed=10 * k + m)
    return inputs, _coeffs(_groups(shape, per_sample), m, k, dtype, device)


def _fp64_reference(inputs, coeffs):
    return reference_affine([x.double() for x in inputs], coeffs.double())


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,m", ARITIES, ids=str)
def test_affine_matches_fp64_reference(backend, k, m, dtype, layout):
    inputs, coeffs = _case(k, m, *layout, dtype, backend)
    outputs = torch.ops.fastflow.affine(inputs, coeffs)
    expected = _fp64_reference(inputs, coeffs)
    assert len(outputs) == m
    for out, ref in zip(outputs, expected):
        assert_close_to_reference(out, ref, dtype)


# Samples of 301 elements take the span-per-group path of the C++ kernel, samples of 3 (and 15
# in one group) the per-element coefficient table of small groups.
@pytest.mark.parametrize("shape,per_sample", [((7, 301), True), ((300, 3), True), ((3, 5), False)],
                         ids=["n301", "n3", "n15-G=1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,m", ARITIES, ids=str)
def test_cpu_kernel_is_bit_identical_to_eager(k, m, dtype, shape, per_sample, monkeypatch):
    # DESIGN.md section 1: the C++ kernels sum the terms in order without contraction, so they
    # equal the eager formula (the reference at the storage dtype) bit for bit.
    if not _backends._status("cpu", "cpu")[0]:
        pytest.skip(_backends._status("cpu", "cpu")[1])
    monkeypatch.setenv(_backends.ENV_VAR, "cpu")
    inputs, coeffs = _case(k, m, shape, per_sample, dtype, "cpu")
    outputs = torch.ops.fastflow.affine(inputs, coeffs)
    for out, ref in zip(outputs, reference_affine(inputs, coeffs), strict=True):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("layout", [LAYOUTS["n2-G=B"], LAYOUTS["n4099-G=B"]], ids=["n2", "n4099"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,m", [(1, 1), (3, 2), (4, 4)], ids=str)
def test_affine_out_writes_the_same_values(backend, k, m, dtype, layout):
    inputs, coeffs = _case(k, m, *layout, dtype, backend)
    out = [torch.full_like(inputs[0], float("nan")) for _ in range(m)]
    assert torch.ops.fastflow.affine_out(inputs, coeffs, out) is None
    for o, fresh in zip(out, torch.ops.fastflow.affine(inputs, coeffs)):
        assert torch.equal(o, fresh)


MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("k,m", [(2, 2), (3, 1), (5, 3)], ids=str)
def test_affine_out_mixes_stream_dtypes(backend, k, m):
    """A sampler's step: fp32 state beside 16-bit model outputs, fp32 and 16-bit results."""
    shape = (2500, 2)
    inputs = [x.to(dtype) for x, dtype in
              zip(_streams(k, shape, torch.float64, backend, seed=k), MIXED)]
    coeffs = _coeffs(shape[0], m, k, torch.float32, backend)
    out = [torch.empty(shape, dtype=dtype, device=backend) for dtype in MIXED[:m]]
    torch.ops.fastflow.affine_out(inputs, coeffs, out)
    expected = _fp64_reference(inputs, coeffs)
    for o, e in zip(out, expected):
        # fp32 math on exactly representable inputs, rounded once to the output type.
        assert_close_to_reference(o, e, o.dtype)
    with pytest.raises(ValueError, match="fastflow affine: .*dtype"):  # fresh outputs: one dtype
        torch.ops.fastflow.affine(inputs, coeffs)


@pytest.mark.parametrize("shift", [3, -3, 1000], ids=lambda s: f"shift{s}")
@pytest.mark.parametrize("last", [True, False], ids=["last output", "first output"])
def test_affine_out_writes_outputs_that_overlap_an_input_off_its_elements(backend, shift, last):
    """An output over part of an input, off its elements (a view of the same buffer a few
    elements on), would overwrite inputs not yet read: it is written through a stand-in."""
    n, spare_count = 3 * 1001, 1000
    memory = torch.randn(n + spare_count, device=backend)
    start = max(0, -shift)
    x = memory[start:start + n].view(3, 1001)
    y = memory[start + shift:start + shift + n].view(3, 1001)
    other = torch.randn(3, 1001, device=backend)
    coeffs = _coeffs(3, 2, 2, torch.float32, backend)
    expected = reference_affine([x.clone(), other], coeffs)
    out = [torch.empty_like(other), y] if last else [y, torch.empty_like(other)]
    torch.ops.fastflow.affine_out([x, other], coeffs, out)
    for o, e in zip(out, expected, strict=True):
        assert torch.equal(o, e)


@pytest.mark.parametrize("m", [1, 3])
def test_affine_out_updates_an_input_in_place(backend, m):
    """The last output may be an input (a sampler's state); other aliasing is staged."""
    inputs, coeffs = _case(3, m, (2500, 2), True, torch.float32, backend)
    expected = torch.ops.fastflow.affine(inputs, coeffs)
    state = inputs[1].clone()
    inputs[1] = state
    out = [torch.empty_like(state) for _ in range(m - 1)] + [state]
    torch.ops.fastflow.affine_out(inputs, coeffs, out)
    for o, e in zip(out, expected):
        assert torch.equal(o, e)
    if m > 1:  # the state as the first of several outputs
        inputs[1] = state = expected[1].clone()
        before = torch.ops.fastflow.affine(inputs, coeffs)
        out = [state] + [torch.empty_like(state) for _ in range(m - 1)]
        torch.ops.fastflow.affine_out(inputs, coeffs, out)
        for o, e in zip(out, before):
            assert torch.equal(o, e)


def _assert_dot_close(actual, a, b, groups):
    """Dot products cancel: scale the error by max(1, sum_i |a_i b_i|), the sum's condition."""
    expected = reference_affine_dot([x.double() for x in a], [x.double() for x in b], groups)
    magnitude = reference_affine_dot([x.double().abs() for x in a],
                                     [x.double().abs() for x in b], groups)
    math = _ops.math_dtype(a[0].dtype)
    assert actual.shape == (groups, len(a), len(b)) and actual.dtype == math
    err = ((actual.double().cpu() - expected) / magnitude.clamp(min=1)).abs().max().item()
    assert err <= TOLERANCE[math], f"scaled error {err:.3g} > {TOLERANCE[math]:.1g}"


@pytest.mark.parametrize("layout", DOT_LAYOUTS.values(), ids=DOT_LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k", DOT_ARITIES, ids=str)
def test_affine_dot_matches_reference(backend, m, k, dtype, layout):
    shape, per_sample = layout
    a = _streams(m, shape, dtype, backend, seed=1)
    b = _streams(k, shape, dtype, backend, seed=2)
    groups = _groups(shape, per_sample)
    _assert_dot_close(torch.ops.fastflow.affine_dot(a, b, groups), a, b, groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_affine_dot_sums_in_fp64(backend, dtype):
    # Products past fp32's range: the Triton kernel summed in fp32, to inf - inf = NaN where the
    # CPU kernel and the reference (fp64 sums, one rounding) give 0 and 3e38.
    a = torch.tensor([[1e20, 1e20], [3e19, 3e19]], device=backend).to(dtype)
    b = torch.tensor([[1e20, -1e20], [2e19, -1e19]], device=backend).to(dtype)
    got = torch.ops.fastflow.affine_dot([a], [b], 2)
    want = (a.double() * b.double()).sum(1).float()
    assert torch.equal(got[:, 0, 0].cpu(), want.cpu()) and torch.isfinite(want).all()


def _determinism_case(device):
    # Several kDotChunk-sized chunks per group and several parallel tasks on the CPU kernels.
    a = _streams(2, (2, 40000), torch.float32, device, seed=3)
    b = _streams(3, (2, 40000), torch.float32, device, seed=4)
    coeffs = _coeffs(2, 2, 3, torch.float32, device)
    return lambda: (*torch.ops.fastflow.affine(b, coeffs), torch.ops.fastflow.affine_dot(a, b, 2),
                    torch.ops.fastflow.affine_dot(a, b, 1))


def _assert_same_bits(first, second):
    for i, (x, y) in enumerate(zip(first, second, strict=True)):
        assert bits_equal(x, y), f"tensor {i}"


def _on_threads(count, fn):
    """fn() run with `count` intra-op threads; the setting restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_repeated_calls_give_the_same_bits(backend):
    run = _determinism_case(backend)
    _assert_same_bits(run(), run())


def test_cpu_results_do_not_depend_on_thread_count(monkeypatch):
    if not _backends._status("cpu", "cpu")[0]:
        pytest.skip(_backends._status("cpu", "cpu")[1])
    monkeypatch.setenv(_backends.ENV_VAR, "cpu")
    run = _determinism_case("cpu")
    before = torch.get_num_threads()
    results = [_on_threads(threads, run) for threads in (1, 2)]
    assert torch.get_num_threads() == before
    _assert_same_bits(*results)


def test_opcheck_affine(backend):
    inputs = [x.requires_grad_() for x in _streams(3, (3, 5), torch.float32, backend, seed=5)]
    coeffs = _coeffs(3, 2, 3, torch.float32, backend).requires_grad_()
    torch.library.opcheck(torch.ops.fastflow.affine.default, (inputs, coeffs))


def _channels_last(xs):
    return [x.to(memory_format=torch.channels_last) for x in xs]


@pytest.mark.parametrize("groups", [4, 2, 1, 12], ids=lambda g: f"G{g}")
def test_channels_last_streams_are_read_in_place(backend, groups):
    """Streams sharing a dense batch-major layout are streamed as they lie: outputs in that
    layout (as PyTorch's elementwise ops give), no contiguous copies. Groups that split a
    sample (G = 12 over 4 samples of 3 channels) take the contiguous route, their outputs still
    in the layout."""
    xs = _channels_last(_streams(3, (4, 3, 2, 5), torch.float32, backend, seed=11))
    coeffs = _coeffs(groups, 2, 3, torch.float32, backend)
    want = reference_affine([x.contiguous().double() for x in xs], coeffs.double())
    got = _ops.affine(xs, coeffs)
    for g, w in zip(got, want):
        assert_close_to_reference(g, w, torch.float32)
        assert g.is_contiguous(memory_format=torch.channels_last)
    squares = _ops.affine_sqnorm(xs, coeffs[:, :1])
    assert_close_to_reference(squares, (want[0] ** 2).reshape(groups, -1).sum(1), torch.float32)
    dots = _ops.affine_dot(xs[:2], xs, groups)
    want_dots = reference_affine_dot([x.contiguous().double() for x in xs[:2]],
                                     [x.contiguous().double() for x in xs], groups)
    assert_close_to_reference(dots, want_dots, torch.float32)
    out = _channels_last([torch.empty(4, 3, 2, 5, device=backend) for _ in range(2)])
    _ops.affine_out(xs, coeffs, out)
    for o, w in zip(out, want):
        assert_close_to_reference(o, w, torch.float32)


def test_channels_last_streams_are_flat_views_for_every_kernel():
    # The CPU kernels stream channels_last memory in place where no order of the terms matters
    # (affine, groups of whole samples), but would copy it for the sums (its rows are single
    # elements), which get the contiguous [B, n] views of its memory first.
    xs = _channels_last(_streams(3, (4, 3, 2, 5), torch.float32, "cpu", seed=11))
    ext = compiled_extension()
    for groups, period in ((4, xs[0].numel()), (2, xs[0].numel()), (12, 0)):
        assert ext.batch_period(xs, xs[:2], groups, False) == period
    assert ext.batch_period(xs, [], 4, True) == 0
    for name in ("reference", "cpu"):
        if not _backends._status(name, "cpu")[0]:
            continue
        streams = _ops._streamed(xs, 4, _backends.kernels(name))
        assert all(s.is_contiguous() and s.data_ptr() == x.data_ptr()
                   for s, x in zip(streams, xs, strict=True))


def test_mixed_layouts_take_the_contiguous_route(backend):
    xs = _streams(2, (2, 3, 4, 4), torch.float32, backend, seed=12)
    xs[1] = xs[1].to(memory_format=torch.channels_last)
    coeffs = _coeffs(2, 1, 2, torch.float32, backend)
    (got,) = _ops.affine(xs, coeffs)
    assert got.is_contiguous()
    (want,) = reference_affine([x.double() for x in xs], coeffs.double())
    assert_close_to_reference(got, want, torch.float32)


def test_opcheck_affine_channels_last(backend):
    inputs = [x.requires_grad_() for x in
              _channels_last(_streams(2, (3, 2, 2, 3), torch.float32, backend, seed=13))]
    torch.library.opcheck(torch.ops.fastflow.affine.default,
                          (inputs, _coeffs(3, 2, 2, torch.float32, backend).requires_grad_()))


def test_opcheck_affine_out(backend):
    inputs = _streams(2, (3, 5), torch.float32, backend, seed=6)
    out = [torch.empty(3, 5, device=backend) for _ in range(3)]
    torch.library.opcheck(torch.ops.fastflow.affine_out.default,
                          (inputs, _coeffs(3, 3, 2, torch.float32, backend), out))


def test_opcheck_affine_dot(backend):
    a = [x.requires_grad_() for x in _streams(2, (3, 5), torch.float32, backend, seed=7)]
    b = [x.requires_grad_() for x in _streams(3, (3, 5), torch.float32, backend, seed=8)]
    torch.library.opcheck(torch.ops.fastflow.affine_dot.default, (a, b, 3))


def test_cpp_arity_limits_equal_python_ones():
    ext = compiled_extension()
    assert (ext.max_inputs, ext.max_outputs) == (_ops.MAX_INPUTS, _ops.MAX_OUTPUTS)


def _f32(*shape):
    return torch.zeros(shape)


# Each entry: (inputs, coeffs, outputs) of one bad call to fastflow._C.affine_cpu.
BAD_CPU_CALLS = {
    "mismatched numel": ([_f32(6), _f32(5)], _f32(1, 1, 2), [_f32(6)]),
    "output numel": ([_f32(6)], _f32(1, 1, 1), [_f32(7)]),
    "coeffs rank": ([_f32(6)], _f32(1, 1), [_f32(6)]),
    "coeffs M": ([_f32(6)], _f32(1, 2, 1), [_f32(6)]),
    "coeffs K": ([_f32(6), _f32(6)], _f32(1, 1, 1), [_f32(6)]),
    "coeffs fp64 for fp32": ([_f32(6)], _f32(1, 1, 1).double(), [_f32(6)]),
    "coeffs fp16 for fp16": ([_f32(6).half()], _f32(1, 1, 1).half(), [_f32(6).half()]),
    "output with elements that share memory": ([_f32(4, 3)], _f32(1, 1, 1),
                                               [_f32(1, 3).expand(4, 3)]),
    "outputs that share memory": ([_f32(6), _f32(6)], _f32(1, 2, 2), list(_f32(7).unfold(0, 6, 1))),
    "too many inputs": ([_f32(6)] * 6, _f32(1, 1, 6), [_f32(6)]),
    "too many outputs": ([_f32(6)], _f32(1, 5, 1), [_f32(6) for _ in range(5)]),
    "no inputs": ([], _f32(1, 1, 0), [_f32(6)]),
    "no outputs": ([_f32(6)], _f32(1, 0, 1), []),
    "groups do not divide numel": ([_f32(7)], _f32(2, 1, 1), [_f32(7)]),
    "no groups": ([_f32(7)], _f32(0, 1, 1), [_f32(7)]),
    "integer input": ([torch.zeros(6, dtype=torch.int32)], _f32(1, 1, 1),
                      [torch.zeros(6, dtype=torch.int32)]),
    "fp32 coeffs beside an fp64 stream": ([_f32(6), _f32(6).double()], _f32(1, 1, 2), [_f32(6)]),
}


@pytest.mark.parametrize("args", BAD_CPU_CALLS.values(), ids=BAD_CPU_CALLS.keys())
def test_cpu_kernel_rejects_bad_calls(args):
    with pytest.raises(ValueError, match="fastflow affine"):
        compiled_extension().affine_cpu(*args)


# Each entry: (a, b, groups) of one bad call to fastflow._C.affine_dot_cpu, and the error. They
# borrowed affine's checks, which named outputs and coefficients the op does not have, and
# allocated a [groups, M, K] placeholder first (4 TB for groups = 2**40).
BAD_CPU_DOT_CALLS = {
    "mismatched numel": ([_f32(6)], [_f32(5)], 1, "a tensor of b has 5 elements, expected 6"),
    "empty side": ([], [_f32(6)], 1, "expected 1 to 4 tensors in a, got 0"),
    "negative groups": ([_f32(6)], [_f32(6)], -1, "6 elements do not split into -1 groups"),
    "no groups": ([_f32(6)], [_f32(6)], 0, "6 elements do not split into 0 groups"),
    "huge groups": ([_f32(12)], [_f32(12)], 2**40, "12 elements do not split into 1099511627776"),
    "groups do not divide numel": ([_f32(7)], [_f32(7)], 2, "7 elements do not split into 2"),
    "too many on a side": ([_f32(6)] * 5, [_f32(6)], 1, "expected 1 to 4 tensors in a, got 5"),
    "non-contiguous": ([_f32(3, 4).t()], [_f32(4, 3)], 1, "a tensor of a must be contiguous"),
    "dtypes differ": ([_f32(6)], [_f32(6).double()], 1,
                      "a tensor of b has dtype Double, expected Float"),
}


@pytest.mark.parametrize("args", BAD_CPU_DOT_CALLS.values(), ids=BAD_CPU_DOT_CALLS.keys())
def test_cpu_dot_kernel_rejects_bad_calls(args):
    *args, message = args
    with pytest.raises(ValueError, match=f"fastflow affine_dot: {message}"):
        compiled_extension().affine_dot_cpu(*args)


def test_cpu_kernel_still_works_after_bad_calls():
    ext = compiled_extension()
    x, out = torch.arange(6.0), torch.empty(6)
    ext.affine_cpu([x], torch.full((2, 1, 1), 2.0), [out])
    assert torch.equal(out, 2 * x)


# The C++ kernel's own checks: the ops copy such outputs and let torch's copy_ refuse them.
OP_LEVEL_BAD_CALLS = {k: v for k, v in BAD_CPU_CALLS.items() if "share memory" not in k}
# Faults in the `out` list itself: affine allocates its outputs, so these concern affine_out only.
OUT_ONLY_FAULTS = {"output numel", "coeffs M"}


@pytest.mark.parametrize("case", OP_LEVEL_BAD_CALLS)
def test_ops_reject_bad_calls_on_every_backend(backend, case):
    inputs, coeffs, outputs = ([x.to(backend) for x in part] if isinstance(part, list) else
                               part.to(backend) for part in OP_LEVEL_BAD_CALLS[case])
    with pytest.raises(ValueError, match="fastflow affine"):
        torch.ops.fastflow.affine_out(inputs, coeffs, outputs)
    if case not in OUT_ONLY_FAULTS:
        with pytest.raises(ValueError, match="fastflow affine"):
            torch.ops.fastflow.affine(inputs, coeffs)


def test_ops_refuse_outputs_that_share_memory(backend):
    """Outputs are written one after another: one that shared memory with another would
    overwrite it. As interpolate's out=, the op refuses outputs whose byte spans intersect
    (views that interleave too) and writes nothing."""
    x, coeffs = [torch.randn(2, 3, device=backend) for _ in range(2)], _f32(1, 2, 2).to(backend)
    buf, wide = torch.zeros(4, 3, device=backend), torch.zeros(2, 6, device=backend)
    for out in ([buf[0:2], buf[1:3]], [buf[:2], buf[:2]], [wide[:, 0::2], wide[:, 1::2]]):
        with pytest.raises(ValueError, match="fastflow affine: outputs 0 and 1 share memory"):
            torch.ops.fastflow.affine_out(x, coeffs, out)
    assert not buf.any() and not wide.any()
    # Output 0 overlaps the input, so it is written through a stand-in: still refused (a hunt).
    line = torch.arange(8.0, device=backend)
    with pytest.raises(ValueError, match="fastflow affine: outputs 0 and 1 share memory"):
        torch.ops.fastflow.affine_out([line[0:3]], coeffs[:, :, :1], [line[2:5], line[4:7]])
    assert torch.equal(line, torch.arange(8.0, device=backend))
    torch.ops.fastflow.affine_out(x, coeffs, [buf[:2], buf[2:]])
    for got, want in zip((buf[:2], buf[2:]), reference_affine(x, coeffs), strict=True):
        assert torch.equal(got, want)


def test_affine_out_refuses_inference_outputs_outside_inference_mode(backend):
    # PyTorch's rule for in-place writes, checked before anything is written (the reference
    # backend wrote the values of an output staged through a stand-in, then raised: a hunt).
    x = torch.randn(4, 3, device=backend)
    with torch.inference_mode():
        memory = torch.zeros(13, device=backend)
    coeffs = torch.ones(4, 1, 1, device=backend)
    written, shifted = memory[1:].view(4, 3), memory[:12].view(4, 3)
    for inputs in ([x], [shifted]):   # written directly, and through a stand-in
        with pytest.raises(RuntimeError, match="an output is an inference tensor"):
            torch.ops.fastflow.affine_out(inputs, coeffs, [written])
    assert not memory.any()
    with torch.inference_mode():
        torch.ops.fastflow.affine_out([x], coeffs, [written])
    assert torch.equal(written, x)


def test_affine_out_reads_coefficients_that_are_a_view_of_an_output(backend):
    # The kernels read coefficients as they write: a view of an output would have its later
    # coefficients overwritten (found by a hunt). They work from a copy then.
    groups, n = 1000, 2
    x = torch.ones(groups * n, device=backend)
    out = torch.zeros(groups * n, device=backend)
    out[:groups] = torch.arange(1.0, groups + 1)
    coeffs = out[:groups].view(groups, 1, 1)
    want = (coeffs.view(groups, 1) * x.view(groups, n)).view(-1)
    torch.ops.fastflow.affine_out([x], coeffs, [out])
    assert torch.equal(out, want)


def test_device_cache_lets_cuda_work_finish_before_dropping_entries(monkeypatch):
    """An entry built on one stream may be read on another (a Sampler warms up on a side
    stream): before it drops its entries, the cache waits for each device that holds one, so
    the allocator cannot hand their memory out while kernels still read it."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    class CudaEntry:   # a stand-in for a CUDA tensor, on any machine
        is_cuda, device = True, torch.device("cuda", 1)

    cache, cpu, cuda = _ops.DeviceCache(maxsize=2), torch.device("cpu"), torch.device("cuda", 1)
    cache.get("a", cpu, lambda: torch.zeros(1), direct=True)
    cache.get("b", cuda, CudaEntry, direct=True)
    cache.get("b", cuda, CudaEntry, direct=True)
    assert not synced and len(cache) == 2
    cache.get("c", cpu, lambda: torch.zeros(1), direct=True)   # full: the first two go
    assert synced == [cuda] and len(cache) == 1
    cache.clear()
    assert synced == [cuda] and not len(cache)   # no CUDA entry left to wait for


# Eager calls skip the dispatcher when nothing but autograd must see them
# (fastflow._ops._nobody_intercepts); whoever must see the op still sees it.

def _interpolate_case(device="cpu"):
    g = torch.Generator().manual_seed(7)
    x0, x1 = (torch.randn(4, 3, generator=g).to(device) for _ in range(2))
    return x0, x1, torch.rand(4, generator=g).to(device)


def test_direct_eager_call_gives_the_dispatcher_call_bits(backend):
    x0, x1, t = _interpolate_case(backend)
    coeffs = fastflow.paths.CondOT().coefficients(t.double()).float()
    assert _ops._nobody_intercepts((x0, x1, coeffs))
    direct = _ops.affine([x0, x1], coeffs)
    dispatched = torch.ops.fastflow.affine([x0, x1], coeffs)
    for a, b in zip(direct, dispatched):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["affine", "affine_sqnorm"])
def test_direct_eager_autograd_gives_the_dispatcher_gradients(backend, op):
    # With a gradient to record, _call runs the kernel under the op's autograd.Function directly,
    # without the dispatcher: same values and gradients, bit for bit, as through torch.ops.
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 7, generator=g, dtype=torch.float64).to(backend) for _ in range(3)]
    coeffs = torch.randn(5, 2 if op == "affine" else 1, 3, generator=g,
                         dtype=torch.float64).to(backend)
    results = []
    for call in (getattr(_ops, op), getattr(torch.ops.fastflow, op)):
        leaves = [x.clone().requires_grad_(k != 1) for k, x in enumerate(xs)]
        c = coeffs.clone().requires_grad_()
        out = call(leaves, c)
        loss = (out[1] * out[0]).sum() if op == "affine" else (out * out).sum()
        loss.backward()
        results.append((out, [x.grad for x in leaves], c.grad))
    (out_a, grads_a, c_a), (out_b, grads_b, c_b) = results
    outs_a, outs_b = (o if op == "affine" else [o] for o in (out_a, out_b))
    assert all(torch.equal(a, b) for a, b in zip(outs_a, outs_b))
    assert grads_a[1] is None and grads_b[1] is None
    assert all(torch.equal(a, b) for a, b in zip(grads_a[::2], grads_b[::2]))
    assert torch.equal(c_a, c_b)
    x = xs[0].clone().requires_grad_()
    assert type(_ops.affine([x], coeffs[:, :1, :1])[0].grad_fn).__name__ == \
        "fastflow_affine_directBackward"


def test_direct_eager_autograd_of_the_sinusoid(backend):
    g = torch.Generator().manual_seed(5)
    t0, f0 = (torch.rand(n, generator=g, dtype=torch.float64).to(backend) for n in (6, 4))
    grad = torch.randn(6, 9, generator=g, dtype=torch.float64).to(backend)
    results = []
    for call in (_ops.sinusoid, torch.ops.fastflow.sinusoid):
        t, freqs = t0.clone().requires_grad_(), f0.clone().requires_grad_()
        out = call(t, freqs, 2.0, True, 9, torch.float64)
        out.backward(grad)
        results.append((out, t.grad, freqs.grad, type(out.grad_fn).__name__))
    (a, ta, fa, kind), (b, tb, fb, other) = results
    assert (kind, other) == ("fastflow_sinusoid_directBackward", "fastflow_sinusoidBackward")
    assert torch.equal(a, b) and torch.equal(ta, tb) and torch.equal(fa, fb)


def test_calls_that_need_the_dispatcher_take_it():
    x0, x1, t = _interpolate_case()
    assert _ops._nobody_intercepts((x0, x1.requires_grad_(), t))
    assert not _ops._nobody_intercepts((x0, torch.nn.Parameter(x1, requires_grad=False), t))
    assert not _ops._nobody_intercepts((x0.to("meta"), x1.to("meta"), t.to("meta")))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not _ops._nobody_intercepts((x0, x1, t))


@pytest.mark.parametrize("call", ["interpolate", "interpolate out=", "interpolate VP", "convert",
                                  "FlowMatcher x_t", "loss", "loss recorded", "loss VP",
                                  "torchcfm drop-in"])
def test_one_backend_decision_per_public_call(call, monkeypatch):
    from fastflow.compat.torchcfm import ConditionalFlowMatcher

    # A public op decides once whether its ops skip the dispatcher, and on which backend
    # (_ops.direct_backend): on a small tensor each decision costs about as much as a kernel.
    x0, x1, t = _interpolate_case()
    calls = {
        "interpolate": lambda: fastflow.interpolate(x0, x1, t),
        "interpolate out=": lambda: fastflow.interpolate(x0, x1, t, out=(x0.clone(), x1.clone())),
        "interpolate VP": lambda: fastflow.interpolate(x0, x1, t, path="vp"),
        "convert": lambda: fastflow.convert(x0, x1, t, path="cosine"),
        # The model's input, without the loss (a public op of its own).
        "FlowMatcher x_t": lambda: fastflow.FlowMatcher(time_sampler="logit_normal").loss(
            _stop_at_the_model, x1),
        "loss": lambda: fastflow.flow_matching_loss(x0, x0, x1, t),
        # The forward of a loss that records its gradient (its backward is a call of its own).
        "loss recorded": lambda: fastflow.flow_matching_loss(x0.requires_grad_(), x0, x1, t),
        "loss VP": lambda: fastflow.flow_matching_loss(x0, x0, x1, t, "vp"),
        # One fused pass (x_t and u_t), its coefficients assembled by the extension.
        "torchcfm drop-in": lambda: ConditionalFlowMatcher(0.1).sample_location_and_conditional_flow(
            x0, x1, t),
    }
    try:  # once, to fill the caches of constant coefficients
        calls[call]()
    except _ModelCalled:
        pass
    counts = {"select": 0, "_nobody_intercepts": 0}

    def counted(module, name):
        function = getattr(module, name)

        def count(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        monkeypatch.setattr(module, name, count)

    counted(_backends, "select")
    counted(_ops, "_nobody_intercepts")
    try:
        calls[call]()
    except _ModelCalled:
        pass
    assert counts == {"select": 1, "_nobody_intercepts": 1}


class _ModelCalled(Exception):
    pass


def _stop_at_the_model(x_t, t):
    raise _ModelCalled


def test_dispatch_modes_see_the_op():
    from conftest import RecordOps

    x0, x1, t = _interpolate_case()
    with RecordOps() as recorder:
        fastflow.interpolate(x0, x1, t)
    assert torch.ops.fastflow.affine.default in recorder.ops


def test_fake_and_meta_tensors_take_the_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x0, x1, t = _interpolate_case()
    with FakeTensorMode() as mode:
        fx0, fx1, ft = (mode.from_tensor(x) for x in (x0, x1, t))
        x_t, u_t = fastflow.interpolate(fx0, fx1, ft)
    assert x_t.shape == u_t.shape == x1.shape
    x_t, _ = fastflow.interpolate(x0.to("meta"), x1.to("meta"), t.to("meta"))
    assert x_t.device.type == "meta" and x_t.shape == x1.shape


@pytest.mark.parametrize("dtype,value", [(torch.float16, 1 + 2 ** -11 + 2 ** -40),
                                         (torch.bfloat16, 1 + 2 ** -8 + 2 ** -40)], ids=str)
def test_fp64_math_rounds_into_16_bits_through_fp32(backend, dtype, value):
    # As PyTorch's casts and the CPU kernel round. Triton rounded fp64 straight to 16 bits: these
    # values lie just above a 16-bit tie that fp32 rounds onto, so that was an ulp up (about 1
    # value in 16,000 of a sampler with an fp64 state and an fp16 model).
    x = torch.full((4, 16), value, dtype=torch.float64, device=backend)
    out = torch.empty(4, 16, dtype=dtype, device=backend)
    torch.ops.fastflow.affine_out([x], torch.ones(4, 1, 1, dtype=torch.float64, device=backend),
                                  [out])
    assert bits_equal(out, x.to(dtype)) and out[0, 0].item() == 1.0


def _negative_bit(x):
    """x's values in a tensor with the negative bit: memory holding -x (as x.conj().imag of a
    complex x holds -x.imag)."""
    y = torch._neg_view(-x)
    assert y.is_neg() and torch.equal(y, x)
    return y


def test_tensors_with_the_negative_bit_are_read_as_their_values():
    # The direct path read their memory, the other sign: interpolate's x_t was off by 4.6.
    g = torch.Generator().manual_seed(3)
    x0, x1, pred = (torch.randn(4, 6, generator=g) for _ in range(3))
    t, weight = torch.rand(4, generator=g), torch.rand(4, generator=g)
    w = torch.randn(3, generator=g)
    n = _negative_bit
    calls = [
        (lambda a, b, t: fastflow.interpolate(a, b, t), (x0, x1, t)),
        (lambda p, a, b, t, w: fastflow.flow_matching_loss(p, a, b, t, weight=w, reduction="none"),
         (pred, x0, x1, t, weight)),
        (lambda p, a, t: fastflow.convert(p, a, t, src="epsilon", dst="velocity"), (pred, x0, t)),
        (lambda t: fastflow.timestep_embedding(t, 8), (t,)),
        (lambda t, w: fastflow.fourier_embedding(t, w), (t, w)),
    ]
    for fn, args in calls:
        want = fn(*args)
        for k in range(len(args)):
            got = fn(*[n(x) if i == k else x for i, x in enumerate(args)])
            for a, b in zip(got if isinstance(got, tuple) else (got,),
                            want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # The training step's gradient, with the weight's negative bit.
    grads = []
    for weight_in in (weight, n(weight)):
        p = pred.clone().requires_grad_()
        fastflow.flow_matching_loss(p, x0, x1, t, weight=weight_in).backward()
        grads.append(p.grad)
    torch.testing.assert_close(*grads, rtol=1e-6, atol=1e-7)   # two autograd nodes: an ulp
    with pytest.raises(ValueError, match="out\\[0\\]: a tensor with the negative bit"):
        fastflow.interpolate(x0, x1, t, out=(n(torch.zeros(4, 6)), torch.zeros(4, 6)))


def test_the_profiler_records_the_op():
    x0, x1, t = _interpolate_case()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fastflow.interpolate(x0, x1, t)
    assert any(e.name == "fastflow::affine" for e in prof.events())


@pytest.mark.parametrize("shape", [(40, 5), (4, 301)], ids=["small groups", "large groups"])
@pytest.mark.parametrize("layout", ["entry-major", "transposed", "every other group"])
def test_coefficients_may_have_any_strides(backend, layout, shape):
    # The public ops build coefficients entry-major (_ops.coefficient_matrix); the CPU kernels
    # read them through their strides, the others get them packed.
    inputs, _ = _case(3, 2, shape, True, torch.float32, backend)
    groups = shape[0]
    if layout == "entry-major":
        coeffs = _ops.coefficient_matrix(list(torch.randn(6, groups, device=backend).unbind(0)),
                                         2, 3)
    elif layout == "transposed":
        coeffs = torch.randn(groups, 3, 2, device=backend).transpose(1, 2)
    else:
        coeffs = torch.randn(2 * groups, 2, 3, device=backend)[::2]
    assert not coeffs.is_contiguous()
    for strided, packed in zip(_ops.affine(inputs, coeffs), _ops.affine(inputs, coeffs.contiguous())):
        assert torch.equal(strided, packed)
    (strided,) = [_ops.affine_sqnorm(inputs, coeffs[:, :1])]
    assert torch.equal(strided, _ops.affine_sqnorm(inputs, coeffs[:, :1].contiguous()))


class _CountingExtension:
    """fastflow._C's coefficient_matrix, counting its calls."""

    def __init__(self, ext):
        self.ext, self.calls = ext, 0

    def coefficient_matrix(self, *args):
        self.calls += 1
        return self.ext.coefficient_matrix(*args)


def _use_builder(native, monkeypatch):
    """Make coefficient_matrix build with the extension (returns its call counter) or without."""
    if not native and os.environ.get(_backends.ENV_VAR) == "cpu":
        pytest.skip("the cpu backend is the extension")
    ext = _CountingExtension(compiled_extension()) if native else None
    monkeypatch.setattr(_backends, "extension", lambda: (ext, "disabled by the test"))
    return ext


def _mixed_entries(device, requires_grad=False):
    """The entries of a [5, 2, 3] matrix as callers pass them: numbers, per-sample tensors of
    any shape and float type, one value for all, a tensor on the host for device data."""
    g = torch.Generator().manual_seed(7)
    t = torch.rand(5, generator=g, dtype=torch.float64).to(device).requires_grad_(requires_grad)
    return [1 - t, t.reshape(5, 1, 1), 0.1, -1, torch.tensor([2.5], dtype=torch.float16),
            t.float().cpu() if device.type != "cpu" else t.float()], t


@pytest.mark.parametrize("native", [True, False], ids=["extension", "python"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_coefficient_matrix_from_numbers_and_tensors(backend, dtype, native, monkeypatch):
    ext = _use_builder(native, monkeypatch)
    entries, t = _mixed_entries(backend)
    coeffs = _ops.coefficient_matrix(entries, 2, 3, 5, dtype, backend)
    # Each entry converted to dtype on its own, as PyTorch rounds a scalar operand.
    columns = [(1 - t).to(dtype), t.to(dtype), torch.full((5,), 0.1, dtype=dtype, device=backend),
               torch.full((5,), -1.0, dtype=dtype, device=backend),
               torch.full((5,), 2.5, dtype=dtype, device=backend), t.float().to(dtype)]
    assert bits_equal(coeffs.contiguous(), torch.stack(columns, 1).view(5, 2, 3))
    assert ext is None or ext.calls == _extension_calls_expected(backend)


@pytest.mark.parametrize("native", [True, False], ids=["extension", "python"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_coefficient_matrix_from_tensors_of_every_float_type(backend, dtype, native, monkeypatch):
    # Only tensors of one value per group: the extension stacks them and converts once (on a
    # GPU), or reads them by hand (on CPU; a strided one is copied by ATen there).
    ext = _use_builder(native, monkeypatch)
    values = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    entries = [values[0], values[1].float().reshape(5, 1), values[2].half(), values[3].bfloat16(),
               values[4:].t().contiguous()[:, 0], values[5].float()]
    entries = [e.to(backend) for e in entries]
    assert not entries[4].is_contiguous()
    coeffs = _ops.coefficient_matrix(entries, 2, 3, 5, dtype, backend)
    expected = torch.stack([e.reshape(-1).to(dtype) for e in entries], 1).view(5, 2, 3)
    assert bits_equal(coeffs.contiguous(), expected)
    assert ext is None or ext.calls == _extension_calls_expected(backend)


def _extension_calls_expected(device):
    # The reference backend is plain PyTorch, its assembly too.
    return 0 if _backends.select(device) == "reference" else 1


def test_coefficient_matrix_gradients_reach_the_tensor_entries(monkeypatch):
    grads = []
    for native in (True, False):
        ext = _use_builder(native, monkeypatch)
        entries, t = _mixed_entries(torch.device("cpu"), requires_grad=True)
        coeffs = _ops.coefficient_matrix(entries, 2, 3, 5, torch.float64, t.device)
        (coeffs * torch.arange(30, dtype=torch.float64).view(5, 2, 3)).sum().backward()
        grads.append(t.grad)
        assert ext is None or ext.calls == 1
    # d/dt of -(1 - t) * w0 + t * w1 + t * w5 (the float32 copy passes its gradient through).
    w = torch.arange(30, dtype=torch.float64).view(5, 6)
    assert torch.equal(grads[0], -w[:, 0] + w[:, 1] + w[:, 5])
    assert torch.equal(grads[1], grads[0])


@pytest.mark.parametrize("native", [True, False], ids=["extension", "python"])
def test_coefficient_matrix_rejects_wrong_entries(native, monkeypatch):
    _use_builder(native, monkeypatch)
    with pytest.raises(ValueError, match="expected 5 values or one, got 4"):
        _ops.coefficient_matrix([torch.ones(4), 1.0], 1, 2, 5, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="expected 1 x 2 entries, got 3"):
        _ops.coefficient_matrix([1.0, 2.0, 3.0], 1, 2, 5, torch.float32, torch.device("cpu"))


def test_coefficient_matrix_compiles_without_graph_breaks():
    def build(t):
        return _ops.coefficient_matrix([1 - t, t, 0.5, -1], 2, 2, 6, torch.float32, t.device)

    t = torch.rand(6, dtype=torch.float64)
    assert bits_equal(torch.compile(build, fullgraph=True)(t), build(t))


def test_backward_of_the_streams_is_differentiable_again(backend):
    # The backward runs affine again (through the dispatcher when create_graph records it).
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(3, 4, generator=g, dtype=torch.float64).to(backend).requires_grad_()
            for _ in range(2))
    coeffs = torch.randn(3, 2, 2, generator=g, dtype=torch.float64).to(backend)
    assert torch.autograd.gradgradcheck(lambda a, b: _ops.affine([a, b], coeffs), (x, y))


def test_five_inputs_that_all_need_a_gradient(backend):
    # Their gradients were one affine call of five outputs (at most MAX_OUTPUTS = 4): a
    # ValueError from affine's and affine_sqnorm's backward, either route.
    shape = (2, 3)
    xs = [x.requires_grad_() for x in
          _streams(_ops.MAX_INPUTS, shape, torch.float64, backend, seed=13)]
    coeffs = torch.randn(2, 2, _ops.MAX_INPUTS, dtype=torch.float64).to(backend)
    for fn in (lambda *x: _ops.affine(x, coeffs), lambda *x: torch.ops.fastflow.affine(x, coeffs),
               lambda *x: _ops.affine_sqnorm(x, coeffs[:, :1]),
               lambda *x: torch.ops.fastflow.affine_sqnorm(x, coeffs[:, :1])):
        assert torch.autograd.gradcheck(fn, tuple(xs), fast_mode=True)


def test_affine_dot_is_differentiable_twice(backend):
    # Its backward is affine again. b has MAX_INPUTS streams, more than one affine call may
    # write, and one that needs no gradient; fast_mode: the Triton interpreter is slow.
    shape = (2, 3)
    a = [x.requires_grad_() for x in _streams(2, shape, torch.float64, backend, seed=11)]
    b = [x.requires_grad_(k != 1) for k, x in
         enumerate(_streams(_ops.MAX_INPUTS, shape, torch.float64, backend, seed=12))]
    assert type(_ops.affine_dot(a, b, shape[0]).grad_fn).__name__ == \
        "fastflow_affine_dot_directBackward"

    def fn(*xs):
        return _ops.affine_dot(xs[:2], xs[2:], shape[0])
    assert torch.autograd.gradcheck(fn, (*a, *b), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (*a, *b), fast_mode=True)
    # The dispatcher's route runs the same backward (opcheck checks its registration too).
    assert torch.autograd.gradcheck(
        lambda *xs: torch.ops.fastflow.affine_dot(xs[:2], xs[2:], shape[0]), (*a, *b),
        fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_affine_dot_gradients_keep_each_stream_type(backend, dtype):
    # The output, and so its gradient, is in the math type: affine's coefficients type.
    a = [x.requires_grad_() for x in _streams(2, (3, 5), dtype, backend, seed=13)]
    b = [x.requires_grad_() for x in _streams(3, (3, 5), dtype, backend, seed=14)]
    grad = _coeffs(3, 2, 3, dtype, backend)
    torch.ops.fastflow.affine_dot(a, b, 3).backward(grad)
    g = grad.double()
    for m, x in enumerate(a):  # grad_a[m] = sum_k grad[:, m, k] b[k], per group
        assert_close_to_reference(x.grad, sum(g[:, m, k, None] * y.double() for k, y in
                                              enumerate(b)), dtype)
    for k, y in enumerate(b):  # grad_b[k] = sum_m grad[:, m, k] a[m]
        assert_close_to_reference(y.grad, sum(g[:, m, k, None] * x.double() for m, x in
                                              enumerate(a)), dtype)


@pytest.mark.parametrize("path", ["cond_ot", "schrodinger_bridge"])
def test_interpolate_is_differentiable_twice_in_t(backend, path):
    # dx_t/dt reads the streams through the coefficients' backward (affine_dot), whose own
    # backward was missing: d/dx0 sum(dx_t/dt), -1 for CondOT, came back None.
    g = torch.Generator().manual_seed(15)
    x0, x1, noise = (torch.randn(2, 3, generator=g, dtype=torch.float64).to(backend)
                     .requires_grad_() for _ in range(3))
    t = (0.25 + 0.5 * torch.rand(2, generator=g, dtype=torch.float64)).to(backend).requires_grad_()
    streams = (x0, x1, noise) if fastflow.paths.get_path(path).uses_noise else (x0, x1)

    def fn(t, x0, x1, *noise):
        return fastflow.interpolate(x0, x1, t, path=path, noise=noise[0] if noise else None)
    assert torch.autograd.gradgradcheck(fn, (t, *streams), fast_mode=True)
    if path == "cond_ot":
        x_t, _ = fn(t, x0, x1)
        (grad_t,) = torch.autograd.grad(x_t.sum(), t, create_graph=True)
        (grad_x0,) = torch.autograd.grad(grad_t.sum(), x0)
        assert torch.equal(grad_x0, torch.full_like(x0, -1))


# The CPU kernels are compiled for the baseline and again for AVX2, AVX-512 and AVX-512 with
# AVX512_BF16 (csrc/affine_cpu_avx2.cpp, affine_cpu_avx512.cpp, affine_cpu_avx512_bf16.cpp),
# picked at run time; all must give the same bits, on every path of the kernels.
CPU_ISAS = ("baseline", "avx2", "avx512", "avx512_bf16")


def _cpu_isas(fn=lambda: None):
    """{isa: fn()} for the instruction sets this CPU and build have, in CPU_ISAS's order (best
    last); the default restored."""
    ext = compiled_extension()
    default, results = ext.cpu_isa(), {}
    try:
        for isa in CPU_ISAS:
            try:
                ext.set_cpu_isa(isa)
            except ValueError:  # not on this CPU
                continue
            results[isa] = fn()
    finally:
        ext.set_cpu_isa(default)
    return results


def _run_on_every_cpu_isa(fn):
    """_cpu_isas(fn), where there are instruction sets to compare."""
    results = _cpu_isas(fn)
    if len(results) < 2:
        pytest.skip("only the baseline kernels run on this CPU")
    return results


def _assert_isas_agree(results):
    """Every instruction set's list of tensors has the baseline's bits."""
    for tensors in results.values():
        _assert_same_bits(tensors, results["baseline"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_small_groups_with_adjacent_coefficients_give_the_same_bits(dtype, n):
    """Groups of 1, 2 or 4 elements, whose coefficients lie entry-major (one entry's values of
    consecutive groups adjacent, as the path builders lay them out), go a vector of several
    groups at a time (affine_lanes): the bits of the same coefficients laid out group-major
    (the other paths), on every instruction set and three threads. Streams: contiguous, with a
    tail short of a vector, several tasks; and rows of 66 elements 100 apart, whose groups of 4
    straddle rows (spans that start and end mid-group); the last output on top of an input."""
    ext = compiled_extension()
    groups = 40013 // n * 2 + 1 if n < 8 else 5001   # odd: a tail short of every vector width
    contiguous = _streams(3, (groups * n,), dtype, "cpu", seed=n)
    cases = [(contiguous, groups)]
    if 12 * 66 % n == 0:
        cases.append(([x.view(12, 100)[:, :66] for x in _streams(3, (1200,), dtype, "cpu", n)],
                      12 * 66 // n))

    def run():
        out = []
        for inputs, g in cases:
            group_major = _coeffs(g, 2, 3, dtype, "cpu", seed=n)
            entry_major = group_major.permute(1, 2, 0).contiguous().permute(2, 0, 1)
            for coeffs in (entry_major, group_major):
                state = inputs[0].clone()
                fresh = [torch.empty_like(state)]
                torch.ops.fastflow.affine_out([state, *inputs[1:]], coeffs, [*fresh, state])
                out += [*fresh, state]
        return out

    results = _on_threads(3, lambda: _cpu_isas(run))
    for tensors in results.values():
        _assert_same_bits(tensors, results["baseline"])
        for lanes, grouped in zip(tensors[0::4], tensors[2::4]):   # entry- and group-major
            assert bits_equal(lanes, grouped)
        for lanes, grouped in zip(tensors[1::4], tensors[3::4]):
            assert bits_equal(lanes, grouped)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_squared_norms_of_small_groups_are_summed_in_order(dtype, n):
    """Contiguous streams in groups of at most 8 elements (a time per token) take one loop over
    the groups (sqnorm_small_groups): each residual in the math type, k = 0..K-1, squared in
    fp64, and the squares summed in order from 0, as lane_sum's shortcut sums them. Those bits,
    rebuilt here op by op, for 1, 3 and 5 streams, coefficients entry- and group-major, on every
    instruction set and three threads."""
    ext = compiled_extension()
    groups, math = 20001, _ops.math_dtype(dtype)

    def expected(inputs, coeffs):
        r = coeffs[:, 0, :1] * inputs[0].view(groups, n).to(math)
        for k in range(1, len(inputs)):
            r = r + coeffs[:, 0, k:k + 1] * inputs[k].view(groups, n).to(math)
        squares, s = r.double() * r.double(), torch.zeros(groups, dtype=torch.float64)
        for j in range(n):
            s = s + squares[:, j]
        return s.to(math)

    cases = []
    for k in (1, 3, 5):
        inputs = _streams(k, (groups * n,), dtype, "cpu", seed=n + k)
        group_major = _coeffs(groups, 1, k, dtype, "cpu", seed=k)
        entry_major = group_major.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        cases += [(inputs, group_major), (inputs, entry_major)]
    results = _on_threads(3, lambda: _cpu_isas(
        lambda: [ext.affine_sqnorm_cpu(inputs, coeffs) for inputs, coeffs in cases]))
    for tensors in results.values():
        for got, (inputs, coeffs) in zip(tensors, cases, strict=True):
            assert bits_equal(got, expected(inputs, coeffs))


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_instruction_sets_give_the_same_bits(dtype, layout):
    ext = compiled_extension()
    shape, per_sample = layout
    state = _streams(1, shape, torch.float32 if dtype != torch.float64 else dtype, "cpu", 1)[0]

    def run():
        out = []
        for k, m in ((1, 1), (3, 2), (5, 4)):
            inputs, coeffs = _case(k, m, shape, per_sample, dtype, "cpu")
            out += torch.ops.fastflow.affine(inputs, coeffs)
            out.append(torch.ops.fastflow.affine_sqnorm(inputs, coeffs[:, :1]))
            out.append(torch.ops.fastflow.affine_dot(inputs[:m], inputs, _groups(shape, per_sample)))
            # A sampler's update: an fp32 state beside streams of the model's type, in place.
            mixed, streams = state.clone(), inputs[:_ops.MAX_INPUTS - 1]
            weights = _coeffs(coeffs.shape[0], 1, len(streams) + 1, mixed.dtype, "cpu")
            torch.ops.fastflow.affine_out([mixed, *streams], weights, [mixed])
            out.append(mixed)
        return out

    results = _run_on_every_cpu_isa(run)
    _assert_isas_agree(results)


def test_streaming_stores_give_the_same_bits():
    # Calls that write at least streaming_store_min_bytes into existing fp32 and fp64 tensors
    # use streaming stores in the AVX2 build (fresh outputs never do); the baseline build stores
    # plainly. Outputs that start off a vector boundary, and an in-place update, take the edges
    # of that path.
    ext = compiled_extension()
    numel = ext.streaming_store_min_bytes // 4 // 2 + 3   # two fp32 outputs cross the threshold
    gen = torch.Generator().manual_seed(11)
    x0, x1 = (torch.randn(numel + 1, generator=gen) for _ in range(2))
    coeffs = torch.randn(1, 2, 2, generator=gen)
    state = torch.randn(numel * 2, generator=gen, dtype=torch.float64)

    def run():
        fresh = torch.ops.fastflow.affine([x0[1:], x1[1:]], coeffs)
        shifted = [torch.empty(numel + 1)[1:] for _ in range(2)]   # 4 bytes off alignment
        torch.ops.fastflow.affine_out([x0[:-1], x1[:-1]], coeffs, shifted)
        updated = state.clone()
        torch.ops.fastflow.affine_out([updated], torch.full((1, 1, 1), 0.5, dtype=torch.float64),
                                      [updated])
        return [*fresh, *shifted, updated]

    results = _run_on_every_cpu_isa(run)
    _assert_isas_agree(results)
    assert torch.equal(results["baseline"][-1], state * 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k, m", [(1, 1), (2, 2), (5, 4)])
def test_16_bit_streams_round_the_fp32_result_once(k, m, dtype):
    # Streams all in bf16 (or in fp16, with AVX2) take a path of their own on CPU (no L1 tile):
    # the bits must be those of the fp32 result rounded once, as mixed-type calls compute it.
    # Groups of 1003 elements: eight at a time, then a tail of three.
    inputs, coeffs = _case(k, m, (6, 1003), True, dtype, "cpu")
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 6e4, -6e4, 3e-6, -0.0])
    for x in inputs:  # NaNs, overflow to inf, subnormals: narrowing's edges, in vectors and tails
        x[0, :7], x[1, -7:] = special.to(dtype), special.flip(0).to(dtype)
    wide = [torch.empty(x.shape) for x in inputs[:m]]
    torch.ops.fastflow.affine_out(inputs, coeffs, wide)
    for got, expected in zip(torch.ops.fastflow.affine(inputs, coeffs), wide):
        # NaNs as NaNs: PyTorch itself narrows an fp32 NaN to bf16 as 0x7FC0 (c10's scalar
        # code, which fastflow follows) or 0xFFFF (ATen's vectorised copy).
        nan = expected.isnan()
        assert torch.equal(got.isnan(), nan)
        assert bits_equal(got[~nan], expected[~nan].to(dtype))


def test_cpu_instruction_sets_convert_16_bit_floats_alike():
    # The AVX2 build widens and narrows eight values at a time (fp16 with F16C, bf16 with integer
    # vectors), AVX-512 sixteen, AVX512_BF16 narrows to bf16 with vcvtneps2bf16 (which flushes
    # subnormals and keeps NaN payloads: vectors with either take the integer arithmetic), the
    # baseline one at a time with c10's formulas: every fp16 and bf16 bit pattern widened, and
    # fp32 values narrowed around every rounding tie, overflow, subnormal and NaN payload, must
    # give the same bits.
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    ties = []
    for dtype in (torch.float16, torch.bfloat16):
        finite = halves.view(dtype).float()
        finite = finite[torch.isfinite(finite)].unique()
        ties.append((finite[:-1] + finite[1:]) / 2)  # exact in fp32
    ties = torch.cat(ties)
    narrowing = torch.cat([
        ties, torch.nextafter(ties, torch.tensor(float("inf"))),
        torch.nextafter(ties, torch.tensor(-float("inf"))),
        torch.randint(-(1 << 31), 1 << 31, (1 << 18,), dtype=torch.int32,
                      generator=torch.Generator().manual_seed(5)).view(torch.float32)])

    def convert(x, dtype):
        out = torch.empty(x.shape, dtype=dtype)
        torch.ops.fastflow.affine_out([x], torch.ones(1, 1, 1), [out])
        return out

    def in_groups(dtype):
        # Streams all of one 16-bit type go group by group, a group of 24 as sixteen values and
        # eight: every bit pattern through both widths of conversion, NaN payloads included.
        x = halves[:halves.numel() // 24 * 24].view(dtype).view(-1, 24)
        return torch.ops.fastflow.affine([x], torch.ones(x.shape[0], 1, 1))[0]

    def run():
        return [convert(halves.view(torch.float16), torch.float32),
                convert(halves.view(torch.bfloat16), torch.float32),
                convert(narrowing, torch.float16), convert(narrowing, torch.bfloat16),
                in_groups(torch.float16), in_groups(torch.bfloat16)]

    results = _run_on_every_cpu_isa(run)
    _assert_isas_agree(results)


@pytest.mark.parametrize("capability", [None, "avx2", "default"])
def test_cpu_kernels_run_avx512_only_where_pytorch_does(capability):
    # The AVX-512 kernels (with AVX512_BF16 where the CPU has it) are the default only where
    # PyTorch's own kernels run AVX-512: a CPU it does not trust with it, or
    # ATEN_CPU_CAPABILITY set lower, keeps fastflow off it too.
    import subprocess
    import sys

    available = list(_cpu_isas())
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    code = ("import torch; from fastflow import _C; "
            "print(torch.backends.cpu.get_cpu_capability(), _C.cpu_isa())")
    # rsplit: PyTorch before 2.9 names the lowest capability "NO AVX", two words.
    torch_capability, isa = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                           capture_output=True, text=True).stdout.rsplit(maxsplit=1)
    if torch_capability.startswith("AVX512"):
        assert isa == available[-1]
    else:
        assert not isa.startswith("avx512")
        assert isa == [name for name in available if not name.startswith("avx512")][-1]


def test_only_the_avx2_and_avx512_kernels_use_avx():
    # Code compiled for AVX2 must stay in its namespaces (or GCC's .avx2 clones), code compiled
    # for AVX-512 in its own (or the .avx512f clones), and AVX512_BF16's conversions in theirs:
    # a function defined inline in a header and compiled in a target region could be the copy
    # the linker keeps for every caller, and crash CPUs without those instructions.
    import shutil
    import subprocess

    ext = compiled_extension()
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump")
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", ext.__file__],
                             capture_output=True, text=True, check=True).stdout
    # AVX-512 shows in its registers: zmm, the mask registers k0 to k7, and xmm16 to xmm31 (and
    # their ymm and zmm forms), which only EVEX encodings reach.
    avx512 = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")
    bf16 = re.compile(r"\tv(cvtneps2bf16|cvtne2ps2bf16|dpbf16ps)")
    function, offenders = "", set()
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
        elif "\t" in line and line.split("\t")[1].startswith("v"):  # VEX or EVEX: AVX and up
            in_bf16 = "fastflow::avx512_bf16::" in function
            in_avx512 = (in_bf16 or "fastflow::avx512::" in function
                         or ".avx512f" in function)
            if avx512.search(line) and not in_avx512 or bf16.search(line) and not in_bf16:
                offenders.add(function)
            if not (in_avx512 or "fastflow::avx2::" in function or ".avx2" in function):
                offenders.add(function)
    assert not offenders, sorted(offenders)[:10]


# The CPU kernels stream tensors made of rows of contiguous elements at one stride apart in
# place: slices of wider tensors, inputs broadcast over the batch (csrc/row_layout.cpp). Other
# layouts, and rows shorter than min_row, are copied. Each maker returns x's values in a layout.

def _wider(x, dim):
    """x as the first half of a tensor twice as wide along dim (the rest NaN, never read)."""
    return torch.cat([x, torch.full_like(x, float("nan"))], dim).narrow(dim, 0, x.shape[dim])


ROW_LAYOUTS = {
    "contiguous": lambda x: x,
    "channel slice": lambda x: _wider(x, 1),           # rows of a sample at stride 2n
    "width slice": lambda x: _wider(x, 3),             # rows of W, several per sample
    "every other sample": lambda x: _wider(x.unsqueeze(1), 1).squeeze(1),
    "transposed": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),   # copied
}
ROW_SHAPE = (6, 4, 3, 81)   # rows of 81 (width slice) or 972 (a sample) elements: odd, so that
# the sums' lanes do not start afresh at each row


# The layouts of three inputs, and the row length they are streamed in (0: copied). Outputs are
# slices alike: of the width beside width slices, else of the channels.
ROW_CASES = {
    "channel and batch slices": (("contiguous", "channel slice", "every other sample"), 972),
    "channel slices": (("channel slice",) * 3, 972),
    "width slices": (("width slice", "contiguous", "width slice"), 81),
    # Rows of 81 of a channel slice are not evenly spaced: copied.
    "width and channel slices": (("width slice", "channel slice", "contiguous"), 0),
    "transposed": (("transposed", "channel slice", "contiguous"), 0),
}


@pytest.mark.parametrize("groups", [6, 1, 6 * 4 * 3 * 27], ids=["G=B", "G=1", "n3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROW_CASES)
def test_cpu_kernels_stream_row_layouts_in_place(dtype, groups, case):
    """The same bits as on contiguous copies, for affine and affine_sqnorm (whose sums continue
    their lanes from one piece of a row to the next: the fp64 cases see a lane out of place,
    the others round the fp64 sums to fp32), on every instruction set; outputs that are slices
    of wider buffers are written in place, the rest of the buffer left alone."""
    ext = compiled_extension()
    names, row = ROW_CASES[case]
    inputs = _streams(3, ROW_SHAPE, dtype, "cpu", seed=len(case))
    laid = [ROW_LAYOUTS[name](x) for name, x in zip(names, inputs)]
    coeffs = _coeffs(groups, 2, 3, dtype, "cpu")
    dim = 3 if "width slice" in names else 1
    buffers = [torch.zeros(ROW_SHAPE, dtype=dtype).repeat_interleave(2, dim) for _ in range(2)]
    out = [b.narrow(dim, 0, ROW_SHAPE[dim]) for b in buffers]
    assert ext.row_length(laid, out) == row

    def run():
        ext.affine_cpu(laid, coeffs, out)
        return [*ext.affine_fresh_cpu(laid, coeffs), *(o.clone() for o in out),
                ext.affine_sqnorm_cpu(laid, coeffs[:, :1])]

    want = [*reference_affine(inputs, coeffs)] * 2 + [
        ext.affine_sqnorm_cpu(inputs, coeffs[:, :1])]
    for results in _run_on_every_cpu_isa(run).values():
        for got, expected in zip(results, want, strict=True):
            assert bits_equal(got.contiguous(), expected)
    for b in buffers:
        assert not b.narrow(dim, ROW_SHAPE[dim], ROW_SHAPE[dim]).any()


# The CPU kernels also stream in place, in memory order, tensors that hold a contiguous tensor
# with the batch moved inward (csrc/row_layout.cpp, batch_period): x.T of an [N, B] tensor, whose
# groups are columns, or a [B, T, C] view of a sequence-first [T, B, C] tensor, whose groups come
# in runs of C elements, one per step. Each case: the memory's shape, where the batch lies in it,
# and the period the kernels see for one group per sample (0: copied).
BATCH_INWARD = {
    "x.T": ((20011, 5), 1, 5),                 # more than a chunk of sums per column
    "x.T of a 3-d tensor": ((31, 3, 9), 2, 9),
    "x.T, rows longer than a tile": ((101, 301), 1, 301),   # tasks start mid-row
    "sequence first": ((7, 6, 83), 1, 6 * 83),
    "runs too short": ((7, 6, 9), 1, 0),      # runs of 9: copied
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BATCH_INWARD)
def test_cpu_kernels_stream_the_batch_inward_in_place(dtype, case):
    """affine into outputs of the inputs' layout and into fresh ones (which take it), and the
    per-sample sums of affine_sqnorm: the bits of the contiguous copies, on every instruction
    set and three threads. Coefficients of one group are streamed in memory order too; the
    sums over groups of several samples are the per-sample sums added up (the value of the
    contiguous path, summed in another order)."""
    ext = compiled_extension()
    memory, batch_dim, period = BATCH_INWARD[case]
    laid = [x.movedim(batch_dim, 0) for x in _streams(3, memory, dtype, "cpu", seed=len(case))]
    inputs = [x.contiguous() for x in laid]
    batch = laid[0].shape[0]
    out = [torch.empty(memory, dtype=dtype).movedim(batch_dim, 0) for _ in range(2)]
    assert ext.batch_period(laid, out, batch, True) == period
    assert ext.batch_period(laid, out, 1, False) == laid[0].numel()

    def run():
        results = []
        for groups in (batch, 1):
            coeffs = _coeffs(groups, 2, 3, dtype, "cpu")
            ext.affine_cpu(laid, coeffs, out)
            fresh = ext.affine_fresh_cpu(laid, coeffs)
            if period:
                assert all(y.stride() == laid[0].stride() for y in fresh)
            results += [*fresh, *(y.clone() for y in out)]
            results.append(ext.affine_sqnorm_cpu(laid, coeffs[:, :1]))
        return results

    every_isa = _on_threads(3, lambda: _run_on_every_cpu_isa(run))
    want = []
    for groups in (batch, 1):
        coeffs = _coeffs(groups, 2, 3, dtype, "cpu")
        want += [*reference_affine(inputs, coeffs)] * 2
        want.append(ext.affine_sqnorm_cpu(inputs, coeffs[:, :1]))
    for results in every_isa.values():
        *per_sample, whole = results
        for got, expected in zip(per_sample, want[:-1], strict=True):
            assert bits_equal(got.contiguous(), expected)
        torch.testing.assert_close(whole, want[-1], rtol=1e-12 if dtype == torch.float64 else 0,
                                   atol=0)


def test_cpu_kernels_take_zero_dim_and_negative_views_whatever_the_layout():
    # A 0-d stream has no batch dimension to look for inward; memory with the negative bit holds
    # minus the values, which the copy resolves: neither may take the in-place batch-inward path.
    ext = compiled_extension()
    assert torch.equal(ext.affine_sqnorm_cpu([torch.tensor(2.0)], torch.ones(1, 1, 1)),
                       torch.tensor([4.0]))
    y = torch.randn(300, 7)
    negated = torch._neg_view(y).T
    assert ext.batch_period([negated], [], 7, False) == 0
    (got,) = ext.affine_fresh_cpu([negated], torch.ones(7, 1, 1))
    assert torch.equal(got, -y.T)


# Group sizes about each width the CPU kernels care about: the table of coefficients per element
# (groups of 1 or 2; 16-bit ones under 8), the group-by-group path's vectors of 32 and 16 bytes
# and their tails, the table's widths (powers of two to 64 elements), in numbers of elements that
# start tiles and threads' tasks mid-group; and in rows of 96 elements (slices of wider buffers,
# streamed in place), which groups straddle.
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 31, 33, 63, 64, 65])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [False, True], ids=["contiguous", "rows of 96"])
def test_cpu_kernel_gives_eager_bits_for_every_group_size(n, dtype, rows):
    ext = compiled_extension()
    numel = 3 * n * 96 if rows else (20011 // n + 1) * n
    inputs = _streams(3, (numel,), dtype, "cpu", seed=n)
    laid = [_wider(x.view(-1, 96), 1) for x in inputs] if rows else inputs
    assert ext.row_length(laid, []) == (96 if rows else numel)
    coeffs = _coeffs(numel // n, 2, 3, dtype, "cpu")
    results = _on_threads(3, lambda: _run_on_every_cpu_isa(
        lambda: ext.affine_fresh_cpu(laid, coeffs)))
    for outputs in results.values():
        for got, want in zip(outputs, reference_affine(inputs, coeffs), strict=True):
            assert torch.equal(got.view(-1), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernels_touch_nothing_past_their_streams(dtype):
    """Every stream ends where a page without access begins: a kernel that reads or writes one
    element past a stream (the group-by-group path converts 16-bit tails a vector at a time)
    crashes the test instead of passing by luck."""
    ext = compiled_extension()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    size = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(5)
    keep = []

    def at_page_end(numel):
        region = mmap.mmap(-1, 2 * page)
        address = ctypes.addressof(ctypes.c_char.from_buffer(region))
        assert libc.mprotect(address + page, page, 0) == 0, os.strerror(ctypes.get_errno())
        keep.append(region)
        whole = torch.frombuffer(region, dtype=dtype, count=page // size)
        return whole[page // size - numel:]

    for n in (2, 3, 5, 7, 9, 12, 15, 23):
        numel = (page // size // 2) // n * n
        inputs = [at_page_end(numel) for _ in range(2)]
        for x in inputs:
            x.copy_(torch.randn(numel, generator=gen))
        outputs = [at_page_end(numel) for _ in range(2)]
        coeffs = _coeffs(numel // n, 2, 2, dtype, "cpu")
        def run():
            ext.affine_cpu(inputs, coeffs, outputs)
            return [y.clone() for y in outputs]

        for results in _run_on_every_cpu_isa(run).values():
            for got, want in zip(results, reference_affine(inputs, coeffs), strict=True):
                assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernels_keep_the_sign_of_zero_coefficients(dtype):
    """-0 * x is -0 for positive x, as eager computes it: a kernel that broadcast coefficients
    as 0 + c turned -0 into +0, and -0 + -0 (an output that is all zero terms) into +0."""
    ext = compiled_extension()
    n = 37   # a 32-byte vector, a 16-byte one, then single elements
    x = [torch.full((4 * n,), 2.0, dtype=dtype), torch.full((4 * n,), -0.0, dtype=dtype)]
    coeffs = torch.tensor([[[-0.0, 1.0], [-0.0, -0.0]]] * 4, dtype=_ops.math_dtype(dtype))
    for outputs in _run_on_every_cpu_isa(lambda: ext.affine_fresh_cpu(x, coeffs)).values():
        for got, want in zip(outputs, reference_affine(x, coeffs), strict=True):
            assert bits_equal(got, want)
        assert torch.signbit(outputs[0]).all()   # -0 * 2 + 1 * -0


def test_cpu_kernels_read_broadcast_inputs_in_place():
    ext = compiled_extension()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, *ROW_SHAPE[1:], generator=gen).expand(ROW_SHAPE)   # rows at stride 0
    x1 = torch.randn(ROW_SHAPE, generator=gen)
    coeffs = torch.randn(6, 2, 2, generator=gen)
    assert ext.row_length([x0, x1], []) == 972
    got = ext.affine_fresh_cpu([x0, x1], coeffs)
    for g, w in zip(got, reference_affine([x0.contiguous(), x1], coeffs), strict=True):
        assert torch.equal(g, w)
    squares = ext.affine_sqnorm_cpu([x0, x1], coeffs[:, :1])
    assert torch.equal(squares, ext.affine_sqnorm_cpu([x0.contiguous(), x1], coeffs[:, :1]))


def test_cpu_kernels_copy_short_rows_and_update_a_slice_in_place():
    ext = compiled_extension()
    for inputs, outputs in (([], [torch.zeros(3)]), ([torch.zeros(256)], [torch.zeros(3)])):
        with pytest.raises(ValueError, match="fastflow row_length"):
            ext.row_length(inputs, outputs)
    gen = torch.Generator().manual_seed(4)
    short = _wider(torch.randn(5, 7, ext.min_row - 1, generator=gen), 2)
    assert ext.row_length([short], []) == 0
    assert ext.row_length([_wider(torch.randn(5, 7, ext.min_row), 2)], []) == ext.min_row
    coeffs = torch.randn(5, 1, 1, generator=gen)
    (got,) = ext.affine_fresh_cpu([short], coeffs)
    assert torch.equal(got, reference_affine([short.contiguous()], coeffs)[0])
    # The last output on top of an input in the same layout: a sampler's state in a slice.
    state, velocity = _wider(torch.randn(5, 7, 96, generator=gen), 1), torch.randn(5, 7, 96)
    expected = reference_affine([state.contiguous(), velocity], coeffs.expand(5, 1, 2))[0]
    ext.affine_cpu([state, velocity], coeffs.expand(5, 1, 2), [state])
    assert torch.equal(state, expected)
    assert state._base[:, 7:].isnan().all()


def test_ops_stream_slices_in_place(backend):
    """A model's output sliced along its channels, through interpolate and the loss (with its
    gradient), and out= buffers that are slices: the values of contiguous streams."""
    gen = torch.Generator().manual_seed(6)
    x0, x1, pred = (_wider(torch.randn(4, 3, 8, 8, generator=gen), 1).to(backend)
                    for _ in range(3))
    t = torch.rand(4, generator=gen).to(backend)
    dense = [x.contiguous() for x in (x0, x1, pred)]
    for got, want in zip(fastflow.interpolate(x0, x1, t), fastflow.interpolate(*dense[:2], t)):
        assert torch.equal(got, want)
    out = [_wider(torch.empty_like(x), 1) for x in dense[:2]]
    fastflow.interpolate(x0, x1, t, out=out)
    for got, want in zip(out, fastflow.interpolate(*dense[:2], t)):
        assert torch.equal(got, want)
    leaf = pred._base.clone().requires_grad_()
    loss = fastflow.flow_matching_loss(leaf[:, :3], x0, x1, t)
    dense_leaf = dense[2].clone().requires_grad_()
    want = fastflow.flow_matching_loss(dense_leaf, *dense[:2], t)
    assert torch.equal(loss, want)
    loss.backward()
    want.backward()
    assert torch.equal(leaf.grad[:, :3], dense_leaf.grad)
    assert not leaf.grad[:, 3:].any()
