"""Measuring generated images."""

from .classifier import ClassifierResult, classify, load_classifier, save_classifier, train_classifier

__all__ = ["ClassifierResult", "classify", "load_classifier", "save_classifier", "train_classifier"]
