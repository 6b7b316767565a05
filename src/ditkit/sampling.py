"""High-level sampling: a model + config -> images, with guidance, seeding and batching handled."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .autoencoders import Autoencoder, build_autoencoder
from .config import Config
from .diffusion import ClampDenoised, ModelDenoiser, build_process
from .models.cuda_graph import CUDAGraphForward
from .models.feature_cache import feature_cache
from .models.layers import reuse_cast_weights
from .samplers import SAMPLERS, ClassifierFreeGuidance, StepCallback
from .utils.checks import count_at_least_one

__all__ = [
    "generate",
    "resolve_clip_denoised",
    "request_conditions",
    "default_cfg_scale",
    "resolve_sampler",
    "check_cuda_graph",
]


def check_cuda_graph(
    cuda_graph: bool | None,
    feature_cache_interval: int,
    names: tuple[str, str] = ("cuda_graph=True", "feature_cache_interval"),
) -> None:
    """Refuse an explicit CUDA-graph request together with feature caching (`feature_cache_interval` != 1):
    the cache changes the graph per step, so it cannot be honoured. `names` are how the caller spells the two
    settings in the error (the CLI passes its flags, so it can refuse before loading anything)."""
    if cuda_graph and feature_cache_interval != 1:
        raise ValueError(
            f"{names[0]} cannot be combined with {names[1]} {feature_cache_interval}: "
            "feature caching changes the graph per step"
        )


def resolve_clip_denoised(config: Config, clip_denoised: bool | None = None) -> bool:
    """Whether samplers clamp x0 estimates to [-1, 1]: `clip_denoised`, else `config.sample.clip_denoised`,
    else (both unset) exactly for pixel-space models, since the data range bounds x0 only in pixel space."""
    clip = config.sample.clip_denoised if clip_denoised is None else clip_denoised
    return config.autoencoder.kind == "pixel" if clip is None else bool(clip)


def resolve_sampler(config: Config, sampler: str | None, eta: float | None) -> tuple[Callable, dict[str, float]]:
    """The sampler function (`sampler`, else `config.sample.sampler`) and its keyword options: `eta` (else
    `config.sample.eta`) for a sampler that takes one; an explicit eta for one that does not is an error
    (config.sample.eta is DDIM's and is ignored there)."""
    name = config.sample.sampler if sampler is None else sampler
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    fn = SAMPLERS[name]
    if "eta" in inspect.signature(fn).parameters:
        return fn, {"eta": config.sample.eta if eta is None else eta}
    if eta:
        raise ValueError(f"sampler {name!r} takes no eta (got eta={eta})")
    return fn, {}


def default_cfg_scale(config: Config, cfg_scale: float | None) -> float:
    """`cfg_scale`, or `config.sample.cfg_scale` for a conditional model (1, no guidance, otherwise);
    refuses an explicit scale for an unconditional model."""
    guidable = config.model.conditional or config.model.text_conditional
    if not guidable and cfg_scale not in (None, 1.0):
        raise ValueError("an unconditional model cannot be guided: leave cfg_scale unset or 1")
    return (config.sample.cfg_scale if guidable else 1.0) if cfg_scale is None else cfg_scale


def request_conditions(
    config: Config,
    labels: torch.Tensor | list[int] | int | None,
    prompts: Sequence[str] | None,
    cfg_scale: float,
    device: torch.device,
    text_encoder=None,
) -> tuple[torch.Tensor, object]:
    """What a sampling request asks for: (labels, conds), checked against the model.

    `labels` comes back as (N,) longs on `device`, one per image (zeros that only count the images for
    unconditional and text models). `conds` is what the network is conditioned on: the labels of a
    class-conditional model, the prompts encoded with `text_encoder` (loaded from `config.text` when not
    given) for a text-conditioned one, None for an unconditional one. Guidance (`cfg_scale` != 1) needs
    a model trained with label or caption dropout.
    """
    m = config.model
    text = m.text_conditional
    if text != (prompts is not None):
        raise ValueError(
            "a text-conditioned model samples from prompts=[...]" if text else "this model takes no prompts (no text)"
        )
    if text and labels is not None:
        raise ValueError("a text-conditioned model takes prompts, not labels")
    conds = None
    if text:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        from .text import load_text_encoder

        encoder = text_encoder if text_encoder is not None else load_text_encoder(config.text, device=device)
        conds = encoder.encode(list(prompts)).to(device) if len(prompts) else None
        labels = torch.zeros(len(prompts), dtype=torch.long)  # only counts the images
    elif labels is None:
        raise ValueError("pass labels (class labels, or a number of images for an unconditional model)")
    if isinstance(labels, int):
        if m.conditional:
            raise ValueError("a class-conditional model needs one label per image, not a count")
        labels = torch.zeros(labels, dtype=torch.long)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if m.conditional and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= m.num_classes):
        raise ValueError(f"class labels must be in [0, {m.num_classes - 1}], got {labels.tolist()}")
    if cfg_scale != 1.0 and text and m.caption_dropout_prob == 0:
        raise ValueError("this model was trained without caption dropout, so it has no null text: use cfg_scale=1")
    if cfg_scale != 1.0 and not text and m.class_dropout_prob == 0:
        raise ValueError("this model was trained without label dropout, so it has no null class: use cfg_scale=1")
    if m.conditional:
        conds = labels
    return labels, conds


@torch.no_grad()
def generate(
    model: nn.Module,
    config: Config,
    labels: torch.Tensor | list[int] | int | None = None,
    *,
    prompts: Sequence[str] | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    eta: float | None = None,
    sampler: str | None = None,
    seed: int | None = None,
    clip_denoised: bool | None = None,
    spacing: str | None = None,
    guidance_interval: tuple[float, float] | None = None,
    batch_size: int = 256,
    callback: StepCallback | None = None,
    progress: bool = False,
    autoencoder: Autoencoder | None = None,
    decode: bool = True,
    feature_cache_interval: int = 1,
    sample_seeds: Sequence[int] | None = None,
    guidance_channels: int | None = None,
    text_encoder=None,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Sample one image per label; returns (N, C, H, W) images in [-1, 1] on the model's device.

    For an unconditional model pass the number of images as `labels`. Unset arguments take
    `config.sample`'s values (guidance defaults to off for unconditional models). The initial noise
    of the whole request is drawn up front from one generator seeded with `seed`, so with a
    deterministic sampler (ddim with eta=0, euler, heun, dpmpp_2m, dpmpp_3m) a request gives the same
    images whatever `batch_size` is (up to rounding in differently shaped kernels). Stochastic samplers
    (ddpm, ddim with eta > 0, euler_maruyama) then draw their per-step noise from that same generator
    batch after batch, so their images depend on how the request is split into batches (the same
    `seed` and `batch_size` still reproduce them); pass `sample_seeds` (below) for images that do not
    depend on the split. Latent models' samples are decoded with `autoencoder` (built from
    `config.autoencoder` when not given); `decode=False` returns the latents instead.
    `feature_cache_interval=k > 1` runs the transformer blocks on every k-th denoiser call only and reuses
    their residuals in between (`ditkit.models.feature_cache`): faster, approximate.
    With `sample_seeds` (one per image) image i's initial noise and every
    per-step noise come from its own generator seeded with `sample_seeds[i]` instead, so an image is
    the same whatever request or batch it is part of (mass sampling across processes relies on it).
    `guidance_channels=3` guides only the first three channels (the official DiT release's legacy).
    `cuda_graph` (default `config.sample.cuda_graph`) replays the network from CUDA graphs on a GPU
    (`ditkit.models.cuda_graph`); the config's default is skipped with feature caching, an explicit
    `cuda_graph=True` with it is an error.

    A text-conditioned model takes `prompts` (one image per prompt) instead of labels; they are encoded
    with `text_encoder` (a `ditkit.text.TextEncoder`, loaded from `config.text` when not given), and
    guidance contrasts each prompt with the model's learned null text.
    """
    # -1 returned the starting noise as images without a model call, 0 failed in range()
    batch_size = count_at_least_one(batch_size, "batch_size (images per model call)")
    sc = config.sample
    steps = sc.steps if steps is None else steps
    cfg_scale = default_cfg_scale(config, cfg_scale)
    sampler_fn, options = resolve_sampler(config, sampler, eta)
    seed = sc.seed if seed is None else seed
    device = next(model.parameters()).device
    labels, conds = request_conditions(config, labels, prompts, cfg_scale, device, text_encoder)
    process = build_process(config.diffusion)
    # The variance channels are only meaningful when the hybrid loss trained them.
    learned_variance = config.model.learn_sigma and config.diffusion.vlb_weight > 0
    check_cuda_graph(cuda_graph, feature_cache_interval)
    use_graph = sc.cuda_graph if cuda_graph is None else cuda_graph
    network = CUDAGraphForward(model) if use_graph and device.type == "cuda" and feature_cache_interval == 1 else model
    denoiser = ModelDenoiser(network, process, config.diffusion.prediction, learned_variance=learned_variance)
    if cfg_scale != 1.0:
        interval = sc.guidance_interval if guidance_interval is None else guidance_interval
        denoiser = ClassifierFreeGuidance(denoiser, cfg_scale, interval=interval, channels=guidance_channels)
    pixel_space = config.autoencoder.kind == "pixel"
    if resolve_clip_denoised(config, clip_denoised):
        denoiser = ClampDenoised(denoiser, -1.0, 1.0)
    generator = torch.Generator(device).manual_seed(seed)
    m = config.model
    per_sample: list[torch.Generator] | None = None
    if sample_seeds is not None:
        if len(sample_seeds) != len(labels):
            raise ValueError(f"got {len(sample_seeds)} sample_seeds for {len(labels)} images")
        per_sample = [torch.Generator(device).manual_seed(int(s)) for s in sample_seeds]
        shape = (1, m.in_channels, *m.input_hw)
        draws = [process.prior(shape, generator=g, device=device) for g in per_sample]
        noise = torch.cat(draws) if draws else torch.zeros(0, *shape[1:], device=device)
    else:
        noise = process.prior((len(labels), m.in_channels, *m.input_hw), generator=generator, device=device)
    grid = process.timesteps(steps, device=device, spacing=sc.spacing if spacing is None else spacing)
    out = []
    with reuse_cast_weights():  # the weights' bf16 copies made once for all batches (CPU inference)
        for start in range(0, len(labels), batch_size):
            with feature_cache(model, feature_cache_interval):
                x = noise[start : start + batch_size]
                x = sampler_fn(
                    denoiser,
                    x,
                    grid,
                    cond=conds[start : start + batch_size] if conds is not None else None,
                    generator=generator if per_sample is None else per_sample[start : start + batch_size],
                    callback=callback,
                    progress=progress,
                    **options,
                )
            out.append(x)
    samples = torch.cat(out) if out else noise
    if decode and not (pixel_space and autoencoder is None):
        if autoencoder is None:
            autoencoder = build_autoencoder(config, device=device)
        samples = torch.cat([autoencoder.decode(z) for z in samples.split(batch_size)]) if len(samples) else samples
    return samples.clamp(-1, 1) if decode else samples
