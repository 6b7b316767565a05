"""How fast could ditkit get with its non-matmul work made free? An ablation against diffusers' DiT.

    python benchmarks/elementwise_bound.py [--preset DiT-S/2] [--batch 32] [--train-batch 16]
        [--precision bf16] [--repeats 5] [--device cpu]

The question this answers is whether fused kernels for the elementwise work between the matmuls could
reach a given ratio against diffusers (issue 9's bf16 CPU target is 1.5x). It times ditkit's DiT with
pieces of that work *removed*, not fused: the model then computes something else, so the outputs are
meaningless and only the times count. Each variant removes one piece, and `all` removes every one:

- `no-norm-mod`: LayerNorm + adaLN modulation replaced by the cast to the matmul dtype;
- `no-gate`: the gated residual x + gate * branch replaced by x + branch;
- `no-softmax`: attention's softmax (and its q scaling) dropped: (q k^T) v, ditkit's matmul form of
  attention (in cache-sized batch slices on CPU) without the softmax. That is ditkit's own path in bf16
  on CPU, the case this script is for; where ditkit picks SDPA (fp32, GPUs) or its own AMX attention
  kernel (bf16 on CPUs with AMX, which also takes the AMX training linears with it here) the row swaps
  a fused kernel for two matmuls, and is no bound;
- `no-gelu`: the MLP's GELU dropped (fc1 runs as a plain linear, also in inference).

One more row goes the other way: `pytorch-ops` runs ditkit with its compiled CPU kernels
(`ditkit.models.cpu_kernels`: GELU, norm + modulation, gated residual, AMX attention) off, i.e. on PyTorch's own ops,
which is what the kernels are measured against (docs/speed.md).

A removed piece costs nothing, which no kernel achieves, so the `all` row is an upper bound on what
fusing them could give. Inference forwards run at --batch (a guided sampling step at batch 16 is one
forward at 32), forward + backward (the training step without the optimizer) at --train-batch; the
diffusers model (same weights, `ditkit bench`'s export) is timed in the same interleaved rounds.
glibc is told to keep freed memory first, as `ditkit bench` does by default, so page faults do not
skew either side (docs/speed.md, "The C allocator's share").
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from unittest import mock

import torch

import ditkit.models.dit as dit_module
import ditkit.models.layers as layers
from ditkit.bench import BenchSettings, interleaved_medians, paired_forwards, paired_models, retain_freed_memory
from ditkit.config import MODEL_PRESETS
from ditkit.models import cpu_kernels


def _no_norm_mod(x, shift, scale, eps=1e-6):
    return x.to(layers.compute_dtype(x))


def _no_norm_mod_residual(x, shift, scale, eps=1e-6):
    return _no_norm_mod(x, shift, scale, eps), x


@contextlib.contextmanager
def _without_norm_mod():
    """The blocks' norms (`norm_modulate_residual`) and the final layer's (`norm_modulate`) both removed."""
    with (
        mock.patch.object(dit_module, "norm_modulate", _no_norm_mod),
        mock.patch.object(dit_module, "norm_modulate_residual", _no_norm_mod_residual),
    ):
        yield


def _no_gate(x, gate, branch):
    return x + branch


_ATTENTION = layers.attention  # the original, before any patch


def _no_softmax(q, k, v, mask):
    """Stands in for `layers._matmul_attention`: (q k^T) v, no scaling, no softmax."""
    scores = q @ k.transpose(-2, -1)  # (N, H, T, S)
    if mask is not None:  # padding keys still contribute nothing
        scores = scores.masked_fill(~mask[:, None, None, :], 0.0)
    return scores @ v  # (N, H, T, Dh)


def _math_attention(q, k, v, impl="auto", mask=None):
    """`layers.attention` forced onto its matmul form (whatever the precision or device would pick, SDPA
    included), which keeps its cache-sized batch slices on CPU; with `_no_softmax` patched in, that form
    has no softmax."""
    return _ATTENTION(q, k, v, "math", mask)


@contextlib.contextmanager
def _without_softmax():
    with (
        mock.patch.object(layers, "attention", _math_attention),
        mock.patch.object(layers, "_matmul_attention", _no_softmax),
        mock.patch.object(cpu_kernels, "amx_attention_available", lambda: False),  # the AMX kernel bypasses both
    ):
        yield


PIECES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "no-norm-mod": _without_norm_mod,
    "no-gate": lambda: mock.patch.object(dit_module, "gated_residual", _no_gate),
    "no-softmax": _without_softmax,
}


@contextlib.contextmanager
def _no_gelu(model: torch.nn.Module):
    """The MLPs' GELU removed: fc1 is a plain linear (also where inference would fuse the GELU into it)."""
    mlps = [m for m in model.modules() if isinstance(m, layers.Mlp)]
    acts = [m.act for m in mlps]
    try:
        for m in mlps:
            m.act = torch.nn.Identity()
        with mock.patch.object(layers.Mlp, "_fused_fc1", lambda self, x: None):
            yield
    finally:
        for m, act in zip(mlps, acts):
            m.act = act


def _variant(names: tuple[str, ...], model: torch.nn.Module) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for name in names:
        if name == "no-gelu":
            stack.enter_context(_no_gelu(model))
        elif name == "pytorch-ops":  # ditkit's compiled CPU kernels off: PyTorch's ops instead
            stack.enter_context(mock.patch.object(cpu_kernels, "load_library", lambda: None))
        else:
            stack.enter_context(PIECES[name]())
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="DiT-S/2", choices=list(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=32, help="inference forward batch")
    parser.add_argument("--train-batch", type=int, default=16, help="forward + backward batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        retain_freed_memory()
    ours, theirs, _ = paired_models(BenchSettings(preset=args.preset, device=args.device), device)
    variants = {"ditkit": ()} | {f"ditkit {n}": (n,) for n in [*PIECES, "no-gelu"]}
    variants["ditkit all"] = (*PIECES, "no-gelu")
    variants["ditkit pytorch-ops"] = ("pytorch-ops",)  # the other way: ditkit's CPU kernels off

    def timed(fns: dict[str, Callable[[], torch.Tensor]], wrap: Callable[[Callable], Callable]) -> dict[str, float]:
        calls: dict[str, Callable[[], object]] = {"diffusers": wrap(fns["diffusers"])}
        for label, names in variants.items():

            def call(names=names):
                with _variant(names, ours):
                    return wrap(fns["ditkit"])()

            calls[label] = call
        return interleaved_medians(calls, args.repeats, device)

    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    ours.eval()
    theirs.eval()
    with amp:
        with torch.no_grad():
            inference = timed(paired_forwards(ours, theirs, args.batch, device), lambda fn: fn)

        def backward(fn):
            return lambda: fn().float().square().mean().backward()

        ours.train()
        theirs.train()
        training = timed(paired_forwards(ours, theirs, args.train_batch, device), backward)
    print(f"{args.preset} {args.precision} on {device}; ratio = diffusers' time / this row's time")
    heads = f"forward b{args.batch}", f"fwd+bwd b{args.train_batch}"
    print(f"{'':20s} {heads[0]:>14s} {'ratio':>7s} {heads[1]:>14s} {'ratio':>7s}")
    for label in ["diffusers", *variants]:
        f, t = inference[label], training[label]
        print(
            f"{label:20s} {f * 1e3:11.1f} ms {inference['diffusers'] / f:6.2f}x "
            f"{t * 1e3:11.1f} ms {training['diffusers'] / t:6.2f}x"
        )


if __name__ == "__main__":
    main()
