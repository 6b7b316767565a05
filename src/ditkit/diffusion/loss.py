"""Training objective: MSE to the prediction target (noise, as L_simple of Ho et al. 2020, v, x0 or the flow
velocity) at timesteps drawn by the process, plus Improved DDPM's lambda L_vlb for a learned variance."""

from __future__ import annotations

import torch
from torch import nn

from .process import NoiseProcess, prediction_target, prediction_to_x0
from .vlb import vlb_term

__all__ = ["diffusion_loss"]


def diffusion_loss(
    model: nn.Module,
    process: NoiseProcess,
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    vlb_weight: float = 0.0,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    extra_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between the network's output and its target ('eps': the added noise; 'v'; 'x0'; 'flow').

    Draws t and the noise from `generator`; the network is called as `model(x_t, t, cond, generator=...)`
    so label dropout uses the same stream. When the network outputs twice the input's channels and
    `vlb_weight` > 0, adds vlb_weight * T * mean_t(L_t) (the hybrid loss of Nichol & Dhariwal 2021) on the
    extra (variance) channels, with the predicted mean detached; otherwise the extra channels are ignored.
    `t` (N,) and `noise` (shape of x0) may be given instead, e.g. drawn per sample by the training loop.
    `extra_input` (N, E, H, W) is appended to x_t as the network's input (a mask-conditioned model's mask
    and masked image, `ditkit.inpainting.inpaint_loss`); the loss is on the first C output channels as ever.
    """
    n, channels = x0.shape[:2]
    if t is None:
        t = process.sample_t(n, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = process.add_noise(x0, noise, t)
    x_in = x_t if extra_input is None else torch.cat([x_t, extra_input], dim=1)
    out = model(x_in, process.model_time(t), cond, generator=generator)
    alpha, sigma = process.alpha(t), process.sigma(t)
    derivatives = {}
    if prediction == "flow":
        derivatives = dict(alpha_dot=process.alpha_dot(t), sigma_dot=process.sigma_dot(t))
    target = prediction_target(prediction, x0.float(), noise.float(), alpha, sigma, **derivatives)
    pred = out[:, :channels].float()
    loss = (pred - target).pow(2).mean()
    if vlb_weight > 0 and out.shape[1] == 2 * channels:
        x0_pred = prediction_to_x0(prediction, pred.detach(), x_t.float(), alpha, sigma, **derivatives)
        frac = (out[:, channels:].float() + 1) / 2
        vlb = vlb_term(process, x0.float(), x_t.float(), t, x0_pred, frac)
        loss = loss + vlb_weight * process.num_timesteps * vlb.mean()
    return loss
