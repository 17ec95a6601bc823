"""Drop-ins for diffusers' FlowMatchEulerDiscreteScheduler, get_timestep_embedding and Timesteps.

    >>> from fastflow.compat.diffusers import FlowMatchEulerDiscreteScheduler
    >>> pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

The scheduler subclasses diffusers' own (0.42), so its config, ``from_config`` /
``from_pretrained`` / ``save_pretrained``, ``set_timesteps``, ``scale_noise``, ``.sigmas``,
``.timesteps``, ``step_index`` / ``begin_index`` and ``order`` are the original's (plus an
``init_noise_sigma`` of 1, which the original lacks), and
``isinstance(s, diffusers.FlowMatchEulerDiscreteScheduler)`` holds. What fastflow changes:

* ``step`` (the deterministic Euler step, every call of a denoising loop) is one fused pass,
  ``prev_sample = sample + dt * model_output`` by ``fastflow::affine_out``: one read of each
  input, one write of the output, math in fp32, ``dt`` read on the device from a coefficient
  table built once per schedule (no ``.item()``). The original makes four passes (upcast of the
  sample, product, sum, downcast) with fp32 temporaries. The table follows ``sigmas``: a new
  tensor, or an in-place edit of it, rebuilds it at the next step; an edit that PyTorch does not
  count as one (through ``.data`` or ``.numpy()``, or of an inference tensor) is not seen, where
  the original reads ``sigmas`` anew at every step.
* No host synchronisation anywhere in the normal loop. The original finds the first step's index
  with ``(timesteps == t).nonzero()`` and ``.item()``, which waits for the device; later steps
  use its counter. Here the index comes from host metadata only (see ``_init_step_index``): the
  begin index if set, else, for ``t`` taken from ``scheduler.timesteps`` (what every pipeline
  passes: ``for t in timesteps``), the position of that view in the schedule's storage, mapped
  through a host-side copy of the original's lookup made in ``set_timesteps``; Python numbers
  and CPU tensors are looked up in that host copy. Only a ``t`` that is a *separate* accelerator
  tensor falls back to the original's lookup, and with it to one synchronisation. Once the
  counter is set, ``timestep`` is ignored, exactly as in the original.

Exactness (CPU, bit for bit, tested): with an fp32 ``model_output`` (any sample dtype) the fused
step equals the original's ``(sample.float() + dt * model_output).to(model_output.dtype)``
exactly. With a bf16 / fp16 ``model_output`` the original rounds twice: ``dt * model_output``
is a bf16 tensor (dt itself is first rounded to bf16 by the type promotion of
``0-d fp32 tensor * bf16 tensor``), then the fp32 sum is rounded to bf16. A drop-in must give
the original's images, so by default the step reproduces that in two fused passes (the product
into a bf16 / fp16 buffer, then the sum), still with no synchronisation. Set
``scheduler.exact_low_precision_rounding = False`` for one pass that adds the product unrounded:
each step then differs from the original by at most the rounding of that product (within one
bf16 / fp16 ulp of the result for all but cancelling elements), and is the more accurate of the
two.
The output dtype is always ``model_output.dtype``, as in the original.

Delegated to diffusers, unchanged: ``stochastic_sampling=True``, ``per_token_timesteps``,
fp64 streams (the original rounds an fp64 sample to fp32 first), differing shapes (broadcasting)
or devices, inputs that need autograd, and step indices outside the schedule (the original's
negative indexing and IndexError). ``set_timesteps`` is the original's (its numpy arithmetic is
the reference that :func:`fastflow.schedules.flow_match_sigmas` reproduces bit for bit; it runs
once per generation, on the host); it is computed on the CPU and then moved to ``device``, which
gives the same bits and lets the host keep what ``step`` needs. ``scale_noise`` (once per img2img
generation) is the original's.

``get_timestep_embedding`` / ``Timesteps`` are diffusers' with fastflow's fused sinusoid kernel
underneath: fp32 math and result as in diffusers (an fp64 t is rounded to fp32 first), equal
within an ulp of sin / cos. Arguments are checked where diffusers would compute on regardless:
``embedding_dim`` must be a positive integer, ``max_period`` a positive number, ``timesteps`` a
1-D tensor of numbers (not bools), ``scale`` and ``downscale_freq_shift`` finite numbers, and an
ill-posed ``downscale_freq_shift == embedding_dim // 2`` raises instead of returning NaN. A
``scale`` tensor that requires grad is refused: the fused kernel takes it as a constant, where
diffusers would differentiate through it. Each raises a ValueError or TypeError (fastflow's own
names: ``t`` for timesteps, ``dim`` for embedding_dim); timesteps of another rank raise a
ValueError that is also the AssertionError diffusers raises.
"""
import numbers

import torch

from . import require

require("diffusers", "fastflow.compat.diffusers")

from diffusers.models import embeddings as _diffusers_embeddings  # noqa: E402
from diffusers.schedulers import scheduling_flow_match_euler_discrete as _diffusers_fm  # noqa: E402

from .. import _ops  # noqa: E402
from .._checks import as_device  # noqa: E402
from ..embeddings import timestep_embedding as _timestep_embedding  # noqa: E402

FlowMatchEulerDiscreteSchedulerOutput = _diffusers_fm.FlowMatchEulerDiscreteSchedulerOutput

__all__ = ["FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteSchedulerOutput",
           "Timesteps", "get_timestep_embedding"]

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_UNKNOWN = object()  # "the index cannot be found without a synchronisation"


class FlowMatchEulerDiscreteScheduler(_diffusers_fm.FlowMatchEulerDiscreteScheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler with a fused, synchronisation-free ``step``.

    Same constructor arguments, defaults, config and outputs as the original (see the module
    docstring for what is fused and what is delegated). Build it from a pipeline's scheduler::

        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    Attributes:
        exact_low_precision_rounding: True (default): two fused passes that reproduce the
            original's intermediate rounding of ``dt * model_output`` bit for bit. False: one
            fused pass, fp32 math, one rounding to a bf16 / fp16 ``model_output``'s dtype
            (faster and more accurate, not bit-equal). No effect on fp32 model outputs, which
            are always bit-exact in one pass. Settable per instance; not part of the config.
    """

    exact_low_precision_rounding = True
    # The original defines none (flow-matching pipelines never scale their initial noise); a
    # generic pipeline that multiplies by it gets 1: the flow starts from unscaled N(0, I).
    init_noise_sigma = 1.0

    # Host-side state (class defaults, so that ConfigMixin.__getattr__ is never consulted):
    # the timesteps tensor the lookup was made for, its version counter, its host copy and, per
    # position, the index the original's index_for_timestep returns for the value there.
    _ff_timesteps = None
    _ff_timesteps_version = None
    _ff_host_timesteps = None
    _ff_index_of_position = None
    # Step coefficients: the sigmas tensor they come from, its version, {key: table}.
    _ff_sigmas = None
    _ff_sigmas_version = None
    _ff_tables = None

    # ---- schedule ----

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        """The original's ``set_timesteps`` (same arguments, same ``.sigmas`` / ``.timesteps``
        bits), computed on the CPU and then moved to ``device``; the host keeps a copy of the
        timestep lookup so that ``step`` never has to read the device."""
        device = as_device(device)   # Tensor.to would also take a dtype, and convert
        super().set_timesteps(num_inference_steps, device=None, sigmas=sigmas, mu=mu,
                              timesteps=timesteps)
        self._remember_timesteps(self.timesteps)
        if device is not None:
            self.timesteps = self.timesteps.to(device)
            self.sigmas = self.sigmas.to(device)
            self._ff_timesteps = self.timesteps
            self._ff_timesteps_version = _version(self.timesteps)

    def _remember_timesteps(self, host):
        """Record, for the CPU tensor `host` (which is, or equals, ``self.timesteps``), the index
        the original's ``index_for_timestep`` gives the value at each position: the second
        match if the value occurs more than once, else the only one; None for a value with no
        match (NaN), where the original raises."""
        values = host.tolist()
        matches = {}
        for position, value in enumerate(values):
            if value == value:  # NaN matches nothing (nor does it in the original)
                matches.setdefault(value, []).append(position)
        index_of_position = []
        for value in values:
            found = matches.get(value) if value == value else None
            index_of_position.append(None if not found else found[1 if len(found) > 1 else 0])
        self._ff_timesteps = self.timesteps
        self._ff_timesteps_version = _version(self.timesteps)
        self._ff_host_timesteps = host
        self._ff_index_of_position = index_of_position

    def _timestep_lookup(self):
        """(host copy of the timesteps, index per position), or None when ``self.timesteps``
        changed since and lives on an accelerator (it cannot be read without a sync)."""
        ts = self.timesteps
        if not isinstance(ts, torch.Tensor) or ts.dim() != 1:
            return None
        if ts is not self._ff_timesteps or _version(ts) != self._ff_timesteps_version:
            if ts.device.type != "cpu":
                return None
            self._remember_timesteps(ts)  # replaced or edited in place by the caller, on the host
        return self._ff_host_timesteps, self._ff_index_of_position

    def _position_in_schedule(self, timestep):
        """The position in ``self.timesteps`` of which `timestep` is a view, or None. Uses
        storage metadata only, never the values."""
        ts = self.timesteps
        if (timestep.numel() != 1 or timestep.dtype != ts.dtype or timestep.device != ts.device
                or ts.numel() == 0):
            return None
        try:
            if timestep.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr():
                return None
        except (RuntimeError, NotImplementedError):  # tensors without storage (fake, functional)
            return None
        offset, stride = timestep.storage_offset() - ts.storage_offset(), ts.stride(0)
        if stride <= 0 or offset % stride:
            return None
        position = offset // stride
        return position if 0 <= position < ts.shape[0] else None

    def _init_step_index(self, timestep):
        """The original's first-step index (``begin_index``, else the index of ``timestep`` in
        the schedule, the second match if it occurs twice), found without reading the device
        (see the module docstring). The original's lookup is the fallback."""
        if self.begin_index is not None:
            self._step_index = self._begin_index
            return
        index = _UNKNOWN
        lookup = self._timestep_lookup()
        if lookup is not None:
            host, index_of_position = lookup
            if isinstance(timestep, torch.Tensor):
                position = self._position_in_schedule(timestep)
                if position is not None:
                    found = index_of_position[position]
                    index = _UNKNOWN if found is None else found
                elif timestep.device.type == "cpu":
                    index = self.index_for_timestep(timestep, host)
            else:  # a Python / numpy number: compared on the host, as the device would
                index = self.index_for_timestep(timestep, host)
        if index is _UNKNOWN:
            super()._init_step_index(timestep)
        else:
            self._step_index = index

    # ---- step ----

    def _coefficients(self, model_dtype, device, exact):
        """The per-step coefficient tensors on `device`, built once per schedule from
        ``self.sigmas`` with device operations: a list of N ``[1, 1, 2]`` rows ``[[1, dt_i]]``
        (or, in exact mode, ``[1, 1, 1]`` rows ``[[dt_i]]``), dt_i = sigma_{i+1} - sigma_i in
        fp32 as the original subtracts them, rounded to the model's dtype as the original's
        ``dt * model_output`` rounds it. Views of one device tensor, so that a step indexes a
        list, not a tensor (an op of a few microseconds)."""
        tables, sigmas = self._tables(), self.sigmas
        key = (model_dtype, device, exact)
        table = tables.get(key)
        if table is None:
            dt = sigmas[1:] - sigmas[:-1]
            if model_dtype != torch.float32:
                dt = dt.to(model_dtype).to(torch.float32)
            if exact:
                table = dt.reshape(-1, 1, 1, 1)
            else:
                table = torch.stack([torch.ones_like(dt), dt], dim=-1).reshape(-1, 1, 1, 2)
            table = list(_to_device(table.contiguous(), device).unbind(0))
            tables[key] = table
        return table

    def _tables(self):
        """The coefficient cache, emptied when ``self.sigmas`` was replaced or edited."""
        sigmas = self.sigmas
        if sigmas is not self._ff_sigmas or _version(sigmas) != self._ff_sigmas_version:
            self._ff_sigmas, self._ff_sigmas_version, self._ff_tables = sigmas, _version(sigmas), {}
        return self._ff_tables

    def _sum_coefficients(self, device):
        """``[[[1, 1]]]`` on `device`: the second pass of the exact mode, sample + product."""
        tables, key = self._tables(), ("sum", device)
        if key not in tables:
            tables[key] = torch.ones(1, 1, 2, dtype=torch.float32, device=device)
        return tables[key]

    def _fusable(self, model_output, sample):
        """Whether the fused step reproduces the original for these arguments."""
        sigmas = self.sigmas
        return (type(model_output) is torch.Tensor and type(sample) is torch.Tensor  # no subclasses
                and model_output.dtype in _FUSED_DTYPES and sample.dtype in _FUSED_DTYPES
                and model_output.shape == sample.shape and model_output.device == sample.device
                and not (torch.is_grad_enabled()
                         and (model_output.requires_grad or sample.requires_grad))
                and not _ops.transforming()  # torch.func, forward AD: the original's ops
                and isinstance(sigmas, torch.Tensor) and sigmas.dim() == 1
                and sigmas.dtype == torch.float32
                and (sigmas.device == sample.device or sigmas.device.type == "cpu"))

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
             s_noise=1.0, generator=None, per_token_timesteps=None, return_dict=True):
        """One Euler step, ``prev_sample = sample + (sigma_next - sigma) * model_output``, fused
        and without host synchronisation; arguments, output type and dtype (that of
        ``model_output``) as in diffusers. ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` are
        accepted and unused, as in the original; ``stochastic_sampling`` and
        ``per_token_timesteps`` run the original's code."""
        if (per_token_timesteps is not None or self.config.stochastic_sampling
                or not self._fusable(model_output, sample)):
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin,
                                s_tmax=s_tmax, s_noise=s_noise, generator=generator,
                                per_token_timesteps=per_token_timesteps, return_dict=return_dict)
        if (isinstance(timestep, int) or isinstance(timestep, torch.IntTensor)
                or isinstance(timestep, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                " `FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep.")
        if self.step_index is None:
            self._init_step_index(timestep)

        low = model_output.dtype in _LOW_PRECISION
        exact = bool(self.exact_low_precision_rounding) and low
        table = self._coefficients(model_output.dtype, sample.device, exact)
        index = self._step_index
        # Anything but an index into the schedule (past its end; a float begin index): the
        # original's indexing, errors included.
        if not (isinstance(index, numbers.Integral) and 0 <= index < len(table)):
            return super().step(model_output, timestep, sample, return_dict=return_dict)

        prev_sample = torch.empty_like(sample, dtype=model_output.dtype)
        if exact:
            product = torch.empty_like(model_output)
            _affine_out([model_output], table[index], product)
            _affine_out([sample, product], self._sum_coefficients(sample.device), prev_sample)
        else:
            _affine_out([sample, model_output], table[index], prev_sample)
        self._step_index += 1

        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


def _version(tensor):
    """The tensor's version counter, which in-place edits bump; None for an inference tensor
    (made under torch.inference_mode, say by set_timesteps there), which has none: its edits
    in place go unseen, its replacement does not."""
    return None if tensor.is_inference() else tensor._version


def _affine_out(inputs, coeffs, out):
    """fastflow::affine_out, straight to the kernel when every stream is contiguous (checked by
    the caller: same element count and device, float streams, fp32 coefficients [1, 1, K])."""
    if all(x.is_contiguous() for x in inputs) and out.is_contiguous():
        mixed = len({x.dtype for x in inputs} | {out.dtype}) > 1
        _ops.affine_out_launcher(out.device, mixed)(inputs, coeffs, [out])
    else:
        _ops.affine_out(inputs, coeffs, [out])


def _to_device(table, device):
    """`table` on `device`; from the CPU to a CUDA device through pinned memory, asynchronously."""
    if table.device == device:
        return table
    if table.device.type == "cpu" and device.type == "cuda":
        try:
            return table.pin_memory().to(device, non_blocking=True)
        except RuntimeError:
            pass
    return table.to(device)


# ---- time embeddings ----

class _RankError(ValueError, AssertionError):
    """Timesteps that are not 1-D: a ValueError, and the AssertionError that diffusers raises."""


def get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                           scale=1, max_period=10000):
    """diffusers' ``get_timestep_embedding``, same signature, on fastflow's fused kernel.

    ``[sin(a), cos(a)]`` (``[cos, sin]`` with ``flip_sin_to_cos``) of
    ``a = scale * t * exp(-ln(max_period) j / (embedding_dim // 2 - downscale_freq_shift))``, a
    zero column when ``embedding_dim`` is odd; fp32 math and an fp32 [N, embedding_dim] result
    as in diffusers, differentiable in a floating ``timesteps``.
    """
    if isinstance(timesteps, torch.Tensor) and timesteps.dim() != 1:
        raise _RankError(f"get_timestep_embedding: timesteps should be a 1d-array, got shape "
                         f"{tuple(timesteps.shape)}")
    if isinstance(timesteps, torch.Tensor) and timesteps.dtype == torch.float64:
        timesteps = timesteps.float()  # diffusers computes in fp32 whatever t is
    return _timestep_embedding(timesteps, embedding_dim, max_period=max_period,
                               flip_sin_to_cos=flip_sin_to_cos,
                               downscale_freq_shift=downscale_freq_shift, scale=scale)


class Timesteps(_diffusers_embeddings.Timesteps):
    """diffusers' ``Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift, scale=1)``
    module (a subclass: same attributes, no parameters, ``isinstance`` holds) whose forward is
    the fused :func:`get_timestep_embedding`."""

    def forward(self, timesteps):
        return get_timestep_embedding(timesteps, self.num_channels,
                                      flip_sin_to_cos=self.flip_sin_to_cos,
                                      downscale_freq_shift=self.downscale_freq_shift,
                                      scale=self.scale)
