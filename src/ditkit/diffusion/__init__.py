"""Noise processes, the training loss and the network -> denoiser conversion."""

from .denoiser import Denoiser, ModelDenoiser
from .loss import diffusion_loss
from .process import DiscreteVP, NoiseProcess, build_process, eps_to_x0, linear_betas, x0_to_eps

__all__ = [
    "Denoiser",
    "ModelDenoiser",
    "diffusion_loss",
    "DiscreteVP",
    "NoiseProcess",
    "build_process",
    "eps_to_x0",
    "linear_betas",
    "x0_to_eps",
]
