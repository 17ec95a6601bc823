"""fastflow.schedules: bit-exact parity with diffusers' FlowMatchEulerDiscreteScheduler (when
diffusers is installed; `make install` brings it), and checks that need no diffusers: known
values, monotonicity, the t grid, argument errors."""
import ast
import importlib.util
import itertools
import math
import pathlib
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastflow import schedules
from fastflow.schedules import calculate_shift, flow_match_sigmas, time_grid, uniform_time_grid

STEPS = [1, 2, 4, 20, 28, 50]
RESPACINGS = [None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]
# mu as FLUX computes it for 256, 1024 and 4096 tokens (256², 512², 1024² images), and beyond.
MUS = [calculate_shift(n) for n in (256, 1024, 4096, 6400)]


def _flux_sigmas(n):
    return np.linspace(1.0, 1 / n, n)  # what FLUX pipelines pass as `sigmas`


@pytest.fixture(scope="module")
def scheduler_cls():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.FlowMatchEulerDiscreteScheduler


def _check_parity(scheduler_cls, num_steps, sigmas=None, mu=None, **config):
    """fastflow's sigmas equal the scheduler's, bits and dtype."""
    if config.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    scheduler = scheduler_cls(**config)
    scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
    ours = flow_match_sigmas(num_steps, sigmas=sigmas, mu=mu, **config)
    expected = scheduler.sigmas
    assert ours.dtype == expected.dtype == torch.float32
    assert torch.equal(ours, expected), (
        f"num_steps={num_steps} sigmas={sigmas is not None} mu={mu} {config}\n{ours}\n{expected}")


def _configs(respacing, invert, terminal, **config):
    config.update(invert_sigmas=invert, shift_terminal=terminal)
    if respacing:
        config[respacing] = True
    return config


# ---- parity with diffusers ----

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("respacing", RESPACINGS)
@pytest.mark.parametrize("invert", [False, True], ids=["", "invert"])
@pytest.mark.parametrize("terminal", [None, 0.02], ids=["", "terminal"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_matches_diffusers(scheduler_cls, shift, terminal, invert, respacing):
    config = _configs(respacing, invert, terminal, shift=shift)
    for n, explicit in itertools.product(STEPS, [False, True]):
        if terminal and n == 1:
            continue  # diffusers gives nan there; see test_shift_terminal_one_step
        _check_parity(scheduler_cls, n, sigmas=_flux_sigmas(n) if explicit else None, **config)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("respacing", RESPACINGS)
@pytest.mark.parametrize("invert", [False, True], ids=["", "invert"])
@pytest.mark.parametrize("terminal", [None, 0.1], ids=["", "terminal"])
@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_dynamic_shift_matches_diffusers(scheduler_cls, time_shift_type, terminal, invert, respacing):
    # The static shift must be ignored under dynamic shifting: pass a non-trivial one.
    config = _configs(respacing, invert, terminal, shift=3.0, use_dynamic_shifting=True,
                      time_shift_type=time_shift_type)
    for n, mu, explicit in itertools.product(STEPS, MUS, [False, True]):
        if terminal and n == 1:
            continue  # the only sigma is 1: diffusers gives nan
        _check_parity(scheduler_cls, n, sigmas=_flux_sigmas(n) if explicit else None, mu=mu, **config)


@pytest.mark.parametrize("num_train_timesteps", [1, 50, 1000, 4321])
@pytest.mark.parametrize("shift", [1.0, 3.0, 7.5])
def test_num_train_timesteps_matches_diffusers(scheduler_cls, num_train_timesteps, shift):
    for n in STEPS:
        _check_parity(scheduler_cls, n, num_train_timesteps=num_train_timesteps, shift=shift)
        _check_parity(scheduler_cls, n, num_train_timesteps=num_train_timesteps, mu=0.8,
                      use_dynamic_shifting=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("sigmas", [
    [1.0, 0.75, 0.5, 0.25],                             # Python floats
    np.linspace(1.0, 1 / 28, 28).astype(np.float32),    # already float32
    [0.3, 0.9, 0.5, 0.1],                               # not decreasing: diffusers takes it as is
    np.linspace(1.0, 0.0, 10),                          # a sigma of 0 (1 / 0 in the dynamic shift)
    [0.5],
], ids=["list", "float32", "unordered", "zero", "single"])
@pytest.mark.parametrize("config", [
    dict(), dict(shift=3), dict(shift=2.5, shift_terminal=0.05),
    dict(use_dynamic_shifting=True), dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(use_dynamic_shifting=True, use_karras_sigmas=True),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_explicit_sigmas_match_diffusers(scheduler_cls, sigmas, config):
    mu = 1.0 if config.get("use_dynamic_shifting") else None
    _check_parity(scheduler_cls, len(sigmas), sigmas=sigmas, mu=mu, **config)
    _check_parity(scheduler_cls, None, sigmas=sigmas, mu=mu, **config)  # num_steps from sigmas
    # A tensor gives the same as the list / array it holds.
    ours = flow_match_sigmas(sigmas=torch.as_tensor(np.asarray(sigmas)), mu=mu, **config)
    assert torch.equal(ours, flow_match_sigmas(sigmas=sigmas, mu=mu, **config))


def test_quirks_match_diffusers(scheduler_cls):
    _check_parity(scheduler_cls, 20, shift=3.0, shift_terminal=0.0)      # 0 means off
    _check_parity(scheduler_cls, 20, shift=3, mu=5.0)                    # mu ignored when static
    _check_parity(scheduler_cls, 20, use_dynamic_shifting=True, mu=1)    # integer mu
    _check_parity(scheduler_cls, 20, use_dynamic_shifting=True, mu=np.float64(0.7),
                  sigmas=_flux_sigmas(20).astype(np.float32))            # numpy mu promotes to fp64
    _check_parity(scheduler_cls, 28, use_dynamic_shifting=True, mu=-0.5)  # negative mu
    config = dict(base_shift=0.7, max_shift=2.0, base_image_seq_len=64, max_image_seq_len=1024)
    _check_parity(scheduler_cls, 20, shift=2.0, **config)                 # no effect on sigmas


def test_a_whole_scheduler_config_can_be_passed(scheduler_cls):
    # The config's stochastic_sampling and its own "_" entries raised TypeError; a dynamic
    # shift rejected a static shift it ignores; a 0-d tensor mu was refused.
    scheduler = scheduler_cls(shift=3.0, stochastic_sampling=True)
    scheduler.set_timesteps(6)
    config = {**scheduler.config, "_class_name": "FlowMatchEulerDiscreteScheduler"}
    assert torch.equal(flow_match_sigmas(6, **config), scheduler.sigmas)
    with pytest.raises(TypeError, match="unexpected keyword argument 'use_karas_sigmas'"):
        flow_match_sigmas(6, use_karas_sigmas=True)
    _check_parity(scheduler_cls, 6, use_dynamic_shifting=True, mu=1.0, shift=0.0)
    _check_parity(scheduler_cls, 6, use_dynamic_shifting=True, mu=torch.tensor(0.7))
    _check_parity(scheduler_cls, 6, shift=3.0, shift_terminal=False)     # off, as 0 and None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("config", [dict(use_dynamic_shifting=True, mu=-800.0),
                                    dict(shift=1e-40)], ids=["mu", "shift"])
def test_configs_whose_sigmas_are_nan_are_refused(scheduler_cls, config):
    mu = config.pop("mu", None)
    scheduler = scheduler_cls(**config)
    scheduler.set_timesteps(4, mu=mu)
    assert scheduler.sigmas.isnan().any()
    with pytest.raises(ValueError, match="sigmas of this config are NaN from step 0"):
        flow_match_sigmas(4, mu=mu, **config)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=100, deadline=None, derandomize=True)   # the same draws in every CI run
@given(num_steps=st.integers(1, 60), explicit=st.booleans(), shift=st.floats(0.25, 8.0),
       dynamic=st.booleans(), mu=st.floats(0.05, 3.0), linear=st.booleans(),
       terminal=st.one_of(st.none(), st.floats(0.0, 0.5)), respacing=st.sampled_from(RESPACINGS),
       invert=st.booleans(), num_train_timesteps=st.sampled_from([1, 100, 1000]))
def test_random_configs_match_diffusers(scheduler_cls, num_steps, explicit, shift, dynamic, mu,
                                        linear, terminal, respacing, invert, num_train_timesteps):
    config = _configs(respacing, invert, terminal, shift=shift, use_dynamic_shifting=dynamic,
                      time_shift_type="linear" if linear else "exponential",
                      num_train_timesteps=num_train_timesteps)
    if respacing == "use_beta_sigmas":
        pytest.importorskip("scipy")
    sigmas, mu = (_flux_sigmas(num_steps) if explicit else None), (mu if dynamic else None)
    scheduler = scheduler_cls(**config)
    try:
        scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
        refused = scheduler.sigmas.isnan().any()   # a stretch of a last sigma of 1, say
    except ValueError:   # math.log(0) of an exponential respacing ending at 0, say
        refused = True
    if refused:
        with pytest.raises(ValueError):
            flow_match_sigmas(num_steps, sigmas=sigmas, mu=mu, **config)
    else:
        assert torch.equal(flow_match_sigmas(num_steps, sigmas=sigmas, mu=mu, **config),
                           scheduler.sigmas)


def test_shift_terminal_one_step(scheduler_cls):
    # The only sigma is 1, so the stretch divides 0 by 0: diffusers returns nan, we raise.
    scheduler = scheduler_cls(shift_terminal=0.1)
    with np.errstate(all="ignore"):
        scheduler.set_timesteps(1)
    assert torch.isnan(scheduler.sigmas[0])
    with pytest.raises(ValueError, match="shift_terminal"):
        flow_match_sigmas(1, shift_terminal=0.1)


@pytest.mark.parametrize("kwargs", [
    dict(num_steps=4, sigmas=[1.0, 0.5]),
    dict(num_steps=4, use_dynamic_shifting=True),
    dict(num_steps=4, use_karras_sigmas=True, use_beta_sigmas=True),
    dict(num_steps=4, time_shift_type="cosine"),
], ids=["length", "no-mu", "two-respacings", "time-shift-type"])
def test_diffusers_errors_are_value_errors_here_too(scheduler_cls, kwargs):
    kwargs = dict(kwargs)
    num_steps, sigmas = kwargs.pop("num_steps"), kwargs.pop("sigmas", None)
    with pytest.raises(ValueError):
        scheduler_cls(**kwargs).set_timesteps(num_steps, sigmas=sigmas)
    with pytest.raises(ValueError):
        flow_match_sigmas(num_steps, sigmas=sigmas, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_matches_diffusers(scheduler_cls):
    scheduler = scheduler_cls(use_dynamic_shifting=True, shift_terminal=0.1)
    scheduler.set_timesteps(28, device="cuda", mu=1.15)
    ours = flow_match_sigmas(28, mu=1.15, use_dynamic_shifting=True, shift_terminal=0.1, device="cuda")
    assert ours.device.type == "cuda" and torch.equal(ours, scheduler.sigmas)


def _diffusers_calculate_shift():
    """diffusers' FLUX calculate_shift; its module imports transformers, so if that fails, the
    function is compiled alone from the installed source."""
    try:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift as theirs
        return theirs
    except ImportError:
        pass
    spec = importlib.util.find_spec("diffusers")
    source = pathlib.Path(spec.submodule_search_locations[0], "pipelines", "flux", "pipeline_flux.py")
    tree = ast.parse(source.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_shift")
    namespace = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["calculate_shift"]


def test_calculate_shift_matches_diffusers(scheduler_cls):
    theirs = _diffusers_calculate_shift()
    for seq_len in (1, 256, 1000, 1024, 4096, 6400, 16384):
        assert calculate_shift(seq_len) == theirs(seq_len)
        ours = calculate_shift(seq_len, 64, 1024, 0.3, 2.0)
        assert ours == theirs(seq_len, 64, 1024, 0.3, 2.0) and type(ours) is float


# ---- without diffusers ----

def test_calculate_shift_formula():
    # mu = m L + b with m = (max_shift - base_shift) / (max_seq - base_seq), b = base_shift - m base_seq.
    m = (1.15 - 0.5) / (4096 - 256)
    for seq_len in (256, 1024, 4096):
        assert calculate_shift(seq_len) == seq_len * m + (0.5 - m * 256)
    assert calculate_shift(256) == pytest.approx(0.5) and calculate_shift(4096) == pytest.approx(1.15)
    with pytest.raises(ValueError, match="max_seq_len"):
        calculate_shift(100, base_seq_len=256, max_seq_len=256)
    with pytest.raises(TypeError, match="image_seq_len must be a real number, got 'a'"):
        calculate_shift("a")
    with pytest.raises(ValueError, match="max_shift"):
        calculate_shift(1024, max_shift=float("nan"))


def test_known_values():
    # linspace(1000, 1, 4) / 1000 in float64, then float32, then the final 0.
    assert torch.equal(flow_match_sigmas(4), torch.tensor([1.0, 0.667, 0.334, 0.001, 0.0]))
    # Static shift without explicit sigmas: the last sigma is shifted twice.
    def once(s):
        return 3 * s / (1 + 2 * s)
    last = flow_match_sigmas(10, shift=3.0)[-2].item()
    assert last == pytest.approx(once(once(0.001)), rel=1e-6)
    assert last != pytest.approx(once(0.001), rel=1e-3)
    # Dynamic shift of the FLUX grid: e^mu / (e^mu + 1 / sigma - 1).
    mu, n = calculate_shift(4096), 28
    grid = np.linspace(1.0, 1 / n, n)
    expected = np.exp(mu) / (np.exp(mu) + 1 / grid - 1)
    ours = flow_match_sigmas(n, sigmas=grid, mu=mu, use_dynamic_shifting=True)
    np.testing.assert_allclose(ours[:-1].numpy(), expected, rtol=1e-6)
    # shift_terminal: the last sigma before the final 0 is the terminal value.
    assert flow_match_sigmas(20, shift=3.0, shift_terminal=0.05)[-2].item() == pytest.approx(0.05)


@pytest.mark.parametrize("config", [
    dict(), dict(shift=3.0), dict(shift=3.0, shift_terminal=0.02),
    dict(use_dynamic_shifting=True, mu=1.15),
    dict(use_dynamic_shifting=True, mu=0.5, time_shift_type="linear"),
    dict(use_karras_sigmas=True, shift=3.0), dict(use_exponential_sigmas=True),
    dict(use_dynamic_shifting=True, mu=1.15, use_beta_sigmas=True),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_decreasing_to_zero_and_time_grid(config):
    if config.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    for n in STEPS[config.get("shift_terminal") is not None:]:  # 1 step: nothing to stretch
        sigmas = flow_match_sigmas(n, **config)
        assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32
        assert sigmas[-1] == 0 and sigmas[0] <= 1 and bool((sigmas[1:] < sigmas[:-1]).all())
        t = time_grid(sigmas)
        assert t.dtype == torch.float32 and t[-1] == 1 and t[0] >= 0
        assert bool((t[1:] > t[:-1]).all())
        if "use_karras_sigmas" not in config and "use_exponential_sigmas" not in config:
            assert t[0] == 0  # these start at sigma = 1 exactly


def test_invert_sigmas_counts_up():
    sigmas = flow_match_sigmas(10, shift=3.0, invert_sigmas=True)
    assert sigmas[0] == 0 and sigmas[-1] == 1 and bool((sigmas[1:] > sigmas[:-1]).all())
    plain = flow_match_sigmas(10, shift=3.0)
    assert torch.equal(sigmas[:-1], 1.0 - plain[:-1])


def test_device_and_grids():
    assert flow_match_sigmas(4, device="cpu").device.type == "cpu"
    assert flow_match_sigmas(4, device="meta").device.type == "meta"
    # Tensor.to took a dtype or a tensor as well, and converted: fp16 or bool "sigmas".
    for not_a_device in (torch.float16, True, torch.zeros(2)):
        with pytest.raises(TypeError, match="device: expected a torch.device or a string"):
            flow_match_sigmas(4, device=not_a_device)
    assert torch.equal(uniform_time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert uniform_time_grid(3, dtype=torch.float64).dtype == torch.float64
    assert time_grid([1.0, 0.5, 0.0]).tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"sigmas: expected a 1-D grid, got shape \(2, 2\)"):
        time_grid(torch.ones(2, 2))
    bf16 = torch.tensor([1.0, 0.5, 0.25], dtype=torch.bfloat16)
    assert torch.equal(flow_match_sigmas(sigmas=bf16), flow_match_sigmas(sigmas=[1.0, 0.5, 0.25]))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(), ValueError, "num_steps, sigmas"),
    (dict(num_steps=0), ValueError, "num_steps must be >= 1"),
    (dict(num_steps=2.5), TypeError, "num_steps must be an int"),
    (dict(num_steps=True), TypeError, "num_steps must be an int"),
    (dict(num_steps=4, sigmas=[1.0, 0.5]), ValueError, "same length as num_steps"),
    (dict(sigmas=[]), ValueError, "non-empty"),
    (dict(sigmas=[[1.0, 0.5]]), ValueError, "1-D"),
    (dict(sigmas="abc"), TypeError, "sigmas must be a 1-D sequence"),
    (dict(num_steps=4, use_dynamic_shifting=True), ValueError, "mu must be passed"),
    (dict(num_steps=4, use_dynamic_shifting=True, mu="1"), TypeError, "mu must be a real number"),
    (dict(num_steps=4, use_dynamic_shifting=True, mu=0.0, time_shift_type="linear"), ValueError,
     "mu must be > 0"),
    (dict(num_steps=4, time_shift_type="cosine"), ValueError, "time_shift_type"),
    (dict(num_steps=4, use_karras_sigmas=True, use_exponential_sigmas=True), ValueError,
     "only one of .*use_karras_sigmas, use_exponential_sigmas"),
    (dict(num_steps=4, shift=0.0), ValueError, "shift must be > 0"),
    (dict(num_steps=4, shift_terminal=True), TypeError, "shift_terminal must be a real number"),
    # Not finite: NaN passed the range checks, and every sigma came back NaN.
    (dict(num_steps=4, shift=float("nan")), ValueError, "shift must be finite"),
    (dict(num_steps=4, shift=float("inf")), ValueError, "shift must be finite"),
    (dict(num_steps=4, use_dynamic_shifting=True, mu=float("nan")), ValueError,
     "mu must be finite"),
    (dict(num_steps=4, use_dynamic_shifting=True, mu=-float("inf")), ValueError,
     "mu must be finite"),
    (dict(num_steps=4, shift_terminal=float("nan")), ValueError, "shift_terminal must be finite"),
    (dict(num_steps=4, num_train_timesteps=0), ValueError, "num_train_timesteps must be >= 1"),
    (dict(num_steps=4, shift_terminal=1.0), ValueError, r"shift_terminal must be in \[0, 1\)"),
    (dict(num_steps=4, shift_terminal=-0.1), ValueError, "shift_terminal must be >= 0"),
    (dict(sigmas=[1.0, 0.0], use_exponential_sigmas=True), ValueError,
     "use_exponential_sigmas needs sigmas > 0"),
], ids=lambda v: str(v)[:40] if isinstance(v, (dict, str)) else "")
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        flow_match_sigmas(**kwargs)


def test_uniform_time_grid_bad_steps():
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        uniform_time_grid(0)
    with pytest.raises(TypeError, match="dtype: expected a floating torch.dtype"):
        uniform_time_grid(3, dtype=torch.int64)   # would be [0, 0, 0, 1]
    with pytest.raises(TypeError, match="dtype: expected a floating torch.dtype"):
        uniform_time_grid(3, dtype="float32")
    with pytest.raises(TypeError, match="sigmas: expected a 1-D grid of numbers, got 'abc'"):
        time_grid("abc")


def test_beta_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ImportError, match=r"use_beta_sigmas=True needs scipy \(pip install scipy\)"):
        flow_match_sigmas(4, use_beta_sigmas=True)
    assert flow_match_sigmas(4).shape == (5,)  # the other branches never import scipy


def test_public_names():
    assert set(schedules.__all__) == {"calculate_shift", "flow_match_sigmas", "time_grid",
                                      "uniform_time_grid"}
    assert math.isclose(schedules.calculate_shift(4096), 1.15)
