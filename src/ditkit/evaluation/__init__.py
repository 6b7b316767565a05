"""Measuring generated images."""

from .classifier import ClassifierResult, classify, load_classifier, save_classifier, train_classifier
from .frechet import classifier_features, feature_statistics, frechet_distance

__all__ = [
    "ClassifierResult",
    "classify",
    "load_classifier",
    "save_classifier",
    "train_classifier",
    "classifier_features",
    "feature_statistics",
    "frechet_distance",
]
