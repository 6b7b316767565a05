"""ditkit's compiled CPU kernels (`ditkit.models.cpu_kernels`): the same numbers as PyTorch's ops and an fp64
reference, values and gradients, the fall-backs where they do not apply, and the build's cache and errors."""

from __future__ import annotations

import ctypes
import warnings

import pytest
import torch
import torch.nn.functional as F

from ditkit.models import cpu_kernels, layers

needs_kernels = pytest.mark.skipif(cpu_kernels.load_library() is None, reason="no C compiler to build the kernels")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _gelu_tanh_fp64(x: torch.Tensor) -> torch.Tensor:
    """The tanh-GELU in fp64 as x * sigmoid(2u), the same function as 0.5 x (1 + tanh(u)) without its
    cancellation for large negative x (where even fp64's 1 + tanh(u) reads 0)."""
    x = x.double()
    return x * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))


@needs_kernels
def test_gelu_tanh_matches_pytorch_in_fp32_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 257, generator=g) * 3).requires_grad_()  # odd size: the vector loop's remainder
    y = cpu_kernels.gelu_tanh(x)
    assert y.grad_fn is not None and "GeluTanh" in type(y.grad_fn).__name__  # the kernel really ran
    ref = F.gelu(x, approximate="tanh")
    assert _rel(y, ref) < 1e-6
    w = torch.randn(x.shape, generator=g)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), x)
    assert _rel(grad, ref_grad) < 1e-6
    # Against fp64: within a few fp32 roundings, as PyTorch's kernel (values 4.3e-7 there, ours 5.2e-7;
    # gradients times w 3.0e-6 there, ours 5.2e-6: the inlined exp's 2e-7 shows through the derivative).
    xd = x.detach().double().requires_grad_()
    exact = F.gelu(xd, approximate="tanh")
    (exact_grad,) = torch.autograd.grad((exact * w.double()).sum(), xd)
    assert (y.detach().double() - exact).abs().max() < 1e-6
    assert (grad.double() - exact_grad).abs().max() < 1e-5


@needs_kernels
def test_gelu_tanh_in_bf16_is_within_one_rounding_of_pytorch():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 1000, generator=g) * 3).bfloat16().requires_grad_()
    y = cpu_kernels.gelu_tanh(x)
    ref = F.gelu(x, approximate="tanh")
    assert y.dtype == torch.bfloat16
    exact = _gelu_tanh_fp64(x.detach())
    ours_error, their_error = (y.double() - exact).abs(), (ref.double() - exact).abs()
    # Each value within one bf16 unit in the last place of the exact one, or no further off than PyTorch's
    # (in the far negative tail PyTorch's 1 + tanh(u) cancels and is the less accurate of the two; below
    # about x = -10.5 both give -0).
    assert (ours_error <= torch.maximum(exact.abs() * 2**-7, their_error)).all()
    assert ours_error.max() <= their_error.max()
    w = torch.randn(x.shape, generator=g).bfloat16()
    (grad,) = torch.autograd.grad((y * w).float().sum(), x)
    (ref_grad,) = torch.autograd.grad((ref * w).float().sum(), x)
    assert grad.dtype == torch.bfloat16 and _rel(grad, ref_grad) < 4e-3  # bf16 rounding of both


@needs_kernels
def test_gelu_tanh_special_values_and_second_derivative():
    x = torch.tensor([float("nan"), float("inf"), -100.0, -10.0, 0.0, 10.0, 100.0])
    y = cpu_kernels.gelu_tanh(x)
    assert y[0].isnan() and y[1] == float("inf") and y[4] == 0 and y[5] == 10 and y[6] == 100
    assert y[2].abs() < 1e-30 and y[3].abs() < 1e-30  # the clamped exp: sigmoid is 0 there in fp32 anyway
    x = torch.randn(50, dtype=torch.float32, requires_grad=True)
    (grad,) = torch.autograd.grad(cpu_kernels.gelu_tanh(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)  # create_graph: PyTorch's differentiable formula
    xr = x.detach().requires_grad_()
    (ref_grad,) = torch.autograd.grad(F.gelu(xr, approximate="tanh").sum(), xr, create_graph=True)
    (ref_second,) = torch.autograd.grad(ref_grad.sum(), xr)
    torch.testing.assert_close(second, ref_second)


@needs_kernels
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_norm_modulate_kernel_matches_fp64_values_and_gradients(out_dtype):
    g = torch.Generator().manual_seed(2)
    x, shift, scale = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 37, 96), (3, 96), (3, 96)))
    x = x * 2 + 0.5
    w = torch.randn(3, 37, 96, generator=g, dtype=torch.float64)
    exact = [t.clone().requires_grad_() for t in (x, shift, scale)]
    ref = F.layer_norm(exact[0], (96,), eps=1e-6) * (1 + exact[2][:, None]) + exact[1][:, None]
    ref_grads = torch.autograd.grad((ref * w).sum(), exact)
    ours = [t.float().requires_grad_() for t in (x, shift, scale)]
    out = cpu_kernels.norm_modulate(*ours, 1e-6, out_dtype)
    assert out is not None and out.dtype == out_dtype
    grads = torch.autograd.grad((out.double() * w).sum(), ours)
    bound = 1e-6 if out_dtype == torch.float32 else 4e-3  # fp32 arithmetic; bf16 rounds the output once
    assert _rel(out, ref) < bound
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float32 and _rel(grad, ref_grad) < max(bound, 1e-6)


@needs_kernels
def test_norm_modulate_through_layers_under_autocast_takes_the_kernel_and_keeps_dtypes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 64, generator=g, requires_grad=True)
    shift = torch.randn(2, 64, generator=g).bfloat16().requires_grad_()  # autocast's adaLN output
    scale = torch.randn(2, 64, generator=g).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layers.norm_modulate(x, shift, scale)
    assert out.dtype == torch.bfloat16 and "NormModulate" in type(out.grad_fn).__name__
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and shift.grad.dtype == scale.grad.dtype == torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("branch_dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_kernel_matches_fp64_values_and_gradients(branch_dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 41, 80, generator=g).requires_grad_()
    gate = torch.randn(3, 80, generator=g).to(branch_dtype).requires_grad_()
    branch = torch.randn(3, 41, 80, generator=g).to(branch_dtype).requires_grad_()
    w = torch.randn(3, 41, 80, generator=g)
    out = cpu_kernels.gated_residual(x, gate, branch)
    assert out is not None and out.dtype == torch.float32
    ref = x.double() + gate.double()[:, None] * branch.double()
    assert _rel(out, ref) < 1e-7
    grads = torch.autograd.grad((out * w).sum(), (x, gate, branch))
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (x, gate, branch))
    for grad, ref_grad, param in zip(grads, ref_grads, (x, gate, branch)):
        assert grad.dtype == param.dtype and _rel(grad, ref_grad) < (1e-6 if grad.dtype == torch.float32 else 4e-3)


@needs_kernels
def test_kernels_step_aside_where_they_do_not_apply():
    x = torch.randn(2, 8, 16)
    v = torch.randn(2, 16)
    assert cpu_kernels.norm_modulate(x.transpose(1, 2).contiguous().transpose(1, 2), v, v, 1e-6, torch.float32) is None
    assert cpu_kernels.norm_modulate(x.half(), v, v, 1e-6, torch.float16) is None
    assert cpu_kernels.norm_modulate(x, v[:1], v, 1e-6, torch.float32) is None  # not one vector per sample
    assert cpu_kernels.norm_modulate(x[:0], v[:0], v[:0], 1e-6, torch.float32) is None  # empty batch
    assert cpu_kernels.gated_residual(x, v, x.half()) is None
    assert cpu_kernels.gated_residual(x.bfloat16(), v, x) is None  # a bf16 residual stream: PyTorch's op
    half = torch.randn(10).half()
    assert cpu_kernels.gelu_tanh(half).dtype == torch.float16  # PyTorch's GELU
    assert cpu_kernels.gelu_tanh(torch.randn(0)).shape == (0,)


def test_everything_falls_back_when_the_kernels_are_off(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    cpu_kernels.load_library.cache_clear()
    try:
        assert cpu_kernels.load_library() is None
        x = torch.randn(2, 8, 16)
        v = torch.randn(2, 16)
        assert cpu_kernels.norm_modulate(x, v, v, 1e-6, torch.float32) is None
        assert cpu_kernels.gated_residual(x, v, x) is None
        assert not cpu_kernels.amx_attention_available()
        assert cpu_kernels.self_attention(torch.randn(2, 32, 3, 2, 64).bfloat16()) is None
        y = cpu_kernels.gelu_tanh(x.requires_grad_())
        assert "GeluTanh" not in type(y.grad_fn).__name__
        torch.testing.assert_close(
            layers.norm_modulate(x, v, v), F.layer_norm(x, (16,), eps=1e-6) * (1 + v[:, None]) + v[:, None]
        )
    finally:
        monkeypatch.undo()
        cpu_kernels.load_library.cache_clear()


def test_a_missing_compiler_or_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    cpu_kernels.load_library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler found"):
            assert cpu_kernels.load_library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu_kernels.load_library() is None  # cached: warned once
        if cpu_kernels.shutil.which("cc") or cpu_kernels.shutil.which("gcc"):
            monkeypatch.undo()
            broken = tmp_path / "broken.c"
            broken.write_text("this is not C\n")
            monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
            monkeypatch.setenv("DITKIT_CACHE_DIR", str(tmp_path / "cache"))
            cpu_kernels.load_library.cache_clear()
            with pytest.warns(RuntimeWarning, match=r"building its CPU kernels failed.*broken\.c"):
                assert cpu_kernels.load_library() is None
            assert not list((tmp_path / "cache").rglob("*.so"))  # no half-written library left behind
    finally:
        monkeypatch.undo()
        cpu_kernels.load_library.cache_clear()


@needs_kernels
def test_the_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("DITKIT_CACHE_DIR", str(tmp_path))
    cc = cpu_kernels._compiler()
    first = cpu_kernels._build(cc)
    assert first.is_file() and first.is_relative_to(tmp_path / "cpu_kernels")
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build(cc) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    monkeypatch.setattr(cpu_kernels, "_cpu_signature", lambda: "another CPU")
    other = cpu_kernels._build(cc)
    assert other != first and other.is_file()  # -march=native output is never shared between CPUs


@needs_kernels
def test_loading_the_library_leaves_the_floating_point_mode_alone(tmp_path):
    """A library built with -ffast-math sets flush-to-zero for the whole process when it loads (GCC < 13)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "tiny = torch.tensor([1e-39]) * torch.tensor([1.0])\n"  # a subnormal survives unless FTZ/DAZ is set
        "from ditkit.models import cpu_kernels\n"
        "assert cpu_kernels.load_library() is not None\n"
        "after = torch.tensor([1e-39]) * torch.tensor([1.0])\n"
        "print(tiny.item() > 0, after.item() > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


@needs_kernels
def test_the_library_exports_every_kernel_with_its_signature():
    lib = cpu_kernels.load_library()
    assert isinstance(lib, ctypes.CDLL)
    for name in (
        "ditkit_gelu_tanh_f32",
        "ditkit_gelu_tanh_bf16",
        "ditkit_gelu_tanh_backward_f32",
        "ditkit_gelu_tanh_backward_bf16",
        "ditkit_norm_modulate",
        "ditkit_norm_modulate_backward",
        "ditkit_gated_residual",
        "ditkit_gated_residual_backward",
        "ditkit_gated_residual_norm_modulate",
    ):
        assert getattr(lib, name).argtypes, name
    # the attention kernel exists in every build; it runs only where the build targets AMX
    assert lib.ditkit_has_amx_attention.restype is ctypes.c_int32
    if lib.ditkit_has_amx_attention():
        for name in ("ditkit_amx_init", "ditkit_attention_amx", "ditkit_attention_amx_backward"):
            assert getattr(lib, name).argtypes is not None and getattr(lib, name).restype is ctypes.c_int32, name
    # the fp32 attention: in every build with AVX-512
    assert lib.ditkit_has_avx512.restype is ctypes.c_int32
    if lib.ditkit_has_avx512():
        assert lib.ditkit_attention_f32.argtypes is not None and lib.ditkit_attention_f32.restype is ctypes.c_int32


@needs_kernels
def test_buffers_do_not_follow_the_process_default_dtype():
    """The C code writes fp32: its buffers must be fp32 whatever torch's default dtype (float64 gave
    garbage gradients without an error)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 16, generator=g, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 16, generator=g, requires_grad=True) for _ in range(3))
    branch = torch.randn(2, 6, 16, generator=g, requires_grad=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = cpu_kernels.norm_modulate(x, shift, scale, 1e-6, torch.float32)
        grads = torch.autograd.grad(out.sum(), (x, shift, scale))
        res = cpu_kernels.gated_residual(x, gate, branch)
        gate_grad = torch.autograd.grad(res.sum(), gate)[0]
    finally:
        torch.set_default_dtype(previous)
    torch.testing.assert_close(grads[1], torch.full((2, 16), 6.0))  # d(sum)/d(shift) = T
    torch.testing.assert_close(gate_grad, branch.detach().sum(1))
    assert grads[0].dtype == torch.float32 and torch.isfinite(grads[2]).all()


@needs_kernels
def test_gelu_second_derivative_reaches_a_non_contiguous_input():
    x = torch.randn(6, 5, dtype=torch.float32).t().requires_grad_()  # transposed: not contiguous
    (grad,) = torch.autograd.grad(cpu_kernels.gelu_tanh(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    xr = x.detach().requires_grad_()
    (ref_grad,) = torch.autograd.grad(F.gelu(xr, approximate="tanh").sum(), xr, create_graph=True)
    torch.testing.assert_close(second, torch.autograd.grad(ref_grad.sum(), xr)[0])


@needs_kernels
def test_torch_func_transforms_take_pytorchs_ops():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, generator=g)
    v = torch.randn(2, 8, generator=g)

    def loss(x):
        h = cpu_kernels.norm_modulate(x, v, v, 1e-6, torch.float32)
        h = layers.norm_modulate(x, v, v) if h is None else h
        r = cpu_kernels.gated_residual(x, v, h)
        r = layers.gated_residual(x, v, h) if r is None else r
        return cpu_kernels.gelu_tanh(r).sum()

    grad = torch.func.grad(loss)(x)
    xr = x.clone().requires_grad_()
    h = F.layer_norm(xr, (8,), eps=1e-6) * (1 + v[:, None]) + v[:, None]
    (ref,) = torch.autograd.grad(F.gelu(xr + v[:, None] * h, approximate="tanh").sum(), xr)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)
    batched = torch.func.vmap(lambda r: cpu_kernels.gelu_tanh(r))(x)
    torch.testing.assert_close(batched, F.gelu(x, approximate="tanh"))


def test_mlp_activation_keeps_module_semantics():
    """Hooks on the activation module (backward ones too) still fire, and a swapped-in activation runs."""
    torch.manual_seed(0)
    mlp = layers.Mlp(8, 16)
    fired = []
    mlp.act.register_full_backward_hook(lambda *args: fired.append("backward"))
    mlp(torch.randn(2, 3, 8, requires_grad=True)).sum().backward()
    assert fired == ["backward"]
    mlp.act = torch.nn.SiLU()
    x = torch.randn(2, 3, 8)
    expected = mlp.fc2(F.silu(mlp.fc1(x)))
    torch.testing.assert_close(mlp(x), expected)  # training path
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected)  # inference path (no fused GELU post-op)


@needs_kernels
def test_gelu_is_zero_far_below_like_pytorch():
    x = torch.tensor([-3e38, -1e20, float("-inf")])
    y = cpu_kernels.gelu_tanh(x)
    assert y[0] == 0 and y[1] == 0 and y[2].isnan()  # PyTorch: -0, -0, nan


@needs_kernels
def test_the_cached_library_is_readable_by_other_users(monkeypatch, tmp_path):
    monkeypatch.setenv("DITKIT_CACHE_DIR", str(tmp_path))
    library = cpu_kernels._build(cpu_kernels._compiler())
    assert library.stat().st_mode & 0o755 == 0o755  # mkstemp's 0600 would keep it to its builder


def test_cc_may_carry_arguments(monkeypatch):
    monkeypatch.setenv("CC", "env gcc")  # as 'ccache gcc' would
    cc = cpu_kernels._compiler()
    assert cc is not None and cc[0].endswith("env") and cc[1:] == ["gcc"]
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    cc = cpu_kernels._compiler()
    assert cc is None or cc[0].endswith("gcc")  # falls back to gcc where there is one


needs_amx = pytest.mark.skipif(
    not cpu_kernels.amx_attention_available(), reason="the attention kernel needs a CPU with AMX tiles (and Linux)"
)


def _attention_fp64(qkv: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D)) v of an (N, T, 3, H, D) projection in fp64: output (N, T, H, D), d/dqkv."""
    x = qkv.detach().double().requires_grad_()
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    out = (torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v).transpose(1, 2)
    (g,) = torch.autograd.grad(out, x, grad.double())
    return out.detach(), g


@needs_amx
@pytest.mark.parametrize(
    ("n", "t", "h", "d"),
    [(2, 64, 3, 64), (3, 256, 6, 64), (2, 50, 2, 64), (2, 17, 1, 128), (1, 100, 2, 96), (2, 32, 2, 32)],
)
def test_amx_self_attention_matches_fp64_and_beats_pytorchs_bf16_form(n, t, h, d):
    """Values and gradients against fp64, including token counts that are not whole tiles (padded inside the
    kernel: padded keys must get no probability, padded queries must not be written)."""
    g = torch.Generator().manual_seed(t + d)
    qkv = (torch.randn(n, t, 3, h, d, generator=g) * 1.5).bfloat16().requires_grad_()
    grad = torch.randn(n, t, h, d, generator=g).bfloat16()
    out = cpu_kernels.self_attention(qkv)
    assert out is not None and out.shape == (n, t, h, d) and out.dtype == torch.bfloat16
    assert "SelfAttention" in type(out.grad_fn).__name__
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    exact, exact_grad = _attention_fp64(qkv, grad)
    # PyTorch's bf16 matmul form (ditkit's 'math' attention) on the same bf16 inputs, for scale
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    theirs = layers._matmul_attention(q, k, v, None).transpose(1, 2)
    (their_grad,) = torch.autograd.grad(theirs, qkv, grad)
    for ours, their, ref in ((out, theirs, exact), (dqkv, their_grad, exact_grad)):
        ours_err, their_err = _rel(ours, ref), _rel(their, ref)
        assert ours_err < 6e-3, ours_err  # about bf16's rounding of the result (2^-9 = 2e-3 per value)
        assert ours_err <= their_err, (ours_err, their_err)  # fp32 scores: more accurate than the bf16 form


@needs_amx
def test_amx_self_attention_inference_agrees_with_training_forward():
    # Inference rounds the unnormalised probabilities to bf16 and scales each output row by 1 / its sum;
    # training rounds the normalised ones, which its backward reads. Both are bf16 roundings of the same
    # values, so they agree to within a bf16 rounding or two, and are as close to the exact result.
    qkv = (torch.randn(2, 40, 3, 2, 64) * 2).bfloat16()
    with torch.no_grad():
        inference = cpu_kernels.self_attention(qkv)
    training = cpu_kernels.self_attention(qkv.clone().requires_grad_()).detach()
    q, k, v = (qkv[:, :, i].transpose(1, 2).double() for i in range(3))
    exact = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert not torch.equal(inference, training)  # the two roundings are really different
    assert _rel(inference, training) < 5e-3  # measured 2.6e-3: bf16 roundings (2^-9 each) of the probabilities
    assert _rel(inference, exact) < 1.2 * _rel(training, exact) + 1e-4 and _rel(inference, exact) < 4e-3


@needs_amx
def test_attention_module_takes_the_amx_kernel_and_agrees_with_the_math_form(monkeypatch):
    torch.manual_seed(0)
    attn = layers.Attention(128, 2)
    x = torch.randn(2, 64, 128, requires_grad=True)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x)
        grads = torch.autograd.grad(out.float().square().sum(), [x, attn.qkv.weight, attn.proj.weight])
        return out, grads

    out, grads = run()
    # training: the projection and the kernel as one node (its backward also sums the bias gradient)
    assert any("QKVAttention" in type(node).__name__ for node in _walk(out.grad_fn))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inference = attn(x)
    monkeypatch.setattr(cpu_kernels, "amx_attention_available", lambda: False)  # the math form, plain linears
    ref_out, ref_grads = run()
    assert not any("QKVAttention" in type(node).__name__ for node in _walk(ref_out.grad_fn))
    assert _rel(inference, ref_out) < 1e-2  # inference takes the kernel too (`self_attention`)
    assert _rel(out, ref_out) < 1e-2
    for a, b in zip(grads, ref_grads):
        assert _rel(a, b) < 2e-2


def _walk(fn):
    """Every node of an autograd graph."""
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)


@needs_amx
def test_amx_kernel_and_pytorchs_own_amx_kernels_do_not_disturb_each_other():
    """AMX tile state is per thread: ours must restore what it found, and PyTorch's fused attention and
    oneDNN's bf16 matmul (which use the tiles too) must still be right after it, and ours after them."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, 64, 3, 2, 64, generator=g).bfloat16()
    a, w = torch.randn(256, 384, generator=g).bfloat16(), torch.randn(512, 384, generator=g).bfloat16()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ours_ref = _attention_fp64(qkv, torch.zeros(4, 64, 2, 64))[0]
    sdpa_ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)
    mm_ref = a.double() @ w.double().t()
    with torch.no_grad():
        for _ in range(3):
            assert _rel(cpu_kernels.self_attention(qkv), ours_ref) < 6e-3
            assert _rel(F.scaled_dot_product_attention(q, k, v).transpose(1, 2), sdpa_ref) < 1e-2
            assert _rel(torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""), mm_ref) < 1e-2
            assert _rel(a @ w.t(), mm_ref) < 1e-2


needs_fp32_attention = pytest.mark.skipif(
    not cpu_kernels.fp32_attention_available(torch.zeros(1)), reason="the fp32 attention kernel needs AVX-512"
)


@needs_fp32_attention
@pytest.mark.parametrize(
    ("n", "t", "h", "d"),
    [(3, 256, 6, 64), (2, 37, 3, 64), (2, 5, 2, 72), (2, 33, 2, 40), (2, 17, 2, 100), (1, 1, 1, 8), (1, 70, 1, 16)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_attention_matches_fp64_as_closely_as_pytorchs_kernel(n, t, h, d, with_bias):
    """Token counts off the kernel's blocks (8 query rows, 32 keys: padded keys must get no probability,
    padded queries must not be written) and head sizes off the 16-lane vectors; the projection's bias added
    inside the kernel as it reads q, k and v."""
    g = torch.Generator().manual_seed(t + d)
    qkv = torch.randn(n, t, 3, h, d, generator=g) * 2
    bias = torch.randn(3 * h * d, generator=g) if with_bias else None
    with torch.no_grad():
        out = cpu_kernels.fp32_self_attention(qkv, bias)
    assert out is not None and out.shape == (n, t, h, d) and out.dtype == torch.float32
    full = qkv if bias is None else qkv + bias.reshape(3, h, d)
    exact = _attention_fp64(full, torch.zeros(n, t, h, d))[0]
    q, k, v = full.permute(2, 0, 3, 1, 4).unbind(0)
    theirs = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # PyTorch's fp32 fused kernel
    assert _rel(out, exact) < 2e-6  # fp32 rounding (measured 2e-7 to 7e-7)
    assert _rel(out, exact) <= 1.5 * _rel(theirs, exact) + 1e-7


@needs_fp32_attention
def test_fp32_attention_steps_aside_where_it_does_not_apply():
    qkv = torch.randn(2, 8, 3, 2, 16)
    assert cpu_kernels.fp32_self_attention(qkv.bfloat16()) is None  # bf16: the AMX kernel's
    assert cpu_kernels.fp32_self_attention(qkv.transpose(0, 1)) is None  # not contiguous
    assert cpu_kernels.fp32_self_attention(qkv, torch.zeros(5)) is None  # a bias of the wrong size
    assert cpu_kernels.fp32_self_attention(qkv.requires_grad_()) is None  # a gradient is wanted: SDPA
    with torch.no_grad():
        assert cpu_kernels.fp32_self_attention(qkv) is not None


@needs_fp32_attention
def test_attention_module_fp32_inference_takes_the_kernel_with_the_bias_inside(monkeypatch):
    torch.manual_seed(0)
    attn = layers.Attention(96, 3).eval()
    torch.nn.init.normal_(attn.qkv.bias, std=0.5)
    x = torch.randn(2, 21, 96)
    calls = []
    kernel = cpu_kernels.fp32_self_attention
    monkeypatch.setattr(cpu_kernels, "fp32_self_attention", lambda *a: calls.append(a[1]) or kernel(*a))
    with torch.no_grad():
        out = attn(x)
        assert len(calls) == 1 and calls[0] is attn.qkv.bias  # the product ran without it
        hook = attn.qkv.register_forward_hook(lambda *a: None)  # a hook must see qkv run
        hooked = attn(x)
        hook.remove()
        assert len(calls) == 1
    ref = attn(x)  # with gradients: PyTorch's SDPA after the full projection
    assert len(calls) == 1
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hooked, ref.detach(), rtol=1e-5, atol=1e-6)


@needs_kernels
def test_amx_self_attention_steps_aside_where_it_does_not_apply(monkeypatch):
    qkv = torch.randn(2, 32, 3, 2, 64)
    assert cpu_kernels.self_attention(qkv) is None  # fp32
    assert cpu_kernels.self_attention(torch.randn(2, 32, 3, 2, 48).bfloat16()) is None  # head size not 32k
    assert cpu_kernels.self_attention(qkv.bfloat16().transpose(0, 1).contiguous().transpose(0, 1)) is None
    assert cpu_kernels.self_attention(qkv.bfloat16()[:0]) is None
    monkeypatch.setattr(cpu_kernels, "amx_attention_available", lambda: False)  # a CPU without AMX
    assert cpu_kernels.self_attention(qkv.bfloat16()) is None
    attn = layers.Attention(128, 2)  # and the module runs the math form there
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn(torch.randn(2, 32, 128)).shape == (2, 32, 128)


@needs_amx
@pytest.mark.parametrize("shape", [(4096, 384), (50, 6), (33, 1000), (1, 2), (100, 768)])
def test_transpose_bf16_is_exact(shape):
    x = torch.randn(shape).bfloat16()
    torch.testing.assert_close(cpu_kernels.transpose_bf16(x), x.t().contiguous(), rtol=0, atol=0)
    wide = torch.randn(shape[0], shape[1] + 10).bfloat16()[:, 4 : 4 + shape[1]]  # rows with a stride
    torch.testing.assert_close(cpu_kernels.transpose_bf16(wide), wide.t().contiguous(), rtol=0, atol=0)


@needs_kernels
def test_transpose_bf16_steps_aside():
    assert cpu_kernels.transpose_bf16(torch.randn(8, 6)) is None  # fp32
    assert cpu_kernels.transpose_bf16(torch.randn(8, 5).bfloat16()) is None  # odd column count
    assert cpu_kernels.transpose_bf16(torch.randn(6, 8).bfloat16().t()) is None  # columns not contiguous
    assert cpu_kernels.transpose_bf16(torch.randn(2, 3, 4).bfloat16()) is None


@needs_amx
@pytest.mark.parametrize(("fan_in", "fan_out"), [(64, 192), (192, 64), (96, 96)])
def test_bf16_training_linear_gradients_match_f_linear(fan_in, fan_out):
    """The training Linear on AMX forms the weight gradient from a transposed copy of the smaller operand
    (in < out: x; in > out: the output gradient); values and all three gradients as F.linear's."""
    torch.manual_seed(fan_in + fan_out)
    lin = layers.Linear(fan_in, fan_out)
    x = torch.randn(3, 70, fan_in, requires_grad=True)
    w = torch.randn(3, 70, fan_out)

    def run(module_forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module_forward(x)
        return out, torch.autograd.grad((out.float() * w).sum(), [x, lin.weight, lin.bias])

    out, grads = run(lin)
    assert any("Bf16TrainingLinear" in type(node).__name__ for node in _walk(out.grad_fn))
    ref_out, ref_grads = run(lambda inp: F.linear(inp, lin.weight, lin.bias))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the same product
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == ref.dtype and got.shape == ref.shape and got.is_contiguous()
        assert _rel(got, ref) < 4e-3  # bf16 products summed in another order, each rounded once


@needs_kernels
def test_gelu_backward_with_bias_sums_what_it_writes():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 1100, generator=g) * 3).bfloat16()  # a row longer than one kernel block
    grad = torch.randn(37, 1100, generator=g).bfloat16()
    grad_x, grad_bias = cpu_kernels.gelu_tanh_backward_with_bias(grad, x)
    xr = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(cpu_kernels.gelu_tanh(xr), xr, grad)
    torch.testing.assert_close(grad_x, plain, rtol=0, atol=0)  # the same kernel's values
    xd = x.double().requires_grad_()
    (exact,) = torch.autograd.grad(_gelu_tanh_fp64(xd), xd, grad.double())
    assert grad_bias.dtype == torch.float32 and _rel(grad_bias, exact.sum(0)) < 1e-5  # summed before rounding


@needs_amx
def test_attention_backward_sums_the_projection_bias_gradient():
    g = torch.Generator().manual_seed(6)
    n, t, h, d = 3, 70, 2, 64  # padded tokens must add nothing
    qkv = torch.randn(n, t, 3, h, d, generator=g).bfloat16()
    grad = torch.randn(n, t, h, d, generator=g).bfloat16()
    out, p = cpu_kernels.attention_amx_forward(qkv, keep=True)
    grad_qkv, grad_bias = cpu_kernels.attention_amx_backward(qkv, out, p, grad, bias_grad=True)
    _, exact = _attention_fp64(qkv, grad)
    assert grad_bias.shape == (3 * h * d,) and _rel(grad_bias, exact.sum((0, 1)).flatten()) < 6e-3
    assert _rel(grad_bias, grad_qkv.double().sum((0, 1)).flatten()) < 6e-3
    assert cpu_kernels.attention_amx_backward(qkv, out, p, grad, bias_grad=False)[1] is None


@needs_amx
def test_bf16_training_mlp_and_attention_fuse_on_amx_and_match_the_plain_layers(monkeypatch):
    """fc1 + GELU and the QKV projection + attention each train as one node on AMX (their kernels also sum
    the bias gradients); every gradient as the plain layers', and a hook on fc1 or qkv keeps them apart."""
    torch.manual_seed(1)
    mlp, attn = layers.Mlp(64, 256), layers.Attention(128, 2)
    cases = [
        (mlp, torch.randn(2, 40, 64), "LinearGelu", mlp.fc1),
        (attn, torch.randn(2, 40, 128), "QKVAttention", attn.qkv),
    ]
    for module, x, node, inner in cases:
        x.requires_grad_()
        params = [x, *module.parameters()]

        def run(module=module, x=x, params=params):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x)
            return out, torch.autograd.grad(out.float().square().sum(), params)

        out, grads = run()
        assert any(node in type(n).__name__ for n in _walk(out.grad_fn))
        seen = []
        handle = inner.register_forward_hook(lambda *args: seen.append(1))
        hooked, hooked_grads = run()
        handle.remove()
        assert seen and not any(node in type(n).__name__ for n in _walk(hooked.grad_fn))
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "amx_attention_available", lambda: False)  # plain layers throughout
            ref, ref_grads = run()
        for got in (grads, hooked_grads):
            for a, b in zip(got, ref_grads):
                assert a.shape == b.shape and _rel(a, b) < 2e-2
        assert _rel(out, ref) < 1e-2


@needs_amx
def test_torch_func_gradients_of_bf16_training_layers_take_pytorchs_ops():
    """torch.func.grad over the parameters (functional_call) wraps the weights, not x: the AMX training
    routes must step aside for them as well, and the gradients be the plain layers'."""
    torch.manual_seed(2)
    block = torch.nn.Sequential(layers.Attention(64, 2), layers.Mlp(64, 128))
    x = torch.randn(2, 32, 64)
    params = dict(block.named_parameters())

    def loss(p):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.func.functional_call(block, p, (x,)).float().square().sum()

    grads = torch.func.grad(loss)(params)
    ref = torch.autograd.grad(loss(params), list(params.values()))
    for got, want in zip(grads.values(), ref):
        assert _rel(got, want) < 2e-2


@needs_amx
def test_amx_attention_propagates_nan_like_pytorch():
    """A NaN key poisons every query's row (PyTorch: all NaN); the kernel's clamp before exp must not hide it."""
    qkv = torch.randn(1, 40, 3, 1, 64).bfloat16()
    qkv[0, 7, 1, 0, 3] = float("nan")  # one channel of one key
    out = cpu_kernels.self_attention(qkv)
    assert torch.isnan(out).all()


@needs_amx
def test_direct_kernel_calls_get_the_tile_permission_first(tmp_path):
    """The public forward asks Linux for the AMX registers itself (without it the first tile instruction
    kills the process with SIGILL), so it works in a fresh process that never checked availability."""
    import subprocess
    import sys

    code = (
        "import torch; from ditkit.models import cpu_kernels as k; "
        "out, p = k.attention_amx_forward(torch.randn(1, 32, 3, 1, 32).bfloat16(), keep=False); print(out.shape)"
    )
    env = {**__import__("os").environ, "DITKIT_CACHE_DIR": str(cpu_kernels._cache_root())}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


class _LoRALinear(torch.nn.Linear):
    """nn.Linear plus a low-rank term: a subclass whose own forward must run."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__(fan_in, fan_out)
        self.a = torch.nn.Parameter(torch.randn(4, fan_in) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(fan_out, 4) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + (x @ self.a.t()) @ self.b.t()


@needs_amx
def test_a_swapped_in_linear_subclass_runs_its_own_forward():
    torch.manual_seed(3)
    attn, mlp = layers.Attention(64, 2), layers.Mlp(64, 128)
    attn.qkv, mlp.fc1 = _LoRALinear(64, 192), _LoRALinear(64, 128)
    x = torch.randn(2, 32, 64)
    for module, lora in ((attn, attn.qkv), (mlp, mlp.fc1)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            train = module(x)
            train.float().sum().backward()
            with torch.no_grad():
                infer = module(x)
        assert lora.a.grad is not None and lora.a.grad.abs().sum() > 0
        assert _rel(train, infer) < 1e-2


@needs_amx
def test_second_derivatives_and_forward_ad_through_the_bf16_training_routes(monkeypatch):
    """backward(create_graph=True) (a gradient penalty) and forward-mode AD work through the AMX routes as
    through the plain layers (those routes recompute with PyTorch's ops, or step aside)."""
    torch.manual_seed(4)
    modules = [layers.Linear(64, 96), layers.Mlp(64, 128), layers.Attention(64, 2)]
    x = torch.randn(2, 32, 64)

    def penalty(module):
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xr).float().square().sum()
        (g,) = torch.autograd.grad(out, xr, create_graph=True)
        return torch.autograd.grad(g.square().sum(), list(module.parameters()))

    def tangent(module):
        import torch.autograd.forward_ad as fwad

        with fwad.dual_level(), torch.autocast("cpu", dtype=torch.bfloat16):
            return fwad.unpack_dual(module(fwad.make_dual(x, torch.ones_like(x)))).tangent

    results = [(penalty(m), tangent(m)) for m in modules]
    monkeypatch.setattr(cpu_kernels, "amx_attention_available", lambda: False)  # the plain layers
    for m, (grads, tan) in zip(modules, results):
        ref_grads, ref_tan = penalty(m), tangent(m)
        for a, b in zip(grads, ref_grads):
            assert _rel(a, b) < 5e-2
        assert _rel(tan, ref_tan) < 2e-2


@needs_amx
def test_fused_bias_gradients_are_the_same_every_run_with_more_threads():
    """Per-thread partial sums are added in thread order, so the result does not depend on which thread
    finishes first (it did with 3 or more threads)."""
    g = torch.Generator().manual_seed(7)
    x, grad = torch.randn(512, 1536, generator=g).bfloat16(), torch.randn(512, 1536, generator=g).bfloat16()
    qkv = torch.randn(8, 64, 3, 2, 64, generator=g).bfloat16()
    dout = torch.randn(8, 64, 2, 64, generator=g).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        gelu = {cpu_kernels.gelu_tanh_backward_with_bias(grad, x)[1].numpy().tobytes() for _ in range(20)}
        out, p = cpu_kernels.attention_amx_forward(qkv, keep=True)
        attn = {
            cpu_kernels.attention_amx_backward(qkv, out, p, dout, bias_grad=True)[1].numpy().tobytes()
            for _ in range(20)
        }
    finally:
        torch.set_num_threads(threads)
    assert len(gelu) == 1 and len(attn) == 1


@needs_kernels
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("branch_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 40, 7])  # whole vectors, a masked tail, less than one vector
def test_gated_residual_norm_modulate_is_the_two_kernels_in_turn(out_dtype, branch_dtype, d):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, d, generator=g) * 2 + 1
    gate, shift, scale = (torch.randn(3, d, generator=g) * 0.5 for _ in range(3))
    branch = torch.randn(3, 5, d, generator=g).to(branch_dtype)
    with torch.no_grad():
        h, x_new = cpu_kernels.gated_residual_norm_modulate(x, gate, branch, shift, scale, 1e-6, out_dtype)
        ref_x = cpu_kernels.gated_residual(x, gate, branch)
        ref_h = cpu_kernels.norm_modulate(ref_x, shift, scale, 1e-6, out_dtype)
    assert x_new.dtype == torch.float32 and h.dtype == out_dtype
    torch.testing.assert_close(x_new, ref_x, rtol=0, atol=0)  # the same fused multiply-add
    torch.testing.assert_close(h, ref_h, rtol=0, atol=0)  # the same row code on the same values
    exact = F.layer_norm(ref_x.double(), (d,), eps=1e-6) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    assert _rel(h, exact) < (1e-6 if out_dtype == torch.float32 else 4e-3)


@needs_kernels
def test_gated_residual_norm_modulate_leaves_training_to_the_kernels_with_a_backward():
    x = torch.randn(2, 4, 32, requires_grad=True)
    v = torch.randn(2, 32)
    assert cpu_kernels.gated_residual_norm_modulate(x, v, torch.randn(2, 4, 32), v, v, 1e-6, torch.float32) is None
    h, x_new = layers.gated_residual_norm_modulate(x, v, torch.randn(2, 4, 32), v, v)  # the two kernels
    torch.autograd.grad((h.square().sum() + x_new.sum()), x)  # and a gradient through both
    with torch.no_grad():
        assert (
            cpu_kernels.gated_residual_norm_modulate(x, v, torch.randn(2, 4, 32), v, v, 1e-6, torch.float32) is not None
        )


@needs_kernels
@pytest.mark.parametrize("head", ["linear", "deconv"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dit_inference_chains_each_residual_with_the_next_norm(monkeypatch, head, precision):
    from ditkit.config import ModelConfig
    from ditkit.models.dit import DiT

    model = DiT(
        ModelConfig(
            input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10,
            unpatchify=head,
        )
    ).eval()  # fmt: skip
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 2])
    calls = []
    fused = cpu_kernels.gated_residual_norm_modulate
    monkeypatch.setattr(cpu_kernels, "gated_residual_norm_modulate", lambda *a: calls.append(1) or fused(*a))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), amp:
        out = model(x, t, y)
        # both residuals of every block, the last one's with the final layer's norm
        assert len(calls) == 2 * 3
        order = []  # submodules run in the block-by-block order in the chain too
        inner = [
            getattr(block, name).register_forward_hook(lambda *a, name=f"{name}{i}": order.append(name))
            for i, block in enumerate(model.blocks)
            for name in ("adaLN_modulation", "attn", "mlp")
        ]
        model(x, t, y)
        chained, order[:] = list(order), []
        hook = model.blocks[1].register_forward_hook(lambda *a: None)  # a hook must see each block run
        calls.clear()
        torch.testing.assert_close(out, model(x, t, y), rtol=0, atol=0)  # the same values block by block
        assert len(calls) == 3  # once per block, the attention's residual with the MLP's norm
        assert chained == order == [f"{name}{i}" for i in range(3) for name in ("adaLN_modulation", "attn", "mlp")]
        hook.remove()
        for h in inner:
            h.remove()
        calls.clear()
        model.blocks[2]._compiled_call_impl = model.blocks[2].forward  # as Module.compile sets: the chain steps aside
        model(x, t, y)
        assert len(calls) == 3
        model.blocks[2]._compiled_call_impl = None
        calls.clear()
        with torch.enable_grad():  # training runs block by block (and checkpoints blocks where asked)
            model(x, t, y)
        assert len(calls) == 3
        monkeypatch.setattr(cpu_kernels, "gated_residual_norm_modulate", lambda *a: None)  # the two kernels instead
        torch.testing.assert_close(out, model(x, t, y), rtol=0, atol=0)
