"""Watching a training run: metrics.jsonl, optional TensorBoard and Weights & Biases, EMA sample grids.

Only rank 0 of a job builds a :class:`RunLog`; the other ranks write nothing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import Config, ConfigError, config_to_dict

__all__ = [
    "RunLog",
    "MetricsError",
    "MetricsFile",
    "check_metrics",
    "truncate_metrics",
    "save_sample_grid",
    "tracking_packages",
]

log = logging.getLogger(__name__)


class MetricsError(ValueError):
    """metrics.jsonl cannot be read; the message names the file and line."""


class MetricsFile(NamedTuple):
    """metrics.jsonl as read: (line, record) pairs, its cut last line as (number, text) or None, and
    whether the file lacks its final newline."""

    records: list[tuple[str, Any]]
    cut: tuple[int, str] | None
    no_final_newline: bool


def _read_metrics(path: Path) -> MetricsFile:
    """metrics.jsonl, parsed. Raises MetricsError for an invalid line that is not the last."""
    text = path.read_text()
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    records, cut = [], None
    for i, (number, line) in enumerate(lines):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:  # a crash cuts only the write in progress, the last line
                raise MetricsError(
                    f"{path} line {number} is not valid JSON ({err}); fix or remove that line, then resume again"
                ) from err
            cut = (number, line)
    return MetricsFile(records, cut, bool(text) and not text.endswith("\n"))


def check_metrics(path: Path) -> MetricsFile | None:
    """Raise MetricsError (naming the file and line) if truncate_metrics would refuse `path`; reads only.

    Returns the parsed file (None if there is none), which truncate_metrics takes instead of reading
    the file again, as long as nothing has written to it in between.
    """
    return _read_metrics(path) if path.is_file() else None


def truncate_metrics(path: Path, last_step: int, parsed: MetricsFile | None = None) -> None:
    """Drop records after `last_step` (logged by a run that died after its last checkpoint); atomic.

    A last line that is not valid JSON (cut by a crash or a full disk in the middle of a write) is
    dropped with a warning; an invalid line anywhere else is not something a crash leaves, so it
    raises MetricsError naming the file and line instead of being silently discarded. `parsed` is
    check_metrics' result for the file as it is now (it is read here without one).
    """
    if parsed is None:
        if not path.is_file():
            return
        parsed = _read_metrics(path)
    records, cut, no_final_newline = parsed
    if cut is not None:
        log.warning("%s: dropped its last line %d, not valid JSON (cut by a crash?): %r", path, *cut)
    kept = [line for line, record in records if not (isinstance(record, dict) and record.get("step", 0) > last_step)]
    if len(kept) == len(records) and cut is None and not no_final_newline:  # a missing newline would glue records
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def tracking_packages(config: Config) -> tuple[Any, Any]:
    """(TensorBoard's SummaryWriter, the wandb module) as `train.tensorboard` / `train.wandb_project` ask,
    None for each one not asked for. Only imports, writes nothing: a missing package is a ConfigError
    naming the setting, which training checks before it changes anything in the run folder."""
    tc = config.train
    writer, wandb = None, None
    if tc.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter as writer
        except ImportError as err:
            raise ConfigError(
                "train.tensorboard=true needs the `tensorboard` package (pip install tensorboard, "
                f"or the ditkit[tracking] extra): {err}"
            ) from err
    if tc.wandb_project is not None:
        try:
            import wandb
        except ImportError as err:
            raise ConfigError(
                f"train.wandb_project={tc.wandb_project!r} needs the `wandb` package (pip install wandb, "
                f"or the ditkit[tracking] extra): {err}"
            ) from err
    return writer, wandb


class RunLog:
    """Appends one JSON object per record to out_dir/metrics.jsonl and mirrors the numbers to
    TensorBoard (`train.tensorboard`) and W&B (`train.wandb_project`) when asked."""

    def __init__(self, config: Config, out_dir: Path, start_step: int = 0) -> None:
        """`start_step`: the step a resumed run goes on from. metrics.jsonl has been cut back to it, and
        TensorBoard drops its events after it (`purge_step`), so its curves do not show the abandoned
        steps beside the new ones. W&B starts a new run at every start, as it always has: a W&B run
        refuses steps below the last one it logged, so it could not take the resumed steps back."""
        writer, wandb = tracking_packages(config)  # first: a missing package leaves nothing open
        self.file = open(out_dir / "metrics.jsonl", "a")
        self.tb: Any = None
        if writer is not None:
            # From the first step on a fresh start too: a run that died before its first checkpoint left
            # events that metrics.jsonl (set aside) no longer has.
            self.tb = writer(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self.wandb: Any = None
        if wandb is not None:
            self.wandb = wandb.init(project=config.train.wandb_project, dir=str(out_dir), config=config_to_dict(config))

    def write(self, record: dict[str, Any]) -> None:
        """Log a record that has a 'step' key; its other numbers become scalars."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        """Flush and close every sink."""
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


@torch.no_grad()
def save_sample_grid(
    ema: nn.Module,
    config: Config,
    path: Path,
    num_images: int = 16,
    prompts: list[str] | None = None,
    text_encoder=None,
) -> Path:
    """Sample `num_images` images from the EMA model (classes cycled; for a text-conditioned model one
    per prompt of `prompts`) with config.sample and save a PNG grid."""
    from .sampling import generate
    from .utils.images import save_grid

    was_training = ema.training
    ema.eval()
    m = config.model
    try:
        if m.text_conditional:
            if not prompts:
                raise ValueError("a text-conditioned model's sample grid needs prompts")
            cfg = None if m.caption_dropout_prob > 0 else 1.0
            images = generate(
                ema, config, prompts=prompts, text_encoder=text_encoder, cfg_scale=cfg, batch_size=len(prompts)
            )
        else:
            labels: torch.Tensor | int = torch.arange(num_images) % m.num_classes if m.conditional else num_images
            cfg = None if m.class_dropout_prob > 0 or not m.conditional else 1.0
            images = generate(ema, config, labels, cfg_scale=cfg, batch_size=num_images)
    finally:
        ema.train(was_training)
    nrow = min(m.num_classes, 8) if m.conditional else 4
    return save_grid(images, path, nrow=nrow, scale=max(1, 64 // max(m.input_hw)))
