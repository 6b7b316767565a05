"""Training objective: noise-prediction MSE (L_simple of Ho et al. 2020) at uniformly drawn timesteps."""

from __future__ import annotations

import torch
from torch import nn

from .process import NoiseProcess

__all__ = ["diffusion_loss"]


def diffusion_loss(
    model: nn.Module,
    process: NoiseProcess,
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
) -> torch.Tensor:
    """Mean squared error between the network's noise prediction and the noise that was added.

    Draws t and the noise from `generator`; the network is called as `model(x_t, t, cond, generator=...)`
    so label dropout uses the same stream. Extra output channels (a learned variance) are ignored here.
    """
    if prediction != "eps":
        raise ValueError(f"unsupported prediction {prediction!r}")
    n, channels = x0.shape[:2]
    t = process.sample_t(n, generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = process.add_noise(x0, noise, t)
    out = model(x_t, process.model_time(t), cond, generator=generator)
    eps = out[:, :channels].float()
    return (eps - noise.float()).pow(2).mean()
