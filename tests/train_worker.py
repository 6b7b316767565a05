"""Runs the tiny test training job in a fresh process: under torchrun (every rank runs this file) or
alone, so that tests can launch DDP/FSDP jobs and kill a run with SIGKILL.

    python tests/train_worker.py RUN_DIR [--resume PATH] [--pause-at-step K] [--nan-calls K] [section.key=value ...]

The config is conftest's tiny one (make_tiny_config) on make_tiny_dataset(20); overrides are applied
on top. Several `--phase RUN_DIR ...` groups may follow to run jobs one after another in one launch
(the process group is created once, here, and reused by every train() call).

Test-only instruments (patched in here, not in the library):
--pause-at-step K  after the optimizer update of step K (before its checkpoint), write this process's
                   id to RUN_DIR/paused-RANK and sleep, so a test can kill -9 it at a known point.
--nan-calls K      the last rank's loss is NaN for its first K loss calls (non-finite guard under DDP).
--step-seconds S0,S1,...
                   a fake clock for train.max_minutes: it starts at 0 and each loss call of rank r
                   advances it by S_r seconds; RUN_DIR/all_sums-RANK receives how many all_sum
                   collectives (loss, non-finite and budget agreement) the rank ran.
--count-grad-syncs
                   RUN_DIR/grad_syncs-RANK receives a JSON list, per optimizer step, of the gradient
                   reductions the rank ran since the previous step: DDP's bucket all-reduces (counted by a
                   comm hook) or FSDP2's reduce-scatters (one per sharded module and backward pass).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import ditkit.train as train_mod  # noqa: E402
from conftest import make_tiny_config, make_tiny_dataset  # noqa: E402
from ditkit.config import apply_overrides, config_from_dict, config_to_dict  # noqa: E402


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--resume")
    parser.add_argument("--pause-at-step", type=int)
    parser.add_argument("--nan-calls", type=int, default=0)
    parser.add_argument("--step-seconds")
    parser.add_argument("--count-grad-syncs", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    base = config_to_dict(make_tiny_config(args.out_dir))
    config = config_from_dict(apply_overrides(base, args.overrides))
    real_ema, real_loss, calls = train_mod.update_ema, train_mod.diffusion_loss, {"ema": 0, "loss": 0}
    real_clock, real_all_sum, now, all_sums = train_mod._clock, train_mod.all_sum, [0.0], [0]
    rank = dist.get_rank() if dist.is_initialized() else 0
    step_seconds = [float(s) for s in args.step_seconds.split(",")][rank] if args.step_seconds else None
    real_wrap, real_reduce_scatter, syncs, per_step = train_mod.wrap_model, dist.reduce_scatter_single, [0], []

    def update_ema(*a, **k):
        real_ema(*a, **k)
        calls["ema"] += 1
        per_step.append(syncs[0])
        syncs[0] = 0
        if calls["ema"] == args.pause_at_step:
            rank = dist.get_rank() if dist.is_initialized() else 0
            Path(args.out_dir, f"paused-{rank}.tmp").write_text(str(os.getpid()))
            os.replace(Path(args.out_dir, f"paused-{rank}.tmp"), Path(args.out_dir, f"paused-{rank}"))
            time.sleep(600)

    def diffusion_loss(*a, **k):
        loss = real_loss(*a, **k)
        calls["loss"] += 1
        last_rank = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        if step_seconds is not None:
            now[0] += step_seconds
        return loss * float("nan") if last_rank and calls["loss"] <= args.nan_calls else loss

    def all_sum(*a, **k):
        all_sums[0] += 1
        return real_all_sum(*a, **k)

    def wrap_model(model, env, parallel):
        wrapped = real_wrap(model, env, parallel)
        if hasattr(wrapped, "register_comm_hook"):  # DDP: every bucket's all-reduce passes through the hook
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                syncs[0] += 1
                return allreduce_hook(state, bucket)

            wrapped.register_comm_hook(None, hook)
        return wrapped

    def reduce_scatter_single(*a, **k):  # FSDP2's gradient reduction (looked up on torch.distributed per call)
        syncs[0] += 1
        return real_reduce_scatter(*a, **k)

    train_mod.update_ema, train_mod.diffusion_loss = update_ema, diffusion_loss
    if step_seconds is not None:
        train_mod._clock, train_mod.all_sum = (lambda: now[0]), all_sum
    if args.count_grad_syncs:
        train_mod.wrap_model, dist.reduce_scatter_single = wrap_model, reduce_scatter_single
    try:
        train_mod.train(config, resume=args.resume, progress=False, dataset=make_tiny_dataset(20))
    finally:
        train_mod.update_ema, train_mod.diffusion_loss = real_ema, real_loss
        train_mod._clock, train_mod.all_sum = real_clock, real_all_sum
        train_mod.wrap_model, dist.reduce_scatter_single = real_wrap, real_reduce_scatter
        if args.count_grad_syncs:
            Path(args.out_dir, f"grad_syncs-{rank}").write_text(json.dumps(per_step))
        if step_seconds is not None:
            Path(args.out_dir, f"all_sums-{rank}").write_text(str(all_sums[0]))


def main() -> None:
    # A native abort (SIGABRT, SIGSEGV) prints every thread's Python stack, so a test failure says where.
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # as conftest: same kernels, same bits
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    phases, current = [], []
    for item in sys.argv[1:]:
        if item == "--phase":
            phases.append(current)
            current = []
        else:
            current.append(item)
    phases.append(current)
    for number, argv in enumerate(phases, 1):
        if argv:
            run(argv)
            print(f"worker: phase {number} of {len(phases)} done", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    print("worker: all phases done, exiting", file=sys.stderr, flush=True)
    # Every result is on disk and the process group is gone: skip the interpreter's teardown. One CI run
    # lost rank 1 to "terminate called without an active exception" (SIGABRT) in or after its last phase,
    # with no stack (61 local repeats of that launch passed). Gloo's native threads outliving the interpreter's
    # finalisation abort that way (pytorch/pytorch#179291); if it was mid-phase instead, faulthandler and
    # the phase lines above now say where.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
