"""Fused GPU kernels for the elementwise work between a DiT block's matmuls (Triton, CUDA only).

On a GPU an eager DiT block spends as much time in elementwise kernels as in its matmuls at large
batches (about 45% of an H100's time for DiT-XL/2 at batch 128, `docs/speed.md`): the residual stream's
cast to bf16, the LayerNorm, the adaLN modulation, the gated residual add and the GELU each read and
write the whole (N, T, D) stream, and the mixed-dtype broadcasts run PyTorch's slow generic kernels.
Here each norm + modulation and each gated residual is one pass over the stream (forward and
backward, `_triton_kernels`), and fc1's GELU runs in the matmul's epilogue (cuBLASLt, inference).

Every function here returns None where it does not apply (CPU tensors, Triton missing, under
`torch.compile`, which fuses these ops itself, shapes the kernels do not take, or the kernels switched
off), and the caller then runs the plain PyTorch ops. `use_fused_kernels(False)` (a context manager)
or the environment variable `DITKIT_FUSED_KERNELS=0` switches them off, e.g. to compare
(`DITKIT_FUSED_KERNELS=always` runs them at every size, see `MIN_EAGER_ELEMENTS`); CUDA graphs
already captured keep replaying the kernels they recorded. If the first kernel launch of the process
fails (Triton compiles on first use and needs a C compiler for its launcher), they switch themselves
off with a warning and the plain ops run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

__all__ = [
    "fused_kernels_enabled",
    "fused_kernels_available",
    "use_fused_kernels",
    "for_graph_capture",
    "MIN_EAGER_ELEMENTS",
    "norm_modulate",
    "gated_residual",
    "linear_gelu_tanh",
]

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
MIN_EAGER_ELEMENTS = 2**24
"""Eagerly (outside a CUDA graph) the kernels run only on streams of at least this many elements.

A Triton launch costs more host time than the PyTorch kernels it replaces, and small batches are
launch-bound on a fast GPU: measured on an H100 (`benchmarks/fused_kernels.py`, bf16), eager forwards
at 3-9 M elements ran 0.82-0.86x as fast with the kernels and training steps at 1.6-13 M 0.82-0.97x,
while from 19 M elements up forwards ran 1.10-1.47x and XL/2 training at batch 64 1.19x. Inside a CUDA
graph launches are free, and the kernels run at every size (1.34-1.71x faster graph forwards)."""

_SWITCH = os.environ.get("DITKIT_FUSED_KERNELS", "1")  # 0: off; 1: the size rule; always: every size
if _SWITCH not in ("0", "1", "always"):
    warnings.warn(f"DITKIT_FUSED_KERNELS={_SWITCH!r} is not 0, 1 or always; taking 1 (the default)", stacklevel=2)
    _SWITCH = "1"
_state = {
    "enabled": _SWITCH != "0",
    # The tests' switch for running the kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1
    # set before Triton is imported), so that their math is checked without a GPU.
    "interpret_on_cpu": False,
    "graph": False,  # inside `for_graph_capture`
    "min_elements": 0 if _SWITCH == "always" else MIN_EAGER_ELEMENTS,  # the tests lower it too
    "ran": False,  # a kernel has run in this process (see `_first_runs`)
}


def fused_kernels_enabled() -> bool:
    """Whether the fused GPU kernels are switched on (they still apply only on CUDA with Triton)."""
    return _state["enabled"]


@contextlib.contextmanager
def use_fused_kernels(enabled: bool = True):
    """Switch the fused kernels on or off inside a `with` block (process-wide; restored on exit)."""
    before = _state["enabled"]
    _state["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _state["enabled"] = before


@contextlib.contextmanager
def for_graph_capture():
    """Inside this block the kernels run at every size: launches cost nothing in a CUDA graph.

    `CUDAGraphForward` wraps its warm-up forward and the capture in it, so the kernels the graph
    records are the ones the warm-up already compiled (Triton compiles a kernel on first launch).
    """
    before = _state["graph"]
    _state["graph"] = True
    try:
        yield
    finally:
        _state["graph"] = before


def fused_kernels_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can be loaded here (Triton installed and importable beside this PyTorch)
    and, for a CUDA `device`, run on it (compute capability 7.0 or newer, as PyTorch asks of Triton)."""
    if _kernels() is None:
        return False
    device = torch.device(device) if device is not None else None
    return device is None or device.type != "cuda" or _capability(device) >= (7, 0)


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def _gpu_takes(x: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """Whether Triton compiles for x's GPU in these dtypes: compute capability 7.0 (PyTorch's bar for
    Triton), 8.0 for bf16 (native bf16 arrived with Ampere). Always true in the CPU interpreter."""
    if not x.is_cuda:
        return True
    need = (8, 0) if torch.bfloat16 in dtypes else (7, 0)
    return _capability(x.device) >= need


@functools.cache
def _kernels():
    """The Triton kernel module, or None where Triton cannot be imported."""
    try:
        from . import _triton_kernels
    except Exception:  # ImportError, or a Triton that does not load beside this PyTorch
        return None
    return _triton_kernels


def _applies(x: torch.Tensor):
    """The kernel module when fused kernels may run on x, else None."""
    on_device = x.is_cuda or (_state["interpret_on_cpu"] and x.device.type == "cpu")
    if not _state["enabled"] or not on_device or torch.compiler.is_compiling():
        return None
    if not _state["graph"] and x.numel() < _state["min_elements"]:  # launch-bound: see MIN_EAGER_ELEMENTS
        return None
    return _kernels()


def _first_runs(call, *args):
    """`call(*args)`, except that until a kernel has run once in this process a failure switches the
    kernels off with a warning and returns None (the caller then runs the plain ops).

    Triton compiles each kernel, and a C launcher for it, on first use: a machine without a C compiler,
    or a driver or GPU this Triton does not support, fails there, where the plain ops would have worked.
    Once a kernel has run, errors (out of memory, say) are real and are raised."""
    if _state["ran"]:
        return call(*args)
    try:
        out = call(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:
        warnings.warn(
            f"ditkit: the fused GPU kernels cannot run here ({type(err).__name__}: {str(err)[:300]}); using the "
            "plain PyTorch ops instead (DITKIT_FUSED_KERNELS=0 skips trying)",
            RuntimeWarning,
            stacklevel=3,
        )
        _state["enabled"] = False
        return None
    _state["ran"] = True
    return out


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _row_params(kernels, x: torch.Tensor, *per_sample: torch.Tensor) -> bool:
    """x is a contiguous (N, T, D) float tensor and each per-sample tensor an (N, D) one with unit column stride."""
    if x.dim() != 3 or not x.is_contiguous() or x.dtype not in _FLOAT or not 0 < x.shape[-1] <= kernels.MAX_D:
        return False
    n, _, d = x.shape
    return all(
        p.shape == (n, d) and p.dtype in _FLOAT and p.stride(1) == 1 and p.device == x.device for p in per_sample
    )


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor | None:
    """LayerNorm(x) * (1 + scale) + shift in `dtype`, one pass over x, or None where the kernel does not apply."""
    kernels = _applies(x)
    if kernels is None or dtype not in _FLOAT or not _row_params(kernels, x, shift, scale):
        return None
    if not _gpu_takes(x, x.dtype, shift.dtype, scale.dtype, dtype):
        return None
    if _needs_grad(x, shift, scale):
        return _first_runs(kernels.NormModulate.apply, x, shift, scale, eps, dtype)
    out = _first_runs(kernels.norm_modulate_forward, x, shift, scale, eps, dtype)  # no autograd node to build
    return None if out is None else out[0]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor | None:
    """x + gate * branch (gate (N, D) rounded to branch's dtype), one pass, or None where the kernel does not apply."""
    kernels = _applies(x)
    if kernels is None or branch.shape != x.shape or not branch.is_contiguous() or branch.dtype not in _FLOAT:
        return None
    if branch.device != x.device or not _row_params(kernels, x, gate):
        return None
    if not _gpu_takes(x, x.dtype, gate.dtype, branch.dtype):
        return None
    if _needs_grad(x, gate, branch):
        return _first_runs(kernels.GatedResidual.apply, x, gate, branch)
    return _first_runs(kernels.gated_residual_forward, x, gate, branch)


def linear_gelu_tanh(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """gelu_tanh(x W^T + b) with the GELU in cuBLASLt's matmul epilogue (CUDA inference), or None.

    `torch._addmm_activation(..., use_gelu=True)` is PyTorch's entry to cuBLASLt's GELU-bias epilogue
    (the tanh approximation), so the (rows, hidden) pre-activation is never written out and read back.
    """
    if not _state["enabled"] or not x.is_cuda or torch.compiler.is_compiling() or dtype not in _FLOAT:
        return None
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch._addmm_activation(bias.to(dtype), rows, weight.to(dtype).t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])
