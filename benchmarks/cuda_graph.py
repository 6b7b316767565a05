"""CUDA-graph sampling forwards on a GPU: eager, graphs that replay autocast's weight casts, graphs on cast copies.

    python benchmarks/cuda_graph.py [--presets DiT-S/2 DiT-B/2 DiT-XL/2] [--batches 32 256]
        [--calls 20] [--repeats 7] [--text-dim 384] [--json out.json]

Each timed call is `--calls` inference forwards of ditkit's DiT under bf16 autocast at one batch (a
guided sampling step's batch is twice the image count), as `generate` makes them:
- eager: the model itself;
- graph, casts replayed: `CUDAGraphForward(model, cast_weights=False)`, where the captured graph
  casts every linear and convolution weight to bf16 at every replay, as eager autocast does;
- graph, cast copies: `CUDAGraphForward(model)` (the default), whose graph reads bf16 copies of those
  weights, re-cast only when a weight changes.
With `--text-dim` the model is text-conditioned (caption tokens and pooled embedding, half the rows
the null text, as a guided batch has). The three run interleaved in one process
(`ditkit.bench.interleaved_medians`); the table gives ms
per forward and the ratios. All three give the same numbers (tests/test_cuda.py).
"""

from __future__ import annotations

import argparse

import torch

from ditkit.bench import cuda_script_device, interleaved_medians, write_rows
from ditkit.config import MODEL_PRESETS, ModelConfig
from ditkit.models import DiT
from ditkit.models.cuda_graph import CUDAGraphForward
from ditkit.models.text import TextCond
from ditkit.utils.args import positive_int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["DiT-S/2", "DiT-B/2", "DiT-XL/2"], choices=list(MODEL_PRESETS))
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[32, 256])
    parser.add_argument("--input-size", type=positive_int, default=32)
    parser.add_argument("--calls", type=positive_int, default=20, help="forwards per timed call")
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument(
        "--text-dim", type=int, default=0, help="time a text-conditioned model instead (tokens + pooled, this width)"
    )
    parser.add_argument("--text-tokens", type=positive_int, default=32, help="caption tokens with --text-dim")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = cuda_script_device(parser, args.json)
    rows = []
    print(f"{'preset':9s} {'batch':>5s} {'eager ms':>9s} {'graph+casts ms':>15s} {'graph ms':>9s} {'vs casts':>9s}")
    for preset in args.presets:
        torch.manual_seed(0)
        text = dict(num_classes=0, text_dim=args.text_dim, text_mode="both")
        text = text if args.text_dim else dict(num_classes=1000)
        config = ModelConfig(input_size=args.input_size, in_channels=4, **text, **MODEL_PRESETS[preset])
        model = DiT(config).to(device).eval()
        for batch in args.batches:
            x = torch.randn(batch, 4, args.input_size, args.input_size, device=device)
            t = torch.randint(0, 1000, (batch,), device=device).float()
            if args.text_dim:  # half the rows real captions of random lengths, half the null text (guidance)
                tokens = torch.randn(batch, args.text_tokens, args.text_dim, device=device)
                lengths = torch.randint(1, args.text_tokens + 1, (batch,), device=device)
                mask = torch.arange(args.text_tokens, device=device)[None] < lengths[:, None]
                null = torch.arange(batch, device=device) >= batch // 2
                y = TextCond(tokens, mask, torch.randn(batch, args.text_dim, device=device), null)
            else:
                y = torch.randint(0, 1001, (batch,), device=device)
            networks = {
                "eager": model,
                "graph_with_casts": CUDAGraphForward(model, cast_weights=False),
                "graph_cast_copies": CUDAGraphForward(model),
            }

            def timed(network):
                @torch.no_grad()
                def run() -> None:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        for _ in range(args.calls):
                            network(x, t, y)

                return run

            seconds = interleaved_medians({k: timed(v) for k, v in networks.items()}, args.repeats, device)
            ms = {k: 1e3 * v / args.calls for k, v in seconds.items()}
            row = {"preset": preset, "batch": batch, "ms_per_forward": ms}
            row["copies_vs_casts"] = ms["graph_with_casts"] / ms["graph_cast_copies"]
            rows.append(row)
            print(
                f"{preset:9s} {batch:5d} {ms['eager']:9.2f} {ms['graph_with_casts']:15.2f} "
                f"{ms['graph_cast_copies']:9.2f} {row['copies_vs_casts']:8.2f}x",
                flush=True,
            )
            del networks
            torch.cuda.empty_cache()
    if args.json:  # a new file (an existing one is refused)
        write_rows(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
