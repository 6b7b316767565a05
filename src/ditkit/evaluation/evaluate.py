"""Score a set of samples against reference statistics: FID, sFID, IS, precision/recall, class accuracy."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..data import DataError, load_mnist
from ..utils.files import prepare_json_out
from .classifier import ClassifierResult, load_classifier, save_classifier, train_classifier
from .features import (
    REFERENCE_KIND_KEY,
    ClassifierFeatures,
    FeatureNet,
    InceptionFeatures,
    NpzReader,
    check_reference_net,
    compute_features,
    feature_net_id,
    reference_from_features,
    reference_from_source,
)
from .inception import cache_dir, load_inception
from .metrics import FeatureStats, frechet_distance, inception_score, precision_recall

__all__ = ["build_feature_net", "digit_classifier", "score_features", "evaluate_npz", "bundled_digits_reference"]

BUNDLED_DIGITS = "mnist"
"""`--ref mnist`: the bundled digits' training split as the reference."""


def digit_classifier(
    folder: str | Path | None = None, image_size: int = 28, *, epochs: int = 10, progress: bool = True
) -> ClassifierResult:
    """A digit classifier: loaded from `folder`, else from the cache, else trained on the bundled digits and cached.

    The cached judge lives in `$DITKIT_CACHE/digit_classifier_{image_size}px_e{epochs}` and is trained
    on the bundled digits' training split (the default 500-image hold-out is left out), seed 0.
    """
    if folder is not None:
        return load_classifier(folder)
    cached = cache_dir() / f"digit_classifier_{image_size}px_e{epochs}"
    if (cached / "classifier.json").is_file():
        judge = load_classifier(cached)
        # Cached by an older ditkit, which did not record the size: the cache folder's name says it.
        return judge if judge.image_hw is not None else dataclasses.replace(judge, image_hw=(image_size, image_size))
    train_set = load_mnist(image_size, "train")
    holdout = load_mnist(image_size, "holdout")
    result = train_classifier(train_set, holdout, epochs=epochs, progress=progress)
    save_classifier(result, cached)
    return result


def build_feature_net(
    kind: str,
    *,
    inception_weights: str | Path | None = None,
    classifier: str | Path | ClassifierResult | None = None,
    image_size: int = 28,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureNet:
    """'inception' (needs the weights file) or 'classifier' (the digit judge; offline)."""
    if kind == "inception":
        return InceptionFeatures(load_inception(inception_weights, device), device)
    if kind == "classifier":
        judge = (
            classifier
            if isinstance(classifier, ClassifierResult)
            else digit_classifier(classifier, image_size, progress=progress)
        )
        return ClassifierFeatures(judge.model, device, judge.image_hw)
    raise ValueError(f"unknown feature network {kind!r}; choose 'inception' or 'classifier'")


def bundled_digits_reference(
    net: FeatureNet, image_size: int, batch_size: int = 100, progress: bool = True
) -> dict[str, np.ndarray]:
    """Reference statistics of the bundled digits' training split (4,500 images) at `image_size`; the
    default batch size is `ditkit ref-stats`'s, whose statistics of the same digits it then equals on a
    GPU too."""
    images = load_mnist(image_size, "train").images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 1)
    batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    return reference_from_features(compute_features(net, batches, len(images), progress), net.kind, feature_net_id(net))


def check_sample_count(samples: str | Path | NpzReader) -> tuple[int, ...]:
    """The shape of a sample file's arr_0 (header reads; `samples` is a path or the open file); DataError
    naming the file when it has fewer than the 2 images a covariance needs, or an arr_1 that is not one
    integer label per image (an (N, 1) array would broadcast to an (N, N) comparison in class accuracy)."""
    if not isinstance(samples, NpzReader):
        with NpzReader(samples) as npz:
            return check_sample_count(npz)
    shape, _ = samples.array_info("arr_0")  # names the file and its keys when arr_0 is missing
    if shape[0] < 2:
        raise DataError(f"{samples.path}: {shape[0]} sample image(s) in arr_0; FID needs at least 2 (a covariance)")
    if "arr_1" in samples.keys:
        label_shape, dtype = samples.array_info("arr_1")
        if label_shape != (shape[0],) or dtype.kind not in "iu":
            raise DataError(
                f"{samples.path}: arr_1 must be 1-D integer class labels, one per image of arr_0 (shape "
                f"({shape[0]},), as arr_0 is {shape}); got {dtype} of shape {label_shape}"
            )
    return shape


def score_features(
    features: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    labels: np.ndarray | None = None,
    kind: str = "inception",
) -> dict[str, float | int | str]:
    """Metrics of sample features against a reference from `reference_from_source`."""
    num = len(features["pool"])
    if labels is not None and np.shape(labels) != (num,):
        raise ValueError(f"labels must be one per sample, shape ({num},); got shape {np.shape(labels)}")
    result: dict[str, float | int | str] = {"features": kind, "num_samples": int(num)}
    stats = FeatureStats.from_features(features["pool"])
    result["fid"] = frechet_distance(stats, FeatureStats(ref["mu"], ref["sigma"]))
    if "spatial" in features and "mu_s" in ref:
        result["sfid"] = frechet_distance(
            FeatureStats.from_features(features["spatial"]), FeatureStats(ref["mu_s"], ref["sigma_s"])
        )
    if "logits" in features and kind == "inception":
        result["inception_score"] = inception_score(features["logits"])
    if "pool" in ref and len(ref["pool"]) > 3 and len(features["pool"]) > 3:
        result["precision"], result["recall"] = precision_recall(ref["pool"], features["pool"])
        result["num_reference"] = int(len(ref["pool"]))
    if labels is not None and "logits" in features and kind == "classifier":
        predicted = features["logits"].argmax(1)
        result["class_accuracy"] = float((predicted == labels).mean())
    return result


def evaluate_npz(
    samples: str | Path | NpzReader,
    ref: str | Path | dict[str, np.ndarray],
    net: FeatureNet,
    *,
    batch_size: int = 100,
    progress: bool = True,
    json_out: str | Path | None = None,
) -> dict[str, float | int | str]:
    """Score an ADM-format sample .npz (arr_0 images, optional arr_1 labels) against a reference.

    `samples` is the file's path, or the file already open (`NpzReader`, which a caller that has checked
    it keeps open); a path is opened once here. `json_out`, a new file (an existing one is refused before
    anything is computed), also receives the metrics; missing folders of it are created first.
    """
    json_path = prepare_json_out(str(json_out), "json_out") if json_out is not None else None
    if not isinstance(samples, NpzReader):
        with NpzReader(samples) as npz:
            return _evaluate(npz, ref, net, batch_size, progress, json_path)
    return _evaluate(samples, ref, net, batch_size, progress, json_path)


def _evaluate(
    samples: NpzReader,
    ref: str | Path | dict[str, np.ndarray],
    net: FeatureNet,
    batch_size: int,
    progress: bool,
    json_out: Path | None,
) -> dict[str, float | int | str]:
    kind = getattr(net, "kind", "inception")
    shape = check_sample_count(samples)  # first, before the reference is computed
    if isinstance(ref, str) and ref == BUNDLED_DIGITS and not Path(ref).exists():
        # The samples' batch size, so that `ref-stats` of the same digits gives the same numbers on a GPU
        # too (cuDNN may pick another fp32 convolution algorithm for another batch shape).
        ref = bundled_digits_reference(net, shape[1], batch_size, progress)
    ref_name = "given as statistics" if isinstance(ref, dict) else str(ref)
    if not isinstance(ref, dict):
        ref = reference_from_source(ref, net, batch_size, progress)
    elif str(ref.get(REFERENCE_KIND_KEY, kind)) != kind:
        raise DataError(f"the reference holds {ref[REFERENCE_KIND_KEY]} statistics, not {kind}")
    check_reference_net(ref, net, ref_name)  # before any sample's features are computed
    features = compute_features(net, samples.iter_images(batch_size), shape[0], progress)
    labels = samples.read("arr_1") if "arr_1" in samples.keys else None
    result = score_features(features, ref, labels, kind)
    result["samples"] = str(samples.path)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result
