"""Sample-quality metrics over feature sets, with the definitions of the ADM evaluator.

- FID: Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
  https://arxiv.org/abs/1706.08500); sFID is the same distance on spatial features (Nash et al.
  2021, https://arxiv.org/abs/2103.03841).
- Inception Score (Salimans et al. 2016, https://arxiv.org/abs/1606.03498): exp E[KL(p(y|x) || p(y))],
  averaged over splits of 5,000 samples as the ADM evaluator does.
- Improved precision and recall (Kynkaanniemi et al. 2019, https://arxiv.org/abs/1904.06991): each set's
  manifold is the union of balls reaching each point's k-th nearest neighbour (k = 3, as in ADM);
  precision is the share of samples inside the reference manifold, recall the share of reference
  points inside the sample manifold.

Statistics are accumulated and compared in float64 (numpy), so results do not depend on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "trace_sqrt_product",
    "sqrtm_psd",
    "inception_score",
    "manifold_radii",
    "precision_recall",
]


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set (what FID compares)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> FeatureStats:
        """Mean and unbiased (N - 1) covariance of (N, D) features, in float64."""
        x = _as_float64(features)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need (N >= 2, D) features to estimate a covariance, got shape {x.shape}")
        return cls(x.mean(0), np.cov(x, rowvar=False))


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _symmetric_eig(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = (a + a.T) / 2  # round-off can leave a covariance slightly asymmetric
    vals, vecs = np.linalg.eigh(a)
    return np.clip(vals, 0, None), vecs  # a covariance is PSD; negative eigenvalues are round-off


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigendecomposition, float64)."""
    vals, vecs = _symmetric_eig(_as_float64(a))
    return (vecs * np.sqrt(vals)) @ vecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for PSD sigma1, sigma2.

    sigma1 sigma2 is similar to the PSD matrix M = sigma1^(1/2) sigma2 sigma1^(1/2) (conjugate by
    sigma1^(1/2)), so both have the same non-negative eigenvalues and the trace of the square root is
    sum(sqrt(eig(M))). Unlike a general (Schur) sqrtm of the non-symmetric product, this needs no
    inverse and stays real and stable when the covariances are singular (fewer samples than dims).
    """
    root1 = sqrtm_psd(sigma1)
    m = root1 @ _as_float64(sigma2) @ root1
    vals = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(vals, 0, None)).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)); 0 for identical statistics."""
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(
            f"feature statistics differ in shape: mu {a.mu.shape} vs {b.mu.shape}, "
            f"sigma {a.sigma.shape} vs {b.sigma.shape}"
        )
    diff = a.mu - b.mu
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt_product(a.sigma, b.sigma)
    return float(max(value, 0.0))  # exact arithmetic gives >= 0; clip the round-off of identical sets


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = 5000) -> float:
    """Mean over splits of exp(mean_x KL(p(y|x) || p(y))), p from a softmax of `logits`; 1 for one class."""
    x = torch.as_tensor(_as_float64(logits))
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need (N, classes) logits, got shape {tuple(x.shape)}")
    log_p = torch.log_softmax(x, dim=1)  # (N, K)
    scores = []
    for start in range(0, len(x), split_size):
        part = log_p[start : start + split_size]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))  # log mean_x p(y|x)
        kl = (part.exp() * (part - log_marginal)).sum(1)
        scores.append(float(torch.exp(kl.mean())))
    return float(np.mean(scores))


DISTANCE_BLOCK_BYTES = 256 * 2**20
"""Rows of a k-NN distance computation are taken so that one (rows, M) float64 block is at most this."""


def _rows_per_block(m: int, batch_size: int | None) -> int:
    """`batch_size`, or (None) as many rows against m points as fit in DISTANCE_BLOCK_BYTES."""
    return batch_size if batch_size is not None else max(1, DISTANCE_BLOCK_BYTES // (8 * m))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) squared Euclidean distances, clipped at 0 (the expanded form can round below it).

    In place on the one (n, m) block: -2ab, + |a|^2, + |b|^2 gives the same numbers as |a|^2 - 2ab + |b|^2
    (IEEE addition commutes) without three more blocks of the same size.
    """
    d = (a @ b.T).mul_(-2)
    return d.add_((a * a).sum(1)[:, None]).add_((b * b).sum(1)[None, :]).clamp_(min=0)


def manifold_radii(features: np.ndarray | torch.Tensor, k: int = 3, batch_size: int | None = None) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point, computed in row batches
    (`batch_size` rows; None: as many as keep a distance block within DISTANCE_BLOCK_BYTES)."""
    x = torch.as_tensor(_as_float64(features))
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points to estimate a manifold, got {len(x)}")
    radii = []
    batch_size = _rows_per_block(len(x), batch_size)
    for start in range(0, len(x), batch_size):
        d = _sq_distances(x[start : start + batch_size], x)  # (b, N); includes the point itself at 0
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)  # k + 1: skip the self-distance
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """For each point, whether some centre's ball (squared radius) contains it."""
    hits = []
    batch_size = _rows_per_block(len(centres), batch_size)
    for start in range(0, len(points), batch_size):
        d = _sq_distances(points[start : start + batch_size], centres)  # (b, M)
        hits.append((d <= radii[None, :]).any(1))
    return torch.cat(hits)


def precision_recall(
    ref_features: np.ndarray | torch.Tensor,
    sample_features: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int | None = None,
) -> tuple[float, float]:
    """Improved (precision, recall) of samples against reference features, k-NN manifolds."""
    ref, sam = torch.as_tensor(_as_float64(ref_features)), torch.as_tensor(_as_float64(sample_features))
    if ref.shape[1:] != sam.shape[1:]:
        raise ValueError(f"feature sets differ in dimension: {tuple(ref.shape)} vs {tuple(sam.shape)}")
    ref_radii, sam_radii = manifold_radii(ref, k, batch_size), manifold_radii(sam, k, batch_size)
    precision = _inside(sam, ref, ref_radii, batch_size).double().mean().item()
    recall = _inside(ref, sam, sam_radii, batch_size).double().mean().item()
    return precision, recall
