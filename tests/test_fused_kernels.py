"""The fused GPU kernels (`ditkit.models.fused`): same math as the plain ops, forward and backward.

They run wherever Triton imports: on a CUDA GPU natively, and on CPU through Triton's interpreter
(`make test-kernels` installs Triton beside the test environment for that). Without Triton they skip,
except the tests of the fallbacks, which run everywhere. The cuBLASLt GELU epilogue needs a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ditkit.config import ModelConfig
from ditkit.models import fused
from ditkit.models.dit import DiT
from ditkit.models.layers import Mlp, gated_residual, modulate, norm_modulate

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def plain_ops_on_cpu(monkeypatch):
    """The plain route these kernels are compared with is PyTorch's ops: ditkit's compiled CPU kernels
    (`models.cpu_kernels`, tested in test_cpu_kernels.py) would otherwise take it on CPU."""
    from ditkit.models import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "load_library", lambda: None)


@pytest.fixture
def kernels():
    """The Triton kernel module, interpreted on CPU when there is no GPU; skips where Triton is missing.

    Triton's interpreter must be chosen before Triton is imported (PyTorch imports it when present), so
    on CPU these tests run only in a process started with TRITON_INTERPRET=1, as `make test-kernels` does.
    """
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU: the kernels run on CPU only under TRITON_INTERPRET=1 (make test-kernels)")
    module = fused._kernels()
    if module is None:
        pytest.skip("Triton is not installed (make test-kernels installs it for the interpreter)")
    saved = dict(fused._state)
    fused._state.update(interpret_on_cpu=not CUDA, min_elements=0)  # small tensors, too
    yield module
    fused._state.update(saved)


def _adaln(n: int, d: int, dtype: torch.dtype, chunks: int = 6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An adaLN projection output (N, chunks*D) and its (N, D) chunks: views with row stride chunks*D."""
    ada = (torch.randn(n, chunks * d, device=DEVICE) * 0.5).to(dtype).requires_grad_()
    return ada, list(ada.chunk(chunks, dim=1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# T = 37 leaves a partial tile of rows in the backward kernels; D = 48 is not a power of two.
@pytest.mark.parametrize("n,t,d", [(3, 37, 48), (2, 16, 64)])
def test_norm_modulate_fp32_matches_float64_forward_and_backward(kernels, n, t, d):
    torch.manual_seed(0)
    x = (torch.randn(n, t, d, device=DEVICE) * 3 + 1).requires_grad_()
    ada, (shift, scale, *_) = _adaln(n, d, torch.float32)
    y = fused.norm_modulate(x, shift, scale, 1e-6, torch.float32)
    assert y is not None and y.dtype == torch.float32
    ref = modulate(F.layer_norm(x.double(), (d,), eps=1e-6), shift.double(), scale.double())
    assert _rel(y, ref) < 1e-5
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, ada), dy)
    want = torch.autograd.grad(ref, (x, ada), dy.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and _rel(g, w) < 1e-5


def test_norm_modulate_takes_shift_and_scale_with_different_row_strides(kernels):
    """A contiguous (N, D) shift beside a scale that is a chunk of a wider projection: each is read with
    its own row stride."""
    torch.manual_seed(5)
    n, t, d = 3, 7, 16
    x = torch.randn(n, t, d, device=DEVICE, requires_grad=True)
    shift = torch.randn(n, d, device=DEVICE, requires_grad=True)
    ada, (_, scale, *_) = _adaln(n, d, torch.float32)
    assert shift.stride(0) != scale.stride(0)
    y = fused.norm_modulate(x, shift, scale, 1e-6, torch.float32)
    ref = modulate(F.layer_norm(x.double(), (d,), eps=1e-6), shift.double(), scale.double())
    assert _rel(y, ref) < 1e-5
    dy = torch.randn_like(y)
    for g, w in zip(
        torch.autograd.grad(y, (x, shift, ada), dy), torch.autograd.grad(ref, (x, shift, ada), dy.double())
    ):
        assert _rel(g, w) < 1e-5


@pytest.mark.parametrize("low,eps", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_norm_modulate_in_autocast_is_at_least_as_accurate_as_the_plain_route(kernels, low, eps):
    """Under autocast the fused kernel normalises the fp32 stream and rounds once; the plain route rounds
    the stream to bf16 (fp16) first. Against float64, the fused output must not be the worse of the two."""
    torch.manual_seed(1)
    n, t, d = 2, 40, 96
    x = (torch.randn(n, t, d, device=DEVICE) * 4).requires_grad_()
    ada, (shift, scale, *_) = _adaln(n, d, low)
    y = fused.norm_modulate(x, shift, scale, 1e-6, low)
    assert y.dtype == low
    with fused.use_fused_kernels(False), torch.autocast(DEVICE, dtype=low):
        plain = norm_modulate(x, shift, scale)
    ref = modulate(F.layer_norm(x.double(), (d,), eps=1e-6), shift.double(), scale.double())
    fused_err, plain_err = (y.double() - ref).abs().max(), (plain.double() - ref).abs().max()
    assert fused_err <= plain_err and _rel(y, ref) < eps
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, ada), dy)
    want = torch.autograd.grad(ref, (x, ada), dy.double())
    assert got[0].dtype == torch.float32 and _rel(got[0], want[0]) < 1e-5  # fp32 stream, fp32 statistics
    assert got[1].dtype == low and _rel(got[1], want[1]) < eps  # rounded to the chunks' dtype


# (gate dtype, branch dtype); an fp32 gate with a bf16 branch is rounded to bf16 first, as addcmul's is.
@pytest.mark.parametrize(
    "gate_dtype,dtype", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float32, torch.bfloat16)]
)
def test_gated_residual_matches_addcmul_forward_and_backward(kernels, gate_dtype, dtype):
    torch.manual_seed(2)
    n, t, d = 3, 37, 48
    x = torch.randn(n, t, d, device=DEVICE, requires_grad=True)
    ada, chunks = _adaln(n, d, gate_dtype)
    gate = chunks[2]
    branch = torch.randn(n, t, d, device=DEVICE).to(dtype).requires_grad_()
    out = fused.gated_residual(x, gate, branch)
    plain = torch.addcmul(x, gate.unsqueeze(1).to(branch.dtype), branch)
    assert out.dtype == plain.dtype == torch.float32
    # Triton's interpreter truncates fp32 -> bf16 casts where a GPU rounds to nearest: on CPU an fp32 gate
    # rounded to a bf16 branch's dtype may be one bf16 step off.
    interpreted_rounding = not CUDA and gate_dtype != dtype
    assert _rel(out, plain) < (2**-7 if interpreted_rounding else 1e-6)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, ada, branch), dout)
    want = torch.autograd.grad(plain, (x, ada, branch), dout)
    assert torch.equal(got[0], want[0])  # the stream's gradient passes through
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: the product rounded once, in either order
    tol *= 2 if interpreted_rounding else 1  # and the gate's rounding too
    assert _rel(got[1], want[1]) < tol and _rel(got[2], want[2]) < tol
    assert got[1].dtype == gate.dtype and got[2].dtype == branch.dtype


def test_fused_kernels_are_the_blocks_route_and_a_whole_dit_agrees_with_the_plain_ops(kernels, monkeypatch):
    """A DiT's forward and backward with the kernels equal the plain ops' (fp32, 1e-5 relative), and the
    kernels are what the blocks call (counted)."""
    torch.manual_seed(3)
    config = ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=3, num_classes=5)
    model = DiT(config).to(DEVICE)
    for p in model.parameters():  # off adaLN-Zero's identity start, so every branch counts
        p.data.add_(torch.randn_like(p) * 0.05)
    calls = {"norm": 0, "gate": 0}
    for name, key in (("NormModulate", "norm"), ("GatedResidual", "gate")):
        original = getattr(kernels, name).apply

        def counted(*a, original=original, key=key):
            calls[key] += 1
            return original(*a)

        monkeypatch.setattr(getattr(kernels, name), "apply", counted)
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    t = torch.tensor([3.0, 700.0], device=DEVICE)
    y = torch.tensor([1, 4], device=DEVICE)

    def run():
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    out, grads = run()
    assert calls == {"norm": 2 * config.depth + 1, "gate": 2 * config.depth}
    with fused.use_fused_kernels(False):
        plain_out, plain_grads = run()
    assert calls == {"norm": 2 * config.depth + 1, "gate": 2 * config.depth}  # switched off: not called
    assert _rel(out, plain_out) < 1e-5
    for g, w in zip(grads, plain_grads):
        assert _rel(g, w) < 1e-5


def test_shapes_the_kernels_do_not_take_fall_back_to_the_plain_ops(kernels):
    n, t, d = 2, 5, 8
    x = torch.randn(n, t, d, device=DEVICE)
    shift, scale = torch.randn(n, d, device=DEVICE), torch.randn(n, d, device=DEVICE)
    assert fused.norm_modulate(x, shift, scale, 1e-6, torch.float32) is not None
    sliced = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert fused.norm_modulate(sliced, shift, scale, 1e-6, torch.float32) is None
    assert fused.norm_modulate(x, shift.t().contiguous().t(), scale, 1e-6, torch.float32) is None  # column stride n
    assert fused.norm_modulate(x, shift[:1], scale, 1e-6, torch.float32) is None  # one row for two samples
    assert fused.norm_modulate(x, shift, scale, 1e-6, torch.float64) is None
    assert fused.gated_residual(x, shift, x[:, :1].expand(n, t, d)) is None  # a broadcast branch
    wide = torch.randn(1, 1, kernels.MAX_D + 1, device=DEVICE)
    assert fused.norm_modulate(wide, wide[0], wide[0], 1e-6, torch.float32) is None
    with fused.use_fused_kernels(False):
        assert fused.norm_modulate(x, shift, scale, 1e-6, torch.float32) is None
    # and the layer-level functions give the plain result for those
    assert torch.allclose(norm_modulate(sliced, shift, scale), modulate(F.layer_norm(x, (d,), eps=1e-6), shift, scale))
    assert torch.equal(gated_residual(x, shift, x[:, :1].expand(n, t, d)), torch.addcmul(x, shift[:, None], x[:, :1]))


def test_small_streams_skip_the_kernels_eagerly_but_not_for_a_cuda_graph(kernels, monkeypatch):
    """Below MIN_EAGER_ELEMENTS eager calls take the plain ops (launch-bound there); a graph's warm-up and
    capture (`for_graph_capture`) take the kernels at every size."""
    monkeypatch.setitem(fused._state, "min_elements", 1000)
    small, large = torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 50, 10, device=DEVICE)
    assert fused.norm_modulate(small, small[:, 0], small[:, 1], 1e-6, torch.float32) is None
    assert fused.gated_residual(small, small[:, 0], small) is None
    assert fused.norm_modulate(large, large[:, 0], large[:, 1], 1e-6, torch.float32) is not None
    with fused.for_graph_capture():
        assert fused.norm_modulate(small, small[:, 0], small[:, 1], 1e-6, torch.float32) is not None
        assert fused.gated_residual(small, small[:, 0], small) is not None
    assert fused.norm_modulate(small, small[:, 0], small[:, 1], 1e-6, torch.float32) is None
    assert fused.MIN_EAGER_ELEMENTS == 2**24


def test_nothing_fused_runs_on_cpu_by_default():
    """Without a GPU (and without the tests' interpreter switch) the plain ops run, bitwise as before."""
    x = torch.randn(2, 5, 8)
    shift, scale = torch.randn(2, 8), torch.randn(2, 8)
    assert fused.norm_modulate(x, shift, scale, 1e-6, torch.float32) is None
    assert fused.gated_residual(x, shift, x) is None
    assert fused.linear_gelu_tanh(x, torch.randn(6, 8), torch.randn(6), torch.float32) is None
    assert torch.equal(norm_modulate(x, shift, scale), modulate(F.layer_norm(x, (8,), eps=1e-6), shift, scale))


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mlp_inference_with_the_gelu_epilogue_matches_the_pair(precision):
    torch.manual_seed(4)
    mlp = Mlp(64, 256).cuda()
    x = torch.randn(3, 17, 64, device="cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), amp:
        assert mlp._fused_fc1(x) is not None
        out = mlp(x)
        with fused.use_fused_kernels(False):
            assert mlp._fused_fc1(x) is None
            plain = mlp(x)
    ref = mlp.fc2(F.gelu(mlp.fc1(x.double().float()), approximate="tanh"))  # fp32 reference
    assert _rel(out, ref) < (1e-5 if precision == "fp32" else 2**-6)
    assert _rel(plain, ref) < (1e-5 if precision == "fp32" else 2**-6)
    erf = Mlp(64, 256, act="gelu").cuda()
    with torch.no_grad():
        assert erf._fused_fc1(x) is None  # the epilogue is the tanh GELU only


def test_old_gpus_take_the_plain_ops(monkeypatch):
    """Triton needs compute capability 7.0 (PyTorch's own bar), and 8.0 for bf16: an older GPU keeps the
    plain ops instead of failing to compile at its first forward."""

    class OnGpu:  # stands in for a CUDA tensor on this CPU-only test machine
        is_cuda = True
        device = torch.device("cuda", 0)

    monkeypatch.setattr(fused, "_kernels", lambda: object())  # as if Triton were importable
    for capability, fp32, bf16 in [((6, 1), False, False), ((7, 5), True, False), ((9, 0), True, True)]:
        monkeypatch.setattr(fused, "_capability", lambda device, c=capability: c)
        assert fused._gpu_takes(OnGpu(), torch.float32) is fp32
        assert fused._gpu_takes(OnGpu(), torch.float32, torch.bfloat16) is bf16
        assert fused.fused_kernels_available("cuda") is fp32
    assert fused.fused_kernels_available("cpu") and fused.fused_kernels_available()


def test_kernels_that_cannot_run_here_switch_themselves_off(kernels, monkeypatch):
    """Until a kernel has run once, a failure (Triton finding no C compiler for its launcher, a driver it
    does not support) warns, switches the kernels off, and the plain ops give the result; once one has
    run, errors are real and raised."""
    monkeypatch.setitem(fused._state, "ran", False)

    def broken(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(kernels, "norm_modulate_forward", broken)
    x = torch.randn(2, 5, 8, device=DEVICE)
    shift, scale = torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="fused GPU kernels cannot run here .RuntimeError: Failed to find C"):
        out = norm_modulate(x, shift, scale)
    assert not fused.fused_kernels_enabled()
    torch.testing.assert_close(out, modulate(F.layer_norm(x, (8,), eps=1e-6), shift, scale))
    assert fused.gated_residual(x, shift, x) is None  # off for every kernel now
    monkeypatch.setitem(fused._state, "enabled", True)
    monkeypatch.setitem(fused._state, "ran", True)
    with pytest.raises(RuntimeError, match="Failed to find C compiler"):
        fused.norm_modulate(x, shift, scale, 1e-6, torch.float32)


@pytest.mark.parametrize(
    "value,enabled,min_elements",
    [("0", False, 2**24), ("1", True, 2**24), ("always", True, 0), ("off", True, 2**24)],
)
def test_the_environment_switch(value, enabled, min_elements):
    """DITKIT_FUSED_KERNELS: 0 off, 1 (default) the size rule, always every size; read at import. Any
    other value is named in a warning and taken as the default."""
    import subprocess
    import sys

    code = "from ditkit.models import fused; print(fused._state['enabled'], fused._state['min_elements'])"
    env = {**os.environ, "DITKIT_FUSED_KERNELS": value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(enabled), str(min_elements)]
    assert ("DITKIT_FUSED_KERNELS='off' is not 0, 1 or always" in done.stderr) == (value == "off")
