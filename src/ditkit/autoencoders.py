"""Autoencoders behind one interface: images <-> the space a DiT is trained in.

Latent diffusion (Rombach et al. 2022, https://arxiv.org/abs/2112.10752) trains the DiT on a VAE's
latents; DiT itself uses Stable Diffusion's KL autoencoder with 4x32x32 latents for 256 px images.
Three kinds share the interface:

- pixel space: the identity (what the bundled digits demo uses);
- a diffusers `AutoencoderKL` (SD-VAE ft-ema / ft-mse, SDXL VAE, ...) from a local folder or hub id;
- a diffusers `AutoencoderTiny` (TAESD), deterministic and fast, for previews.

The encoder gives the *raw* posterior N(mean, exp(logvar)); the model sees z = (raw - shift) * scale.
Scale and shift are read from the autoencoder's own config (or measured from data) and stored in
`AutoencoderConfig` once: no other module knows 0.18215.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .config import AutoencoderConfig, Config, ConfigError

__all__ = [
    "Autoencoder",
    "AutoencoderError",
    "LatentDistribution",
    "PixelSpace",
    "DiffusersAutoencoder",
    "build_autoencoder",
    "resolve_autoencoder",
    "read_autoencoder_config",
    "autoencoder_shape",
    "folder_kind",
]


class AutoencoderError(ConfigError):
    """An autoencoder cannot be loaded or does not fit the data; the message names the path."""


class LatentDistribution(NamedTuple):
    """A diagonal Gaussian over raw latents; `logvar` is None for a deterministic encoder."""

    mean: torch.Tensor
    logvar: torch.Tensor | None

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + exp(logvar / 2) * noise, with the noise drawn from `generator` (the mean if deterministic)."""
        if self.logvar is None:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise


def _per_channel(value: float | list[float] | None, default: float, channels: int, name: str) -> torch.Tensor:
    if value is None:
        value = default
    values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != channels:
        raise ConfigError(f"autoencoder.{name} has {len(values)} values but the latent has {channels} channels")
    return torch.tensor(values, dtype=torch.float32).reshape(1, channels, 1, 1)


class Autoencoder(nn.Module):
    """encode: images in [-1, 1] -> model latents z; decode: z -> images in [-1, 1] (not clamped)."""

    latent_channels: int
    downsample: int

    def __init__(self, config: AutoencoderConfig, latent_channels: int, downsample: int) -> None:
        super().__init__()
        self.config = config
        self.latent_channels, self.downsample = latent_channels, downsample
        self.register_buffer("scale", _per_channel(config.scale, 1.0, latent_channels, "scale"), persistent=False)
        self.register_buffer("shift", _per_channel(config.shift, 0.0, latent_channels, "shift"), persistent=False)

    def set_normalization(self, config: AutoencoderConfig) -> None:
        """Take scale and shift from `config` (e.g. after measuring them from data)."""
        self.scale.copy_(_per_channel(config.scale, 1.0, self.latent_channels, "scale"))
        self.shift.copy_(_per_channel(config.shift, 0.0, self.latent_channels, "shift"))
        self.config = config

    def encode_distribution(self, images: torch.Tensor) -> LatentDistribution:
        """The raw (unscaled) posterior of a (N, C, H, W) batch in [-1, 1]."""
        raise NotImplementedError

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Images from raw (unscaled) latents."""
        raise NotImplementedError

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents -> model latents z = (raw - shift) * scale."""
        return (raw - self.shift.to(raw)) * self.scale.to(raw)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model latents -> raw latents (inverse of `normalize`)."""
        return z / self.scale.to(z) + self.shift.to(z)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model latents of images: a posterior draw (from `generator`), shifted and scaled."""
        return self.normalize(self.encode_distribution(images).sample(generator))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from model latents."""
        return self.decode_raw(self.denormalize(z))


class PixelSpace(Autoencoder):
    """The identity: the model works on images (scale/shift still apply if set)."""

    def __init__(self, config: AutoencoderConfig, channels: int) -> None:
        super().__init__(config, channels, 1)

    def encode_distribution(self, images: torch.Tensor) -> LatentDistribution:
        return LatentDistribution(images, None)

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return raw


_CLASS_NAMES = {"kl": "AutoencoderKL", "tiny": "AutoencoderTiny"}
"""The diffusers class each autoencoder.kind loads, as a folder's config.json names it in `_class_name`."""
_KINDS = {name: kind for kind, name in _CLASS_NAMES.items()}


def _diffusers_class(kind: str) -> type:
    try:
        import diffusers
    except ImportError as err:
        raise AutoencoderError(f"autoencoder.kind={kind!r} needs diffusers: pip install 'ditkit[diffusers]'") from err
    return getattr(diffusers, _CLASS_NAMES[kind])


def _source(config: AutoencoderConfig) -> str:
    """autoencoder.path with `~` expanded, as diffusers is given it (a hub id stays as it is)."""
    return os.path.expanduser(config.path)


def _where(config: AutoencoderConfig) -> str:
    return config.path + (f" (subfolder {config.subfolder!r})" if config.subfolder else "")


def _load_error(config: AutoencoderConfig, err: Exception) -> AutoencoderError:
    local = Path(_source(config))
    if local.exists():
        hint = f"{local} exists but does not hold a diffusers {config.kind!r} autoencoder (config.json + weights)"
    else:
        hint = (
            "it is not a local folder and not in the Hugging Face cache, and this machine may be offline; "
            f"download it where there is internet (`hf download {config.path}`) and copy the cache, or point "
            "autoencoder.path at a local folder"
        )
    return AutoencoderError(f"cannot load autoencoder.path={_where(config)}: {hint} ({type(err).__name__}: {err})")


def read_autoencoder_config(config: AutoencoderConfig) -> dict:
    """The diffusers config.json of a 'kl'/'tiny' autoencoder, without loading its weights.

    Its `_class_name`, when it has one, must be the class `config.kind` loads: diffusers builds any
    class from any folder, with freshly initialised weights where the names differ, and only logs it.
    """
    cls = _diffusers_class(config.kind)
    try:
        cfg = dict(cls.load_config(_source(config), subfolder=config.subfolder))
    except (OSError, ValueError) as err:
        raise _load_error(config, err) from err
    found = cfg.get("_class_name")
    # The other kind's class is refused here; a name ditkit does not know (a subclass saved under its own
    # name) is left to build_autoencoder's check that every weight was found in the folder.
    if found in _KINDS and found != cls.__name__:
        raise AutoencoderError(
            f"autoencoder.path={_where(config)} holds a diffusers {found} but autoencoder.kind={config.kind!r} "
            f"loads an {cls.__name__}: set autoencoder.kind={_KINDS[found]!r}"
        )
    return cfg


def folder_kind(path: str, subfolder: str | None = None) -> str:
    """The `autoencoder.kind` of a diffusers autoencoder folder or hub id, from its config.json's class
    ('tiny' for AutoencoderTiny, else 'kl'); the weights are not read."""
    config = AutoencoderConfig(kind="kl", path=path, subfolder=subfolder)
    try:
        cfg = _diffusers_class("kl").load_config(_source(config), subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise _load_error(config, err) from err
    return _KINDS.get(cfg.get("_class_name"), "kl")


def _init_defaults(kind: str) -> dict[str, object]:
    """The keyword defaults of the diffusers class's __init__: what diffusers itself takes for the keys
    a config.json leaves out (one written before diffusers added them, or by hand)."""
    init = inspect.signature(_diffusers_class(kind).__init__)
    return {name: p.default for name, p in init.parameters.items() if p.default is not inspect.Parameter.empty}


def _shape_from_diffusers(kind: str, cfg: dict, where: str) -> tuple[int, int, int, float, float | None]:
    """(image channels, latent channels, downsampling factor, scaling_factor, shift_factor) of a config.

    Keys the config leaves out take the class's defaults, as when diffusers loads the model: e.g. a
    config.json without scaling_factor gets 0.18215 for AutoencoderKL, 1.0 for the tiny one.
    """
    cfg = {**_init_defaults(kind), **cfg}

    def value(key: str) -> object:
        if key not in cfg:
            raise AutoencoderError(
                f"{where}: its config.json has no {key!r} and diffusers' {_CLASS_NAMES[kind]} has no default for it"
            )
        return cfg[key]

    blocks = value("block_out_channels" if kind == "kl" else "encoder_block_out_channels")
    return (
        int(value("in_channels")),
        int(value("latent_channels")),
        2 ** (len(blocks) - 1),
        float(value("scaling_factor")),
        cfg.get("shift_factor"),
    )


def autoencoder_shape(config: AutoencoderConfig) -> tuple[int, int, int]:
    """(image channels, latent channels, downsampling factor) from a 'kl'/'tiny' autoencoder's config.json."""
    cfg = read_autoencoder_config(config)
    image_channels, channels, factor, _, _ = _shape_from_diffusers(
        config.kind, cfg, f"autoencoder.path={_where(config)}"
    )
    return image_channels, channels, factor


def resolve_autoencoder(config: Config) -> Config:
    """Fill the autoencoder's latent shape (and default scale/shift) into a copy of `config`.

    Reads only the autoencoder's config.json; the model's input channels and size then follow. Values
    the user set explicitly must agree with the autoencoder, or ConfigError names both.
    """
    config = copy.deepcopy(config)  # every section, so that changing the result never changes the input
    ae = config.autoencoder
    if ae.kind == "pixel":
        return config
    cfg = read_autoencoder_config(ae)
    image_channels, channels, factor, scaling, shifting = _shape_from_diffusers(
        ae.kind, cfg, f"autoencoder.path={_where(ae)}"
    )
    if image_channels != config.data.channels:
        raise AutoencoderError(
            f"autoencoder.path={ae.path} takes {image_channels}-channel images but data.channels={config.data.channels}"
        )
    for name, value in (("latent_channels", channels), ("downsample", factor)):
        if getattr(ae, name) not in (None, value):
            raise AutoencoderError(f"autoencoder.{name}={getattr(ae, name)} but {ae.path} has {value}")
    new_ae = dataclasses.replace(ae, latent_channels=channels, downsample=factor)
    if ae.stats == "autoencoder":  # with stats='data', training measures them instead
        new_ae.scale = scaling if ae.scale is None else ae.scale
        new_ae.shift = (shifting if shifting is not None else 0.0) if ae.shift is None else ae.shift
    return dataclasses.replace(config, autoencoder=new_ae)


class DiffusersAutoencoder(Autoencoder):
    """A diffusers AutoencoderKL (posterior mean and log-variance) or AutoencoderTiny (deterministic)."""

    def __init__(self, config: AutoencoderConfig, module: nn.Module) -> None:
        kind = "kl" if config.kind == "kl" else "tiny"
        _, channels, factor, scaling, shifting = _shape_from_diffusers(
            kind, dict(module.config), f"autoencoder.path={_where(config)}"
        )
        if config.scale is None:
            config = dataclasses.replace(config, scale=scaling)
        if config.shift is None:
            config = dataclasses.replace(config, shift=shifting if shifting is not None else 0.0)
        super().__init__(config, channels, factor)
        self.module = module.eval().requires_grad_(False)

    def encode_distribution(self, images: torch.Tensor) -> LatentDistribution:
        images = images.to(next(self.module.parameters()).dtype)
        if self.config.kind == "tiny":
            return LatentDistribution(self.module.encode(images).latents, None)
        dist = self.module.encode(images).latent_dist
        return LatentDistribution(dist.mean, dist.logvar)

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return self.module.decode(raw.to(next(self.module.parameters()).dtype)).sample


def build_autoencoder(
    config: Config | AutoencoderConfig, *, image_channels: int | None = None, device: str | torch.device = "cpu"
) -> Autoencoder:
    """The autoencoder a config names, in eval mode on `device` (loads weights for 'kl'/'tiny')."""
    if isinstance(config, Config):
        ae_config, image_channels = config.autoencoder, config.data.channels
    else:
        ae_config = config
    if ae_config.kind == "pixel":
        if image_channels is None:
            raise ValueError("a pixel-space autoencoder needs image_channels")
        return PixelSpace(ae_config, image_channels).to(device)
    cls = _diffusers_class(ae_config.kind)
    read_autoencoder_config(ae_config)  # refuses a folder of another class before building one
    try:
        module, info = cls.from_pretrained(
            _source(ae_config), subfolder=ae_config.subfolder, low_cpu_mem_usage=False, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise _load_error(ae_config, err) from err
    # diffusers initialises parameters the weight files lack at random and only logs it.
    missing = sorted(info["missing_keys"])
    if missing:
        raise AutoencoderError(
            f"autoencoder.path={_where(ae_config)}: its weight files lack {len(missing)} of the {cls.__name__}'s "
            f"parameters (e.g. {', '.join(missing[:3])}), which would be random; expected weights that match its "
            "config.json (a complete diffusers autoencoder folder)"
        )
    ae = DiffusersAutoencoder(ae_config, module)
    for name in ("latent_channels", "downsample"):
        want = getattr(ae_config, name)
        if want is not None and want != getattr(ae, name):
            raise AutoencoderError(f"autoencoder.{name}={want} but {ae_config.path} has {getattr(ae, name)}")
    return ae.to(device)
