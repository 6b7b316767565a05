"""Euler-Maruyama on the reverse-time SDE of any alpha/sigma process (Song et al. 2021,
https://arxiv.org/abs/2011.13456; the general-interpolant form of SiT, https://arxiv.org/abs/2401.08740).

For x_t = alpha(t) x0 + sigma(t) eps the probability-flow velocity is u = alpha' D + sigma' eps_hat,
with D = E[x0 | x_t] and eps_hat = (x_t - alpha D) / sigma, and the score is -eps_hat / sigma. Every
reverse SDE  dx = (u - w/2 score) dt + sqrt(w) dW  (dt < 0) has the process's marginals; this sampler
uses the diffusion of the forward SDE, w = g^2 = -2 sigma^2 d lambda/dt (lambda = log(alpha / sigma)),
which is DDPM's reverse process for the VP case. With it the drift is

    u - w/2 score = alpha' D + (2 sigma' - sigma alpha' / alpha) eps_hat,

and one step from t to s < t is x_s = x_t + drift (s - t) + sqrt(w (t - s)) z. First order (weak).

Two ends need care. Into the data end (sigma = 0) the step returns D, like every ditkit sampler.
Out of alpha = 0 (the linear interpolant's t = 1) drift and w are infinite; that step is the exact
ancestral step x_s = alpha_s D + sigma_s z (the DDPM posterior from a state that carries no signal).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..diffusion.denoiser import Denoiser
from .ddim import StepCallback
from .grid import sampling_grid
from .noise import Generators, randn_like

__all__ = ["sample_euler_maruyama"]


@torch.no_grad()
def sample_euler_maruyama(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int | torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    generator: Generators = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the reverse SDE from `x` (a draw of the prior at t_max) in `steps` denoiser calls (stochastic)."""
    process = denoiser.process
    grid = sampling_grid(process, steps, x.device)  # (steps + 1,), last entry is the data end
    steps = len(grid) - 1
    cpu_grid = grid.to("cpu")
    alphas = process.alpha(cpu_grid).double()
    sigmas = process.sigma(cpu_grid).double()
    alpha_dots = process.alpha_dot(cpu_grid[:-1]).double()  # never needed at the data end
    sigma_dots = process.sigma_dot(cpu_grid[:-1]).double()
    n = x.shape[0]
    bar = tqdm(range(steps), desc="sampling", unit="step", disable=not progress, leave=False)
    for i in bar:
        denoised = denoiser(x, grid[i].expand(n), cond)
        a, sig, a_next, sig_next = (float(v) for v in (alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]))
        if sig_next == 0:
            x = denoised
        else:
            noise = randn_like(x, generator)
            if a == 0:
                x = a_next * denoised + sig_next * noise
            else:
                da, ds = float(alpha_dots[i]), float(sigma_dots[i])
                dt = float(cpu_grid[i + 1] - cpu_grid[i])  # < 0
                eps = (x - a * denoised) / sig
                w = 2 * sig * ds - 2 * sig**2 * da / a  # g^2 = -2 sigma^2 d lambda / dt
                drift = da * denoised + (2 * ds - sig * da / a) * eps
                x = x + dt * drift + max(w * -dt, 0.0) ** 0.5 * noise
        if callback is not None:
            callback({"i": i, "num_steps": steps, "t": grid[i], "x": x, "denoised": denoised})
    return x
