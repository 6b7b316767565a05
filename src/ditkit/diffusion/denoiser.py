"""The one contract between networks and samplers: `denoiser(x_t, t, cond) -> x0 estimate`.

Following Karras et al. 2022 (https://arxiv.org/abs/2206.00364) and k-diffusion, a network is wrapped
once into a denoiser; every sampler is a function over that contract and reads alpha(t), sigma(t) from
`denoiser.process`. Whatever the network predicts is converted here and nowhere else.
"""

from __future__ import annotations

import torch
from torch import nn

from .process import NoiseProcess, eps_to_x0

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
        if prediction != "eps":
            raise ValueError(f"unsupported prediction {prediction!r}")
        self.model = model
        self.process = process
        self.prediction = prediction

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        t = t.reshape(-1).expand(x_t.shape[0]).to(x_t.device)
        out = self.model(x_t, self.process.model_time(t), cond)
        eps = out[:, : x_t.shape[1]].to(x_t.dtype)  # drop learned-variance channels
        return eps_to_x0(eps, x_t, self.process.alpha(t), self.process.sigma(t))

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.model.null_class)
