"""Small-N FID of EMA samples during training (`train.eval_every`, `train.eval_num`).

Every `eval_every` steps the EMA model draws `eval_num` samples with the config's sampler (labels
i % num_classes, seed `sample.seed`, so every evaluation sees the same noise and labels) and they
are scored against real training images: with the digit classifier's features (FID, precision/recall
and class accuracy) for the bundled digits, with the FID Inception otherwise. Small-N FID is biased
upwards (Chong & Forsyth 2020, https://arxiv.org/abs/1911.07023); compare it across steps of one run,
not with published 50k-sample numbers.

The reference is at most MAX_REFERENCE_IMAGES training images spread evenly over the dataset (item
i * N // n), not its first n: folder datasets are sorted by class, so a prefix would hold only the first
few classes. A latent cache's items are decoded from their posterior means by the cache's autoencoder
(as `ditkit ref-stats CACHE` does). A text-conditioned model samples from the captions of `eval_num`
items spread evenly over the dataset, encoded once when the evaluator is built; a dataset without
captions is refused then, not at the first evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import Config, ConfigError
from ..data import DataError
from ..data.cache import CacheDataset
from ..data.captions import item_caption
from ..models.text import TextCond
from ..sampling import generate
from ..utils.images import to_uint8
from .evaluate import build_feature_net, score_features
from .features import compute_features, iter_cache_images, reference_from_features
from .inception import InceptionWeightsError

__all__ = ["InTrainingEvaluator", "MAX_REFERENCE_IMAGES", "dataset_prompts"]

MAX_REFERENCE_IMAGES = 5000
"""At most this many training images form the reference statistics (computed once per run)."""


def _spread_indices(num_items: int, n: int) -> np.ndarray:
    """n item indices spread evenly over range(num_items): i * num_items // n (all items, in order, when
    n == num_items; each item about n / num_items times when n is larger)."""
    return np.arange(n, dtype=np.int64) * num_items // n


def _real_batches(
    dataset: Dataset, limit: int, device: torch.device | str = "cpu", batch_size: int = 250
) -> Iterator[np.ndarray]:
    """Up to `limit` training images spread evenly over the dataset, as uint8 (b, H, W, C) batches."""
    if len(dataset) == 0:
        raise DataError("the training dataset is empty: no reference images for train.eval_every")
    picks = _spread_indices(len(dataset), min(len(dataset), limit))
    if isinstance(dataset, CacheDataset):  # items are (mean, logvar) latents: decode the posterior means
        yield from iter_cache_images(dataset, batch_size, device=device, indices=picks.tolist())[1]
        return
    images = getattr(dataset, "images", None)
    for start in range(0, len(picks), batch_size):
        part = picks[start : start + batch_size]
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
            yield images[torch.from_numpy(part)].permute(0, 2, 3, 1).numpy()  # (b, H, W, C)
        else:
            yield to_uint8(torch.stack([dataset[int(i)][0] for i in part]))


def _real_images(dataset: Dataset, limit: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Up to `limit` training images spread evenly over the dataset, as uint8 (N, H, W, C)."""
    return np.concatenate(list(_real_batches(dataset, limit, device)))


def dataset_prompts(config: Config, dataset: Dataset, n: int, setting: str) -> list[str]:
    """Captions of `n` items spread evenly over a captioned dataset (one prompt per sample), for the
    text-conditioned samples `setting` (a config key, named in the error) asks for during training."""
    captions = getattr(dataset, "captions", None)
    if captions is None:
        raise ConfigError(
            f"{setting}: the text-conditioned model (model.text_dim={config.model.text_dim}) samples from "
            f"prompts, which training takes from the dataset's captions, but the training dataset "
            f"({type(dataset).__name__}, data.dataset={config.data.dataset!r}) has none: train on captioned "
            f"data or set {setting.split('=')[0]}=0"
        )
    return [item_caption(dataset, int(i)) for i in _spread_indices(len(dataset), n)]


def _batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


class PrecomputedText:
    """A stand-in text encoder for `generate`: the embeddings of a fixed list of prompts (in-training
    evaluation's, or the sample grid's), encoded once, e.g. from the run's text-embedding cache."""

    def __init__(self, prompts: list[str], cond: TextCond) -> None:
        self.prompts, self.cond = prompts, cond

    def encode(self, captions: list[str]) -> TextCond:
        if list(captions) != self.prompts:
            raise ValueError("this stand-in encoder holds only the prompts it was built with")
        return self.cond


class InTrainingEvaluator:
    """Reference statistics computed once; calling it with the EMA model returns 'eval_*' metrics."""

    def __init__(self, config: Config, dataset: Dataset, device: torch.device | str, batch_size: int = 250) -> None:
        tc = config.train
        self.config, self.batch_size = config, batch_size
        self.kind = "classifier" if config.data.dataset == "mnist" else "inception"
        self.prompts: list[str] | None = None
        self.text: PrecomputedText | None = None
        if config.model.text_conditional:  # refuse uncaptioned data now, not at the first evaluation
            from ..text import caption_table

            self.prompts = dataset_prompts(
                config, dataset, config.train.eval_num, f"train.eval_every={config.train.eval_every}"
            )
            self.text = PrecomputedText(self.prompts, caption_table(config, self.prompts))
        try:
            self.net = build_feature_net(self.kind, image_size=config.data.image_size, device=device)
        except InceptionWeightsError as err:
            raise ConfigError(f"train.eval_every={tc.eval_every} on dataset {config.data.dataset!r}: {err}") from err
        real = _real_batches(dataset, MAX_REFERENCE_IMAGES, device, batch_size)
        self.ref = reference_from_features(compute_features(self.net, real, progress=False), self.kind)

    @torch.no_grad()
    def __call__(self, ema: nn.Module) -> dict[str, float | int | str]:
        t0 = time.perf_counter()
        m, n = self.config.model, self.config.train.eval_num
        labels = np.arange(n, dtype=np.int64) % m.num_classes if m.conditional else None
        # Sampled in eval mode whatever mode the model is in (in training mode the label or caption
        # embedder drops conditions at random), and the caller's mode is restored afterwards.
        was_training = ema.training
        ema.eval()
        try:
            if self.prompts is not None:
                images = generate(
                    ema, self.config, prompts=self.prompts, text_encoder=self.text, batch_size=self.batch_size
                )
            else:
                request = torch.from_numpy(labels) if labels is not None else n
                images = generate(ema, self.config, request, batch_size=self.batch_size)
        finally:
            ema.train(was_training)
        samples = to_uint8(images)
        feats = compute_features(self.net, _batches(samples, self.batch_size), progress=False)
        scores = score_features(feats, self.ref, labels, self.kind)
        out: dict[str, float | int | str] = {"eval_features": self.kind, "eval_num": n}
        for key in ("fid", "precision", "recall", "class_accuracy"):
            if key in scores:
                out[f"eval_{key}"] = scores[key]
        out["eval_seconds"] = round(time.perf_counter() - t0, 3)
        return out
