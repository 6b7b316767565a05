"""Euler and Heun solvers of the probability-flow ODE (Karras et al. 2022, https://arxiv.org/abs/2206.00364).

In the scaled coordinates y = x / alpha and s = sigma / alpha any alpha/sigma process becomes the
variance-exploding one, whose probability-flow ODE is (Karras et al. eq. 4 with their s(t) = 1)

    dy/ds = (y - D(x, t)) / s,    x = alpha y.

Euler on this ODE is algebraically DDIM with eta = 0. Heun (the paper's Algorithm 1) adds a
trapezoidal correction from a second denoiser call at the step's end, except on the final step into
s = 0, where the slope is undefined and the step is plain Euler (which lands on the denoised estimate).

A step out of alpha = 0 (the linear interpolant's t = 1) has s = inf. Euler is taken in the form
x_next = alpha_next D + (sigma_next / sigma) (x - alpha D), finite there; Heun takes that one step in
the reciprocal coordinates z = x / sigma, r = alpha / sigma, where the same ODE reads dz/dr = D.
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
    sigmas = process.sigma(grid).to("cpu", torch.float64)
    n = x.shape[0]
    bar = tqdm(range(steps), desc="sampling", unit="step", disable=not progress, leave=False)
    for i in bar:
        a_cur, a_next, sig_cur, sig_next = (float(v) for v in (alphas[i], alphas[i + 1], sigmas[i], sigmas[i + 1]))
        denoised = denoiser(x, grid[i].expand(n), cond)
        # Euler, written so the step into sigma = 0 gives D exactly (and a step out of alpha = 0 is finite).
        x_next = a_next * denoised + (sig_next / sig_cur) * (x - a_cur * denoised)
        if heun and sig_next > 0:
            denoised_next = denoiser(x_next, grid[i + 1].expand(n), cond)
            if a_cur > 0:  # trapezoid in y = x / alpha, s = sigma / alpha: dy/ds = (y - D) / s
                s_cur, s_next = sig_cur / a_cur, sig_next / a_next
                y, y_euler = x / a_cur, x_next / a_next
                slope, slope_next = (y - denoised) / s_cur, (y_euler - denoised_next) / s_next
                x_next = a_next * (y + (s_next - s_cur) * 0.5 * (slope + slope_next))
            else:  # trapezoid in z = x / sigma, r = alpha / sigma: dz/dr = D
                dr = a_next / sig_next - a_cur / sig_cur
                x_next = sig_next * (x / sig_cur + dr * 0.5 * (denoised + denoised_next))
        x = x_next
        if callback is not None:
            callback({"i": i, "num_steps": steps, "t": grid[i], "x": x, "denoised": denoised})
    return x
