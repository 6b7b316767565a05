"""The fused GPU kernels (`ditkit.models.fused`) against the plain PyTorch ops, side by side on one GPU.

    python benchmarks/fused_kernels.py [--presets DiT-S/2 DiT-B/2 DiT-XL/2] [--batches 32 256]
        [--train-batches 16 64] [--calls 10] [--repeats 5] [--json out.json]

For each preset, bf16 autocast, interleaved in one process (`ditkit.bench.interleaved_medians`):
- sampling forwards at each of `--batches` (a guided step's batch is twice its image count), eager and
  as the CUDA graphs `generate` replays, with the kernels off (`use_fused_kernels(False)`) and on;
- training steps (forward, backward, no optimizer) at each of `--train-batches`, off and on.
It prints ms per call and the speedup, and checks that the two routes' outputs agree (largest
difference relative to the largest output value).
"""

from __future__ import annotations

import argparse

import torch

from ditkit.bench import cuda_script_device, interleaved_medians, write_rows
from ditkit.config import MODEL_PRESETS, ModelConfig
from ditkit.models import DiT
from ditkit.models.cuda_graph import CUDAGraphForward
from ditkit.models.fused import use_fused_kernels
from ditkit.utils.args import positive_int


def _inputs(batch: int, size: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(batch)
    x = torch.randn(batch, 4, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).float().to(device)
    y = torch.randint(0, 1001, (batch,), generator=g).to(device)
    return x, t, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["DiT-S/2", "DiT-B/2", "DiT-XL/2"], choices=list(MODEL_PRESETS))
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[32, 256])
    parser.add_argument("--train-batches", nargs="+", type=positive_int, default=[16, 64])
    parser.add_argument("--input-size", type=positive_int, default=32)
    parser.add_argument("--calls", type=positive_int, default=10, help="forwards or training steps per timed call")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = cuda_script_device(parser, args.json)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    rows = []
    head = ("preset", "workload", "batch", "plain ms", "fused ms", "speedup", "max diff")
    print("{:9s} {:16s} {:>5s} {:>9s} {:>9s} {:>8s} {:>9s}".format(*head))
    for preset in args.presets:
        torch.manual_seed(0)
        config = ModelConfig(input_size=args.input_size, in_channels=4, num_classes=1000, **MODEL_PRESETS[preset])
        model = DiT(config).to(device)
        with torch.no_grad():  # off adaLN-Zero's identity start, so every branch does its work
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)

        def report(workload: str, batch: int, seconds: dict, diff: float) -> None:
            ms = {k: 1e3 * v / args.calls for k, v in seconds.items()}
            row = {"preset": preset, "workload": workload, "batch": batch, "ms": ms}
            row.update(speedup=ms["plain"] / ms["fused"], max_rel_diff=diff)
            rows.append(row)
            print(
                f"{preset:9s} {workload:16s} {batch:5d} {ms['plain']:9.2f} {ms['fused']:9.2f} "
                f"{row['speedup']:7.2f}x {diff:9.2e}",
                flush=True,
            )

        model.eval()
        for batch in args.batches:
            x, t, y = _inputs(batch, args.input_size, device)
            for workload in ("forward, eager", "forward, graph"):
                # separate graph wrappers: each captures its forward under its own switch
                graphs = workload.endswith("graph")
                nets = {name: CUDAGraphForward(model) if graphs else model for name in ("plain", "fused")}

                def timed(net, on):
                    @torch.no_grad()
                    def run():
                        with use_fused_kernels(on), amp:
                            for _ in range(args.calls):
                                out = net(x, t, y)
                        return out

                    return run

                runs = {name: timed(net, name == "fused") for name, net in nets.items()}
                outs = {name: run() for name, run in runs.items()}
                plain, fast = outs["plain"].float(), outs["fused"].float()
                diff = ((fast - plain).abs().max() / plain.abs().max()).item()
                report(workload, batch, interleaved_medians(runs, args.repeats, device), diff)
                del nets, runs, outs
                torch.cuda.empty_cache()
        model.train()
        for batch in args.train_batches:
            x, t, y = _inputs(batch, args.input_size, device)

            def step(on):
                def run():
                    torch.manual_seed(0)  # the same labels dropped (training mode) on both routes
                    with use_fused_kernels(on):
                        for _ in range(args.calls):
                            model.zero_grad(set_to_none=True)
                            with amp:
                                loss = model(x, t, y).float().square().mean()
                            loss.backward()
                    return loss.detach()

                return run

            runs = {"plain": step(False), "fused": step(True)}
            losses = {name: run() for name, run in runs.items()}
            diff = ((losses["fused"] - losses["plain"]).abs() / losses["plain"].abs()).item()
            report("train step", batch, interleaved_medians(runs, args.repeats, device), diff)
            torch.cuda.empty_cache()
    if args.json:  # a new file (an existing one is refused)
        write_rows(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
