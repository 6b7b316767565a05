"""Inpainting quality on held-out digits: RePaint (with and without resampling) against a mask-trained model.

    python benchmarks/inpainting.py --checkpoint outputs/demo/run --classifier outputs/demo/classifier \
        [--inpaint-checkpoint outputs/demo-inpaint] [--n 100] [--steps 25] [--out outputs/inpaint_bench.png]

For each mask (bottom half, centre square, right half) every method fills the masked part of the
same held-out digits, given their true labels and no guidance. Reported per method: the demo
classifier's accuracy on the results, and the mean squared error to the real digit inside the mask
(pixels in [-1, 1]). A PNG shows, per mask, the real digits, the masked input and each method's fill.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ditkit.data import load_mnist
from ditkit.evaluation import classify, load_classifier
from ditkit.inpainting import inpaint
from ditkit.train import load_model
from ditkit.utils.images import save_grid


def masks(h: int, w: int) -> dict[str, torch.Tensor]:
    """Known masks (1 = keep), (1, 1, H, W)."""
    bottom, centre, right = (torch.ones(1, 1, h, w) for _ in range(3))
    bottom[..., h // 2 :, :] = 0
    centre[..., h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 0
    right[..., :, w // 2 :] = 0
    return {"bottom half": bottom, "centre": centre, "right half": right}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the base model (any ditkit pixel checkpoint)")
    parser.add_argument("--inpaint-checkpoint", help="the same model fine-tuned with model.inpaint=true")
    parser.add_argument("--classifier", required=True, help="a classifier folder (`ditkit demo` writes one)")
    parser.add_argument("--n", type=int, default=100, help="held-out digits per mask")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("outputs/inpaint_bench.png"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    judge = load_classifier(args.classifier).model
    base, config = load_model(args.checkpoint)
    methods = [("repaint r=1", base, config, "repaint", 1), ("repaint r=5", base, config, "repaint", 5)]
    if args.inpaint_checkpoint:
        tuned, tuned_config = load_model(args.inpaint_checkpoint)
        methods.append(("trained", tuned, tuned_config, "trained", 1))
        methods.append(("trained + repaint r=5", tuned, tuned_config, "repaint", 5))
    data = load_mnist(config.data.image_size, "holdout", config.data.holdout, config.data.split_seed)
    x0, labels = data.__getitems__(list(range(min(args.n, len(data)))))
    print(f"{len(x0)} held-out digits, {args.steps} steps, no guidance, true labels")
    print(f"{'mask':<12} {'method':<22} {'accuracy':>8} {'mse in mask':>11} {'seconds':>8}")
    rows = []
    for mask_name, known in masks(*config.model.input_hw).items():
        shown = x0[:10]
        rows += [shown, shown * known - (1 - known)]
        for name, model, cfg, method, resample in methods:
            start = time.perf_counter()
            out = inpaint(
                model, cfg, x0, known, labels, method=method, steps=args.steps, cfg_scale=1.0, resample=resample
            )
            seconds = time.perf_counter() - start
            acc = (classify(judge, out) == labels).float().mean().item()
            unknown = 1 - known
            mse = (((out - x0) ** 2) * unknown).sum().item() / (unknown.sum().item() * len(x0))
            print(f"{mask_name:<12} {name:<22} {acc:>8.1%} {mse:>11.4f} {seconds:>8.1f}")
            rows.append(out[:10])
    save_grid(torch.cat(rows), args.out, nrow=10, scale=2)
    print(f"wrote {args.out}: per mask, rows = real, masked input, then {', '.join(m[0] for m in methods)}")


if __name__ == "__main__":
    main()
