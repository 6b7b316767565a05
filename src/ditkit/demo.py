"""The demo: a class-conditional DiT learns the bundled MNIST digits on a CPU, judged by a classifier.

1. Train a small digit classifier on the training split; report its held-out accuracy.
2. Train a DiT (pixel space, 28x28, patch 4) within a fixed step count and a 10-minute cap.
3. Sample with DDIM + classifier-free guidance, write a grid (one row per class), the loss curve
   and metrics.json with the classifier's accuracy on the conditional samples.

Running it again resumes an unfinished run and reuses finished parts; a folder that holds anything
else is refused, so the demo never overwrites a user's files, and so is the other kind of demo (a --smoke
folder for a full run, or the reverse), whose model and judge the run could not reuse.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import find_latest_checkpoint
from .config import (
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    load_config,
    save_config,
)
from .data import load_mnist
from .evaluation import ClassifierResult, classify, load_classifier, save_classifier, train_classifier
from .sampling import generate
from .train import load_model, train
from .utils.images import plot_loss_curve, save_grid

__all__ = ["demo_config", "run_demo", "check_demo_folder"]

DEMO_ENTRIES = frozenset({"config.yaml", "classifier", "run", "loss_curve.png", "samples.png", "metrics.json"})
"""Everything a demo (or the text demo) writes into its folder."""


def check_demo_folder(out_dir: str | Path, *, text: bool = False, smoke: bool | None = None) -> None:
    """Refuse an `out_dir` that is a file, or a non-empty folder other than a previous (text) demo's.

    A previous demo folder holds only the demo's own entries, among them the config.yaml it wrote (a
    digits run into its `run/` folder, text-conditioned for the text demo); it is resumed, not refused.
    With `smoke` given, a previous demo of the other kind (a --smoke one for a full run, or the reverse) is
    refused too: its model cannot be resumed by the other recipe, and its judge (one epoch for --smoke)
    must not grade a full run.
    """
    out = Path(out_dir)
    name = "text-demo" if text else "demo"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a new or empty {name} folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in DEMO_ENTRIES)
    refusal = f"--out {out} is not empty and not a previous {name} folder"
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(f"{refusal} (it holds {shown}); choose a new or empty folder (nothing was written)")
    entries = {entry.name: entry for entry in out.iterdir()}
    if "config.yaml" not in entries and all(_demo_subfolder(n, e) for n, e in entries.items()):
        return  # a demo stopped before its config.yaml (or a judge placed for it): its own folders only
    try:
        saved = load_config(out / "config.yaml")
    except (ConfigError, OSError, ValueError) as err:
        raise ValueError(
            f"{refusal} (no readable demo config.yaml in it); choose a new or empty folder (nothing was written)"
        ) from err
    if saved.data.dataset != "mnist" or Path(saved.train.out_dir).name != "run" or saved.model.text_conditional != text:
        raise ValueError(
            f"{refusal} (its config.yaml describes another job); choose a new or empty folder (nothing was written)"
        )
    held = _smoke_demo(saved, out)
    if smoke is not None and held is not None and held != smoke:
        kind, again = ("a --smoke", "with --smoke") if held else ("a full (not --smoke)", "without --smoke")
        raise ValueError(
            f"--out {out} holds {kind} {name}; choose another --out or delete it, or run it {again} to resume it "
            "(nothing was written)"
        )


def _smoke_demo(saved: Config, out: Path) -> bool | None:
    """Whether a demo's config.yaml is the --smoke recipe's (True), the full one's (False), or neither (None).

    Told by the model's size: that is what --smoke shrinks and what resuming cannot change, while the rest of
    a saved config may gain fields from one ditkit version to the next without becoming the other kind.
    """
    size = (saved.model.hidden_size, saved.model.depth)
    for smoke in (True, False):
        model = demo_config(out, smoke).model
        if size == (model.hidden_size, model.depth):
            return smoke
    return None


_SUBFOLDER_FILES = {
    "classifier": {"classifier.json", "model.safetensors"},
    "run": {"checkpoints", "config.json", "metrics.jsonl", "loss_curve.png", "samples", "text_embeddings.safetensors"},
}
"""What a demo writes into its classifier/ and run/ folders (training adds abandoned-* folders too)."""


def _demo_subfolder(name: str, entry: Path) -> bool:
    """Whether `entry` is a demo's classifier/ or run/ folder holding nothing but what the demo writes."""
    own = _SUBFOLDER_FILES.get(name)
    return (
        own is not None
        and entry.is_dir()
        and all(child.name in own or child.name.startswith("abandoned-") for child in entry.iterdir())
    )


def demo_config(out_dir: str | Path, smoke: bool = False) -> Config:
    """The demo's job config; `smoke` shrinks it to seconds for tests."""
    model = ModelConfig(
        patch_size=4,
        hidden_size=256,
        depth=6,
        num_heads=4,
        num_classes=10,
        class_dropout_prob=0.1,
        learn_sigma=False,
    )
    # Measured on 2 CPU cores (docs/demo.md): v-prediction with batch 64 at lr 1e-3 reaches >= 95%
    # conditional accuracy in 6 single-thread minutes; noise prediction at batch 128, lr 5e-4 stayed
    # below 25% after 10 minutes. Batch 64 gives twice the optimizer steps for the same images.
    diffusion = DiffusionConfig(prediction="v")
    train_cfg = TrainConfig(
        out_dir=str(Path(out_dir) / "run"),
        steps=2000,
        max_minutes=10.0,
        batch_size=64,
        lr=1e-3,
        warmup_steps=100,
        ema_decay=0.999,
        grad_clip=1.0,
        precision="bf16",
        log_every=25,
        ckpt_every=250,
        keep_last=2,
        device="cpu",
    )
    sample = SampleConfig(steps=25, eta=0.0, cfg_scale=4.0, seed=0)
    if smoke:
        model = ModelConfig(patch_size=4, hidden_size=64, depth=2, num_heads=2, num_classes=10, learn_sigma=False)
        train_cfg.steps, train_cfg.batch_size, train_cfg.warmup_steps = 6, 16, 0
        train_cfg.log_every, train_cfg.ckpt_every, train_cfg.max_minutes = 2, 3, None
        sample.steps = 4
    data = DataConfig(dataset="mnist", image_size=28, channels=1)
    return Config(model=model, diffusion=diffusion, data=data, train=train_cfg, sample=sample)


def demo_judge(out_dir: Path, config: Config, *, smoke: bool = False, progress: bool = True) -> ClassifierResult:
    """The digit classifier that judges a demo: loaded from out_dir/classifier, or trained there once."""
    cls_dir = out_dir / "classifier"
    if (cls_dir / "classifier.json").is_file():
        return load_classifier(cls_dir)
    dc = config.data
    train_set = load_mnist(dc.image_size, "train", dc.holdout, dc.split_seed)
    holdout_set = load_mnist(dc.image_size, "holdout", dc.holdout, dc.split_seed)
    judge = train_classifier(train_set, holdout_set, epochs=1 if smoke else 10, progress=progress)
    save_classifier(judge, cls_dir)
    return judge


def demo_train(config: Config, train_set, out_dir: Path, progress: bool) -> tuple[Any, torch.nn.Module, Config]:
    """Train (resuming the newest checkpoint), plot out_dir/loss_curve.png; return (result, EMA model, config)."""
    run_dir = Path(config.train.out_dir)
    result = train(config, resume=find_latest_checkpoint(run_dir / "checkpoints"), progress=progress, dataset=train_set)
    print(f"trained {result.step} steps in {result.train_seconds / 60:.1f} min; checkpoint {result.checkpoint}")
    plot_loss_curve(run_dir / "metrics.jsonl", out_dir / "loss_curve.png")
    model, saved = load_model(result.checkpoint, "ema")
    return result, model, saved


def sampling_autocast(saved: Config) -> contextlib.AbstractContextManager:
    """bf16 autocast for sampling when the run trained in bf16, else nothing."""
    bf16 = saved.train.precision == "bf16"
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def run_metrics(result, saved: Config, judge: ClassifierResult, sample_seconds: float, smoke: bool) -> dict[str, Any]:
    """The metrics both demos report about the run itself (training, sampler, judge)."""
    return {
        "classifier_holdout_accuracy": judge.holdout_accuracy,
        "train_steps": result.step,
        "train_minutes": round(result.train_seconds / 60, 2),
        # None (JSON null) where no step of this run was ever recorded (a checkpoint from before last_loss
        # was saved): bare NaN is not JSON.
        "final_loss": result.final_loss if math.isfinite(result.final_loss) else None,
        "sampler": saved.sample.sampler,
        "sampling_steps": saved.sample.steps,
        "cfg_scale": saved.sample.cfg_scale,
        "sampling_seconds": round(sample_seconds, 1),
        "checkpoint": str(result.checkpoint),
        "smoke": smoke,
    }


def run_demo(
    out_dir: str | Path = "outputs/demo",
    *,
    smoke: bool = False,
    samples_per_class: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole demo into `out_dir`; returns (and writes) the metrics."""
    out_dir = Path(out_dir)
    check_demo_folder(out_dir, smoke=smoke)  # before anything is written: a --smoke demo is not resumed in full
    out_dir.mkdir(parents=True, exist_ok=True)
    config = demo_config(out_dir, smoke)
    samples_per_class = samples_per_class or (2 if smoke else 100)
    save_config(config, out_dir / "config.yaml")
    dc = config.data
    train_set = load_mnist(dc.image_size, "train", dc.holdout, dc.split_seed)
    holdout_set = load_mnist(dc.image_size, "holdout", dc.holdout, dc.split_seed)

    judge = demo_judge(out_dir, config, smoke=smoke, progress=progress)
    print(f"digit classifier: {judge.holdout_accuracy:.2%} accuracy on {len(holdout_set)} held-out real digits")

    result, model, saved = demo_train(config, train_set, out_dir, progress)
    labels = torch.arange(10).repeat_interleave(samples_per_class)
    t0 = time.perf_counter()
    with sampling_autocast(saved):
        images = generate(model, saved, labels, progress=progress, batch_size=500)
    sample_seconds = time.perf_counter() - t0
    predictions = classify(judge.model, images.float())
    correct = (predictions == labels).float()
    per_class = {str(k): correct[labels == k].mean().item() for k in range(10)}
    grid_cols = min(10, samples_per_class)
    grid_idx = torch.cat([torch.arange(grid_cols) + k * samples_per_class for k in range(10)])
    save_grid(images[grid_idx], out_dir / "samples.png", nrow=grid_cols, scale=3)
    metrics = {
        "conditional_accuracy": correct.mean().item(),
        "per_class_accuracy": per_class,
        "num_samples": len(labels),
        **run_metrics(result, saved, judge, sample_seconds, smoke),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    print(
        f"conditional accuracy of {len(labels)} samples: {metrics['conditional_accuracy']:.2%} "
        f"(judged by the classifier); grid: {out_dir / 'samples.png'}; metrics: {out_dir / 'metrics.json'}"
    )
    return metrics
