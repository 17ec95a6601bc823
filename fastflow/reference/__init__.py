"""Plain PyTorch versions of every fastflow op: the oracle of the tests and the fallback backend.

Written for reading, not speed: each function states its formula in eager PyTorch.
"""
from ._affine import affine, affine_dot, affine_sqnorm
from ._conversions import convert
from ._embeddings import (adm_timestep_embedding, fourier_embedding, sinusoid,
                          sinusoid_backward, timestep_embedding)
from ._flow_map import flow_map_loss
from ._interpolation import interpolate
from ._losses import flow_matching_loss
from ._noise import gaussian
from ._sampling import sample

__all__ = ["adm_timestep_embedding", "affine", "affine_dot", "affine_sqnorm", "convert",
           "flow_map_loss", "flow_matching_loss", "fourier_embedding", "gaussian", "interpolate", "sample",
           "sinusoid", "sinusoid_backward", "timestep_embedding"]
