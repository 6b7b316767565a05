"""Accuracy and time of every sampler on a trained demo run, judged by its digit classifier.

    python benchmarks/samplers.py outputs/demo [--per-class 20]

Each row samples `per-class` digits of each class with the run's guidance settings and reports how
often the demo's classifier reads them as their class. The sampler tables in docs/demo.md come from
this script on the finished demo model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ditkit.evaluation import classify, load_classifier
from ditkit.sampling import generate
from ditkit.train import load_model

CASES = [
    ("ddim", 5, "linear"), ("ddim", 10, "linear"), ("euler", 10, "linear"), ("dpmpp_2m", 5, "linear"),
    ("dpmpp_2m", 10, "linear"), ("heun", 5, "linear"), ("heun", 10, "linear"), ("heun", 20, "linear"),
    ("ddpm", 25, "linear"), ("heun", 5, "logsnr"), ("heun", 10, "logsnr"), ("dpmpp_2m", 5, "logsnr"),
    ("ddim", 5, "logsnr"),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", type=Path, help="a `ditkit demo --out` folder")
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    judge = load_classifier(args.demo_dir / "classifier").model
    model, config = load_model(args.demo_dir / "run")
    labels = torch.arange(config.model.num_classes).repeat_interleave(args.per_class)
    for sampler, steps, spacing in CASES:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            images = generate(model, config, labels, sampler=sampler, steps=steps, spacing=spacing)
        seconds = time.perf_counter() - start  # sampling only, not the judging below
        accuracy = (classify(judge, images.float()) == labels).float().mean().item()
        print(
            f"{sampler:9s} {steps:3d} steps, {spacing:6s} grid: accuracy {accuracy:6.1%}  {seconds:6.1f} s", flush=True
        )


if __name__ == "__main__":
    main()
