"""Feature caching across sampling steps: speedup and quality cost on a trained digits model.

For each cache interval k (1 = off), samples `--per-class` digits per class with the checkpoint's
sampler settings, times it, and judges the samples with the digit classifier (class accuracy and
classifier-feature FID against the held-out real digits). The intervals run interleaved for
`--repeats` rounds and median times are reported, so the speedups are measured side by side.

    HF_HUB_OFFLINE=1 python benchmarks/feature_cache.py --run outputs/demo/run \
        --classifier outputs/demo/classifier --intervals 1 2 3 4 --per-class 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ditkit.data import build_dataset
from ditkit.evaluation import FeatureStats, classifier_features, classify, frechet_distance, load_classifier
from ditkit.sampling import generate
from ditkit.train import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="checkpoint or run folder")
    parser.add_argument("--classifier", type=Path, required=True, help="a saved digit classifier folder")
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timing rounds (medians reported)")
    parser.add_argument("--bf16", action="store_true", help="sample under CPU bf16 autocast")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    judge = load_classifier(args.classifier).model
    model, config = load_model(args.run)
    holdout = build_dataset(config.data, "holdout")
    real_stats = FeatureStats.from_features(
        classifier_features(judge, holdout.__getitems__(list(range(len(holdout))))[0])
    )
    labels = torch.arange(config.model.num_classes).repeat_interleave(args.per_class)
    times: dict[int, list[float]] = {k: [] for k in args.intervals}
    images: dict[int, torch.Tensor] = {}
    for _ in range(args.repeats):
        for k in args.intervals:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                images[k] = generate(model, config, labels, steps=args.steps, feature_cache_interval=k).float()
            times[k].append(time.perf_counter() - start)
    base = statistics.median(times[args.intervals[0]])
    rows = []
    print(f"{len(labels)} samples, {args.steps or config.sample.steps} {config.sample.sampler} steps, "
          f"cfg {config.sample.cfg_scale}")  # fmt: skip
    for k in args.intervals:
        seconds = statistics.median(times[k])
        accuracy = (classify(judge, images[k]) == labels).float().mean().item()
        fd = frechet_distance(FeatureStats.from_features(classifier_features(judge, images[k])), real_stats)
        rows.append({"interval": k, "seconds": seconds, "speedup": base / seconds, "accuracy": accuracy, "fd": fd})
        print(
            f"  interval {k}: {seconds:7.1f} s  speedup {base / seconds:4.2f}x  accuracy {accuracy:6.1%}  FD {fd:7.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
