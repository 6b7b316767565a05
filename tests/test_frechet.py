"""Frechet distance: closed forms for Gaussians, scipy's matrix square root, and the classifier features."""

import numpy as np
import pytest
import torch

from ditkit.evaluation import classifier_features, feature_statistics, frechet_distance
from ditkit.models.classifier import ClassifierConfig, DigitClassifier


def test_diagonal_gaussians_have_the_closed_form():
    """For commuting covariances FD = |mu1 - mu2|^2 + sum (s1 - s2)^2."""
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.5, 2.0, 1.5])
    fd = frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert fd == pytest.approx(((mu1 - mu2) ** 2).sum().item() + ((s1 - s2) ** 2).sum().item(), abs=1e-10)
    assert frechet_distance(mu1, torch.diag(s1**2), mu1, torch.diag(s1**2)) == pytest.approx(0.0, abs=1e-10)


def test_general_covariances_match_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    cov1, cov2 = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64), b @ b.T  # the second is rank deficient
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    root = scipy_linalg.sqrtm(cov1.numpy() @ cov2.numpy())
    expected = float(((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * np.real(np.trace(root)))
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_statistics_and_features():
    x = torch.randn(5000, 3, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 2.0, 3.0]) + 1
    mu, cov = feature_statistics(x)
    assert torch.allclose(mu, torch.ones(3, dtype=torch.float64), atol=0.1)
    assert torch.allclose(cov.diagonal(), torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), rtol=0.06)
    with pytest.raises(ValueError):
        feature_statistics(torch.zeros(1, 3))
    model = DigitClassifier(ClassifierConfig(width=8))
    feats = classifier_features(model, torch.rand(10, 1, 8, 8) * 2 - 1, batch_size=4)
    assert feats.shape == (10, model.feature_dim)
