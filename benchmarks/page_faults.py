"""The C allocator's share of CPU timings: minor page faults and time per step, each model alone or interleaved.

    python benchmarks/page_faults.py --order ditkit|diffusers|interleaved [--what train|forward]
        [--preset DiT-S/2] [--batch 16] [--precision bf16] [--steps 8] [--warmup 3]

PyTorch's CPU allocator does not cache; glibc returns freed memory to the OS when it trims its heap
or when a block was `mmap`ed, and the next use faults it back in one zeroed page at a time. How much
depends on the history of the whole process, so run each --order in its own process and compare:
`ditkit bench` interleaves the two models in one process, which is neither model's situation alone.

--what train: `ditkit bench`'s training step (loss, backward, fused AdamW); forward: one inference
forward at --batch (the guided batch of sampling is twice the image batch). Each step prints its
seconds and faulted MiB; the summary gives medians after --warmup steps. To see the allocator's
effect, run it again with glibc's trimming off (docs/speed.md, "The C allocator's share"):

    MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_MMAP_THRESHOLD_=1073741824 python benchmarks/page_faults.py ...
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import time
from collections.abc import Callable

import torch

from ditkit.bench import BenchSettings, _autocast, _minor_faults, _train_steps, paired_forwards, paired_models
from ditkit.config import MODEL_PRESETS


def _forwards(ours, theirs, batch: int, precision: str, device: torch.device) -> dict[str, Callable[[], None]]:
    """Inference forwards of both models (no grad, under `precision`'s autocast)."""
    ours.eval()
    theirs.eval()

    def inference(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            with _autocast(device, precision):
                forward()

        return run

    return {name: inference(fn) for name, fn in paired_forwards(ours, theirs, batch, device).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--order", choices=["ditkit", "diffusers", "interleaved"], required=True)
    parser.add_argument("--what", choices=["train", "forward"], default="train")
    parser.add_argument("--preset", default="DiT-S/2", choices=list(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=8, help="steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="first steps per model left out of the medians")
    args = parser.parse_args()
    if _minor_faults() is None:
        parser.error("this OS does not report page faults to Python's `resource` module")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be at least 0 and below --steps ({args.steps}), got {args.warmup}")
    device = torch.device("cpu")
    settings = BenchSettings(preset=args.preset, batch=args.batch, device="cpu")
    ours, theirs, _ = paired_models(settings, device)
    if args.what == "train":
        fns, _ = _train_steps(ours, theirs, settings, args.precision, device)
    else:
        fns = _forwards(ours, theirs, args.batch, args.precision, device)
    names = ["ditkit", "diffusers"] if args.order == "interleaved" else [args.order]
    order = [name for _ in range(args.steps) for name in names]
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for name in order:
        f0, t0 = _minor_faults(), time.perf_counter()
        fns[name]()
        seconds, mib = time.perf_counter() - t0, (_minor_faults() - f0) * mmap.PAGESIZE / 2**20
        seen[name].append((seconds, mib))
        print(f"{name:9s} step {len(seen[name]):2d}: {seconds * 1e3:7.0f} ms, {mib:6.0f} MiB faulted", flush=True)
    for name, rows in seen.items():
        kept = rows[args.warmup :]
        ms = statistics.median(s for s, _ in kept) * 1e3
        mib = statistics.median(m for _, m in kept)
        print(f"{name}: median {ms:.0f} ms and {mib:.0f} MiB faulted per {args.what} step ({args.order})")


if __name__ == "__main__":
    main()
