"""Training objective: MSE to the prediction target (noise, as L_simple of Ho et al. 2020, or v) at
uniformly drawn timesteps."""

from __future__ import annotations

import torch
from torch import nn

from .process import NoiseProcess, prediction_target

__all__ = ["diffusion_loss"]


def diffusion_loss(
    model: nn.Module,
    process: NoiseProcess,
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between the network's output and its target ('eps': the added noise; 'v').

    Draws t and the noise from `generator`; the network is called as `model(x_t, t, cond, generator=...)`
    so label dropout uses the same stream. Extra output channels (a learned variance) are ignored here.
    `t` (N,) and `noise` (shape of x0) may be given instead, e.g. drawn per sample by the training loop.
    """
    n, channels = x0.shape[:2]
    if t is None:
        t = process.sample_t(n, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = process.add_noise(x0, noise, t)
    out = model(x_t, process.model_time(t), cond, generator=generator)
    target = prediction_target(prediction, x0.float(), noise.float(), process.alpha(t), process.sigma(t))
    return (out[:, :channels].float() - target).pow(2).mean()
