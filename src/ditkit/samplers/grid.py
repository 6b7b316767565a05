"""The time grid a sampler walks: a step count (the process's default spacing) or an explicit grid."""

from __future__ import annotations

import torch

from ..diffusion.process import NoiseProcess

__all__ = ["sampling_grid"]


def sampling_grid(process: NoiseProcess, steps: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """(n + 1,) decreasing times ending at the data end: `process.timesteps(steps)`, or `steps` itself
    when it is a tensor (e.g. `process.timesteps(n, spacing='logsnr')`)."""
    if not isinstance(steps, torch.Tensor):
        return process.timesteps(steps, device=device)
    grid = steps.to(device=device, dtype=torch.float32).reshape(-1)
    if len(grid) < 2 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("a sampling grid needs at least 2 strictly decreasing times")
    if float(grid[-1]) != process.t_min:
        raise ValueError(f"a sampling grid must end at the data end t={process.t_min}, got {float(grid[-1])}")
    if float(grid[0]) > process.t_max:  # the process is not defined there (its tables would clamp silently)
        raise ValueError(
            f"a sampling grid must start at or below the noise end t={process.t_max}, got {float(grid[0])}"
        )
    return grid
