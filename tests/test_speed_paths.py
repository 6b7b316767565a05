"""The fast paths of the DiT block give the plain path's numbers: exactly in fp32, within bf16 rounding under autocast.

Covers the CPU reduced-precision softmax, LayerNorm + adaLN modulation in the matmul dtype, the one-pass
gated residual and the fused linear + GELU used for bf16 inference (`docs/speed.md` has the timings).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import off_identity_init_
from ditkit.config import ModelConfig
from ditkit.models import cpu_kernels
from ditkit.models.dit import DiT
from ditkit.models.layers import (
    Linear,
    Mlp,
    _onednn_bf16,
    _onednn_bf16_inference,
    _onednn_fp32,
    attention,
    gated_residual,
    modulate,
    norm_modulate,
    norm_modulate_residual,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _live_dit(**fields) -> DiT:
    """A 2-block DiT on 4x8x8 inputs, weights moved off adaLN-Zero's zero init so every layer does work."""
    settings = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    model = DiT(ModelConfig(**{**settings, **fields}))
    off_identity_init_(model)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_reduced_precision_attention_equals_rounded_fp32_softmax(dtype):
    """bf16 takes the in-dtype softmax (bitwise the same), fp16 the fp32 one (its kernel differs by an ulp)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g).to(dtype) for _ in range(3))
    scores = (q * 16**-0.5) @ k.transpose(-2, -1)
    reference = scores.float().softmax(dim=-1).to(dtype) @ v  # the fp32 softmax, rounded once
    torch.testing.assert_close(attention(q, k, v, "math"), reference, rtol=0, atol=0)


def test_norm_modulate_without_autocast_is_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 24, generator=g)
    shift, scale = torch.randn(3, 24, generator=g), torch.randn(3, 24, generator=g)
    expected = F.layer_norm(x, (24,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    out = norm_modulate(x, shift, scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    gate, branch = torch.randn(3, 24, generator=g), torch.randn(3, 10, 24, generator=g)
    torch.testing.assert_close(gated_residual(x, gate, branch), x + gate[:, None] * branch)


def test_norm_modulate_under_bf16_autocast_matches_fp32_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 64, generator=g, requires_grad=True)
    shift = (0.5 * torch.randn(4, 64, generator=g)).requires_grad_()
    scale = (0.5 * torch.randn(4, 64, generator=g)).requires_grad_()
    weights = torch.randn(4, 32, 64, generator=g)
    ref = norm_modulate(x, shift, scale)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (x, shift, scale))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm_modulate(x, shift, scale)
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2  # bf16 rounding of the input and output (2^-8 relative each)
    grads = torch.autograd.grad((out.float() * weights).sum(), (x, shift, scale))
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float32
        assert _rel(grad, ref_grad) < 2e-2


@pytest.mark.skipif(cpu_kernels.load_library() is None, reason="ditkit's CPU kernels are not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reaches", ["both", "residual", "branch"])
def test_norm_modulate_residual_adds_the_residual_gradient_in_the_kernel(dtype, reaches):
    torch.manual_seed(0)
    x, shift, scale = torch.randn(2, 5, 64), torch.randn(2, 64) * 0.3, torch.randn(2, 64) * 0.3
    weights = torch.randn(2, 5, 64)

    def run(fused: bool):
        leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if fused:
                h, skip = norm_modulate_residual(*leaves)
            else:
                h, skip = norm_modulate(*leaves), leaves[0]
        loss = {"both": skip + h.float() * weights, "residual": skip * weights, "branch": h.float() * weights}[reaches]
        grads = torch.autograd.grad(loss.square().sum(), leaves, allow_unused=True)
        return h, skip, grads, (h.grad_fn, skip.grad_fn)

    h, skip, grads, nodes = run(fused=True)
    ref_h, ref_skip, ref_grads, _ = run(fused=False)
    assert type(nodes[0]) is type(nodes[1]) and "NormModulate" in type(nodes[0]).__name__  # one node for both
    assert torch.equal(h, ref_h) and torch.equal(skip, ref_skip)
    for grad, ref in zip(grads, ref_grads):
        if ref is None:  # through the residual alone: zeros for shift and scale (autograd materialises h's)
            assert grad is None or not grad.any()
        else:
            assert grad is not None and grad.dtype == ref.dtype
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)  # the same sum, fused (FMA rounding)


@pytest.mark.skipif(not _onednn_bf16(), reason="this CPU/PyTorch has no oneDNN bf16 linear-pointwise kernel")
@pytest.mark.parametrize("act", ["gelu_tanh", "gelu"])
def test_fused_linear_gelu_inference_is_as_accurate_as_eager(act):
    torch.manual_seed(0)
    mlp = Mlp(64, 256, act)
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        exact = mlp(x)  # fp32, unfused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = mlp(x)
            assert mlp._fused_fc1(x) is not None  # the fused kernel really ran
            eager = mlp.fc2(mlp.act(mlp.fc1(x)))
    assert fused.dtype == eager.dtype == torch.bfloat16
    # No bf16 rounding of the pre-activation: at least as close to fp32 as the eager bf16 pair.
    assert _rel(fused, exact) <= 1.2 * _rel(eager, exact) + 1e-4
    assert _rel(fused, exact) < 1e-2


@pytest.mark.skipif(not _onednn_bf16_inference(), reason="bf16 inference takes oneDNN's matmul on AMX CPUs only")
@pytest.mark.skipif(cpu_kernels.load_library() is None, reason="ditkit's CPU kernels are not built here")
def test_bf16_inference_on_amx_runs_the_gelu_kernel_after_the_matmul(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(64, 256)
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        exact = mlp(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            post_op = torch.ops.mkldnn._linear_pointwise(  # oneDNN's GELU post-op, the route it replaces
                x.bfloat16(), mlp.fc1.weight.bfloat16(), mlp.fc1.bias.bfloat16(), "gelu", [], "tanh"
            )
            post_op = mlp.fc2(post_op)
            real, attrs = torch.ops.mkldnn._linear_pointwise, []
            monkeypatch.setattr(
                torch.ops.mkldnn, "_linear_pointwise", lambda *args: attrs.append(args[3]) or real(*args), raising=False
            )
            kernels = []
            gelu = cpu_kernels.gelu_tanh
            monkeypatch.setattr(cpu_kernels, "gelu_tanh", lambda h: kernels.append(h.shape) or gelu(h))
            out = mlp(x)
    assert attrs[0] == "none" and kernels == [(2, 50, 256)]  # the plain matmul, then the kernel
    assert out.dtype == torch.bfloat16
    assert _rel(out, exact) < 1e-2 and _rel(out, post_op) < 1e-2  # bf16 rounding of the pre-activation


def test_mlp_keeps_the_unfused_path_when_training():
    torch.manual_seed(0)
    mlp = Mlp(32, 64)
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mlp._fused_fc1(x) is None  # backward needs fc1's pre-activation
        out = mlp(x)
    out.float().sum().backward()
    assert mlp.fc1.weight.grad is not None and torch.isfinite(mlp.fc1.weight.grad).all()


@pytest.mark.parametrize("frozen", ["all", "fc1"])
def test_input_gradients_of_a_frozen_model_take_the_unfused_mlp(frozen):
    """Frozen weights, grad enabled, d(out)/dx wanted (guidance, inversion): the fused oneDNN op has no
    autograd formula, so taking it there gave gradients 10% off without an error."""
    torch.manual_seed(0)
    model = _live_dit(learn_sigma=False).eval()
    x0, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    x = x0.clone().requires_grad_()
    model(x, t, y).square().sum().backward()
    expected = x.grad
    if frozen == "all":
        model.requires_grad_(False)
    else:  # only the MLPs' fc1 frozen: earlier layers still train, so the input to fc1 needs a gradient
        for block in model.blocks:
            block.mlp.fc1.requires_grad_(False)
    x = x0.clone().requires_grad_()
    model(x, t, y).square().sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_dit_bf16_training_gradients_follow_fp32():
    """The whole model under autocast: loss gradients point where the fp32 ones do."""
    torch.manual_seed(0)
    model = _live_dit(learn_sigma=False)
    x, t, y = torch.randn(6, 4, 8, 8), torch.rand(6) * 999, torch.randint(0, 10, (6,))
    target = torch.randn(6, 4, 8, 8)

    def grads(autocast: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = ((model(x, t, y).float() - target) ** 2).mean()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    ref, bf16 = grads(False), grads(True)
    assert F.cosine_similarity(ref, bf16, dim=0) > 0.999
    assert _rel(bf16, ref) < 3e-2


@pytest.mark.skipif(not _onednn_fp32(), reason="this PyTorch has no oneDNN linear-pointwise kernel")
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_fp32_linear_matches_f_linear_forward_and_backward(monkeypatch, bias):
    from ditkit.models import layers

    monkeypatch.setattr(layers, "_onednn_fp32_linear", lambda: True)  # the route taken on non-Intel CPUs
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=bias)
    x = torch.randn(3, 17, 48, requires_grad=True)
    out = layer(x)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *layer.parameters()])
    ref = F.linear(x, layer.weight, layer.bias)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x, *layer.parameters()])
    assert out.grad_fn is not None and "OneDNN" in type(out.grad_fn).__name__  # the fast route really ran
    assert _rel(out, ref) < 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert _rel(grad, ref_grad) < 1e-5
    # a second derivative (a gradient penalty) reaches the weights through the oneDNN node's backward too
    penalties = []
    for forward in (layer, lambda x: F.linear(x, layer.weight, layer.bias)):
        (g,) = torch.autograd.grad(forward(x).pow(3).sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(g.square().sum(), list(layer.parameters())))
    for second, ref_second in zip(*penalties):
        assert _rel(second, ref_second) < 1e-5
    # oneDNN has no empty-batch primitive (its backward failed): F.linear takes an empty batch
    x = torch.randn(0, 17, 48, requires_grad=True)
    empty = layer(x)
    empty.sum().backward()
    assert empty.shape == (0, 17, 80) and x.grad.shape == x.shape and "OneDNN" not in type(empty.grad_fn).__name__


@pytest.mark.parametrize(
    ("env", "vendor", "expected"),
    [
        (None, "GenuineIntel", False),  # MKL is the faster fp32 GEMM on Intel's CPUs
        (None, "AuthenticAMD", True),  # ... and about half oneDNN's rate on AMD's
        ("auto", "", True),
        ("blas", "AuthenticAMD", False),
        ("onednn", "GenuineIntel", True),
        (" OneDNN ", "GenuineIntel", True),
    ],
)
def test_fp32_linear_route_follows_the_cpu_vendor_and_the_override(monkeypatch, env, vendor, expected):
    from ditkit.models import layers

    if env is None:
        monkeypatch.delenv(layers.FP32_LINEAR_ENV, raising=False)
    else:
        monkeypatch.setenv(layers.FP32_LINEAR_ENV, env)
    monkeypatch.setattr(layers, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(layers, "_onednn_fp32", lambda: True)
    layers._onednn_fp32_linear.cache_clear()
    try:
        assert layers._onednn_fp32_linear() is expected
        monkeypatch.setattr(layers, "_onednn_fp32", lambda: False)  # no oneDNN op: never, whatever was asked
        layers._onednn_fp32_linear.cache_clear()
        assert layers._onednn_fp32_linear() is False
    finally:
        monkeypatch.undo()
        layers._onednn_fp32_linear.cache_clear()


def test_fp32_linear_override_rejects_unknown_values(monkeypatch):
    from ditkit.models import layers

    monkeypatch.setenv(layers.FP32_LINEAR_ENV, "mkl")
    layers._onednn_fp32_linear.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"DITKIT_CPU_FP32_LINEAR='mkl'.*'auto', 'onednn' or 'blas'"):
            layers._onednn_fp32_linear()
    finally:
        monkeypatch.undo()
        layers._onednn_fp32_linear.cache_clear()


def test_cpu_paths_name_the_route_of_each_choice(monkeypatch):
    from ditkit.models import layers

    monkeypatch.setattr(layers, "_cpu_has_amx", lambda: True)
    monkeypatch.setattr(layers, "_onednn_bf16_inference", lambda: True)
    monkeypatch.setattr(layers, "_onednn_fp32_linear", lambda: False)
    monkeypatch.setattr(layers.cpu_kernels, "amx_attention_available", lambda: True)
    paths = layers.cpu_paths()
    assert paths["amx"] is True and paths["fp32_linear"] == "blas"
    fp32_kernel = layers.cpu_kernels.fp32_attention_available(torch.zeros(1))
    assert paths["fp32_inference_attention"] == ("kernel" if fp32_kernel else "sdpa")
    assert paths["bf16_inference_linear"] == "onednn"
    assert paths["bf16_inference_attention"] == paths["bf16_training_attention"] == "amx-kernel"
    assert paths["bf16_inference_gelu"] == ("kernel" if layers.cpu_kernels.load_library() else "onednn-post-op")
    monkeypatch.setattr(layers.cpu_kernels, "amx_attention_available", lambda: False)  # e.g. kernels off
    paths = layers.cpu_paths()
    assert (paths["bf16_inference_attention"], paths["bf16_training_attention"]) == ("sdpa", "math")
    monkeypatch.setattr(layers, "_cpu_has_amx", lambda: False)
    monkeypatch.setattr(layers, "_onednn_bf16_inference", lambda: False)
    monkeypatch.setattr(layers, "_onednn_fp32_linear", lambda: True)
    paths = layers.cpu_paths()
    assert (paths["fp32_linear"], paths["bf16_inference_linear"], paths["bf16_inference_attention"]) == (
        "onednn",
        "aten",
        "math",
    )
    assert paths["bf16_training_attention"] == "math"


@pytest.mark.parametrize(
    ("processor", "expected"),
    [
        ("Intel64 Family 6 Model 143 Stepping 8, GenuineIntel", "GenuineIntel"),
        ("AMD64 Family 25, AuthenticAMD", "AuthenticAMD"),
        ("", ""),
    ],
)
def test_cpu_vendor_falls_back_to_the_processor_name_without_proc(monkeypatch, processor, expected):
    from ditkit.models import layers

    monkeypatch.setattr(layers, "_cpu_info_field", lambda name: "")  # no /proc/cpuinfo (Windows, macOS)
    monkeypatch.setattr(layers.platform, "processor", lambda: processor)
    layers._cpu_vendor.cache_clear()
    try:
        assert layers._cpu_vendor() == expected
    finally:
        monkeypatch.undo()
        layers._cpu_vendor.cache_clear()


def test_cpu_vendor_reads_proc_cpuinfo():
    from ditkit.models import layers

    vendor = layers._cpu_vendor()
    assert isinstance(vendor, str)
    try:
        with open("/proc/cpuinfo") as f:
            expected = next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        expected = ""
    assert vendor == expected


@pytest.mark.skipif(not _onednn_bf16(), reason="this CPU/PyTorch has no oneDNN bf16 linear-pointwise kernel")
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_inference_linear_through_onednn_matches_f_linear(monkeypatch, bias):
    """The AMX inference route (bias fused into oneDNN's matmul) gives autocast's F.linear numbers within
    bf16 rounding, and steps aside wherever autograd records a graph."""
    from ditkit.models import layers

    monkeypatch.setattr(layers, "_onednn_bf16_inference", lambda: True)
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=bias)
    x = torch.randn(3, 20, 64)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(args[0].shape) or real(*args), raising=False
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = layer(x)
            reference = F.linear(x, layer.weight, layer.bias)
        assert calls == [x.shape]  # the oneDNN route really ran, once
        assert fast.dtype == reference.dtype == torch.bfloat16
        assert _rel(fast, reference) < 8e-3  # bf16 rounding of the output (2^-8 relative)
        # grad enabled, weights train: the AMX training node, whose forward is the same oneDNN product (with
        # ditkit's kernels on an AMX CPU), else autocast's F.linear and its backward
        trained = layer(x)
        amx_training = "Bf16TrainingLinear" in type(trained.grad_fn).__name__
        assert calls == [x.shape] * (1 + amx_training) and trained.requires_grad
        del calls[1:]
        with torch.no_grad():
            assert layer(x[:0]).shape == (0, 20, 96) and len(calls) == 1  # oneDNN has no empty-batch primitive
            with pytest.raises(RuntimeError):  # autocast leaves fp64 alone: F.linear's dtype error, kept
                layer(x.double())
            assert len(calls) == 1
    with torch.no_grad():
        assert layer(x).dtype == torch.float32  # fp32 without autocast: not this route
        with pytest.raises(RuntimeError):  # bf16 input, fp32 weights, no autocast: F.linear's error, kept
            layer(x.bfloat16())
        bf16_layer = Linear(64, 96, bias=bias).bfloat16()  # a bf16 model without autocast takes the route
        assert bf16_layer(x.bfloat16()).dtype == torch.bfloat16
    assert len(calls) == 2 or layers._onednn_fp32_linear()


@pytest.mark.parametrize("amx", [False, True])
def test_cpu_bf16_attention_takes_sdpa_for_inference_on_amx_only(monkeypatch, amx):
    """'auto' on CPU in bf16: PyTorch's fused kernel for inference on AMX CPUs, the matmul form for training
    (and everywhere without AMX); both give the same attention within bf16 rounding."""
    from ditkit.models import layers

    monkeypatch.setattr(layers, "_cpu_has_amx", lambda: amx)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g).bfloat16() for _ in range(3))
    mask = torch.rand(2, 40, generator=g) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        out = attention(q, k, v, "auto", mask)
    assert len(calls) == (1 if amx else 0)
    reference = attention(q.float(), k.float(), v.float(), "math", mask)
    assert _rel(out, reference) < 1e-2
    q.requires_grad_()
    attention(q, k, v, "auto", mask)  # training: the matmul form, whose backward is the faster one here
    assert len(calls) == (1 if amx else 0)
    assert attention(q.half(), k.half(), v.half(), "auto").dtype == torch.float16 and len(calls) == (1 if amx else 0)


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "cross-attn", "in-context"])
def test_dit_fp32_fast_paths_match_the_plain_path(monkeypatch, block_type):
    """Training gradients and inference outputs with every fp32 fast path on vs all of them off (the oneDNN
    linears and the compiled CPU kernels for the GELU, norm + modulation and gated residual)."""
    from ditkit.models import layers

    torch.manual_seed(0)
    model = _live_dit(block_type=block_type)
    x, t, y = torch.randn(5, 4, 8, 8), torch.rand(5) * 999, torch.randint(0, 10, (5,))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x, t, y, generator=torch.Generator().manual_seed(0)).pow(2).mean().backward()  # same label dropout
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad():
            return model.eval()(x, t, y), grads

    monkeypatch.setattr(layers, "_onednn_fp32_linear", lambda: layers._onednn_fp32())  # the oneDNN linears
    fast_out, fast_grads = run()
    model.train()
    monkeypatch.setattr(layers, "_onednn_fp32", lambda: False)
    monkeypatch.setattr(layers, "_onednn_fp32_linear", lambda: False)
    monkeypatch.setattr(layers.cpu_kernels, "load_library", lambda: None)  # the compiled CPU kernels off too
    plain_out, plain_grads = run()
    assert _rel(fast_out, plain_out) < 1e-5 and _rel(fast_grads, plain_grads) < 1e-5


@pytest.mark.skipif(not _onednn_fp32(), reason="this PyTorch has no oneDNN linear-pointwise kernel")
def test_flop_counter_counts_the_onednn_paths_like_f_linear(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from ditkit.models import layers

    monkeypatch.setattr(layers, "_onednn_fp32_linear", lambda: True)

    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x = torch.randn(2, 5, 16, requires_grad=True)

    def flops(fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    fast = flops(lambda: mlp(x).sum().backward())  # oneDNN forward and backward
    plain = flops(lambda: mlp.fc2(mlp.act(F.linear(x, mlp.fc1.weight, mlp.fc1.bias))).sum().backward())
    assert fast == plain == 3 * 2 * 10 * (16 * 64 + 64 * 16)  # forward + two backward products per linear
    with torch.no_grad():  # inference fuses fc1 with its GELU: still counted
        assert flops(lambda: mlp(x)) == 2 * 10 * (16 * 64 + 64 * 16)


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "cross-attn", "in-context"])
def test_residual_stream_is_contiguous_in_every_block(block_type):
    """Patch tokens come out of the embedding contiguous, so no block inherits a transposed layout that
    every LayerNorm and matmul (and their backward) would copy back."""
    model = _live_dit(block_type=block_type)
    layouts = []
    for block in model.blocks:
        block.register_forward_hook(
            lambda mod, args, out: layouts.append((args[0].is_contiguous(), out.is_contiguous()))
        )
    model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 3]))
    assert layouts == [(True, True)] * model.config.depth


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_over_batch_slices_is_bitwise_the_whole_batch(monkeypatch, dtype, masked):
    """The cache-sized slices give the whole-batch numbers exactly, values and gradients, masks included."""
    import ditkit.models.layers as layers

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, 12, 8, generator=g).to(dtype).requires_grad_() for _ in range(3))
    mask = torch.rand(7, 12, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[:, 0] = True  # every row attends somewhere

    def run(budget: int):
        monkeypatch.setattr(layers, "_CPU_SCORES_BYTES", budget)
        out = attention(q, k, v, "math", mask)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        return out, grads

    per_sample = 2 * 12 * 12 * q.element_size()
    whole, whole_grads = run(2**40)
    sliced, sliced_grads = run(3 * per_sample)  # slices of 3, 3 and 1 samples
    assert torch.equal(sliced, whole)
    for a, b in zip(sliced_grads, whole_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "cross-attn", "in-context"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_dit_forward_traces_as_one_graph(block_type, training, bf16):
    """torch.compile sees the whole forward as one graph, in training and in inference, fp32 and bf16.

    The fast paths' capability checks are not traceable; one ran before the compile check in the fused
    fc1 + GELU, so every block of an inference forward became its own graph, recompiled per block until
    Dynamo's recompile limit left the deeper blocks eager (found on a compiled DiT-S/2 sampling run).
    """
    torch._dynamo.reset()
    model = _live_dit(block_type=block_type).train(training)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 3])
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with amp, torch.set_grad_enabled(training):
        explained = torch._dynamo.explain(model)(x, t, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_reuse_cast_weights_casts_once_and_sees_in_place_updates(monkeypatch):
    """Inside `reuse_cast_weights` the inference route's bf16 copies are made once per layer and reused
    while the parameters are unchanged; an in-place update (as an optimizer or EMA makes) is seen at once,
    and nothing is kept outside the context or when autograd records a graph."""
    from ditkit.models import layers

    monkeypatch.setattr(layers, "_onednn_bf16_inference", lambda: True)
    torch.manual_seed(0)
    layer = Linear(32, 48)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        outside = layer(x)
        with layers.reuse_cast_weights():
            layer(x)
            assert layer in layers._cast_cache.entries  # the layer's forward filled the cache
            first = layers.cast_parameters(layer, torch.bfloat16)
            assert layers.cast_parameters(layer, torch.bfloat16)[0] is first[0]  # reused, not re-cast
            torch.testing.assert_close(layer(x), outside, rtol=0, atol=0)  # the same numbers
            layer.weight.mul_(2)  # an in-place update bumps the version counter: a fresh copy
            second = layers.cast_parameters(layer, torch.bfloat16)
            assert second[0] is not first[0] and torch.equal(second[0], layer.weight.bfloat16())
            doubled = layer(x)
        assert layers._cast_cache.entries is None  # freed at exit
        assert layers.cast_parameters(layer, torch.bfloat16)[0] is not layers.cast_parameters(layer, torch.bfloat16)[0]
    expected = 2 * outside.float() - layer.bias.bfloat16().float()  # x (2W)^T + b
    torch.testing.assert_close(doubled.float(), expected, atol=0.1, rtol=0.02)
    with layers.reuse_cast_weights(), torch.autocast("cpu", dtype=torch.bfloat16):  # grad on: never cached
        a, b = layers.cast_parameters(layer, torch.bfloat16), layers.cast_parameters(layer, torch.bfloat16)
        assert a[0] is not b[0] and a[0].requires_grad


@pytest.mark.parametrize("bf16", [False, True])
def test_dit_second_derivatives_through_the_cpu_kernels_match_pytorchs_ops(monkeypatch, bf16):
    """A gradient penalty (backward with create_graph) through the whole DiT with ditkit's CPU kernels (norm +
    modulation, gated residual, GELU; in bf16 on AMX also the attention kernel and the training routes) gives
    the plain PyTorch ops' numbers: each kernel's backward recomputes in differentiable ops under create_graph."""
    from ditkit.models import layers

    torch.manual_seed(0)
    # head size 32: the AMX attention kernel's too. fp32 attention on CPU would be PyTorch's fused kernel,
    # which has no second derivative of its own; the matmul form isolates ditkit's kernels there.
    model = _live_dit(num_heads=2, attn_impl="auto" if bf16 else "math")
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3) * 999, torch.randint(0, 10, (3,))

    def penalty() -> torch.Tensor:
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(xr, t, y, generator=torch.Generator().manual_seed(0)).float().square().mean()
        (g,) = torch.autograd.grad(out, xr, create_graph=True)
        grads = torch.autograd.grad(g.square().sum(), [p for p in model.parameters() if p.requires_grad])
        return torch.cat([gr.flatten() for gr in grads])

    fast = penalty()
    monkeypatch.setattr(layers.cpu_kernels, "load_library", lambda: None)  # PyTorch's ops throughout
    plain = penalty()
    assert _rel(fast, plain) < (5e-2 if bf16 else 1e-4)
