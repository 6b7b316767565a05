"""Mass sampling into ADM-format .npz (`ditkit.evaluation.mass_sampling`, `ditkit sample --npz`)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ditkit.evaluation.mass_sampling as mass
from ditkit.checkpoint import save_checkpoint
from ditkit.cli import main
from ditkit.evaluation.mass_sampling import MassSamplingJob, run_mass_sampling, sample_seed
from ditkit.sampling import generate
from ditkit.train import build_model, load_model
from ditkit.utils.images import to_uint8

SAMPLING = {"sampler": "ddpm", "steps": 3, "cfg_scale": 2.0}  # stochastic: per-step noise matters


@pytest.fixture
def checkpoint(tmp_path, tiny_config):
    """A tiny class-conditional DiT whose weights are all perturbed (adaLN-Zero's init predicts zeros)."""
    model = build_model(tiny_config, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_checkpoint(tmp_path / "ckpt", config=tiny_config, model=model, ema=model)


def test_npz_layout_matches_adm_and_samples_do_not_depend_on_batching(tmp_path, checkpoint, capsys):
    model, config = load_model(checkpoint)
    job = MassSamplingJob(num=7, seed=3, part_size=3, balanced_classes=True, sampling=SAMPLING)
    out = run_mass_sampling(model, config, tmp_path / "s.npz", job, progress=False)
    assert "merging" not in capsys.readouterr().err  # progress=False silences every bar, the merge too
    with np.load(out, allow_pickle=False) as data:
        assert data.files == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (7, 8, 8, 1)  # (N, H, W, C)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3][:7]
    assert not (tmp_path / "s.npz.parts").exists() and images.std() > 5
    # Sample 5 alone, from its own seed, is the same image.
    alone = generate(model, config, [int(labels[5])], sample_seeds=[sample_seed(3, 5)], **SAMPLING)
    assert np.abs(to_uint8(alone)[0].astype(int) - images[5].astype(int)).max() <= 1
    # One batch of all 7 instead of parts of 3: the same samples.
    whole = run_mass_sampling(
        model, config, tmp_path / "w.npz", MassSamplingJob(**{**job.__dict__, "part_size": 7}), progress=False
    )
    with np.load(whole) as data:
        assert np.abs(data["arr_0"].astype(int) - images.astype(int)).max() <= 1
    # Another seed: other samples (every image differs). An existing output is never overwritten.
    other = run_mass_sampling(
        model, config, tmp_path / "o.npz", MassSamplingJob(**{**job.__dict__, "seed": 4}), progress=False
    )
    with np.load(other) as data:
        assert data["arr_1"].tolist() == labels.tolist()  # the same labels, so only the noise differs
        diff = np.abs(data["arr_0"].astype(int) - images.astype(int)).reshape(7, -1).mean(1)
    assert (diff > 5).all(), diff
    with pytest.raises(ValueError, match="exists"):
        run_mass_sampling(model, config, out, job, progress=False)


def test_interrupted_run_resumes_without_redoing_parts(tmp_path, checkpoint, monkeypatch):
    model, config = load_model(checkpoint)
    job = MassSamplingJob(num=8, seed=0, part_size=2, sampling=SAMPLING)
    reference = run_mass_sampling(model, config, tmp_path / "ref.npz", job, progress=False)

    calls = []
    real_generate = mass.generate

    def failing(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(mass, "generate", failing)
    out = tmp_path / "out.npz"
    with pytest.raises(KeyboardInterrupt):
        run_mass_sampling(model, config, out, job, progress=False)
    assert sorted(p.name for p in (tmp_path / "out.npz.parts").glob("part_*.npz")) == [
        "part_000000.npz",
        "part_000001.npz",
    ]
    assert not out.exists()

    with pytest.raises(ValueError, match="other settings.*seed"):
        run_mass_sampling(model, config, out, MassSamplingJob(**{**job.__dict__, "seed": 1}), progress=False)

    calls.clear()
    monkeypatch.setattr(mass, "generate", lambda *a, **k: (calls.append(1), real_generate(*a, **k))[1])
    run_mass_sampling(model, config, out, job, progress=False)
    assert len(calls) == 2  # only the two unfinished parts were sampled
    assert out.read_bytes() == reference.read_bytes()


def test_one_and_two_processes_write_byte_identical_npz(tmp_path, checkpoint):
    # --num-samples: torchrun's parser would read --num as an abbreviation of its --numa-binding
    args = ["sample", "--checkpoint", str(checkpoint), "--num-samples", "7", "--batch-size", "2", "--sampler", "ddpm"]
    args += ["--steps", "3", "--cfg-scale", "2", "--seed", "5", "--device", "cpu", "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker runs (OMP_NUM_THREADS=1)
    try:
        assert main(args + ["--npz", str(tmp_path / "one.npz")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ditkit"]
    proc = subprocess.run(
        cmd + args + ["--npz", str(tmp_path / "two.npz")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    with np.load(tmp_path / "two.npz") as data:
        assert data["arr_0"].shape == (7, 8, 8, 1) and data["arr_1"].shape == (7,)


def test_protocol_presets_apply_and_refuse_a_checkpoint_without_their_autoencoder(tmp_path, checkpoint, capsys):
    from ditkit.evaluation.protocols import PROTOCOLS, get_protocol

    p = get_protocol("dit-xl2-256")
    assert (p.steps, p.cfg_scale, p.guidance_channels, p.num_samples, p.balanced_classes) == (
        250,
        1.5,
        3,
        50_000,
        False,
    )
    assert p.sampler == "ddpm" and p.clip_denoised is False  # latents are not clamped to [-1, 1]
    assert p.autoencoder == "stabilityai/sd-vae-ft-ema" and p.published["fid"] == 2.27
    assert PROTOCOLS["dit-xl2-512"].published["fid"] == 3.04
    code = main(
        ["sample", "--checkpoint", str(checkpoint), "--protocol", "dit-xl2-256", "--npz", str(tmp_path / "p.npz")]
    )
    assert code == 2 and "sd-vae-ft-ema" in capsys.readouterr().err and not (tmp_path / "p.npz").exists()
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        get_protocol("dit-xl2-1024")


def test_protocol_references_are_adms_reference_batch_files():
    """ADM's 256 px batch is VIRTUAL_imagenet256_labeled.npz, its 512 px batch VIRTUAL_imagenet512.npz
    (no '_labeled'): a name built from one pattern got the 512 one wrong."""
    from ditkit.evaluation.protocols import PROTOCOLS

    assert {name: p.reference for name, p in PROTOCOLS.items()} == {
        "dit-xl2-256": "VIRTUAL_imagenet256_labeled.npz",
        "dit-xl2-256-nocfg": "VIRTUAL_imagenet256_labeled.npz",
        "dit-xl2-512": "VIRTUAL_imagenet512.npz",
    }


def test_protocol_labels_are_seeded_uniform_draws_unless_balanced_is_asked_for(tmp_path, checkpoint, monkeypatch):
    """DiT's published numbers come from labels drawn uniformly at random per sample, not i % num_classes:
    a preset's job samples uniform labels (not exactly balanced), the same for the same --seed, and
    --balanced-classes still opts in. The job is taken from the real `ditkit sample --protocol` route."""
    from ditkit.evaluation import commands

    jobs = []
    # The tiny checkpoint is a pixel model: let the protocol accept it, and record the job instead of sampling.
    monkeypatch.setattr(commands, "_apply_autoencoder", lambda config, protocol, vae: config)
    monkeypatch.setattr(mass, "run_mass_sampling", lambda model, config, out, job, **kw: jobs.append(job))
    _, config = load_model(checkpoint)
    num_classes, n = config.model.num_classes, 40

    def labels(*extra):
        argv = ["sample", "--checkpoint", str(checkpoint), "--protocol", "dit-xl2-256", "--npz"]
        argv += [str(tmp_path / "p.npz"), "--num-samples", str(n), "--device", "cpu", *extra]
        assert main(argv) == 0
        job = jobs[-1]
        return mass.sample_labels(job.num, num_classes, job.balanced_classes, job.seed)

    first = labels("--seed", "5")
    counts = np.bincount(first, minlength=num_classes)
    assert len(first) == n and counts.sum() == n and not (counts == n // num_classes).all()  # not 10 per class
    np.testing.assert_array_equal(labels("--seed", "5"), first)  # reproducible for a seed
    assert not np.array_equal(labels("--seed", "6"), first)
    balanced = labels("--seed", "5", "--balanced-classes")
    np.testing.assert_array_equal(balanced, np.arange(n) % num_classes)


def test_merged_file_is_on_disk_before_the_parts_are_deleted(tmp_path, checkpoint, monkeypatch):
    """The order of fsyncs, renames and deletions: each part is fsynced, renamed, and its folder fsynced;
    OUT.npz is fsynced, renamed, and its folder fsynced, and only then are the parts deleted (else a
    crash could leave a truncated OUT.npz with the parts gone)."""
    events = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, Path.unlink

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    def unlink(self, *args, **kwargs):
        events.append(("unlink", str(self)))
        real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    model, config = load_model(checkpoint)
    out, parts = tmp_path / "s.npz", tmp_path / "s.npz.parts"
    job = MassSamplingJob(num=4, part_size=2, sampling={"steps": 2})
    run_mass_sampling(model, config, out, job, progress=False)

    def at(event):
        assert event in events, f"{event} not in {events}"
        return events.index(event)

    for k in range(2):
        part, tmp = str(parts / f"part_{k:06d}.npz"), str(parts / f"part_{k:06d}.npz.tmp.npz")
        renamed = at(("replace", tmp, part))
        assert at(("fsync", tmp)) < renamed
        assert ("fsync", str(parts)) in events[renamed + 1 : renamed + 2]  # the folder, right after the rename
    merged = at(("replace", str(out) + ".tmp", str(out)))
    assert at(("fsync", str(out) + ".tmp")) < merged
    assert events[merged + 1] == ("fsync", str(tmp_path))
    deleted = [i for i, e in enumerate(events) if e[0] == "unlink"]
    assert len(deleted) == 3 and min(deleted) > merged + 1  # 2 parts + the manifest, all after the fsyncs
    assert not parts.exists()
    with np.load(out) as data:
        assert data["arr_0"].shape == (4, 8, 8, 1)


def test_a_refused_setting_leaves_no_parts_folder_and_the_corrected_command_runs(tmp_path, checkpoint, capsys):
    out = tmp_path / "s.npz"
    base = ["sample", "--checkpoint", str(checkpoint), "--npz", str(out), "--num", "2", "--steps", "2"]
    base += ["--device", "cpu", "--no-progress"]
    refused = [
        (["--guidance-channels", "2"], "--guidance-channels 2: this model has 1 input channel(s)"),
        (["--steps", "5000"], "--steps 5000: this model's process has 1000 timesteps"),
        (["--prompt", "a seven"], "--prompt: mass sampling with --npz"),
        (["--sampler", "euler", "--eta", "0.5"], "takes no eta"),  # refused by generate(), after the manifest
    ]
    for extra, message in refused:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "s.npz.parts").exists(), extra
    # A parts folder that holds no finished part (left by an older version) is taken over, not refused.
    (tmp_path / "s.npz.parts").mkdir()
    (tmp_path / "s.npz.parts" / "manifest.json").write_text('{"num": 2, "sampling": {"steps": 0}}\n')
    assert main(base + ["--sampler", "euler", "--feature-cache", "2"]) == 0
    with np.load(out) as data:
        assert data["arr_0"].shape == (2, 8, 8, 1)


def test_other_settings_are_named_with_both_values(tmp_path, checkpoint, monkeypatch, capsys):
    out = tmp_path / "s.npz"
    base = ["sample", "--checkpoint", str(checkpoint), "--npz", str(out), "--num", "4", "--batch-size", "2"]
    base += ["--sampler", "euler", "--device", "cpu", "--no-progress"]
    real_generate, calls = mass.generate, []

    def failing(*args, **kwargs):  # interrupted after the first part
        if calls:
            raise KeyboardInterrupt
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(mass, "generate", failing)
    with pytest.raises(KeyboardInterrupt):
        main(base + ["--steps", "2", "--feature-cache", "2"])
    assert calls[0]["feature_cache_interval"] == 2  # passed through, not ignored
    assert (tmp_path / "s.npz.parts" / "part_000000.npz").is_file()
    assert main(base + ["--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "sampling.steps: 2 in the folder, 3 now" in err
    assert "sampling.feature_cache_interval: 2 in the folder, unset (the checkpoint's default) now" in err
    assert (tmp_path / "s.npz.parts" / "part_000000.npz").is_file()  # the finished part is kept


def test_cuda_graph_with_feature_cache_is_refused_by_one_check(tmp_path, checkpoint, capsys):
    """generate's refusal, which the CLI asks in its flags' names before loading (no checkpoint exists here)
    or writing a parts folder, for grids and --npz alike."""
    missing = ["sample", "--checkpoint", str(tmp_path / "no-such-run"), "--cuda-graph", "--feature-cache", "2"]
    for extra in ([], ["--npz", str(tmp_path / "s.npz"), "--num", "2"]):
        assert main(missing + extra) == 2
        assert "--cuda-graph cannot be combined with --feature-cache 2" in capsys.readouterr().err
    assert not (tmp_path / "s.npz.parts").exists() and not (tmp_path / "s.npz").exists()
    model, config = load_model(checkpoint)
    message = r"^cuda_graph=True cannot be combined with feature_cache_interval 3: feature caching changes"
    with pytest.raises(ValueError, match=message):
        generate(model, config, [0], cuda_graph=True, feature_cache_interval=3)
