"""Frechet distance between Gaussian fits of feature sets (Heusel et al. 2017, https://arxiv.org/abs/1706.08500).

FID is this distance on Inception features; for digits ditkit uses the penultimate features of its own
digit classifier (`DigitClassifier.features`), so the number is a classifier-feature FID, comparable
only between runs that use the same classifier and the same sample counts (the estimate is biased
upwards at small N). Everything is float64; the matrix square root goes through symmetric
eigendecompositions, tr sqrt(C1 C2) = sum sqrt(eig(C1^1/2 C2 C1^1/2)), so no complex arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["feature_statistics", "frechet_distance", "classifier_features"]


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {tuple(features.shape)}")
    x = features.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^1/2), the squared 2-Wasserstein distance of two Gaussians."""
    mu1, cov1, mu2, cov2 = (v.double() for v in (mu1, cov1, mu2, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt)


@torch.no_grad()
def classifier_features(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, D) penultimate features of (N, C, H, W) images in [-1, 1] from a model with a `features` method."""
    model.eval()
    device = next(model.parameters()).device
    chunks = [
        model.features(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)
