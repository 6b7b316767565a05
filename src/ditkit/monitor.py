"""Watching a training run: metrics.jsonl, optional TensorBoard and Weights & Biases, EMA sample grids.

Only rank 0 of a job builds a :class:`RunLog`; the other ranks write nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, config_to_dict

__all__ = ["RunLog", "truncate_metrics", "save_sample_grid"]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (logged by a run that died after its last checkpoint); atomic."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) == len([line for line in lines if line.strip()]):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLog:
    """Appends one JSON object per record to out_dir/metrics.jsonl and mirrors the numbers to
    TensorBoard (`train.tensorboard`) and W&B (`train.wandb_project`) when asked."""

    def __init__(self, config: Config, out_dir: Path) -> None:
        tc = config.train
        self.file = open(out_dir / "metrics.jsonl", "a")
        self.tb: Any = None
        self.wandb: Any = None
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                self.file.close()
                raise ConfigError(
                    "train.tensorboard=true needs the `tensorboard` package (pip install tensorboard, "
                    f"or the ditkit[tracking] extra): {err}"
                ) from err
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if tc.wandb_project is not None:
            try:
                import wandb
            except ImportError as err:
                self.close()
                raise ConfigError(
                    f"train.wandb_project={tc.wandb_project!r} needs the `wandb` package (pip install wandb, "
                    f"or the ditkit[tracking] extra): {err}"
                ) from err
            self.wandb = wandb.init(project=tc.wandb_project, dir=str(out_dir), config=config_to_dict(config))

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
def save_sample_grid(ema: nn.Module, config: Config, path: Path, num_images: int = 16) -> Path:
    """Sample `num_images` images from the EMA model (classes cycled) with config.sample and save a PNG grid."""
    from .sampling import generate
    from .utils.images import save_grid

    was_training = ema.training
    ema.eval()
    m = config.model
    labels: torch.Tensor | int = torch.arange(num_images) % m.num_classes if m.conditional else num_images
    cfg = None if m.class_dropout_prob > 0 or not m.conditional else 1.0
    images = generate(ema, config, labels, cfg_scale=cfg, batch_size=num_images)
    ema.train(was_training)
    nrow = min(m.num_classes, 8) if m.conditional else 4
    return save_grid(images, path, nrow=nrow, scale=max(1, 64 // max(m.input_hw)))
