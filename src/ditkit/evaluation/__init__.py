"""Measuring generated images: the digit judge, the FID Inception, metrics, mass sampling and protocols."""

from .classifier import (
    ClassifierResult,
    classifier_features,
    classify,
    load_classifier,
    save_classifier,
    train_classifier,
)
from .evaluate import build_feature_net, digit_classifier, evaluate_npz, score_features
from .inception import FIDInceptionV3, InceptionWeightsError, find_inception_weights, load_inception
from .mass_sampling import MassSamplingJob, run_mass_sampling, sample_seed
from .metrics import FeatureStats, frechet_distance, inception_score, precision_recall
from .protocols import PROTOCOLS, Protocol, get_protocol

__all__ = [
    "ClassifierResult",
    "classify",
    "load_classifier",
    "save_classifier",
    "train_classifier",
    "classifier_features",
    "build_feature_net",
    "digit_classifier",
    "evaluate_npz",
    "score_features",
    "FIDInceptionV3",
    "InceptionWeightsError",
    "find_inception_weights",
    "load_inception",
    "MassSamplingJob",
    "run_mass_sampling",
    "sample_seed",
    "FeatureStats",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "PROTOCOLS",
    "Protocol",
    "get_protocol",
]
