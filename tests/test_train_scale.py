"""Training at scale on CPU: 2-process DDP and FSDP (gloo) against 1 process, checkpoints across
topologies, kill -9 mid-training and mid-save then --resume, and the opt-in speed switches.

The multi-process jobs run tests/train_worker.py under torchrun; one launch (a module fixture) runs
every distributed phase, since starting processes dominates the cost on a small machine.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_tiny_config, make_tiny_dataset
from ditkit.checkpoint import KILL_HOOK_ENV, find_latest_checkpoint, load_state
from ditkit.config import ConfigError
from ditkit.diffusion import build_process, diffusion_loss
from ditkit.distributed import choose_device, draw_streams, init_distributed
from ditkit.evaluation import ClassifierResult, save_classifier
from ditkit.evaluation.in_training import InTrainingEvaluator
from ditkit.models import DiT
from ditkit.models.classifier import ClassifierConfig, DigitClassifier
from ditkit.train import EpochBatchSampler, build_model, load_model, train

WORKER = Path(__file__).parent / "train_worker.py"
SRC = str(Path(__file__).parents[1] / "src")
DATA = 20  # train_worker.py trains on make_tiny_dataset(20): 2 full batches of 8 per epoch
MATCH = 1e-7
"""Largest weight difference allowed between a 2-process (gloo, CPU) run and the 1-process one. The world
size changes only the order of float32 sums: measured 1.5e-8 to 3.0e-8 for DDP, FSDP2, accumulation,
the non-finite skip and resumes across topologies. Compiled runs change the kernels too and are held
to 1e-6 (test_block_compile_under_fsdp_ddp_and_checkpointing_matches_eager; measured 2.1e-7)."""


def _env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **extra}


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _torchrun(*phases: list[str], **env: str) -> None:
    args = [a for i, phase in enumerate(phases) for a in ((["--phase"] if i else []) + phase)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER)]
    _check(subprocess.run(cmd + args, env=_env(**env), capture_output=True, text=True, timeout=600))


def _weights(run: Path, step: int, which: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:07d}" / f"{which}.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process reference run and one torchrun launch with every 2-process phase."""
    root = tmp_path_factory.mktemp("scale")
    data = make_tiny_dataset(DATA)
    train(make_tiny_config(root / "single", steps=4), progress=False, dataset=data)
    torch.manual_seed(0)  # a (seeded, untrained) digit judge where in-training evaluation looks for it
    judge = ClassifierResult(DigitClassifier(ClassifierConfig(width=8)).eval(), 0.0)
    save_classifier(judge, root / "judge_cache" / "digit_classifier_8px_e10")
    _torchrun(
        [str(root / "ddp"), "train.steps=4"],
        # Accumulating under DDP and FSDP2, each counting its gradient reductions per optimizer step.
        [
            str(root / "ddp_from_single"),
            "--resume",
            str(root / "single/checkpoints/step_0000002"),
            "train.steps=4",
            "train.grad_accum_steps=2",
            "--count-grad-syncs",
        ],
        [
            str(root / "fsdp"),
            "train.steps=4",
            "train.parallel=fsdp",
            "train.grad_accum_steps=2",
            "--count-grad-syncs",
            "train.sample_every=4",
            "train.eval_every=4",  # rank 0 scores the whole EMA: it hung when it sampled its own shard
            "train.eval_num=4",
        ],
        [str(root / "ddp_nan"), "train.steps=4", "--nan-calls", "2"],
        # A fake clock on which rank 0's steps take 10 s and rank 1's 20 s: rank 1 uses up the minute
        # in step 3, rank 0 would only in step 6.
        [str(root / "ddp_budget"), "train.steps=50", "train.max_minutes=1", "--step-seconds", "10,20"],
        DITKIT_CACHE=str(root / "judge_cache"),
    )
    return root


def test_ddp_two_processes_match_one_process(runs):
    for which in ("model", "ema"):
        assert _max_diff(_weights(runs / "single", 4, which), _weights(runs / "ddp", 4, which)) < MATCH
    # Rank 0 alone writes: one metrics line per step, and the checkpoint records both ranks' RNG states.
    assert _metric_steps(runs / "ddp") == [1, 2, 3, 4]
    state = load_state(runs / "ddp" / "checkpoints" / "step_0000004")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # keyed by parameter name


def test_checkpoints_resume_across_topologies(runs, tmp_path):
    # single -> DDP with grad_accum_steps=2 (in the fixture's launch) and DDP -> single (here).
    for which in ("model", "ema"):
        assert _max_diff(_weights(runs / "single", 4, which), _weights(runs / "ddp_from_single", 4, which)) < MATCH
    resumed = train(
        make_tiny_config(tmp_path / "from_ddp", steps=4),
        resume=runs / "ddp" / "checkpoints" / "step_0000002",
        progress=False,
        dataset=make_tiny_dataset(DATA),
    )
    assert resumed.step == 4
    for which in ("model", "ema"):
        assert _max_diff(_weights(runs / "single", 4, which), _weights(tmp_path / "from_ddp", 4, which)) < MATCH


def test_fsdp_with_accumulation_matches_and_loads_single_process(runs, tmp_path, monkeypatch):
    for which in ("model", "ema"):
        assert _max_diff(_weights(runs / "single", 4, which), _weights(runs / "fsdp", 4, which)) < MATCH
    model, _ = load_model(runs / "fsdp", "ema")  # unsharded, unwrapped names: loads into a plain DiT
    assert isinstance(model, DiT)
    resumed = train(
        make_tiny_config(tmp_path / "from_fsdp", steps=4),
        resume=runs / "fsdp" / "checkpoints" / "step_0000002",
        progress=False,
        dataset=make_tiny_dataset(DATA),
    )
    assert resumed.step == 4 and _max_diff(_weights(runs / "single", 4), _weights(tmp_path / "from_fsdp", 4)) < MATCH
    # Watching the run: an EMA sample grid (4 classes, 16 images of 8x8, upscaled 8x) and the loss curve.
    grid = Image.open(runs / "fsdp" / "samples" / "step_0000004.png")
    assert grid.size == ((4 * (8 + 2) + 2) * 8, (4 * (8 + 2) + 2) * 8)
    assert Image.open(runs / "fsdp" / "loss_curve.png").size == (640, 360)
    # In-training evaluation of the gathered EMA: the score a single process gets from the saved EMA.
    records = [json.loads(line) for line in open(runs / "fsdp" / "metrics.jsonl")]
    (scored,) = [r for r in records if "eval_fid" in r]
    assert scored["step"] == 4 and scored["eval_num"] == 4
    monkeypatch.setenv("DITKIT_CACHE", str(runs / "judge_cache"))
    ema, saved = load_model(runs / "fsdp", "ema")
    again = InTrainingEvaluator(saved, make_tiny_dataset(DATA), "cpu")(ema)
    assert again["eval_fid"] == pytest.approx(scored["eval_fid"], rel=1e-6)


def test_accumulation_reduces_gradients_once_per_optimizer_step(runs):
    """With train.grad_accum_steps=2 the ranks reduce gradients on a step's last micro-batch only (DDP's
    no_sync, FSDP2's set_requires_gradient_sync(False)). Reducing on every micro-batch gives the same
    weights, only slower, so the reductions are counted (tests/train_worker.py --count-grad-syncs)."""
    for rank in (0, 1):
        # DDP, steps 3 and 4 after the resume: the tiny model's gradients fill one bucket, one all-reduce.
        assert json.loads((runs / "ddp_from_single" / f"grad_syncs-{rank}").read_text()) == [1, 1], rank
        # FSDP2: a reduce-scatter per sharded module (the 2 blocks and the root) and step.
        assert json.loads((runs / "fsdp" / f"grad_syncs-{rank}").read_text()) == [3, 3, 3, 3], rank


def test_nonfinite_loss_on_one_rank_is_skipped_by_all(runs, tmp_path, monkeypatch):
    import ditkit.train as train_mod

    calls = {"n": 0}

    def nan_first_two(*args, **kwargs):
        calls["n"] += 1
        loss = diffusion_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] <= 2 else loss

    monkeypatch.setattr(train_mod, "diffusion_loss", nan_first_two)
    train(make_tiny_config(tmp_path / "nan", steps=4), progress=False, dataset=make_tiny_dataset(DATA))
    # On 2 ranks only rank 1's loss was NaN; both skipped the same two batches, so the runs agree.
    assert _max_diff(_weights(tmp_path / "nan", 4), _weights(runs / "ddp_nan", 4)) < MATCH
    assert _max_diff(_weights(runs / "single", 4), _weights(runs / "ddp_nan", 4)) > 1e-4  # other data seen
    records = [json.loads(line) for line in open(runs / "ddp_nan" / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in records] == [2, 2, 2, 2]


def test_max_minutes_stops_every_rank_at_the_same_step_with_no_collective_of_its_own(runs):
    """Under DDP one rank over the budget stops both at the same step (a rank that stopped alone would
    leave the other waiting in a collective); the verdict rides on each step's loss all-reduce, so
    the ranks agree by a collective of their own only before the first step and after a checkpoint."""
    run = runs / "ddp_budget"
    assert _metric_steps(run) == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    assert load_state(run / "checkpoints" / "step_0000003")["train_seconds"] == 30.0  # rank 0's clock
    # 3 steps' all-reduces + the agreement before step 1 and after step 2's checkpoint (an all-reduce
    # of its own before every step, as before, made 3 + 4).
    assert [int((run / f"all_sums-{rank}").read_text()) for rank in (0, 1)] == [5, 5]


def _worker(run: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), str(run), *args]
    return subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_during_checkpoint_write_then_resume_is_bitwise_exact(tmp_path):
    data = make_tiny_dataset(DATA)
    straight = train(make_tiny_config(tmp_path / "straight", steps=6), progress=False, dataset=data)
    run = tmp_path / "killed"
    proc = _worker(run, "train.steps=6", env=_env(**{KILL_HOOK_ENV: "step_0000004/ema.safetensors"}))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_0000002"]
    partial = [p for p in ckpts.iterdir() if p.name.startswith(".step_0000004.tmp-")]
    assert len(partial) == 1 and (partial[0] / "ema.safetensors").is_file()  # the half-written one
    assert find_latest_checkpoint(ckpts) == ckpts / "step_0000002"  # never picked up
    assert load_state(ckpts / "step_0000002")["step"] == 2  # the previous checkpoint is intact
    resumed = train(make_tiny_config(run, steps=6), resume=run, progress=False, dataset=data)
    assert resumed.step == 6
    for which in ("model", "ema"):
        _assert_bitwise(_weights(tmp_path / "straight", 6, which), _weights(run, 6, which))
    assert not list(ckpts.glob(".step_*"))  # the partial folder was cleaned up by the next save
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]
    assert straight.step == 6


def test_kill_9_mid_training_then_resume_is_bitwise_exact(tmp_path):
    data = make_tiny_dataset(DATA)
    train(make_tiny_config(tmp_path / "straight", steps=8, ckpt_every=3, keep_last=2), progress=False, dataset=data)
    run = tmp_path / "killed"
    proc = _worker(run, "--pause-at-step", "5", "train.steps=8", "train.ckpt_every=3", "train.keep_last=2")
    deadline = time.monotonic() + 600
    while not (run / "paused-0").is_file():  # the worker stops after step 5's update, before any checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _metric_steps(run) == [1, 2, 3, 4]  # step 4 was logged after the last checkpoint (step 3)
    resumed = train(make_tiny_config(run, steps=8, ckpt_every=3, keep_last=2), resume=run, progress=False, dataset=data)
    assert resumed.step == 8
    for which in ("model", "ema"):
        _assert_bitwise(_weights(tmp_path / "straight", 8, which), _weights(run, 8, which))
    assert _metric_steps(run) == list(range(1, 9))  # the orphaned record of step 4 was dropped: no duplicate
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]  # keep_last


@pytest.mark.parametrize("inpaint", [False, True])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, inpaint):
    """Inpainting too: each sample's random mask comes from its own stream (a stream per piece of the
    batch gave 7 of 8 images other masks at grad_accum_steps=2, and mask weights 1.5e-3 apart).

    The weights alone cannot see a missing 1 / grad_accum_steps on the pieces' losses: gradient
    clipping and AdamW's update do not change when the gradients are scaled. The logged gradient norm
    (before clipping) does, so it is compared too."""
    data = make_tiny_dataset(DATA)

    def run(name: str, accum: int):
        config = make_tiny_config(tmp_path / name, steps=3, grad_accum_steps=accum)
        config.model.inpaint = inpaint
        return train(config, progress=False, dataset=data)

    one, two, four = run("one", 1), run("two", 2), run("four", 4)
    assert abs(one.final_loss - two.final_loss) < 1e-6 and abs(one.final_loss - four.final_loss) < 1e-6
    for name in ("two", "four"):
        assert _max_diff(_weights(tmp_path / "one", 3), _weights(tmp_path / name, 3)) < 1e-6
    grad_norms = {
        name: [json.loads(line)["grad_norm"] for line in open(tmp_path / name / "metrics.jsonl")]
        for name in ("one", "two", "four")
    }
    assert len(grad_norms["one"]) == 3 and min(grad_norms["one"]) > 0
    for name in ("two", "four"):
        assert grad_norms[name] == pytest.approx(grad_norms["one"], rel=1e-5), name
    with pytest.raises(ConfigError, match="grad_accum_steps=3"):
        make_tiny_config(tmp_path / "bad", grad_accum_steps=3)


def test_rank_slices_make_up_the_global_batch_and_draws_ignore_the_split():
    whole = iter(EpochBatchSampler(20, 8, seed=3, start_epoch=1, start_batch=1))
    ranks = [
        iter(EpochBatchSampler(20, 8, seed=3, start_epoch=1, start_batch=1, rank=r, world_size=4)) for r in range(4)
    ]
    for _ in range(3):
        assert next(whole) == [i for it in ranks for i in next(it)]
    with pytest.raises(ConfigError, match="cannot be split over 3 ranks"):
        EpochBatchSampler(20, 8, seed=0, world_size=3)
    process = build_process(make_tiny_config("unused").diffusion)
    full = draw_streams(process, (1, 4, 4), range(0, 6), seed=0, batch_index=7, device=torch.device("cpu"))
    parts = [draw_streams(process, (1, 4, 4), r, seed=0, batch_index=7, device=torch.device("cpu"))
             for r in (range(0, 2), range(2, 6))]  # fmt: skip
    for a, b0, b1 in zip(full, *parts):
        assert torch.equal(a, torch.cat([b0, b1]))
    other = draw_streams(process, (1, 4, 4), range(0, 6), seed=0, batch_index=8, device=torch.device("cpu"))
    assert not torch.equal(full[1], other[1])  # the next batch draws fresh noise


def _loss_and_grads(model: DiT, every: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Loss, gradients and bytes of tensors saved for backward, with every k-th block checkpointed."""
    model.grad_checkpoint_every = every
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t, y = torch.tensor([3.0, 100.0, 500.0, 999.0]), torch.tensor([0, 1, 2, 3])
    saved = {"bytes": 0}

    def pack(tensor):
        saved["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x, t, y).pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad], saved["bytes"]


def test_activation_checkpointing_keeps_loss_and_grads_and_saves_memory(tiny_config):
    tiny_config.model.depth = 4
    model = build_model(tiny_config, seed=0).eval()  # eval: no label dropout; checkpointing follows grad mode
    with torch.no_grad():  # leave adaLN-Zero's identity init so every block contributes gradients
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    loss, grads, stored = _loss_and_grads(model, 0)
    for every, fraction in ((1, 0.5), (2, 0.8)):
        loss_k, grads_k, stored_k = _loss_and_grads(model, every)
        assert torch.equal(loss, loss_k)
        for a, b in zip(grads, grads_k):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert stored_k < fraction * stored, (every, stored_k, stored)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    data = make_tiny_dataset(DATA)
    fp32 = train(make_tiny_config(tmp_path / "fp32", steps=3, log_every=1), progress=False, dataset=data)
    bf16 = train(make_tiny_config(tmp_path / "bf16", steps=3, precision="bf16"), progress=False, dataset=data)
    first = [json.loads(open(tmp_path / r / "metrics.jsonl").readline())["loss"] for r in ("fp32", "bf16")]
    assert abs(first[0] - first[1]) < 0.02 * first[0]  # same draws, so the same loss up to bf16 rounding
    assert bf16.step == 3 and _max_diff(_weights(tmp_path / "bf16", 3), _weights(tmp_path / "fp32", 3)) < 0.05
    initial = build_model(make_tiny_config(tmp_path / "x"), seed=0).state_dict()
    assert _max_diff({k: v for k, v in initial.items()}, _weights(tmp_path / "bf16", 3)) > 1e-4  # it trained
    assert fp32.step == 3


def test_missing_tensorboard_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    config = make_tiny_config(tmp_path / "run", tensorboard=True)
    with pytest.raises(ConfigError, match="train.tensorboard=true needs the `tensorboard` package"):
        train(config, progress=False, dataset=make_tiny_dataset(DATA))


@pytest.mark.slow
@pytest.mark.parametrize("scope", [True, "blocks"])
def test_compiled_training_matches_eager(tmp_path, scope):
    torch._dynamo.reset()
    data = make_tiny_dataset(DATA)
    train(make_tiny_config(tmp_path / "eager", steps=2), progress=False, dataset=data)
    torch._dynamo.utils.counters.clear()
    train(make_tiny_config(tmp_path / "compiled", steps=2, compile=scope), progress=False, dataset=data)
    # It did compile; per block, both blocks ran one shared graph (a graph per block would be 2).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for which in ("model", "ema"):
        assert _max_diff(_weights(tmp_path / "eager", 2, which), _weights(tmp_path / "compiled", 2, which)) < 1e-5
    assert "_orig_mod" not in "".join(_weights(tmp_path / "compiled", 2))  # saved unwrapped


@pytest.mark.slow
def test_block_compile_under_fsdp_ddp_and_checkpointing_matches_eager(runs, tmp_path):
    """train.compile=blocks compiles the blocks inside the DDP / FSDP2 wrappers (after sharding) and
    under activation checkpointing; every combination ends with the eager single-process weights."""
    _torchrun(
        [str(tmp_path / "fsdp"), "train.steps=4", "train.parallel=fsdp", "train.compile=blocks"],
        [str(tmp_path / "ddp"), "train.steps=4", "train.compile=blocks", "train.grad_checkpoint_every=1"],
    )
    for run in ("fsdp", "ddp"):
        for which in ("model", "ema"):
            # Compiled: other kernels, so 1e-6 rather than MATCH (measured 2.1e-7)
            assert _max_diff(_weights(runs / "single", 4, which), _weights(tmp_path / run, 4, which)) < 1e-6


@pytest.mark.slow
def test_compiled_model_matches_eager(tiny_config):
    # eval(): label dropout off, so both passes see the same labels (training draws dropout outside the
    # model, per sample). reset(): a fresh dynamo cache, so shapes compiled by earlier tests do not turn
    # this compile dynamic.
    torch._dynamo.reset()
    model = build_model(tiny_config, seed=0).eval()
    compiled = torch.compile(model)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 50.0, 999.0]), torch.tensor([0, 1, 2])
    eager_out = model(x, t, y)
    eager_out.pow(2).mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    out = compiled(x, t, y)
    out.pow(2).mean().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for a, p in zip(eager_grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ddp_kill_9_then_resume_on_two_processes_is_bitwise_exact(tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER)]
    cmd += [str(run), "--pause-at-step", "4", "train.steps=6", "train.ckpt_every=3"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 600
    while not ((run / "paused-0").is_file() and (run / "paused-1").is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    for rank in (0, 1):  # torchrun starts each rank in its own session: kill them one by one, then the agent
        os.kill(int((run / f"paused-{rank}").read_text()), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert find_latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_0000003"
    _torchrun(
        [str(tmp_path / "straight"), "train.steps=6", "train.ckpt_every=3"],
        [str(run), "--resume", str(run), "train.steps=6", "train.ckpt_every=3"],
    )
    for which in ("model", "ema"):
        _assert_bitwise(_weights(tmp_path / "straight", 6, which), _weights(run, 6, which))
    assert _metric_steps(run) == list(range(1, 7))


def test_fused_adamw_matches_the_default_kernel(tmp_path):
    data = make_tiny_dataset(DATA)
    train(make_tiny_config(tmp_path / "plain", steps=2, fused_adamw=False), progress=False, dataset=data)
    train(make_tiny_config(tmp_path / "fused", steps=2, fused_adamw=True), progress=False, dataset=data)
    assert _max_diff(_weights(tmp_path / "plain", 2), _weights(tmp_path / "fused", 2)) < 1e-6


@pytest.mark.parametrize(("setting", "fused"), [(None, True), (True, True), (False, None)])
def test_fused_adamw_setting_picks_the_kernel(tmp_path, monkeypatch, setting, fused):
    """null (the default) takes the fused kernel where PyTorch has one (it has for CPU floats)."""
    import ditkit.train as train_mod

    made = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append(self.defaults["fused"])

    monkeypatch.setattr(train_mod.torch.optim, "AdamW", RecordingAdamW)
    config = make_tiny_config(tmp_path / "run", steps=1, fused_adamw=setting)
    train(config, progress=False, dataset=make_tiny_dataset(DATA))
    assert made == [fused]


def test_fused_adamw_falls_back_unless_asked_for(monkeypatch):
    """Without a fused kernel, null quietly takes the default one and true is a clear error."""
    import ditkit.train as train_mod

    class NoFusedAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            if kwargs.get("fused"):
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(train_mod.torch.optim, "AdamW", NoFusedAdamW)
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert train_mod.make_adamw(params, None, lr=1e-3).defaults["fused"] is None
    with pytest.raises(ConfigError, match="train.fused_adamw=true is not available here: `fused=True` requires"):
        train_mod.make_adamw(params, True, lr=1e-3)


def test_metrics_reach_tensorboard_and_wandb_when_asked(tmp_path, monkeypatch):
    import types

    seen = {"tb": [], "wandb": [], "closed": []}

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            seen["log_dir"] = log_dir
            seen.setdefault("purge_step", []).append(purge_step)

        def add_scalar(self, tag, value, step):
            seen["tb"].append((tag, value, step))

        def close(self):
            seen["closed"].append("tb")

    class FakeRun:
        def log(self, scalars, step):
            seen["wandb"].append((step, scalars))

        def finish(self):
            seen["closed"].append("wandb")

    def init(project, dir, config):
        seen["project"] = project
        return FakeRun()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = make_tiny_config(tmp_path / "run", steps=2, tensorboard=True, wandb_project="ditkit-test")
    train(config, progress=False, dataset=make_tiny_dataset(DATA))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert ("train/loss", records[1]["loss"], 2) in seen["tb"]
    assert seen["wandb"][0][0] == 1 and seen["wandb"][0][1]["loss"] == records[0]["loss"]
    assert seen["log_dir"] == str(tmp_path / "run" / "tensorboard") and seen["project"] == "ditkit-test"
    assert sorted(seen["closed"]) == ["tb", "wandb"]
    # Resumed from step 2, TensorBoard drops whatever an earlier timeline logged after it
    config = make_tiny_config(tmp_path / "run", steps=3, tensorboard=True, wandb_project="ditkit-test")
    train(config, resume=tmp_path / "run", progress=False, dataset=make_tiny_dataset(DATA))
    assert seen["purge_step"] == [1, 3] and any(tag == "train/loss" and step == 3 for tag, _, step in seen["tb"])


def test_torchrun_ranks_take_a_checked_device(monkeypatch):
    """Under torchrun train.device goes through resolve_device as on one process: mps/xpu trained on
    the CPU over gloo without a word, 'cuda' without CUDA and LOCAL_RANK past the last GPU died inside
    torch.cuda.set_device with no name. Checked here before any process group is made."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': this machine .* has no CUDA GPU"):
        init_distributed("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for name in ("mps", "xpu", "xpu:1"):
        with pytest.raises(ValueError, match=f"train.device='{name}': .* not supported under torchrun"):
            init_distributed(name)
    assert choose_device("auto", 2, 1) == torch.device("cpu")  # no GPU: every rank on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 has no GPU of its own: this machine has 1 CUDA GPU"):
        init_distributed("auto")
    assert choose_device("cuda", 2, 0) == choose_device("auto", 4, 0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="train.device='cuda:0' names one GPU"):
        choose_device("cuda:0", 2, 0)
    assert choose_device("cpu", 2, 5) == torch.device("cpu")  # any number of CPU ranks
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device("cuda", 2, 1) == torch.device("cuda", 1)


def test_new_train_keys_are_validated(tmp_path):
    from ditkit.config import config_from_dict

    for bad, key in (
        ({"parallel": "zero"}, "train.parallel"),
        ({"grad_accum_steps": 0}, "train.grad_accum_steps"),
        ({"grad_checkpoint_every": -1}, "train.grad_checkpoint_every"),
        ({"sample_every": -2}, "train.sample_every"),
        ({"compile": "yes"}, "train.compile"),
    ):
        with pytest.raises(ConfigError, match=key):
            config_from_dict({"train": bad})


_FSDP_ON_CPU_WITH_A_GPU_VISIBLE = """
import sys
import torch
import torch.distributed as dist
from ditkit.config import ModelConfig
from ditkit.distributed import shard_blocks
from ditkit.models import DiT

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
# As on a machine with a GPU: fully_shard's default mesh takes torch._C._get_accelerator()'s device type
# (PyTorch 2.11-2.13). On this CPU build any CUDA call then fails, as set_device(1) did on one GPU.
torch.cuda.is_available = lambda: True
torch._C._get_accelerator = lambda: torch.device("cuda")
model = DiT(ModelConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2))
shard_blocks(model, torch.device("cpu"))
assert all(p.device.type == "cpu" and p.device_mesh.device_type == "cpu" for p in model.parameters())
dist.destroy_process_group()
print("sharded on cpu")
"""


def test_fsdp_on_cpu_shards_on_cpu_when_a_gpu_is_visible(tmp_path):
    # fully_shard's default mesh is on CUDA whenever a GPU is visible: CPU training under torchrun on a
    # one-GPU machine failed with 'invalid device ordinal' on rank 1 (found on an H100 machine).
    script = [sys.executable, "-c", _FSDP_ON_CPU_WITH_A_GPU_VISIBLE, str(tmp_path / "store")]
    proc = subprocess.run(script, env=_env(), capture_output=True, text=True, timeout=120)
    _check(proc)
    assert "sharded on cpu" in proc.stdout
