"""The one contract between networks and samplers: `denoiser(x_t, t, cond) -> x0 estimate`.

Following Karras et al. 2022 (https://arxiv.org/abs/2206.00364) and k-diffusion, a network is wrapped
once into a denoiser; every sampler is a function over that contract and reads alpha(t), sigma(t) from
`denoiser.process`. Whatever the network predicts is converted here and nowhere else.

A network with a learned variance (DiT's `learn_sigma`, Nichol & Dhariwal 2021) also outputs, per
element, v in [-1, 1] that interpolates the log-variance of a DDPM step between log beta and log
beta_tilde. That is not part of the x0 contract: a denoiser that has it sets `learned_variance = True`
and offers `denoise_with_variance(x_t, t, cond) -> (x0, frac)`, frac = (v + 1) / 2 in [0, 1]. The
sampler turns frac into a log-variance with the betas of *its* step (which depend on the grid), so
the denoiser stays stateless.
"""

from __future__ import annotations

import torch
from torch import nn

from .process import NoiseProcess, prediction_to_x0

__all__ = ["Denoiser", "ModelDenoiser"]


class Denoiser:
    """Protocol: a callable (x_t (N, ...), t (N,), cond) -> denoised x0 (N, ...), with `process`."""

    process: NoiseProcess
    learned_variance: bool = False
    """Whether `denoise_with_variance` is available."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of `cond` (used by classifier-free guidance)."""
        raise NotImplementedError

    def denoise_with_variance(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, frac): the denoised estimate and the learned log-variance interpolation in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__} has no learned variance")


class ModelDenoiser(Denoiser):
    """Wraps a class-conditional network trained with the given prediction target.

    `learned_variance` defaults to the model's `config.learn_sigma` (its second half of output channels).
    """

    def __init__(
        self, model: nn.Module, process: NoiseProcess, prediction: str = "eps", learned_variance: bool | None = None
    ) -> None:
        if prediction not in ("eps", "v", "x0", "flow"):
            raise ValueError(f"unsupported prediction {prediction!r}; expected 'eps', 'v', 'x0' or 'flow'")
        # The rule DiffusionConfig states for process 'flow', here for any process object: where alpha(t_max) = 0
        # the noise says nothing about x0 = (x_t - sigma eps) / alpha, and every sampler's first step is NaN.
        if prediction == "eps" and float(process.alpha(torch.tensor([process.t_max]))) == 0.0:
            raise ValueError(
                f"prediction 'eps' cannot sample {type(process).__name__} (alpha = 0 at its noise end "
                f"t={process.t_max}, so x0 = (x_t - sigma eps) / alpha is undefined); use 'v', 'x0' or 'flow'"
            )
        self.model = model
        self.process = process
        self.prediction = prediction
        if learned_variance is None:
            learned_variance = bool(getattr(getattr(model, "config", None), "learn_sigma", False))
        self.learned_variance = learned_variance

    def _forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, raw extra channels) from one network call."""
        t = t.reshape(-1).expand(x_t.shape[0]).to(x_t.device)
        out = self.model(self._network_input(x_t), self.process.model_time(t), cond)
        channels = x_t.shape[1]
        pred = out[:, :channels].to(x_t.dtype)
        derivatives = {}
        if self.prediction == "flow":
            derivatives = dict(alpha_dot=self.process.alpha_dot(t), sigma_dot=self.process.sigma_dot(t))
        x0 = prediction_to_x0(self.prediction, pred, x_t, self.process.alpha(t), self.process.sigma(t), **derivatives)
        return x0, out[:, channels:]

    def _network_input(self, x_t: torch.Tensor) -> torch.Tensor:
        """What the network is called on for x_t (subclasses add conditioning channels)."""
        return x_t

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self._forward(x_t, t, cond)[0]  # learned-variance channels (if any) dropped

    @torch.no_grad()
    def denoise_with_variance(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.learned_variance:
            raise NotImplementedError("this model has no learned variance (model.learn_sigma=false)")
        x0, extra = self._forward(x_t, t, cond)
        if extra.shape[1] != x_t.shape[1]:
            raise ValueError(
                f"a learned variance needs {2 * x_t.shape[1]} output channels, got {x0.shape[1] + extra.shape[1]}"
            )
        return x0, (extra.to(x_t.dtype) + 1) / 2  # unclamped, as trained (the hybrid loss does not bound v)

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
        self.learned_variance = getattr(denoiser, "learned_variance", False)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.denoiser(x_t, t, cond).clamp(self.low, self.high)

    def denoise_with_variance(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x0, frac = self.denoiser.denoise_with_variance(x_t, t, cond)
        return x0.clamp(self.low, self.high), frac

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser.null_cond(cond)
