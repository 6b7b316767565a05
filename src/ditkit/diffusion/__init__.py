"""Noise processes, the training loss and the network -> denoiser conversion."""

from .denoiser import ClampDenoised, Denoiser, ModelDenoiser
from .loss import diffusion_loss
from .process import (
    DiscreteVP,
    LinearFlow,
    NoiseProcess,
    build_process,
    eps_to_x0,
    linear_betas,
    prediction_target,
    prediction_to_x0,
    v_to_x0,
    velocity_to_x0,
    x0_to_eps,
    x0_to_prediction,
)

__all__ = [
    "ClampDenoised",
    "Denoiser",
    "ModelDenoiser",
    "diffusion_loss",
    "DiscreteVP",
    "NoiseProcess",
    "build_process",
    "eps_to_x0",
    "linear_betas",
    "x0_to_eps",
    "v_to_x0",
    "prediction_target",
    "prediction_to_x0",
    "LinearFlow",
    "velocity_to_x0",
    "x0_to_prediction",
]
