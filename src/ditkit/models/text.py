"""Text conditioning of a DiT from precomputed text-encoder embeddings.

Two ways, both optional per model (`ModelConfig.text_mode`): the pooled caption embedding projected
into the adaLN conditioning vector, as DiT conditions on classes and as transformer_latent_diffusion
does with pooled CLIP embeddings; and the caption's token embeddings attended by a cross-attention
layer in every block, as in PixArt-alpha (Chen et al. 2023, https://arxiv.org/abs/2310.00426), with
the padding mask. A learned null text replaces dropped captions in training and is the unconditional
branch of classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).

The model never runs a text encoder: `TextCond` carries the embeddings in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig

__all__ = ["TextCond", "TextEmbedder"]

_EMPTY_ROW = "a caption has no unmasked token (empty mask row)"


@dataclass
class TextCond:
    """A batch of encoded captions: what a text-conditioned DiT takes in place of class labels.

    `null` (N,) bool marks rows whose caption is replaced by the model's learned null text (None: none);
    such rows' own embeddings are ignored. Guidance batches a cond with its `as_null()` via `cat`.
    """

    tokens: torch.Tensor
    """(N, L, E) token embeddings."""
    mask: torch.Tensor
    """(N, L) bool, True at real tokens, False at padding."""
    pooled: torch.Tensor
    """(N, E) pooled caption embedding."""
    null: torch.Tensor | None = None
    """(N,) bool: rows to replace by the null text, or None."""

    def __post_init__(self) -> None:
        n, length, width = self.tokens.shape
        if self.mask.shape != (n, length) or self.pooled.shape != (n, width):
            raise ValueError(
                f"TextCond shapes disagree: tokens {tuple(self.tokens.shape)}, mask {tuple(self.mask.shape)} "
                f"(expected ({n}, {length})), pooled {tuple(self.pooled.shape)} (expected ({n}, {width}))"
            )
        self.mask = self.mask.bool()
        if self.null is not None and self.null.shape != (n,):
            raise ValueError(f"TextCond.null must have shape ({n},), got {tuple(self.null.shape)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> TextCond:
        null = None if self.null is None else self.null[index]
        return TextCond(self.tokens[index], self.mask[index], self.pooled[index], null)

    def check_rows(self) -> None:
        """Raise ValueError if a row that is not the null text has no unmasked token (its attention
        would be NaN). Reads the mask on the host (a device sync)."""
        ok = self.mask.any(dim=1)  # (N,)
        if self.tokens.shape[1] > 0:
            ok = ok | self.null_rows  # a null row attends to the one null token
        if not bool(ok.all()):
            raise ValueError(_EMPTY_ROW)

    @property
    def null_rows(self) -> torch.Tensor:
        """(N,) bool: which rows use the null text."""
        if self.null is None:
            return torch.zeros(len(self), dtype=torch.bool, device=self.tokens.device)
        return self.null

    def to(self, device: torch.device | str) -> TextCond:
        """The same cond on another device."""
        null = None if self.null is None else self.null.to(device)
        return TextCond(self.tokens.to(device), self.mask.to(device), self.pooled.to(device), null)

    def as_null(self) -> TextCond:
        """The unconditional counterpart: every row is the null text."""
        return TextCond(self.tokens, self.mask, self.pooled, torch.ones_like(self.null_rows))

    def with_dropout(self, prob: float, generator: torch.Generator | None = None) -> TextCond:
        """Replace each row by the null text with probability `prob` (drawn from `generator`)."""
        drop = torch.rand(len(self), generator=generator, device=self.tokens.device) < prob
        return TextCond(self.tokens, self.mask, self.pooled, self.null_rows | drop)

    @staticmethod
    def cat(conds: list[TextCond]) -> TextCond:
        """Concatenate along the batch; token lengths must agree."""
        lengths = {c.tokens.shape[1] for c in conds}
        if len(lengths) > 1:
            raise ValueError(f"cannot batch captions of different token lengths {sorted(lengths)}")
        nulls = None
        if any(c.null is not None for c in conds):
            nulls = torch.cat([c.null_rows for c in conds])
        return TextCond(
            torch.cat([c.tokens for c in conds]),
            torch.cat([c.mask for c in conds]),
            torch.cat([c.pooled for c in conds]),
            nulls,
        )


class TextEmbedder(nn.Module):
    """TextCond -> (pooled conditioning (N, D) or None, context tokens (N, L, D) or None, mask (N, L)).

    The pooled embedding goes through a 2-layer SiLU MLP (like the timestep embedder); token embeddings
    through a 2-layer GELU MLP (PixArt-alpha's caption projection). Null rows take the learned null text:
    the null pooled vector, and a single null token (the rest of the row masked out).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, d = config.text_dim, config.hidden_size
        self.dropout_prob = config.caption_dropout_prob
        self.use_pooled = config.text_mode in ("pooled", "both")
        self.use_tokens = config.text_mode in ("tokens", "both")
        self.text_dim = e
        if self.use_pooled:
            self.null_pooled = nn.Parameter(torch.zeros(e))
            self.pooled_proj = nn.Sequential(nn.Linear(e, d), nn.SiLU(), nn.Linear(d, d))
        if self.use_tokens:
            self.null_token = nn.Parameter(torch.zeros(e))
            self.token_proj = nn.Sequential(nn.Linear(e, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))

    def check(self, cond: TextCond) -> None:
        """The host-side check of `forward` (a device sync): with token conditioning every row needs a token."""
        if self.use_tokens:
            cond.check_rows()

    def forward(
        self, cond: TextCond, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if not isinstance(cond, TextCond):
            raise TypeError(f"a text-conditioned DiT takes a TextCond (see ditkit.text), got {type(cond).__name__}")
        if cond.tokens.shape[-1] != self.text_dim:
            raise ValueError(
                f"text embeddings are {cond.tokens.shape[-1]}-d but this model has model.text_dim={self.text_dim} "
                "(was it trained with another text encoder?)"
            )
        if self.training and self.dropout_prob > 0:
            cond = cond.with_dropout(self.dropout_prob, generator)
        null = cond.null_rows  # (N,)
        pooled = context = mask = None
        if self.use_pooled:
            p = torch.where(null[:, None], self.null_pooled.to(cond.pooled.dtype), cond.pooled)  # (N, E)
            pooled = self.pooled_proj(p)  # (N, D)
        if self.use_tokens:
            n, length, _ = cond.tokens.shape
            first = torch.arange(length, device=null.device) == 0  # (L,)
            tokens = torch.where(null[:, None, None], self.null_token.to(cond.tokens.dtype), cond.tokens)  # (N, L, E)
            mask = torch.where(null[:, None], first[None].expand(n, length), cond.mask)  # (N, L)
            # A row with every token masked would give NaN attention; such a caption is a caller error.
            # Compiled, the check is an asserting op in the graph (a RuntimeError with the same message):
            # a Python branch on tensor data would break the graph in two. While a CUDA graph records
            # (no host reads allowed), `CUDAGraphForward` checks every call's cond before its replay.
            if torch.compiler.is_compiling():
                torch._assert_async(mask.any(dim=1).all(), _EMPTY_ROW)
            elif not (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
                cond.check_rows()
            context = self.token_proj(tokens)  # (N, L, D)
        return pooled, context, mask
