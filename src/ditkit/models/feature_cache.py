"""Feature caching across sampling steps: reuse each block's residual for a few denoiser calls.

Consecutive sampling steps feed a DiT nearly the same input, so its blocks compute nearly the same
thing. FORA (Selvaraju et al. 2024, https://arxiv.org/abs/2407.01425) and delta-DiT (Chen et al. 2024,
https://arxiv.org/abs/2406.01125) reuse cached block outputs instead of recomputing them. Here every
`interval`-th forward pass computes all blocks and stores each block's residual (output - input).
The passes in between apply the stored residuals: the patch/label/timestep embeddings and the final
layer still see the current input and time, and only the transformer blocks are skipped.

This is opt-in and approximate, and it trades quality for speed (docs/speed.md reports both).
`feature_cache(model, interval)` is a context manager that swaps the blocks for caching wrappers and
restores them on exit, so the model is unchanged outside it. Caching state lives only inside the
context: one sampling run per context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..utils.checks import count_at_least_one

__all__ = ["feature_cache", "CachedBlock"]


class _Clock:
    """Counts forward passes; block 0 ticks it, every block reads it."""

    def __init__(self, interval: int) -> None:
        self.interval, self.calls, self.refresh, self.computed, self.reused = interval, 0, True, 0, 0


class CachedBlock(nn.Module):
    """A block that returns x + (its residual from the last refresh pass) on the passes in between."""

    def __init__(self, block: nn.Module, clock: _Clock, first: bool) -> None:
        super().__init__()
        self.block, self.clock, self.first = block, clock, first
        self.residual: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        clock = self.clock
        if self.first:  # a new forward pass of the model starts here
            stale = self.residual is None or self.residual.shape != x.shape
            clock.refresh = stale or clock.calls % clock.interval == 0
            clock.calls += 1
            clock.computed += clock.refresh
            clock.reused += not clock.refresh
        if clock.refresh or self.residual is None or self.residual.shape != x.shape:
            out = self.block(x, *args, **kwargs)
            self.residual = (out - x).detach()
            return out
        return x + self.residual.to(x.dtype)


@contextlib.contextmanager
def feature_cache(model: nn.Module, interval: int) -> Iterator[_Clock]:
    """Within the context, `model`'s blocks run fully on every `interval`-th call only (1: no caching).

    Yields a counter with `computed` and `reused` pass counts. At interval 1 the model is left as it
    is and nothing counts its passes: both stay 0.
    """
    # A fraction was accepted and refreshed on the calls divisible by it: every 5th one for 2.5.
    interval = count_at_least_one(interval, "feature cache interval (1: no caching)")
    clock = _Clock(interval)
    if interval == 1:
        yield clock
        return
    original = model.blocks
    model.blocks = nn.ModuleList(CachedBlock(b, clock, first=i == 0) for i, b in enumerate(original))
    try:
        yield clock
    finally:
        model.blocks = original
