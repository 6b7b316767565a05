"""Building blocks of Diffusion Transformers: embeddings, attention, MLP.

Shared by every DiT conditioning variant (see `dit.py`). Written from the papers:
DiT (Peebles & Xie 2023, https://arxiv.org/abs/2212.09748), ViT patch embedding (Dosovitskiy et al.
2021), sinusoidal embeddings (Vaswani et al. 2017), QK-norm (Dehghani et al. 2023).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import platform
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, fused
from .cpu_kernels import cpu_info_field as _cpu_info_field

__all__ = [
    "sincos_pos_embed_2d",
    "timestep_embedding",
    "modulate",
    "compute_dtype",
    "norm_modulate",
    "norm_modulate_residual",
    "gated_residual",
    "gated_residual_norm_modulate",
    "PatchEmbed",
    "TimestepEmbedder",
    "LabelEmbedder",
    "Linear",
    "attention",
    "Attention",
    "CrossAttention",
    "Mlp",
]


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, dim) as [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (P, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding, (height * width, dim), tokens in row-major order.

    The first half of the channels encodes the column, the second half the row (the layout of the
    official DiT `pos_embed` buffer).
    """
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    emb_col = _sincos_1d(dim // 2, cols.flatten())  # (H*W, dim/2)
    emb_row = _sincos_1d(dim // 2, rows.flatten())  # (H*W, dim/2)
    return torch.cat([emb_col, emb_row], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (N,) -> (N, dim) as [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine (N, D) applied to every token of x (N, T, D): x * (1 + scale) + shift."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # one pass over x, not two


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x's device run in: autocast's when it is on there, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """modulate(LayerNorm(x), shift, scale) for an un-affine LayerNorm, in the dtype matmuls run in.

    Without autocast this is exactly `modulate(layer_norm(x))`. Under autocast the fp32 residual
    stream is rounded to the autocast dtype *before* the norm rather than after the modulation (the
    norm kernels keep their statistics in fp32 either way), so the norm, the modulation and their
    backward move half the bytes and no fp32 copy of the branch input is made; the branch's matmul
    input differs from the all-fp32 route by bf16 rounding only, which autocast applies anyway.
    """
    dtype = compute_dtype(x)
    out = fused.norm_modulate(x, shift, scale, eps, dtype)  # one pass on a GPU (see `fused`)
    if out is None:
        out = cpu_kernels.norm_modulate(x, shift, scale, eps, dtype)  # one compiled pass on CPU (see `cpu_kernels`)
    if out is not None:
        return out
    if dtype == x.dtype:
        return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)
    with torch.autocast(x.device.type, enabled=False):  # CUDA autocast would put the norm back in fp32
        h = F.layer_norm(x.to(dtype), x.shape[-1:], eps=eps)  # (N, T, D), statistics in fp32
        return modulate(h, shift.to(dtype), scale.to(dtype))


def norm_modulate_residual(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`norm_modulate(x, ...)`, x) for a pre-norm block's x + branch(norm_modulate(x)): add the branch to the
    x returned. The same values as (norm_modulate(x, ...), x); when training with ditkit's CPU kernels, the
    gradient reaching the returned x is added to the norm's own gradient of x inside its backward kernel,
    instead of autograd summing the two in a pass of its own."""
    if torch.is_grad_enabled() and x.requires_grad:  # (the CPU kernel; None elsewhere)
        out = cpu_kernels.norm_modulate(x, shift, scale, eps, compute_dtype(x), residual=True)
        if out is not None:
            return out
    return norm_modulate(x, shift, scale, eps), x


def gated_residual_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    branch: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_residual(x, gate, branch)` followed by `norm_modulate_residual` of the result, for a block whose
    next branch starts right after the residual: (normed, x + gate * branch). In CPU inference one compiled
    pass makes both (the residual stream is read once where the two kernels read it twice)."""
    out = cpu_kernels.gated_residual_norm_modulate(x, gate, branch, shift, scale, eps, compute_dtype(x))
    if out is not None:
        return out
    return norm_modulate_residual(gated_residual(x, gate, branch), shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's x + gate * branch with a per-sample gate (N, D), in one pass; x keeps its dtype."""
    out = fused.gated_residual(x, gate, branch)  # a GPU kernel that also fuses the backward (see `fused`)
    if out is None:
        out = cpu_kernels.gated_residual(x, gate, branch)  # a compiled CPU pass (see `cpu_kernels`)
    if out is not None:
        return out
    return torch.addcmul(x, gate.unsqueeze(1).to(branch.dtype), branch)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, via a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        # Contiguous tokens: a transposed view here would hand its (T-minor) strides on to the residual
        # stream, since elementwise ops (x + pos_embed, the gated residual) keep their first input's
        # layout; every LayerNorm, matmul and their backward would then copy it back, block after block.
        return x.flatten(2).transpose(1, 2).contiguous()  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra null row used for classifier-free guidance.

    In training mode each label is replaced by the null class with probability `dropout_prob`, drawn
    from the generator passed in (so training is reproducible and resumable).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        # The null row exists only when labels are dropped, as in the official checkpoints.
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability `dropout_prob`."""
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            labels = self.drop_labels(labels, generator)
        return self.embedding_table(labels)


class _OneDNNLinear(torch.autograd.Function):
    """x W^T + b and its gradients, all three products through oneDNN's fp32 matmul (see `Linear`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): F.linear's gradients, which are differentiable
            return cpu_kernels.recomputed_grads(F.linear, (x, weight, bias), ctx.needs_input_grad, grad)
        grad_x = grad_w = grad_b = None
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (M, out)
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "")  # (..., in)
        if ctx.needs_input_grad[1]:
            x_2d = x.reshape(-1, x.shape[-1])  # (M, in)
            grad_w = torch.ops.mkldnn._linear_pointwise(grad_2d.t(), x_2d.t(), None, "none", [], "")  # (out, in)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def _bf16_linear_grads(
    needs: tuple[bool, ...], x: torch.Tensor, weight: torch.Tensor, grad_2d: torch.Tensor, grad_bias=None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (x, weight, bias) of bf16 `F.linear(x, weight, bias)` given the output's gradient (M, out),
    for bf16 training on AMX. The weight gradient is formed from a transposed copy of the smaller of its two
    operands, so that the product reads both in the layout AMX runs fastest (see `Linear`); `grad_bias`,
    where a kernel already summed the output's gradient, is the bias gradient (else grad_2d.sum(0))."""
    out_features, in_features = weight.shape
    grad_x = grad_w = grad_b = None
    if needs[0]:
        grad_x = (grad_2d @ weight).reshape(*x.shape[:-1], in_features)
    if needs[1]:
        x_2d = x.reshape(-1, in_features)  # (M, in)
        if in_features < out_features:  # (x^T g)^T, from a transposed copy of x, the smaller one
            x_t = cpu_kernels.transpose_bf16(x_2d)
            grad_w_t = (x_2d.t() if x_t is None else x_t).mm(grad_2d)  # (in, out)
            grad_w = cpu_kernels.transpose_bf16(grad_w_t)  # contiguous, as the weight
            grad_w = grad_w_t.t() if grad_w is None else grad_w
        else:  # g^T x, from a transposed copy of g where it is the smaller one
            grad_t = cpu_kernels.transpose_bf16(grad_2d) if in_features > out_features else None
            grad_w = (grad_2d.t() if grad_t is None else grad_t).mm(x_2d)
    if len(needs) > 2 and needs[2]:
        grad_b = grad_2d.sum(0) if grad_bias is None else grad_bias.to(grad_2d.dtype)
    return grad_x, grad_w, grad_b


def _bf16_training_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b in bf16 for the AMX training nodes' forward: one oneDNN matmul with the bias fused in, as in
    inference. aten's bf16 `addmm` first copies the broadcast bias into its whole output (B/2's fc1 at
    batch 16: 8.8 ms against 7.9; 26 ms per B/2 training step over its 48 products)."""
    if not _onednn_bf16():
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Bf16TrainingLinear(torch.autograd.Function):
    """bf16 x W^T + b (`_bf16_training_product`), with `_bf16_linear_grads`' backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        return _bf16_training_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            return cpu_kernels.recomputed_grads(F.linear, (x, weight, bias), ctx.needs_input_grad, grad)
        return _bf16_linear_grads(ctx.needs_input_grad, x, weight, grad.reshape(-1, weight.shape[0]))


class _Bf16LinearGelu(torch.autograd.Function):
    """tanh-GELU(x W^T + b) in bf16 for training on AMX: one node, so that the GELU's compiled backward also
    sums the bias gradient (`cpu_kernels.gelu_tanh_backward_with_bias`) instead of a second pass over the
    largest activation of the block. Saves what the two layers would (x, the pre-activation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = _bf16_training_product(x, weight, bias)
        ctx.save_for_backward(x, weight, bias, h)
        return cpu_kernels.gelu_tanh(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, h = ctx.saved_tensors
        if torch.is_grad_enabled():
            forward = lambda *args: F.gelu(F.linear(*args), approximate="tanh")  # noqa: E731
            return cpu_kernels.recomputed_grads(forward, (x, weight, bias), ctx.needs_input_grad, grad)
        grad_h, grad_bias = cpu_kernels.gelu_tanh_backward_with_bias(grad, h)
        return _bf16_linear_grads(ctx.needs_input_grad, x, weight, grad_h.reshape(-1, weight.shape[0]), grad_bias)


class _Bf16QKVAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(Dh)) v of the projection x W^T + b in bf16 for training on AMX: one node, so that
    the attention kernel's backward also sums the bias gradient (`cpu_kernels.attention_amx_backward`).
    Returns (N, T, H, Dh); saves what the two would (x, the projection, the output, the probabilities)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
        n, t, d = x.shape
        qkv = _bf16_training_product(x, weight, bias).reshape(n, t, 3, heads, d // heads)
        out, p = cpu_kernels.attention_amx_forward(qkv, keep=True)
        ctx.save_for_backward(x, weight, bias, qkv, out, p)
        ctx.heads = heads
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, qkv, out, p = ctx.saved_tensors
        if torch.is_grad_enabled():

            def forward(x, weight, bias):
                n, t, d = x.shape
                proj = F.linear(x, weight, bias).reshape(n, t, 3, ctx.heads, d // ctx.heads)
                return cpu_kernels.matmul_self_attention(proj)  # (N, T, H, Dh)

            return *cpu_kernels.recomputed_grads(forward, (x, weight, bias), ctx.needs_input_grad[:3], grad), None
        grad_qkv, grad_bias = cpu_kernels.attention_amx_backward(qkv, out, p, grad, bias_grad=ctx.needs_input_grad[2])
        grad_2d = grad_qkv.reshape(-1, weight.shape[0])
        return *_bf16_linear_grads(ctx.needs_input_grad[:3], x, weight, grad_2d, grad_bias), None


def _amx_bf16_training(x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether `linear` applied to x trains in bf16 on a CPU with AMX and ditkit's kernels (the routes above)."""
    return (
        x.device.type == "cpu"
        and x.numel() > 0
        and not torch.compiler.is_compiling()  # first of the checks Dynamo cannot trace
        and _bf16_matmul(x, linear.weight)
        and _needs_grad(x, linear)
        and cpu_kernels.amx_attention_available()
        and cpu_kernels._plain(x)
        and cpu_kernels._plain(linear.weight)  # torch.func's wrapped parameters take PyTorch's ops
    )


def _fused_training(x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether `linear` and the op after it (attention, the GELU) may train as one of the fused AMX nodes
    above: it is a plain linear with a bias (a subclass, LoRA say, must run its own forward), the AMX bf16
    training route applies, and no hook watches it (a hook must see it run)."""
    return (
        type(linear) in (Linear, nn.Linear)
        and linear.bias is not None
        and _amx_bf16_training(x, linear)  # before the hook check: it steps aside under torch.compile first
        and not _has_hooks(linear, backward=True)
    )


def _bf16(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.bfloat16)


class Linear(nn.Linear):
    """`nn.Linear` that takes the faster oneDNN matmul on CPU where it was measured faster. Same parameters,
    same state dict as `nn.Linear`; everywhere else (CUDA, `torch.compile`, other dtypes) it is `F.linear`.

    - **fp32, forward and backward, on CPUs where MKL is the slower BLAS** (`_onednn_fp32_linear`). PyTorch
      sends fp32 `addmm` to MKL's SGEMM. On an AMD EPYC (AVX-512) that reached about half of oneDNN's
      fp32 matmul on the same shapes (202 vs 434 GFLOP/s on a 2048^3 product, 2 threads); on an Intel
      Xeon with AMX it is the faster of the two (335 vs 294), so Intel CPUs keep `F.linear`. Both are
      IEEE fp32 (relative error vs fp64 2.5e-7 and 5.7e-7).
    - **bf16 inference on CPUs with AMX** (`_onednn_bf16_inference`): one oneDNN matmul with the bias
      fused in. aten's bf16 `addmm` first copies the broadcast bias into its output and then
      accumulates onto it; on AMX, where the matmul itself is fast, that copy is a visible share
      (docs/speed.md, eleventh session). Without gradients; training (next) takes the same forward
      product, but not oneDNN's backward products with transposed operands, which were measured slower.
    - **bf16 training on CPUs with AMX** (with ditkit's compiled kernels): the same oneDNN product with the
      bias fused forward (`_bf16_training_product`: B/2 training step 1886 -> 1815 ms against
      `F.linear`'s bias copy), and a weight gradient formed from a transposed copy
      (`cpu_kernels.transpose_bf16`) of the smaller of the input and the output gradient. PyTorch's
      backward multiplies a transposed view, which AMX ran at about half the rate of the plain layout
      (S/2 fc2: 5.4 ms against 3.2 ms plus a 0.3 ms transpose).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.numel() > 0 and not torch.compiler.is_compiling():
            # oneDNN has no primitive for an empty batch (F.linear returns one); Dynamo cannot trace the checks
            if (
                x.dtype == torch.float32
                and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")
                and _onednn_fp32_linear()
            ):
                return _OneDNNLinear.apply(x, self.weight, self.bias)
            if _bf16_matmul(x, self.weight) and _onednn_bf16_inference():
                if _needs_grad(x, self):
                    if _amx_bf16_training(x, self):
                        return _Bf16TrainingLinear.apply(_bf16(x), _bf16(self.weight), _bf16(self.bias))
                else:
                    weight, bias = cast_parameters(self, torch.bfloat16)
                    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), weight, bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


_cast_cache = threading.local()


@contextlib.contextmanager
def reuse_cast_weights():
    """Within this context, the bf16 copies that `Linear`'s CPU inference paths make of their weight and bias
    are made once per layer and reused while the parameters are unchanged (same storage, same version
    counter, so an in-place update is seen), and freed at exit; `ditkit.sampling.generate` runs all its
    batches inside one. This is what autocast's own cast cache does for `F.linear` inside an autocast region (so
    a model of plain `nn.Linear` layers, diffusers' among them, casts its weights once per sampling loop),
    which the oneDNN route, an explicit cast, would otherwise not get: DiT-B/2 casts 130M parameters per
    forward. As with autocast's cache, writes through `.data` (which bypass the version counter) are not
    seen inside the context; replacing or updating parameters in place (`copy_`, `load_state_dict`) is."""
    previous = getattr(_cast_cache, "entries", None)
    if previous is None:
        _cast_cache.entries = weakref.WeakKeyDictionary()
    try:
        yield
    finally:
        _cast_cache.entries = previous


def cast_parameters(linear: nn.Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of `linear` in `dtype`, from `reuse_cast_weights`'s cache where one is active."""
    weight, bias = linear.weight, linear.bias
    entries = getattr(_cast_cache, "entries", None)
    if entries is None or _needs_grad(weight, linear):  # a cast with autograd history is never kept
        return weight.to(dtype), None if bias is None else bias.to(dtype)
    key = (dtype, weight.data_ptr(), weight._version) + (() if bias is None else (bias.data_ptr(), bias._version))
    hit = entries.get(linear)
    if hit is None or hit[0] != key:
        hit = entries[linear] = (key, (weight.to(dtype), None if bias is None else bias.to(dtype)))
    return hit[1]


def _bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.linear(x, weight)` would run in bf16: under bf16 autocast, or with both already bf16
    (a bf16 input to fp32 weights without autocast stays an error, as in `F.linear`)."""
    if torch.is_autocast_enabled("cpu"):  # autocast casts fp32 (an fp64 input stays F.linear's error)
        reduced = (torch.float32, torch.bfloat16)
        return torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in reduced and weight.dtype in reduced
    return x.dtype == weight.dtype == torch.bfloat16


def _needs_grad(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether autograd would record a graph through `module` applied to `x`."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


_CPU_SCORES_BYTES = 4 * 2**20
"""On CPU the matmul attention runs over slices of the batch whose (T x S) scores take about this much
memory, so the scores stay in cache from the q k^T product through the softmax to the product with v;
the whole batch's scores (25 MB per S/2 block at batch 32 in bf16) went to DRAM and back three times.
Same numbers, bitwise (tested)."""


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (N, H, T, Dh) tensors; `mask` (N, S) bool: False keys are ignored.

    'sdpa' calls `F.scaled_dot_product_attention`; 'math' spells out the two matmuls. 'auto' takes SDPA
    except for reduced-precision tensors on CPU, where PyTorch's fused CPU kernel is slower in training:
    `benchmarks/cpu_training.py` measures the demo model at 267 img/s with the matmul form against
    182 img/s fused (bf16, 2-core AMX CPU). In fp32 the fused kernel is the faster one, and so it is in
    bf16 inference on a CPU with AMX, whose tiles PyTorch's fused CPU kernel uses (S/2 forward at batch
    32: 444 against 551 ms; on an AVX-512 CPU without AMX it was twice as slow as the matmul form).
    """
    if impl == "auto" and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        inference = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        # (under torch.compile first: Dynamo cannot trace the capability check; compiled graphs keep the math form)
        fused_kernel = not torch.compiler.is_compiling() and q.dtype == torch.bfloat16 and _cpu_has_amx()
        impl = "sdpa" if inference and fused_kernel else "math"
    if impl == "math":
        rows = q.shape[0]
        if q.device.type == "cpu":  # cache-sized slices of the batch (see _CPU_SCORES_BYTES)
            sample_bytes = q.shape[1] * q.shape[2] * k.shape[2] * q.element_size()
            rows = max(1, _CPU_SCORES_BYTES // sample_bytes)
        if rows >= q.shape[0]:
            return _matmul_attention(q, k, v, mask)
        # split, not indexing: split's backward is one cat, where every indexed slice's would be a
        # zero-filled full-size gradient to add up.
        masks = itertools.repeat(None) if mask is None else mask.split(rows)
        parts = zip(q.split(rows), k.split(rows), v.split(rows), masks)
        return torch.cat([_matmul_attention(*part) for part in parts])  # (N, H, T, Dh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The explicit two-matmul attention ('math') of `attention`."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # PyTorch's CPU softmax accumulates bf16 input in fp32 and rounds once: bitwise the
        # result of softmax(dtype=float32).to(bf16), without the fp32 (N, H, T, S) copy and its cast back.
        return scores.softmax(dim=-1) @ v  # (N, H, T, Dh)
    return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v  # (N, H, T, Dh)


class Attention(nn.Module):
    """Multi-head self-attention (see `attention` for the kernel choice), optionally QK-normalised.

    In bf16 on a CPU with AMX tiles, and without QK-norm, it runs ditkit's compiled attention kernel
    (`cpu_kernels.self_attention`, training and inference) instead: S/2 training forward + backward at
    batch 16 took 724 ms with it against 859 ms with the matmul form (docs/speed.md, twelfth session).

    QK-norm (Dehghani et al. 2023, https://arxiv.org/abs/2302.05442) applies a LayerNorm over each
    head's queries and keys so attention logits cannot grow without bound.
    """

    def __init__(self, dim: int, num_heads: int, impl: str = "auto", qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        plain = self.impl == "auto" and isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        if plain and (d // self.num_heads) % 32 == 0 and _fused_training(x, self.qkv):
            out = _Bf16QKVAttention.apply(_bf16(x), _bf16(self.qkv.weight), _bf16(self.qkv.bias), self.num_heads)
            return self.proj(out.reshape(n, t, d))
        if plain:
            out = self._fp32_inference(x)
            if out is not None:
                return self.proj(out.reshape(n, t, d))
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, Dh)
        if plain:
            # bf16 on a CPU with AMX: ditkit's compiled kernel, which reads q, k, v in place and writes the
            # (N, T, H, Dh) layout the projection reads (see `cpu_kernels.self_attention`); else None
            out = cpu_kernels.self_attention(qkv)
            if out is not None:
                return self.proj(out.reshape(n, t, d))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        x = attention(q, k, v, self.impl)  # (N, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)

    def _fp32_inference(self, x: torch.Tensor) -> torch.Tensor | None:
        """fp32 inference on CPU: the QKV product without its bias, then ditkit's compiled attention
        (`cpu_kernels.fp32_self_attention`), which adds the bias as it reads q, k and v; (N, T, H, Dh), or
        None where it does not apply. aten's fp32 product with a bias first copies the bias into its whole
        output and then accumulates onto it: DiT-S/2's QKV at batch 32 took 24.2 ms with it, 21.6 without."""
        layer = self.qkv
        if type(layer) not in (Linear, nn.Linear) or torch.is_autocast_enabled("cpu") or _needs_grad(x, layer):
            return None  # (a subclass, LoRA say, must run its own forward)
        if not cpu_kernels.fp32_attention_available(x, layer.weight):
            return None
        if any(_has_hooks(m) for m in (layer, self.q_norm, self.k_norm)):  # a hook must see them run
            return None
        n, t, d = x.shape
        w = layer.weight
        qkv = (
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") if _onednn_fp32_linear() else F.linear(x, w)
        )
        return cpu_kernels.fp32_self_attention(qkv.reshape(n, t, 3, self.num_heads, d // self.num_heads), layer.bias)


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens (queries) over conditioning tokens (keys and values).

    `mask` (N, S) marks the conditioning tokens to attend (False: padding, ignored); every row needs one.
    """

    def __init__(self, dim: int, num_heads: int, impl: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.impl = impl
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, dim * 2)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(n, t, h, d // h).transpose(1, 2)  # (N, H, T, Dh)
        kv = self.kv(context).reshape(n, context.shape[1], 2, h, d // h)  # (N, S, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (N, H, S, Dh)
        x = attention(q, k, v, self.impl, mask)  # (N, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    """Two linear layers with a GELU (tanh-approximated by default, as in the DiT release) between them.

    With `grid=(h, w)` a depthwise 3x3 convolution over the token grid follows the first layer, as in
    LocalViT (Li et al. 2021, https://arxiv.org/abs/2104.05707), giving the MLP a local receptive
    field. Tokens beyond the h*w grid (in-context conditioning tokens) skip the convolution.
    """

    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh", grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.grid = grid
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if grid is not None else None
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dwconv is None and _fused_training(x, self.fc1) and self._gelu_kernel():
            return self.fc2(_Bf16LinearGelu.apply(_bf16(x), _bf16(self.fc1.weight), _bf16(self.fc1.bias)))
        h = self._fused_fc1(x) if self.dwconv is None else None
        if h is None:
            h = self._activation(self.fc1(x))  # (N, T', hidden)
        if self.dwconv is not None:
            n, (gh, gw) = h.shape[0], self.grid
            tokens = gh * gw
            img = h[:, :tokens].transpose(1, 2).reshape(n, -1, gh, gw)  # (N, hidden, h, w)
            img = self.act(self.dwconv(img)).flatten(2).transpose(1, 2)  # (N, T, hidden)
            h = torch.cat([img, h[:, tokens:]], dim=1)  # (N, T', hidden)
        return self.fc2(h)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        """self.act(h); the tanh-GELU on CPU through ditkit's compiled kernel (`cpu_kernels`), which is
        3x PyTorch's speed there, unless a hook watches the activation module."""
        if h.device.type == "cpu" and not torch.compiler.is_compiling() and self._gelu_kernel():
            return cpu_kernels.gelu_tanh(h)
        return self.act(h)

    def _gelu_kernel(self) -> bool:
        """Whether the activation may run as ditkit's tanh-GELU kernel: it is one (a user may swap in another
        module) and no hook watches it. Not under torch.compile (Dynamo cannot trace the hook check)."""
        return (
            isinstance(self.act, nn.GELU) and self.act.approximate == "tanh" and not _has_hooks(self.act, backward=True)
        )

    def _fused_fc1(self, x: torch.Tensor) -> torch.Tensor | None:
        """act(fc1(x)) as one matmul with the GELU fused in, for inference; else None.

        On CPU: one oneDNN matmul with a GELU post-op (bf16 or fp32). On CUDA: cuBLASLt's GELU epilogue
        (`fused.linear_gelu_tanh`, tanh GELU only), which saves writing and re-reading the
        pre-activation, the largest tensor of the block.

        PyTorch's eager tanh-GELU is slow on CPU (on this project's machine it costs as much as the matmul
        before it in bf16), and the fused kernel never rounds the pre-activation to bf16, so it is also
        the more accurate of the two. Training keeps the unfused pair: backward needs the pre-activation.

        Except bf16 on CPUs with AMX: there oneDNN's GELU post-op was measured to cost most of what the
        matmul does (DiT-B/2's fc1 at batch 32: 16 ms matmul + 13 ms post-op), so the plain matmul runs and
        ditkit's GELU kernel (7 ms) follows, rounding the pre-activation to bf16 as training does.
        """
        if x.device.type not in ("cpu", "cuda"):
            return None
        # oneDNN's op has no autograd formula: any gradient through fc1 (its weights, or the input when
        # the model is frozen and a gradient w.r.t. x is wanted, or earlier layers train) needs the pair.
        if _needs_grad(x, self.fc1):
            return None
        # Under torch.compile first: Dynamo cannot trace the oneDNN capability checks, and a graph break
        # here split every block into its own graph (recompiled per block until the recompile limit).
        if torch.compiler.is_compiling() or _has_hooks(self.fc1):  # a hook on fc1 must see fc1 run
            return None
        if not isinstance(self.act, nn.GELU):  # the post-op is a GELU; another activation runs as itself
            return None
        if type(self.fc1) not in (Linear, nn.Linear):  # a subclass (LoRA, say) must run its own forward
            return None
        dtype = compute_dtype(x)
        if x.device.type == "cuda":  # cuBLASLt's GELU epilogue is the tanh approximation only
            if self.act.approximate != "tanh":
                return None
            return fused.linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias, dtype)
        if not ((dtype == torch.bfloat16 and _onednn_bf16()) or (dtype == torch.float32 and _onednn_fp32())):
            return None
        algorithm = "tanh" if self.act.approximate == "tanh" else "none"
        w, b = cast_parameters(self.fc1, dtype)
        if dtype == torch.bfloat16 and _onednn_bf16_inference() and self._gelu_kernel() and cpu_kernels.load_library():
            # On AMX, oneDNN's bf16 GELU post-op costs most of what the matmul does; ditkit's kernel half that
            return cpu_kernels.gelu_tanh(torch.ops.mkldnn._linear_pointwise(x.to(dtype), w, b, "none", [], ""))
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), w, b, "gelu", [], algorithm)


@functools.cache
def _onednn_fp32() -> bool:
    """Whether this PyTorch has oneDNN's linear-pointwise op (fp32 runs on any x86-64 oneDNN supports)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


FP32_LINEAR_ENV = "DITKIT_CPU_FP32_LINEAR"
"""Environment variable that overrides `_onednn_fp32_linear`'s choice: 'onednn', 'blas' or 'auto' (default)."""


@functools.cache
def _onednn_fp32_linear() -> bool:
    """Whether `Linear` runs fp32 products on CPU through oneDNN rather than the BLAS (MKL).

    'auto' (the default): where oneDNN has the op and the CPU is not Intel's, since MKL picks slower code
    on other vendors' CPUs (half oneDNN's rate on an AMD EPYC) and is the faster one on Intel's.
    """
    choice = os.environ.get(FP32_LINEAR_ENV, "auto").strip().lower()
    if choice not in ("auto", "onednn", "blas"):
        raise ValueError(f"{FP32_LINEAR_ENV}={choice!r}: expected 'auto', 'onednn' or 'blas'")
    if choice == "blas" or not _onednn_fp32():
        return False
    return choice == "onednn" or _cpu_vendor() != "GenuineIntel"


def cpu_paths() -> dict[str, object]:
    """Which CPU kernels this machine's DiT takes where `Linear` and `attention` choose by CPU (recorded by
    `ditkit bench`): the CPU's vendor and model, whether it has AMX, and the route of each choice."""
    amx_kernel = cpu_kernels.amx_attention_available()
    return {
        "cpu_vendor": _cpu_vendor(),
        "cpu_model": _cpu_info_field("model name"),
        "amx": _cpu_has_amx(),
        "fp32_linear": "onednn" if _onednn_fp32_linear() else "blas",
        # self-attention without QK-norm (`Attention._fp32_inference`); training takes SDPA
        "fp32_inference_attention": "kernel" if cpu_kernels.fp32_attention_available(torch.zeros(1)) else "sdpa",
        "bf16_inference_linear": "onednn" if _onednn_bf16_inference() else "aten",
        # self-attention with a head size a multiple of 32 (DiT's); cross-attention takes SDPA or the math form
        "bf16_inference_attention": "amx-kernel" if amx_kernel else ("sdpa" if _cpu_has_amx() else "math"),
        "bf16_training_attention": "amx-kernel" if amx_kernel else "math",
        "bf16_inference_gelu": _bf16_inference_gelu(),
    }


def _bf16_inference_gelu() -> str:
    """Where the MLP's tanh-GELU runs in bf16 CPU inference (see `Mlp._fused_fc1`)."""
    kernel = cpu_kernels.load_library() is not None
    if _onednn_bf16_inference():
        return "kernel" if kernel else "onednn-post-op"
    return "onednn-post-op" if _onednn_bf16() else ("kernel" if kernel else "aten")


@functools.cache
def _cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ('GenuineIntel', 'AuthenticAMD', ...), else from the name
    `platform.processor()` gives where there is no /proc (Windows: '... GenuineIntel'); '' where unknown."""
    vendor = _cpu_info_field("vendor_id")
    if not vendor:
        name = platform.processor()
        vendor = next((v for v in ("GenuineIntel", "AuthenticAMD") if v in name), "")
    return vendor


@functools.cache
def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (Intel Xeon since Sapphire Rapids), as PyTorch detects them."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _onednn_bf16_inference() -> bool:
    """Whether `Linear` runs bf16 inference through oneDNN with the bias fused (see `Linear`): AMX CPUs."""
    return _onednn_bf16() and _cpu_has_amx()


@functools.cache
def _onednn_bf16() -> bool:
    """Whether `_onednn_fp32` holds and this CPU also runs oneDNN's matmul in bf16."""
    try:
        return _onednn_fp32() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _has_hooks(module: nn.Module, backward: bool = False) -> bool:
    """Whether forward hooks (the module's own or global ones) watch `module`; with `backward`, backward
    hooks too (they fire only when the module itself is called)."""
    from torch.nn.modules import module as module_mod

    forward = bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module_mod._global_forward_hooks
        or module_mod._global_forward_pre_hooks
    )
    return forward or (
        backward
        and bool(
            module._backward_hooks
            or module._backward_pre_hooks
            or module_mod._global_backward_hooks
            or module_mod._global_backward_pre_hooks
        )
    )


def _register_flop_formula() -> None:
    """Teach torch's FlopCounterMode the oneDNN linear the fast paths call: 2 x rows x in x out (any post-op free)."""
    if not _onednn_fp32():
        return
    from torch.utils.flop_counter import register_flop_formula

    def linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = math.prod(x_shape[:-1])
        return 2 * rows * w_shape[0] * w_shape[1]

    try:
        register_flop_formula(torch.ops.mkldnn._linear_pointwise)(linear_flops)
    except RuntimeError:  # already registered (module reloaded)
        pass


_register_flop_formula()
