"""Sample a ditkit denoiser with any diffusers scheduler (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler,
DPMSolverMultistepScheduler, ...).

diffusers' schedulers ask the model for its raw output at (x, t): noise ('epsilon'), v ('v_prediction')
or x0 ('sample'). The adapter calls the ditkit denoiser at the scheduler's (scaled) model input and
timestep and converts the x0 estimate to what the scheduler's `prediction_type` names, through the one
conversion layer (`ditkit.diffusion.x0_to_prediction`). So a model trained with any ditkit objective
runs under any of these schedulers. The scheduler's `scale_model_input` must return the variance-
preserving x_t (true of the schedulers above: sigma-space ones divide by sqrt(sigma^2 + 1)).

A DDPMScheduler with `variance_type='learned_range'` also reads v in [-1, 1] from extra output channels
and takes the log-variance frac log beta' + (1 - frac) log beta_tilde, frac = (v + 1) / 2, with the
betas of its own (respaced) step: the interpolation of Improved DDPM that `sample_ddpm` uses. A
denoiser with a learned variance supplies it (v = 2 frac - 1 from `denoise_with_variance`). DDPMScheduler's
other learned type is refused, as is 'learned_range' without a learned variance. The DPM-Solver family
never reads a variance and gets the mean alone (refused only where it would cut a non-3-channel mean).

Schedulers keep step indices and multistep history inside the object; the adapter works on a deep
copy, so the caller's scheduler is never changed and the function can be called again.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from tqdm.auto import tqdm

from ..diffusion.denoiser import Denoiser
from ..diffusion.process import DiscreteVP, x0_to_prediction
from .ddim import StepCallback

__all__ = ["sample_with_scheduler", "PREDICTION_TYPES"]

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
"""diffusers `prediction_type` -> ditkit prediction name."""


def _passes_variance(denoiser: Denoiser, scheduler: Any, channels: int) -> bool:
    """Whether the scheduler reads a learned variance from the model output (only DDPMScheduler's
    'learned_range', whose semantics `sample_ddpm` shares); refuse the learned types it cannot be given.

    Other schedulers with a learned variance type (the DPM-Solver family) never read a variance: they are
    given the mean alone, as with a fixed type, except where they would cut it to its first 3 channels
    (epsilon prediction: `model_output[:, :3]`), which is wrong for any other channel count."""
    variance_type = getattr(scheduler.config, "variance_type", None)
    if variance_type not in ("learned", "learned_range"):
        return False
    name = type(scheduler).__name__
    is_ddpm = any(cls.__name__ == "DDPMScheduler" for cls in type(scheduler).__mro__)
    if not is_ddpm:
        if scheduler.config.prediction_type == "epsilon" and channels != 3:
            raise ValueError(
                f"{name} with variance_type={variance_type!r} and prediction_type='epsilon' keeps only the first 3 "
                f"channels of the model output, but these samples have {channels}; use variance_type=None"
            )
        return False
    if variance_type == "learned_range" and getattr(denoiser, "learned_variance", False):
        return True
    if variance_type == "learned":
        why = "'learned' reads the variance itself, not ditkit's interpolation fraction (that is 'learned_range')"
    else:
        why = "the denoiser has no learned variance (model.learn_sigma=false)"
    raise ValueError(
        f"{name} with variance_type={variance_type!r} is not supported: {why}; "
        "use variance_type='fixed_small' or 'fixed_large'"
    )


def _check_process(process: Any, scheduler: Any) -> None:
    if not isinstance(process, DiscreteVP):
        raise ValueError(f"diffusers schedulers need the discrete VP process, got {type(process).__name__}")
    theirs = getattr(scheduler, "alphas_cumprod", None)
    if theirs is None or len(theirs) != process.num_timesteps:
        raise ValueError(
            f"{type(scheduler).__name__} has {0 if theirs is None else len(theirs)} training steps; "
            f"the denoiser's process has {process.num_timesteps}"
        )
    if not torch.allclose(theirs.double().cpu(), process.alphas_cumprod, rtol=1e-4, atol=1e-7):
        raise ValueError(
            f"{type(scheduler).__name__}'s beta schedule differs from the denoiser's process "
            "(compare beta_schedule / beta_start / beta_end with the ditkit diffusion config)"
        )


@torch.no_grad()
def sample_with_scheduler(
    denoiser: Denoiser,
    scheduler: Any,
    x: torch.Tensor,
    steps: int,
    *,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run `scheduler` (a diffusers scheduler instance) for `steps` steps from standard normal `x` over `denoiser`."""
    process = denoiser.process
    _check_process(process, scheduler)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {list(PREDICTION_TYPES)}")
    prediction = PREDICTION_TYPES[prediction_type]
    with_variance = _passes_variance(denoiser, scheduler, x.shape[1])
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps, device=x.device)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    timesteps = scheduler.timesteps
    x = x * scheduler.init_noise_sigma
    n = x.shape[0]
    bar = tqdm(list(enumerate(timesteps)), desc="sampling", unit="step", disable=not progress, leave=False)
    for i, t in bar:
        x_in = scheduler.scale_model_input(x, t)  # the variance-preserving x_t
        t_vec = t.to(device=x.device, dtype=torch.float32).reshape(1).expand(n)
        if with_variance:
            denoised, frac = denoiser.denoise_with_variance(x_in, t_vec, cond)
        else:
            denoised = denoiser(x_in, t_vec, cond)
        out = x0_to_prediction(prediction, denoised, x_in, process.alpha(t_vec), process.sigma(t_vec))
        if with_variance:
            out = torch.cat([out, (2 * frac - 1).to(out.dtype)], dim=1)  # (N, 2C, ...): the scheduler splits it
        extra = {"generator": generator} if takes_generator else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
        if callback is not None:
            callback({"i": i, "num_steps": len(timesteps), "t": t, "x": x, "denoised": denoised})
    return x
