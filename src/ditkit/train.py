"""Single-process training loop: AdamW, EMA, gradient clipping, autocast, checkpoints and exact resume.

Every random draw (initialisation, data order, flips, timesteps, noise, label dropout) comes from
seeded generators whose states are saved in each checkpoint together with the data position, so a
resumed run continues the interrupted one step for step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm

from .autoencoders import build_autoencoder, resolve_autoencoder
from .checkpoint import (
    CheckpointError,
    checkpoint_name,
    load_config_from_checkpoint,
    load_state,
    load_weights,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import Config, ConfigError, config_to_dict, save_config
from .data import build_dataset
from .data.cache import CacheDataset, CacheError
from .data.sources import make_batch_source, measure_latent_stats
from .diffusion import build_process, diffusion_loss
from .models import DiT
from .models.dit import resize_pos_embed

__all__ = [
    "train",
    "TrainResult",
    "resolve_device",
    "build_model",
    "init_from_checkpoint",
    "load_model",
    "EpochBatchSampler",
    "update_ema",
]

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 10
"""Stop a run after this many optimizer steps in a row had a non-finite loss or gradient."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: Config, seed: int | None = None) -> DiT:
    """A freshly initialised DiT; with `seed`, initialisation is reproducible and leaves global RNG alone."""
    if seed is None:
        return DiT(config.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiT(config.model)


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches, a fresh permutation per epoch from (seed, epoch); drops the last partial batch.

    Iteration starts at (start_epoch, start_batch), which is how a resumed run picks up the data
    position where the checkpoint left it. Iterates forever.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_epoch: int = 0, start_batch: int = 0) -> None:
        if num_items < batch_size:
            raise ConfigError(f"train.batch_size={batch_size} is larger than the dataset ({num_items} images)")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_epoch, self.start_batch = start_epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def __len__(self) -> int:  # DataLoader asks; the sampler is infinite
        return 2**62

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.start_epoch, self.start_batch
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_items, generator=g).tolist()
            for b in range(start, self.batches_per_epoch):
                yield perm[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, start = epoch + 1, 0


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over trainable parameters; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up as min(decay, (1 + step) / (10 + step)) so early averages are not stale."""
    return min(decay, (1 + step) / (10 + step))


@dataclass
class TrainResult:
    """What a finished (or time-limited) run produced."""

    out_dir: Path
    checkpoint: Path
    step: int
    final_loss: float
    train_seconds: float


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _make_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers: int) -> Iterator:
    collate = (lambda batch: batch) if hasattr(dataset, "__getitems__") else default_collate
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate, persistent_workers=num_workers > 0
    )
    return iter(loader)


def train(
    config: Config,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train a DiT as `config` says; `resume` is a checkpoint (or run) folder to continue from.

    Writes into `config.train.out_dir`: config.json, metrics.jsonl (one JSON object per logged step)
    and checkpoints/step_*/ (the newest `keep_last` kept).
    """
    config = resolve_autoencoder(config)  # the model's input shape follows from the autoencoder
    tc = config.train
    out_dir = Path(tc.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    device = resolve_device(tc.device)
    if tc.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs a CUDA device; use 'bf16' on CPU")
    if dataset is None:
        dataset = _training_dataset(config)
    autoencoder = build_autoencoder(config, device=device)
    if config.autoencoder.stats == "data" and config.autoencoder.scale is None and config.autoencoder.shift is None:
        mean, std = measure_latent_stats(autoencoder, dataset, device=device)
        measured = dataclasses.replace(config.autoencoder, shift=mean, scale=[1.0 / s for s in std])
        config = dataclasses.replace(config, autoencoder=measured, model=dataclasses.replace(config.model))
        autoencoder.set_normalization(measured)
        log.info("latent statistics measured from the data: shift=%s scale=%s", measured.shift, measured.scale)
    source = make_batch_source(config, autoencoder, dataset, progress)

    resume_path = None
    if resume is not None:
        resume_path = resolve_checkpoint(resume)
        saved = load_config_from_checkpoint(resume_path)
        if config_to_dict(saved.model) != config_to_dict(config.model):
            raise ConfigError(f"cannot resume from {resume_path}: its model config differs from this run's")
    elif ckpt_dir.is_dir() and any(ckpt_dir.glob("step_*")):
        raise ConfigError(
            f"{ckpt_dir} already holds checkpoints; pass --resume {out_dir} to continue, "
            "or choose another train.out_dir"
        )

    num_classes = getattr(dataset, "num_classes", None)
    if config.model.conditional and num_classes is not None and num_classes > config.model.num_classes:
        raise ConfigError(f"the dataset has {num_classes} classes but model.num_classes={config.model.num_classes}")
    if config.model.conditional and num_classes == 0:
        raise ConfigError("the dataset has no class labels (a flat folder?): set model.num_classes=0 (unconditional)")

    process = build_process(config.diffusion)
    model = build_model(config, seed=tc.seed)
    if tc.init_from is not None and resume_path is None:
        init_from_checkpoint(model, tc.init_from)
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    warmup = tc.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    generator = torch.Generator(device).manual_seed(tc.seed + 1)

    step, epoch, batch_in_epoch, train_seconds = 0, 0, 0, 0.0
    if resume_path is not None:
        model.load_state_dict(load_weights(resume_path, "model", device))
        ema.load_state_dict(load_weights(resume_path, "ema", device))
        state = load_state(resume_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        train_seconds = float(state["train_seconds"])
        log.info("resumed from %s at step %d", resume_path, step)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.json")
    sampler = EpochBatchSampler(len(dataset), tc.batch_size, tc.seed, epoch, batch_in_epoch)
    batches = _make_loader(dataset, sampler, tc.num_workers)

    def checkpoint() -> Path:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "generator": generator.get_state(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "train_seconds": train_seconds,
        }
        path = save_checkpoint(ckpt_dir / checkpoint_name(step), config=config, model=model, ema=ema, state=state)
        prune_checkpoints(ckpt_dir, tc.keep_last)
        return path

    metrics_file = open(out_dir / "metrics.jsonl", "a")
    bar = tqdm(total=tc.steps, initial=step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    last_path, window_loss, window_n, last_loss, nonfinite_run, skipped = None, 0.0, 0, float("nan"), 0, 0
    window_start = time.perf_counter()
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            x0, y = source(next(batches), generator, device)
            with _autocast(device, tc.precision):
                loss = diffusion_loss(
                    model, process, x0, y, generator=generator, prediction=config.diffusion.prediction
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            max_norm = tc.grad_clip if tc.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            batch_in_epoch += 1
            if batch_in_epoch == sampler.batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                # Skip the update; fp16's scaler handles its own overflow, this guards everything else.
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                nonfinite_run, skipped = nonfinite_run + 1, skipped + 1
                log.warning("step %d: non-finite loss or gradient, update skipped", step + 1)
                if nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
                    raise FloatingPointError(
                        f"{nonfinite_run} consecutive non-finite steps ending at step {step + 1}; "
                        f"stopping without saving (last good checkpoint: {last_path or 'none'})"
                    )
                continue
            nonfinite_run = 0
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            update_ema(ema, model, ema_decay_at(step, tc.ema_decay))
            step += 1
            train_seconds += time.perf_counter() - t0
            last_loss = loss.item()
            window_loss, window_n = window_loss + last_loss, window_n + 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "loss": window_loss / window_n,
                    "grad_norm": float(grad_norm),
                    "lr": scheduler.get_last_lr()[0],
                    "img_per_s": window_n * tc.batch_size / max(elapsed, 1e-9),
                    "train_seconds": round(train_seconds, 3),
                    "skipped_steps": skipped,
                }
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
            out_of_time = tc.max_minutes is not None and train_seconds >= tc.max_minutes * 60
            if step % tc.ckpt_every == 0 or step == tc.steps or out_of_time:
                last_path = checkpoint()
            if out_of_time:
                log.info("train.max_minutes=%s reached at step %d", tc.max_minutes, step)
                break
    finally:
        bar.close()
        metrics_file.close()
    if last_path is None:  # resumed at or past the final step
        last_path = checkpoint()
    return TrainResult(out_dir, last_path, step, last_loss, train_seconds)


def _training_dataset(config: Config) -> Dataset:
    """Images as data.* describes, or the latent cache data.cache names (checked against this config)."""
    if not config.data.cache:
        return build_dataset(config.data, "train")
    cache = CacheDataset(config.data.cache)
    built = cache.manifest["autoencoder"]
    for key, value in built.items():
        if config_to_dict(config.autoencoder)[key] != value:
            raise CacheError(
                f"data.cache={config.data.cache} was encoded with autoencoder.{key}={value!r}, "
                f"but this run has {getattr(config.autoencoder, key)!r}"
            )
    if cache.manifest["data"]["image_size"] != config.data.image_size:
        raise CacheError(
            f"data.cache={config.data.cache} holds {cache.manifest['data']['image_size']} px images, "
            f"but data.image_size={config.data.image_size}"
        )
    return cache


def init_from_checkpoint(model: DiT, path: str | Path) -> None:
    """Copy a checkpoint's EMA weights into `model`, resizing the positional embedding to its grid.

    Every other tensor must match in shape: this changes resolution, not architecture.
    """
    path = resolve_checkpoint(path)
    source = load_config_from_checkpoint(path).model
    state = load_weights(path, "ema")
    mine = model.config
    if source.patch_size != mine.patch_size:
        raise ConfigError(
            f"train.init_from={path}: patch size {source.patch_size} differs from model.patch_size={mine.patch_size}"
        )
    if mine.pos_embed == "learned":
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], mine.grid_hw, True, old_grid=source.grid_hw)
    else:  # fixed sin-cos: this model's own table, whatever the source used
        state["pos_embed"] = model.pos_embed.detach().clone()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"train.init_from={path}: weights do not fit this model: {err}") from err


def load_model(path: str | Path, which: str = "ema", device: str | torch.device = "cpu") -> tuple[DiT, Config]:
    """A DiT and its Config from a checkpoint (or run) folder, or an official DiT .pt file, in eval mode."""
    if Path(path).suffix in (".pt", ".pth") and Path(path).is_file():
        from .convert.official import from_official

        model, config = from_official(path)
        return model.to(device), config
    path = resolve_checkpoint(path)
    config = load_config_from_checkpoint(path)
    with torch.device("meta"):
        model = DiT(config.model)
    try:
        model.load_state_dict(load_weights(path, which, device), assign=True)
    except RuntimeError as err:  # missing/unexpected keys or wrong shapes
        raise CheckpointError(f"{path / (which + '.safetensors')} does not match its config.json: {err}") from err
    return model.to(device).eval(), config
