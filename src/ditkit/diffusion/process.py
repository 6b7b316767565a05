"""Noise processes: x_t = alpha(t) * x0 + sigma(t) * noise.

The time convention, stated once: t runs from `t_min` (data: alpha = 1, sigma = 0) up to `t_max`
(noise). Samplers walk a grid from `t_max` down to `t_min` and never call the denoiser at `t_min`.
Everything a loss or a sampler needs is a function of t, as in SiT's interpolants
(Ma et al. 2024, https://arxiv.org/abs/2401.08740), so new schedules are a few lines.

The discrete variance-preserving process is DDPM's (Ho et al. 2020, https://arxiv.org/abs/2006.11239):
t is the integer step index 0..T-1 (the value the network's timestep embedder sees), extended by
t = -1 for clean data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..config import DiffusionConfig

__all__ = [
    "NoiseProcess",
    "DiscreteVP",
    "linear_betas",
    "cosine_betas",
    "build_process",
    "eps_to_x0",
    "x0_to_eps",
    "v_to_x0",
    "prediction_target",
    "prediction_to_x0",
]


class NoiseProcess(ABC):
    """A forward process defined by alpha(t) and sigma(t); see the module docstring for the time axis."""

    t_min: float
    t_max: float

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Signal scale at time t (same shape as t)."""

    @abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise scale at time t (same shape as t)."""

    @abstractmethod
    def sample_t(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Training timesteps, (n,) float."""

    @abstractmethod
    def timesteps(self, num_steps: int, device: torch.device | str = "cpu", spacing: str = "linear") -> torch.Tensor:
        """Sampling grid: num_steps + 1 decreasing times from t_max to t_min (float, (num_steps + 1,)).

        `spacing` 'linear' is even in t; 'logsnr' is even in lambda = log(alpha / sigma), which suits
        higher-order solvers (DPM-Solver++, Heun).
        """

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) = log(alpha(t) / sigma(t)); +inf at the data end."""
        return torch.log(self.alpha(t).double()) - torch.log(self.sigma(t).double())

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value fed to the network (identity unless a process says otherwise)."""
        return t

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise, with t of shape (N,)."""
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * noise

    def prior(
        self, shape: tuple[int, ...], *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A draw from the distribution samplers start from at t_max: N(0, sigma(t_max)^2 I)."""
        scale = float(self.sigma(torch.tensor([self.t_max], dtype=torch.float64)))
        return torch.randn(shape, generator=generator, device=device) * scale


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) matching `like`'s rank, dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def eps_to_x0(eps: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Denoised estimate from a noise prediction: x0 = (x_t - sigma eps) / alpha."""
    return (x_t - _bcast(sigma, x_t) * eps) / _bcast(alpha, x_t)


def x0_to_eps(x0: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Noise estimate from a denoised estimate: eps = (x_t - alpha x0) / sigma."""
    return (x_t - _bcast(alpha, x_t) * x0) / _bcast(sigma, x_t)


def v_to_x0(v: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Denoised estimate from a velocity prediction v = alpha eps - sigma x0.

    x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
    """
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    return (a * x_t - s * v) / (a**2 + s**2)


def prediction_target(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """What a network trained for `prediction` ('eps' or 'v') should output at x_t = alpha x0 + sigma noise."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction {prediction!r}; expected 'eps', 'v' or 'x0'")


def prediction_to_x0(
    prediction: str, out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """Convert a network output trained for `prediction` into the denoised estimate x0."""
    if prediction == "eps":
        return eps_to_x0(out, x_t, alpha, sigma)
    if prediction == "v":
        return v_to_x0(out, x_t, alpha, sigma)
    if prediction == "x0":
        return out
    raise ValueError(f"unknown prediction {prediction!r}; expected 'eps', 'v' or 'x0'")


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's linear beta schedule, float64 (T,)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


class DiscreteVP(NoiseProcess):
    """Discrete variance-preserving process: alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar).

    Fractional t interpolates log(alpha_bar) linearly between neighbouring steps.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        # Index 0 is t = -1 (clean data), index k + 1 is step k.
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), self.alphas_cumprod.log()])
        self.t_min = -1.0
        self.t_max = float(self.num_timesteps - 1)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        pos = (t.to(torch.float64) + 1.0).clamp(0.0, float(self.num_timesteps))
        lo = pos.floor().long().clamp(max=self.num_timesteps - 1)
        frac = pos - lo
        table = self._log_abar.to(t.device)
        return torch.exp(table[lo] * (1 - frac) + table[(lo + 1).clamp(max=self.num_timesteps)] * frac)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._alpha_bar(t).sqrt().to(torch.float32)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self._alpha_bar(t)).sqrt().to(torch.float32)

    def sample_t(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Uniform integer steps in [0, T)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device).float()

    def timesteps(self, num_steps: int, device: torch.device | str = "cpu", spacing: str = "linear") -> torch.Tensor:
        """num_steps times from T-1 down to 0 (both included), then -1 (data).

        'linear': evenly spaced integer steps (rounded), the respacing DiT's and ADM's evaluations use
        ("250 of 1000"). 'logsnr': evenly spaced in lambda = log(alpha/sigma) between steps T-1 and 0,
        fractional t (the network's timestep embedding takes any real t).
        """
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_timesteps}], got {num_steps}")
        if spacing not in ("linear", "logsnr"):
            raise ValueError(f"unknown spacing {spacing!r}; expected 'linear' or 'logsnr'")
        if num_steps == 1:
            grid = torch.tensor([self.t_max], dtype=torch.float64)
        elif spacing == "linear":
            grid = torch.linspace(self.t_max, 0.0, num_steps, dtype=torch.float64).round()
        else:
            steps = torch.arange(self.num_timesteps, dtype=torch.float64)
            lam = 0.5 * (self.alphas_cumprod.log() - torch.log1p(-self.alphas_cumprod))  # decreasing in t
            targets = torch.linspace(float(lam[-1]), float(lam[0]), num_steps, dtype=torch.float64)
            # Invert the monotone table: lambda is piecewise linear enough between integer steps.
            idx = torch.searchsorted(-lam, -targets).clamp(1, self.num_timesteps - 1)
            lo, hi = lam[idx - 1], lam[idx]
            frac = ((lo - targets) / (lo - hi)).clamp(0, 1)
            grid = steps[idx - 1] + frac
            grid[0], grid[-1] = self.t_max, 0.0
        return torch.cat([grid, torch.tensor([self.t_min], dtype=torch.float64)]).float().to(device)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672):
    alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), betas from its ratios, capped at 0.999."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + offset) / (1 + offset) * torch.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def build_process(config: DiffusionConfig) -> NoiseProcess:
    """The noise process a diffusion config describes."""
    if config.schedule == "linear":
        return DiscreteVP(linear_betas(config.num_timesteps, config.beta_start, config.beta_end))
    if config.schedule == "cosine":
        return DiscreteVP(cosine_betas(config.num_timesteps))
    raise ValueError(f"unknown schedule {config.schedule!r}")
