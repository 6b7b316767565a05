"""Image grids and plots written as PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["to_uint8", "make_grid", "save_grid", "plot_loss_curve"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into an (rows, nrow) uint8 grid (H', W', C)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = max(1, -(-n // nrow))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 1) -> Path:
    """Write images as a PNG grid, `nrow` per row, optionally upscaled by an integer factor."""
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def plot_loss_curve(metrics_jsonl: str | Path, path: str | Path, size: tuple[int, int] = (640, 360)) -> Path:
    """Plot 'loss' against 'step' from a metrics.jsonl file as a PNG line chart (log-scaled loss)."""
    points = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "loss" in rec and rec["loss"] > 0:
                points.append((rec["step"], rec["loss"]))
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 20, 30, h - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), "training loss (log scale) vs step", fill="black")
    if len(points) >= 2:
        steps = np.array([p[0] for p in points], dtype=float)
        logs = np.log10(np.array([p[1] for p in points], dtype=float))
        lo, hi = logs.min(), logs.max()
        hi = hi if hi > lo else lo + 1e-3
        pad = 0.05 * (hi - lo)  # keep the curve off the frame
        lo, hi = lo - pad, hi + pad
        xs = left + (steps - steps.min()) / max(steps.max() - steps.min(), 1) * (right - left)
        ys = bottom - (logs - lo) / (hi - lo) * (bottom - top)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(31, 119, 180), width=2)
        draw.text((4, top), f"{10**hi:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{10**lo:.3g}", fill="black")
        draw.text((left, bottom + 8), f"{int(steps.min())}", fill="black")
        draw.text((right - 40, bottom + 8), f"{int(steps.max())}", fill="black")
    path = Path(path)
    img.save(path)
    return path
