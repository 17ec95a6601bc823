"""fastflow.compat.diffusers against diffusers 0.42 itself: the scheduler's schedules, steps and
state, bit for bit; the fused step without host synchronisation; the time embeddings.

Bit-exactness: with an fp32 model output every step equals the original's exactly. With a bf16 /
fp16 model output the original rounds ``dt * model_output`` to bf16 / fp16 before adding it (see
fastflow/compat/diffusers.py): the default (``exact_low_precision_rounding = True``) must equal the
original bit for bit; the single-pass mode (False) adds it unrounded, so it is checked to equal
that formula exactly, to stay within a few ulps of the original, and to be at least as accurate.
"""
import contextlib
import importlib
import importlib.util
import itertools
import math
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastflow  # noqa: E402
from fastflow import _ops  # noqa: E402

from conftest import bits_equal  # noqa: E402

compat = importlib.import_module("fastflow.compat.diffusers")
from diffusers.models import embeddings as diffusers_embeddings  # noqa: E402
from diffusers.schedulers import scheduling_flow_match_euler_discrete as diffusers_fm  # noqa: E402

Original = diffusers_fm.FlowMatchEulerDiscreteScheduler
Fast = compat.FlowMatchEulerDiscreteScheduler

# (config, mu): every branch of set_timesteps.
CONFIGS = [
    ({}, None),
    ({"shift": 3.0}, None),
    ({"shift": 0.5}, None),
    ({"use_dynamic_shifting": True}, 0.8),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.15),
    ({"use_dynamic_shifting": True, "shift_terminal": 0.02},
     fastflow.schedules.calculate_shift(4096)),
    ({"shift": 3.0, "shift_terminal": 0.1}, None),
    ({"shift": 3.0, "use_karras_sigmas": True}, None),
    ({"shift": 2.0, "use_exponential_sigmas": True}, None),
    ({"use_beta_sigmas": True}, None),
    ({"invert_sigmas": True}, None),
    ({"invert_sigmas": True, "shift": 3.0}, None),
    ({"num_train_timesteps": 500, "shift": 1.5}, None),
]
CONFIG_IDS = [",".join(f"{k}={v}" for k, v in c.items()) + (f",mu={mu:.3g}" if mu else "")
              or "default" for c, mu in CONFIGS]
STEPS = [1, 4, 28, 50]
# (model_output dtype, sample dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
          (torch.float32, torch.bfloat16)]
DTYPE_IDS = [f"out-{str(m)[6:]}-sample-{str(s)[6:]}" for m, s in DTYPES]


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _pair(config, **kwargs):
    return Original(**config, **kwargs), Fast(**config, **kwargs)


def _set(schedulers, steps, mu, explicit=False, **kwargs):
    sigmas = np.linspace(1.0, 1 / steps, steps) if explicit else None
    for s in schedulers:
        s.set_timesteps(steps, sigmas=sigmas, mu=mu, **kwargs)


# The small deterministic "model": contractive towards a fixed data point plus a mixing term, in
# fp64, so that both schedulers see identical velocities for identical samples.
_GEN = torch.Generator().manual_seed(1234)
_MIX = torch.randn(4, 4, generator=_GEN, dtype=torch.float64) * 0.1
_DATA = torch.randn(2, 4, 7, 9, generator=_GEN, dtype=torch.float64)


def _model(x, t, sign=1):
    """Contractive for sigmas that decrease (sign 1) or increase (invert_sigmas, sign -1)."""
    x = x.double()
    return sign * (torch.einsum("ij,bjhw->bihw", _MIX, x) + (x - _DATA) * (1 + t.double() / 2000))


def _noise(dtype, seed=0):
    return torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _loop(scheduler, model_dtype, sample, timesteps=None, record=None):
    x, sign = sample, -1 if scheduler.config.invert_sigmas else 1
    for t in scheduler.timesteps if timesteps is None else timesteps:
        out = scheduler.step(_model(x, t, sign).to(model_dtype), t, x)
        assert isinstance(out, diffusers_fm.FlowMatchEulerDiscreteSchedulerOutput)
        x = out.prev_sample
        if record is not None:
            record.append(scheduler.step_index)
    return x


# ---- construction, config, loading ----

def test_is_the_original_class_with_the_same_config(tmp_path):
    orig = Original(shift=3.0, use_dynamic_shifting=True, shift_terminal=0.1)
    fast = Fast.from_config(orig.config)
    assert isinstance(fast, Original) and type(fast) is Fast
    assert dict(fast.config) == dict(orig.config)
    assert fast.order == orig.order == 1 and fast.init_noise_sigma == 1.0
    assert len(fast) == len(orig) == 1000
    assert bits_equal(fast.sigmas, orig.sigmas) and bits_equal(fast.timesteps, orig.timesteps)
    assert fast.sigma_min == orig.sigma_min and fast.sigma_max == orig.sigma_max
    assert fast.shift == orig.shift
    # Defaults are the original's.
    assert dict(Fast().config) == dict(Original().config)
    # save_pretrained / from_pretrained both ways.
    orig.save_pretrained(tmp_path / "orig")
    loaded = Fast.from_pretrained(tmp_path / "orig")
    assert type(loaded) is Fast and _public(loaded.config) == _public(orig.config)
    fast.save_pretrained(tmp_path / "fast")
    back = Original.from_pretrained(tmp_path / "fast")
    assert type(back) is Original and _public(back.config) == _public(orig.config)


def test_pipeline_style_swap():
    """What a user does: pipe.scheduler = Fast.from_config(pipe.scheduler.config)."""
    class Pipe:
        scheduler = Original(shift=3.0)
    pipe = Pipe()
    pipe.scheduler = Fast.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(10)
    ref = Original(shift=3.0)
    ref.set_timesteps(10)
    x = _noise(torch.float32)
    assert bits_equal(_loop(pipe.scheduler, torch.float32, x), _loop(ref, torch.float32, x))


# ---- set_timesteps ----

# diffusers' one-step shift_terminal schedule divides 0 by 0 (NaN, with numpy's warning).
NAN_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@NAN_WARNING
@pytest.mark.parametrize("explicit", [False, True], ids=["grid", "explicit-sigmas"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config,mu", CONFIGS, ids=CONFIG_IDS)
def test_set_timesteps_bit_equal(config, mu, steps, explicit):
    orig, fast = _pair(config)
    _set([orig, fast], steps, mu, explicit)
    assert bits_equal(fast.sigmas, orig.sigmas)
    assert bits_equal(fast.timesteps, orig.timesteps)
    assert fast.num_inference_steps == orig.num_inference_steps == steps
    assert fast.step_index is None and fast.begin_index is None
    # fastflow.schedules.flow_match_sigmas gives the same grid (where it does not refuse the
    # ill-posed one-step shift_terminal schedule on which diffusers returns NaN).
    if not torch.isnan(orig.sigmas).any():
        ours = fastflow.schedules.flow_match_sigmas(
            steps, sigmas=np.linspace(1.0, 1 / steps, steps) if explicit else None, mu=mu,
            **{k: v for k, v in config.items()})
        assert bits_equal(ours, orig.sigmas)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), None])
def test_set_timesteps_device_and_custom_timesteps(device):
    orig, fast = _pair({"shift": 3.0})
    for s in (orig, fast):
        s.set_timesteps(7, device=device)
    assert bits_equal(fast.sigmas, orig.sigmas) and bits_equal(fast.timesteps, orig.timesteps)
    # timesteps given (with and without sigmas), set_shift, again.
    custom = [999.0, 800.5, 600.0, 400.0, 200.0, 10.0]
    for kwargs in ({"timesteps": custom},
                   {"timesteps": custom, "sigmas": [1, .8, .6, .4, .2, .01]}):
        for s in (orig, fast):
            s.set_shift(2.5)
            s.set_timesteps(device=device, **kwargs)
        assert bits_equal(fast.sigmas, orig.sigmas) and bits_equal(fast.timesteps, orig.timesteps)
        x = _noise(torch.float32)
        assert bits_equal(_loop(fast, torch.float32, x), _loop(orig, torch.float32, x))


def test_set_timesteps_with_default_dtype_float64():
    """The original appends its final sigma in the default dtype: fp64 sigmas then. The same
    here (and the step falls back to the original's arithmetic, which mixes fp64 in)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        orig, fast = _pair({"shift": 3.0})
        _set([orig, fast], 5, None)
        assert fast.sigmas.dtype == torch.float64
        assert bits_equal(fast.sigmas, orig.sigmas)
        x = _noise(torch.float32)
        assert bits_equal(_loop(fast, torch.float32, x), _loop(orig, torch.float32, x))
    finally:
        torch.set_default_dtype(previous)


# ---- the denoising loop ----

@NAN_WARNING
@pytest.mark.parametrize("model_dtype,sample_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config,mu", CONFIGS, ids=CONFIG_IDS)
def test_denoising_loop_matches_original(config, mu, steps, model_dtype, sample_dtype):
    orig, fast, exact = Original(**config), Fast(**config), Fast(**config)
    fast.exact_low_precision_rounding = False
    explicit = steps > 1 and "use_dynamic_shifting" in config  # the FLUX way
    _set([orig, fast, exact], steps, mu, explicit)
    x = _noise(sample_dtype)
    if torch.isnan(orig.sigmas).any():
        # The one-step shift_terminal schedule is NaN in diffusers: its first step cannot find
        # the NaN timestep, and neither can ours.
        for s in (orig, fast, exact):
            with pytest.raises(IndexError):
                _loop(s, model_dtype, x)
        return
    indices = {name: [] for name in ("orig", "fast", "exact")}
    want = _loop(orig, model_dtype, x, record=indices["orig"])
    got = _loop(fast, model_dtype, x, record=indices["fast"])
    got_exact = _loop(exact, model_dtype, x, record=indices["exact"])
    assert indices["fast"] == indices["exact"] == indices["orig"] == list(range(1, steps + 1))
    assert got.dtype == got_exact.dtype == want.dtype == model_dtype
    assert bits_equal(got_exact, want)
    if model_dtype == torch.float32:
        assert bits_equal(got, want)
    else:
        # Within a few ulps (the product's rounding, compounded over the loop, on a contractive
        # model), scaled by max(1, |x|).
        eps = torch.finfo(model_dtype).eps
        err = ((got.double() - want.double()).abs() / want.double().abs().clamp(min=1)).max()
        assert err <= 4 * eps, f"{err / eps:.2f} ulps"


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_step_is_the_single_rounding_formula(model_dtype):
    """Per step, the single fused pass equals (sample.float() + dt' * model_output.float())
    rounded once to the model's dtype, with dt' = dt rounded to that dtype (the original's step
    size), exactly; and differs from the original only by the rounding of the product."""
    orig, fast = _pair({"shift": 3.0})
    fast.exact_low_precision_rounding = False
    _set([orig, fast], 12, None)
    eps = torch.finfo(model_dtype).eps
    for i, t in enumerate(fast.timesteps):
        x = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(i)).to(model_dtype)
        v = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(100 + i)).to(model_dtype)
        got = fast.step(v, t, x).prev_sample
        want = orig.step(v, orig.timesteps[i], x).prev_sample
        dt = (fast.sigmas[i + 1] - fast.sigmas[i]).to(model_dtype).float()
        assert bits_equal(got, (x.float() + dt * v.float()).to(model_dtype))
        product = (dt * v.float()).abs()
        bound = product * eps / 2 + (x.float() + dt * v.float()).abs() * eps + 1e-30
        assert ((got.float() - want.float()).abs() <= bound).all()


def test_low_precision_loop_at_least_as_accurate_as_original():
    """Against an fp64 reference trajectory, the single-pass bf16 loop is no less accurate than
    the original's (it rounds once per step where the original rounds twice)."""
    def reference(scheduler, x):
        x = x.double()
        for i, t in enumerate(scheduler.timesteps):
            x = x + (scheduler.sigmas[i + 1].double() - scheduler.sigmas[i].double()) * _model(x, t)
        return x
    errors = {}
    for name, cls in (("orig", Original), ("fast", Fast)):
        s = cls(shift=3.0)
        s.exact_low_precision_rounding = False
        s.set_timesteps(50)
        x = _noise(torch.bfloat16, seed=3)
        final = _loop(s, torch.bfloat16, x)
        errors[name] = (final.double() - reference(s, x)).pow(2).mean().sqrt().item()
    assert errors["fast"] <= errors["orig"] * 1.02, errors


def test_return_dict_false_and_output_type():
    orig, fast = _pair({"shift": 3.0})
    _set([orig, fast], 4, None)
    x = _noise(torch.float32)
    v = _model(x, fast.timesteps[0]).float()
    out = fast.step(v, fast.timesteps[0], x, return_dict=False)
    want = orig.step(v, orig.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and bits_equal(out[0], want[0])
    out = fast.step(v, fast.timesteps[1], x)
    assert type(out) is diffusers_fm.FlowMatchEulerDiscreteSchedulerOutput
    assert (compat.FlowMatchEulerDiscreteSchedulerOutput
            is diffusers_fm.FlowMatchEulerDiscreteSchedulerOutput)
    assert fast.step_index == 2


def test_step_index_progression_and_ignored_timestep():
    """Once set, the counter alone decides the step (the timestep argument is ignored), as in
    the original; set_timesteps resets it."""
    orig, fast = _pair({"shift": 3.0})
    _set([orig, fast], 6, None)
    assert fast.step_index is None
    x_o = x_f = _noise(torch.float32)
    for k in range(6):
        t = fast.timesteps[0]  # always the first timestep: ignored after the first step
        x_o = orig.step(_model(x_o, t).float(), orig.timesteps[0], x_o).prev_sample
        x_f = fast.step(_model(x_f, t).float(), t, x_f).prev_sample
        assert fast.step_index == orig.step_index == k + 1
        assert bits_equal(x_f, x_o)
    _set([orig, fast], 6, None)
    assert fast.step_index is None and fast.begin_index is None


@pytest.mark.parametrize("kind", ["view", "float", "cpu-clone", "0d-float64"])
def test_first_step_lookup_matches_original(kind):
    """Without a begin index, the first step finds its index from the timestep, the second match
    when a value occurs twice (diffusers' rule for schedules entered midway): every start
    position, with timesteps given as views of the schedule, Python floats, separate tensors."""
    sigmas = [1.0, 0.75, 0.5, 0.5, 0.25, 0.25, 0.1]
    for start in range(len(sigmas)):
        orig, fast = _pair({})
        for s in (orig, fast):
            s.set_timesteps(sigmas=sigmas)
        def timestep(s):
            t = s.timesteps[start]
            return {"view": t, "float": float(t), "cpu-clone": t.clone(),
                    "0d-float64": t.double()}[kind]
        x = _noise(torch.float32)
        v = _model(x, fast.timesteps[start]).float()
        want = orig.step(v, timestep(orig), x).prev_sample
        got = fast.step(v, timestep(fast), x).prev_sample
        assert fast.step_index == orig.step_index, (start, fast.step_index, orig.step_index)
        assert bits_equal(got, want)


@pytest.mark.parametrize("use_begin_index", [True, False])
@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_img2img_partial_schedule(use_begin_index, strength, model_dtype):
    """The img2img pipelines' way: cut the schedule, set_begin_index, scale_noise the image,
    loop over the remaining timesteps (or, in pipelines without set_begin_index, let the first
    step find its index)."""
    steps = 20
    results = []
    for cls in (Original, Fast):
        s = cls(shift=3.0)
        s.exact_low_precision_rounding = True
        s.set_timesteps(steps)
        t_start = steps - min(int(steps * strength), steps)
        timesteps = s.timesteps[t_start * s.order:]
        if use_begin_index:
            s.set_begin_index(t_start * s.order)
        image, noise = _noise(torch.float32, seed=5), _noise(torch.float32, seed=6)
        latents = s.scale_noise(image, timesteps[:1].repeat(2), noise)
        record = []
        final = _loop(s, model_dtype, latents, timesteps=timesteps, record=record)
        results.append((latents, final, record, s.begin_index))
    (lat_o, fin_o, rec_o, b_o), (lat_f, fin_f, rec_f, b_f) = results
    assert bits_equal(lat_f, lat_o) and bits_equal(fin_f, fin_o)
    assert rec_f == rec_o and b_f == b_o
    assert rec_f[-1] == steps


def test_stochastic_sampling_and_per_token_timesteps_delegate():
    orig, fast = _pair({"stochastic_sampling": True, "shift": 3.0})
    _set([orig, fast], 8, None)
    x = _noise(torch.float32)
    results = []
    for s in (orig, fast):
        g = torch.Generator().manual_seed(7)
        y = x
        for t in s.timesteps:
            y = s.step(_model(y, t).float(), t, y, generator=g).prev_sample
        results.append(y)
    assert bits_equal(results[1], results[0])

    orig, fast = _pair({"shift": 3.0})
    _set([orig, fast], 8, None)
    tokens = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) * 900 + 50
    sample, v = torch.randn(2, 16, 4), torch.randn(2, 16, 4)
    want = orig.step(v, orig.timesteps[0], sample, per_token_timesteps=tokens).prev_sample
    got = fast.step(v, fast.timesteps[0], sample, per_token_timesteps=tokens).prev_sample
    assert bits_equal(got, want) and fast.step_index == orig.step_index == 1


def test_other_arguments_fall_back_to_the_original():
    """fp64 streams, broadcasting shapes and autograd run the original's step; non-contiguous
    and empty inputs the fused one (through the checked op): the same results either way."""
    cases = [
        (torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)),
        (torch.randn(2, 3, 5), torch.randn(2, 3, 5, dtype=torch.float64)),
        (torch.randn(2, 3, 5), torch.randn(1, 3, 5)),            # model_output broadcast
        (torch.randn(5, 3, 2).transpose(0, 2), torch.randn(2, 3, 5)),   # non-contiguous
        (torch.randn(2, 3, 5), torch.randn(2, 5, 3).transpose(1, 2).to(torch.bfloat16)),
        (torch.randn(0, 3, 5), torch.randn(0, 3, 5)),                   # empty
    ]
    for sample, v in cases:
        orig, fast = _pair({"shift": 3.0})
        fast.exact_low_precision_rounding = True  # bit-exact with a bf16 model output too
        _set([orig, fast], 3, None)
        for k in range(3):
            want = orig.step(v, orig.timesteps[k], sample).prev_sample
            got = fast.step(v, fast.timesteps[k], sample).prev_sample
            assert bits_equal(got, want), (sample.shape, v.shape, v.dtype)
    # Gradients flow as in the original (which the fused out= kernel would not give).
    orig, fast = _pair({"shift": 3.0})
    _set([orig, fast], 3, None)
    grads = []
    for s in (orig, fast):
        v = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
        s.step(v, s.timesteps[0], torch.ones(2, 3)).prev_sample.sum().backward()
        grads.append(v.grad)
    assert bits_equal(grads[1], grads[0])


def test_edited_schedule_is_noticed():
    """A caller that edits .sigmas in place (or replaces .timesteps) gets steps from the new
    values, as with the original."""
    orig, fast = _pair({"shift": 3.0})
    _set([orig, fast], 5, None)
    x = _noise(torch.float32)
    v = _model(x, fast.timesteps[0]).float()
    fast.step(v, fast.timesteps[0], x)
    orig.step(v, orig.timesteps[0], x)
    for s in (orig, fast):
        s.sigmas.mul_(0.5)
    assert bits_equal(fast.step(v, fast.timesteps[1], x).prev_sample,
                       orig.step(v, orig.timesteps[1], x).prev_sample)
    for s in (orig, fast):
        s.set_timesteps(5)
        s.timesteps = s.timesteps.flip(0).contiguous()
    assert bits_equal(fast.step(v, fast.timesteps[2], x).prev_sample,
                       orig.step(v, orig.timesteps[2], x).prev_sample)
    assert fast.step_index == orig.step_index


# ---- no host synchronisation, and the fused op is what runs ----

_HOST_READS = ["item", "nonzero", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__",
               "__index__", "__array__"]


@contextlib.contextmanager
def _no_host_reads(monkeypatch):
    """Make every Tensor method that reads values on the host (a host synchronisation on an
    accelerator) raise, and ``.to`` / ``.copy_`` towards the CPU too."""
    def refuse(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside the loop: a host synchronisation")
        return raiser

    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        targets = [a for a in (*args, kwargs.get("device")) if isinstance(a, (str, torch.device))]
        if any(torch.device(t).type == "cpu" for t in targets):
            raise AssertionError("Tensor.to(cpu) called inside the loop: a host synchronisation")
        return real_to(self, *args, **kwargs)

    with monkeypatch.context() as m:
        for name in _HOST_READS:
            m.setattr(torch.Tensor, name, refuse(name))
        m.setattr(torch.Tensor, "to", to)
        m.setattr(torch, "nonzero", refuse("torch.nonzero"))
        m.setattr(torch, "equal", refuse("torch.equal"))
        yield


@pytest.fixture
def spy(monkeypatch):
    """Counts the fused kernel launches and makes any delegation to the original step fail."""
    calls = {"launcher": 0, "op": 0}
    real_launcher, real_op = _ops.affine_out_launcher, _ops.affine_out

    def launcher(*args, **kwargs):
        calls["launcher"] += 1
        return real_launcher(*args, **kwargs)

    def op(*args, **kwargs):
        calls["op"] += 1
        return real_op(*args, **kwargs)

    def original_step(*args, **kwargs):
        raise AssertionError("delegated to diffusers' step")

    monkeypatch.setattr(_ops, "affine_out_launcher", launcher)
    monkeypatch.setattr(_ops, "affine_out", op)
    monkeypatch.setattr(Original, "step", original_step)
    return calls


@pytest.mark.parametrize("exact", [False, True], ids=["fused", "exact"])
@pytest.mark.parametrize("begin", [None, 0, 3], ids=["no-begin-index", "begin-0", "begin-3"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_loop_has_no_host_sync_and_uses_the_fused_op(monkeypatch, spy, model_dtype, begin, exact):
    steps = 10
    fast = Fast(use_dynamic_shifting=True, shift_terminal=0.05)
    fast.exact_low_precision_rounding = exact
    fast.set_timesteps(steps, sigmas=np.linspace(1, 1 / steps, steps), mu=0.9)
    timesteps = fast.timesteps[begin or 0:]
    if begin is not None:
        fast.set_begin_index(begin)
    x, v = _noise(torch.float32), _noise(model_dtype, seed=1)
    launches = len(timesteps) * (2 if exact and model_dtype != torch.float32 else 1)
    with _no_host_reads(monkeypatch):
        for t in timesteps:
            x = fast.step(v, t, x).prev_sample
    assert spy["launcher"] + spy["op"] == launches and spy["launcher"] == launches
    assert fast.step_index == steps


def test_the_guard_catches_the_original_lookup(monkeypatch):
    """The guard above is not vacuous: the original's first step reads the device."""
    orig = Original(shift=3.0)
    orig.set_timesteps(4)
    x = _noise(torch.float32)
    with pytest.raises(AssertionError, match="host synchronisation"):
        with _no_host_reads(monkeypatch):
            orig.step(x, orig.timesteps[0], x)


def test_non_contiguous_inputs_go_through_the_checked_op(spy):
    fast = Fast(shift=3.0)
    fast.set_timesteps(3)
    orig = Original(shift=3.0)
    orig.set_timesteps(3)
    sample = torch.randn(6, 4).t()
    v = torch.randn(4, 6)
    got = fast.step(v, fast.timesteps[0], sample).prev_sample
    assert spy["op"] == 1 and spy["launcher"] == 0
    assert bits_equal(got.contiguous(), (sample.float() + (fast.sigmas[1] - fast.sigmas[0]) * v))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sigmas_on_device", [True, False])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_cuda_loop_matches_and_never_syncs(model_dtype, sigmas_on_device):
    steps = 12
    orig, fast = _pair({"shift": 3.0})
    for s in (orig, fast):
        s.set_timesteps(steps, device="cuda" if sigmas_on_device else None)
    x = _noise(torch.float32).cuda()
    want, outputs = x, []
    for t in orig.timesteps:
        outputs.append(_model(want.cpu(), t.cpu()).cuda().to(model_dtype))
        want = orig.step(outputs[-1], t, want).prev_sample
    got = x
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # Replays the original's model outputs; the fused step must not synchronise.
        for t, v in zip(fast.timesteps, outputs):
            got = fast.step(v, t, got).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert fast.step_index == steps and got.dtype == want.dtype == model_dtype
    eps = torch.finfo(model_dtype).eps
    err = ((got.double() - want.double()).abs() / want.double().abs().clamp(min=1)).max()
    assert err <= 4 * eps


# ---- errors ----

def test_bad_input_errors():
    orig, fast = _pair({"shift": 3.0})
    _set([orig, fast], 4, None)
    x = _noise(torch.float32)
    for bad in (3, True, torch.tensor(999), torch.tensor(999, dtype=torch.int32)):
        for s in (orig, fast):
            with pytest.raises(ValueError, match="integer indices"):
                s.step(x, bad, x)
    # The original passes device to Tensor.to, which also takes a dtype and converts: it
    # raises for the dtype (a TypeError) and takes a tensor's dtype; here both raise.
    for not_a_device in (torch.float16, x):
        with pytest.raises(TypeError, match="device: expected a torch.device"):
            fast.set_timesteps(4, device=not_a_device)
    for s in (orig, fast):  # shapes that do not broadcast: the original's error
        with pytest.raises(RuntimeError):
            s.step(torch.randn(3, 4), s.timesteps[0], torch.randn(2, 4))
    # Past the end of the schedule: IndexError, as in the original.
    for s in (orig, fast):
        s.set_timesteps(2)
        for t in s.timesteps:
            s.step(x, t, x)
        with pytest.raises(IndexError):
            s.step(x, s.timesteps[-1], x)
    # A float begin index: the original's IndexError (the fused step's list raised TypeError).
    for s in (orig, fast):
        s.set_timesteps(4)
        s.set_begin_index(2.0)
        with pytest.raises(IndexError):
            s.step(x, s.timesteps[2], x)
    # A timestep that is not in the schedule, with no begin index: the original's IndexError.
    for s in (orig, fast):
        s.set_timesteps(4)
        with pytest.raises(IndexError):
            s.step(x, 123.25, x)
        with pytest.raises(IndexError):
            s.step(x, torch.tensor(123.25), x)
    # Config and set_timesteps errors are the original's.
    for cls in (Original, Fast):
        with pytest.raises(ValueError, match="Only one of"):
            cls(use_karras_sigmas=True, use_beta_sigmas=True)
        with pytest.raises(ValueError, match="time_shift_type"):
            cls(time_shift_type="cubic")
        with pytest.raises(ValueError, match="mu"):
            cls(use_dynamic_shifting=True).set_timesteps(4)
        with pytest.raises(ValueError, match="same length"):
            cls().set_timesteps(4, sigmas=[1.0, 0.5])


def test_import_error_without_diffusers(monkeypatch):
    for name in [n for n in sys.modules if n == "diffusers" or n.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    spec = importlib.util.spec_from_file_location("fastflow.compat._diffusers_probe",
                                                  compat.__file__)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=r"pip install 'fastflow\[compat\]'.*diffusers"):
        spec.loader.exec_module(module)


# ---- time embeddings ----

EMBEDDING_DIMS = [1, 2, 3, 7, 33, 64, 255, 256, 320]
EMBEDDING_ARGS = list(itertools.product([False, True], [0.0, 1.0, 0.5, 1], [1, 1000.0, 0.5],
                                        [10000, 100]))


def _embedding_times():
    g = torch.Generator().manual_seed(0)
    return {
        "int64-0..999": torch.randint(0, 1000, (13,), generator=g),
        "int32": torch.randint(0, 1000, (5,), generator=g, dtype=torch.int32),
        "float32-frac": torch.rand(9, generator=g) * 1000,
        "float32-unit": torch.rand(9, generator=g),
        "float64": torch.rand(6, generator=g, dtype=torch.float64) * 1000,
        "float16": (torch.rand(4, generator=g) * 1000).half(),
        "bfloat16": torch.rand(4, generator=g).bfloat16(),
        "single": torch.tensor([500.0]),
        "empty": torch.zeros(0),
    }


@pytest.mark.parametrize("dim", EMBEDDING_DIMS)
def test_get_timestep_embedding_matches_diffusers(dim):
    for name, t in _embedding_times().items():
        for flip, shift, scale, max_period in EMBEDDING_ARGS:
            if dim // 2 == shift:
                continue
            args = (t, dim, flip, shift, scale, max_period)
            if name == "empty" and dim % 2:
                # diffusers appends the odd zero column with F.pad(emb, (0, 1, 0, 0)), which
                # PyTorch before 2.10 refuses for 0 rows ("negative output size").
                want = torch.zeros(0, dim)
            else:
                want = diffusers_embeddings.get_timestep_embedding(*args)
            got = compat.get_timestep_embedding(*args)
            assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape, name
            if want.numel():
                err = (got - want).abs().max().item()
                assert err <= 1e-6, (name, dim, flip, shift, scale, max_period, err)
    # Keyword form, diffusers' defaults (downscale_freq_shift=1, ill-posed for dim 2 and 3).
    if dim // 2 == 1:
        return
    t = torch.arange(10) * 97
    want = diffusers_embeddings.get_timestep_embedding(t, embedding_dim=dim)
    got = compat.get_timestep_embedding(timesteps=t, embedding_dim=dim)
    assert (got - want).abs().max() <= 1e-6


def test_get_timestep_embedding_gradient_matches_diffusers():
    weights = torch.randn(5, 65, generator=torch.Generator().manual_seed(0))
    grads = []
    for fn in (diffusers_embeddings.get_timestep_embedding, compat.get_timestep_embedding):
        t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], requires_grad=True)
        (fn(t, 65, True, 0, 1000.0) * weights).sum().backward()
        grads.append(t.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("args", [(320, True, 0), (256, False, 1), (33, True, 1, 1000),
                                  (7, False, 0.5, 2)])
def test_timesteps_module_matches_diffusers(args):
    ours, theirs = compat.Timesteps(*args), diffusers_embeddings.Timesteps(*args)
    assert isinstance(ours, diffusers_embeddings.Timesteps) and isinstance(ours, torch.nn.Module)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == []
    for attr in ("num_channels", "flip_sin_to_cos", "downscale_freq_shift", "scale"):
        assert getattr(ours, attr) == getattr(theirs, attr)
    t = torch.randint(0, 1000, (8,))
    assert (ours(t) - theirs(t)).abs().max() <= 1e-6
    t = torch.rand(8)
    assert (ours(t) - theirs(t)).abs().max() <= 1e-6


def test_embedding_bad_input_errors():
    t = torch.arange(4.0)
    with pytest.raises(ValueError, match="1d"):
        compat.get_timestep_embedding(t[:, None], 8)
    with pytest.raises(AssertionError, match="1d"):   # what diffusers raises
        compat.get_timestep_embedding(t[:, None], 8)
    with pytest.raises(ValueError, match="1d"):
        compat.get_timestep_embedding(torch.tensor(3.0), 8)
    with pytest.raises(ValueError, match="dim"):
        compat.get_timestep_embedding(t, 0)
    with pytest.raises(ValueError, match="downscale_freq_shift"):
        compat.get_timestep_embedding(t, 2, downscale_freq_shift=1)  # diffusers: NaN
    with pytest.raises(TypeError):
        compat.get_timestep_embedding([1.0, 2.0], 8)
    with pytest.raises(TypeError):
        compat.get_timestep_embedding(torch.tensor([True, False]), 8)
    with pytest.raises(ValueError, match="max_period"):
        compat.get_timestep_embedding(t, 8, max_period=0)
    assert math.isfinite(compat.get_timestep_embedding(t, 8).abs().max().item())


def test_a_pipeline_under_inference_mode():
    # Pipelines run whole under torch.inference_mode, set_timesteps included: its tensors are
    # then inference tensors, which have no version counter to watch (it raised).
    results = []
    for cls in (Original, Fast):
        s = cls(shift=3.0)
        with torch.inference_mode():
            s.set_timesteps(6)
            results.append(_loop(s, torch.float32, _noise(torch.float32)))
    assert bits_equal(results[1], results[0])
    s = Fast(shift=3.0)
    with torch.inference_mode():
        s.set_timesteps(6)
    assert bits_equal(_loop(s, torch.float32, _noise(torch.float32)), results[0])
