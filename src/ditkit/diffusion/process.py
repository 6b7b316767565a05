"""Noise processes: x_t = alpha(t) * x0 + sigma(t) * noise.

The time convention, stated once: t runs from `t_min` (data: alpha = 1, sigma = 0) up to `t_max`
(noise). Samplers walk a grid from `t_max` down to `t_min` and never call the denoiser at `t_min`.
Everything a loss or a sampler needs is a function of t, as in SiT's interpolants
(Ma et al. 2024, https://arxiv.org/abs/2401.08740), so new schedules are a few lines.

The discrete variance-preserving process is DDPM's (Ho et al. 2020, https://arxiv.org/abs/2006.11239):
t is the integer step index 0..T-1 (the value the network's timestep embedder sees), extended by
t = -1 for clean data. The linear interpolant (rectified flow; Liu et al. 2022,
https://arxiv.org/abs/2209.03003, Lipman et al. 2022, SiT) has alpha = 1 - t, sigma = t for t in [0, 1]
(t = 0 is data, t = 1 pure noise) and shows the network `T * t`.

Predictions ('eps', 'x0', 'v' = alpha eps - sigma x0 of Salimans & Ho 2022, and 'flow' = the velocity
d x_t / dt = alpha' x0 + sigma' eps) are converted into each other here, through (x0, eps).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..config import DiffusionConfig

__all__ = [
    "NoiseProcess",
    "DiscreteVP",
    "LinearFlow",
    "linear_betas",
    "cosine_betas",
    "build_process",
    "eps_to_x0",
    "x0_to_eps",
    "v_to_x0",
    "prediction_target",
    "prediction_to_x0",
    "x0_to_prediction",
    "velocity_to_x0",
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

    max_steps: int | None = None
    """Most sampling steps `timesteps` grids (None: any number >= 1)."""

    variance_preserving: bool = False
    """Whether alpha(t)^2 + sigma(t)^2 = 1 at every t (DDPM's ancestral steps need it), not only at some t:
    the linear interpolant meets it at t = 0 and t = 1 alone."""

    def check_num_steps(self, num_steps: int, name: str = "num_steps") -> None:
        """Refuse a number of sampling steps this process cannot grid (1 to `max_steps`); the ValueError names
        `name` (the argument or flag it came from, such as '--steps'), the value and the allowed range."""
        limit = self.max_steps
        if num_steps >= 1 and (limit is None or num_steps <= limit):
            return
        if limit is None:
            raise ValueError(f"{name} {num_steps}: give 1 or more sampling steps")
        raise ValueError(f"{name} {num_steps}: this model's process has {limit} timesteps; give 1 to {limit}")

    @abstractmethod
    def timesteps(self, num_steps: int, device: torch.device | str = "cpu", spacing: str = "linear") -> torch.Tensor:
        """Sampling grid: num_steps + 1 decreasing times from t_max to t_min (float, (num_steps + 1,)).

        `spacing` 'linear' is even in t; 'logsnr' is even in lambda = log(alpha / sigma), which suits
        higher-order solvers (DPM-Solver++, Heun).
        """

    def alpha_dot(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt (the 'flow' objective and the SDE sampler need it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define d alpha / dt")

    def sigma_dot(self, t: torch.Tensor) -> torch.Tensor:
        """d sigma / dt (the 'flow' objective and the SDE sampler need it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define d sigma / dt")

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


def velocity_to_x0(
    u: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_dot: torch.Tensor,
    sigma_dot: torch.Tensor,
) -> torch.Tensor:
    """Denoised estimate from a velocity u = alpha' x0 + sigma' eps: solve it together with x_t = alpha x0 + sigma eps.

    x0 = (sigma' x_t - sigma u) / (alpha sigma' - sigma alpha'); the determinant is -alpha sigma d lambda / dt > 0
    away from the ends, and 1 for the linear interpolant (x0 = x_t - t u).
    """
    a, s, da, ds = (_bcast(v, x_t) for v in (alpha, sigma, alpha_dot, sigma_dot))
    return (ds * x_t - s * u) / (a * ds - s * da)


def _derivatives(prediction: str, alpha_dot: torch.Tensor | None, sigma_dot: torch.Tensor | None) -> None:
    if prediction == "flow" and (alpha_dot is None or sigma_dot is None):
        raise ValueError("prediction 'flow' needs alpha_dot and sigma_dot (the process's d alpha/dt, d sigma/dt)")


_PREDICTIONS = "'eps', 'v', 'x0' or 'flow'"


def prediction_target(
    prediction: str,
    x0: torch.Tensor,
    noise: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_dot: torch.Tensor | None = None,
    sigma_dot: torch.Tensor | None = None,
) -> torch.Tensor:
    """What a network trained for `prediction` should output at x_t = alpha x0 + sigma noise.

    'flow' (the velocity alpha' x0 + sigma' noise) also needs the process's derivatives at t.
    """
    if prediction == "eps":
        return noise
    if prediction == "v":
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0
    if prediction == "x0":
        return x0
    if prediction == "flow":
        _derivatives(prediction, alpha_dot, sigma_dot)
        return _bcast(alpha_dot, x0) * x0 + _bcast(sigma_dot, x0) * noise
    raise ValueError(f"unknown prediction {prediction!r}; expected {_PREDICTIONS}")


def prediction_to_x0(
    prediction: str,
    out: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_dot: torch.Tensor | None = None,
    sigma_dot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convert a network output trained for `prediction` into the denoised estimate x0."""
    if prediction == "eps":
        return eps_to_x0(out, x_t, alpha, sigma)
    if prediction == "v":
        return v_to_x0(out, x_t, alpha, sigma)
    if prediction == "x0":
        return out
    if prediction == "flow":
        _derivatives(prediction, alpha_dot, sigma_dot)
        return velocity_to_x0(out, x_t, alpha, sigma, alpha_dot, sigma_dot)
    raise ValueError(f"unknown prediction {prediction!r}; expected {_PREDICTIONS}")


def x0_to_prediction(
    prediction: str,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_dot: torch.Tensor | None = None,
    sigma_dot: torch.Tensor | None = None,
) -> torch.Tensor:
    """The output a network trained for `prediction` would give for the denoised estimate x0 at x_t (sigma > 0)."""
    eps = x0_to_eps(x0, x_t, alpha, sigma)
    return prediction_target(prediction, x0, eps, alpha, sigma, alpha_dot, sigma_dot)


def _logit_normal_or_uniform(
    n: int, t_sampling: str, mean: float, std: float, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """u in [0, 1): uniform, or sigmoid of a N(mean, std^2) draw (float64, (n,))."""
    if t_sampling == "uniform":
        return torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    if t_sampling == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device, dtype=torch.float64))
    raise ValueError(f"unknown t_sampling {t_sampling!r}; expected 'uniform' or 'logit_normal'")


def _spaced_log_snr(lam_noise: float, lam_data: float, n: int, spacing: str, rho: float = 7.0) -> torch.Tensor:
    """n increasing log-SNR targets from lam_noise to lam_data: even in lambda ('logsnr') or Karras et al.'s
    rho-spacing of s = sigma / alpha = exp(-lambda) ('karras': s_i^(1/rho) even), float64 (n,)."""
    if spacing == "logsnr":
        return torch.linspace(lam_noise, lam_data, n, dtype=torch.float64)
    s_max, s_min = math.exp(-lam_noise) ** (1 / rho), math.exp(-lam_data) ** (1 / rho)
    s = torch.linspace(s_max, s_min, n, dtype=torch.float64) ** rho
    return -s.log()


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's linear beta schedule, float64 (T,)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


class DiscreteVP(NoiseProcess):
    """Discrete variance-preserving process: alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar).

    Fractional t interpolates log(alpha_bar) linearly between neighbouring steps.
    """

    variance_preserving = True

    def __init__(
        self, betas: torch.Tensor, *, t_sampling: str = "uniform", t_mean: float = 0.0, t_std: float = 1.0
    ) -> None:
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.max_steps = self.num_timesteps  # one network call per step, at most one per trained step
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        # Index 0 is t = -1 (clean data), index k + 1 is step k.
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), self.alphas_cumprod.log()])
        self.t_min = -1.0
        self.t_max = float(self.num_timesteps - 1)
        self.t_sampling, self.t_mean, self.t_std = t_sampling, t_mean, t_std

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

    def _log_alpha_bar_slope(self, t: torch.Tensor) -> torch.Tensor:
        """d log(alpha_bar) / dt: the slope of the segment starting at t (piecewise constant, float64)."""
        pos = (t.to(torch.float64) + 1.0).clamp(0.0, float(self.num_timesteps))
        lo = pos.floor().long().clamp(max=self.num_timesteps - 1)
        table = self._log_abar.to(t.device)
        return table[lo + 1] - table[lo]

    def alpha_dot(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha / dt = alpha / 2 * d log(alpha_bar) / dt."""
        return (0.5 * self._alpha_bar(t).sqrt() * self._log_alpha_bar_slope(t)).to(torch.float32)

    def sigma_dot(self, t: torch.Tensor) -> torch.Tensor:
        """d sigma / dt = -alpha_bar / (2 sigma) * d log(alpha_bar) / dt (infinite at the data end)."""
        abar = self._alpha_bar(t)
        return (-abar * self._log_alpha_bar_slope(t) / (2 * (1 - abar).sqrt())).to(torch.float32)

    def sample_t(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Integer steps in [0, T): uniform, or floor(T u) with u logit-normal (`t_sampling`)."""
        if self.t_sampling == "uniform":  # kept as a plain randint so seeded runs reproduce older ones
            return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device).float()
        u = _logit_normal_or_uniform(n, self.t_sampling, self.t_mean, self.t_std, generator, device)
        return (u * self.num_timesteps).floor().clamp(max=self.num_timesteps - 1).float()

    def timesteps(self, num_steps: int, device: torch.device | str = "cpu", spacing: str = "linear") -> torch.Tensor:
        """num_steps times from T-1 down to 0 (both included), then -1 (data).

        'linear': evenly spaced integer steps (rounded), the respacing DiT's and ADM's evaluations use
        ("250 of 1000"). 'logsnr': evenly spaced in lambda = log(alpha/sigma) between steps T-1 and 0,
        fractional t (the network's timestep embedding takes any real t). 'karras': Karras et al.'s
        rho = 7 spacing of sigma / alpha over the same range.
        """
        self.check_num_steps(num_steps)
        if spacing not in ("linear", "logsnr", "karras"):
            raise ValueError(f"unknown spacing {spacing!r}; expected 'linear', 'logsnr' or 'karras'")
        if num_steps == 1:
            grid = torch.tensor([self.t_max], dtype=torch.float64)
        elif spacing == "linear":
            grid = torch.linspace(self.t_max, 0.0, num_steps, dtype=torch.float64).round()
        else:
            log_abar = self.alphas_cumprod.log()  # (T,), decreasing in t
            lam = 0.5 * (log_abar - torch.log1p(-self.alphas_cumprod))  # lambda at the integer steps
            targets = _spaced_log_snr(float(lam[-1]), float(lam[0]), num_steps, spacing)
            # Invert exactly: alpha_bar = sigmoid(2 lambda), and between integer steps the process interpolates
            # log(alpha_bar) linearly (`_alpha_bar`), so locate the target log(alpha_bar) in the monotone table and
            # interpolate there. (Interpolating lambda itself instead left the gaps uneven by 38% at 50 steps.)
            target_log_abar = torch.nn.functional.logsigmoid(2 * targets)
            idx = torch.searchsorted(-log_abar, -target_log_abar).clamp(1, self.num_timesteps - 1)
            upper, lower = log_abar[idx - 1], log_abar[idx]  # at steps idx - 1 and idx
            frac = ((upper - target_log_abar) / (upper - lower)).clamp(0, 1)
            grid = (idx - 1).to(torch.float64) + frac
            grid[0], grid[-1] = self.t_max, 0.0
        return torch.cat([grid, torch.tensor([self.t_min], dtype=torch.float64)]).float().to(device)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672):
    alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), betas from its ratios, capped at 0.999."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + offset) / (1 + offset) * torch.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


class LinearFlow(NoiseProcess):
    """The linear interpolant of rectified flow / SiT: alpha = 1 - t, sigma = t, t in [0, 1] (0 is data).

    The network sees `time_scale * t`, so DiT's timestep embedder (built for 0..999) serves unchanged.
    The prior at t = 1 is exactly N(0, I). Grids start at t = 1, where alpha = 0: samplers that work in
    x / alpha or log(alpha / sigma) treat that first step specially (see each sampler).
    """

    def __init__(
        self,
        *,
        time_scale: float = 1000.0,
        t_sampling: str = "uniform",
        t_mean: float = 0.0,
        t_std: float = 1.0,
        t_eps: float = 1e-3,
    ) -> None:
        if not 0 < t_eps < 0.5:
            raise ValueError(f"t_eps must be in (0, 0.5), got {t_eps}")
        self.t_min, self.t_max = 0.0, 1.0
        self.time_scale, self.t_sampling, self.t_mean, self.t_std = time_scale, t_sampling, t_mean, t_std
        self.t_eps = t_eps
        """Interior range [t_eps, 1 - t_eps] of 'logsnr' and 'karras' grids (lambda is infinite at 0 and 1)."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - t.to(torch.float64).clamp(0.0, 1.0)).to(torch.float32)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64).clamp(0.0, 1.0).to(torch.float32)

    def alpha_dot(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -1.0, dtype=torch.float32)

    def sigma_dot(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, 1.0, dtype=torch.float32)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.time_scale

    def sample_t(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Continuous t in [0, 1): uniform or logit-normal (`t_sampling`)."""
        u = _logit_normal_or_uniform(n, self.t_sampling, self.t_mean, self.t_std, generator, device)
        return u.float()

    def timesteps(self, num_steps: int, device: torch.device | str = "cpu", spacing: str = "linear") -> torch.Tensor:
        """num_steps times from 1 down, then 0 (data).

        'linear': 1, 1 - 1/n, ..., 1/n. 'logsnr' / 'karras': n times spaced in lambda = log((1 - t) / t)
        from t = 1 - t_eps down to t = t_eps (lambda is infinite at 0 and 1), then the first moved to t = 1
        (pure noise); so the other n - 1 lie inside [t_eps, 1 - t_eps) and end at t_eps.
        """
        self.check_num_steps(num_steps)
        if spacing not in ("linear", "logsnr", "karras"):
            raise ValueError(f"unknown spacing {spacing!r}; expected 'linear', 'logsnr' or 'karras'")
        if spacing == "linear" or num_steps == 1:
            grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        else:
            lam_noise, lam_data = (math.log((1 - t) / t) for t in (1 - self.t_eps, self.t_eps))
            grid = torch.sigmoid(-_spaced_log_snr(lam_noise, lam_data, num_steps, spacing))  # t = 1 / (1 + e^lambda)
            grid[0] = 1.0
        return torch.cat([grid, torch.zeros(1, dtype=torch.float64)]).float().to(device)


def build_process(config: DiffusionConfig) -> NoiseProcess:
    """The noise process a diffusion config describes."""
    sampling = dict(t_sampling=config.t_sampling, t_mean=config.t_mean, t_std=config.t_std)
    if config.process == "flow":
        return LinearFlow(time_scale=float(config.num_timesteps), **sampling)
    if config.schedule == "linear":
        return DiscreteVP(linear_betas(config.num_timesteps, config.beta_start, config.beta_end), **sampling)
    if config.schedule == "cosine":
        return DiscreteVP(cosine_betas(config.num_timesteps), **sampling)
    raise ValueError(f"unknown schedule {config.schedule!r}")
