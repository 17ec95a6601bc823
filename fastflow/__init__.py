"""fastflow: fused kernels for flow-matching generative models.

    >>> import torch, fastflow
    >>> x1 = torch.randn(8, 3, 16, 16); x0 = torch.randn_like(x1); t = torch.rand(8)
    >>> x_t, u_t = fastflow.interpolate(x0, x1, t)            # one pass instead of five
    >>> fastflow.backends()                                   # which kernels can run here
"""
import torch  # noqa: F401  (the compiled extension needs torch loaded first)

from . import _ops, embeddings, nn, paths, reference, schedules
from ._backends import BackendStatus, backends
from .conversions import convert
from .embeddings import fourier_embedding, timestep_embedding
from .distributed import sample_distributed
from .flow_map import flow_map_loss, sample_flow_map
from .interpolation import interpolate
from .losses import flow_matching_loss
from .matcher import FlowMatcher, FlowSample
from .sampling import Sampler, sample

__version__ = "0.1.0"
__all__ = ["BackendStatus", "FlowMatcher", "FlowSample", "backends", "convert", "embeddings",
           "flow_map_loss", "flow_matching_loss", "fourier_embedding", "interpolate", "nn", "paths",
           "reference", "sample", "sample_distributed", "sample_flow_map", "Sampler", "schedules",
           "timestep_embedding"]
