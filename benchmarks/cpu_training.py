"""Training-step throughput of the demo model, measured side by side in one run.

    python benchmarks/cpu_training.py [--batch 128] [--steps 8] [--compile]

Prints img/s for fp32 vs bf16 autocast, and for bf16 with the fused SDPA kernel vs the explicit
two-matmul attention that `attn_impl='auto'` picks on CPU, with their ratios. The numbers in
docs/demo.md come from this script on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from ditkit.config import DiffusionConfig, ModelConfig
from ditkit.diffusion import build_process, diffusion_loss
from ditkit.models import DiT


def throughput(model_config: ModelConfig, precision: str, batch: int, steps: int, compile_model: bool) -> float:
    """Images per second of full training steps (forward, backward, AdamW) after two warm-up steps."""
    torch.manual_seed(0)
    model = DiT(model_config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    forward = torch.compile(model) if compile_model else model
    process = build_process(DiffusionConfig(prediction="v"))
    h, w = model_config.input_hw
    x0 = torch.randn(batch, model_config.in_channels, h, w)
    y = torch.randint(0, model_config.num_classes, (batch,))
    g = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = diffusion_loss(forward, process, x0, y, generator=g, prediction="v")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow first call)")
    args = parser.parse_args()
    base = dict(input_size=28, in_channels=1, patch_size=4, hidden_size=256, depth=6, num_heads=4, num_classes=10,
                learn_sigma=False)  # fmt: skip
    runs = {
        "fp32 (sdpa)": (ModelConfig(**base, attn_impl="sdpa"), "fp32", False),
        "bf16, fused sdpa": (ModelConfig(**base, attn_impl="sdpa"), "bf16", False),
        "bf16, auto (matmul attention)": (ModelConfig(**base), "bf16", False),
    }
    if args.compile:
        runs["bf16, auto, torch.compile"] = (ModelConfig(**base), "bf16", True)
    results = {}
    for name, (cfg, precision, compile_model) in runs.items():
        results[name] = throughput(cfg, precision, args.batch, args.steps, compile_model)
        print(f"{name:34s} {results[name]:7.1f} img/s", flush=True)
    reference = results["fp32 (sdpa)"]
    print(f"bf16 auto / fp32:        {results['bf16, auto (matmul attention)'] / reference:.2f}x")
    print(f"bf16 auto / bf16 fused:  {results['bf16, auto (matmul attention)'] / results['bf16, fused sdpa']:.2f}x")


if __name__ == "__main__":
    main()
