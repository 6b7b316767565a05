"""Samplers: stateless functions over the denoiser contract, and guidance wrappers."""

from collections.abc import Callable

from .ddim import StepCallback, sample_ddim
from .ddpm import sample_ddpm
from .dpm_solver import sample_dpmpp_2m
from .guidance import ClassifierFreeGuidance
from .ode import sample_euler, sample_heun

SAMPLERS: dict[str, Callable[..., object]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}
"""Name -> sampler function; the names are SampleConfig.sampler's choices (config.SamplerName)."""

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "StepCallback",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
]
