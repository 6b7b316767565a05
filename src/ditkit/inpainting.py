"""Inpainting and outpainting from a checkpoint, and the random masks that train mask-conditioned models.

Two ways to inpaint (`method`):

- 'repaint': any model, no training. RePaint (Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865)
  keeps the known region on the noised trajectory at every step, with optional resampling
  (`ditkit.samplers.inpaint.sample_repaint`).
- 'trained': a model with `ModelConfig.inpaint` sees the mask and the masked image as extra input
  channels (as Stable Diffusion's inpainting model does, Rombach et al. 2022,
  https://arxiv.org/abs/2112.10752), so any sampler works; the known pixels are pasted back at the end.

Outpainting grows an image towards one side by repeated inpainting of a window that overlaps the
image and reaches past it (the way seed 002 grew its "cyberpunk marketplace" scenery).
`known_mask` is 1 where a pixel is known and 0 where it is to be generated, everywhere in ditkit; mask
PNGs (the CLI, the studio page) are the other way round, white = paint here, as in image editors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import Config, ConfigError
from .diffusion import ClampDenoised, Denoiser, ModelDenoiser, NoiseProcess, build_process, diffusion_loss
from .distributed import stream_seed
from .samplers import SAMPLERS, ClassifierFreeGuidance, StepCallback
from .samplers.inpaint import MaskConditionedDenoiser, mask_channels, sample_repaint
from .sampling import default_cfg_scale, request_conditions, resolve_clip_denoised, resolve_sampler

__all__ = [
    "Direction",
    "InpaintMethod",
    "random_known_masks",
    "inpaint_loss",
    "inpaint",
    "outpaint",
    "outpaint_keep",
    "check_image_model",
    "load_image",
    "known_mask_from",
    "load_mask",
]

InpaintMethod = Literal["auto", "repaint", "trained"]
Direction = Literal["left", "right", "up", "down"]
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

MASK_KINDS = ("none", "rectangle", "brush", "side")
"""Training masks: nothing known (keeps plain sampling working), a rectangular hole, brush strokes, or
only one side known (outpainting)."""
MASK_PROBS = (0.1, 0.35, 0.25, 0.3)


def _uniform(generator: torch.Generator | None, device: torch.device, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _draw_mask_shapes(
    n: int, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of `n` training masks, in their stream order: (kind (n,), u (n, 8), points (n, 3, 2, 2))."""
    kind = torch.multinomial(torch.tensor(MASK_PROBS, device=device), n, replacement=True, generator=generator)
    u = _uniform(generator, device, n, 8)  # per-image shape parameters, all drawn at once
    points = _uniform(generator, device, n, 3, 2, 2)  # brush stroke ends, as fractions of (H, W)
    return kind, u, points


def _masks_from_shapes(
    kind: torch.Tensor, u: torch.Tensor, points: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(n, 1, H, W) float masks, 1 = known, from the draws of `_draw_mask_shapes` (no randomness here)."""
    n, device = kind.shape[0], kind.device
    rows = torch.arange(height, device=device).view(1, height, 1).float()  # (1, H, 1)
    cols = torch.arange(width, device=device).view(1, 1, width).float()  # (1, 1, W)
    # Rectangle hole: 20-70 % of each side, anywhere.
    rh, rw = (0.2 + 0.5 * u[:, 0]) * height, (0.2 + 0.5 * u[:, 1]) * width
    top, left = u[:, 2] * (height - rh), u[:, 3] * (width - rw)
    hole = (rows >= top.view(-1, 1, 1)) & (rows < (top + rh).view(-1, 1, 1))
    hole = hole & (cols >= left.view(-1, 1, 1)) & (cols < (left + rw).view(-1, 1, 1))  # (n, H, W)
    # Brush: 3 straight strokes between random points, radius 6-15 % of the shorter side.
    points = points * torch.tensor([height, width], device=device)  # (n, S, 2, 2)
    radius = (0.06 + 0.09 * u[:, 4]).view(-1, 1, 1, 1) * min(height, width)
    pix = torch.stack(torch.broadcast_tensors(rows, cols), dim=-1).view(1, 1, height, width, 2)  # (1, 1, H, W, 2)
    a, b = points[:, :, 0].view(n, 3, 1, 1, 2), points[:, :, 1].view(n, 3, 1, 1, 2)
    ab = b - a
    frac = (((pix - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-6)).clamp(0, 1)  # (n, S, H, W)
    dist = (pix - (a + frac.unsqueeze(-1) * ab)).norm(dim=-1)
    brush = (dist <= radius).any(dim=1)  # (n, H, W)
    # Side: a band of 25-75 % on one side is unknown.
    side = torch.floor(u[:, 5] * 4).long()
    frac_unknown = 0.25 + 0.5 * u[:, 6]
    band = torch.stack(
        [
            cols < (frac_unknown * width).view(-1, 1, 1) + 0 * rows,  # left unknown
            cols >= ((1 - frac_unknown) * width).view(-1, 1, 1) + 0 * rows,  # right unknown
            rows < (frac_unknown * height).view(-1, 1, 1) + 0 * cols,  # top unknown
            rows >= ((1 - frac_unknown) * height).view(-1, 1, 1) + 0 * cols,  # bottom unknown
        ],
        dim=1,
    )[torch.arange(n, device=device), side]  # (n, H, W)
    unknown = torch.ones(n, height, width, dtype=torch.bool, device=device)
    unknown = torch.where((kind == 1).view(-1, 1, 1), hole, unknown)
    unknown = torch.where((kind == 2).view(-1, 1, 1), brush, unknown)
    unknown = torch.where((kind == 3).view(-1, 1, 1), band, unknown)
    return (~unknown).float().unsqueeze(1)  # (n, 1, H, W)


def random_known_masks(
    n: int, height: int, width: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(n, 1, H, W) float masks, 1 = known: a mix of rectangles, brush strokes, sides and empty masks."""
    device = torch.device(device)
    return _masks_from_shapes(*_draw_mask_shapes(n, generator, device), height, width)


def inpaint_loss(
    model: nn.Module,
    process: NoiseProcess,
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`diffusion_loss` for a mask-conditioned model: the input carries a random mask and the masked x0.

    `t`, `noise` and the (N, 1, H, W) `known_mask` may be given (drawn per sample by the training loop);
    otherwise they come from `generator`. Only the first C output channels are trained: a `learn_sigma`
    model's variance channels get no loss.
    """
    n, _, height, width = x0.shape
    # Drawn here, in this order (t, noise, mask), so that a given generator gives the same batch as ever.
    if t is None:
        t = process.sample_t(n, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if known_mask is None:
        known_mask = random_known_masks(n, height, width, generator=generator, device=x0.device)
    masked = mask_channels(x0, known_mask.to(x0.dtype))  # (N, C + 1, H, W): with x_t, the 2C + 1 input
    return diffusion_loss(
        model, process, x0, cond, generator=generator, prediction=prediction, t=t, noise=noise, extra_input=masked
    )


def stream_masks(
    height: int, width: int, positions: range, *, seed: int, batch_index: int, device: torch.device
) -> torch.Tensor:
    """(n, 1, H, W) training masks, one per position of the global batch, each from its own stream (as
    `ditkit.distributed.draw_streams` draws t and noise), so a sample's mask does not depend on how the
    batch is split over ranks or accumulation steps."""
    # Only the few draws are per sample (each from its own stream, in the order random_known_masks draws
    # them, so each mask is the one a lone random_known_masks(1, ...) call on that stream gives); the
    # masks are then built for the whole batch at once: a mask per sample took 3x as long at batch 64.
    g = torch.Generator(device)
    draws = []
    for j in positions:
        g.manual_seed(stream_seed(seed, batch_index, j))
        draws.append(_draw_mask_shapes(1, g, device))
    kind, u, points = (torch.cat(parts) for parts in zip(*draws))
    return _masks_from_shapes(kind, u, points, height, width)


@torch.no_grad()
def inpaint(
    model: nn.Module,
    config: Config,
    image: torch.Tensor,
    known_mask: torch.Tensor,
    labels: torch.Tensor | list[int] | int | None = None,
    *,
    prompts: Sequence[str] | None = None,
    text_encoder=None,
    method: InpaintMethod = "auto",
    steps: int | None = None,
    sampler: str | None = None,
    cfg_scale: float | None = None,
    seed: int | None = None,
    jump: int = 1,
    resample: int = 1,
    eta: float | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Fill the unknown region (known_mask 0) of `image` (1 or N, C, H, W) in [-1, 1]; one result per label
    (or per prompt, for a text-conditioned model: encoded with `text_encoder`, as in `generate`).

    'auto' takes 'trained' for a model with `model.inpaint`, else 'repaint'. `jump`, `resample` and
    `eta` (default 1: DDPM steps) belong to 'repaint'; `sampler` to 'trained', where `eta` goes to a
    sampler that takes one (ddim) and is an error for the others. A setting the named method would
    ignore is an error (jump or resample other than 1 for 'trained'; for 'repaint' a sampler other than
    `config.sample.sampler`, which it ignores as it does an unset one); 'auto' takes both methods'
    settings, for callers that do not know the model, and uses those of the method it picks. x0
    estimates are clamped to [-1, 1] as in `generate` (`config.sample.clip_denoised`; unset: on for
    pixel-space models). The known pixels of the result equal `image` exactly.
    """
    m, sc = config.model, config.sample
    requested = method
    if method == "auto":
        method = "trained" if m.inpaint else "repaint"
    if method not in ("repaint", "trained"):
        raise ValueError(f"unknown inpainting method {method!r}; choose auto, repaint or trained")
    if method == "trained" and not m.inpaint:
        raise ValueError("method 'trained' needs a model trained with model.inpaint=true; use 'repaint'")
    _check_method_options(config, requested, sampler, jump, resample)
    device = next(model.parameters()).device
    scale = default_cfg_scale(config, cfg_scale)
    labels, cond = request_conditions(config, labels, prompts, scale, device, text_encoder)
    n = len(labels)
    shape = (m.in_channels, *m.input_hw)
    if image.dim() != 4 or tuple(image.shape[1:]) != shape or image.shape[0] not in (1, n):
        raise ValueError(f"image must be (1 or {n}, {', '.join(map(str, shape))}), got {tuple(image.shape)}")
    if (
        known_mask.dim() != 4
        or known_mask.shape[0] not in (1, n)
        or known_mask.shape[1] != 1
        or tuple(known_mask.shape[2:]) != m.input_hw
    ):
        hw = f"{m.input_hw[0]}, {m.input_hw[1]}"
        raise ValueError(f"known_mask must be (1 or {n}, 1, {hw}), got {tuple(known_mask.shape)}")
    image = image.to(device).float().expand(n, *shape)
    known_mask = known_mask.to(device).float().expand(n, 1, *m.input_hw)
    process = build_process(config.diffusion)
    base: Denoiser
    if m.inpaint:
        # inpaint_loss trains no variance channels (no hybrid loss), so a learn_sigma model's are untrained
        # output: never let ddpm read them, sample with its fixed variance instead.
        base = MaskConditionedDenoiser(
            model, process, config.diffusion.prediction, image, known_mask, learned_variance=False
        )
    else:
        base = ModelDenoiser(model, process, config.diffusion.prediction)
    if scale != 1.0:
        base = ClassifierFreeGuidance(base, scale, interval=sc.guidance_interval)
    denoiser = ClampDenoised(base, -1.0, 1.0) if resolve_clip_denoised(config) else base
    generator = torch.Generator(device).manual_seed(sc.seed if seed is None else seed)
    steps = sc.steps if steps is None else steps
    grid = process.timesteps(steps, device=device, spacing=sc.spacing)
    x = process.prior((n, *shape), generator=generator, device=device)
    if method == "repaint":
        out = sample_repaint(
            denoiser,
            x,
            grid,
            known=image,
            known_mask=known_mask,
            cond=cond,
            jump=jump,
            resample=resample,
            eta=1.0 if eta is None else eta,
            generator=generator,
            callback=callback,
            progress=progress,
        )
    else:
        sampler_fn, options = resolve_sampler(config, sampler, eta)
        out = sampler_fn(
            denoiser, x, grid, cond=cond, generator=generator, callback=callback, progress=progress, **options
        )
    out = out.clamp(-1, 1)
    return known_mask * image + (1 - known_mask) * out


def _check_method_options(config: Config, requested: str, sampler: str | None, jump: int, resample: int) -> None:
    """Refuse what an explicitly named inpainting method would silently ignore, as `resolve_sampler` refuses
    an eta its sampler does not take; the values that change nothing (jump = resample = 1, the config's own
    sampler) pass. Under 'auto' both methods' settings are accepted, and only checked to be valid."""
    if requested == "repaint" and sampler is not None and sampler != config.sample.sampler:
        raise ValueError(
            f"sampler {sampler!r} does not apply to method 'repaint' (its steps are its own: DDIM steps with "
            "eta, default 1); leave sampler unset, or use method 'trained' with a model.inpaint model"
        )
    if requested == "trained" and (jump != 1 or resample != 1):
        given = " and ".join(
            f"{name}={value}" for name, value in (("jump", jump), ("resample", resample)) if value != 1
        )
        raise ValueError(
            f"{given} does not apply to method 'trained' (resampling is RePaint's, method 'repaint'); "
            "leave jump and resample at 1"
        )
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if jump < 1 or resample < 1:
        raise ValueError(f"jump and resample must be >= 1, got jump={jump}, resample={resample}")


def _to_rows_last(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Rotate (N, C, H, W) so that growing towards `direction` becomes growing to the right."""
    turns = {"right": 0, "down": 1, "left": 2, "up": 3}[direction]  # counter-clockwise: bottom -> right
    return torch.rot90(x, turns, dims=(2, 3))


def _from_rows_last(x: torch.Tensor, direction: str) -> torch.Tensor:
    turns = {"right": 0, "down": 1, "left": 2, "up": 3}[direction]
    return torch.rot90(x, -turns, dims=(2, 3))


@torch.no_grad()
def outpaint(
    model: nn.Module,
    config: Config,
    image: torch.Tensor,
    labels: torch.Tensor | list[int] | int | None = None,
    *,
    direction: Direction = "right",
    times: int = 1,
    overlap: float = 0.5,
    seed: int | None = None,
    callback: StepCallback | None = None,
    **inpaint_options,
) -> torch.Tensor:
    """Extend `image` (1 or N, C, H, W) towards `direction` by `times` inpainting rounds of a model-size window.

    Each round the window keeps `overlap` of its extent from the current picture and generates the rest,
    so the picture grows by round((1 - overlap) * side) pixels per round. The side across the direction
    must be the model's; along it the picture may have any length >= the overlap. Returns (N, C, H', W').
    A text-conditioned model takes `prompts=[...]` (and optionally `text_encoder`) among `inpaint_options`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")
    if not 0.0 < overlap < 1.0:
        raise ValueError(f"overlap must be in (0, 1), got {overlap}")
    m = config.model
    h, w = m.input_hw
    across, along = (h, w) if direction in ("left", "right") else (w, h)
    keep = outpaint_keep(overlap, along)
    canvas = _to_rows_last(image.float(), direction)  # (N, C, across, length): grow to the right
    if canvas.shape[2] != across or canvas.shape[3] < keep:
        raise ValueError(
            f"to outpaint {direction}, the image must be {across} px across the direction and >= {keep} px "
            f"along it (model input {h}x{w}); got {image.shape[2]}x{image.shape[3]}"
        )
    base_seed = config.sample.seed if seed is None else seed
    for k in range(times):
        window = torch.zeros(canvas.shape[0], canvas.shape[1], across, along, device=canvas.device)
        window[..., :keep] = canvas[..., -keep:]
        known = torch.zeros(1, 1, across, along, device=canvas.device)
        known[..., :keep] = 1
        round_callback = None
        if callback is not None:
            round_callback = _round_callback(callback, k, times)
        filled = inpaint(
            model,
            config,
            _from_rows_last(window, direction),
            _from_rows_last(known, direction),
            labels,
            seed=base_seed + k,
            callback=round_callback,
            **inpaint_options,
        )
        filled = _to_rows_last(filled.to(canvas.device), direction)
        canvas = canvas.expand(filled.shape[0], *canvas.shape[1:])
        canvas = torch.cat([canvas, filled[..., keep:]], dim=3)  # (N, C, across, length + along - keep)
    return _from_rows_last(canvas, direction)


def outpaint_keep(overlap: float, window: int) -> int:
    """Pixels of the model's `window` (its side along the direction) that each outpainting round keeps
    from the picture so far; ValueError when that is the whole window (no round would add a pixel)."""
    keep = max(1, round(overlap * window))
    if keep >= window:
        raise ValueError(
            f"overlap={overlap:g} keeps all {window} px of the model's window: nothing would be generated; "
            f"use an overlap below {(window - 0.5) / window:.3g}"
        )
    return keep


def _round_callback(callback: StepCallback, k: int, rounds: int) -> StepCallback:
    def wrapped(info: dict) -> None:
        callback({**info, "round": k, "rounds": rounds})

    return wrapped


def check_image_model(config: Config) -> None:
    """Refuse a checkpoint that cannot inpaint or outpaint images given as pixels (the CLI, the studio).

    Those paste the image's pixels into the model's input, so the model must work on pixels
    (`autoencoder.kind='pixel'`) with 1 or 3 channels; a latent model's input is the autoencoder's
    latents, which an image and a pixel mask are not.
    """
    m, kind = config.model, config.autoencoder.kind
    if kind != "pixel":
        raise ConfigError(
            "inpainting and outpainting from images need a pixel-space checkpoint (autoencoder.kind='pixel'); "
            f"this one is a latent model (autoencoder.kind={kind!r}, {m.in_channels} latent channels)"
        )
    if m.in_channels not in (1, 3):
        raise ConfigError(f"inpainting from images needs a 1- or 3-channel model, this one has {m.in_channels}")


def load_image(path: str | Path, config: Config, *, resize: bool = True) -> torch.Tensor:
    """A PNG/JPEG as (1, C, H, W) in [-1, 1] with the model's channels, resized to its input unless not `resize`.

    ConfigError for a checkpoint that cannot take images (`check_image_model`)."""
    path = Path(path)
    check_image_model(config)
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err
    img = img.convert("L" if config.model.in_channels == 1 else "RGB")
    if resize:
        h, w = config.model.input_hw
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    x = torch.from_numpy(arr)
    return (x[None, None] if x.dim() == 2 else x.permute(2, 0, 1)[None]).contiguous()  # (1, C, H, W)


def known_mask_from(
    mask: Image.Image,
    image_size: tuple[int, int] | None,
    size: tuple[int, int],
    *,
    mask_name: str = "the mask",
    image_name: str = "the image",
) -> torch.Tensor:
    """A mask image (white = to generate, black = keep; or painted strokes over transparency) as a
    (1, 1, H, W) known mask (1 = keep) scaled to `size` (H, W).

    The one check of masks shared by `ditkit inpaint` and the studio: ValueError, naming the mask, when its
    shape is not that of `image_size` (W, H: the image it was painted over; None skips this) or it marks
    nothing to generate, before or after scaling (the result would be the input unchanged). A mask of
    another size with the image's aspect ratio (up to a pixel's rounding), e.g. one painted at the model's
    resolution, is scaled like any other.
    """
    if image_size is not None:
        (mw, mh), (iw, ih) = mask.size, image_size
        if abs(mw * ih - mh * iw) > max(iw, ih):  # cross-multiplied aspect ratios
            raise ValueError(
                f"{mask_name} is {mw}x{mh} px but {image_name} is {iw}x{ih} px, another shape: paint the mask "
                "over the image, at the image's size (or any size of the same aspect ratio)"
            )
    if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema()[0] < 255:
        mask = mask.getchannel("A")  # a painted layer over transparency: the strokes mark the region
    mask = mask.convert("L")
    painted = int((np.asarray(mask) > 127).sum())
    if painted == 0:
        raise ValueError(f"{mask_name} is empty (no white pixel): paint the region to fill white, the rest black")
    h, w = size
    if mask.size != (w, h):
        mask = mask.resize((w, h), Image.Resampling.NEAREST)
    paint = torch.from_numpy(np.asarray(mask) > 127)  # (H, W)
    if not paint.any():
        raise ValueError(
            f"{mask_name} marks only {painted} px to fill, and none is left once it is scaled to the model's "
            f"{w}x{h} px: paint a larger region"
        )
    return (~paint).float()[None, None]


def load_mask(path: str | Path, size: tuple[int, int], *, image: str | Path | None = None) -> torch.Tensor:
    """A mask PNG (white = to generate) as a (1, 1, H, W) known mask (1 = keep), resized to `size` (H, W).

    With `image` (the file the mask is painted over) the mask must have that image's shape. ValueError
    naming the file for an unreadable, empty or (with `image`) differently sized mask (`known_mask_from`)."""
    path = Path(path)
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable mask image ({err})") from err
    image_size = None
    if image is not None:
        try:
            with Image.open(image) as src:  # reads the header only
                image_size = src.size
        except (OSError, ValueError) as err:
            raise ValueError(f"{image}: not a readable image ({err})") from err
    return known_mask_from(img, image_size, size, mask_name=f"the mask {path}", image_name=f"the image {image}")
