"""The CUDA paths: CUDA-graph sampling, training in bf16 / fp16 with TF32 and fused AdamW, resume, and a
torchrun job on the GPU (one process: NCCL itself needs two GPUs to be exercised).

The tests marked `cuda` skip without a GPU (CI has none); they were run on an H100. The others (the
wrapper on CPU, the weight-cast copies, the TF32 switch, a refused option) run everywhere.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_config, make_tiny_dataset, off_identity_init_
from ditkit.config import ModelConfig
from ditkit.models import DiT, fused
from ditkit.models.cuda_graph import CUDAGraphForward, WeightCasts
from ditkit.models.fused import for_graph_capture
from ditkit.models.text import TextCond
from ditkit.sampling import generate
from ditkit.train import load_model, train
from test_text import random_cond, tiny_text_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"


def _model(device: str = DEVICE, **overrides) -> DiT:
    settings = dict(input_size=16, in_channels=4, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    settings.update(overrides)
    torch.manual_seed(0)
    model = DiT(ModelConfig(**settings))
    off_identity_init_(model)
    return model.to(device).eval()


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=g, device=DEVICE)
    t = torch.randint(0, 1000, (n,), generator=g, device=DEVICE).float()
    y = torch.randint(0, 11, (n,), generator=g, device=DEVICE)  # 10 is the null class
    return x, t, y


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_replay_equals_eager_for_new_inputs_and_shapes(precision):
    model = _model()
    graphed = CUDAGraphForward(model)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), amp:
        held = None
        for n, seed in [(6, 0), (6, 1), (4, 2), (6, 3)]:
            x, t, y = _inputs(n, seed)
            out = graphed(x, t, y)
            with for_graph_capture():  # eager with the kernels a graph records at every size (models.fused)
                reference = model(x, t, y)
            assert out.dtype == reference.dtype
            torch.testing.assert_close(out, reference, rtol=0, atol=0)  # same kernels, same numbers
            plain = model(x, t, y)  # small batches run eager without the fused kernels: same math
            tol = 1e-5 if precision == "fp32" else 2e-2
            assert (plain - out).abs().max() <= tol * plain.abs().max()
            if held is None:
                held, held_copy = out, out.clone()
    assert len(graphed.graphs) == 2  # batch 6 and batch 4, each captured once
    assert torch.equal(held, held_copy)  # later replays do not overwrite what a caller holds
    assert graphed.config is model.config and graphed.null_class == model.null_class


@cuda
@pytest.mark.parametrize("cast_weights", [True, False])
def test_graph_replays_see_weights_changed_in_place(cast_weights):
    model = _model()
    graphed = CUDAGraphForward(model, cast_weights=cast_weights)
    x, t, y = _inputs(4, 0)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        # One autocast region per comparison, as sampling has between training steps: inside one region
        # autocast caches its casts of the weights, and an eager call after an in-place change would
        # read the stale cast.
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            with for_graph_capture():  # eager on the kernels the graph recorded
                reference = model(x, t, y)
            return graphed(x, t, y), reference

    first, reference = both()
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    with torch.no_grad():
        for p in model.parameters():  # what an optimizer or EMA step does between sample grids
            p.mul_(0.9)
    changed, reference = both()
    torch.testing.assert_close(changed, reference, rtol=0, atol=0)
    assert not torch.equal(changed, first)
    model.load_state_dict({k: v * 1.1 for k, v in model.state_dict().items()})
    torch.testing.assert_close(*both(), rtol=0, atol=0)
    assert len(graphed.graphs) == 1 and bool(graphed._casts) == cast_weights


@cuda
def test_graph_steps_aside_under_grad_and_in_training_mode():
    model = _model()
    graphed = CUDAGraphForward(model)
    x, t, y = _inputs(2, 0)
    out = graphed(x, t, y)  # grad enabled: eager, differentiable
    assert out.requires_grad and not graphed.graphs
    model.train()
    with torch.no_grad():
        graphed(x, t, y)
    assert not graphed.graphs


@cuda
def test_graph_leaves_a_compiled_model_to_its_own_graphs():
    compiled = torch.compile(_model())
    graphed = CUDAGraphForward(compiled)
    with torch.no_grad():
        out = graphed(*_inputs(2, 0))
    assert not graphed.graphs and out.shape == (2, 8, 16, 16)  # learn_sigma: 2 x 4 channels


@cuda
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "heun"])
def test_generate_with_cuda_graphs_equals_eager(sampler, tmp_path):
    config = make_tiny_config(tmp_path, device=DEVICE)
    model = DiT(config.model).to(DEVICE).eval()
    off_identity_init_(model)
    labels = [0, 1, 2, 3, 1]
    kwargs = dict(sampler=sampler, steps=4, cfg_scale=3.0, batch_size=3, seed=5)
    with for_graph_capture():  # eager on the kernels the graphs record (models.fused)
        eager = generate(model, config, labels, cuda_graph=False, **kwargs)
    graphed = generate(model, config, labels, cuda_graph=True, **kwargs)
    assert eager.device.type == "cuda"
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-6)
    plain = generate(model, config, labels, cuda_graph=False, **kwargs)  # small: no fused kernels eagerly
    torch.testing.assert_close(graphed, plain, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("mode", ["pooled", "tokens", "both"])
def test_text_models_replay_from_graphs_and_empty_captions_are_still_refused(mode):
    """A text condition's tensors get static buffers (one graph per shape and null-ness); replays equal
    eager forwards on the same kernels exactly; the empty-caption check, which a graph cannot make,
    runs before every replay."""
    model = tiny_text_model(mode).to(DEVICE)
    graphed = CUDAGraphForward(model)
    x, t = torch.randn(3, 1, 8, 8, device=DEVICE), torch.tensor([1.0, 500.0, 999.0], device=DEVICE)
    first, second = random_cond(seed=0).to(DEVICE), random_cond(seed=1).to(DEVICE)
    guided = TextCond.cat([first, first.as_null()])
    calls = [(x, t, first), (x, t, second), (torch.cat([x, x]), torch.cat([t, t]), guided)]
    with torch.no_grad():
        for args in calls:
            out = graphed(*args)
            with for_graph_capture():
                torch.testing.assert_close(out, model(*args), rtol=0, atol=0)
    assert len(graphed.graphs) == 2  # batch 3 without null rows, batch 6 with them
    empty = random_cond(real=(2, 0, 3)).to(DEVICE)
    with torch.no_grad():
        if mode == "pooled":  # no token attention: an empty row is fine, as eagerly
            out = graphed(x, t, empty)
            with for_graph_capture():
                torch.testing.assert_close(out, model(x, t, empty), rtol=0, atol=0)
        else:
            with pytest.raises(ValueError, match="a caption has no unmasked token"):
                graphed(x, t, empty)


def _loss_curve(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]


@cuda
@pytest.mark.parametrize(
    "overrides",
    [
        dict(precision="bf16", tf32=True, fused_adamw=True),
        dict(precision="fp16"),
        dict(),
        dict(precision="bf16", compile="blocks"),  # with the default fused_adamw (null): fused on CUDA
    ],
)
def test_training_on_cuda_learns_and_checkpoints_load_on_cpu(tmp_path, overrides, monkeypatch):
    config = make_tiny_config(tmp_path / "run", device=DEVICE, steps=120, lr=2e-3, ckpt_every=1000, **overrides)
    result = train(config, progress=False, dataset=make_tiny_dataset(64))
    losses = _loss_curve(result.out_dir)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    assert not torch.backends.cuda.matmul.allow_tf32  # train.tf32 is undone when training returns
    model, _ = load_model(result.checkpoint, "ema")  # loads on CPU
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # PyTorch's default lets convs use TF32
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 1, 4])
    with torch.no_grad():
        on_cpu = model(x, t, y)
        on_gpu = model.to(DEVICE)(x.to(DEVICE), t.to(DEVICE), y.to(DEVICE)).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-5, atol=1e-5)


@cuda
def test_default_adamw_is_fused_on_cuda():
    from ditkit.train import make_adamw

    param = torch.nn.Parameter(torch.zeros(3, device=DEVICE))
    assert make_adamw([param], None, lr=1e-3).defaults["fused"] is True


@cuda
@pytest.mark.parametrize("every_size", [False, True], ids=["size-rule", "fused-kernels-every-size"])
def test_resume_on_cuda_is_bitwise_identical(tmp_path, monkeypatch, every_size):
    """Also with the fused kernels forced onto the tiny model: their backward sums in fixed tiles (no
    atomics), so training stays deterministic."""
    if every_size:
        monkeypatch.setitem(fused._state, "min_elements", 0)
    data = make_tiny_dataset(20)
    cfg = dict(device=DEVICE, ckpt_every=100, precision="bf16")
    straight = train(make_tiny_config(tmp_path / "a", steps=7, **cfg), progress=False, dataset=data)
    train(make_tiny_config(tmp_path / "b", steps=3, **cfg), progress=False, dataset=data)
    resumed = train(
        make_tiny_config(tmp_path / "b", steps=7, **cfg), resume=tmp_path / "b", progress=False, dataset=data
    )
    for which in ("model", "ema"):
        a = load_file(straight.checkpoint / f"{which}.safetensors")
        b = load_file(resumed.checkpoint / f"{which}.safetensors")
        for key in a:
            assert torch.equal(a[key], b[key]), (which, key)


@cuda
def test_torchrun_on_one_gpu_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # both processes with PyTorch's defaults
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    worker = Path(__file__).parent / "train_worker.py"
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(worker)]
    proc = subprocess.run(
        cmd + [str(tmp_path / "ddp"), "train.device=cuda", "train.steps=4"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = train(make_tiny_config(tmp_path / "one", device=DEVICE), progress=False, dataset=make_tiny_dataset(20))
    a = load_file(tmp_path / "ddp" / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(single.checkpoint / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_graph_wrapper_is_the_plain_model_on_cpu():
    model = DiT(
        ModelConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    )
    model.eval()
    graphed = CUDAGraphForward(model)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(graphed(x, t, y), model(x, t, y))
    assert not graphed.graphs and graphed.null_class == 3 and graphed.config is model.config


def test_weight_casts_are_autocasts_copies_and_stay_current():
    model = _model("cpu")
    casts = WeightCasts(model, torch.bfloat16)
    params = dict(model.named_parameters())
    linear_or_conv = {
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        for name, _ in module.named_parameters(recurse=False)
    }
    assert set(casts.tensors) == linear_or_conv and "y_embedder.embedding_table.weight" not in casts.tensors
    for name, copy in casts.tensors.items():
        assert copy.dtype == torch.bfloat16 and torch.equal(copy, params[name].to(torch.bfloat16))
    # The model on its copies computes exactly what autocast computes from the fp32 weights (CPU autocast
    # casts the same layers): no parameter autocast leaves alone was copied, none it casts was missed.
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor([5.0, 400.0, 999.0]), torch.tensor([1, 10, 4])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(x, t, y)
        assert torch.equal(torch.func.functional_call(model, casts.tensors, (x, t, y), strict=False), reference)

    assert casts.refresh() == 0  # nothing changed
    addresses = {name: copy.data_ptr() for name, copy in casts.tensors.items()}
    with torch.no_grad():
        params["blocks.0.attn.qkv.weight"].add_(1.0)
    assert casts.refresh() == 1
    model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})
    assert casts.refresh() == len(casts.tensors)
    for name, copy in casts.tensors.items():  # re-cast in place: a captured graph reads the same memory
        assert copy.data_ptr() == addresses[name] and torch.equal(copy, params[name].to(torch.bfloat16))
    model.final_layer.linear.weight = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(RuntimeError, match=r"'weight' of Linear changed shape or device .*-> \(3, 3\) on cpu"):
        casts.refresh()
    model.final_layer.linear.weight = params["final_layer.linear.weight"]
    model.final_layer.linear.bias = None
    with pytest.raises(RuntimeError, match=r"'bias' of Linear .*-> removed"):
        casts.refresh()


def test_tf32_switch_is_undone_on_exit():
    from ditkit.distributed import tf32

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        with tf32(torch.device("cuda"), True):
            assert matmul.allow_tf32 and cudnn.allow_tf32
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
        cudnn.allow_tf32 = True  # PyTorch's default: cuDNN convolutions may use TF32
        with tf32(torch.device("cuda"), False):
            assert not matmul.allow_tf32 and not cudnn.allow_tf32  # False is full fp32, convolutions too
        assert cudnn.allow_tf32 and not matmul.allow_tf32
        with tf32(torch.device("cpu"), False):
            assert cudnn.allow_tf32  # nothing to do on CPU
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


@cuda
def test_evaluation_features_run_in_full_fp32_on_cuda(monkeypatch):
    from ditkit.evaluation.classifier import classifier_features
    from ditkit.evaluation.features import ClassifierFeatures
    from ditkit.models.classifier import ClassifierConfig, DigitClassifier

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    classifier = DigitClassifier(ClassifierConfig()).to(DEVICE)
    seen = []
    features = classifier.features

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return features(x)

    classifier.features = recording
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    ClassifierFeatures(classifier, DEVICE)(images)
    classifier_features(classifier, images.float() / 127.5 - 1)
    assert seen == [(False, False), (False, False)]
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # the caller's flags are back


def test_explicit_cuda_graph_with_feature_caching_is_refused(tmp_path):
    config = make_tiny_config(tmp_path)
    model = DiT(config.model).eval()
    with pytest.raises(ValueError, match="feature caching"):
        generate(model, config, [0, 1], cuda_graph=True, feature_cache_interval=2)
    generate(model, config, [0, 1], feature_cache_interval=2)  # the config's default steps aside quietly
