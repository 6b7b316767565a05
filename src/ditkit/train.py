"""Training loop for 1 process or a torchrun job (DDP / FSDP2): AdamW, EMA, gradient clipping and
accumulation, autocast, activation checkpointing, torch.compile, checkpoints and exact resume.

Every random draw comes from seeded generators: initialisation from the seed, the data order from
(seed, epoch), and the per-sample timesteps, noise, flips and label dropout from streams keyed by the
data position (ditkit.distributed), so a resumed run continues the interrupted one step for step and
the world size does not change what a step computes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm

from .autoencoders import build_autoencoder, resolve_autoencoder
from .checkpoint import (
    CheckpointError,
    checkpoint_name,
    checkpoints_after,
    find_latest_checkpoint,
    load_config_from_checkpoint,
    load_state,
    load_weights,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import Config, ConfigError, config_to_dict, save_config, size_hw
from .data import build_dataset
from .data.cache import CacheDataset, CacheError, verify_cache
from .data.sources import make_batch_source, measure_latent_stats
from .diffusion import build_process, diffusion_loss
from .distributed import (
    DistEnv,
    all_sum,
    barrier,
    draw_normal,
    draw_streams,
    full_optimizer_state,
    full_state_dict,
    full_tensor,
    grad_sync,
    init_distributed,
    load_full_optimizer_state,
    local_tensor,
    resolve_device,
    shard_blocks,
    shutdown_distributed,
    tf32,
    wrap_model,
)
from .inpainting import inpaint_loss, stream_masks
from .models import DiT
from .models.dit import resize_pos_embed
from .monitor import RunLog, check_metrics, save_sample_grid, tracking_packages, truncate_metrics
from .utils.images import plot_loss_curve

__all__ = [
    "train",
    "TrainResult",
    "resolve_device",
    "build_model",
    "init_from_checkpoint",
    "load_model",
    "EpochBatchSampler",
    "update_ema",
    "compile_for_training",
    "make_adamw",
]

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 10
"""Stop a run after this many optimizer steps in a row had a non-finite loss or gradient."""

MIN_LOSS_SCALE = 1.0
"""fp16: gradient overflows while the loss scale is at least this are the scaler's backoff (it halves
the scale and the step is retried) and do not count towards MAX_CONSECUTIVE_NONFINITE; below it the
unscaled gradients themselves overflow, which counts."""

_clock = time.perf_counter  # the wall clock of train.max_minutes and the logged timings (tests substitute one)

DATA_POSITION_KEYS = {
    "num_items": "the number of training items",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
}
"""What a saved data position (epoch, batch in epoch) means depends on these; a checkpoint records them."""


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
    position where the checkpoint left it; a start past the end of an epoch begins the next epoch
    instead, and `start_epoch` / `start_batch` then name that position. Iterates forever. With
    `world_size` > 1, rank `rank` gets its contiguous slice of each global batch (batch_size /
    world_size indices): every rank walks the same permutation, so the global batch does not depend
    on the number of ranks.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start_epoch: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_items < batch_size:
            raise ConfigError(f"train.batch_size={batch_size} is larger than the dataset ({num_items} images)")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ConfigError(f"train.batch_size={batch_size} cannot be split over {world_size} ranks (rank {rank})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        if start_batch >= self.batches_per_epoch:  # the nearest valid position: the next epoch's start
            start_epoch, start_batch = start_epoch + 1, 0
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.rank, self.world_size = rank, world_size

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
            share = self.batch_size // self.world_size
            for b in range(start, self.batches_per_epoch):
                first = b * self.batch_size + self.rank * share
                yield perm[first : first + share]
            epoch, start = epoch + 1, 0


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, *, copy_buffers: bool = True) -> None:
    """ema <- decay * ema + (1 - decay) * model over all parameters (frozen ones are equal in both, so
    unchanged); buffers are copied, since a running statistic is not something to average.

    `copy_buffers=False` skips the buffers, for a model that has none or whose buffers never change:
    finding them walks every module of both models (about 0.4 ms of CPU per step at DiT-XL/2, which has none).
    """
    ema_params = [local_tensor(p) for p in ema.parameters()]  # FSDP: both sharded alike, update the shards
    params = [local_tensor(p.detach()) for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    if copy_buffers:
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
            local_tensor(ema_buffer).copy_(local_tensor(buffer))


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
    """The last step's loss; from the checkpoint when this call took no step (NaN if none ever ran)."""
    train_seconds: float
    start_step: int = 0
    """The step this call started from (a resume's); `step - start_step` steps ran now."""


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

    Writes into `config.train.out_dir`: config.json, metrics.jsonl (one JSON object per logged step),
    checkpoints/step_*/ (the newest `keep_last` kept), samples/ (with `sample_every`) and, at the end,
    loss_curve.png. Under `torchrun` every rank runs this same function (DDP or FSDP, see
    ditkit.distributed); only rank 0 writes files.
    """
    config = resolve_autoencoder(config)  # the model's input shape follows from the autoencoder
    owns_group = not dist.is_initialized()
    env = init_distributed(config.train.device)
    try:
        with tf32(env.device, config.train.tf32):
            return _train(config, env, resume, progress, dataset)
    finally:
        shutdown_distributed(owns_group)


def _train(
    config: Config, env: DistEnv, resume: str | Path | None, progress: bool, dataset: Dataset | None
) -> TrainResult:
    tc = config.train
    out_dir = Path(tc.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    device = env.device
    if tc.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs a CUDA device; use 'bf16' on CPU")
    if dataset is None:
        dataset = _training_dataset(config)
    autoencoder = build_autoencoder(config, device=device)
    resume_path = resolve_checkpoint(resume) if resume is not None else None
    saved = load_config_from_checkpoint(resume_path) if resume_path is not None else None
    ae = config.autoencoder
    if ae.stats == "data" and ae.scale is None and ae.shift is None:
        saved_ae = saved.autoencoder if saved is not None else None
        if saved_ae is not None and (saved_ae.scale is not None or saved_ae.shift is not None):
            # A resumed run keeps the normalisation it was trained with: measuring again (on another
            # device, or after the data changed) could silently change what the model is fed.
            measured = dataclasses.replace(ae, shift=saved_ae.shift, scale=saved_ae.scale)
            log.info("latent statistics from the resumed checkpoint: shift=%s scale=%s", measured.shift, measured.scale)
        else:
            mean, std = measure_latent_stats(autoencoder, dataset, device=device)
            measured = dataclasses.replace(ae, shift=mean, scale=[1.0 / s for s in std])
            log.info("latent statistics measured from the data: shift=%s scale=%s", measured.shift, measured.scale)
        config = dataclasses.replace(config, autoencoder=measured, model=dataclasses.replace(config.model))
        autoencoder.set_normalization(measured)
    source = make_batch_source(config, autoencoder, dataset, progress)
    world, accum = env.world_size, tc.grad_accum_steps
    if tc.batch_size % (world * accum):
        raise ConfigError(
            f"train.batch_size={tc.batch_size} must be divisible by the number of processes ({world}) "
            f"times train.grad_accum_steps={accum}"
        )
    local_batch = tc.batch_size // world  # this rank's share of the global batch
    micro = local_batch // accum  # images per forward/backward pass

    same_run = False
    if resume_path is not None:
        _check_same_model(saved, config, resume_path)
        # The run folder a checkpoint belongs to is the one whose checkpoints/ holds it.
        same_run = resume_path.resolve().parent == ckpt_dir.resolve()
        if not same_run and _holds_checkpoints(ckpt_dir):
            raise ConfigError(
                f"cannot resume from {resume_path} into train.out_dir={out_dir}: {ckpt_dir} already holds the "
                f"checkpoints of another run, which this would overwrite; choose an empty train.out_dir, or pass "
                f"--resume {out_dir} to continue that run instead"
            )
    elif _holds_checkpoints(ckpt_dir):
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
    # The EMA copies the model's buffers each step (a running statistic is not averaged). A DiT has none
    # (a fixed sin-cos pos_embed is a frozen Parameter, equal in both models), so the per-step search
    # for them is skipped unless the model really has some.
    copy_buffers = any(True for _ in model.buffers())
    state: dict = {}
    if resume_path is not None:  # full weights go into the plain modules, before any wrapping or sharding
        model.load_state_dict(load_weights(resume_path, "model", device))
        ema.load_state_dict(load_weights(resume_path, "ema", device))
        state = load_state(resume_path)
        position_keys = {"num_items": len(dataset), "batch_size": tc.batch_size, "seed": tc.seed}
        _check_data_position(state, position_keys, resume_path)
    model.grad_checkpoint_every = tc.grad_checkpoint_every
    fsdp = env.distributed and tc.parallel == "fsdp"
    wrapped = wrap_model(model, env, tc.parallel)
    if fsdp:
        shard_blocks(ema, env.device)  # same shards as the model, so the EMA update is local
    forward = compile_for_training(wrapped, model, tc.compile)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP swaps in DTensors
    optimizer = make_adamw(trainable, tc.fused_adamw, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    warmup = tc.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")

    step, epoch, batch_in_epoch, train_seconds = 0, 0, 0, 0.0
    # The logging window (steps since the last metrics.jsonl record) and the skipped-step count go into
    # every checkpoint, so a resumed run's records average the same steps as an uninterrupted run's.
    window_loss, window_n, window_time, skipped = 0.0, 0, 0.0, 0
    last_loss = float("nan")  # the latest step's loss (TrainResult.final_loss), saved with each checkpoint
    start_step = 0
    if resume_path is not None:
        _load_optimizer(model, optimizer, state["optimizer"], env, resume_path)
        scheduler.load_state_dict(state["scheduler"])
        _apply_optimizer_settings(optimizer, scheduler, resume_path)
        _load_scaler(scaler, state["scaler"], resume_path)
        rng = state.get("rng", [])
        if len(rng) == world:
            _set_rng_state(rng[env.rank], device)
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        start_step = step
        train_seconds = float(state["train_seconds"])
        # The window carries on only on the same log_every grid (a record averages the steps since the last
        # one on it); checkpoints from before the window was saved, or another log_every, start an empty one.
        skipped, last_loss = int(state.get("skipped_steps", 0)), float(state.get("last_loss", last_loss))
        if state.get("window_log_every") == tc.log_every:
            window_loss, window_n = float(state["window_loss"]), int(state["window_steps"])
            window_time = float(state["window_seconds"])
        log.info("resumed from %s at step %d", resume_path, step)
    sampler = EpochBatchSampler(
        len(dataset), tc.batch_size, tc.seed, epoch, batch_in_epoch, rank=env.rank, world_size=world
    )
    if (sampler.start_epoch, sampler.start_batch) != (epoch, batch_in_epoch):
        # Only a checkpoint from before the data position was checked (see _check_data_position) can
        # get here: its settings changed under it. The sampler starts at the nearest valid position.
        log.warning(
            "%s: saved data position (epoch %d, batch %d) lies past the end of an epoch of %d batches; "
            "continuing at the start of epoch %d",
            resume_path, epoch, batch_in_epoch, sampler.batches_per_epoch, sampler.start_epoch,
        )  # fmt: skip
    epoch, batch_in_epoch = sampler.start_epoch, sampler.start_batch

    # Whatever can still refuse this run is set up before a resume rolls the run's records back below.
    if env.is_main:
        tracking_packages(config)  # RunLog's, imported now: RunLog opens metrics.jsonl once it is in place
    evaluator = None
    if tc.eval_every and env.is_main:
        from .evaluation.in_training import InTrainingEvaluator

        evaluator = InTrainingEvaluator(config, dataset, device)

    grid_text: dict = {}  # a text model's grid: 16 dataset captions, embedded once from the run's cache
    if tc.sample_every and config.model.text_conditional and env.is_main:
        from .evaluation.in_training import PrecomputedText, dataset_prompts
        from .text import caption_table  # cached with the dataset's captions: no encoder weights load

        prompts = dataset_prompts(config, dataset, 16, f"train.sample_every={tc.sample_every}")
        grid_text = {"prompts": prompts, "text_encoder": PrecomputedText(prompts, caption_table(config, prompts))}

    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if same_run:
            metrics = check_metrics(out_dir / "metrics.jsonl")  # refuse a damaged file before anything is moved
            _set_aside_later_steps(out_dir, resume_path, step)  # copies metrics.jsonl aside, unchanged
            truncate_metrics(out_dir / "metrics.jsonl", step, metrics)
        else:
            _set_aside_stale_records(out_dir)
        save_config(config, out_dir / "config.json")
    batches = _make_loader(dataset, sampler, tc.num_workers)
    null_class = config.model.num_classes
    drop_prob = config.model.class_dropout_prob if config.model.conditional else 0.0
    if config.model.text_conditional:
        drop_prob = config.model.caption_dropout_prob
    input_shape = (config.model.in_channels, *config.model.input_hw)  # model-space x0 (latents or pixels)
    prediction, vlb_weight = config.diffusion.prediction, config.diffusion.vlb_weight

    loop_start = None

    def elapsed() -> float:
        """Seconds of training loop so far, over every resume: steps, evaluations, grids, checkpoints."""
        return train_seconds + (_clock() - loop_start if loop_start is not None else 0.0)

    def checkpoint(window_time: float) -> Path:
        """Save this step; `window_time`: the seconds of training in the logging window so far."""
        # Collectives first (every rank), then rank 0 writes while the others wait at the barrier.
        model_state, ema_state = full_state_dict(model), full_state_dict(ema)
        optimizer_state = full_optimizer_state(model, optimizer)
        rng = _gather_rng_states(env, device)
        path = ckpt_dir / checkpoint_name(step)
        if env.is_main:
            ckpt_state = {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,
                "world_size": world,
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                # what (epoch, batch_in_epoch) means depends on these; a resume checks them
                "num_items": len(dataset),
                "batch_size": tc.batch_size,
                "seed": tc.seed,
                "train_seconds": elapsed(),
                "window_loss": window_loss,  # sum of the losses of the steps since the last record
                "window_steps": window_n,
                "window_seconds": window_time,
                "window_log_every": tc.log_every,  # the grid the window belongs to
                "skipped_steps": skipped,
                "last_loss": last_loss,  # a run resumed at its end (no step to take) still reports it
            }
            save_checkpoint(path, config=config, model=model_state, ema=ema_state, state=ckpt_state)
            prune_checkpoints(ckpt_dir, tc.keep_last)  # keeps `path`, the newest
        barrier(env)
        return path

    def full_ema() -> nn.Module:
        """The whole EMA model on rank 0, for sampling there; under FSDP every rank must call this (the
        gather is a collective), and ranks other than 0 get their own shard back."""
        if not fsdp:
            return ema
        weights = full_state_dict(ema)
        if not env.is_main:
            return ema
        full = DiT(config.model).to(device).requires_grad_(False).eval()
        full.load_state_dict(weights)
        return full

    def sample_grid() -> None:
        full = full_ema()
        if env.is_main:
            save_sample_grid(full, config, out_dir / "samples" / f"{checkpoint_name(step)}.png", **grid_text)
        barrier(env)

    run_log = RunLog(config, out_dir, start_step) if env.is_main else None
    bar = tqdm(
        total=tc.steps, initial=step, desc="training", unit="step", disable=not (progress and env.is_main),
        dynamic_ncols=True,
    )  # fmt: skip
    model.train()
    for embedder in (model.y_embedder, model.text_embedder):
        if embedder is not None:
            embedder.eval()  # label / caption dropout is drawn per sample below, not by the embedder
    last_path, nonfinite_run = None, 0
    saved_step = None
    if same_run:  # this step is already saved here: a finished run resumed again is not written again
        last_path, saved_step = resume_path, step
    # train.max_minutes under torchrun: every rank must stop at the same step, so the ranks agree on it
    # (one rank over the budget stops them all). Each step's all-reduce below carries every rank's
    # verdict as of then, so agreeing costs no collective or host sync of its own; only before the first
    # step and after an evaluation, grid or checkpoint (time spent after that all-reduce) do the ranks
    # agree afresh (_over_budget). One process reads its clock before every step.
    carry_budget = env.distributed and tc.max_minutes is not None
    agreed_over: bool | None = None  # the carried verdict, when it is still current
    loop_start = _clock()
    window_start = loop_start - window_time  # a resumed window goes on where the checkpoint left it
    try:
        while step < tc.steps:
            # The budget is checked before a step, so a run resumed already past it takes no step.
            over = agreed_over if agreed_over is not None else _over_budget(env, tc.max_minutes, elapsed())
            if over:
                log.info("train.max_minutes=%s reached at step %d", tc.max_minutes, step)
                break
            batch_local = next(batches)  # this rank's share of the global batch
            batch_index = epoch * sampler.batches_per_epoch + batch_in_epoch  # keys the per-sample streams
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for m in range(accum):
                piece = _slice_batch(batch_local, slice(m * micro, (m + 1) * micro))
                first = env.rank * local_batch + m * micro  # position of the piece's first image in the global batch
                positions = range(first, first + micro)
                t, noise, u_flip, u_drop = draw_streams(
                    process, input_shape, positions, seed=tc.seed, batch_index=batch_index, device=device
                )
                flip = (u_flip < 0.5) if config.data.hflip else None
                posterior = None
                if source.stochastic:  # a posterior draw per image (VAE latents), from its own stream
                    posterior = draw_normal(
                        input_shape, positions, seed=tc.seed, batch_index=batch_index, device=device, salt=1
                    )
                x0, y = source(piece, device, flip=flip, posterior_noise=posterior)
                if drop_prob > 0 and config.model.text_conditional:  # the learned null text replaces the caption
                    y = dataclasses.replace(y, null=y.null_rows | (u_drop < drop_prob))
                elif drop_prob > 0:
                    y = torch.where(u_drop < drop_prob, torch.full_like(y, null_class), y)
                with grad_sync(wrapped, env, enabled=m == accum - 1):  # all-reduce on the last piece only
                    with _autocast(device, tc.precision):
                        if config.model.inpaint:  # L_simple only; a random mask per sample, from its own stream
                            masks = stream_masks(
                                *x0.shape[2:], positions, seed=tc.seed + 2, batch_index=batch_index, device=device
                            )
                            loss = inpaint_loss(
                                forward, process, x0, y, prediction=prediction, t=t, noise=noise, known_mask=masks
                            )
                        else:
                            loss = diffusion_loss(
                                forward, process, x0, y, prediction=prediction, t=t, noise=noise, vlb_weight=vlb_weight
                            )
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().float()
            scaler.unscale_(optimizer)
            max_norm = tc.grad_clip if tc.grad_clip is not None else math.inf
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            batch_in_epoch += 1
            if batch_in_epoch >= sampler.batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            # One all-reduce per step: mean loss, whether any rank saw a non-finite value and, with a
            # time budget, whether any rank has used it up, so that every rank takes the same branch
            # (skip or step, stop or go on). One host sync reads them all.
            local_loss = loss_sum / accum
            bad = ~(torch.isfinite(local_loss) & torch.isfinite(grad_norm))
            flags = [local_loss, bad.float()]
            if carry_budget:  # a fill on the device, not a host-to-device copy
                flags.append(local_loss.new_full((), float(elapsed() >= tc.max_minutes * 60)))
            totals = all_sum(env, torch.stack(flags)).tolist()
            if carry_budget:
                agreed_over = totals[2] > 0
            if totals[1] > 0:
                # Skip the update. With fp16, a finite loss whose gradients overflow is the loss scale
                # being too high, as at the start of most fp16 runs (the scale starts at 2^16): the scaler
                # halves it and the step is retried. That backoff is not divergence, so it does not count
                # towards the stop; everything else does.
                scale = scaler.get_scale() if scaler.is_enabled() else None
                backoff = scale is not None and math.isfinite(totals[0]) and scale >= MIN_LOSS_SCALE
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                skipped += 1
                if backoff:
                    log.info("step %d: fp16 gradient overflow at loss scale %g; scale lowered, step retried",
                             step + 1, scale)  # fmt: skip
                    continue
                nonfinite_run += 1
                log.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", step + 1, skipped)
                if nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
                    if run_log is not None:
                        run_log.write({"step": step, "skipped_steps": skipped, "stopped": "non-finite"})
                    raise FloatingPointError(
                        f"{nonfinite_run} consecutive non-finite steps ending at step {step + 1}; "
                        f"stopping without saving (last good checkpoint: {last_path or 'none'})"
                    )
                continue
            nonfinite_run = 0
            scaler.step(optimizer)
            scaler.update()
            step_lr = optimizer.param_groups[0]["lr"]  # the lr this step used; scheduler.step() sets the next
            scheduler.step()
            update_ema(ema, model, ema_decay_at(step, tc.ema_decay), copy_buffers=copy_buffers)
            step += 1
            last_loss = totals[0] / world
            window_loss, window_n = window_loss + last_loss, window_n + 1
            bar.update(1)
            if run_log is not None and (step % tc.log_every == 0 or step == tc.steps):
                window_seconds = _clock() - window_start
                record = {
                    "step": step,
                    "loss": window_loss / window_n,
                    "grad_norm": float(grad_norm),
                    "lr": step_lr,
                    "img_per_s": window_n * tc.batch_size / max(window_seconds, 1e-9),
                    "train_seconds": round(elapsed(), 3),
                    "skipped_steps": skipped,
                }
                run_log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                # The last step's record off the log_every grid leaves the window open: resumed for more
                # steps, the run's next record averages the same steps as an uninterrupted run's.
                if step % tc.log_every == 0:
                    window_loss, window_n, window_start = 0.0, 0, _clock()
            # Evaluations, grids and checkpoints are not training throughput: their time is kept out of
            # the window (img_per_s), though not out of train_seconds.
            paused = _clock()
            if tc.eval_every and step % tc.eval_every == 0:
                # Under FSDP rank 0 alone sampling the sharded EMA hung the run at its first evaluation.
                scored = full_ema()
                if evaluator is not None:  # rank 0 samples and scores; the others wait
                    run_log.write({"step": step, **evaluator(scored)})
                barrier(env)
                agreed_over = None  # the time it took is not in the carried verdict
            if tc.sample_every and step % tc.sample_every == 0:
                sample_grid()
                agreed_over = None
            if step % tc.ckpt_every == 0 or step == tc.steps:
                last_path, saved_step = checkpoint(paused - window_start), step
                agreed_over = None
            window_start += _clock() - paused
    finally:
        bar.close()
        if run_log is not None:
            run_log.close()
    if saved_step != step:  # stopped by max_minutes between checkpoints, or resumed at or past the end
        last_path = checkpoint(_clock() - window_start)
    if env.is_main and (out_dir / "metrics.jsonl").is_file():
        plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss_curve.png")
    return TrainResult(out_dir, last_path, step, last_loss, elapsed(), start_step)


def _over_budget(env: DistEnv, max_minutes: float | None, seconds: float) -> bool:
    """Whether `seconds` of training have used up train.max_minutes, agreed by every rank (each reads
    its own clock; one rank over the budget stops them all, so all take the same branch). Under torchrun
    a collective: the training loop calls it only where no step's all-reduce carries the answer."""
    if max_minutes is None:
        return False  # no collective at all: a run without a budget is not slowed or changed
    if not env.distributed:
        return seconds >= max_minutes * 60  # one process: nothing to agree on, no tensor, no sync
    over = torch.tensor(float(seconds >= max_minutes * 60), device=env.device)
    return bool(all_sum(env, over) > 0)


def _check_same_model(saved: Config, config: Config, path: Path) -> None:
    """Refuse to resume a checkpoint whose model config differs from this run's, naming each key."""
    theirs, ours = config_to_dict(saved.model), config_to_dict(config.model)
    differing = [
        f"model.{key}={theirs.get(key)!r} there, {ours.get(key)!r} here"
        for key in sorted(set(theirs) | set(ours))
        if theirs.get(key) != ours.get(key)
    ]
    if differing:
        raise ConfigError(
            f"cannot resume from {path}: its model config differs from this run's: {'; '.join(differing)} "
            f"(train with the checkpoint's settings, e.g. --config {path / 'config.json'})"
        )


def _check_data_position(state: dict, current: dict[str, int], path: Path) -> None:
    """Refuse to resume when what the saved data position depends on has changed.

    (epoch, batch in epoch) indexes a permutation of `num_items` items cut into global batches of
    `batch_size`, drawn from `seed`: with any of them changed, the same numbers name other images
    and the continuation is neither exact nor well defined. Checkpoints from before these were
    saved have none of the keys and are accepted as before.
    """
    for key, setting in DATA_POSITION_KEYS.items():
        if key in state and int(state[key]) != current[key]:
            raise ConfigError(
                f"cannot resume from {path}: {setting} was {int(state[key])} when it was saved, but is "
                f"{current[key]} in this run; its saved data position (epoch {state.get('epoch')}, batch "
                f"{state.get('batch_in_epoch')}) depends on it. Resume with the same value, or start a new run "
                f"from its weights with train.init_from={path}"
            )


def _holds_checkpoints(ckpt_dir: Path) -> bool:
    """Any step_* folder, or a checkpoint an interrupted replace left only under its `.old` name."""
    return ckpt_dir.is_dir() and (any(ckpt_dir.glob("step_*")) or find_latest_checkpoint(ckpt_dir) is not None)


def _aside_folder(out_dir: Path) -> Path:
    """A new out_dir/abandoned-YYYYmmdd-HHMMSS[-k] folder for files a run moves out of its way."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, k = out_dir / f"abandoned-{stamp}", 1
    while folder.exists():
        k += 1
        folder = out_dir / f"abandoned-{stamp}-{k}"
    folder.mkdir(parents=True)
    return folder


def _step_of_grid(path: Path) -> int | None:
    name = path.stem
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def _set_aside_later_steps(out_dir: Path, resume_path: Path, step: int) -> None:
    """Resuming from a checkpoint older than the run's newest starts a new timeline from it: move the
    later checkpoints and sample grids, and a copy of metrics.jsonl, to out_dir/abandoned-*/.

    Left in place, the later checkpoints would outrank the new ones (keep_last deletes the lowest
    steps, so it would delete the checkpoint just written) and `--resume RUN_DIR` would go back to
    the abandoned timeline. Moved, not deleted: they may be what the user wants back.
    """
    ckpt_dir = out_dir / "checkpoints"
    later = checkpoints_after(ckpt_dir, step)
    if not later:
        return
    aside = _aside_folder(out_dir)
    (aside / "checkpoints").mkdir()
    for path in later:
        os.replace(path, aside / "checkpoints" / path.name)
    grids = [g for g in sorted((out_dir / "samples").glob("step_*.png")) if (_step_of_grid(g) or 0) > step]
    if grids:
        (aside / "samples").mkdir()
        for grid in grids:
            os.replace(grid, aside / "samples" / grid.name)
    moved = f"the later checkpoints ({', '.join(p.name for p in later)})" + (" and their sample grids" if grids else "")
    if (out_dir / "metrics.jsonl").is_file():  # the live file keeps the records up to `step`
        shutil.copy2(out_dir / "metrics.jsonl", aside / "metrics.jsonl")
        moved += ", and a copy of metrics.jsonl,"
    log.warning(
        "resuming from %s, which is older than the newest checkpoint in %s: moved %s to %s, so that this run's "
        "checkpoints are the newest and --resume %s continues this run",
        resume_path, ckpt_dir, moved, aside, out_dir,
    )  # fmt: skip


def _set_aside_stale_records(out_dir: Path) -> None:
    """A run that starts a new timeline here (fresh, or resumed from another folder) starts a new
    metrics.jsonl; one already there (left by a run that died before its first checkpoint) and its
    sample grids move to out_dir/abandoned-*/ instead of being appended to or overwritten."""
    stale = [p for p in (out_dir / "metrics.jsonl", out_dir / "samples") if p.exists()]
    if not stale:
        return
    aside = _aside_folder(out_dir)
    for path in stale:
        os.replace(path, aside / path.name)
    log.warning(
        "%s holds %s from an earlier run that left no checkpoint; moved to %s",
        out_dir, " and ".join(p.name for p in stale), aside,
    )  # fmt: skip


def _slice_batch(batch: object, part: slice) -> object:
    """Rows `part` of a loader batch: a tensor, or (nested) tuples of tensors / None."""
    if isinstance(batch, torch.Tensor):
        return batch[part]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice_batch(b, part) for b in batch)
    return batch


def make_adamw(params: list[nn.Parameter], fused: bool | None = None, **settings) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **settings)` with the kernel `train.fused_adamw` names: `fused` None
    takes the fused kernel where PyTorch has one for `params` and its default kernel otherwise, True
    insists (ConfigError without one), False takes the default kernel."""
    if fused is False:
        return torch.optim.AdamW(params, **settings)
    try:
        return torch.optim.AdamW(params, **settings, fused=True)
    except RuntimeError as err:  # no fused kernel for these parameters' device or dtype
        if fused:
            raise ConfigError(f"train.fused_adamw=true is not available here: {err}") from err
        return torch.optim.AdamW(params, **settings)


def compile_for_training(wrapped: nn.Module, model: DiT, scope: bool | str) -> nn.Module:
    """The forward to train `wrapped` (`model`, or its DDP/FSDP wrapper) with under `train.compile`:
    eager (False), one graph (True) or per block ('blocks').

    'blocks' compiles the transformer blocks of `model` in place (inside any DDP/FSDP wrapper, after
    sharding, as FSDP2 expects), so the EMA copy, made before, stays eager for the sample grids and
    evaluations. Dynamo treats module parameters as graph inputs, so all blocks reuse one graph.
    """
    if scope == "blocks":
        for block in model.blocks:
            block.compile()
        return wrapped
    return torch.compile(wrapped) if scope else wrapped


def _training_dataset(config: Config) -> Dataset:
    """Images as data.* describes, or the latent cache data.cache names (checked against this config)."""
    if not config.data.cache:
        return build_dataset(config.data, "train")
    cache = CacheDataset(config.data.cache)
    # On every rank, concurrently: one rank checking while the others wait in a collective would trip the
    # process group's timeout (10 minutes with NCCL) where stat-ing a large tree on a network file system
    # takes longer.
    verify_cache(config.data.cache, cache.manifest)  # refuse latents of images or VAE weights changed since
    built = cache.manifest["autoencoder"]
    for key, value in built.items():
        if config_to_dict(config.autoencoder)[key] != value:
            raise CacheError(
                f"data.cache={config.data.cache} was encoded with autoencoder.{key}={value!r}, "
                f"but this run has {getattr(config.autoencoder, key)!r}"
            )
    # Compared as (height, width): the manifest's JSON holds [16, 24] where the config holds (16, 24),
    # and 16 where the config may say [16, 16].
    if size_hw(cache.manifest["data"]["image_size"]) != config.data.image_hw:
        raise CacheError(
            f"data.cache={config.data.cache} holds {cache.manifest['data']['image_size']} px images, "
            f"but data.image_size={config.data.image_size}"
        )
    return cache


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, env: DistEnv, path: Path) -> None:
    """Optimizer state from a checkpoint: name-keyed (any topology) or, from older checkpoints, index-keyed."""
    if all(isinstance(k, str) for k in saved.get("state", {})) and saved.get("param_groups"):
        names = saved["param_groups"][0]["params"]
        if all(isinstance(n, str) for n in names):
            load_full_optimizer_state(model, optimizer, saved)
            return
    if env.distributed:
        raise CheckpointError(
            f"{path / 'state.pt'} holds an index-keyed optimizer state from an older ditkit; resume it on one "
            "process once (its next checkpoint is topology-independent)"
        )
    optimizer.load_state_dict(saved)


_OPTIMIZER_KEYS = {"lr": "train.lr", "betas": "train.betas", "weight_decay": "train.weight_decay", "eps": "AdamW eps"}
"""The AdamW settings of this run's config that a resume applies over those saved in the checkpoint."""


def _apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, path: Path
) -> None:
    """After loading a checkpoint's optimizer and schedule: put back this run's AdamW settings.

    `load_state_dict` restores each param group's lr, betas, weight decay and eps, and the schedule's
    base learning rates, as they were saved, so a resume with a changed `train.lr` would silently keep
    the old one while config.json recorded the new. The optimizer was built from this run's config, so
    its `defaults` hold the wanted values; the current lr is recomputed from the schedule at the
    restored step. Unchanged settings give back the very floats that were loaded (LambdaLR computes
    base_lr * lambda(step) the same way), so an exact resume stays exact.
    """
    defaults = optimizer.defaults
    changed = {}
    for key, name in _OPTIMIZER_KEYS.items():
        # The saved lr is the scheduled one; train.lr sets the schedule's base lr.
        saved = scheduler.base_lrs[0] if key == "lr" else optimizer.param_groups[0][key]
        wanted = defaults[key]
        if key == "betas":  # a tuple or a list, as it was given
            saved, wanted = tuple(saved), tuple(wanted)
        if saved != wanted:
            changed[name] = (saved, wanted)
    scheduler.base_lrs = [defaults["lr"]] * len(optimizer.param_groups)
    for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        # fused too: the kernel choice is this run's, not the checkpoint's (not logged: results are equal)
        group.update({key: defaults[key] for key in ("betas", "weight_decay", "eps", "fused")})
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
    if changed:
        log.info(
            "%s: this run's optimizer settings replace the checkpoint's: %s",
            path, ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items()),
        )  # fmt: skip


def _load_scaler(scaler: torch.amp.GradScaler, saved: dict, path: Path) -> None:
    """The fp16 grad scaler's state from a checkpoint. A run without fp16 saved its disabled scaler as
    {}, which an enabled scaler refuses (a bare RuntimeError): resumed with fp16, the scale starts afresh."""
    if scaler.is_enabled() and not saved:
        log.info(
            "%s holds no grad scaler state (it was trained without fp16): the fp16 loss scale starts afresh at %g",
            path, scaler.get_scale(),
        )  # fmt: skip
        return
    scaler.load_state_dict(saved)


def _gather_rng_states(env: DistEnv, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The global RNG states (CPU, and CUDA when used) of every rank, in rank order.

    Training draws do not use them (see ditkit.distributed); they are kept so that anything else drawing
    from the global generators (a user's module with dropout, say) also resumes exactly.
    """
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if not env.distributed:
        return [mine]
    states: list = [None] * env.world_size
    dist.all_gather_object(states, mine)
    return states


def _set_rng_state(saved: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(saved["cpu"])
    if device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"], device)


def init_from_checkpoint(model: DiT, path: str | Path) -> None:
    """Copy a checkpoint's EMA weights into `model`, resizing the positional embedding to its grid.

    Every other tensor must match in shape: this changes resolution (or adds `model.inpaint`'s input
    channels, zero-initialised), not architecture.
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
    w, extra = state["x_embedder.proj.weight"], mine.embed_channels - source.embed_channels
    if extra > 0:  # into an inpainting model: the mask and masked-image channels start at zero
        state["x_embedder.proj.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], dim=1)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"train.init_from={path}: weights do not fit this model: {err}") from err


def load_model(path: str | Path, which: str = "ema", device: str | torch.device = "cpu") -> tuple[DiT, Config]:
    """A DiT and its Config from a checkpoint (or run) folder, or an official DiT .pt file, in eval mode;
    `which`: the 'ema' or the raw 'model' weights (an official release file holds one set, taken either way)."""
    if which not in ("ema", "model"):
        raise ValueError(f"--weights must be 'ema' or 'model', got {which!r}")
    if Path(path).suffix in (".pt", ".pth") and Path(path).is_file():
        from .convert.official import from_official

        model, config = from_official(path, which=which)
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
