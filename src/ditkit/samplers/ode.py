"""Euler and Heun solvers of the probability-flow ODE (Karras et al. 2022, https://arxiv.org/abs/2206.00364).

In the scaled coordinates y = x / alpha and s = sigma / alpha any alpha/sigma process becomes the
variance-exploding one, whose probability-flow ODE is (Karras et al. eq. 4 with their s(t) = 1)

    dy/ds = (y - D(x, t)) / s,    x = alpha y.

Euler on this ODE is algebraically DDIM with eta = 0. Heun (the paper's Algorithm 1) adds a
trapezoidal correction from a second denoiser call at the step's end, except on the final step into
s = 0, where the slope is undefined and the step is plain Euler (which lands on the denoised estimate).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..diffusion.denoiser import Denoiser
from .ddim import StepCallback
from .grid import sampling_grid

__all__ = ["sample_euler", "sample_heun"]


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int | torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """First-order solve of the probability-flow ODE in `steps` denoiser calls (deterministic)."""
    return _solve(denoiser, x, steps, cond=cond, callback=callback, progress=progress, heun=False)


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int | torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Second-order solve of the probability-flow ODE: `steps` steps, 2 * steps - 1 denoiser calls."""
    return _solve(denoiser, x, steps, cond=cond, callback=callback, progress=progress, heun=True)


def _solve(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int | torch.Tensor,
    *,
    cond: torch.Tensor | None,
    callback: StepCallback | None,
    progress: bool,
    heun: bool,
) -> torch.Tensor:
    """The shared loop; `generator` is accepted by the public functions for the common signature only."""
    process = denoiser.process
    grid = sampling_grid(process, steps, x.device)  # (steps + 1,), last entry is the data end
    steps = len(grid) - 1
    alphas = process.alpha(grid).to("cpu", torch.float64)
    scaled_sigmas = process.sigma(grid).to("cpu", torch.float64) / alphas  # s = sigma / alpha, 0 at the data end
    n = x.shape[0]
    y = x / float(alphas[0])
    bar = tqdm(range(steps), desc="sampling", unit="step", disable=not progress, leave=False)
    for i in bar:
        s_cur, s_next = scaled_sigmas[i], scaled_sigmas[i + 1]
        denoised = denoiser(float(alphas[i]) * y, grid[i].expand(n), cond)
        # Euler, y + (s_next - s_cur) (y - D) / s_cur, written so the step into s = 0 gives D exactly
        # (the other form cancels two numbers of size y ~ 1 / alpha_max ~ 150 in float32).
        y_next = denoised + float(s_next / s_cur) * (y - denoised)
        if heun and s_next > 0:
            slope = (y - denoised) / float(s_cur)
            denoised_next = denoiser(float(alphas[i + 1]) * y_next, grid[i + 1].expand(n), cond)
            slope_next = (y_next - denoised_next) / float(s_next)
            y_next = y + float(s_next - s_cur) * 0.5 * (slope + slope_next)
        y = y_next
        x = float(alphas[i + 1]) * y
        if callback is not None:
            callback({"i": i, "num_steps": steps, "t": grid[i], "x": x, "denoised": denoised})
    return x
