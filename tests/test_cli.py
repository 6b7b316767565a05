import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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
    # A preset's shape flags are refused for a checkpoint, whose config gives its shape (they were ignored)
    assert main(["info", str(ckpt), "--input-size", "64", "--no-learn-sigma"]) == 2
    assert "--input-size, --no-learn-sigma: only for a preset" in capsys.readouterr().err

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
    # The finished run's final loss comes back from its checkpoint (it was NaN, written as bare NaN: not JSON).
    assert again["final_loss"] == metrics["final_loss"] and np.isfinite(metrics["final_loss"])

    def not_json(constant):
        raise ValueError(f"metrics.json holds {constant}, which is not JSON")

    assert json.loads((tmp_path / "demo" / "metrics.json").read_text(), parse_constant=not_json) == again


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


def test_convert_round_trip_through_diffusers_keeps_the_objective_and_sampling(tmp_path, config_file, capsys):
    """diffusers' config.json holds the network only: the rest comes back from ditkit_config.json."""
    pytest.importorskip("diffusers")
    from ditkit.checkpoint import load_config_from_checkpoint, resolve_checkpoint

    sample = ["sample.steps=7", "sample.sampler=heun", "sample.cfg_scale=2.5", "sample.seed=3"]
    sample += ["sample.spacing=karras", "sample.guidance_interval=[0.1, 0.9]", "sample.clip_denoised=false"]
    overrides = ["train.steps=1", "diffusion.prediction=v", "diffusion.schedule=cosine", *sample]
    assert main(["train", "--config", str(config_file), "--no-progress", *overrides]) == 0
    original = load_config_from_checkpoint(resolve_checkpoint(tmp_path / "run"))
    assert (original.diffusion.prediction, original.sample.sampler, original.sample.steps) == ("v", "heun", 7)
    capsys.readouterr()

    exported = tmp_path / "exported"
    assert main(["convert", "to-diffusers", "--checkpoint", str(tmp_path / "run"), "--out", str(exported)]) == 0
    err = capsys.readouterr().err
    assert "warning: this model was trained with diffusion.prediction='v', diffusion.schedule='cosine';" in err
    assert "diffusers' DiTPipeline samples eps prediction" in err and "would sample this model wrongly" in err
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "ditkit_config.json",
    ]
    side = json.loads((exported / "ditkit_config.json").read_text())
    assert sorted(side) == ["autoencoder", "data", "diffusion", "sample"]
    assert side["diffusion"]["prediction"] == "v" and side["data"] == {"image_size": 8, "channels": 1}

    assert main(["convert", "from-diffusers", "--diffusers", str(exported), "--out", str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "restored from ditkit_config.json (diffusion.prediction='v', diffusion.process='vp')" in out
    assert "Autoencoder recorded: none (pixel space)" in out
    back = load_config_from_checkpoint(tmp_path / "back")
    assert back.diffusion == original.diffusion and back.sample == original.sample
    assert back.diffusion.prediction == "v" and back.diffusion.schedule == "cosine"
    assert (back.sample.sampler, back.sample.steps, back.sample.cfg_scale, back.sample.seed) == ("heun", 7, 2.5, 3)
    assert (back.sample.spacing, back.sample.guidance_interval) == ("karras", (0.1, 0.9))
    assert back.sample.clip_denoised is False
    assert back.autoencoder == original.autoencoder and back.model == original.model
    assert (back.data.image_size, back.data.channels) == (8, 1)

    # The side file says this is a pixel model: an autoencoder for it is refused, naming the file.
    argv = ["convert", "from-diffusers", "--diffusers", str(exported), "--vae", str(tmp_path), "--out"]
    assert main([*argv, str(tmp_path / "with-vae")]) == 2
    assert f"{exported / 'ditkit_config.json'} records a pixel-space model" in capsys.readouterr().err
    # A damaged side file is an error naming the file and the key, not a silent fall back to eps.
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    side["diffusion"]["predicton"] = side["diffusion"].pop("prediction")
    (damaged / "ditkit_config.json").write_text(json.dumps(side))
    argv = ["convert", "from-diffusers", "--diffusers", str(damaged), "--out", str(tmp_path / "from-damaged")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{damaged / 'ditkit_config.json'}:" in err and "diffusion.predicton" in err
    assert not (tmp_path / "with-vae").exists() and not (tmp_path / "from-damaged").exists()


def test_only_models_diffusers_dit_pipeline_samples_go_without_a_warning():
    from ditkit.config import Config, DiffusionConfig, ModelConfig
    from ditkit.convert.diffusers import pipeline_mismatch

    assert pipeline_mismatch(Config()) == {}  # eps over DDPM's 1000 linear betas: DiT's own setting
    flow = Config(diffusion=DiffusionConfig(process="flow"), model=ModelConfig(learn_sigma=False))
    assert pipeline_mismatch(flow) == {"diffusion.process": "flow", "diffusion.prediction": "flow"}
    assert pipeline_mismatch(Config(diffusion=DiffusionConfig(beta_end=0.012))) == {"diffusion.beta_end": 0.012}


def test_from_diffusers_takes_a_sibling_vae_only_from_a_pipeline_folder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    from conftest import save_tiny_autoencoder_kl
    from ditkit.checkpoint import load_config_from_checkpoint
    from ditkit.config import ModelConfig
    from ditkit.convert.diffusers import to_diffusers
    from ditkit.models import DiT

    def save_dit(in_channels: int, folder: Path) -> None:  # a diffusers DiT from elsewhere: no ditkit_config.json
        config = ModelConfig(input_size=8, in_channels=in_channels, patch_size=2, hidden_size=32, depth=1, num_heads=2)
        to_diffusers(DiT(config)).save_pretrained(folder)

    # A vae/ folder beside a transformer folder that is not a pipeline's belongs to something else.
    save_tiny_autoencoder_kl(tmp_path / "loose" / "vae")
    save_dit(1, tmp_path / "loose" / "pixel")
    save_dit(4, tmp_path / "loose" / "latent")
    argv = ["convert", "from-diffusers", "--diffusers", str(tmp_path / "loose" / "pixel"), "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    assert "Autoencoder recorded: none (pixel space)" in capsys.readouterr().out
    pixel = load_config_from_checkpoint(tmp_path / "a")
    assert pixel.autoencoder.kind == "pixel" and pixel.autoencoder.path is None
    assert (pixel.data.channels, pixel.diffusion.prediction, pixel.diffusion.process) == (1, "eps", "vp")
    argv = ["convert", "from-diffusers", "--diffusers", str(tmp_path / "loose" / "latent")]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    assert "a 4-channel model works in an autoencoder's latent space: pass --vae" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

    # A whole DiTPipeline folder: transformer/ beside model_index.json; its vae/ is recorded as an absolute path.
    pipeline = tmp_path / "pipe"
    save_dit(4, pipeline / "transformer")
    save_tiny_autoencoder_kl(pipeline / "vae")
    (pipeline / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "from-diffusers", "--diffusers", "pipe/transformer", "--out", "c"]) == 0
    recorded = str(tmp_path / "pipe" / "vae")
    assert f"Autoencoder recorded: {recorded} (kl, from the pipeline's vae/ folder)" in capsys.readouterr().out
    latent = load_config_from_checkpoint(tmp_path / "c")
    assert (latent.autoencoder.kind, latent.autoencoder.path, latent.autoencoder.scale) == ("kl", recorded, 0.18215)
    assert (latent.data.image_size, latent.data.channels, latent.model.in_channels) == (16, 3, 4)


def test_readme_python_snippets_sample_with_the_objective_the_model_was_trained_for(tmp_path, monkeypatch):
    """Runs README.md's Python blocks as written, on a tiny version of configs/mnist.yaml (v-prediction)."""
    import ditkit.config
    import ditkit.diffusion

    repo = Path(__file__).parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (repo / "README.md").read_text(), re.S)
    assert len(blocks) == 2 and 'load_config("configs/mnist.yaml"' in blocks[0] and "sample_ddim(" in blocks[1]
    tiny = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.steps=2", "train.batch_size=4"]
    tiny += ["train.warmup_steps=0", "train.ckpt_every=2", "train.log_every=1", "train.precision=fp32"]
    tiny += ["train.device=cpu"]
    real_load = ditkit.config.load_config

    def tiny_load(path, overrides=()):  # the README's file and overrides, then the tiny model's
        return real_load(repo / path, [*overrides, *tiny])

    monkeypatch.setattr(ditkit.config, "load_config", tiny_load)
    predictions = []

    class RecordingDenoiser(ditkit.diffusion.ModelDenoiser):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            predictions.append(self.prediction)

    monkeypatch.setattr(ditkit.diffusion, "ModelDenoiser", RecordingDenoiser)
    monkeypatch.chdir(tmp_path)  # the snippets write outputs/mnist/ and digits.png
    scope: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), scope)
    config = scope["config"]
    assert config.diffusion.prediction == "v" and config.autoencoder.kind == "pixel"
    assert predictions == ["v"]  # the denoiser converts what the network predicts
    assert (tmp_path / "outputs" / "mnist" / "checkpoints" / "step_0000002").is_dir()
    assert (tmp_path / "digits.png").is_file()
    # The low-level loop is `generate` spelled out: same noise, grid, guidance and clamping, same digits.
    assert scope["x0"].shape == scope["images"].shape == (4, 1, 28, 28)
    torch.testing.assert_close(scope["x0"], scope["images"], atol=1e-5, rtol=0)


def test_demo_refuses_to_resume_a_smoke_demo_in_full(tmp_path, capsys, monkeypatch):
    import ditkit.demo
    from ditkit.evaluation import ClassifierResult, save_classifier
    from ditkit.models.classifier import ClassifierConfig, DigitClassifier

    out = tmp_path / "demo"
    torch.manual_seed(0)  # a placed random judge skips the classifier's training epoch
    judge = ClassifierResult(DigitClassifier(ClassifierConfig(in_channels=1, num_classes=10)), 0.5)
    save_classifier(judge, out / "classifier")
    assert main(["demo", "--smoke", "--out", str(out), "--no-progress"]) == 0
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    for name in ("train", "train_classifier", "save_config", "load_mnist"):
        monkeypatch.setattr(ditkit.demo, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran: nothing may"))
    assert main(["demo", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds a --smoke demo; choose another --out or delete it" in err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("command", ["demo", "text-demo"])
@pytest.mark.parametrize("held_smoke", [True, False])
def test_demo_refuses_a_folder_of_the_other_kind_of_demo(tmp_path, capsys, monkeypatch, command, held_smoke):
    """A folder whose config.yaml (the first thing a demo writes) is the other recipe's is not resumed."""
    import ditkit.demo
    import ditkit.text_demo
    from ditkit.config import save_config

    module = ditkit.demo if command == "demo" else ditkit.text_demo
    make_config = ditkit.demo.demo_config if command == "demo" else ditkit.text_demo.text_demo_config
    out = tmp_path / "held"
    out.mkdir()
    save_config(make_config(out, held_smoke), out / "config.yaml")
    written = (out / "config.yaml").read_text()
    for name in ("demo_judge", "demo_train", "save_config"):
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran: nothing may"))
    assert main([command, "--out", str(out), "--no-progress", *([] if held_smoke else ["--smoke"])]) == 2
    held = "a --smoke" if held_smoke else "a full (not --smoke)"
    assert f"--out {out} holds {held} {command}; choose another --out or delete it" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == written and [p.name for p in out.iterdir()] == ["config.yaml"]


def test_image_out_under_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "s1.png"
    blocker.write_bytes(b"the user's own file")
    missing = str(tmp_path / "no-such-run")  # never looked at: the --out check comes first
    for out in (blocker / "x.png", blocker / "deeper" / "x.png"):
        assert main(["sample", "--checkpoint", missing, "--out", str(out)]) == 2
        assert f"--out {out}: {blocker} is a file, not a folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--checkpoint", missing, "--out", "s1.png/x.png", "--overwrite"]) == 2
    assert "--out s1.png/x.png: s1.png is a file, not a folder" in capsys.readouterr().err
    argv = ["inpaint", "--checkpoint", missing, "--image", "a.png", "--mask", "m.png", "--out", "s1.png/x.png"]
    assert main(argv) == 2
    assert "--out s1.png/x.png: s1.png is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_bytes() == b"the user's own file" and sorted(p.name for p in tmp_path.iterdir()) == ["s1.png"]


def test_sample_flags_reach_generate(tmp_path, config_file, monkeypatch):
    import ditkit.sampling

    assert main(["train", "--config", str(config_file), "--no-progress", "train.steps=1"]) == 0
    calls = []

    def fake_generate(model, config, labels=None, **options):
        calls.append((labels.tolist(), options))
        return torch.zeros(len(labels), 1, 8, 8)

    monkeypatch.setattr(ditkit.sampling, "generate", fake_generate)
    base = ["sample", "--checkpoint", str(tmp_path / "run"), "--classes", "1", "4", "--per-class", "2"]
    flags = ["--steps", "7", "--seed", "11", "--cfg-scale", "2.5", "--eta", "0.25", "--spacing", "karras"]
    flags += ["--guidance-interval", "0.2", "0.8", "--clip-denoised", "--sampler", "dpmpp_2m"]
    flags += ["--feature-cache", "2", "--no-cuda-graph", "--guidance-channels", "1", "--no-progress"]
    assert main([*base, *flags, "--out", str(tmp_path / "a.png")]) == 0
    assert calls[-1] == (
        [1, 1, 4, 4],
        {
            "steps": 7,
            "cfg_scale": 2.5,
            "eta": 0.25,
            "seed": 11,
            "sampler": "dpmpp_2m",
            "spacing": "karras",
            "guidance_interval": (0.2, 0.8),
            "clip_denoised": True,
            "progress": False,
            "feature_cache_interval": 2,
            "cuda_graph": False,
            "guidance_channels": 1,
        },
    )
    # Unset flags reach it as None: generate then takes the checkpoint's sample.* values.
    assert main([*base, "--no-clip-denoised", "--out", str(tmp_path / "b.png")]) == 0
    assert calls[-1][1] == {
        "steps": None,
        "cfg_scale": None,
        "eta": None,
        "seed": 0,
        "sampler": None,
        "spacing": None,
        "guidance_interval": None,
        "clip_denoised": False,
        "progress": True,
        "feature_cache_interval": 1,
        "cuda_graph": None,
        "guidance_channels": None,
    }
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()


@pytest.mark.parametrize("command", ["inpaint", "outpaint"])
def test_paint_resample_defaults_follow_the_method(command):
    """RePaint's default resampling (5) goes to repaint and auto; `--method trained`, which `inpaint` refuses
    any resampling for, gets 1 unless the user asks otherwise (then inpaint names the flag's value)."""
    from ditkit.cli import _paint_options, build_parser
    from ditkit.config import Config
    from ditkit.inpainting import _check_method_options

    def options(*extra):
        argv = [command, "--checkpoint", "c", "--image", "a.png", "--out", "o.png", *extra]
        return _paint_options(build_parser().parse_args(argv + (["--mask", "m.png"] if command == "inpaint" else [])))

    assert (options()["resample"], options()["jump"]) == (5, 1)
    assert (options("--method", "repaint")["resample"], options("--method", "repaint", "--jump", "2")["jump"]) == (5, 2)
    trained = options("--method", "trained")
    assert (trained["resample"], trained["jump"]) == (1, 1)
    config = Config()
    _check_method_options(config, "trained", trained["sampler"], trained["jump"], trained["resample"])  # accepted
    asked = options("--method", "trained", "--resample", "3")
    with pytest.raises(ValueError, match="resample=3"):
        _check_method_options(config, "trained", asked["sampler"], asked["jump"], asked["resample"])


def test_ditkit_config_records_a_local_autoencoder_folder_by_its_absolute_path(tmp_path, monkeypatch):
    """A checkpoint trained with autoencoder.path=vae (relative to where it ran) exports the folder's absolute
    path, so from-diffusers run anywhere finds it; a hub id (no folder here) is kept as written."""
    from ditkit.config import AutoencoderConfig, Config, ModelConfig
    from ditkit.convert.diffusers import load_ditkit_config, save_ditkit_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae").mkdir()
    model = ModelConfig(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    for path, recorded in (("vae", str(tmp_path / "vae")), ("org/some-vae", "org/some-vae")):
        config = Config(model=model, autoencoder=AutoencoderConfig(kind="kl", path=path, latent_channels=4))
        folder = tmp_path / path.replace("/", "_")
        folder.mkdir(exist_ok=True)
        save_ditkit_config(config, folder)
        assert json.loads((folder / "ditkit_config.json").read_text())["autoencoder"]["path"] == recorded
        assert load_ditkit_config(folder, model).autoencoder.path == recorded


def test_train_says_when_max_minutes_stopped_it(tmp_path, config_file, capsys, monkeypatch):
    """A run cut short by train.max_minutes is not reported as finished: it says why, and how to go on."""
    import ditkit.train
    from ditkit.train import TrainResult

    result = TrainResult(tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_0000003", 3, 0.5, 60.0, 0)
    monkeypatch.setattr(ditkit.train, "train", lambda config, **kwargs: result)
    argv = ["train", "--config", str(config_file), "--no-progress", "train.steps=10", "train.max_minutes=1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stopped by train.max_minutes=1.0 (of train.steps=10; --resume the run folder to go on) at step 3" in out
    assert main(argv[:-2] + ["train.steps=3"]) == 0
    assert capsys.readouterr().out.startswith("finished at step 3, loss 0.5000")
