"""fastflow.flow_matching_loss and its reduction op, against the eager reference."""
import pytest
import torch

import fastflow
from fastflow import _backends, paths
from fastflow.losses import REDUCTIONS
from fastflow.reference import flow_matching_loss as reference_loss

from conftest import DTYPES, bits_equal

PREDICTIONS = ("velocity", "epsilon", "data", "score")
# Losses are reduced in fp32 whatever the storage type: the error is the inputs' rounding.
LOSS_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5,
                  torch.bfloat16: 1e-5}


def _batch(shape, dtype, device, path, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, x1, pred = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    noise = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if path.uses_noise else None
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = (0.1 + 0.8 * torch.rand(shape[0], generator=g)).to(device=device, dtype=t_dtype)
    weight = torch.rand(shape[0], generator=g).to(device=device, dtype=t_dtype)
    return pred, x0, x1, t, noise, weight


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, dtype, prediction):
    path = paths.Cosine()
    pred, x0, x1, t, _, weight = _batch((5, 3, 7), dtype, backend, path)
    for reduction in REDUCTIONS:
        for w in (None, weight):
            got = fastflow.flow_matching_loss(pred, x0, x1, t, path, prediction, weight=w,
                                              reduction=reduction)
            up = [x.double() for x in (pred, x0, x1, t)]
            want = reference_loss(*up, path, prediction, weight=None if w is None else w.double(),
                                  reduction=reduction)
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            torch.testing.assert_close(got.double(), want, rtol=LOSS_TOLERANCE[dtype], atol=1e-12)


@pytest.mark.parametrize("path", [paths.CondOT(), paths.VP(), paths.ConstantNoise(0.3),
                                  paths.SchrodingerBridge(0.5)], ids=repr)
def test_paths_with_and_without_noise(backend, path):
    pred, x0, x1, t, noise, _ = _batch((4, 33), torch.float32, backend, path, seed=2)
    got = fastflow.flow_matching_loss(pred, x0, x1, t, path, noise=noise, reduction="none")
    want = reference_loss(pred, x0, x1, t, path, noise=noise, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_times_of_any_float_type_give_the_loss_of_their_float64_values(backend, dtype):
    # The velocity rows come from the path's builder, which reads t in its own type and widens
    # it exactly: the coefficients, and so the loss, are those of t in float64.
    from conftest import bits_equal

    for path in (paths.VP(), paths.Cosine(), paths.SchrodingerBridge(0.5)):
        pred, x0, x1, t, noise, _ = _batch((4, 9), dtype, backend, path, seed=5)
        for time_dtype in (torch.float32, torch.float16, torch.bfloat16):
            low = t.to(time_dtype)
            got = fastflow.flow_matching_loss(pred, x0, x1, low, path, noise=noise,
                                              reduction="none")
            want = fastflow.flow_matching_loss(pred, x0, x1, low.double(), path, noise=noise,
                                               reduction="none")
            assert bits_equal(got, want), (path, time_dtype)


# The targets whose residual rows do not depend on t come from a cached row
# (losses._constant_residual); a t that needs a gradient takes the per-sample formulas.
CONSTANT_TARGETS = [(paths.CondOT(), "velocity"), (paths.CondOT(0.2), "velocity"),
                    (paths.TargetCFM(0.05), "velocity"), (paths.ConstantNoise(0.3), "velocity"),
                    (paths.Cosine(), "epsilon"), (paths.SchrodingerBridge(0.5), "data")]


def test_cached_constant_targets_give_the_per_sample_bits(backend):
    from conftest import bits_equal

    for path, prediction in CONSTANT_TARGETS * 2:  # twice: the second time from the cache
        pred, x0, x1, t, noise, _ = _batch((5, 3, 4), torch.float32, backend, path)
        cached = fastflow.flow_matching_loss(pred, x0, x1, t, path, prediction, noise=noise,
                                             reduction="none")
        per_sample = fastflow.flow_matching_loss(pred, x0, x1, t.requires_grad_(), path,
                                                 prediction, noise=noise, reduction="none")
        assert bits_equal(cached, per_sample.detach()), (path, prediction)


def test_constant_targets_of_custom_paths():
    class Tabulated(paths.AffinePath):  # unhashable attributes: no part of the cache key
        def __init__(self):
            self.knots = [0.0, 1.0]

        def __call__(self, t):
            one = torch.ones_like(t)
            return t, 1 - t, one, -one

    pred, x0, x1, t, _, _ = _batch((4, 3), torch.float32, "cpu", paths.CondOT())
    for prediction in ("epsilon", "data", "velocity"):
        torch.testing.assert_close(
            fastflow.flow_matching_loss(pred, x0, x1, t, Tabulated(), prediction),
            reference_loss(pred, x0, x1, t, Tabulated(), prediction))


def test_constant_target_cache_keeps_to_exact_types():
    class Slower(paths.CondOT):  # same parameters as CondOT(), another velocity
        def __call__(self, t):
            one = torch.ones_like(t)
            return t / 2, 1 - t / 2, one / 2, -one / 2

    pred, x0, x1, t, _, _ = _batch((4, 3), torch.float32, "cpu", paths.CondOT())
    fastflow.flow_matching_loss(pred, x0, x1, t, paths.CondOT())
    expected = reference_loss(pred, x0, x1, t, Slower())
    torch.testing.assert_close(fastflow.flow_matching_loss(pred, x0, x1, t, Slower()), expected)


def test_matches_torch_mse_loss_and_scalar_t():
    pred, x0, x1 = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    loss = fastflow.flow_matching_loss(pred, x0, x1, 0.25)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, x1 - x0))
    assert fastflow.flow_matching_loss(pred, x0, x1, 0.25, reduction="none").shape == (3,)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_gradients_match_reference_autograd(backend, prediction):
    path = paths.SchrodingerBridge(0.8) if prediction != "score" else paths.Cosine()
    pred, x0, x1, t, noise, weight = _batch((3, 2, 5), torch.float64, backend, path, seed=1)
    tensors = [pred, x0, x1, t, weight] + ([noise] if noise is not None else [])
    leaves = [x.clone().requires_grad_() for x in tensors]
    ref_leaves = [x.clone().requires_grad_() for x in tensors]

    def loss(fn, xs):
        return fn(xs[0], xs[1], xs[2], xs[3], path, prediction, noise=xs[5] if len(xs) > 5 else None,
                  weight=xs[4])

    # t does not reach the epsilon and data targets: its gradient is then zero for both.
    grads = torch.autograd.grad(loss(fastflow.flow_matching_loss, leaves), leaves,
                                materialize_grads=True)
    ref_grads = torch.autograd.grad(loss(reference_loss, ref_leaves), ref_leaves,
                                    materialize_grads=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_gradient_dtype_follows_the_inputs(backend):
    pred, x0, x1, t, _, _ = _batch((4, 8), torch.bfloat16, backend, paths.CondOT())
    pred.requires_grad_()
    fastflow.flow_matching_loss(pred, x0, x1, t).backward()
    want = 2 * (pred.detach().float() - (x1 - x0).float()) / pred.numel()
    assert pred.grad.dtype == torch.bfloat16
    torch.testing.assert_close(pred.grad.float(), want, rtol=2e-2, atol=1e-4)


# In eager calls with a gradient to record, the loss is one autograd node (losses._LossNode)
# whose backward folds the reduction, the weight and the element count together; on CPU, the
# training step's case (a number, its gradient to pred alone) is a C++ node.
PYTHON_NODE, CPP_NODE = "_LossNodeBackward", "torch::autograd::CppNode<fastflow::PredLoss>"


def _expected_node(backend, reduction, weighted, pred_alone):
    native = _backends.select(torch.device(backend)) == "cpu"
    training_step = weighted != "learned" and reduction != "none" and pred_alone
    return CPP_NODE if native and training_step else PYTHON_NODE


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", ["none", "constant", "learned"])
def test_one_node_gradients_match_reference_autograd(backend, reduction, weighted):
    path = paths.VP()
    for leaves_wanted in ([0], [0, 1, 2, 3]):  # pred alone; pred, x0, x1 and t
        pred, x0, x1, t, _, weight = _batch((4, 3, 2), torch.float64, backend, path, seed=3)
        tensors = [pred, x0, x1, t, weight]
        wanted = leaves_wanted + ([4] if weighted == "learned" else [])
        grads = {}
        for name, fn in (("fused", fastflow.flow_matching_loss), ("reference", reference_loss)):
            xs = [x.clone().requires_grad_(k in wanted) for k, x in enumerate(tensors)]
            loss = fn(*xs[:4], path, "velocity", weight=None if weighted == "none" else xs[4],
                      reduction=reduction)
            if name == "fused":
                assert loss.grad_fn.name() == _expected_node(backend, reduction, weighted,
                                                              wanted == [0])
            out_grad = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype,
                                      device=loss.device).reshape(loss.shape)
            grads[name] = torch.autograd.grad(loss, [xs[k] for k in wanted], out_grad)
        for g, r in zip(grads["fused"], grads["reference"]):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_one_node_gradients_in_fp32_with_a_learned_t(backend):
    path = paths.Cosine()
    pred, x0, x1, t, _, weight = _batch((6, 5), torch.float32, backend, path, seed=4)
    pred.requires_grad_()
    t.requires_grad_()
    fastflow.flow_matching_loss(pred, x0, x1, t, path, weight=weight).backward()
    ref_pred, ref_t = pred.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    reference_loss(ref_pred, x0.double(), x1.double(), ref_t, path,
                   weight=weight.double()).backward()
    assert pred.grad.dtype == t.grad.dtype == torch.float32
    torch.testing.assert_close(pred.grad.double(), ref_pred.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t.grad.double(), ref_t.grad, rtol=1e-4, atol=1e-6)


def test_second_derivatives_match_reference(backend):
    path = paths.CondOT()
    pred, x0, x1, t, _, weight = _batch((3, 4), torch.float64, backend, path, seed=5)
    curvatures = []
    for fn in (fastflow.flow_matching_loss, reference_loss):
        p = pred.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(p, x0, x1, t, path, weight=weight), p, create_graph=True)
        curvatures.append(torch.autograd.grad((g * g.detach().sin()).sum(), p)[0])
    torch.testing.assert_close(*curvatures, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", ["none", "constant"])
def test_training_step_node_second_derivatives(backend, reduction, weighted):
    # The training step's node (C++ on CPU): its backward, recorded under create_graph, is
    # differentiable in pred and in the incoming gradient; constant rows (CondOT) and per-sample
    # ones (cosine).
    for path in (paths.CondOT(), paths.Cosine()):
        pred, x0, x1, t, _, weight = _batch((3, 2, 2), torch.float64, backend, path, seed=10)
        weight = None if weighted == "none" else weight

        def loss(p, fn=fastflow.flow_matching_loss):
            return fn(p, x0, x1, t, path, weight=weight, reduction=reduction)

        p = pred.clone().requires_grad_()
        assert loss(p).grad_fn.name() == _expected_node(backend, reduction, weighted, True)
        assert torch.autograd.gradgradcheck(loss, (p,))
        (g,) = torch.autograd.grad(loss(p), p, create_graph=True)
        (curvature,) = torch.autograd.grad((g * g.detach().sin()).sum(), p)
        ref_p = pred.clone().requires_grad_()
        (ref_g,) = torch.autograd.grad(loss(ref_p, reference_loss), ref_p, create_graph=True)
        (ref_curvature,) = torch.autograd.grad((ref_g * ref_g.detach().sin()).sum(), ref_p)
        torch.testing.assert_close(g, ref_g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(curvature, ref_curvature, rtol=1e-10, atol=1e-12)


def test_training_step_node_takes_only_its_case(backend):
    # Data that needs a gradient, and streams that the Python node reads in place but the C++
    # one would copy (channels_last), go to the Python node; other layouts (a slice of a wider
    # prediction) take the C++ one. The gradients are right either way.
    path = paths.CondOT()
    pred, x0, x1, t, _, _ = _batch((2, 3, 4, 5), torch.float32, backend, path, seed=11)
    wider = torch.cat([pred, torch.randn_like(pred)], dim=1)
    for layout, data_grad in ((torch.contiguous_format, False), (torch.channels_last, False),
                              ("slice", False), (torch.contiguous_format, True)):
        leaves = [x.clone(memory_format=layout).requires_grad_(k == 0 or data_grad)
                  for k, x in enumerate((pred, x0, x1)) if layout != "slice"]
        if layout == "slice":   # the gradient reaches pred through the slice
            leaves = [wider.clone().requires_grad_(), x0, x1]
            loss = fastflow.flow_matching_loss(leaves[0][:, :3], x0, x1, t, path)
        else:
            loss = fastflow.flow_matching_loss(*leaves, t, path)
        native = _expected_node(backend, "mean", "none", True) == CPP_NODE
        in_cpp = native and not data_grad and layout != torch.channels_last
        assert loss.grad_fn.name() == (CPP_NODE if in_cpp else PYTHON_NODE)
        loss.backward()
        want = 2 * (pred - (x1 - x0)) / pred.numel()
        if layout == "slice":
            want = torch.cat([want, torch.zeros_like(want)], dim=1)
        torch.testing.assert_close(leaves[0].grad, want, rtol=1e-5, atol=1e-8)
        if data_grad:
            torch.testing.assert_close(leaves[2].grad, -want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_training_step_node_rounds_as_the_op_by_op_loss(backend, dtype, reduction, weighted):
    # The training step's node (C++ on CPU) does the arithmetic around its kernels by hand; it
    # must round as the ATen ops do: the loss as the unrecorded call's, dL/dpred as
    # coeffs * (grad * (2 / divisor) [* weight]) summed over the streams in order.
    path = paths.CondOT()
    pred, x0, x1, t, _, weight = _batch((3, 5, 7), dtype, backend, path, seed=12)
    weight = weight.to(dtype) if weighted else None
    with torch.no_grad():
        plain = fastflow.flow_matching_loss(pred, x0, x1, t, path, weight=weight,
                                            reduction=reduction)
    p = pred.clone().requires_grad_()
    loss = fastflow.flow_matching_loss(p, x0, x1, t, path, weight=weight, reduction=reduction)
    assert bits_equal(loss.detach(), plain)
    if loss.grad_fn.name() != CPP_NODE:
        return   # the Python node scales by grad / divisor, then by 2
    grad = torch.tensor(0.7, dtype=loss.dtype, device=loss.device)
    loss.backward(grad)
    divisor = pred.numel() if reduction == "mean" else pred[0].numel()
    scale = grad * (2.0 / divisor)
    if weighted:
        scale = scale * weight.view(-1, 1, 1)
    want = (scale * pred + scale * x0) + (scale * -1.0) * x1   # rows (1, 1, -1): pred - (x1 - x0)
    assert bits_equal(p.grad, want)


@pytest.mark.parametrize("path", [paths.Cosine(), paths.Polynomial(0.7)], ids=repr)
@pytest.mark.parametrize("weighted", [False, True])
def test_a_time_per_token_matches_the_reference(backend, path, weighted):
    # [G, 4] with G past the threads' split of the builders (2048 samples for sin and pow) and
    # of the training step's backward rows (16384): on CPU the residual's rows come entry-major
    # from the builder, and dL/dpred's rows keep that layout.
    pred, x0, x1, t, _, weight = _batch((20000, 4), torch.float32, backend, path, seed=13)
    weight = weight if weighted else None
    p = pred.clone().requires_grad_()
    loss = fastflow.flow_matching_loss(p, x0, x1, t, path, weight=weight)
    loss.backward()
    up = pred.double().requires_grad_()
    want = reference_loss(up, x0.double(), x1.double(), t.double(), path,
                          weight=None if weight is None else weight.double())
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-12)
    # Gradients of about 2e-5 (2 r / 80000), whose residuals r cancel in fp32 here.
    torch.testing.assert_close(p.grad.double(), up.grad, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_loss_has_the_same_bits_on_any_number_of_threads(weighted, reduction):
    # Past 32K samples ATen's sum over them split between threads, which moved the loss's last
    # bit with the thread count; the per-sample sums never did. Every eager route: the C++
    # training step (a gradient to pred alone), the Python node (t needs one too), no gradient.
    pred, x0, x1, t, _, weight = _batch((50000, 4), torch.float32, "cpu", paths.VP(), seed=17)
    weight = weight if weighted else None
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            p, tt = pred.clone().requires_grad_(), t.clone().requires_grad_()
            losses = [fastflow.flow_matching_loss(p, x0, x1, t, "vp", weight=weight,
                                                  reduction=reduction),
                      fastflow.flow_matching_loss(p, x0, x1, tt, "vp", weight=weight,
                                                  reduction=reduction)]
            with torch.no_grad():
                losses.append(fastflow.flow_matching_loss(pred, x0, x1, t, "vp", weight=weight,
                                                          reduction=reduction))
            results.append(torch.stack([x.detach() for x in losses]))
    finally:
        torch.set_num_threads(threads)
    assert all(bits_equal(r, results[0]) for r in results[1:])
    want = reference_loss(pred.double(), x0.double(), x1.double(), t.double(), "vp",
                          weight=None if weight is None else weight.double(), reduction=reduction)
    torch.testing.assert_close(results[0].double(), want.expand(3), rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", ["cond_ot", "cosine"])
def test_data_made_under_inference_mode(path):
    # Latents encoded under torch.inference_mode are inference tensors, which autograd cannot
    # save: the loss's node saved them and raised, where mse_loss(pred, x1 - x0) works.
    with torch.inference_mode():
        x0, x1, t = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3)
    grads = []
    for fn in (fastflow.flow_matching_loss, reference_loss):
        pred = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
        fn(pred, x0, x1, t, path).backward()
        grads.append(pred.grad)
    torch.testing.assert_close(*grads)


def test_training_step_node_checks_its_weight():
    # Its backward reads one weight per group in the coefficients' type: a weight of another
    # shape (broadcast by the forward) gave a wrong gradient, or read past its end.
    ext = pytest.importorskip("fastflow._C")
    pred = torch.randn(4, 8, requires_grad=True)
    x0, x1 = torch.randn(4, 8), torch.randn(4, 8)
    coeffs = torch.tensor([[[1.0, 1.0, -1.0]]]).expand(4, 1, 3)
    for weight, message in ((torch.ones(1), r"shape \[4\]"), (torch.ones(5), r"shape \[4\]"),
                            (torch.ones(4, dtype=torch.float64), "coefficients' type")):
        with pytest.raises(ValueError, match=message):
            ext.pred_loss_cpu(pred, [x0, x1], coeffs, weight, 32.0)
    ext.pred_loss_cpu(pred, [x0, x1], coeffs, torch.ones(4), 32.0).backward()
    torch.testing.assert_close(pred.grad, 2 * (pred - (x1 - x0)).detach() / 32)


@pytest.mark.parametrize("create_graph", [False, True])
def test_training_step_node_for_any_rows(create_graph):
    # The node is a function of any rows: its gradient took the pred column as 1 (as the
    # loss's rows (1, -target) have it), and an empty batch divided by zero in the ATen form
    # of a double backward (SIGFPE).
    ext = pytest.importorskip("fastflow._C")
    pred = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(3, 5, dtype=torch.float64)
    coeffs = torch.randn(3, 1, 2, dtype=torch.float64)
    weight = torch.rand(3, dtype=torch.float64)
    want, = torch.autograd.grad(
        (weight * ((coeffs[:, 0, :1] * pred + coeffs[:, 0, 1:] * x0) ** 2).sum(1)).sum() / 7,
        pred)
    got, = torch.autograd.grad(ext.pred_loss_cpu(pred, [x0], coeffs, weight, 7.0), pred,
                               create_graph=create_graph)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    empty = torch.zeros(0, 5, requires_grad=True)
    loss = ext.pred_loss_cpu(empty, [torch.zeros(0, 5)], torch.zeros(0, 1, 2), None, 1.0)
    got, = torch.autograd.grad(loss, empty, create_graph=create_graph)
    assert got.shape == (0, 5)


def test_double_backward_with_a_learned_weight(backend):
    # dL/dweight is the per-sample loss, a function of pred: a double backward must see that.
    path = paths.Cosine()
    pred, x0, x1, t, _, weight = _batch((2, 2), torch.float64, backend, path, seed=6)
    for reduction in REDUCTIONS:
        def loss(p, w):
            return fastflow.flow_matching_loss(p, x0, x1, t, path, weight=w, reduction=reduction)

        assert torch.autograd.gradgradcheck(loss, (pred.clone().requires_grad_(),
                                                   weight.clone().requires_grad_()))


# Under autocast a network returns another float type than the data's: (pred, data) pairs.
MIXED_DTYPES = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                (torch.bfloat16, torch.float64), (torch.float16, torch.float64),
                (torch.float32, torch.bfloat16), (torch.float64, torch.float32)]


@pytest.mark.parametrize("pred_dtype,data_dtype", MIXED_DTYPES, ids=str)
def test_mixed_pred_and_data_dtypes_match_reference(backend, pred_dtype, data_dtype):
    path = paths.Cosine()
    pred, x0, x1, t, _, weight = _batch((4, 3, 5), data_dtype, backend, path, seed=7)
    pred = pred.to(pred_dtype)
    math = torch.promote_types(torch.promote_types(pred_dtype, data_dtype), torch.float32)
    for wanted in ([pred], [pred, x0, x1]):  # pred alone (a shortcut), and the data too
        leaves = [x.clone().requires_grad_(any(x is w for w in wanted)) for x in (pred, x0, x1)]
        got = fastflow.flow_matching_loss(*leaves, t, path, weight=weight, reduction="none")
        ref_leaves = [x.detach().double().requires_grad_(x.requires_grad) for x in leaves]
        want = reference_loss(*ref_leaves, t.double(), path, weight=weight.double(),
                              reduction="none")
        assert got.dtype == math
        torch.testing.assert_close(got.double(), want, rtol=LOSS_TOLERANCE[math], atol=1e-12)
        got.sum().backward()
        want.sum().backward()
        for leaf, ref_leaf in zip(leaves, ref_leaves):
            if leaf.requires_grad:  # in its own type, the reference's gradient rounded to it
                assert leaf.grad.dtype == leaf.dtype
                torch.testing.assert_close(leaf.grad, ref_leaf.grad.to(leaf.dtype))


@pytest.mark.parametrize("pred_dtype,data_dtype", MIXED_DTYPES[:4], ids=str)
def test_mixed_dtypes_match_torch_mse_loss(pred_dtype, data_dtype):
    pred, x0, x1, _, _, _ = _batch((3, 8), data_dtype, "cpu", paths.CondOT(), seed=8)
    pred = pred.to(pred_dtype).requires_grad_()
    loss = fastflow.flow_matching_loss(pred, x0, x1, 0.25)
    (grad,) = torch.autograd.grad(loss, pred)
    # Widened by hand: mse_loss promotes mixed types itself, but its backward then fails in
    # PyTorch 2.11 ("Found dtype Float but expected BFloat16").
    target = x1 - x0
    want = torch.nn.functional.mse_loss(pred.to(torch.promote_types(pred.dtype, target.dtype)),
                                        target)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, torch.autograd.grad(want, pred)[0])


def _autocast_model_gradients(backend, loss_fn):
    """The model's gradients of loss_fn(model(x_t), x0, x1, t) with the model under autocast."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6))
    model.to(backend)
    _, x0, x1, t, _, _ = _batch((8, 6), torch.float32, backend, paths.CondOT(), seed=9)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    with torch.autocast(backend.type, dtype=torch.bfloat16):
        out = model(x_t)
        loss = loss_fn(out, x0, x1, t)
    loss.backward()
    return out.dtype, loss, [p.grad for p in model.parameters()]


def test_autocast_training_step_matches_torch_mse_loss(backend):
    def mse(pred, x0, x1, t):
        return torch.nn.functional.mse_loss(pred, x1 - x0)

    out_dtype, loss, grads = _autocast_model_gradients(backend, fastflow.flow_matching_loss)
    _, want, want_grads = _autocast_model_gradients(backend, mse)
    assert out_dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, want)
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g, r)


def test_backward_inside_autocast_keeps_fp32_gradients(backend):
    # The gradient to t goes through the inputs' Gram matrix: no 16-bit matrix product there.
    pred, x0, x1, t, _, _ = _batch((4, 6), torch.float32, backend, paths.Cosine(), seed=3)
    grads = []
    for autocast in (False, True):
        t_ = t.clone().requires_grad_()
        with torch.autocast(backend.type, dtype=torch.bfloat16, enabled=autocast):
            fastflow.flow_matching_loss(pred, x0, x1, t_, "cosine").backward()
        grads.append(t_.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_empty_batch_gradients(backend):
    pred, x0, x1 = (torch.randn(0, 3, device=backend) for _ in range(3))
    pred.requires_grad_()
    loss = fastflow.flow_matching_loss(pred, x0, x1, torch.rand(0, device=backend),
                                       reduction="sum")
    loss.backward()
    assert loss.item() == 0 and pred.grad.shape == (0, 3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_samples_without_elements_give_t_the_references_gradient(backend, reduction):
    # Each mean is 0 / 0; its gradient to t, a sum over no elements, is 0 in the reference,
    # and was NaN here (inf times the Gram matrix's 0 in the coefficients' gradient).
    empty = torch.zeros(2, 0, dtype=torch.float64, device=backend)
    for path, prediction in (("cosine", "velocity"), ("vp", "score")):
        grads = []
        for loss_fn in (fastflow.flow_matching_loss, reference_loss):
            t = torch.tensor([0.3, 0.6], dtype=torch.float64, device=backend, requires_grad=True)
            loss = loss_fn(empty, empty, empty, t, path, prediction=prediction,
                           reduction=reduction)
            grads.append(torch.autograd.grad(loss.sum(), t)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_deterministic(backend):
    pred, x0, x1, t, _, _ = _batch((3, 5000), torch.float32, backend, paths.CondOT())
    first = fastflow.flow_matching_loss(pred, x0, x1, t, reduction="none")
    assert torch.equal(first, fastflow.flow_matching_loss(pred, x0, x1, t, reduction="none"))


def test_opcheck_affine_sqnorm(backend):
    xs = [torch.randn(4, 6, device=backend) for _ in range(3)]
    coeffs = torch.randn(4, 1, 3, device=backend, requires_grad=True)
    torch.library.opcheck(torch.ops.fastflow.affine_sqnorm.default,
                          ([xs[0].requires_grad_(), xs[1], xs[2]], coeffs))


def test_compiled_training_step():
    model = torch.nn.Linear(6, 6)
    x1 = torch.randn(8, 6)

    @torch.compile(fullgraph=True)
    def step(x0, x1, t):
        x_t, _ = fastflow.interpolate(x0, x1, t)
        return fastflow.flow_matching_loss(model(x_t), x0, x1, t)

    x0, t = torch.randn_like(x1), torch.rand(8)
    step(x0, x1, t).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    torch.nn.functional.mse_loss(model(x_t), x1 - x0).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_compiled_with_a_dynamic_batch_and_t_needing_a_gradient():
    # The coefficients' gradient takes affine_dot, whose group count was an int in its schema:
    # the batch size became a constant (mark_dynamic raised, dynamic=True recompiled per size).
    torch._dynamo.reset()

    def loss(x0, x1, t):
        return fastflow.flow_matching_loss(x1 * 0.5, x0, x1, t, path="cosine")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for batch in (6, 7):
        x0, x1 = torch.randn(batch, 4), torch.randn(batch, 4)
        t = torch.rand(batch, requires_grad=True)
        for x in (x0, x1, t):
            torch._dynamo.mark_dynamic(x, 0)
        got = torch.autograd.grad(compiled(x0, x1, t), t)[0]
        want = torch.autograd.grad(loss(x0, x1, t), t)[0]
        torch.testing.assert_close(got, want)


def test_compiled_training_step_under_autocast():
    model = torch.nn.Linear(6, 6)
    x1, x0, t = torch.randn(8, 6), torch.randn(8, 6), torch.rand(8)

    def step(x0, x1, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_t, _ = fastflow.interpolate(x0, x1, t)
            return fastflow.flow_matching_loss(model(x_t), x0, x1, t)  # bf16 pred, fp32 data

    grads = []
    for fn in (torch.compile(step, fullgraph=True), step):
        model.zero_grad()
        fn(x0, x1, t).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r)


class TestBadInput:
    def setup_method(self):
        self.x = torch.randn(2, 3)

    def test_unknown_prediction_or_reduction(self):
        with pytest.raises(ValueError, match="prediction: expected one of"):
            fastflow.flow_matching_loss(self.x, self.x, self.x, 0.5, prediction="noise")
        with pytest.raises(ValueError, match="reduction: expected one of"):
            fastflow.flow_matching_loss(self.x, self.x, self.x, 0.5, reduction="avg")

    def test_pred_shape(self):
        with pytest.raises(ValueError, match="pred: expected shape"):
            fastflow.flow_matching_loss(torch.randn(2, 4), self.x, self.x, 0.5)
        with pytest.raises(ValueError, match="pred: expected shape"):  # and of another type
            fastflow.flow_matching_loss(torch.randn(2, 4).bfloat16(), self.x, self.x, 0.5)

    def test_pred_must_be_floating_point(self):
        with pytest.raises(TypeError, match="pred: expected a float16, bfloat16, float32 or"):
            fastflow.flow_matching_loss(self.x.int(), self.x, self.x, 0.5)

    def test_data_share_one_dtype(self):
        # pred may be of another float type (autocast); x0, x1 and noise may not.
        with pytest.raises(TypeError, match="x0: expected dtype torch.float32"):
            fastflow.flow_matching_loss(self.x, self.x.bfloat16(), self.x, 0.5)
        with pytest.raises(TypeError, match="noise: expected dtype torch.float32"):
            fastflow.flow_matching_loss(self.x, self.x, self.x, 0.5, path="constant_noise",
                                        noise=self.x.double())

    @pytest.mark.parametrize("weight,error", [(torch.ones(3), ValueError),
                                              (torch.ones(2, 1), ValueError),
                                              (torch.ones(2, dtype=torch.int64), TypeError)])
    def test_weight(self, weight, error):
        with pytest.raises(error, match="weight: expected"):
            fastflow.flow_matching_loss(self.x, self.x, self.x, 0.5, weight=weight)

    def test_score_needs_an_affine_path(self):
        with pytest.raises(TypeError, match="prediction: 'score' needs an affine path"):
            fastflow.flow_matching_loss(self.x, self.x, self.x, 0.5, path="constant_noise",
                                        prediction="score", noise=self.x)


def test_a_loss_in_inference_or_fake_mode_leaves_training_working():
    # The small device caches (constant residual rows, embedding frequencies, flow-map times)
    # once kept the first tensor built: an inference tensor (a validation pass under
    # torch.inference_mode) broke every later backward; a fake one every later call.
    from torch._subclasses.fake_tensor import FakeTensorMode

    x0, x1, t = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
    with torch.inference_mode():
        fastflow.flow_matching_loss(torch.randn(4, 3), x0, x1, t, path="target_cfm")
        fastflow.timestep_embedding(t, 32)
        fastflow.flow_map_loss(lambda x, s, t: x, x0, x1, t)
    with FakeTensorMode():
        fastflow.flow_matching_loss(torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3),
                                    torch.rand(5))
    pred = torch.randn(4, 3, requires_grad=True)
    fastflow.flow_matching_loss(pred, x0, x1, t, path="target_cfm").backward()
    tt = t.clone().requires_grad_()
    fastflow.timestep_embedding(tt, 32).sum().backward()
    layer = torch.nn.Linear(3, 3)
    fastflow.flow_map_loss(lambda x, s, t: layer(x), x0, x1, t).backward()
    assert pred.grad is not None and tt.grad is not None and layer.weight.grad is not None
    assert torch.isfinite(fastflow.flow_matching_loss(torch.randn(5, 3), torch.randn(5, 3),
                                                      torch.randn(5, 3), torch.rand(5)))


def test_the_references_take_an_empty_batch():
    # The oracles reshaped to [0, -1], which PyTorch refuses.
    x, t = torch.randn(0, 3), torch.rand(0)
    for reduction, want in (("none", torch.empty(0)), ("sum", torch.tensor(0.0))):
        torch.testing.assert_close(reference_loss(x, x, x, t, reduction=reduction), want)
        torch.testing.assert_close(fastflow.flow_matching_loss(x, x, x, t, reduction=reduction),
                                   want)
        torch.testing.assert_close(
            fastflow.reference.flow_map_loss(lambda x, s, t: x, x, x, t, reduction=reduction),
            want)


@pytest.mark.parametrize("prediction,ignored,path", [
    ("data", "x0", "cosine"), ("epsilon", "x1", "cosine"), ("score", "x1", "cosine"),
    ("velocity", "noise", paths.ConstantNoise(0.1))])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: 0 * inf
def test_a_stream_the_target_ignores_is_not_read(backend, prediction, ignored, path):
    # 0 * inf is NaN: streaming the ignored input with its exact-zero coefficient made the
    # loss NaN where the formula (F.mse_loss against x1, x0 or torchcfm's x1 - x0) is finite.
    data = {name: torch.randn(2, 3, device=backend) for name in ("x0", "x1", "noise")}
    data[ignored][0, 0] = float("inf")
    data[ignored][1, 1] = float("nan")
    noise = data["noise"] if paths.get_path(path).uses_noise else None
    pred = torch.randn(2, 3, device=backend, requires_grad=True)
    for t_grad in (False, True):   # the cached rows, and the per-sample formulas
        t = (torch.rand(2, device=backend) * 0.8 + 0.1).requires_grad_(t_grad)
        for reduction in ("mean", "none"):
            got = fastflow.flow_matching_loss(pred, data["x0"], data["x1"], t, path=path,
                                              prediction=prediction, noise=noise,
                                              reduction=reduction)
            want = reference_loss(pred, data["x0"], data["x1"], t, path=path, noise=noise,
                                  prediction=prediction, reduction=reduction)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want)
        pred.grad = None
        got.sum().backward()
        assert torch.isfinite(pred.grad).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: 1/0, 0 * inf
@pytest.mark.parametrize("elements", [3, 4, 5, 33])
def test_an_infinite_target_gives_an_infinite_loss(backend, elements):
    # u_t of LinearVP is infinite at t = 1. The Triton reduction's padding lanes (zeros times
    # the infinite coefficient) made the loss NaN unless the element count was a power of two.
    x0, x1, pred = (torch.randn(2, elements, device=backend) for _ in range(3))
    t = torch.tensor([1.0, 0.5], device=backend)
    got = fastflow.flow_matching_loss(pred, x0, x1, t, path="linear_vp", reduction="none")
    want = reference_loss(pred, x0, x1, t, path="linear_vp", reduction="none")
    assert got[0].isinf() and want[0].isinf()
    torch.testing.assert_close(got[1:], want[1:])
