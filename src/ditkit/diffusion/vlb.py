"""The variational bound terms that train a learned variance (Improved DDPM's hybrid loss).

Nichol & Dhariwal 2021 (https://arxiv.org/abs/2102.09672), section 3.1: the network outputs, per
element, v in [-1, 1]; the reverse step's log-variance interpolates between the two natural bounds,

    log var = frac log beta_t + (1 - frac) log beta_tilde_t,    frac = (v + 1) / 2,

and is trained by L_vlb with the mean held fixed (stop-gradient), so L_simple alone shapes the mean.
L_t (t > 0) is KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); L_0 is the negative log-likelihood of x0
under a Gaussian discretised to 256 bins on [-1, 1] (Ho et al. 2020, section 3.3). Both in bits/dim.
DiT trains with L_simple + L_t (T = 1000, lambda = 0.001: lambda T = 1).
"""

from __future__ import annotations

import math

import torch

from .process import DiscreteVP

__all__ = ["normal_kl", "discretized_gaussian_nll", "posterior", "learned_log_variance", "vlb_term"]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise -log P(bin of x) in nats, for x in [-1, 1] on 256 levels; the edge bins take the tails."""
    half_bin = 1.0 / 255.0
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + half_bin)
    lower = inv_scale * (x - mean - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)  # the lowest bin: P(X < x + half_bin)
    log_sf_lower = torch.special.log_ndtr(-lower)  # the highest bin: P(X > x - half_bin)
    log_mass = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    log_p = torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mass))
    return -log_p


def _table(process: DiscreteVP, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(beta_t, abar_t, abar_{t-1}) at integer steps t, float64 (N,)."""
    k = t.long().to("cpu")
    if bool((k < 0).any() or (k >= process.num_timesteps).any()) or not torch.equal(k.to(t.dtype), t.cpu()):
        raise ValueError(f"the VLB is defined at integer steps 0..{process.num_timesteps - 1}, got {t.tolist()}")
    abar = process.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return process.betas[k], abar[k], abar_prev[k]


def posterior(
    process: DiscreteVP, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and clipped log-variance of q(x_{t-1} | x_t, x0) at integer steps t (Ho et al. eq. 6-7).

    The variance beta_tilde_0 is 0; as in Improved DDPM its log is clipped to log beta_tilde_1.
    """
    beta, abar, abar_prev = _table(process, t)
    coef_x0 = abar_prev.sqrt() * beta / (1 - abar)
    coef_xt = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
    tilde = beta * (1 - abar_prev) / (1 - abar)
    first = float(process.betas[1] * (1 - process.alphas_cumprod[0]) / (1 - process.alphas_cumprod[1]))
    log_tilde = torch.where(tilde > 0, tilde.clamp(min=1e-300).log(), torch.full_like(tilde, math.log(first)))
    shape = (-1,) + (1,) * (x0.dim() - 1)
    mean = coef_x0.to(x0).reshape(shape) * x0 + coef_xt.to(x0).reshape(shape) * x_t
    return mean, log_tilde.to(x0).reshape(shape).expand_as(x0)


def learned_log_variance(frac: torch.Tensor, log_beta: torch.Tensor, log_beta_tilde: torch.Tensor) -> torch.Tensor:
    """frac log beta + (1 - frac) log beta_tilde (broadcast)."""
    return frac * log_beta + (1 - frac) * log_beta_tilde


def vlb_term(
    process: DiscreteVP, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0_pred: torch.Tensor, frac: torch.Tensor
) -> torch.Tensor:
    """L_t per sample in bits/dim: the KL for t > 0, the discretised decoder NLL at t = 0.

    `x0_pred` is the network's denoised estimate (detach it to keep the mean out of this term's gradient);
    `frac` in [0, 1] is the learned interpolation. Returns (N,).
    """
    if not isinstance(process, DiscreteVP):
        raise ValueError(
            f"a learned variance is defined for the discrete VP process only, not {type(process).__name__}"
        )
    true_mean, log_tilde = posterior(process, x0, x_t, t)
    model_mean, _ = posterior(process, x0_pred, x_t, t)
    beta = _table(process, t)[0]
    log_beta = beta.log().to(x0).reshape((-1,) + (1,) * (x0.dim() - 1))
    model_logvar = learned_log_variance(frac, log_beta, log_tilde)
    kl = normal_kl(true_mean, log_tilde, model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t.to(x0.device) == 0, nll, kl)
