"""DDIM sampling (Song, Meng & Ermon 2021, https://arxiv.org/abs/2010.02502) over any alpha/sigma process.

One step from t to s < t, with x0 = D(x_t, t) and eps = (x_t - alpha_t x0) / sigma_t:

    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,   c = eta sigma_s sqrt(1 - SNR_t / SNR_s)

where SNR = alpha^2 / sigma^2. For a variance-preserving process this is the paper's eq. 12/16:
eta = 0 is the deterministic (probability-flow) sampler, eta = 1 uses DDPM's posterior variance.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..diffusion.denoiser import Denoiser
from ..diffusion.process import x0_to_eps
from .grid import sampling_grid
from .noise import Generators, randn_like

__all__ = ["sample_ddim", "StepCallback"]

StepCallback = Callable[[dict[str, Any]], None]
"""Called after every step with {'i', 'num_steps', 't', 'x', 'denoised'}."""


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int | torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from `x` (a draw of the prior at t_max) to data in `steps` denoiser calls."""
    if not 0 <= eta <= 1:  # above 1 a step can need more fresh noise than the next level holds
        raise ValueError(f"eta must be in [0, 1] (1: DDPM's posterior variance), got {eta}")
    process = denoiser.process
    grid = sampling_grid(process, steps, x.device)  # (steps + 1,), last entry is the data end
    steps = len(grid) - 1
    alphas, sigmas = process.alpha(grid).to(x.device), process.sigma(grid).to(x.device)
    n = x.shape[0]
    bar = tqdm(range(steps), desc="sampling", unit="step", disable=not progress, leave=False)
    for i in bar:
        t = grid[i].expand(n)
        denoised = denoiser(x, t, cond)
        a_t, s_t, a_s, s_s = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        eps = x0_to_eps(denoised, x, a_t.expand(n), s_t.expand(n))
        if s_s > 0 and eta > 0:
            snr_ratio = (a_t**2 * s_s**2) / (a_s**2 * s_t**2)  # SNR_t / SNR_s <= 1
            c = eta * s_s * torch.sqrt((1 - snr_ratio).clamp(min=0))
        else:
            c = torch.zeros((), device=x.device)
        x = a_s * denoised + torch.sqrt((s_s**2 - c**2).clamp(min=0)) * eps
        if c > 0:
            x = x + c * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "num_steps": steps, "t": grid[i], "x": x, "denoised": denoised})
    return x
