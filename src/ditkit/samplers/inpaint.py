"""Inpainting over the denoiser contract: RePaint (Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865)
for any model, and a denoiser for models trained with a mask channel (as in Stable Diffusion's
inpainting model, Rombach et al. 2022, https://arxiv.org/abs/2112.10752).

`known_mask` is 1 where the pixel is known (kept) and 0 where it is to be generated, broadcastable to x.

RePaint replaces the known region of x_t, at every step, with the known image noised to the same t,
x_t[known] = alpha_t x0_known + sigma_t z, and lets the model fill in the rest. Replacement alone
conditions the unknown region only through the noisy known pixels, so the two halves can disagree;
RePaint's resampling walks back up the chain (`jump` steps, forward-noised with q(x_t | x_s)) and
down again, `resample - 1` extra times at every `jump`-th step, which lets them harmonise. The
replacement has to touch x_t between steps, which a denoiser wrapper cannot do, so RePaint is its own
sampler; its down steps are DDIM steps (eta = 1, the default, is DDPM's ancestral step as in the paper).

The trained variant needs no special sampler: `MaskConditionedDenoiser` feeds the network the mask and
the masked image as extra input channels, so every sampler in `SAMPLERS` inpaints with it.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..diffusion.denoiser import Denoiser, ModelDenoiser
from ..diffusion.process import NoiseProcess, x0_to_eps
from .ddim import StepCallback
from .grid import sampling_grid

__all__ = ["sample_repaint", "repaint_schedule", "MaskConditionedDenoiser", "mask_channels"]


def repaint_schedule(steps: int, jump: int = 1, resample: int = 1) -> list[int]:
    """Indices into the (steps + 1,) time grid visited by RePaint, starting at 0 (noise), ending at `steps`.

    Going down one index is a denoising step; going up is forward noising. At every index that is a
    multiple of `jump` (before the last) the walk goes back up `jump` indices, `resample - 1` times.
    """
    if steps < 1 or jump < 1 or resample < 1:
        raise ValueError(f"steps, jump and resample must be >= 1, got {steps}, {jump}, {resample}")
    path, i, done = [0], 0, {}
    while i < steps:
        i += 1
        path.append(i)
        if i < steps and i % jump == 0 and done.get(i, 0) < resample - 1:
            done[i] = done.get(i, 0) + 1
            for _ in range(min(jump, i)):
                i -= 1
                path.append(i)
    return path


def _noise_known(process: NoiseProcess, known: torch.Tensor, t: torch.Tensor, generator) -> torch.Tensor:
    """known noised to time t: alpha_t known + sigma_t z."""
    noise = torch.randn(known.shape, generator=generator, device=known.device, dtype=known.dtype)
    return process.add_noise(known, noise, t.expand(known.shape[0]))


@torch.no_grad()
def sample_repaint(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int | torch.Tensor,
    *,
    known: torch.Tensor,
    known_mask: torch.Tensor,
    cond: torch.Tensor | None = None,
    jump: int = 1,
    resample: int = 1,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Inpaint: sample from `x` (a prior draw) keeping `known` wherever `known_mask` is 1 (RePaint).

    The result equals `known` exactly on the known region. The callback sees every denoising step
    ('i' counts them, 'num_steps' is their total including resampling).
    """
    if not 0 <= eta <= 1:  # above 1 a step can need more fresh noise than the next level holds
        raise ValueError(f"eta must be in [0, 1] (1: DDPM's posterior variance), got {eta}")
    process = denoiser.process
    grid = sampling_grid(process, steps, x.device)  # (steps + 1,), last entry is the data end
    n_steps = len(grid) - 1
    mask = known_mask.to(device=x.device, dtype=x.dtype).expand_as(x)
    known = known.to(device=x.device, dtype=x.dtype).expand_as(x)
    alphas, sigmas = process.alpha(grid).to(x.device), process.sigma(grid).to(x.device)
    path = repaint_schedule(n_steps, jump, resample)
    total = sum(1 for a, b in zip(path, path[1:]) if b > a)
    n = x.shape[0]
    x = mask * _noise_known(process, known, grid[0], generator) + (1 - mask) * x
    bar = tqdm(total=total, desc="inpainting", unit="step", disable=not progress, leave=False)
    done = 0
    for cur, nxt in zip(path, path[1:]):
        a_t, s_t, a_s, s_s = alphas[cur], sigmas[cur], alphas[nxt], sigmas[nxt]
        if nxt < cur:  # back up: x_t ~ q(x_t | x_s) = N((a_t / a_s) x_s, (s_t^2 - (a_t / a_s)^2 s_s^2) I)
            a_t, s_t, a_s, s_s = alphas[nxt], sigmas[nxt], alphas[cur], sigmas[cur]
            ratio = a_t / a_s
            std = torch.sqrt((s_t**2 - ratio**2 * s_s**2).clamp(min=0))
            x = ratio * x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            continue
        denoised = denoiser(x, grid[cur].expand(n), cond)
        eps = x0_to_eps(denoised, x, a_t.expand(n), s_t.expand(n))
        if s_s > 0 and eta > 0:
            snr_ratio = (a_t**2 * s_s**2) / (a_s**2 * s_t**2)
            c = eta * s_s * torch.sqrt((1 - snr_ratio).clamp(min=0))
        else:
            c = torch.zeros((), device=x.device)
        x = a_s * denoised + torch.sqrt((s_s**2 - c**2).clamp(min=0)) * eps
        if c > 0:
            x = x + c * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        known_s = known if s_s == 0 else _noise_known(process, known, grid[nxt], generator)
        x = mask * known_s + (1 - mask) * x
        if callback is not None:
            callback({"i": done, "num_steps": total, "t": grid[cur], "x": x, "denoised": denoised})
        done += 1
        bar.update(1)
    bar.close()
    return x


def mask_channels(known: torch.Tensor, known_mask: torch.Tensor) -> torch.Tensor:
    """The extra input of a mask-conditioned model: [mask (1 channel), known * mask (C channels)]."""
    mask = known_mask.to(known.dtype).expand(known.shape[0], 1, *known.shape[2:])
    return torch.cat([mask, known * mask], dim=1)  # (N, 1 + C, H, W)


class MaskConditionedDenoiser(ModelDenoiser):
    """A model with `ModelConfig.inpaint` as a denoiser: x_t goes in with the mask and the masked image.

    Usable with every sampler; the sampled known region is close to, not exactly, the known image, so
    callers paste it back at the end (`ditkit.inpainting.inpaint` does). Every network call, the plain
    x0 estimate and `denoise_with_variance` alike, sees the mask channels.

    `learned_variance` defaults to False even for a `learn_sigma` model: `ditkit.inpainting.inpaint_loss`
    trains only the prediction channels (no hybrid loss), so the variance channels hold untrained output.
    """

    def __init__(
        self,
        model: nn.Module,
        process: NoiseProcess,
        prediction: str,
        known: torch.Tensor,
        known_mask: torch.Tensor,
        *,
        learned_variance: bool = False,
    ) -> None:
        super().__init__(model, process, prediction, learned_variance=learned_variance)
        self.extra = mask_channels(known, known_mask)  # (N, 1 + C, H, W)

    def _network_input(self, x_t: torch.Tensor) -> torch.Tensor:
        """[x_t, mask, masked image]: (N, 2C + 1, H, W), on every path (plain x0 and with variance)."""
        extra = self.extra.to(x_t)
        if extra.shape[0] != x_t.shape[0]:  # guidance doubles the batch: the same masks for both halves
            extra = extra.repeat(x_t.shape[0] // extra.shape[0], 1, 1, 1)
        return torch.cat([x_t, extra], dim=1)
