"""Small-N FID of EMA samples during training (`train.eval_every`, `train.eval_num`).

Every `eval_every` steps the EMA model draws `eval_num` samples with the config's sampler (labels
i % num_classes, seed `sample.seed`, so every evaluation sees the same noise and labels) and they
are scored against real training images: with the digit classifier's features (FID, precision/recall
and class accuracy) for the bundled digits, with the FID Inception otherwise. Small-N FID is biased
upwards (Chong & Forsyth 2020, https://arxiv.org/abs/1911.07023); compare it across steps of one run,
not with published 50k-sample numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import Config, ConfigError
from ..sampling import generate
from ..utils.images import to_uint8
from .evaluate import build_feature_net, score_features
from .features import compute_features, reference_from_features
from .inception import InceptionWeightsError

__all__ = ["InTrainingEvaluator", "MAX_REFERENCE_IMAGES"]

MAX_REFERENCE_IMAGES = 5000
"""At most this many training images form the reference statistics (computed once per run)."""


def _real_images(dataset: Dataset, limit: int) -> np.ndarray:
    """Up to `limit` training images as uint8 (N, H, W, C)."""
    n = min(len(dataset), limit)
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        return images[:n].permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    return to_uint8(torch.stack([dataset[i][0] for i in range(n)]))


def _batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


class InTrainingEvaluator:
    """Reference statistics computed once; calling it with the EMA model returns 'eval_*' metrics."""

    def __init__(self, config: Config, dataset: Dataset, device: torch.device | str, batch_size: int = 250) -> None:
        tc = config.train
        self.config, self.batch_size = config, batch_size
        self.kind = "classifier" if config.data.dataset == "mnist" else "inception"
        try:
            self.net = build_feature_net(self.kind, image_size=config.data.image_size, device=device)
        except InceptionWeightsError as err:
            raise ConfigError(f"train.eval_every={tc.eval_every} on dataset {config.data.dataset!r}: {err}") from err
        real = _real_images(dataset, MAX_REFERENCE_IMAGES)
        self.ref = reference_from_features(
            compute_features(self.net, _batches(real, batch_size), progress=False), self.kind
        )

    @torch.no_grad()
    def __call__(self, ema: nn.Module) -> dict[str, float | int | str]:
        t0 = time.perf_counter()
        m, n = self.config.model, self.config.train.eval_num
        labels = np.arange(n, dtype=np.int64) % m.num_classes if m.conditional else None
        request = torch.from_numpy(labels) if labels is not None else n
        samples = to_uint8(generate(ema, self.config, request, batch_size=self.batch_size))
        feats = compute_features(self.net, _batches(samples, self.batch_size), progress=False)
        scores = score_features(feats, self.ref, labels, self.kind)
        out: dict[str, float | int | str] = {"eval_features": self.kind, "eval_num": n}
        for key in ("fid", "precision", "recall", "class_accuracy"):
            if key in scores:
                out[f"eval_{key}"] = scores[key]
        out["eval_seconds"] = round(time.perf_counter() - t0, 3)
        return out
