import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import ditkit.checkpoint as ckpt_mod
import ditkit.train as train_mod
from conftest import make_tiny_config, make_tiny_dataset
from ditkit.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_config_from_checkpoint,
    load_state,
    resolve_checkpoint,
    save_checkpoint,
)
from ditkit.config import ConfigError, config_to_dict
from ditkit.train import EpochBatchSampler, build_model, load_model, train


def _weights(path, which="model"):
    return load_file(path / f"{which}.safetensors")


def test_training_writes_checkpoints_metrics_and_config(tiny_config, tiny_dataset):
    result = train(tiny_config, progress=False, dataset=tiny_dataset)
    out = tiny_config.train.out_dir
    assert result.step == 4 and result.checkpoint.name == "step_0000004"
    names = sorted(p.name for p in (result.out_dir / "checkpoints").iterdir())
    assert names == ["step_0000002", "step_0000004"]
    records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 for r in records)
    assert load_config_from_checkpoint(result.checkpoint) == tiny_config
    meta = json.loads(open(result.checkpoint / "config.json").read())
    assert meta == config_to_dict(tiny_config)


def test_loss_falls_on_tiny_dataset(tmp_path):
    config = make_tiny_config(tmp_path / "run", steps=150, lr=2e-3, ckpt_every=1000)
    train(config, progress=False, dataset=make_tiny_dataset(64))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.5 * first, (first, last)


def test_state_file_loads_with_weights_only(tiny_config, tiny_dataset):
    result = train(tiny_config, progress=False, dataset=tiny_dataset)
    state = torch.load(result.checkpoint / "state.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state and isinstance(state["rng"][0]["cpu"], torch.Tensor)


def test_checkpoint_round_trip_gives_identical_outputs(tiny_config, tiny_dataset):
    result = train(tiny_config, progress=False, dataset=tiny_dataset)
    for which in ("model", "ema"):
        model, config = load_model(result.checkpoint, which)
        reference = build_model(config)
        reference.load_state_dict(_weights(result.checkpoint, which))
        reference.eval()
        x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 50.0, 999.0]), torch.tensor([0, 1, 4])
        assert torch.equal(model(x, t, y), reference(x, t, y))
        assert not model.pos_embed.requires_grad
    # Model and EMA weights differ after training (the EMA lags).
    assert not torch.equal(
        _weights(result.checkpoint, "model")["final_layer.linear.weight"],
        _weights(result.checkpoint, "ema")["final_layer.linear.weight"],
    )
    # The safetensors file describes itself.
    from safetensors import safe_open

    with safe_open(str(result.checkpoint / "ema.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["config"]) == config_to_dict(tiny_config)


def test_resume_is_bitwise_identical_to_uninterrupted_run(tmp_path):
    data = make_tiny_dataset(20)  # 20 images, batch 8: epochs end mid-run, so the data position matters
    straight = train(make_tiny_config(tmp_path / "a", steps=7, ckpt_every=100), progress=False, dataset=data)
    first = train(make_tiny_config(tmp_path / "b", steps=3, ckpt_every=100), progress=False, dataset=data)
    assert first.step == 3
    resumed = train(
        make_tiny_config(tmp_path / "b", steps=7, ckpt_every=100), resume=tmp_path / "b", progress=False, dataset=data
    )
    assert resumed.step == 7
    for which in ("model", "ema"):
        a, b = _weights(straight.checkpoint, which), _weights(resumed.checkpoint, which)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (which, key)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == list(range(1, 8))


def test_resume_from_a_different_model_is_refused(tmp_path, tiny_dataset):
    train(make_tiny_config(tmp_path / "a"), progress=False, dataset=tiny_dataset)
    other = make_tiny_config(tmp_path / "b")
    other.model.depth = 3
    with pytest.raises(ConfigError, match="model config differs from this run's: model.depth=2 there, 3 here"):
        train(other, resume=tmp_path / "a", progress=False, dataset=tiny_dataset)


def test_existing_run_is_not_overwritten_without_resume(tiny_config, tiny_dataset):
    result = train(tiny_config, progress=False, dataset=tiny_dataset)
    before = _weights(result.checkpoint)
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config, progress=False, dataset=tiny_dataset)
    after = _weights(result.checkpoint)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_config, tiny_dataset, monkeypatch):
    model = build_model(tiny_config, seed=0)
    path = tmp_path / "ck" / "step_0000001"
    save_checkpoint(path, config=tiny_config, model=model, ema=model, state={"step": 1})
    original = _weights(path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    calls = {"n": 0}
    real_save = ckpt_mod.save_file

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, config=tiny_config, model=model, ema=model, state={"step": 1})
    kept = _weights(path)
    assert all(torch.equal(original[k], kept[k]) for k in original)
    assert resolve_checkpoint(tmp_path / "ck") == path


def test_incomplete_checkpoints_are_skipped_and_named(tmp_path, tiny_config):
    model = build_model(tiny_config, seed=0)
    good = save_checkpoint(tmp_path / "step_0000002", config=tiny_config, model=model, ema=model)
    broken = tmp_path / "step_0000005"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert find_latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_config_from_checkpoint(broken)
    with pytest.raises(CheckpointError, match="state.pt"):
        load_state(good)  # saved without training state: cannot be resumed
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_corrupt_weights_file_is_named(tmp_path, tiny_config):
    model = build_model(tiny_config, seed=0)
    path = save_checkpoint(tmp_path / "step_0000001", config=tiny_config, model=model, ema=model)
    (path / "ema.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        load_model(path)


class _Pickled:  # a class a weights-only load must refuse
    pass


def test_training_state_with_pickled_objects_is_refused_briefly(tmp_path, tiny_config):
    model = build_model(tiny_config, seed=0)
    path = save_checkpoint(tmp_path / "step_0000001", config=tiny_config, model=model, ema=model)
    torch.save({"step": 1, "sneaky": _Pickled()}, path / "state.pt")
    with pytest.raises(CheckpointError, match=r"state.pt could not be loaded safely \(UnpicklingError: ") as err:
        load_state(path)
    # One line naming the refused class, without PyTorch's suggestion to load with weights_only=False.
    assert "_Pickled" in str(err.value) and "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_nonfinite_losses_skip_steps_then_stop(tiny_config, tiny_dataset, monkeypatch):
    def nan_loss(model, process, x0, cond, **kwargs):
        return (model(x0, torch.zeros(len(x0)), cond) * float("nan")).mean()

    monkeypatch.setattr(train_mod, "diffusion_loss", nan_loss)
    tiny_config.train.steps = 50
    with pytest.raises(FloatingPointError, match="consecutive non-finite steps ending at step 1"):
        train(tiny_config, progress=False, dataset=tiny_dataset)
    assert find_latest_checkpoint(tiny_config.train.out_dir + "/checkpoints") is None


class _OverflowingScaler:
    """GradScaler's interface, enabled on CPU: the first `overflows` steps' gradients overflow (set to
    inf by unscale_, as an fp16 overflow leaves them), and each overflow halves the scale."""

    def __init__(self, overflows: int, scale: float) -> None:
        self.overflows, self.scale_value, self.found_inf = overflows, scale, False

    def is_enabled(self) -> bool:
        return True

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer) -> None:
        self.found_inf, self.overflows = self.overflows > 0, self.overflows - 1
        if self.found_inf:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.fill_(float("inf"))

    def get_scale(self) -> float:
        return self.scale_value

    def step(self, optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        self.scale_value /= 2 if self.found_inf else 1

    def state_dict(self) -> dict:
        return {"scale": self.scale_value}


@pytest.mark.parametrize(
    "start_scale, nan_loss, stops", [(2.0**16, False, False), (0.5, False, True), (2.0**16, True, True)]
)
def test_fp16_loss_scale_backoff_is_not_counted_as_divergence(
    tiny_config, tiny_dataset, monkeypatch, start_scale, nan_loss, stops
):
    """12 overflows in a row while the scale comes down from 2^16 are the scaler's business; below a
    scale of 1 the same overflows stop the run after MAX_CONSECUTIVE_NONFINITE, and so does a
    non-finite loss at any scale (that is divergence, not the scale)."""
    scaler = _OverflowingScaler(overflows=12, scale=start_scale)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kwargs: scaler)
    if nan_loss:
        monkeypatch.setattr(train_mod, "diffusion_loss", lambda model, process, x0, cond, **kwargs: (
            model(x0, torch.zeros(len(x0)), cond) * float("nan")).mean())  # fmt: skip
    tiny_config.train.steps = 2
    if stops:
        with pytest.raises(FloatingPointError, match="10 consecutive non-finite steps ending at step 1"):
            train(tiny_config, progress=False, dataset=tiny_dataset)
        return
    result = train(tiny_config, progress=False, dataset=tiny_dataset)
    assert result.step == 2 and scaler.scale_value == 2.0**16 / 2**12
    records = [json.loads(line) for line in open(f"{tiny_config.train.out_dir}/metrics.jsonl")]
    assert records[-1]["skipped_steps"] == 12


def test_epoch_batch_sampler_covers_each_epoch_and_resumes_mid_epoch():
    sampler = EpochBatchSampler(10, 3, seed=1)
    it = iter(sampler)
    epoch0 = [next(it) for _ in range(3)]
    assert len({i for batch in epoch0 for i in batch}) == 9  # no repeats within an epoch
    later = [next(it) for _ in range(4)]
    resumed = iter(EpochBatchSampler(10, 3, seed=1, start_epoch=1, start_batch=1))
    assert [next(resumed) for _ in range(3)] == later[1:]
    with pytest.raises(ConfigError, match="batch_size"):
        EpochBatchSampler(2, 3, seed=0)


def test_a_sampler_started_past_the_end_of_an_epoch_starts_the_next_and_says_so():
    """The sampler owns the rule (train reads the position back from it instead of repeating it)."""
    sampler = EpochBatchSampler(10, 3, seed=1, start_epoch=2, start_batch=5)  # 3 batches per epoch
    assert (sampler.start_epoch, sampler.start_batch) == (3, 0)
    assert next(iter(sampler)) == next(iter(EpochBatchSampler(10, 3, seed=1, start_epoch=3)))
    assert (EpochBatchSampler(10, 3, seed=1, start_epoch=2, start_batch=2).start_batch) == 2  # valid: kept


def test_build_model_seed_is_reproducible_and_leaves_global_rng(tiny_config):
    state = torch.get_rng_state()
    a, b = build_model(tiny_config, seed=3), build_model(tiny_config, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_training_on_an_image_folder_with_workers_and_flips(tmp_path):
    """The ImageNet-layout path end to end: RGB folder, resize/crop, random flips, a worker process."""
    import numpy as np
    from PIL import Image

    from ditkit.config import Config, DataConfig, ModelConfig, TrainConfig

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            size = (20 + 3 * i, 14 + 2 * i)
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png"
            )
    config = Config(
        model=ModelConfig(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=2, learn_sigma=True),
        data=DataConfig(dataset="folder", root=str(tmp_path / "images"), image_size=8, channels=3, hflip=True),
        train=TrainConfig(
            out_dir=str(tmp_path / "run"), steps=3, batch_size=4, log_every=1, ckpt_every=3, num_workers=1, device="cpu"
        ),
    )
    result = train(config, progress=False)
    assert result.step == 3 and math.isfinite(result.final_loss)
    model, saved = load_model(result.checkpoint)
    assert saved.data.root == str(tmp_path / "images")
    assert model(torch.zeros(1, 3, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long)).shape == (1, 6, 8, 8)


def test_too_many_classes_in_the_data_is_refused(tmp_path, tiny_dataset):
    config = make_tiny_config(tmp_path / "run")
    config.model.num_classes = 2  # the tiny dataset has 4
    with pytest.raises(ConfigError, match="4 classes but model.num_classes=2"):
        train(config, progress=False, dataset=tiny_dataset)


def test_weights_that_do_not_match_the_config_are_named(tmp_path, tiny_config):
    from safetensors.torch import save_file

    model = build_model(tiny_config, seed=0)
    path = save_checkpoint(tmp_path / "step_0000001", config=tiny_config, model=model, ema=model)
    state = load_file(path / "ema.safetensors")
    state.pop("final_layer.linear.bias")
    save_file(state, path / "ema.safetensors")
    with pytest.raises(CheckpointError, match="ema.safetensors does not match its config.json"):
        load_model(path)


def _steps_in(path):
    return [json.loads(line)["step"] for line in open(path)]


def test_resuming_from_an_older_checkpoint_moves_the_later_ones_aside(tmp_path, caplog):
    """Rolling back: the checkpoint just written survives keep_last, `--resume RUN_DIR` continues the new
    timeline, and the abandoned later checkpoints are moved (unchanged), not deleted."""
    data, run = make_tiny_dataset(20), tmp_path / "run"
    train(make_tiny_config(run, steps=6, ckpt_every=2, keep_last=3), progress=False, dataset=data)
    later = {name: _weights(run / "checkpoints" / name) for name in ("step_0000004", "step_0000006")}
    with caplog.at_level("WARNING", logger="ditkit.train"):
        result = train(
            make_tiny_config(run, steps=3, ckpt_every=2, keep_last=1),
            resume=run / "checkpoints" / "step_0000002",
            progress=False,
            dataset=data,
        )
    assert result.checkpoint == run / "checkpoints" / "step_0000003" and result.checkpoint.is_dir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003"]
    assert resolve_checkpoint(run) == result.checkpoint
    (aside,) = run.glob("abandoned-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == sorted(later)
    for name, weights in later.items():
        moved = _weights(aside / "checkpoints" / name)
        assert all(torch.equal(weights[k], moved[k]) for k in weights)
    assert _steps_in(aside / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert _steps_in(run / "metrics.jsonl") == [1, 2, 3]
    assert str(aside) in caplog.text and "step_0000004, step_0000006" in caplog.text


def test_a_half_written_later_save_does_not_make_a_crash_resume_a_roll_back(tmp_path):
    """Killed while writing step 6: resuming from the newest complete checkpoint (4) is an ordinary
    resume; the half-written folder is deleted by the next save, not moved aside as an abandoned timeline."""
    data, run = make_tiny_dataset(20), tmp_path / "run"
    train(make_tiny_config(run, steps=4, ckpt_every=2), progress=False, dataset=data)
    partial = run / "checkpoints" / ".step_0000006.tmp-12345"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    result = train(make_tiny_config(run, steps=6, ckpt_every=2), resume=run, progress=False, dataset=data)
    assert result.step == 6 and not list(run.glob("abandoned-*")) and not partial.exists()
    assert _steps_in(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]


def test_resume_into_a_folder_holding_another_run_is_refused(tmp_path):
    data = make_tiny_dataset(20)
    a, b = tmp_path / "a", tmp_path / "b"
    train(make_tiny_config(a, steps=2, seed=1), progress=False, dataset=data)
    train(make_tiny_config(b, steps=2, seed=2), progress=False, dataset=data)
    before, metrics = _weights(b / "checkpoints" / "step_0000002"), (b / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="another run") as err:
        train(make_tiny_config(b, steps=4, seed=1), resume=a, progress=False, dataset=data)
    assert str(a / "checkpoints" / "step_0000002") in str(err.value) and str(b / "checkpoints") in str(err.value)
    after = _weights(b / "checkpoints" / "step_0000002")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (b / "metrics.jsonl").read_text() == metrics
    # Into an empty folder it is allowed: the continuation starts its own records there.
    result = train(make_tiny_config(tmp_path / "c", steps=3, seed=1), resume=a, progress=False, dataset=data)
    assert result.step == 3 and _steps_in(tmp_path / "c" / "metrics.jsonl") == [3]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 4}, "train.batch_size was 8 when it was saved, but is 4 in this run"),
        ({"seed": 5}, "train.seed was 0 when it was saved, but is 5 in this run"),
        ({"items": 24}, "the number of training items was 20 when it was saved, but is 24 in this run"),
    ],
)
def test_resume_refuses_a_change_of_what_the_data_position_means(tmp_path, change, message):
    run = tmp_path / "run"
    train(make_tiny_config(run, steps=2), progress=False, dataset=make_tiny_dataset(20))
    config = make_tiny_config(run, steps=4, **{k: v for k, v in change.items() if k != "items"})
    with pytest.raises(ConfigError, match=message):
        train(config, resume=run, progress=False, dataset=make_tiny_dataset(change.get("items", 20)))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]


def test_checkpoint_without_data_position_settings_still_resumes_and_wraps(tmp_path, caplog):
    """An older checkpoint (no num_items / batch_size / seed) resumes; a saved position past the end of an
    epoch (its settings changed under it) rolls over instead of growing forever."""
    data, run = make_tiny_dataset(20), tmp_path / "run"  # 2 batches of 8 per epoch
    train(make_tiny_config(run, steps=2), progress=False, dataset=data)
    path = run / "checkpoints" / "step_0000002"
    state = torch.load(path / "state.pt", weights_only=True)
    assert (state["num_items"], state["batch_size"], state["seed"]) == (20, 8, 0)
    for key in ("num_items", "batch_size", "seed"):
        del state[key]
    state["epoch"], state["batch_in_epoch"] = 0, 8  # as a run with a larger dataset would have saved it
    torch.save(state, path / "state.pt")
    with caplog.at_level("WARNING", logger="ditkit.train"):
        result = train(make_tiny_config(run, steps=5, ckpt_every=100), resume=run, progress=False, dataset=data)
    saved = load_state(result.checkpoint)
    assert result.step == 5 and (saved["epoch"], saved["batch_in_epoch"]) == (2, 1)
    assert "(epoch 0, batch 8) lies past the end of an epoch of 2 batches; continuing at the start of epoch 1" in (
        caplog.text
    )


def test_max_minutes_counts_the_whole_loop_and_is_checked_before_each_step(tmp_path, monkeypatch):
    """With a fake clock: each sample grid 'takes' 10 s and steps take none, so a 30 s budget allows 3
    steps; resumed with the same budget, the run takes no further step and still returns its checkpoint."""
    now = [0.0]
    monkeypatch.setattr(train_mod, "_clock", lambda: now[0])

    def slow_grid(*args, **kwargs):
        now[0] += 10.0

    monkeypatch.setattr(train_mod, "save_sample_grid", slow_grid)
    data, run = make_tiny_dataset(20), tmp_path / "run"
    config = make_tiny_config(run, steps=50, ckpt_every=100, sample_every=1, max_minutes=0.5)
    first = train(config, progress=False, dataset=data)
    assert first.step == 3 and first.checkpoint == run / "checkpoints" / "step_0000003"
    assert load_state(first.checkpoint)["train_seconds"] == 30.0 and first.train_seconds == 30.0
    again = train(config, resume=run, progress=False, dataset=data)
    assert again.step == 3 and again.checkpoint.is_dir() and load_state(again.checkpoint)["step"] == 3
    assert _steps_in(run / "metrics.jsonl") == [1, 2, 3]


def _fake_clock(monkeypatch) -> list[float]:
    """A fake training clock on which each step takes 1 s, each checkpoint save 10 s and each sample
    grid 5 s (the grid itself is not drawn)."""
    now = [0.0]
    real_ema, real_save = train_mod.update_ema, train_mod.save_checkpoint

    def timed(seconds, real):
        def call(*args, **kwargs):
            now[0] += seconds
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(train_mod, "_clock", lambda: now[0])
    monkeypatch.setattr(train_mod, "update_ema", timed(1.0, real_ema))
    monkeypatch.setattr(train_mod, "save_checkpoint", timed(10.0, real_save))
    monkeypatch.setattr(train_mod, "save_sample_grid", timed(5.0, lambda *args, **kwargs: None))
    return now


def _records(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def test_img_per_s_leaves_out_checkpoints_and_sample_grids(tmp_path, monkeypatch):
    """Every window is 2 steps of 8 images in 2 s of steps: 8 img/s, whatever checkpoint (10 s) or grid
    (5 s) fell inside it; train_seconds still counts them."""
    _fake_clock(monkeypatch)
    run = tmp_path / "run"
    config = make_tiny_config(run, steps=8, ckpt_every=3, log_every=2, sample_every=3, keep_last=1)
    train(config, progress=False, dataset=make_tiny_dataset(20))
    records = _records(run)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert [r["img_per_s"] for r in records] == [8.0, 8.0, 8.0, 8.0]
    assert records[-1]["train_seconds"] == 8 + 2 * 10 + 2 * 5  # 8 steps, checkpoints and grids at 3 and 6


def test_a_resumed_run_logs_what_the_uninterrupted_run_logged(tmp_path, monkeypatch):
    """The logging window is saved with each checkpoint: resumed mid-window (log_every=4, a run of 3
    steps), the record at step 4 still averages steps 1-4 over their 4 s, as the uninterrupted run's
    does. The first run's own last record (step 3) leaves the window open. A checkpoint from before
    the window was saved, or a resume with another log_every (whose grid the window is not on), starts
    an empty one."""
    import shutil

    _fake_clock(monkeypatch)
    data = make_tiny_dataset(20)

    def config(name, steps, log_every=4):
        return make_tiny_config(tmp_path / name, steps=steps, ckpt_every=3, log_every=log_every)

    train(config("straight", 8), progress=False, dataset=data)
    first = train(config("resumed", 3), progress=False, dataset=data)
    state = load_state(first.checkpoint)
    assert (state["window_steps"], state["window_seconds"], state["skipped_steps"]) == (3, 3.0, 0)
    window_loss = state["window_loss"]
    shutil.copytree(tmp_path / "resumed", tmp_path / "older")
    shutil.copytree(tmp_path / "resumed", tmp_path / "relogged")
    for key in ("window_loss", "window_steps", "window_seconds", "skipped_steps", "window_log_every"):
        del state[key]
    torch.save(state, tmp_path / "older" / "checkpoints" / first.checkpoint.name / "state.pt")  # an older ditkit's
    train(config("resumed", 8), resume=tmp_path / "resumed", progress=False, dataset=data)
    train(config("older", 8), resume=tmp_path / "older", progress=False, dataset=data)
    train(config("relogged", 8, log_every=2), resume=tmp_path / "relogged", progress=False, dataset=data)

    def by_step(name):
        return {r["step"]: {k: v for k, v in r.items() if k != "train_seconds"} for r in _records(tmp_path / name)}

    straight, resumed, older, relogged = by_step("straight"), by_step("resumed"), by_step("older"), by_step("relogged")
    assert list(straight) == [4, 8] and list(resumed) == [3, 4, 8] and list(older) == [3, 4, 8]
    assert resumed[3]["loss"] == window_loss / 3 and resumed[3]["img_per_s"] == 8.0
    assert resumed[4] == straight[4] and resumed[8] == straight[8]
    assert straight[4]["img_per_s"] == 8.0  # 4 steps in 4 s: the checkpoint at step 3 is left out
    # The older checkpoint's first window holds step 4 alone: that step's loss, 8 images in 1 s.
    assert older[4]["loss"] == pytest.approx(4 * straight[4]["loss"] - window_loss, rel=1e-5)
    assert older[4]["img_per_s"] == 8.0 and older[8] == straight[8]
    # On a log_every=2 grid, the record at step 4 is steps 3-4 of that grid, i.e. step 4 alone after a resume
    # at 3: not the steps 1-3 of the first run's log_every=4 window.
    assert list(relogged) == [3, 4, 6, 8] and relogged[4]["loss"] == older[4]["loss"]
    assert relogged[4]["img_per_s"] == 8.0


def test_a_latent_cache_at_a_non_square_size_is_accepted(tmp_path):
    """The cache manifest (JSON) holds data.image_size as [16, 24] where the config holds (16, 24), and
    as 16 where a config may say [16, 16]: compared as (height, width), a run accepts its own cache,
    and a cache of another size is still refused."""
    import numpy as np
    from PIL import Image

    from conftest import save_tiny_autoencoder_kl
    from ditkit.config import AutoencoderConfig, Config, DataConfig, ModelConfig, TrainConfig
    from ditkit.data.cache import CacheError, build_cache

    save_tiny_autoencoder_kl(tmp_path / "kl")
    rng = np.random.default_rng(0)
    for k in range(8):
        (tmp_path / "img" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / f"c{k % 2}" / f"{k}.png")

    def config(size, run, cache=None):
        return Config(
            model=ModelConfig(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=2, learn_sigma=False),
            data=DataConfig(
                dataset="folder", root=str(tmp_path / "img"), image_size=size, channels=3, holdout=0, cache=cache
            ),
            autoencoder=AutoencoderConfig(kind="kl", path=str(tmp_path / "kl")),
            train=TrainConfig(batch_size=4, steps=1, ckpt_every=1, device="cpu", out_dir=str(tmp_path / run)),
        )

    build_cache(config((16, 24), "unused"), tmp_path / "wide", progress=False)
    build_cache(config(16, "unused"), tmp_path / "square", progress=False)
    wide = train(config((16, 24), "wide_run", str(tmp_path / "wide")), progress=False)
    assert wide.step == 1 and load_config_from_checkpoint(wide.checkpoint).model.input_hw == (8, 12)
    square = train(config([16, 16], "square_run", str(tmp_path / "square")), progress=False)
    assert square.step == 1
    with pytest.raises(CacheError, match=r"holds \[16, 24\] px images, but data.image_size=\(24, 16\)"):
        train(config((24, 16), "tall_run", str(tmp_path / "wide")), progress=False)


def test_the_logged_lr_is_the_one_the_step_used(tmp_path):
    """train.warmup_steps: step k (from 1) uses lr * min(1, k / warmup_steps), and logs that lr (it
    logged the next step's, so the warmup looked one step short)."""
    run = tmp_path / "run"
    train(make_tiny_config(run, steps=6, warmup_steps=4, lr=1e-3), progress=False, dataset=make_tiny_dataset(20))
    logged = [r["lr"] for r in _records(run)]
    assert logged == pytest.approx([1e-3 * min(1.0, k / 4) for k in range(1, 7)], rel=1e-12)


def test_a_resume_applies_this_runs_optimizer_settings(tmp_path, caplog):
    """A changed train.lr / betas / weight_decay takes effect on resume (load_state_dict had put the
    checkpoint's back, while config.json recorded the new ones), and the change is logged."""
    data, run = make_tiny_dataset(20), tmp_path / "run"
    train(make_tiny_config(run, steps=2, warmup_steps=4), progress=False, dataset=data)
    changed = make_tiny_config(run, steps=4, warmup_steps=4, lr=1e-2, weight_decay=0.5, betas=(0.8, 0.99))
    with caplog.at_level("INFO", logger="ditkit.train"):
        result = train(changed, resume=run, progress=False, dataset=data)
    assert [r["lr"] for r in _records(run)] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-2, 1e-2], rel=1e-12)
    state = load_state(result.checkpoint)
    (group,) = state["optimizer"]["param_groups"]
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (1e-2, 1e-2, 0.5)
    assert tuple(group["betas"]) == (0.8, 0.99) and state["scheduler"]["base_lrs"] == [1e-2]
    assert "optimizer settings replace the checkpoint's" in caplog.text
    for change in (
        "train.lr 0.001 -> 0.01",
        "train.betas (0.9, 0.999) -> (0.8, 0.99)",
        "train.weight_decay 0.0 -> 0.5",
    ):
        assert change in caplog.text
    assert "AdamW eps" not in caplog.text
    caplog.clear()
    changed.train.steps = 5
    with caplog.at_level("INFO", logger="ditkit.train"):
        train(changed, resume=run, progress=False, dataset=data)
    assert "optimizer settings" not in caplog.text  # unchanged: nothing to say


def test_an_fp16_resume_of_a_checkpoint_saved_without_fp16_starts_a_fresh_loss_scale(tmp_path, caplog):
    """A run without fp16 saves its disabled grad scaler as {}, which an enabled scaler's load_state_dict
    refuses with a bare RuntimeError. fp16 training needs CUDA, so the loading is tested on its own."""
    result = train(make_tiny_config(tmp_path / "run", steps=2, precision="bf16"), progress=False,
                   dataset=make_tiny_dataset(20))  # fmt: skip
    saved = load_state(result.checkpoint)["scaler"]
    assert saved == {}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with caplog.at_level("INFO", logger="ditkit.train"):
        train_mod._load_scaler(scaler, saved, result.checkpoint)
    assert scaler.is_enabled() and scaler.get_scale() == 1024.0
    assert f"{result.checkpoint} holds no grad scaler state" in caplog.text and "afresh at 1024" in caplog.text
    fp16 = torch.amp.GradScaler("cpu", init_scale=1024.0)  # an fp16 checkpoint's state is loaded as saved
    train_mod._load_scaler(fp16, torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=7).state_dict(), None)
    assert fp16.get_scale() == 8.0 and fp16.state_dict()["growth_interval"] == 7
    disabled = torch.amp.GradScaler("cpu", enabled=False)  # resumed without fp16: nothing to load
    train_mod._load_scaler(disabled, saved, result.checkpoint)
    assert not disabled.is_enabled()


def test_fresh_run_starts_a_new_metrics_file_and_keeps_the_old_one(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    stale = '{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "loss": 7.0}\n'
    (run / "metrics.jsonl").write_text(stale)  # a run that died before its first checkpoint
    (run / "samples" / "step_0000002.png").write_bytes(b"old grid")
    train(make_tiny_config(run, steps=2, sample_every=2), progress=False, dataset=tiny_dataset)
    assert _steps_in(run / "metrics.jsonl") == [1, 2]
    (aside,) = run.glob("abandoned-*")
    assert (aside / "metrics.jsonl").read_text() == stale
    assert (aside / "samples" / "step_0000002.png").read_bytes() == b"old grid"
    assert (run / "samples" / "step_0000002.png").read_bytes() != b"old grid"


def test_a_cut_last_metrics_line_is_dropped_and_a_bad_line_elsewhere_is_named(tmp_path, caplog):
    from ditkit.monitor import MetricsError, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # the crash cut the last write
    with caplog.at_level("WARNING", logger="ditkit.monitor"):
        truncate_metrics(path, 5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert str(path) in caplog.text and "line 3" in caplog.text
    damaged = '{"step": 1}\n{"st\n{"step": 3}\n'
    path.write_text(damaged)
    with pytest.raises(MetricsError, match=f"{path} line 2 is not valid JSON"):
        truncate_metrics(path, 1)
    assert path.read_text() == damaged


def test_resume_after_a_cut_metrics_line(tmp_path):
    data, run = make_tiny_dataset(20), tmp_path / "run"
    train(make_tiny_config(run, steps=2), progress=False, dataset=data)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')
    result = train(make_tiny_config(run, steps=3), resume=run, progress=False, dataset=data)
    assert result.step == 3 and _steps_in(run / "metrics.jsonl") == [1, 2, 3]


class _Crash(BaseException):
    pass


def test_a_crash_between_the_renames_of_a_replace_loses_no_checkpoint(tmp_path, tiny_config, monkeypatch):
    import os

    model = build_model(tiny_config, seed=0)
    path = save_checkpoint(tmp_path / "step_0000005", config=tiny_config, model=model, ema=model)
    original = _weights(path)
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old copy is aside, the new one not yet in place
            raise _Crash
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_on_second)
    with pytest.raises(_Crash):
        save_checkpoint(path, config=tiny_config, model=build_model(tiny_config, seed=1), ema=model)
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    assert not path.exists()
    found = find_latest_checkpoint(tmp_path)  # reads only: the old copy is found where it is
    assert found is not None and found.name.startswith(".step_0000005.old-")
    assert all(torch.equal(original[k], v) for k, v in _weights(found).items())
    ckpt_mod.prune_checkpoints(tmp_path, 2)  # the writer's next prune (or save) puts it back
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" not in p.name) == ["step_0000005"]
    assert all(torch.equal(original[k], v) for k, v in _weights(path).items())
    # A finished replace whose old copy was left behind: the surplus copy goes, the checkpoint stays.
    leftover = tmp_path / ".step_0000005.old-99999"
    save_checkpoint(leftover, config=tiny_config, model=model, ema=model)
    save_checkpoint(tmp_path / "step_0000006", config=tiny_config, model=model, ema=model)
    ckpt_mod.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" not in p.name) == ["step_0000005", "step_0000006"]


def test_saving_a_checkpoint_onto_a_file_is_refused(tmp_path, tiny_config):
    model = build_model(tiny_config, seed=0)
    target = tmp_path / "precious"
    target.write_text("mine")
    with pytest.raises(CheckpointError, match=f"{target}: it exists and is not a folder"):
        save_checkpoint(target, config=tiny_config, model=model, ema=model)
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_saving_a_checkpoint_into_a_folder_of_other_files_is_refused(tmp_path, tiny_config):
    """An older checkpoint of the same name is replaced; a folder holding anything else is the user's."""
    model = build_model(tiny_config, seed=0)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis_figures.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"mine: the folder holds files that are not a checkpoint's "):
        save_checkpoint(folder, config=tiny_config, model=model, ema=model)
    assert [p.name for p in folder.iterdir()] == ["thesis_figures.txt"] and len(list(tmp_path.iterdir())) == 1
    ckpt = save_checkpoint(tmp_path / "ckpt", config=tiny_config, model=model, ema=model, state={"step": 1})
    save_checkpoint(ckpt, config=tiny_config, model=model, ema=model, state={"step": 2})  # replaced
    assert ckpt_mod.load_state(ckpt)["step"] == 2


def test_update_ema_averages_parameters_and_copies_buffers():
    """decay 0.9, not 0.5: at 0.5 the weights of the average and of the model are equal, so swapping
    them (ema <- 0.1 ema + 0.9 model) would pass unseen."""
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        ema[0].weight.fill_(0.0)
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(2.0)
    train_mod.update_ema(ema, model, 0.9)
    torch.testing.assert_close(ema[0].weight, torch.full((3, 3), 0.1), rtol=0, atol=1e-7)  # 0.9 * 0 + 0.1 * 1
    assert torch.equal(ema[1].running_mean, model[1].running_mean)
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    train_mod.update_ema(ema, model, 0.9, copy_buffers=False)
    torch.testing.assert_close(ema[0].weight, torch.full((3, 3), 0.19), rtol=0, atol=1e-7)  # 0.9 * 0.1 + 0.1 * 1
    assert torch.equal(ema[1].running_mean, torch.full((3,), 2.0))


def test_ema_decay_warms_up_as_documented():
    """min(decay, (1 + n) / (10 + n)) (train.ema_decay's docstring): 0.1 at the first step, the
    configured decay once (1 + n) / (10 + n) passes it."""
    assert train_mod.ema_decay_at(0, 0.9999) == pytest.approx(0.1, rel=1e-12)
    assert train_mod.ema_decay_at(10, 0.9999) == pytest.approx(11 / 20, rel=1e-12)
    assert train_mod.ema_decay_at(1_000_000, 0.9999) == 0.9999
    assert train_mod.ema_decay_at(80, 0.9) == 0.9 and train_mod.ema_decay_at(79, 0.9) == pytest.approx(80 / 89)


def test_training_skips_the_ema_buffer_walk_for_a_dit_which_has_no_buffers(tmp_path, monkeypatch):
    """A DiT has no buffers (a sin-cos pos_embed is a frozen Parameter), so each step's EMA update
    does not walk both models' modules looking for some."""
    assert list(build_model(make_tiny_config("unused"), seed=0).buffers()) == []
    real, seen = train_mod.update_ema, []
    monkeypatch.setattr(train_mod, "update_ema", lambda *a, **k: seen.append(k) or real(*a, **k))
    train(make_tiny_config(tmp_path / "run", steps=2), progress=False, dataset=make_tiny_dataset(20))
    assert seen == [{"copy_buffers": False}] * 2


def test_a_damaged_metrics_file_stops_a_roll_back_before_anything_moves(tmp_path):
    from ditkit.monitor import MetricsError

    data, run = make_tiny_dataset(20), tmp_path / "run"
    train(make_tiny_config(run, steps=4), progress=False, dataset=data)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetricsError, match="metrics.jsonl line 2 is not valid JSON"):
        train(make_tiny_config(run, steps=3), resume=run / "checkpoints" / "step_0000002", progress=False, dataset=data)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert not list(run.glob("abandoned-*"))


def test_device_names_are_checked_where_they_are_given():
    from ditkit.train import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'bogus' is not a device name"):
        resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': this machine .* has no CUDA GPU"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="device 'cuda:99': this machine has"):
            resolve_device("cuda:99")
    with pytest.raises(ConfigError, match="train.device must be 'auto', 'cpu', 'cuda'.*got 'gpu'"):
        make_tiny_config("unused", device="gpu")


@pytest.mark.parametrize("refusal", ["evaluation", "tensorboard", "wandb"])
def test_a_resume_refused_at_start_up_leaves_the_run_as_it_was(tmp_path, monkeypatch, refusal):
    """Rolling back to an older checkpoint with a setting that fails at start-up (in-training evaluation
    whose judge weights are missing, a metrics tracker whose package is not installed) changes nothing:
    later checkpoints, metrics and config.json stay."""
    import sys

    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path / "no-weights"))
    run, data = tmp_path / "run", make_tiny_dataset(20)
    train(make_tiny_config(run, steps=4, ckpt_every=2), progress=False, dataset=data)
    files = {p: p.read_bytes() for p in [run / "metrics.jsonl", run / "config.json"]}
    if refusal == "evaluation":
        config = make_tiny_config(run, steps=6, ckpt_every=2, eval_every=2)
        config.data.dataset = "cifar10"  # judged by Inception, whose weights are not here
        message = "Inception-v3 weights"
    elif refusal == "tensorboard":  # None in sys.modules: importing it fails, installed or not
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
        config = make_tiny_config(run, steps=6, ckpt_every=2, tensorboard=True)
        message = "train.tensorboard=true needs the `tensorboard` package"
    else:
        monkeypatch.setitem(sys.modules, "wandb", None)
        config = make_tiny_config(run, steps=6, ckpt_every=2, wandb_project="p")
        message = "train.wandb_project='p' needs the `wandb` package"
    with pytest.raises(ConfigError, match=message):
        train(config, resume=run / "checkpoints" / "step_0000002", progress=False, dataset=data)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert not list(run.glob("abandoned-*")) and all(p.read_bytes() == b for p, b in files.items())


def test_prune_keeps_the_newest_and_refuses_to_keep_none(tmp_path, tiny_config):
    """The checkpoint a run has just written is always the newest, so keep_last >= 1 keeps it; keeping
    none would delete it, and is refused."""
    model = build_model(tiny_config, seed=0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"step_{step:07d}", config=tiny_config, model=model, ema=model)
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        ckpt_mod.prune_checkpoints(tmp_path, 0)
    assert len(list(tmp_path.iterdir())) == 3
    ckpt_mod.prune_checkpoints(tmp_path, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000003"]


def test_resuming_a_run_whose_newest_checkpoint_is_left_under_its_old_name(tmp_path):
    """A crash between the two renames of a same-name replace leaves checkpoint N only as
    .step_N.old-PID: --resume RUN_DIR picks it, continues exactly, and the first save puts it back."""
    import os

    data = make_tiny_dataset(20)
    train(make_tiny_config(tmp_path / "straight", steps=6), progress=False, dataset=data)
    run = tmp_path / "run"
    train(make_tiny_config(run, steps=4), progress=False, dataset=data)
    ckpts = run / "checkpoints"
    old = ckpts / ".step_0000004.old-99999"
    os.replace(ckpts / "step_0000004", old)
    done = train(make_tiny_config(run, steps=4), resume=run, progress=False, dataset=data)  # nothing to do
    assert done.step == 4 and done.checkpoint == old and old.is_dir()
    result = train(make_tiny_config(run, steps=6), resume=run, progress=False, dataset=data)
    assert result.step == 6 and not old.exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]
    assert _steps_in(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6] and not list(run.glob("abandoned-*"))
    straight = _weights(tmp_path / "straight" / "checkpoints" / "step_0000006")
    assert all(torch.equal(v, straight[k]) for k, v in _weights(result.checkpoint).items())


def test_a_resume_reads_metrics_jsonl_once(tmp_path, monkeypatch):
    import ditkit.monitor as monitor

    data, run = make_tiny_dataset(20), tmp_path / "run"
    train(make_tiny_config(run, steps=3, ckpt_every=2), progress=False, dataset=data)  # step 3 logged, not saved
    real, reads = monitor._read_metrics, []
    monkeypatch.setattr(monitor, "_read_metrics", lambda path: reads.append(path) or real(path))
    train(make_tiny_config(run, steps=4, ckpt_every=2), resume=run / "checkpoints" / "step_0000002",
          progress=False, dataset=data)  # fmt: skip
    assert reads == [run / "metrics.jsonl"]
    assert _steps_in(run / "metrics.jsonl") == [1, 2, 3, 4]  # the step 3 of the timeline left behind is gone


def test_a_text_run_loads_its_text_encoders_weights_once(tmp_path, monkeypatch):
    """The batch source encodes every caption once into the text-embedding cache; the sample grid's
    prompts are dataset captions, found there, so the encoder's weights are not loaded again for them."""
    import transformers

    import ditkit.text as text
    from conftest import save_tiny_bert
    from ditkit.config import Config, ModelConfig, TextConfig
    from ditkit.data.captions import TensorCaptionDataset

    words = ["top", "bottom", "bar", "left"]
    (tmp_path / "bert").mkdir()
    encoder = save_tiny_bert(tmp_path / "bert", words, max_positions=16)
    base = make_tiny_config(tmp_path / "run", steps=1, ckpt_every=1, sample_every=1)
    model = ModelConfig(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=0, learn_sigma=False,
                        text_dim=16, caption_dropout_prob=0.1)  # fmt: skip
    config = Config(model=model, data=base.data, train=base.train, sample=base.sample,
                    text=TextConfig(encoder=encoder, max_length=4))  # fmt: skip
    captions = [f"{words[i % 4]} {words[(i // 4) % 4]}" for i in range(20)]
    data = TensorCaptionDataset(make_tiny_dataset(20).images, captions)
    real_load, loads = transformers.AutoModelForTextEncoding.from_pretrained, []
    monkeypatch.setattr(
        transformers.AutoModelForTextEncoding, "from_pretrained", lambda *a, **k: loads.append(1) or real_load(*a, **k)
    )
    grids = []
    monkeypatch.setattr(train_mod, "save_sample_grid", lambda *a, **k: grids.append(k))
    train(config, progress=False, dataset=data)
    assert len(loads) == 1 and len(grids) == 1
    prompts, cond = grids[0]["prompts"], grids[0]["text_encoder"].cond
    direct = text.TextEncoder(encoder, max_length=4).encode(prompts)
    assert len(prompts) == 16 and set(prompts) <= set(captions)
    for name in ("tokens", "mask", "pooled"):
        torch.testing.assert_close(getattr(cond, name), getattr(direct, name))
