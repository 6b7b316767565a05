"""Classifier-feature FID on the bundled digits: real vs real, noise, blur, shuffled labels.

    python benchmarks/classifier_fid.py [--epochs 10] [--classifier DIR] [--threads 1]

Trains the digit judge (seed 0) on the 4,500 training digits at 28 px unless --classifier names a
saved one, takes those digits as the reference, and scores 500-image sets with `score_features`.
The table in docs/evaluation.md comes from this script.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from ditkit.data import load_mnist
from ditkit.evaluation import load_classifier, train_classifier
from ditkit.evaluation.evaluate import score_features
from ditkit.evaluation.features import ClassifierFeatures, compute_features, reference_from_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--classifier", help="a saved judge folder (skips training)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small convs: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set, holdout = load_mnist(28, "train"), load_mnist(28, "holdout")
    t0 = time.perf_counter()
    if args.classifier:
        judge = load_classifier(args.classifier)
    else:
        judge = train_classifier(train_set, holdout, epochs=args.epochs, progress=False)
    print(f"judge: held-out accuracy {judge.holdout_accuracy:.4f} ({time.perf_counter() - t0:.0f} s)")
    net = ClassifierFeatures(judge.model)

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        return compute_features(net, (images[i : i + 500] for i in range(0, len(images), 500)), progress=False)

    def nhwc(x: torch.Tensor) -> np.ndarray:
        return x.permute(0, 2, 3, 1).numpy()

    train_images, hold_images, hold_labels = nhwc(train_set.images), nhwc(holdout.images), holdout.labels.numpy()
    ref = reference_from_features(features(train_images), "classifier")
    rng = np.random.default_rng(0)
    blurred = F.interpolate(F.avg_pool2d(holdout.images.float(), 2), scale_factor=2, mode="nearest")
    sets = {
        "held-out digits": (hold_images, hold_labels),
        "training digits (first 500)": (train_images[:500], train_set.labels[:500].numpy()),
        "held-out digits, 2x blurred": (nhwc(blurred.round().to(torch.uint8)), hold_labels),
        "held-out digits, labels shuffled": (hold_images, rng.permutation(hold_labels)),
        "uniform noise": (rng.integers(0, 256, hold_images.shape, dtype=np.uint8), hold_labels),
    }
    for name, (images, labels) in sets.items():
        result = score_features(features(images), ref, labels, "classifier")
        shown = {k: round(v, 4) for k, v in result.items() if k in ("fid", "precision", "recall", "class_accuracy")}
        print(f"{name:34s} {json.dumps(shown)}")


if __name__ == "__main__":
    main()
