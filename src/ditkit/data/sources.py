"""Loader batches -> model inputs x0, with augmentation and the autoencoder applied on the fly.

Text-conditioned runs wrap either in `TextBatches`, which turns caption rows into cached text
embeddings (`TextCond`); it draws nothing (caption dropout happens in the model, from the same generator).

Three sources, one rule for their random draws (all from the training generator, in this order):
first the per-image flip decision (`flip_mask`, only when data.hflip), then the posterior noise of a
latent draw. Encoding images on the fly and reading the same images' cached posteriors therefore give
the same batch, up to the encoder's floating-point noise, and resumed runs replay both exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..autoencoders import Autoencoder, LatentDistribution
from ..config import Config, ConfigError

__all__ = ["flip_mask", "ImageBatches", "CachedBatches", "TextBatches", "make_batch_source", "measure_latent_stats"]

Batch = tuple[object, torch.Tensor]
BatchSource = Callable[[Batch, torch.Generator, torch.device], tuple[torch.Tensor, torch.Tensor]]


def flip_mask(n: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Which of n images to mirror: (n,) bool, each True with probability 1/2."""
    return torch.rand(n, generator=generator, device=device) < 0.5


class ImageBatches:
    """(images in [-1, 1], labels) -> flipped (if asked), encoded and posterior-sampled model latents."""

    def __init__(self, autoencoder: Autoencoder, hflip: bool) -> None:
        self.autoencoder, self.hflip = autoencoder, hflip

    @torch.no_grad()
    def __call__(self, batch: Batch, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        images, labels = batch
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if self.hflip:
            flip = flip_mask(images.shape[0], generator, device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return self.autoencoder.encode(images, generator), labels


class CachedBatches:
    """((mean, logvar) of image and mirror (N, 2, C, h, w), labels) from a latent cache -> model latents."""

    def __init__(self, autoencoder: Autoencoder, hflip: bool) -> None:
        self.autoencoder, self.hflip = autoencoder, hflip

    @torch.no_grad()
    def __call__(self, batch: Batch, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        (mean, logvar), labels = batch
        n = mean.shape[0]
        mean, labels = mean.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        rows = torch.arange(n, device=device)
        view = flip_mask(n, generator, device).long() if self.hflip else torch.zeros(n, dtype=torch.long, device=device)
        dist = LatentDistribution(mean[rows, view], None if logvar is None else logvar.to(device)[rows, view])
        return self.autoencoder.normalize(dist.sample(generator)), labels


class TextBatches:
    """Wraps a source whose labels are caption rows: (x0, rows) -> (x0, TextCond of those captions)."""

    def __init__(self, source: BatchSource, table) -> None:
        self.source, self.table = source, table
        self._device_tables: dict[str, object] = {}

    def __call__(self, batch: Batch, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, object]:
        x0, rows = self.source(batch, generator, device)
        key = str(device)
        if key not in self._device_tables:  # the whole table moves once; batches index it in place
            self._device_tables[key] = self.table.to(device)
        return x0, self._device_tables[key][rows.to(device)]


def make_batch_source(config: Config, autoencoder: Autoencoder, dataset=None, progress: bool = False) -> BatchSource:
    """The source for this run: a latent cache when data.cache is set, else images (+ autoencoder).

    A text-conditioned model (model.text_dim > 0) needs the captioned `dataset`: its captions are encoded
    once into the text-embedding cache (text.cache, default: in the run folder) and looked up per batch.
    """
    cls = CachedBatches if config.data.cache else ImageBatches
    source = cls(autoencoder, config.data.hflip)
    if not config.model.text_conditional:
        return source
    from ..text import caption_table

    captions = getattr(dataset, "captions", None)
    if captions is None:
        raise ConfigError(
            f"model.text_dim={config.model.text_dim} needs captioned data (data.dataset='captions'), "
            f"got data.dataset={config.data.dataset!r}{' with a latent cache' if config.data.cache else ''}"
        )
    return TextBatches(source, caption_table(config, captions, progress=progress))


@torch.no_grad()
def measure_latent_stats(
    autoencoder: Autoencoder, dataset, max_items: int = 2048, batch_size: int = 64, device: str = "cpu"
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of raw latents (posterior mean and variance, both flips) over a dataset.

    A latent cache already holds these (cache.json's latent_mean / latent_std); images are encoded,
    at most `max_items` of them, evenly spread over the dataset.
    """
    manifest = getattr(dataset, "manifest", None)
    if manifest is not None:
        return list(manifest["latent_mean"]), list(manifest["latent_std"])
    n = min(len(dataset), max_items)
    if n == 0:
        raise ConfigError("cannot measure latent statistics of an empty dataset")
    picks = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    total = total_sq = total_var = 0.0
    count = 0
    for start in range(0, n, batch_size):
        images = torch.stack([dataset[i][0] for i in picks[start : start + batch_size]]).to(device)
        dist = autoencoder.encode_distribution(torch.cat([images, images.flip(-1)]))
        mean = dist.mean.double()
        total = total + mean.sum((0, 2, 3))
        total_sq = total_sq + mean.pow(2).sum((0, 2, 3))
        if dist.logvar is not None:
            total_var = total_var + dist.logvar.double().exp().sum((0, 2, 3))
        count += mean.shape[0] * mean.shape[2] * mean.shape[3]
    mu = total / count
    std = (total_sq / count + total_var / count - mu.pow(2)).clamp_min(1e-12).sqrt()
    return mu.tolist(), std.tolist()
