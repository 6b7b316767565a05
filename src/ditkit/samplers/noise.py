"""Fresh Gaussian noise for stochastic samplers, from one generator or one generator per sample.

A list of generators (one per batch row) makes each sample's noise depend only on its own generator,
so a sample comes out the same whatever batch it is drawn in (`ditkit.sampling.generate(sample_seeds=)`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Generators", "randn_like"]

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole batch, one per sample, or None (the global RNG)."""


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like `x`; row i from `generator[i]` when a sequence is given."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]} samples")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
