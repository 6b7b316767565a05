"""Where the time goes: ditkit's and diffusers' DiT (same weights) timed and profiled kernel by kernel.

    python benchmarks/profile_forward.py [--preset DiT-XL/2] [--batch 128] [--device cuda] [--precision bf16]
        [--train-batch 64] [--rows 18] [--profile-backward]

Times an inference forward of each model (interleaved, medians of --repeats), a forward + backward at
--train-batch, and then prints torch.profiler's table of the forward's kernels (CUDA time on a GPU, CPU
time otherwise) for each side; with --profile-backward also the table of one forward + backward (the
training computation without the optimizer; docs/speed.md's side-by-side training profile of S/2 at
batch 16 is `--batch 16 --profile-backward`). The models come from `ditkit bench` (ditkit's DiT and its diffusers
export). docs/speed.md's H100 profile of DiT-XL/2 at batch 128 is this script's output.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from ditkit.bench import BenchSettings, interleaved_medians, paired_forwards, paired_models
from ditkit.config import MODEL_PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="DiT-S/2", choices=list(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-batch", type=int, help="batch of the forward + backward timing (default: --batch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", type=int, default=18, help="kernels listed per side")
    parser.add_argument("--profile-backward", action="store_true", help="also profile one forward + backward")
    args = parser.parse_args()
    device = torch.device(args.device)
    ours, theirs, _ = paired_models(BenchSettings(preset=args.preset, device=args.device), device)
    ours.eval()
    theirs.eval()
    n = args.batch

    def forwards(k: int) -> dict[str, Callable[[], torch.Tensor]]:
        return paired_forwards(ours, theirs, k, device)

    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    with amp:
        with torch.no_grad():
            for name, seconds in interleaved_medians(forwards(n), args.repeats, device).items():
                print(f"{name:9s} forward at batch {n}: {seconds * 1e3:8.2f} ms")
        k = args.train_batch or n
        steps = {name: lambda fn=fn: fn().float().square().mean().backward() for name, fn in forwards(k).items()}
        for name, seconds in interleaved_medians(steps, 3, device).items():
            print(f"{name:9s} forward + backward at batch {k}: {seconds * 1e3:8.2f} ms")
        activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        with torch.no_grad():
            for name, fn in forwards(n).items():
                with profile(activities=[activity]) as prof:
                    for _ in range(3):
                        fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                print(f"===== {name}: 3 forwards at batch {n}")
                print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
        if args.profile_backward:
            for name, step in steps.items():
                with profile(activities=[activity]) as prof:
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                print(f"===== {name}: 1 forward + backward at batch {k}")
                print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
