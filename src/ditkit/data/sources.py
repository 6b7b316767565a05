"""Loader batches -> model inputs x0, with augmentation and the autoencoder applied on the fly.

The training loop draws every random number per sample (ditkit.distributed: streams keyed by the
image's position in the global batch) and hands a source the flip decisions and, for a stochastic
encoder, the standard-normal noise of the posterior draw. Encoding images on the fly and reading the
same images' cached posteriors therefore give the same batch, up to the encoder's floating-point
noise, and resumed or differently sharded runs replay both exactly.

Text-conditioned runs wrap either source in `TextBatches`, which turns caption rows into cached text
embeddings (`TextCond`); it draws nothing (caption dropout is drawn per sample by the training loop).
A latent cache of captioned data keeps the captions (`ditkit.data.cache`), so its rows feed the same
text-embedding cache; a flip changes the latent view only, never the caption.
"""

from __future__ import annotations

import numpy as np
import torch

from ..autoencoders import Autoencoder
from ..config import Config, ConfigError

__all__ = ["ImageBatches", "CachedBatches", "TextBatches", "make_batch_source", "measure_latent_stats"]


def _posterior(mean: torch.Tensor, logvar: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    if logvar is None:
        return mean
    if noise is None:
        raise ValueError("a stochastic encoder needs posterior_noise (one standard normal draw per latent)")
    return mean + torch.exp(0.5 * logvar) * noise.to(mean)


class ImageBatches:
    """(images in [-1, 1], labels) -> flipped where `flip`, encoded, posterior-sampled model latents."""

    def __init__(self, autoencoder: Autoencoder) -> None:
        self.autoencoder = autoencoder
        self.stochastic = autoencoder.config.kind == "kl"

    @torch.no_grad()
    def __call__(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        device: torch.device,
        flip: torch.Tensor | None = None,
        posterior_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if flip is not None:
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        dist = self.autoencoder.encode_distribution(images)
        return self.autoencoder.normalize(_posterior(dist.mean, dist.logvar, posterior_noise)), labels


class CachedBatches:
    """((mean, logvar) of image and mirror (N, 2, C, h, w), labels) from a latent cache -> model latents."""

    def __init__(self, autoencoder: Autoencoder, stochastic: bool = True) -> None:
        self.autoencoder, self.stochastic = autoencoder, stochastic

    @torch.no_grad()
    def __call__(
        self,
        batch: tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor],
        device: torch.device,
        flip: torch.Tensor | None = None,
        posterior_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        (mean, logvar), labels = batch
        n = mean.shape[0]
        mean, labels = mean.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        rows = torch.arange(n, device=device)
        view = flip.long() if flip is not None else torch.zeros(n, dtype=torch.long, device=device)
        logvar = None if logvar is None else logvar.to(device)[rows, view]
        return self.autoencoder.normalize(_posterior(mean[rows, view], logvar, posterior_noise)), labels


class TextBatches:
    """Wraps a source whose labels are caption rows: (x0, rows) -> (x0, TextCond of those captions)."""

    def __init__(self, source: ImageBatches | CachedBatches, table) -> None:
        self.source, self.table = source, table
        self.stochastic = source.stochastic
        self._device_tables: dict[str, object] = {}

    def __call__(
        self,
        batch: tuple[object, torch.Tensor],
        device: torch.device,
        flip: torch.Tensor | None = None,
        posterior_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, object]:
        x0, rows = self.source(batch, device, flip=flip, posterior_noise=posterior_noise)
        key = str(device)
        if key not in self._device_tables:  # the whole table moves once; batches index it in place
            self._device_tables[key] = self.table.to(device)
        return x0, self._device_tables[key][rows.to(device)]


def make_batch_source(
    config: Config, autoencoder: Autoencoder, dataset: object = None, progress: bool = False
) -> ImageBatches | CachedBatches | TextBatches:
    """The source for this run: a latent cache when data.cache is set, else images (+ autoencoder).

    A text-conditioned model (model.text_dim > 0) needs the captioned `dataset` (images, or a latent cache
    built from captioned data): its captions are encoded once into the text-embedding cache (text.cache,
    default: in the run folder) and looked up per batch.
    """
    if config.data.cache:
        manifest = getattr(dataset, "manifest", {})
        source = CachedBatches(autoencoder, stochastic=bool(manifest.get("has_logvar", True)))
    else:
        source = ImageBatches(autoencoder)
    if not config.model.text_conditional:
        return source
    from ..text import caption_table

    captions = getattr(dataset, "captions", None)
    if captions is None and config.data.cache:
        from .cache import CacheError

        raise CacheError(
            f"data.cache={config.data.cache} was built without captions (from data.dataset="
            f"{getattr(dataset, 'manifest', {}).get('data', {}).get('dataset')!r}), but model.text_dim="
            f"{config.model.text_dim} needs a caption per image: build a cache of the captioned data into a new "
            "folder (`ditkit cache --config YOUR_TEXT_CONFIG.yaml --out NEW_FOLDER data.dataset=captions "
            "data.root=CAPTIONED_DATA`) and set data.cache to it, or drop data.cache to encode images on the fly"
        )
    if captions is None:
        raise ConfigError(
            f"model.text_dim={config.model.text_dim} needs captioned data (data.dataset='captions'), "
            f"got data.dataset={config.data.dataset!r}"
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
