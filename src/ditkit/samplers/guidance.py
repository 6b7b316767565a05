"""Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598) as a denoiser wrapper.

The conditional and unconditional predictions come from one batched call. Guidance is applied to the
denoised estimate; since x0 and eps are affine in each other at a fixed (x_t, t), this is the same as
guiding eps. All channels are guided by default; `channels=3` reproduces the official DiT release,
which guides only the first three of four latent channels. `interval=(lo, hi)` applies guidance
only at times lo <= t <= hi and the conditional prediction elsewhere (Kynkaanniemi et al. 2024,
https://arxiv.org/abs/2404.07724, as used by LightningDiT and REPA). A learned variance is passed
through unguided, taken from the conditional half (as the DiT release samples).
"""

from __future__ import annotations

import math

import torch

from ..diffusion.denoiser import Denoiser

__all__ = ["ClassifierFreeGuidance"]


class ClassifierFreeGuidance(Denoiser):
    """denoised = uncond + scale * (cond - uncond); scale 1 is the plain conditional denoiser."""

    def __init__(
        self,
        denoiser: Denoiser,
        scale: float,
        *,
        channels: int | None = None,
        interval: tuple[float, float] | None = None,
    ) -> None:
        if not math.isfinite(scale) or scale < 0:  # NaN passes `< 0` and makes every sample NaN
            raise ValueError(f"guidance scale must be a finite number >= 0, got {scale}")
        if interval is not None and not interval[0] <= interval[1]:
            raise ValueError(f"guidance interval must satisfy lo <= hi, got {interval}")
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be >= 1 or None, got {channels}")
        self.interval = interval
        self.denoiser = denoiser
        self.process = denoiser.process
        self.scale = scale
        self.channels = channels
        self.learned_variance = getattr(denoiser, "learned_variance", False)

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser.null_cond(cond)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self._guide(x_t, t, cond, with_variance=False)[0]

    def denoise_with_variance(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x0, frac = self._guide(x_t, t, cond, with_variance=True)
        return x0, frac

    def _guide(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, *, with_variance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(guided x0, the conditional half's variance fraction or None)."""

        def call(
            x: torch.Tensor, times: torch.Tensor, c: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            if with_variance:
                return self.denoiser.denoise_with_variance(x, times, c)
            return self.denoiser(x, times, c), None

        if self.scale == 1.0 or cond is None:
            return call(x_t, t, cond)
        n = x_t.shape[0]
        inside = None
        if self.interval is not None:
            inside = (t.expand(n) >= self.interval[0]) & (t.expand(n) <= self.interval[1])
            if not bool(inside.any()):
                return call(x_t, t, cond)
        null = self.null_cond(cond)
        # Labels are tensors; text conditions (TextCond) batch themselves with their `cat`.
        both_cond = type(cond).cat([cond, null]) if hasattr(cond, "as_null") else torch.cat([cond, null])
        both, frac = call(torch.cat([x_t, x_t]), torch.cat([t.expand(n), t.expand(n)]), both_cond)
        conditional, unconditional = both[:n], both[n:]
        guided = unconditional + self.scale * (conditional - unconditional)
        if self.channels is not None:
            if self.channels > guided.shape[1]:  # would silently guide every channel
                raise ValueError(f"guidance channels={self.channels} but the model has {guided.shape[1]} channels")
            # Legacy: guide the first `channels` channels, keep the conditional prediction elsewhere.
            guided = torch.cat([guided[:, : self.channels], conditional[:, self.channels :]], dim=1)
        if inside is not None:
            guided = torch.where(inside.reshape(-1, *([1] * (guided.dim() - 1))), guided, conditional)
        return guided, (frac[:n] if frac is not None else None)
