"""`ditkit bench` output and the feature cache (speed numbers are never asserted)."""

import json
import mmap
import re
import sys

import pytest
import torch

from conftest import off_identity_init_
from ditkit.config import MODEL_PRESETS, Config, DataConfig, ModelConfig, SampleConfig
from ditkit.models import DiT, count_macs
from ditkit.models.feature_cache import feature_cache
from ditkit.sampling import generate


def test_bench_command_writes_well_formed_json(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from ditkit.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "DiT-S/8", "--input-size", "8", "--num-classes", "10", "--batch", "2"]
    argv += ["--steps", "2", "--repeats", "1", "--gemm-size", "64", "--device", "cpu", "--json", str(out)]
    argv += ["--allocator", "system"]  # 'retain' would change this test process's malloc for good (tested below)
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["settings"]["allocator"] == "system" and results["allocator_mallopt"] is None
    assert set(results["gemm_gflops"]) == {"fp32", "bf16"}
    for precision, rates in results["gemm_gflops_by_backend"].items():
        assert "aten" in rates and results["gemm_gflops"][precision] == max(rates.values()) > 0
    kinds = {(r["kind"], r["precision"]) for r in results["runs"]}
    assert kinds == {("train", "fp32"), ("train", "bf16"), ("sample", "fp32"), ("sample", "bf16")}
    for run in results["runs"]:
        assert set(run["seconds"]) == {"ditkit", "diffusers"} and all(v > 0 for v in run["seconds"].values())
        assert run["speedup"] == pytest.approx(run["seconds"]["diffusers"] / run["seconds"]["ditkit"])
        if sys.platform != "win32":  # POSIX reports page faults (Python's `resource`)
            faults = run["page_fault_mib_per_iteration"]
            assert set(faults) == {"ditkit", "diffusers"} and all(v >= 0 for v in faults.values())
    # The rates follow the documented arithmetic from the stored seconds: FLOPs = 2 x count_macs per image
    # and forward, x3 for a training step (forward + backward), x2 per guided sampling step (cond + uncond).
    macs = count_macs(ModelConfig(input_size=8, in_channels=results["settings"]["in_channels"], num_classes=10,
                                  **MODEL_PRESETS["DiT-S/8"]))  # fmt: skip
    assert results["gmacs_per_forward"] == pytest.approx(macs / 1e9, rel=1e-12) and macs > 0
    batch, steps = 2, 2  # --batch, --steps above
    for run in results["runs"]:
        flops = 6 * macs * batch if run["kind"] == "train" else 4 * macs * batch * steps
        gemm = results["gemm_gflops"][run["precision"]]
        for name, seconds in run["seconds"].items():
            assert run["img_per_s"][name] == pytest.approx(batch / seconds, rel=1e-12)
            assert run["gflops"][name] == pytest.approx(flops / seconds / 1e9, rel=1e-12), (run["kind"], name)
            assert run["fraction_of_gemm"][name] == pytest.approx(run["gflops"][name] / gemm, rel=1e-12)
    assert results["fused_kernels"] is False and results["gelu_epilogue"] is False  # CUDA only
    assert isinstance(results["allocator_env"], dict)
    from ditkit.models.layers import cpu_paths

    assert results["cpu_paths"] == cpu_paths()  # which CPU kernels ran, since they depend on the CPU
    assert results["cpu_paths"]["fp32_linear"] in ("onednn", "blas")
    printed = capsys.readouterr().out
    assert "ditkit/diffusers" in printed and f"fp32 linears: {results['cpu_paths']['fp32_linear']}" in printed
    assert f"GELU: {results['cpu_paths']['bf16_inference_gelu']}" in printed
    assert f"inference attention: {results['cpu_paths']['fp32_inference_attention']}" in printed


@pytest.mark.parametrize(
    "flag, value, named", [("--batch", "0", "batch"), ("--repeats", "0", "repeats"), ("--steps", "0", "sample_steps")]
)
def test_bench_refuses_empty_counts_before_measuring(flag, value, named, capsys):
    from ditkit.cli import main

    assert main(["bench", "--preset", "DiT-S/8", "--input-size", "8", flag, value]) == 2
    out = capsys.readouterr()
    assert f"bench setting {named} ({flag}) must be at least 1, got 0" in out.err
    assert "GEMM" not in out.out  # nothing was measured first


def test_bench_refuses_more_steps_than_the_process_has_before_measuring(capsys):
    """The bench samples the default 1000-timestep vp process: 1001 steps failed only when sampling
    started, after the GEMM and training timings."""
    from ditkit.bench import BenchSettings
    from ditkit.cli import main

    assert main(["bench", "--preset", "DiT-S/8", "--input-size", "8", "--steps", "1001"]) == 2
    out = capsys.readouterr()
    assert "bench setting sample_steps (--steps) 1001: this model's process has 1000 timesteps" in out.err
    assert "GEMM" not in out.out  # nothing was measured first
    assert BenchSettings(sample_steps=1000).sample_steps == 1000


_REFAULTS = """
import json, mmap, resource, sys, torch
import ditkit.bench as bench
applied = bench.retain_freed_memory() if sys.argv[1] == "retain" else None
faulted = []
for _ in range(8):  # a 40 MiB tensor, allocated, written and freed eight times
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(10 * 2**20)
    del x
    faulted.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) * mmap.PAGESIZE / 2**20)
print(json.dumps({"applied": applied, "faulted": faulted}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retain_freed_memory_stops_freed_blocks_faulting_back_in():
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    runs = {}
    for mode in ("system", "retain"):  # each in a fresh process: the setting lasts for the process's life
        done = subprocess.run([sys.executable, "-c", _REFAULTS, mode], capture_output=True, text=True, check=True)
        runs[mode] = json.loads(done.stdout)
    assert runs["system"]["applied"] is None
    assert min(runs["system"]["faulted"]) >= 39  # glibc mmaps a 40 MiB block and unmaps it on free
    assert runs["retain"]["applied"] == {"M_TRIM_THRESHOLD": 2**31 - 1, "M_MMAP_THRESHOLD": 2**30}
    # The heap grows by the block twice in the first three rounds (12 runs of this script: always twice),
    # then freed blocks are reused as they are: no page is faulted again.
    assert max(runs["retain"]["faulted"][4:]) < 1


def test_bench_notes_a_page_fault_gap_between_the_sides():
    from ditkit.bench import FAULT_NOTE_MIB, BenchSettings, _report

    record = {"kind": "sample", "precision": "bf16", "speedup": 1.5, "img_per_s": {"ditkit": 3.0, "diffusers": 2.0},
              "fraction_of_gemm": {"ditkit": 0.6, "diffusers": 0.4}}  # fmt: skip
    for gap, noted in ((FAULT_NOTE_MIB - 1, False), (FAULT_NOTE_MIB, True)):
        for allocator, remedy in (("system", "--allocator retain keeps"), ("retain", "even with --allocator retain")):
            lines = []
            faults = {"ditkit": 10.0, "diffusers": 10.0 + gap}
            _report({**record, "page_fault_mib_per_iteration": faults}, lines.append, allocator)
            assert ("the C allocator is part of this ratio" in "\n".join(lines)) is noted
            assert (remedy in "\n".join(lines)) is noted
    with pytest.raises(ValueError, match=r"allocator \(--allocator\) must be one of .*got 'jemalloc'"):
        BenchSettings(allocator="jemalloc")


def test_bench_refuses_a_device_this_machine_lacks(capsys):
    from ditkit.cli import main

    assert main(["bench", "--preset", "DiT-S/8", "--input-size", "8", "--device", "bogus"]) == 2
    assert "device 'bogus' is not a device name" in capsys.readouterr().err
    if not torch.cuda.is_available():  # it used to fail deep inside with "Torch not compiled with CUDA"
        assert main(["bench", "--preset", "DiT-S/8", "--input-size", "8", "--device", "cuda"]) == 2
        assert "has no CUDA GPU" in capsys.readouterr().err


def test_interleaved_measurements_count_the_pages_a_call_first_touches():
    pytest.importorskip("resource")  # POSIX only
    from ditkit.bench import interleaved_measurements

    def fresh_pages() -> None:  # maps 64 MiB of new anonymous memory, writes one byte per page, unmaps it
        with mmap.mmap(-1, 64 * 2**20) as memory:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux: one fault per base page, whatever the THP setting
                memory.madvise(mmap.MADV_NOHUGEPAGE)
            for offset in range(0, len(memory), mmap.PAGESIZE):
                memory[offset] = 1

    fns = {"fresh": fresh_pages, "nothing": lambda: None}
    measured = interleaved_measurements(fns, repeats=3, device=torch.device("cpu"))
    assert 60 <= measured["fresh"]["page_fault_mib"] <= 70
    assert measured["nothing"]["page_fault_mib"] < 1
    assert all(m["seconds"] > 0 for m in measured.values())


@pytest.mark.slow
def test_bench_compiled_runs_both_models_compiled(tmp_path):
    pytest.importorskip("diffusers")
    from ditkit.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "DiT-S/8", "--input-size", "8", "--num-classes", "10", "--batch", "2", "--compile"]
    argv += ["--steps", "2", "--repeats", "1", "--gemm-size", "64", "--precision", "bf16", "--json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["compiled"] is True and len(results["runs"]) == 2
    assert all(v > 0 for run in results["runs"] for v in run["seconds"].values())


def _model() -> DiT:
    torch.manual_seed(0)
    model = DiT(ModelConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                            num_classes=4, learn_sigma=False)).eval()  # fmt: skip
    off_identity_init_(model)
    return model


@torch.no_grad()
def test_feature_cache_reuses_block_residuals_and_restores_the_model():
    model = _model()
    x1, x2 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t1, t2, y = torch.tensor([900.0, 900.0]), torch.tensor([880.0, 880.0]), torch.tensor([0, 3])
    blocks = model.blocks
    with feature_cache(model, interval=2) as clock:
        first = model(x1, t1, y)
        second = model(x2, t2, y)
        third = model(x2, t2, y)
    assert model.blocks is blocks and (clock.computed, clock.reused) == (2, 1)
    torch.testing.assert_close(first, model(x1, t1, y))
    torch.testing.assert_close(third, model(x2, t2, y))
    # The reused pass = the embeddings of the new input + the blocks' residuals from the first pass.
    h = model.x_embedder(x1) + model.pos_embed
    c = model.t_embedder(t1) + model.y_embedder(y, None)
    residual = torch.zeros_like(h)
    for block in model.blocks:
        out = block(h + residual, c)
        residual = out - h
    h2 = model.x_embedder(x2) + model.pos_embed
    c2 = model.t_embedder(t2) + model.y_embedder(y, None)
    torch.testing.assert_close(second, model.unpatchify(model.final_layer(h2 + residual, c2)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(second, model(x2, t2, y), atol=1e-3)


@torch.no_grad()
def test_feature_cache_interval_one_is_exact_and_sampling_runs_fewer_block_passes():
    model = _model()
    config = Config(model=model.config, data=DataConfig(image_size=8, channels=1), sample=SampleConfig(cfg_scale=2.0))
    plain = generate(model, config, [0, 1, 2], steps=6)
    assert torch.equal(generate(model, config, [0, 1, 2], steps=6, feature_cache_interval=1), plain)
    calls = []
    handle = model.blocks[1].register_forward_hook(lambda *_: calls.append(1))
    cached = generate(model, config, [0, 1, 2], steps=6, feature_cache_interval=3)
    handle.remove()
    assert len(calls) == 2  # 6 denoiser calls, blocks run on calls 0 and 3
    assert cached.shape == plain.shape and torch.isfinite(cached).all()
    assert (cached - plain).abs().mean() < 0.5


@torch.no_grad()
def test_feature_cache_interval_must_be_a_positive_integer():
    """2.5 was accepted and refreshed only on the calls divisible by it: every 5th one."""
    model = _model()
    config = Config(model=model.config, data=DataConfig(image_size=8, channels=1))
    blocks = model.blocks
    for bad in (2.5, 0, -2, True, torch.tensor(True)):
        message = rf"feature cache interval \(1: no caching\) must be an integer >= 1, got {re.escape(repr(bad))}$"
        with pytest.raises(ValueError, match=message):
            with feature_cache(model, bad):
                pass
        with pytest.raises(ValueError, match=rf"got {re.escape(repr(bad))}$"):
            generate(model, config, [0, 1], steps=2, feature_cache_interval=bad)
    assert model.blocks is blocks
    with feature_cache(model, torch.tensor(2)) as clock:  # any integer type, as operator.index takes it
        assert clock.interval == 2


def test_saved_bytes_count_each_activation_once_and_no_parameters():
    """A weight used twice and an activation saved by two ops: 1 activation's bytes (x, then h), not 4 tensors."""
    from ditkit.bench import saved_activation_bytes

    w = torch.nn.Parameter(torch.randn(16, 16))
    x = torch.randn(8, 16, requires_grad=True)

    def step() -> torch.Tensor:
        h = torch.tanh(x @ w)  # saves x and w; tanh saves h
        return (h @ w).sum() + (h * h).sum()  # saves h and w again, h twice more

    h_bytes = x_bytes = 8 * 16 * 4
    assert saved_activation_bytes(step, exclude=[w]) == x_bytes + h_bytes
    assert saved_activation_bytes(step) == x_bytes + h_bytes + w.numel() * 4  # the weight once, if not excluded


def test_bench_sides_train_on_the_same_conditioning():
    """No label dropout on either side (diffusers' blocks each drop labels with their own draws in train
    mode), and guidance at scale 1 is refused (ditkit's pass would be half diffusers')."""
    pytest.importorskip("diffusers")
    from ditkit.bench import BenchSettings, _train_steps, paired_models

    cpu = torch.device("cpu")
    settings = BenchSettings(preset="DiT-S/8", input_size=8, num_classes=10, batch=8, device=cpu.type)
    ours, theirs, _ = paired_models(settings, cpu)
    _train_steps(ours, theirs, settings, "fp32", cpu)
    assert theirs.training
    x, t, y = torch.randn(8, 4, 8, 8), torch.full((8,), 500.0), torch.arange(8)
    with torch.no_grad():
        a, b = (theirs(x, timestep=t, class_labels=y).sample for _ in range(2))
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # no random label dropout left
        torch.testing.assert_close(ours(x, t, y), a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cfg_scale must not be 1"):
        BenchSettings(cfg_scale=1.0)


def test_benchmark_scripts_write_their_rows_to_a_new_file_only(tmp_path):
    from ditkit.bench import write_rows

    path = write_rows(tmp_path / "out" / "rows.json", {"calls": 10}, [{"preset": "DiT-S/2", "ms": 1.5}])
    data = json.loads(path.read_text())
    assert data["settings"] == {"calls": 10} and data["rows"][0]["ms"] == 1.5 and data["torch"] == torch.__version__
    with pytest.raises(ValueError, match="already exists"):
        write_rows(path, {}, [])


@pytest.mark.parametrize("script", ["fused_kernels.py", "cuda_graph.py"])
def test_gpu_benchmark_scripts_refuse_an_existing_json_before_measuring(tmp_path, script):
    """Refused at the start (before the GPU check, so it runs here), not after a whole GPU run."""
    import subprocess
    import sys
    from pathlib import Path

    existing = tmp_path / "rows.json"
    existing.write_text("keep")
    path = Path(__file__).parent.parent / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), "--json", str(existing)], capture_output=True, text=True)
    assert done.returncode == 2 and "already exists" in done.stderr and existing.read_text() == "keep"


def test_bench_says_the_gelu_epilogue_runs_where_the_triton_kernels_do_not():
    # The cuBLASLt GELU epilogue needs no Triton: without Triton the bench must not call everything off.
    from ditkit.bench import fused_state

    assert fused_state(True, True).startswith("on")
    assert "GELU epilogue on" in fused_state(False, True) and "Triton kernels off" in fused_state(False, True)
    assert fused_state(False, False) == "off (DITKIT_FUSED_KERNELS=0)"
    # Under --compile models.fused steps aside (neither route runs): said as off, with the reason.
    for triton, gelu in [(True, True), (False, True), (False, False)]:
        assert fused_state(triton, gelu, compiled=True) == "off under --compile (Inductor fuses these ops itself)"


def test_bench_records_the_fused_kernels_off_under_compile(monkeypatch):
    """models.fused returns None while torch.compile traces, so a compiled CUDA bench must not record the
    fused kernels or the GELU epilogue as on (checked without a GPU: CUDA faked, nothing timed)."""
    import ditkit.bench as bench

    class Stop(Exception):
        pass

    recorded = {}

    def stop_at_gemm(size, dtype, device):
        raise Stop

    monkeypatch.setattr(bench, "paired_models", lambda settings, device: (None, None, None))
    monkeypatch.setattr(bench, "count_macs", lambda config: 1)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda device: "fake")
    monkeypatch.setattr(bench, "fused_kernels_available", lambda device: True)
    monkeypatch.setattr(bench, "fused_kernels_enabled", lambda: True)
    monkeypatch.setattr(bench, "gemm_rates", stop_at_gemm)
    real_state = bench.fused_state
    # The recorded fields reach fused_state as its arguments: the spy sees what the results say.
    monkeypatch.setattr(
        bench, "fused_state", lambda *a: recorded.setdefault("fields", []).append(a[:2]) or real_state(*a)
    )
    for compile_ in (False, True):
        lines = []
        with pytest.raises(Stop):
            bench.run_bench(bench.BenchSettings(device="cuda", compile=compile_, allocator="system"), lines.append)
        recorded[compile_] = lines
    assert recorded["fields"] == [(True, True), (False, False)]
    assert any("fused GPU kernels: on" in line for line in recorded[False])
    assert any("fused GPU kernels: off under --compile" in line for line in recorded[True])
