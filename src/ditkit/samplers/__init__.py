"""Samplers: stateless functions over the denoiser contract, and guidance wrappers."""

from .ddim import StepCallback, sample_ddim
from .guidance import ClassifierFreeGuidance

SAMPLERS = {"ddim": sample_ddim}
"""Name -> sampler function; the names are SampleConfig.sampler's choices."""

__all__ = ["ClassifierFreeGuidance", "SAMPLERS", "StepCallback", "sample_ddim"]
