import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ditkit.cli import main
from ditkit.samplers import SAMPLERS


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""
model: {{patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10, learn_sigma: false}}
data: {{dataset: mnist, image_size: 8, channels: 1}}
train: {{out_dir: {tmp_path / "run"}, steps: 50, batch_size: 4, log_every: 1, ckpt_every: 1, device: cpu}}
sample: {{steps: 2}}
"""
    )
    return path


def test_train_sample_info_round_trip(tmp_path, config_file, capsys, monkeypatch):
    assert main(["train", "--config", str(config_file), "--no-progress", "train.steps=2"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert (ckpt / "ema.safetensors").is_file()

    out = tmp_path / "grid.png"
    args = [
        "sample",
        "--checkpoint",
        str(tmp_path / "run"),
        "--classes",
        "0",
        "3",
        "7",
        "--per-class",
        "2",
        "--cfg-scale",
        "2.0",
        "--steps",
        "3",
        "--seed",
        "1",
        "--scale",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    grid = np.asarray(Image.open(out))
    # 3 rows of 2 samples, 8x8 each, 2 px padding.
    assert grid.shape == (3 * 10 + 2, 2 * 10 + 2)
    again = tmp_path / "grid2.png"
    assert main(args[:-1] + [str(again)]) == 0
    assert np.array_equal(grid, np.asarray(Image.open(again)))  # seeded: same request, same pixels

    # --sampler reaches the sampling loop. The pixels cannot show it: this 2-step model's samples are
    # nearly saturated, and on a GPU DDIM's and Heun's grids came out identical.
    heun = tmp_path / "heun.png"
    real_heun, heun_calls = SAMPLERS["heun"], []
    monkeypatch.setitem(SAMPLERS, "heun", lambda *a, **k: heun_calls.append(1) or real_heun(*a, **k))
    assert main(args[:-1] + [str(heun)] + ["--sampler", "heun"]) == 0
    assert heun_calls and heun.is_file()

    capsys.readouterr()
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == 16 and info["depth"] == 1

    # Resume continues from the saved step.
    assert (
        main(
            ["train", "--config", str(config_file), "--no-progress", "--resume", str(tmp_path / "run"), "train.steps=3"]
        )
        == 0
    )
    assert (tmp_path / "run" / "checkpoints" / "step_0000003").is_dir()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3]


def test_info_on_presets_uses_paper_numbers(capsys):
    assert main(["info", "DiT-XL/2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["gmacs_per_forward"] - 118.6) / 118.6 < 0.005
    assert abs(info["parameters"] - 675e6) / 675e6 < 0.005
    assert info["tokens"] == 256


def test_info_on_an_unknown_name_lists_the_presets(capsys):
    assert main(["info", "DiT-Q/2"]) == 2
    err = capsys.readouterr().err
    assert "'DiT-Q/2' is neither a model preset (DiT-S/2," in err and "nor an existing checkpoint" in err


def test_bad_config_key_is_a_clear_error(config_file, capsys):
    assert main(["train", "--config", str(config_file), "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "unknown config key" in err


def test_sample_keeps_an_existing_out_file_unless_told(tmp_path, config_file, capsys):
    assert main(["train", "--config", str(config_file), "--no-progress", "train.steps=1"]) == 0
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's own file")
    base = ["sample", "--checkpoint", str(tmp_path / "run"), "--classes", "1", "--steps", "2", "--no-progress"]
    assert main(base + ["--out", str(out)]) == 2
    assert "already exists; choose a new file or pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's own file"
    assert main(base + ["--out", str(out), "--overwrite"]) == 0
    assert Image.open(out).size[0] > 0


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_sample_rejects_out_of_range_class(tmp_path, config_file, capsys):
    assert main(["train", "--config", str(config_file), "--no-progress", "train.steps=1"]) == 0
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "run"),
                "--classes",
                "12",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "class labels must be in [0, 9]" in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "ditkit", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "sample", "info", "demo"):
        assert command in proc.stdout


def test_demo_smoke(tmp_path):
    from ditkit.demo import run_demo

    metrics = run_demo(tmp_path / "demo", smoke=True, progress=False)
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved == metrics
    assert 0.0 <= saved["conditional_accuracy"] <= 1.0 and saved["num_samples"] == 20
    assert 0.0 <= saved["classifier_holdout_accuracy"] <= 1.0 and saved["train_steps"] == 6
    grid = Image.open(tmp_path / "demo" / "samples.png")
    assert grid.size == ((2 * 30 + 2) * 3, (10 * 30 + 2) * 3)  # 10 rows (one per class) of 2, upscaled x3
    assert (tmp_path / "demo" / "loss_curve.png").is_file()
    # Running it again reuses the finished classifier and run: their files are not written again.
    kept = [tmp_path / "demo" / "classifier" / "model.safetensors", *(tmp_path / "demo" / "run").rglob("*.safetensors")]
    stamps = {path: path.stat().st_mtime_ns for path in kept}
    again = run_demo(tmp_path / "demo", smoke=True, progress=False)
    assert again["train_steps"] == 6 and again["conditional_accuracy"] == metrics["conditional_accuracy"]
    assert len(stamps) > 1 and {path: path.stat().st_mtime_ns for path in kept} == stamps


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/*.yaml")))
def test_every_shipped_config_loads(path):
    from ditkit.config import load_config
    from ditkit.models import DiT

    config = load_config(path)
    assert config.model.resolved()
    import torch

    with torch.device("meta"):
        DiT(config.model)


def test_mnist_config_matches_the_demo(tmp_path):
    """configs/mnist.yaml is documented as the demo's job: keep them in step."""
    from pathlib import Path

    from ditkit.config import load_config
    from ditkit.demo import demo_config

    shipped = load_config(Path(__file__).parents[1] / "configs" / "mnist.yaml")
    demo = demo_config(tmp_path)
    assert shipped.model == demo.model and shipped.diffusion == demo.diffusion and shipped.sample == demo.sample
    for key in ("steps", "batch_size", "lr", "warmup_steps", "ema_decay", "precision"):
        assert getattr(shipped.train, key) == getattr(demo.train, key), key


def test_a_native_crash_prints_the_python_stack(tmp_path):
    # The command runs, then the process aborts in native code: the stack must name where it was.
    code = "import os, sys; from ditkit.cli import main; main(['info', 'DiT-S/2']); os.abort()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Fatal Python error: Aborted" in proc.stderr and 'File "<string>", line 1' in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--checkpoint", "unused", "--scale", "0"], "argument --scale: must be at least 1, got 0"),
        (["sample", "--checkpoint", "unused", "--scale", "two"], "argument --scale: must be a whole number, got 'two'"),
        (["serve", "--checkpoint", "unused", "--port", "http"], "argument --port: must be a whole number, got 'http'"),
        (["inpaint", "--checkpoint", "c", "--image", "a.png", "--mask", "m.png", "--out", "o.png", "--num", "0"],
         "argument --num: must be at least 1, got 0"),
        (["outpaint", "--checkpoint", "c", "--image", "a.png", "--out", "o.png", "--steps", "0"],
         "argument --steps: must be at least 1, got 0"),
        (["sample", "--checkpoint", "unused", "--npz", "s.npz", "--batch-size", "0"],
         "argument --batch-size: must be at least 1, got 0"),
        (["eval", "--samples", "s.npz", "--ref", "r.npz", "--batch-size", "-2"],
         "argument --batch-size: must be at least 1, got -2"),
        (["cache", "--config", "c.yaml", "--out", "o", "--batch-size", "0"],
         "argument --batch-size: must be at least 1, got 0"),
        (["serve", "--checkpoint", "unused", "--port", "-3"],
         "argument --port: must be a port from 0 to 65535, got -3"),
    ],
)  # fmt: skip
def test_integer_options_out_of_range_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # before any file is opened
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resuming_a_finished_run_says_so_without_a_nan_loss(tmp_path, config_file, capsys):
    assert main(["train", "--config", str(config_file), "--no-progress", "train.steps=1"]) == 0
    assert "finished at step 1, loss " in capsys.readouterr().out
    argv = ["train", "--config", str(config_file), "--no-progress", "--resume", str(tmp_path / "run"), "train.steps=1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "the run had already finished at step 1 (train.steps=1); nothing was trained" in out
    assert "nan" not in out


def test_sample_grid_refuses_npz_options_and_bad_out_before_loading(tmp_path, capsys):
    missing = ["sample", "--checkpoint", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "g.png")]
    for extra, message in [
        (["--batch-size", "4"], "--batch-size: only for mass sampling with --npz"),
        (["--num-samples", "4"], "--num-samples: only for mass sampling with --npz"),
        (["--no-balanced-classes"], "--balanced-classes: only for mass sampling with --npz"),
        (["--cuda-graph", "--feature-cache", "2"], "--cuda-graph cannot be combined with --feature-cache 2"),
    ]:
        assert main(missing + extra) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    for out, message in [
        ("cnoext", "--out cnoext: no image file extension"),
        ("grid.foo", "--out grid.foo: unknown image file extension '.foo'"),
        (str(tmp_path / "folder"), f"--out {tmp_path / 'folder'} is a folder"),
    ]:
        assert main(["sample", "--checkpoint", str(tmp_path / "no-such-run"), "--out", out, "--overwrite"]) == 2
        assert message in capsys.readouterr().err  # the checkpoint was not looked at yet
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", "unused", "--feature-cache", "0"])
    assert "argument --feature-cache: must be at least 1, got 0" in capsys.readouterr().err


def test_sample_grid_takes_guidance_channels(tmp_path, config_file, capsys, monkeypatch):
    import ditkit.sampling

    assert main(["train", "--config", str(config_file), "--no-progress", "train.steps=1"]) == 0
    seen = []
    real = ditkit.sampling.generate
    monkeypatch.setattr(ditkit.sampling, "generate", lambda *a, **k: seen.append(k) or real(*a, **k))
    base = ["sample", "--checkpoint", str(tmp_path / "run"), "--classes", "1", "--per-class", "1", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "g.png"), "--guidance-channels", "1"]) == 0
    assert seen[-1]["guidance_channels"] == 1 and (tmp_path / "g.png").is_file()
    assert main(base + ["--out", str(tmp_path / "h.png"), "--guidance-channels", "2"]) == 2
    assert "--guidance-channels 2: this model has 1 input channel(s)" in capsys.readouterr().err


def test_a_file_where_a_folder_is_written_is_refused(tmp_path, config_file, capsys):
    user = tmp_path / "a.png"
    user.write_bytes(b"the user's own file")
    argv = ["convert", "to-diffusers", "--checkpoint", str(tmp_path / "run"), "--out", str(user)]
    assert main(argv) == 2
    assert f"--out {user} is a file, not a folder" in capsys.readouterr().err
    assert (
        main(
            [
                "cache",
                "--config",
                str(config_file),
                "--out",
                str(user),
                "autoencoder.kind=kl",
                "autoencoder.path=unused",
            ]
        )
        == 2
    )
    assert f"(--out) {user} is a file, not a folder" in capsys.readouterr().err
    assert user.read_bytes() == b"the user's own file"


def test_bench_json_refuses_an_existing_file_before_timing(tmp_path, capsys, monkeypatch):
    import ditkit.bench

    monkeypatch.setattr(ditkit.bench, "run_bench", lambda settings: pytest.fail("timed before checking --json"))
    kept = tmp_path / "bench.json"
    kept.write_text("the user's own results")
    assert main(["bench", "--device", "cpu", "--json", str(kept)]) == 2
    assert f"--json {kept} already exists" in capsys.readouterr().err
    assert kept.read_text() == "the user's own results"
    with pytest.raises(ValueError, match="already exists"):
        ditkit.bench.write_json({}, kept)
    assert kept.read_text() == "the user's own results"


@pytest.mark.parametrize("command", ["demo", "text-demo"])
def test_demo_refuses_a_folder_of_other_files(tmp_path, command, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "samples.png").write_bytes(b"the user's own picture")
    (folder / "notes.txt").write_text("keep me")
    assert main([command, "--out", str(folder), "--smoke", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {folder} is not empty and not a previous {command} folder (it holds notes.txt)" in err
    (folder / "notes.txt").unlink()  # only demo-named files, but no demo config.yaml: still someone else's
    assert main([command, "--out", str(folder), "--smoke", "--no-progress"]) == 2
    assert "no readable demo config.yaml" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["samples.png"]
    assert (folder / "samples.png").read_bytes() == b"the user's own picture"
    # A run/ folder of the user's own (not the demo's files) is not taken for a demo stopped early.
    other = tmp_path / "theirs"
    (other / "run").mkdir(parents=True)
    (other / "run" / "notes.txt").write_text("keep me")
    assert main([command, "--out", str(other), "--smoke", "--no-progress"]) == 2
    assert "no readable demo config.yaml" in capsys.readouterr().err
    assert [p.name for p in (other / "run").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command", ["inpaint", "outpaint"])
def test_paint_refuses_an_output_name_pil_cannot_write_before_sampling(tmp_path, capsys, command):
    """Checked before the checkpoint is even loaded (it does not exist here), not after all the sampling."""
    argv = [command, "--checkpoint", str(tmp_path / "missing"), "--image", "a.png", "--out", str(tmp_path / "o.foo")]
    assert main([*argv, *(["--mask", "m.png"] if command == "inpaint" else [])]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "unknown image file extension '.foo'" in err


@pytest.mark.parametrize("command", ["inpaint", "outpaint"])
def test_paint_names_too_many_steps_as_the_flag(tmp_path, config_file, capsys, command):
    """As `ditkit sample` does: --steps beyond the process's timesteps is named as the flag, and nothing
    is written."""
    assert main(["train", "--config", str(config_file), "--no-progress", "train.steps=1"]) == 0
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "m.png")
    out = tmp_path / "o.png"
    argv = [command, "--checkpoint", str(tmp_path / "run"), "--image", str(tmp_path / "a.png"), "--out", str(out)]
    argv += ["--steps", "5000", "--no-progress"] + (["--mask", str(tmp_path / "m.png")] if command == "inpaint" else [])
    assert main(argv) == 2
    assert "--steps 5000: this model's process has 1000 timesteps" in capsys.readouterr().err and not out.exists()


def test_sampling_steps_have_one_rule_the_process_s():
    """`--steps` is checked by the rule `timesteps` itself applies (`NoiseProcess.check_num_steps`): the same
    limit for the CLI and the library, each error naming where the value came from, the value and the range."""
    from ditkit.config import Config, DiffusionConfig, ModelConfig
    from ditkit.diffusion import build_process
    from ditkit.evaluation.commands import check_sampling_steps

    vp = Config(diffusion=DiffusionConfig(num_timesteps=50))
    check_sampling_steps(50, vp)
    assert len(build_process(vp.diffusion).timesteps(50)) == 51
    with pytest.raises(ValueError, match=r"^--steps 51: this model's process has 50 timesteps; give 1 to 50$"):
        check_sampling_steps(51, vp)
    with pytest.raises(ValueError, match=r"^num_steps 51: this model's process has 50 timesteps; give 1 to 50$"):
        build_process(vp.diffusion).timesteps(51)
    flow = Config(model=ModelConfig(learn_sigma=False), diffusion=DiffusionConfig(process="flow", num_timesteps=50))
    check_sampling_steps(5000, flow)  # a continuous process takes any number of steps
    assert len(build_process(flow.diffusion).timesteps(5000)) == 5001
    with pytest.raises(ValueError, match=r"^num_steps 0: give 1 or more sampling steps$"):
        build_process(flow.diffusion).timesteps(0)


@pytest.mark.parametrize("command", ["inpaint", "outpaint"])
def test_paint_refuses_an_existing_out_or_a_folder_before_loading(tmp_path, capsys, command):
    """One --out check for sample, inpaint and outpaint; paint has no --overwrite, so none is offered."""
    argv = [command, "--checkpoint", str(tmp_path / "missing"), "--image", "a.png"]
    argv += ["--mask", "m.png"] if command == "inpaint" else []
    kept = tmp_path / "mine.png"
    kept.write_bytes(b"the user's own file")
    assert main([*argv, "--out", str(kept)]) == 2
    err = capsys.readouterr().err
    assert f"--out {kept} already exists; choose a new file (nothing was written)" in err and "--overwrite" not in err
    assert kept.read_bytes() == b"the user's own file"
    (tmp_path / "folder").mkdir()
    assert main([*argv, "--out", str(tmp_path / "folder")]) == 2
    assert f"--out {tmp_path / 'folder'} is a folder; give an image file name" in capsys.readouterr().err
