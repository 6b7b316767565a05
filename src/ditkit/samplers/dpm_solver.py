"""DPM-Solver++(2M) (Lu et al. 2022, https://arxiv.org/abs/2211.01095), the multistep second-order solver.

In lambda = log(alpha / sigma) the probability-flow ODE in data prediction has the exact solution
x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^lambda D dlambda. Holding D constant
over the step gives the first-order update (DDIM):

    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D_t,    h = lambda_s - lambda_t.

The 2M variant (the paper's Algorithm 2) replaces D_t by a linear extrapolation through the previous
step's estimate, D = (1 + 1/(2r)) D_t - 1/(2r) D_prev with r = h_prev / h, at no extra denoiser call.
The first step has no previous estimate and the final step into sigma = 0 (lambda = inf, e^{-h} = 0)
is first order, so it returns the denoised estimate.

The 3M variant (the multistep third-order update of DPM-Solver, in data prediction) fits
D as a quadratic in lambda through the last three estimates and integrates e^lambda D exactly:
with phi1 = e^{-h} - 1, phi2 = phi1 / h + 1, phi3 = phi2 / h - 1/2 and the backward differences
d1 = (D_t - D_prev) / r0, d1' = (D_prev - D_prev2) / r1 (r0 = h_prev / h, r1 = h_prev2 / h),

    x_s = (sigma_s / sigma_t) x_t - alpha_s phi1 D_t + alpha_s phi2 D1 - 2 alpha_s phi3 D2,
    D1 = d1 + r0 / (r0 + r1) (d1 - d1'),   D2 = (d1 - d1') / (r0 + r1),

(D1 and D2 are the coefficients of u and u^2 in D = D_t + D1 u + D2 u^2, u = (lambda - lambda_t) / h;
the 2M-like second step integrates the linear fit exactly the same way, phi2 d1.)

which is exact when D is quadratic in lambda (tested). Its first two steps are 1st and 2nd order.
A grid starting at alpha = 0 (lambda = -inf, the linear interpolant) makes the first h infinite; the
update's limit there is x_s = sigma_s x_t + alpha_s D_t, and the next steps drop the infinite history.

A long final step. On `vp`'s even-in-t grid the last step before the data end, from t ~ T / n into
t = 0, is 3-5 times longer in lambda than the one before it (lambda(0) = 4.6 lies far past the rest of
the grid, and the gap shrinks only like log n). Extrapolating the history across it overshoots (std error
of exact-Gaussian sampling +0.09 at 20 steps, +0.03 at 50), while a first-order step there (diffusers'
`lower_order_final`) undershoots about as much as Euler does (-0.11 at 10 steps). So when that step is
more than `LONG_STEP_RATIO` times the previous one, both solvers take it at second order with the step
ratio taken as 1: the difference D_t - D_prev counts as D's change over this step, not over the short
previous one, which damps the extrapolation by h_prev / h. Measured std errors on that grid, 2M / 3M:
-0.07 / -0.05 at 10 steps, -0.011 / +0.010 at 20, +0.009 / +0.006 at 50 (diffusers' 2M on its own grid:
-0.11, -0.041, -0.005). Log-SNR and Karras grids, whose steps grow gently, never meet the condition.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..diffusion.denoiser import Denoiser
from .ddim import StepCallback
from .grid import sampling_grid

__all__ = ["sample_dpmpp_2m", "sample_dpmpp_3m"]

LONG_STEP_RATIO = 2.5
"""A final step (the last before the data end) longer than this many previous steps in lambda is damped
(module docstring). The even-in-t grid's step into t = 0 is 2.9-4.7x its predecessor up to 100 steps."""


def _long_final_step(sigmas: torch.Tensor, i: int, h: float, h_prev: float) -> bool:
    """Whether step i (into grid point i + 1) is the last before the data end and much longer than step i - 1."""
    return i + 2 < len(sigmas) and float(sigmas[i + 2]) == 0 and h > LONG_STEP_RATIO * h_prev


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
                r = 1.0 if _long_final_step(sigmas, i, h, h_prev) else h_prev / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
            x = float(sigmas[i + 1] / sigmas[i]) * x - float(alphas[i + 1]) * math.expm1(-h) * estimate
            denoised_prev, h_prev = denoised, h
        if callback is not None:
            callback({"i": i, "num_steps": steps, "t": grid[i], "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_dpmpp_3m(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int | torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Third-order multistep solve of the probability-flow ODE in `steps` denoiser calls (deterministic)."""
    process = denoiser.process
    grid = sampling_grid(process, steps, x.device)  # (steps + 1,), last entry is the data end
    steps = len(grid) - 1
    alphas = process.alpha(grid).to("cpu", torch.float64)
    sigmas = process.sigma(grid).to("cpu", torch.float64)
    lambdas = process.log_snr(grid).cpu()  # -inf where alpha = 0, +inf at the data end
    n = x.shape[0]
    history: list[tuple[torch.Tensor, float]] = []  # (D, h of the step that followed it), newest last
    bar = tqdm(range(steps), desc="sampling", unit="step", disable=not progress, leave=False)
    for i in bar:
        denoised = denoiser(x, grid[i].expand(n), cond)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = float(lambdas[i + 1] - lambdas[i])
            a_s, ratio = float(alphas[i + 1]), float(sigmas[i + 1] / sigmas[i])
            if math.isinf(h):  # out of alpha = 0: the first-order update's limit
                x, history = ratio * x + a_s * denoised, []
                if callback is not None:
                    callback({"i": i, "num_steps": steps, "t": grid[i], "x": x, "denoised": denoised})
                continue
            phi1 = math.expm1(-h)
            x_next = ratio * x - a_s * phi1 * denoised
            if len(history) >= 1:
                d_prev, h_prev = history[-1]
                damped = _long_final_step(sigmas, i, h, h_prev)
                r0 = 1.0 if damped else h_prev / h
                d1 = (denoised - d_prev) / r0
                phi2 = phi1 / h + 1
                if len(history) >= 2 and not damped:
                    d_prev2, h_prev2 = history[-2]
                    r1 = h_prev2 / h
                    d1_prev = (d_prev - d_prev2) / r1
                    second = (d1 - d1_prev) / (r0 + r1)
                    first = d1 + r0 * second
                    phi3 = phi2 / h - 0.5
                    x_next = x_next + a_s * phi2 * first - 2 * a_s * phi3 * second
                else:  # second order: D linear in lambda through the last two estimates
                    x_next = x_next + a_s * phi2 * d1
            history = (history + [(denoised, h)])[-2:]
            x = x_next
        if callback is not None:
            callback({"i": i, "num_steps": steps, "t": grid[i], "x": x, "denoised": denoised})
    return x
