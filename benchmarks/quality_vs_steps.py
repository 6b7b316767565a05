"""Sample quality against step count for every sampler, judged by the digit classifier.

    python benchmarks/quality_vs_steps.py --run outputs/demo/run --classifier outputs/demo/classifier \
        --out outputs/quality --per-class 20 --steps 5 10 25 50

For each (sampler, steps) cell it draws `per-class` samples of every class (the same seeded noise for
every cell, the checkpoint's guidance settings) and reports

- accuracy: how often the classifier reads a sample as the class it was asked for;
- FD: the Frechet distance between classifier penultimate features of the samples and of the held-out
  real digits (a classifier-feature FID; biased upwards at small sample counts, so the table also gives
  the same distance for an equally large set of *real* training digits as a floor).

Writes quality_vs_steps.json, quality_vs_steps.md (tables) and quality_vs_steps.png (plot) into --out,
updating them after every cell.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ditkit.data import build_dataset
from ditkit.evaluation import FeatureStats, classifier_features, classify, frechet_distance, load_classifier
from ditkit.samplers import SAMPLERS
from ditkit.sampling import generate
from ditkit.train import load_model

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def plot(results: list[dict], samplers: list[str], steps: list[int], path: Path, title: str) -> None:
    """Two panels (accuracy; FD on a log axis) against steps on a log axis, one line per sampler."""
    panel_w, h = 440, 360
    img = Image.new("RGB", (2 * panel_w + 150, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 4), title, fill="black")
    xs_log = np.log(np.array(steps, dtype=float))
    x_lo, x_hi = xs_log.min(), max(xs_log.max(), xs_log.min() + 1e-6)
    for p, (key, label) in enumerate((("accuracy", "classifier accuracy"), ("fd", "classifier-feature FD (log)"))):
        left, right, top, bottom = 55 + p * panel_w, (p + 1) * panel_w - 10, 40, h - 40
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, top - 14), f"{label} vs steps", fill="black")
        values = [r[key] for r in results]
        if not values:
            continue

        def scale(v: float, log: bool = key == "fd") -> float:
            return float(np.log10(max(v, 1e-3))) if log else v

        lo, hi = min(scale(v) for v in values), max(scale(v) for v in values)
        if key == "accuracy":
            lo, hi = min(lo, 0.0), 1.0
        hi = hi if hi > lo else lo + 1e-6
        shown = (lambda v: 10**v) if key == "fd" else (lambda v: v)  # noqa: E731
        draw.text((left - 50, top), f"{shown(hi):.3g}", fill="black")
        draw.text((left - 50, bottom - 10), f"{shown(lo):.3g}", fill="black")
        for s in steps:
            x = left + (np.log(s) - x_lo) / (x_hi - x_lo or 1) * (right - left)
            draw.text((x - 6, bottom + 6), str(s), fill="black")
        for c, sampler in enumerate(samplers):
            pts = sorted((r["steps"], scale(r[key])) for r in results if r["sampler"] == sampler)
            xy = [
                (
                    left + (np.log(s) - x_lo) / (x_hi - x_lo or 1) * (right - left),
                    bottom - (v - lo) / (hi - lo) * (bottom - top),
                )
                for s, v in pts
            ]
            colour = COLOURS[c % len(COLOURS)]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    for c, sampler in enumerate(samplers):
        y = 40 + 16 * c
        draw.line([(2 * panel_w + 5, y + 6), (2 * panel_w + 25, y + 6)], fill=COLOURS[c % len(COLOURS)], width=3)
        draw.text((2 * panel_w + 30, y), sampler, fill="black")
    draw.text((10, h - 16), "steps (log scale)", fill="black")
    img.save(path)


def markdown(results: list[dict], samplers: list[str], steps: list[int], meta: dict) -> str:
    """Two tables (accuracy, FD), samplers x steps."""
    lines = [
        f"Checkpoint `{meta['run']}`, {meta['samples_per_cell']} samples per cell ({meta['per_class']} per class), "
        f"guidance scale {meta['cfg_scale']}, '{meta['spacing']}' grid, seed {meta['seed']}. "
        f"Real-vs-real FD floor at this sample count: {meta['fd_real_floor']:.2f}.",
        "",
    ]
    for key, label, fmt in (
        ("accuracy", "Classifier accuracy", "{:.1%}"),
        ("fd", "Classifier-feature FD (lower is better)", "{:.2f}"),
    ):
        lines += [f"**{label}**", "", "| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---|" + "---:|" * len(steps)]  # fmt: skip
        for sampler in samplers:
            cells = []
            for s in steps:
                hit = [r for r in results if r["sampler"] == sampler and r["steps"] == s]
                cells.append(fmt.format(hit[0][key]) if hit else "")
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("heun makes 2 x steps - 1 denoiser calls; every other sampler makes one per step (x2 with guidance).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="checkpoint or run folder")
    parser.add_argument("--classifier", type=Path, required=True, help="a saved digit classifier folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, markdown and PNG")
    parser.add_argument("--per-class", type=int, default=20, help="samples per class in every cell")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 25, 50])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--spacing", default=None, help="time grid (default: the checkpoint's sample.spacing)")
    parser.add_argument("--bf16", action="store_true", help="run the model under CPU bf16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    judge = load_classifier(args.classifier).model
    model, config = load_model(args.run)
    spacing = args.spacing or config.sample.spacing
    holdout = build_dataset(config.data, "holdout")
    real, _ = holdout.__getitems__(list(range(len(holdout))))  # (N, C, H, W) in [-1, 1]
    real_stats = FeatureStats.from_features(classifier_features(judge, real))
    labels = torch.arange(config.model.num_classes).repeat_interleave(args.per_class)
    train_set = build_dataset(config.data, "train")
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))[: len(labels)].tolist()
    floor = frechet_distance(
        FeatureStats.from_features(classifier_features(judge, train_set.__getitems__(pick)[0])), real_stats
    )
    meta = {"run": str(args.run), "per_class": args.per_class, "samples_per_cell": len(labels),
            "cfg_scale": config.sample.cfg_scale, "spacing": spacing, "seed": args.seed, "bf16": args.bf16,
            "real_images": len(real), "fd_real_floor": floor}  # fmt: skip
    results: list[dict] = []
    cells = [(sampler, steps) for sampler in args.samplers for steps in args.steps]
    for sampler, steps in tqdm(cells, desc="cells", unit="cell"):
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else torch.autocast("cpu", enabled=False)
        with autocast:
            images = generate(model, config, labels, sampler=sampler, steps=steps, spacing=spacing, seed=args.seed)
        seconds = round(time.perf_counter() - start, 2)  # sampling only, not the judging below
        images = images.float()
        accuracy = (classify(judge, images) == labels).float().mean().item()
        fd = frechet_distance(FeatureStats.from_features(classifier_features(judge, images)), real_stats)
        results.append({"sampler": sampler, "steps": steps, "accuracy": accuracy, "fd": fd,
                        "seconds": seconds})  # fmt: skip
        tqdm.write(f"{sampler:15s} {steps:3d} steps: accuracy {accuracy:6.1%}  FD {fd:8.2f}")
        (args.out / "quality_vs_steps.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        (args.out / "quality_vs_steps.md").write_text(markdown(results, args.samplers, args.steps, meta))
        plot(results, args.samplers, args.steps, args.out / "quality_vs_steps.png",
             f"{len(labels)} samples per cell, '{spacing}' grid, cfg {config.sample.cfg_scale}")  # fmt: skip


if __name__ == "__main__":
    main()
