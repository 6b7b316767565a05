"""The one contract between networks and samplers: `denoiser(x_t, t, cond) -> x0 estimate`.

Following Karras et al. 2022 (https://arxiv.org/abs/2206.00364) and k-diffusion, a network is wrapped
once into a denoiser; every sampler is a function over that contract and reads alpha(t), sigma(t) from
`denoiser.process`. Whatever the network predicts is converted here and nowhere else.
"""

from __future__ import annotations

import torch
from torch import nn

from .process import NoiseProcess, prediction_to_x0

__all__ = ["Denoiser", "ModelDenoiser"]


class Denoiser:
    """Protocol: a callable (x_t (N, ...), t (N,), cond) -> denoised x0 (N, ...), with `process`."""

    process: NoiseProcess

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of `cond` (used by classifier-free guidance)."""
        raise NotImplementedError


class ModelDenoiser(Denoiser):
    """Wraps a class-conditional network trained with the given prediction target."""

    def __init__(self, model: nn.Module, process: NoiseProcess, prediction: str = "eps") -> None:
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unsupported prediction {prediction!r}; expected 'eps', 'v' or 'x0'")
        self.model = model
        self.process = process
        self.prediction = prediction

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        t = t.reshape(-1).expand(x_t.shape[0]).to(x_t.device)
        out = self.model(x_t, self.process.model_time(t), cond)
        pred = out[:, : x_t.shape[1]].to(x_t.dtype)  # drop learned-variance channels
        return prediction_to_x0(self.prediction, pred, x_t, self.process.alpha(t), self.process.sigma(t))

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        if hasattr(cond, "as_null"):  # text conditioning (a TextCond): the model's learned null text
            return cond.as_null()
        return torch.full_like(cond, self.model.null_class)


class ClampDenoised(Denoiser):
    """Clamp another denoiser's x0 estimate to the data range, e.g. [-1, 1] for pixels.

    Pixel-space samplers (DDPM/ADM's `clip_denoised`) do this at every step: an estimate outside the
    range the data can take is certainly wrong, and left alone its error feeds back into x_t (most of
    all under strong guidance). Latent spaces have no such bound, so it is off there.
    """

    def __init__(self, denoiser: Denoiser, low: float = -1.0, high: float = 1.0) -> None:
        if not low < high:
            raise ValueError(f"clamp range must satisfy low < high, got [{low}, {high}]")
        self.denoiser, self.process, self.low, self.high = denoiser, denoiser.process, low, high

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.denoiser(x_t, t, cond).clamp(self.low, self.high)

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser.null_cond(cond)
