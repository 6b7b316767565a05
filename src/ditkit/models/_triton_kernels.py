"""Triton kernels behind `ditkit.models.fused` (imported only where Triton is installed).

Two row-wise kernels, each with its backward, for the elementwise work that surrounds a DiT block's
matmuls on a GPU:

- `NormModulate`: y = LayerNorm(x) * (1 + scale) + shift, an un-affine LayerNorm followed by adaLN
  modulation with per-sample (N, D) shift and scale, read from x once and written once in the matmul
  dtype. Statistics and arithmetic are fp32; the output is rounded once.
- `GatedResidual`: out = x + gate * branch with a per-sample (N, D) gate (adaLN-Zero), with the gate
  rounded to the branch's dtype first and the product and sum in fp32, as `torch.addcmul` computes it.

x and branch are contiguous (N, T, D); shift, scale and gate are (N, D) views with unit column stride
(the chunks of the adaLN projection). Every program handles whole rows of D channels, so D is limited
by `MAX_D`. Backward kernels take tiles of `ROWS` rows of one sample and write each tile's partial sum
of the (N, D) gradients to its own slot; the slots are summed afterwards, so results do not depend on
scheduling (no atomics).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

MAX_D = 16384
ROWS = 16


def _on(x: torch.Tensor):
    """Triton launches on the current CUDA device and stream: make that x's device (e.g. cuda:1 while
    the thread's current device is 0), as PyTorch's own ops do."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _block(d: int) -> tuple[int, int]:
    """Block width (a power of two >= d) and warps for rows of d channels."""
    block = triton.next_power_of_2(d)
    return block, 8 if block >= 2048 else 4 if block >= 512 else 2


@triton.jit
def _norm_modulate_fwd(
    X, SHIFT, SCALE, Y, MEAN, RSTD, T, D, shift_stride, scale_stride, eps, BLOCK_D: tl.constexpr
):  # pragma: no cover - compiled by Triton
    row = tl.program_id(0).to(tl.int64)
    sample = row // T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    shift = tl.load(SHIFT + sample * shift_stride + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + sample * scale_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * (1.0 + scale) + shift
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_modulate_bwd(
    X, SCALE, DY, MEAN, RSTD, DX, DSHIFT, DSCALE, T, D, scale_stride, tiles, ROWS: tl.constexpr, BLOCK_D: tl.constexpr
):  # pragma: no cover - compiled by Triton
    sample = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gain = 1.0 + tl.load(SCALE + sample * scale_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sum_dy = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_dy_xhat = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS):
        t = tile * ROWS + i
        m = cols < tl.where(t < T, D, 0)  # no columns past the last row
        row = sample * T + tl.minimum(t, T - 1)
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * D + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(m, (x - mean) * rstd, 0.0)
        sum_dy += dy
        sum_dy_xhat += dy * xhat
        g = dy * gain  # gradient w.r.t. the normalised x
        c_xhat = tl.sum(g * xhat, axis=0) / D
        c_mean = tl.sum(g, axis=0) / D
        dx = (g - c_mean - xhat * c_xhat) * rstd
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=m)
    slot = (sample * tiles + tile) * D
    tl.store(DSHIFT + slot + cols, sum_dy, mask=mask)
    tl.store(DSCALE + slot + cols, sum_dy_xhat, mask=mask)


@triton.jit
def _gated_residual_fwd(X, GATE, B, OUT, T, D, gate_stride, BLOCK_D: tl.constexpr):  # pragma: no cover
    row = tl.program_id(0).to(tl.int64)
    sample = row // T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    branch = tl.load(B + row * D + cols, mask=mask, other=0.0)
    gate = tl.load(GATE + sample * gate_stride + cols, mask=mask, other=0.0).to(branch.dtype).to(tl.float32)
    out = x + gate * branch.to(tl.float32)
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd(
    GATE, B, DOUT, DB, DGATE, T, D, gate_stride, tiles, ROWS: tl.constexpr, BLOCK_D: tl.constexpr
):  # pragma: no cover - compiled by Triton
    sample = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gate = tl.load(GATE + sample * gate_stride + cols, mask=mask, other=0.0).to(DB.dtype.element_ty).to(tl.float32)
    sum_dout_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS):
        t = tile * ROWS + i
        row = sample * T + t
        m = cols < tl.where(t < T, D, 0)  # no columns past the last row
        dout = tl.load(DOUT + row * D + cols, mask=m, other=0.0).to(tl.float32)
        branch = tl.load(B + row * D + cols, mask=m, other=0.0).to(tl.float32)
        sum_dout_b += dout * branch
        tl.store(DB + row * D + cols, (dout * gate).to(DB.dtype.element_ty), mask=m)
    tl.store(DGATE + (sample * tiles + tile) * D + cols, sum_dout_b, mask=mask)


def norm_modulate_forward(x, shift, scale, eps: float, dtype: torch.dtype):
    """The forward kernel alone: (y, per-row mean, per-row 1/std), the last two for the backward."""
    n, t, d = x.shape
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    mean = torch.empty(n * t, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block, warps = _block(d)
    grid = (n * t,)
    strides = (shift.stride(0), scale.stride(0))
    with _on(x):
        _norm_modulate_fwd[grid](x, shift, scale, y, mean, rstd, t, d, *strides, eps, BLOCK_D=block, num_warps=warps)
    return y, mean, rstd


def gated_residual_forward(x, gate, branch):
    """The forward kernel alone: x + gate * branch."""
    n, t, d = x.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
    block, warps = _block(d)
    with _on(x):
        _gated_residual_fwd[(n * t,)](x, gate, branch, out, t, d, gate.stride(0), BLOCK_D=block, num_warps=warps)
    return out


class NormModulate(torch.autograd.Function):
    """(x (N, T, D), shift (N, D), scale (N, D)) -> LayerNorm(x) * (1 + scale) + shift in `dtype`."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps: float, dtype: torch.dtype):
        y, mean, rstd = norm_modulate_forward(x, shift, scale, eps, dtype)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.dtypes = (shift.dtype, scale.dtype)
        ctx.stride = scale.stride(0)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        n, t, d = x.shape
        dy = dy.contiguous()
        tiles = triton.cdiv(t, ROWS)
        dx = torch.empty_like(x)
        dshift = torch.empty((n, tiles, d), dtype=torch.float32, device=x.device)
        dscale = torch.empty_like(dshift)
        block, warps = _block(d)
        with _on(x):
            _norm_modulate_bwd[(n, tiles)](
                x, scale, dy, mean, rstd, dx, dshift, dscale, t, d, ctx.stride, tiles,
                ROWS=ROWS, BLOCK_D=block, num_warps=warps,
            )  # fmt: skip
        shift_dtype, scale_dtype = ctx.dtypes
        return dx, dshift.sum(1).to(shift_dtype), dscale.sum(1).to(scale_dtype), None, None


class GatedResidual(torch.autograd.Function):
    """(x (N, T, D), gate (N, D), branch (N, T, D)) -> x + gate * branch, gate rounded to branch's dtype."""

    @staticmethod
    def forward(ctx, x, gate, branch):
        ctx.save_for_backward(gate, branch)
        ctx.dtypes = (x.dtype, gate.dtype)
        return gated_residual_forward(x, gate, branch)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        gate, branch = ctx.saved_tensors
        n, t, d = branch.shape
        dout = dout.contiguous()
        tiles = triton.cdiv(t, ROWS)
        dbranch = torch.empty_like(branch)
        dgate = torch.empty((n, tiles, d), dtype=torch.float32, device=branch.device)
        block, warps = _block(d)
        with _on(branch):
            _gated_residual_bwd[(n, tiles)](
                gate, branch, dout, dbranch, dgate, t, d, gate.stride(0), tiles,
                ROWS=ROWS, BLOCK_D=block, num_warps=warps,
            )  # fmt: skip
        x_dtype, gate_dtype = ctx.dtypes
        return dout.to(x_dtype), dgate.sum(1).to(gate_dtype), dbranch
