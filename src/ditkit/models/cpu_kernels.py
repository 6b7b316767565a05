"""Compiled CPU kernels for elementwise work that eager PyTorch runs slowly: the tanh-GELU, LayerNorm + adaLN
modulation and adaLN-Zero's gated residual, forward and backward.

PyTorch's CPU tanh-GELU is several times slower than its erf GELU (on an Intel Xeon with AMX: 6.0 ms
forward and 6.3 ms backward for a (4096, 1536) bf16 activation, against 1.7 and 2.2 ms here), and it was
the largest elementwise cost of a DiT training step there; the norm + modulation and the gated residual
each take several PyTorch ops and passes over memory where one loop suffices (docs/speed.md). On CPUs with
AMX tiles (Intel Xeon since Sapphire Rapids) it also holds DiT's self-attention, forward and backward, as
one pass per sample and head on the tiles (`self_attention`): PyTorch's bf16 matmul form spends most of its
time in small batched products, copies and the softmax's passes over memory, and its fused CPU kernel has
a slow backward.
`_cpu_kernels.c` computes them in fp32: with AVX-512 intrinsics where the CPU has AVX-512 with bf16, else in
loops the C compiler vectorises for the machine it runs on.

The C file is compiled on first use with the system's C compiler (`$CC`, else `cc`) into a cache
directory (`$DITKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/ditkit`, else `~/.cache/ditkit`), keyed by the
source, the flags, the compiler's version and the CPU, so a cache shared between machines never hands
one CPU another's instructions. It takes about a second. Where there is no compiler or the build
fails, a warning says why once and PyTorch's own kernels run instead; `DITKIT_CPU_KERNELS=0` turns the
kernels off. Calls go through ctypes; the loops run on PyTorch's own OpenMP threads (the library links
the libgomp PyTorch has loaded, see the C file), so `torch.set_num_threads` applies to them too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "cpu_kernels_enabled",
    "cpu_info_field",
    "load_library",
    "amx_attention_available",
    "gelu_tanh",
    "norm_modulate",
    "gated_residual",
    "gated_residual_norm_modulate",
    "self_attention",
    "self_attention_applies",
    "attention_amx_forward",
    "attention_amx_backward",
    "gelu_tanh_backward_with_bias",
    "matmul_self_attention",
    "recomputed_grads",
    "transpose_bf16",
]

ENV = "DITKIT_CPU_KERNELS"
SOURCE = Path(__file__).with_name("_cpu_kernels.c")
FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
if platform.machine().lower() in ("x86_64", "amd64"):  # the options below are x86's (AVX-512 where present)
    FLAGS += ["-march=native", "-mprefer-vector-width=512"]
"""Vectorised loops without -ffast-math: with it, GCC before 13 links crtfastmath.o into shared libraries,
which sets flush-to-zero for the whole process when the library loads (tested: the library leaves the
FPU's mode alone). Without AVX-512 the loops and reductions vectorise through `omp simd`; -march=native builds
for this CPU only."""
_lock = threading.Lock()
_TEMP_PREFIX = "ditkit-kernels-"


def cpu_kernels_enabled() -> bool:
    """False when `DITKIT_CPU_KERNELS` is 0/false/off/no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _cache_root() -> Path:
    if os.environ.get("DITKIT_CACHE_DIR"):
        return Path(os.environ["DITKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ditkit"


@functools.cache
def cpu_info_field(name: str) -> str:
    """The first `name : value` field of /proc/cpuinfo ('vendor_id', 'model name', 'flags', ...); '' where
    unknown (no /proc: Windows, macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def _cpu_signature() -> str:
    """The CPU model and feature flags, which -march=native compiles for."""
    return f"{platform.machine()}|{cpu_info_field('model name')}|{cpu_info_field('flags')}"


def _compiler() -> list[str] | None:
    """The C compiler's command line: `$CC` (which may carry arguments, e.g. 'ccache gcc'), else cc or gcc."""
    words = shlex.split(os.environ.get("CC", "")) or ["cc"]
    found = shutil.which(words[0])
    if found:
        return [found, *words[1:]]
    found = shutil.which("gcc")
    return [found] if found else None


def _build(cc: list[str]) -> Path:
    """Compile the C source into the cache (once per source, flags, compiler and CPU); the library's path."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    target = _cache_root() / "cpu_kernels" / key / "libditkit_cpu.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out_dir = target.parent
    except OSError:  # a read-only home: build for this process only
        out_dir = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
        target = out_dir / target.name
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [*cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it 0600: other users sharing the cache must be able to load it
        os.replace(tmp, target)  # atomic: concurrent builders each put a whole library in place
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None where they are off or cannot be built (warned once)."""
    if not cpu_kernels_enabled():
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn(
            f"ditkit: no C compiler found ($CC, cc or gcc), so its CPU kernels are off and PyTorch's slower tanh-GELU "
            f"runs; install gcc, or set {ENV}=0 to silence this",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    try:
        with _lock:
            path = _build(cc)
            lib = ctypes.CDLL(str(path))
            if path.parent.name.startswith(_TEMP_PREFIX):  # a per-process build: loaded, so not needed on disk
                shutil.rmtree(path.parent, ignore_errors=True)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(
            f"ditkit: building its CPU kernels failed, PyTorch's kernels run instead ({exc}); set {ENV}=0 to "
            "silence this",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    unary = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    binary = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    for name in ("ditkit_gelu_tanh_f32", "ditkit_gelu_tanh_bf16"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = unary, None
    for name in ("ditkit_gelu_tanh_backward_f32", "ditkit_gelu_tanh_backward_bf16"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = binary, None
    lib.ditkit_gelu_tanh_backward_bias_bf16.restype = ctypes.c_int32  # 0, or -1: out of memory
    lib.ditkit_gelu_tanh_backward_bias_bf16.argtypes = [*binary[:3], ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    ptr, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
    lib.ditkit_norm_modulate.argtypes = [ptr, ptr, ptr, ptr, i32, ptr, ptr, i64, i64, i64, f32]
    lib.ditkit_norm_modulate_backward.argtypes = [ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.ditkit_norm_modulate.restype = lib.ditkit_norm_modulate_backward.restype = None
    lib.ditkit_gated_residual.argtypes = [ptr, ptr, ptr, i32, ptr, i64, i64, i64]
    lib.ditkit_gated_residual_norm_modulate.argtypes = [ptr, ptr, ptr, i32, ptr, ptr, ptr, ptr, i32, i64, i64, i64, f32]
    lib.ditkit_gated_residual_norm_modulate.restype = None
    lib.ditkit_gated_residual_backward.argtypes = [ptr, ptr, ptr, i32, ptr, ptr, i64, i64, i64]
    lib.ditkit_gated_residual.restype = lib.ditkit_gated_residual_backward.restype = None
    lib.ditkit_has_amx_attention.argtypes, lib.ditkit_has_amx_attention.restype = [], ctypes.c_int32
    lib.ditkit_has_avx512.argtypes, lib.ditkit_has_avx512.restype = [], ctypes.c_int32
    if lib.ditkit_has_avx512():  # built with AVX-512 (and AVX512-BF16): the fp32 attention is there
        lib.ditkit_attention_f32.argtypes = [ptr] * 3 + [i64] * 3 + [ptr] * 2 + [i64] * 7 + [f32]
        lib.ditkit_attention_f32.restype = i32
    if lib.ditkit_has_amx_attention():  # built for a CPU with AMX tiles (see the C file)
        strides = [i64, i64, i64]
        lib.ditkit_amx_init.argtypes, lib.ditkit_amx_init.restype = [], ctypes.c_int32
        lib.ditkit_attention_amx.argtypes = [ptr, ptr, ptr, *strides, ptr, *strides, ptr, i64, i64, i64, i64, f32]
        lib.ditkit_attention_amx_backward.argtypes = [
            ptr, ptr, ptr, *strides, ptr, ptr, *strides, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, f32,
        ]  # fmt: skip
        lib.ditkit_attention_amx.restype = lib.ditkit_attention_amx_backward.restype = i32  # -1: out of memory
        lib.ditkit_transpose_bf16.argtypes, lib.ditkit_transpose_bf16.restype = [ptr, i64, ptr, i64, i64], None
    return lib


def _run(fn, inputs: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """fn(*input pointers, out pointer, n) over contiguous tensors (the kernel splits the loop across threads)."""
    fn(*[t.data_ptr() for t in inputs], out.data_ptr(), out.numel())
    return out


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _plain(t: torch.Tensor) -> bool:
    """A plain tensor or parameter: not a subclass, and not one of torch.func's wrappers (grad, vmap), which
    report themselves as `torch.Tensor` but whose transforms these autograd functions do not support."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if torch.autograd.forward_ad._current_level >= 0 and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
        return False  # forward-mode AD: these autograd functions have no jvp, PyTorch's ops do
    try:
        return not torch._C._functorch.is_functorch_wrapped_tensor(t)
    except AttributeError:  # another PyTorch: no functorch introspection
        return True


def _usable(x: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in _SUFFIX and _plain(x)


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        lib = load_library()
        ctx.save_for_backward(x)  # the input itself: a second derivative must reach it (see backward)
        x = x.contiguous()
        return _run(getattr(lib, f"ditkit_gelu_tanh_{_SUFFIX[x.dtype]}"), [x], torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): PyTorch's formula, which is differentiable
            return torch.ops.aten.gelu_backward(grad.to(x.dtype), x, approximate="tanh")
        grad, x = grad.to(x.dtype).contiguous(), x.contiguous()
        fn = getattr(load_library(), f"ditkit_gelu_tanh_backward_{_SUFFIX[x.dtype]}")
        return _run(fn, [grad, x], torch.empty_like(x))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`, through the compiled kernel where it applies (CPU, fp32 or bf16,
    kernels built; not under torch.compile), else PyTorch's. Same values within fp32 rounding (bf16: within
    one unit of the last place), gradients too; a second derivative (`create_graph=True`) takes PyTorch's."""
    if x.numel() and _usable(x) and load_library() is not None:
        return _GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def recomputed_grads(forward, inputs: tuple, needs: tuple[bool, ...], grad: torch.Tensor) -> tuple:
    """For backward(create_graph=True) through these kernels' autograd functions (and `layers`' AMX training
    routes): the gradients again, through PyTorch's differentiable ops on the saved inputs (`forward`
    recomputes the output from them), so that a second derivative (a gradient penalty, say) reaches them."""
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    grads = iter(torch.autograd.grad(forward(*inputs), wanted, grad, create_graph=True))
    return tuple(next(grads) if need and t is not None else None for t, need in zip(inputs, needs))


class _NormModulate(torch.autograd.Function):
    """With `residual`, also returns x itself for the residual connection around the branch, so that the
    backward receives that path's gradient and adds it in the kernel (see `norm_modulate`)."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps: float, out_dtype: torch.dtype, residual: bool):
        n, t, d = x.shape
        shift32, scale32 = shift.float().contiguous(), scale.float().contiguous()
        out = torch.empty(n, t, d, dtype=out_dtype, device=x.device)  # never the process's default dtype/device
        train = any(ctx.needs_input_grad[:3])
        mean = torch.empty(n, t, dtype=torch.float32, device=x.device) if train else None
        rstd = torch.empty(n, t, dtype=torch.float32, device=x.device) if train else None
        load_library().ditkit_norm_modulate(
            x.data_ptr(), shift32.data_ptr(), scale32.data_ptr(), out.data_ptr(), int(out_dtype == torch.bfloat16),
            _ptr(mean), _ptr(rstd), n, t, d, eps,
        )  # fmt: skip
        if train:
            ctx.save_for_backward(x, mean, rstd, shift, scale)
            ctx.eps, ctx.out_dtype = eps, out_dtype
        return (out, x) if residual else out

    @staticmethod
    def backward(ctx, grad, grad_residual=None):
        x, mean, rstd, shift, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): PyTorch's ops, which are differentiable

            def forward(x, shift, scale):
                normed = F.layer_norm(x, (x.shape[-1],), eps=ctx.eps)
                return (normed * (1 + scale[:, None]) + shift[:, None]).to(ctx.out_dtype)

            grad_x, *rest = recomputed_grads(forward, (x, shift, scale), ctx.needs_input_grad[:3], grad)
            if grad_x is not None and grad_residual is not None:
                grad_x = grad_x + grad_residual
            return grad_x, *rest, None, None, None
        scale32 = scale.float().contiguous()
        n, t, d = x.shape
        grad = grad.contiguous()  # in the output's dtype (fp32 or bf16), as autograd guarantees
        residual = None if grad_residual is None else grad_residual.to(torch.float32).contiguous()
        grad_x = torch.empty_like(x)
        grad_scale = torch.empty(n, d, dtype=torch.float32, device=x.device)
        grad_shift = torch.empty(n, d, dtype=torch.float32, device=x.device)
        load_library().ditkit_norm_modulate_backward(
            grad.data_ptr(), int(grad.dtype == torch.bfloat16), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
            scale32.data_ptr(), _ptr(residual), grad_x.data_ptr(), grad_scale.data_ptr(), grad_shift.data_ptr(),
            n, t, d,
        )  # fmt: skip
        return grad_x, grad_shift.to(shift.dtype), grad_scale.to(scale.dtype), None, None, None


def _applies(x: torch.Tensor, per_sample: tuple[torch.Tensor, ...]) -> bool:
    """Whether the compiled (N, T, D) kernels take x: fp32, contiguous, on CPU, (N, D) per-sample vectors."""
    return (
        not torch.compiler.is_compiling()  # first: Dynamo cannot trace the checks below (PyTorch's ops run)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 3
        and x.numel() > 0
        and x.is_contiguous()
        and _plain(x)
        and all(v.shape == (x.shape[0], x.shape[2]) and v.device.type == "cpu" and _plain(v) for v in per_sample)
        and load_library() is not None
    )


def norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    residual: bool = False,
):
    """LayerNorm(x) * (1 + scale) + shift as one compiled pass, or None where the kernel does not apply.

    x (N, T, D) fp32 on CPU, shift and scale (N, D); the output in `out_dtype` (fp32 or bf16). The
    statistics come from the fp32 input (the eager bf16 route rounds x to bf16 first) and the output is
    rounded once. Its backward is compiled too (a second derivative takes PyTorch's ops). Tensor subclasses
    (`torch.func` transforms' wrapped tensors among them) get None, and PyTorch's ops run instead.

    With `residual`: (the output, x again), where the x returned is the one to add the branch to. Its
    gradient then reaches this backward, which adds it to x's in the same pass, where autograd would
    otherwise sum the two gradients of x in a separate pass over both (DiT-B/2: 24 passes over 12 MB).
    """
    if out_dtype not in (torch.float32, torch.bfloat16) or not _applies(x, (shift, scale)):
        return None
    return _NormModulate.apply(x, shift, scale, eps, out_dtype, residual)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, branch):
        n, t, d = x.shape
        gate32 = gate.float().contiguous()
        branch = branch.contiguous()
        out = torch.empty_like(x)
        load_library().ditkit_gated_residual(
            x.data_ptr(), gate32.data_ptr(), branch.data_ptr(), int(branch.dtype == torch.bfloat16), out.data_ptr(),
            n, t, d,
        )  # fmt: skip
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(gate, branch)
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, branch = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): the same formulas in differentiable ops
            grad32 = grad.float()
            return grad, (grad32 * branch).sum(1).to(gate.dtype), (gate[:, None].float() * grad32).to(branch.dtype)
        gate32 = gate.float().contiguous()
        n, t, d = branch.shape
        grad32 = grad.float().contiguous()
        grad_branch = torch.empty_like(branch)
        grad_gate = torch.empty(n, d, dtype=torch.float32, device=branch.device)
        load_library().ditkit_gated_residual_backward(
            grad32.data_ptr(), gate32.data_ptr(), branch.data_ptr(), int(branch.dtype == torch.bfloat16),
            grad_branch.data_ptr(), grad_gate.data_ptr(), n, t, d,
        )  # fmt: skip
        return grad, grad_gate.to(gate.dtype), grad_branch


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor | None:
    """x + gate * branch (x fp32 (N, T, D), gate (N, D), branch (N, T, D) fp32 or bf16) as one compiled pass
    writing fp32, or None where the kernel does not apply. The product is formed in fp32 (as ditkit's eager
    `addcmul` does). Backward compiled too (a second derivative takes PyTorch's ops)."""
    if branch.shape != x.shape or branch.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not _applies(x, (gate,)) or not _plain(branch):  # _applies first: it checks for torch.compile
        return None
    return _GatedResidual.apply(x, gate, branch)


def gated_residual_norm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    branch: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(norm_modulate(x + gate * branch), x + gate * branch) in one compiled pass, for inference: None where the
    kernels do not apply or any input needs a gradient (training takes the two kernels, whose backward exists).
    The values are `gated_residual`'s and `norm_modulate`'s, as if called in turn."""
    if out_dtype not in (torch.float32, torch.bfloat16) or branch.shape != x.shape:
        return None
    if branch.dtype not in (torch.float32, torch.bfloat16):
        return None
    inputs = (x, gate, branch, shift, scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return None
    if not _applies(x, (gate, shift, scale)) or not _plain(branch):  # _applies first: it checks for torch.compile
        return None
    n, t, d = x.shape
    gate32, shift32, scale32 = (v.float().contiguous() for v in (gate, shift, scale))
    branch = branch.contiguous()
    x_out = torch.empty_like(x)
    out = torch.empty(n, t, d, dtype=out_dtype, device=x.device)
    load_library().ditkit_gated_residual_norm_modulate(
        x.data_ptr(), gate32.data_ptr(), branch.data_ptr(), int(branch.dtype == torch.bfloat16), x_out.data_ptr(),
        shift32.data_ptr(), scale32.data_ptr(), out.data_ptr(), int(out_dtype == torch.bfloat16), n, t, d, eps,
    )  # fmt: skip
    return out, x_out


def amx_attention_available() -> bool:
    """Whether `self_attention`'s AMX kernel can run here: the kernels are built, for a CPU with AMX tiles
    (the compiler targets this CPU), and Linux granted this process the tile registers."""
    lib = load_library()
    return lib is not None and _amx_granted(lib)


@functools.cache
def _amx_granted(lib: ctypes.CDLL) -> bool:
    return bool(lib.ditkit_has_amx_attention()) and bool(lib.ditkit_amx_init())


def attention_amx_forward(qkv: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The AMX attention kernel's forward over a checked (N, T, 3, H, D) bf16 projection (`self_attention`):
    the output (N, T, H, D), and with `keep` the probabilities its backward needs, else None."""
    _require_amx()
    n, t, _, h, d = qkv.shape
    tp = (t + 31) // 32 * 32  # tokens padded to whole tiles inside the kernel
    out = torch.empty(n, t, h, d, dtype=torch.bfloat16, device=qkv.device)
    # the probabilities, rows paired as the tile instruction reads them (see the C file)
    p = torch.empty(n, h, tp // 2, tp, 2, dtype=torch.bfloat16, device=qkv.device) if keep else None
    status = load_library().ditkit_attention_amx(
        *_qkv_views(qkv), out.data_ptr(), *_out_strides(qkv), _ptr(p), n, t, h, d, d**-0.5
    )
    _check(status, "attention", t)
    return out, p


def _qkv_views(qkv: torch.Tensor) -> tuple[int, ...]:
    """The kernels' view of an (N, T, 3, H, D) projection: the q, k and v pointers and their (sample, token,
    head) strides in elements; `_out_strides` is the same for an (N, T, H, D) output."""
    n, t, _, h, d = qkv.shape
    base, step = qkv.data_ptr(), h * d * qkv.element_size()
    return base, base + step, base + 2 * step, t * 3 * h * d, 3 * h * d, d


def _out_strides(qkv: torch.Tensor) -> tuple[int, int, int]:
    _, t, _, h, d = qkv.shape
    return t * h * d, h * d, d


def _require_amx() -> None:
    if not amx_attention_available():  # also asks Linux for the tile registers, without which AMX code faults
        raise RuntimeError(
            "ditkit's AMX attention kernel is not available here (no AMX tiles, kernels off or not built); "
            "check cpu_kernels.self_attention_applies first"
        )


def _check(status: int, what: str, tokens: int) -> None:
    if status != 0:
        raise MemoryError(f"ditkit's {what} kernel could not allocate its per-thread buffers ({tokens} tokens)")


def attention_amx_backward(
    qkv: torch.Tensor, out: torch.Tensor, p: torch.Tensor, grad: torch.Tensor, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d(loss)/d(qkv) (N, T, 3, H, D) bf16 from `attention_amx_forward`'s output, probabilities and the output's
    gradient; with `bias_grad`, also its sum over samples and tokens, (3 * H * D) fp32: the gradient of
    the projection's bias, formed inside the kernel."""
    _require_amx()
    n, t, _, h, d = qkv.shape
    grad = grad.to(torch.bfloat16).contiguous()  # (N, T, H, D), the output's layout
    grad_qkv = torch.empty_like(qkv)
    grad_bias = torch.zeros(3 * h * d, dtype=torch.float32, device=qkv.device) if bias_grad else None
    status = load_library().ditkit_attention_amx_backward(
        *_qkv_views(qkv), out.data_ptr(), grad.data_ptr(), *_out_strides(qkv), p.data_ptr(),
        *_qkv_views(grad_qkv)[:3], _ptr(grad_bias), n, t, h, d, d**-0.5,
    )  # fmt: skip
    _check(status, "attention backward", t)
    return grad_qkv, grad_bias


class _SelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor) -> torch.Tensor:
        out, p = attention_amx_forward(qkv, keep=ctx.needs_input_grad[0])
        if p is not None:
            ctx.save_for_backward(qkv, out, p)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, out, p = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): PyTorch's matmul form, differentiable
            return recomputed_grads(matmul_self_attention, (qkv,), ctx.needs_input_grad, grad)[0]
        return attention_amx_backward(qkv, out, p, grad, bias_grad=False)[0]


def matmul_self_attention(qkv: torch.Tensor) -> torch.Tensor:
    """`self_attention` in PyTorch's ops (bf16 matmuls, the softmax accumulated in fp32): (N, T, H, D)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, D)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return (scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v).transpose(1, 2)


def self_attention_applies(qkv: torch.Tensor) -> bool:
    """Whether `self_attention`'s kernel takes this projection output (see there)."""
    return (
        _usable(qkv)  # first: under torch.compile PyTorch's ops run
        and qkv.dim() == 5
        and qkv.shape[2] == 3
        and qkv.dtype == torch.bfloat16
        and qkv.shape[-1] % 32 == 0
        and qkv.numel() > 0
        and qkv.is_contiguous()
        and amx_attention_available()
    )


def fp32_attention_available(*tensors: torch.Tensor) -> bool:
    """Whether `fp32_self_attention`'s kernel is built here (the kernels compiled with AVX-512) and these
    tensors are fp32 CPU tensors it may read (not under torch.compile)."""
    if not all(_usable(x) and x.dtype == torch.float32 for x in tensors):
        return False
    lib = load_library()
    return lib is not None and bool(lib.ditkit_has_avx512())


def fp32_self_attention(qkv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(D)) v for each head of a fused QKV projection in fp32, for inference, by ditkit's
    compiled kernel (AVX-512 fused multiply-adds, with or without AMX); None where it does not apply (a
    gradient is wanted, the kernels lack AVX-512, not an (N, T, 3, H, D) contiguous fp32 CPU tensor).

    `bias`: None, or the projection's bias (3 H D,), which the kernel adds to q, k and v as it reads them,
    so the projection may run without it (aten's product with a bias first copies the bias into its whole
    output). Returns (N, T, H, D), the layout the output projection reads. Same arithmetic as PyTorch's
    fused kernel (fp32 products, an fp32-accurate exp): tested against fp64 beside it.
    """
    if not fp32_attention_available(qkv, *(() if bias is None else (bias,))):
        return None
    if qkv.dim() != 5 or qkv.shape[2] != 3 or qkv.numel() == 0 or not qkv.is_contiguous():
        return None
    if torch.is_grad_enabled() and (qkv.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    n, t, _, h, d = qkv.shape
    if bias is not None and (bias.shape != (3 * h * d,) or not bias.is_contiguous()):
        return None
    out = torch.empty(n, t, h, d, dtype=torch.float32, device=qkv.device)
    status = load_library().ditkit_attention_f32(
        *_qkv_views(qkv), _ptr(bias), out.data_ptr(), *_out_strides(qkv), n, t, h, d, d**-0.5
    )
    _check(status, "fp32 attention", t)
    return out


def self_attention(qkv: torch.Tensor) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(D)) v for each head of a fused QKV projection, on the CPU's AMX tiles; None where
    the kernel does not apply (then the caller runs `layers.attention`).

    qkv: (N, T, 3, H, D) bf16, contiguous, on CPU, D a multiple of 32 (any T); returns (N, T, H, D) bf16,
    the layout the output projection reads. q, k and v are read in place, the scores stay fp32 through the
    softmax, and one bf16 rounding follows (PyTorch's bf16 matmul form rounds the scores too), so it is at
    least as accurate as that form (tested against fp64): training rounds the probabilities, which its
    backward reads; inference rounds the unnormalised exponentials and scales each fp32 output row by
    1 / its sum, so the two forwards differ by about a bf16 rounding. The backward is compiled too (a
    second derivative takes PyTorch's ops). Needs an x86-64 CPU with AMX and Linux (`amx_attention_available`).
    """
    if not self_attention_applies(qkv):
        return None
    return _SelfAttention.apply(qkv)


def transpose_bf16(x: torch.Tensor) -> torch.Tensor | None:
    """x.t().contiguous() for a 2-D bf16 CPU tensor with contiguous rows and an even number of columns, by the
    compiled kernel (PyTorch's bf16 transposing copy is several times slower on CPU); None where it does not
    apply. Built with the AMX kernels (`amx_attention_available`), for the weight gradients of bf16 training."""
    if not (
        _usable(x)
        and x.dtype == torch.bfloat16
        and x.dim() == 2
        and x.numel() > 0
        and x.stride(1) == 1
        and x.shape[1] % 2 == 0
        and x.stride(0) % 2 == 0
        and x.stride(0) < 2**28  # the kernel's gather offsets are 32-bit
        and amx_attention_available()
    ):
        return None
    m, k = x.shape
    out = torch.empty(k, m, dtype=x.dtype, device=x.device)
    load_library().ditkit_transpose_bf16(x.data_ptr(), x.stride(0), out.data_ptr(), m, k)
    return out


def gelu_tanh_backward_with_bias(grad: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tanh-GELU's backward for a bf16 (..., k) pre-activation `x` (kernels built, see `gelu_tanh`):
    (d(loss)/dx bf16, its sum over all but the last dim in fp32, the gradient of the bias that produced x)."""
    if load_library() is None:
        raise RuntimeError(f"ditkit's CPU kernels are not built here (no C compiler, or {ENV}=0)")
    x = x.contiguous()
    grad = grad.to(torch.bfloat16).contiguous()
    out = torch.empty_like(x)
    k = x.shape[-1]
    bias_grad = torch.empty(k, dtype=torch.float32, device=x.device)
    status = load_library().ditkit_gelu_tanh_backward_bias_bf16(
        grad.data_ptr(), x.data_ptr(), out.data_ptr(), bias_grad.data_ptr(), x.numel() // k, k
    )
    _check(status, "GELU backward", x.numel() // k)
    return out, bias_grad
