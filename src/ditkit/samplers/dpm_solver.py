"""DPM-Solver++(2M) (Lu et al. 2022, https://arxiv.org/abs/2211.01095), the multistep second-order solver.

In lambda = log(alpha / sigma) the probability-flow ODE in data prediction has the exact solution
x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^lambda D dlambda. Holding D constant
over the step gives the first-order update (DDIM):

    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D_t,    h = lambda_s - lambda_t.

The 2M variant (the paper's Algorithm 2) replaces D_t by a linear extrapolation through the previous
step's estimate, D = (1 + 1/(2r)) D_t - 1/(2r) D_prev with r = h_prev / h, at no extra denoiser call.
The first step has no previous estimate and the final step into sigma = 0 (lambda = inf, e^{-h} = 0)
is first order, so it returns the denoised estimate.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..diffusion.denoiser import Denoiser
from .ddim import StepCallback
from .grid import sampling_grid

__all__ = ["sample_dpmpp_2m"]


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int | torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Second-order multistep solve of the probability-flow ODE in `steps` denoiser calls (deterministic)."""
    process = denoiser.process
    grid = sampling_grid(process, steps, x.device)  # (steps + 1,), last entry is the data end
    steps = len(grid) - 1
    alphas = process.alpha(grid).to("cpu", torch.float64)
    sigmas = process.sigma(grid).to("cpu", torch.float64)
    lambdas = process.log_snr(grid).cpu()  # +inf at the data end
    # Scalars live on the CPU in float64 (one transfer, no per-step device sync); x stays in its dtype.
    n = x.shape[0]
    denoised_prev: torch.Tensor | None = None
    h_prev = 0.0
    bar = tqdm(range(steps), desc="sampling", unit="step", disable=not progress, leave=False)
    for i in bar:
        denoised = denoiser(x, grid[i].expand(n), cond)
        if sigmas[i + 1] == 0:
            x = denoised  # h = inf: the exponential integrator lands exactly on the estimate
        else:
            h = float(lambdas[i + 1] - lambdas[i])
            estimate = denoised
            if denoised_prev is not None:
                r = h_prev / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
            x = float(sigmas[i + 1] / sigmas[i]) * x - float(alphas[i + 1]) * math.expm1(-h) * estimate
            denoised_prev, h_prev = denoised, h
        if callback is not None:
            callback({"i": i, "num_steps": steps, "t": grid[i], "x": x, "denoised": denoised})
    return x
