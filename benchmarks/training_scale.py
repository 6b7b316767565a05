"""Training throughput of DiT-S/2 and DiT-B/2 on 4x32x32 latents: precision, compile and activation checkpointing.

    python benchmarks/training_scale.py [--models DiT-S/2 DiT-B/2] [--batch 32] [--steps 5] [--warmup 2]
        [--variants fp32 bf16 bf16+compile bf16+compile-blocks] [--checkpointing 0 1] [--device auto]
        [--json out.json]

For every (model, variant, checkpointing) it times full training steps as ditkit.train runs them
(forward and loss, backward, gradient clipping, AdamW, EMA update) after warm-up steps, and reports:

- img/s, and the seconds of the first step (which compiles, for the compiled variants: '+compile' is
  train.compile=true, one graph of the whole model, '+compile-blocks' is train.compile=blocks);
- memory: on CUDA the peak allocated bytes of a step; on CPU the bytes of activations autograd saves
  for backward in one step (counted once per storage through saved_tensors_hooks, parameters left
  out), which is what activation checkpointing trades for recomputation;
- achieved GFLOP/s, counting a training step as 3x the forward pass (backward ~ 2x forward) and each
  multiply-accumulate of ditkit.models.dit.count_macs as 2 flops. Recomputed blocks are not counted,
  so with checkpointing this is useful work per second;
- that rate as a fraction of a plain bf16 and fp32 GEMM measured in the same run on the same device.

The lead's numbers in docs/training.md come from this script with its defaults on a quiet machine.
Smoke run: `python benchmarks/training_scale.py --models DiT-S/2 --batch 2 --steps 1 --warmup 1 --gemm 256`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch

from ditkit import bench
from ditkit.bench import SavedBytes
from ditkit.config import MODEL_PRESETS, DiffusionConfig, ModelConfig
from ditkit.diffusion import build_process, diffusion_loss
from ditkit.models import DiT
from ditkit.models.dit import count_macs
from ditkit.train import compile_for_training, make_adamw, update_ema


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def measure(
    model_config: ModelConfig,
    precision: str,
    compile_scope: bool | str,
    every: int,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict[str, float]:
    """img/s and memory of full training steps for one setting."""
    torch.manual_seed(0)
    model = DiT(model_config).to(device)
    model.grad_checkpoint_every = every
    ema = copy.deepcopy(model).requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw(trainable, lr=1e-4)  # the kernel train.fused_adamw's default takes
    forward = compile_for_training(model, model, compile_scope)
    process = build_process(DiffusionConfig())
    h, w = model_config.input_hw
    x0 = torch.randn(batch, model_config.in_channels, h, w, device=device)
    y = torch.randint(0, model_config.num_classes, (batch,), device=device)
    g = torch.Generator(device).manual_seed(0)
    # As ditkit.train does: label dropout is drawn outside the model (per sample), the embedder stays in
    # eval mode. A dropout drawn inside from a generator would break the compiled graph on every call.
    if model.y_embedder is not None:
        model.y_embedder.eval()
        drop = torch.rand(batch, generator=g, device=device) < model_config.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, model_config.num_classes), y)

    def step(counter: SavedBytes | None = None) -> None:
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)
            if counter is not None
            else contextlib.nullcontext()
        )
        with hooks, _autocast(device, precision):
            loss = diffusion_loss(forward, process, x0, y, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        update_ema(ema, model, 0.9999)

    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    img_s = batch * steps / (time.perf_counter() - start)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    else:
        counter = SavedBytes(model.parameters())
        step(counter)
        memory = counter.bytes
    return {"img_per_s": img_s, "memory_mb": memory / 2**20, "first_step_s": first_step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, >= 1 (compile happens here)")
    variants = [p + c for p in ("fp32", "bf16") for c in ("", "+compile", "+compile-blocks")]
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "bf16+compile"], choices=variants)
    parser.add_argument("--checkpointing", nargs="+", type=int, default=[0, 1], help="grad_checkpoint_every values")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--gemm", type=int, default=2048, help="side of the square reference GEMM")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first step is timed apart (it compiles)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    # The reference is the faster matmul route: on CPU oneDNN's fp32 matmul can be twice the BLAS one.
    by_backend = {name: bench.gemm_rates(args.gemm, dtype, device)
                  for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}  # fmt: skip
    peak = {name: max(rates.values()) for name, rates in by_backend.items()}
    print(f"device {device}, {torch.get_num_threads()} threads; GEMM {args.gemm}^3 GFLOP/s: "
          + "; ".join(f"{n} " + ", ".join(f"{b} {r:.0f}" for b, r in rates.items()) for n, rates in by_backend.items()),
          flush=True)  # fmt: skip
    print("| model | variant | ckpt every | img/s | first step s | memory MB | GFLOP/s | / bf16 GEMM | / fp32 GEMM |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        config = ModelConfig(**MODEL_PRESETS[name], input_size=args.input_size, in_channels=args.channels,
                             num_classes=1000, learn_sigma=True)  # fmt: skip
        train_flops = 3 * 2 * count_macs(config)  # per image
        for variant in args.variants:
            precision, _, compiled = variant.partition("+")
            compile_scope = {"": False, "compile": True, "compile-blocks": "blocks"}[compiled]
            for every in args.checkpointing:
                result = measure(config, precision, compile_scope, every, args.batch, args.steps, args.warmup, device)
                gflops = result["img_per_s"] * train_flops / 1e9
                row = {"model": name, "variant": variant, "grad_checkpoint_every": every, **result,
                       "gflops": gflops, "frac_bf16_gemm": gflops / peak["bf16"],
                       "frac_fp32_gemm": gflops / peak["fp32"]}  # fmt: skip
                rows.append(row)
                cells = [name, variant, every, f"{result['img_per_s']:.1f}", f"{result['first_step_s']:.1f}",
                         f"{result['memory_mb']:.0f}",
                         f"{gflops:.0f}", f"{row['frac_bf16_gemm']:.0%}", f"{row['frac_fp32_gemm']:.0%}"]  # fmt: skip
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
                       "gemm_gflops": peak, "gemm_gflops_by_backend": by_backend, "rows": rows},
                      fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
