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
    with pytest.raises(ConfigError, match="model config differs"):
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
