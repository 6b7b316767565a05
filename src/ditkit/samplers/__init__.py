"""Samplers: stateless functions over the denoiser contract, and guidance wrappers."""

from collections.abc import Callable

from .ddim import StepCallback, sample_ddim
from .ddpm import sample_ddpm
from .diffusers_adapter import sample_with_scheduler
from .dpm_solver import sample_dpmpp_2m, sample_dpmpp_3m
from .guidance import ClassifierFreeGuidance
from .ode import sample_euler, sample_heun
from .sde import sample_euler_maruyama

SAMPLERS: dict[str, Callable[..., object]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "euler_maruyama": sample_euler_maruyama,
}
"""Name -> sampler function; the names are SampleConfig.sampler's choices (config.SamplerName)."""

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "StepCallback",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_euler_maruyama",
    "sample_euler",
    "sample_heun",
    "sample_with_scheduler",
]
