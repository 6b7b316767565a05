"""Costs and numerical agreement of the evaluation pieces, measured side by side in one run.

    python benchmarks/evaluation.py [--device cuda] [--batch 100] [--images 500] [--dim 2048] [--n 10000]
        [--inception-weights pt_inception-2015-12-05-6726825d.pth]

1. FID Inception throughput (img/s, 256 px uint8 input resized to 299) in fp32; on CUDA also with TF32
   convolutions allowed, and the largest relative feature change TF32 causes.
2. Frechet distance of two `--dim`-d statistics: ditkit's eigh-based trace term vs scipy.linalg.sqrtm
   (time and difference), on covariances estimated from `--n` and from 1,000 samples (singular).
3. Improved precision/recall of two `--n` x `--dim` feature sets (time).

Without --inception-weights the network has random weights: the speed is the same, features are not.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ditkit.evaluation.inception import load_inception
from ditkit.evaluation.metrics import FeatureStats, frechet_distance, precision_recall, trace_sqrt_product


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inception_speed(args: argparse.Namespace, device: torch.device) -> None:
    net = load_inception(args.inception_weights, device, random_init=args.inception_weights is None)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 256, 256), dtype=torch.uint8, generator=g)
    settings = [("fp32", False)] + ([("tf32", True)] if device.type == "cuda" else [])
    feats = {}
    for name, tf32 in settings:
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        with torch.no_grad():
            net(images[: args.batch].to(device))  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            out = [net(images[i : i + args.batch].to(device))["pool"].cpu() for i in range(0, len(images), args.batch)]
            _sync(device)
        seconds = time.perf_counter() - t0
        feats[name] = torch.cat(out).double()
        print(f"inception {name}: {len(images) / seconds:.1f} img/s (batch {args.batch}, {device})")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if "tf32" in feats:
        rel = (feats["tf32"] - feats["fp32"]).norm(dim=1) / feats["fp32"].norm(dim=1).clamp(min=1e-12)
        print(f"tf32 vs fp32 pool features: max relative change {rel.max().item():.2e}")


def fid_cost(args: argparse.Namespace) -> None:
    try:
        import scipy.linalg
    except ImportError:
        scipy = None
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)
    for n in (args.n, 1000):
        a = FeatureStats.from_features(rng.standard_normal((n, args.dim)) @ basis)
        b = FeatureStats.from_features(rng.standard_normal((n, args.dim)) @ basis * 1.1 + 0.05)
        t0 = time.perf_counter()
        fid = frechet_distance(a, b)
        ours = time.perf_counter() - t0
        line = f"FID of {args.dim}-d stats from {n} samples: {fid:.6f} in {ours:.2f} s (eigh)"
        if scipy is not None:
            t0 = time.perf_counter()
            root = scipy.linalg.sqrtm(a.sigma @ b.sigma)
            ref_trace = float(np.trace(root).real)
            theirs = time.perf_counter() - t0
            diff = abs(trace_sqrt_product(a.sigma, b.sigma) - ref_trace)
            line += f"; scipy.linalg.sqrtm {theirs:.2f} s, |trace difference| {diff:.2e}"
        print(line)


def pr_cost(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    sam = (rng.standard_normal((args.n, args.dim)) * 1.05).astype(np.float32)
    t0 = time.perf_counter()
    precision, recall = precision_recall(ref, sam, batch_size=1000)
    print(
        f"precision/recall of {args.n} vs {args.n} x {args.dim}: {precision:.3f}/{recall:.3f} in "
        f"{time.perf_counter() - t0:.1f} s (float64, CPU)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--inception-weights")
    args = parser.parse_args()
    device = torch.device(args.device)
    inception_speed(args, device)
    fid_cost(args)
    pr_cost(args)


if __name__ == "__main__":
    main()
