"""Diffusion Transformer with adaLN-Zero conditioning.

Implements "Scalable Diffusion Models with Transformers" (Peebles & Xie, 2023,
https://arxiv.org/abs/2212.09748), written from the paper. Parameter names follow the layout of the
official checkpoints (`x_embedder.proj`, `blocks.N.adaLN_modulation.1`, ...) so published weights load
without renaming.

The network is a plain `nn.Module` over (x, t, y): it knows nothing about noise schedules. `t` is the
timestep value in whatever units the noise process feeds it (0..999 for the DDPM process). For a
text-conditioned model (`text_dim > 0`) y is a `TextCond` of precomputed caption embeddings (see
`text.py`: pooled into adaLN, tokens through cross-attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import ModelConfig, TextConfig, size_hw
from .layers import (  # noqa: F401 - re-exported: these names have lived in this module
    Attention,
    CrossAttention,
    LabelEmbedder,
    Linear,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    _has_hooks,
    attention,
    gated_residual,
    gated_residual_norm_modulate,
    modulate,
    norm_modulate,
    norm_modulate_residual,
    sincos_pos_embed_2d,
    timestep_embedding,
)
from .text import TextCond, TextEmbedder

__all__ = [
    "DiT",
    "DiTBlock",
    "TokenConditionedBlock",
    "TextCond",
    "sincos_pos_embed_2d",
    "timestep_embedding",
    "count_macs",
    "resize_pos_embed",
]


def _mlp_width(config: ModelConfig) -> int:
    """Hidden units of the MLP: hidden_size * mlp_ratio, rounded down.

    A ratio read back from a checkpoint's shapes (fc1 / hidden, as `convert.official` infers it) can
    multiply back to just under an integer (112 * (61 / 112) = 60.99999999999999); plain int() would then
    build one unit too few. Products within 1e-6 of an integer, far above float error and far below any
    deliberate fraction, are taken as that integer; every other product rounds down as it always has.
    The snap stays here rather than in the converter: checkpoints converted so far store that inexact
    ratio in their config.json, and only a model-side snap builds them at the width of their weights.
    """
    width = config.hidden_size * config.mlp_ratio
    nearest = round(width)
    return nearest if abs(width - nearest) < 1e-6 else int(width)


def _mlp_grid(config: ModelConfig) -> tuple[int, int] | None:
    """The token grid a depthwise-convolution MLP runs over, or None for the plain MLP."""
    if config.mlp_type != "dwconv":
        return None
    return config.grid_hw


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the condition (adaLN), and whose residual
    branches are also scaled by condition-dependent gates in the adaLN-Zero variant."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.gated = config.block_type == "adaLN-Zero"
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, config.num_heads, config.attn_impl, config.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, _mlp_width(config), config.mlp_act, _mlp_grid(config))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, (6 if self.gated else 4) * d))
        # Text tokens: PixArt-alpha's un-modulated cross-attention between self-attention and MLP.
        if config.text_conditional and config.text_mode in ("tokens", "both"):
            self.norm_cross = nn.LayerNorm(d, eps=1e-6)
            self.cross_attn = CrossAttention(d, config.num_heads, config.attn_impl)
        else:
            self.cross_attn = None

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # norm1 / norm2 are un-affine LayerNorms; norm_modulate applies them in the matmul dtype.
        # norm_modulate_residual: (normed, x), x to add the branch to (see layers: one gradient pass fewer)
        if self.gated:
            modulation = self.adaLN_modulation(c).chunk(6, dim=1)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
            h, x = norm_modulate_residual(x, shift_msa, scale_msa, self.norm1.eps)
            if self.cross_attn is None:
                return self.gated_branches(h, x, modulation)
            x = self._cross(gated_residual(x, gate_msa, self.attn(h)), context, mask)
            h, x = norm_modulate_residual(x, shift_mlp, scale_mlp, self.norm2.eps)
            return gated_residual(x, gate_mlp, self.mlp(h))
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        h, x = norm_modulate_residual(x, shift_msa, scale_msa, self.norm1.eps)
        x = x + self.attn(h)
        x = self._cross(x, context, mask)
        h, x = norm_modulate_residual(x, shift_mlp, scale_mlp, self.norm2.eps)
        return x + self.mlp(h)

    def gated_branches(
        self,
        h: torch.Tensor,
        x: torch.Tensor,
        modulation: tuple[torch.Tensor, ...],
        then: Callable[[], tuple[torch.Tensor, torch.Tensor, float]] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The gated block without cross-attention from its first norm on: x + both gated branches, for h the
        first norm's output (`norm_modulate_residual` of x) and `modulation` the six chunks of adaLN(c).

        Each residual and the norm after it are one pass (`gated_residual_norm_modulate`): the MLP's norm
        after the attention's residual, and, given `then`, which returns (shift, scale, eps) of the norm that
        follows the block (the next block's first, or the final layer's; called after the MLP, so modules run
        in the block-by-block order), that norm after the MLP's residual, returning (its output, x) instead of
        x (`DiT` chains its blocks so in inference)."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        h, x = gated_residual_norm_modulate(x, gate_msa, self.attn(h), shift_mlp, scale_mlp, self.norm2.eps)
        if then is None:
            return gated_residual(x, gate_mlp, self.mlp(h))
        branch = self.mlp(h)
        return gated_residual_norm_modulate(x, gate_mlp, branch, *then())

    def _cross(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        if self.cross_attn is None:
            return x
        return x + self.cross_attn(self.norm_cross(x), context, mask)  # (N, T, D)


class TokenConditionedBlock(nn.Module):
    """Pre-norm transformer block for the token-conditioned variants.

    'in-context': plain self-attention + MLP; the conditioning tokens are part of the sequence.
    'cross-attn': self-attention, then cross-attention over the conditioning tokens, then MLP.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, config.num_heads, config.attn_impl, config.qk_norm)
        if config.block_type == "cross-attn":
            self.norm_cross = nn.LayerNorm(d, eps=1e-6)
            self.cross_attn = CrossAttention(d, config.num_heads, config.attn_impl)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, _mlp_width(config), config.mlp_act, _mlp_grid(config))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """LayerNorm (adaLN-modulated in the adaLN variants), then tokens -> patch pixels.

    The paper maps each token to its p*p*C_out patch values with a linear layer and unpatchifies;
    `deconv=True` does the same map as a ConvTranspose2d with kernel = stride = p over the token grid
    (as Cerebras' DiT does), which shares one bias per output channel instead of one per patch pixel.
    """

    def __init__(
        self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True, deconv: bool = False
    ) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if deconv:
            self.linear = None
            self.deconv = nn.ConvTranspose2d(hidden_size, out_channels, kernel_size=patch_size, stride=patch_size)
        else:
            self.linear = Linear(hidden_size, patch_size * patch_size * out_channels)
            self.deconv = None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size)) if adaptive else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, T, p*p*C_out) with the linear head, (N, T, D) normalised tokens with deconv."""
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = norm_modulate(x, shift, scale, self.norm_final.eps)
        else:
            x = self.norm_final(x)
        return self.head(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """`forward` after the norm, for h its output."""
        return h if self.linear is None else self.linear(h)


class DiT(nn.Module):
    """Diffusion Transformer, class-conditional or (num_classes=0) unconditional.

    `forward(x, t, y)` returns (N, out_channels, H, W).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.require_resolved()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.grid_hw = config.grid_hw  # (rows, columns) of tokens; H != W is fine
        self.x_embedder = PatchEmbed(p, config.embed_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        # An unconditional model has no label embedding at all (not a one-class table).
        self.y_embedder = (
            LabelEmbedder(config.num_classes, d, config.class_dropout_prob) if config.conditional else None
        )
        self.text_embedder = TextEmbedder(config) if config.text_conditional else None
        # Fixed sin-cos is kept as a frozen parameter so it sits in the state dict as in official checkpoints.
        learned = config.pos_embed == "learned"
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, d), requires_grad=learned)
        self.adaptive = config.block_type in ("adaLN-Zero", "adaLN")
        block = DiTBlock if self.adaptive else TokenConditionedBlock
        self.blocks = nn.ModuleList(block(config) for _ in range(config.depth))
        deconv = config.unpatchify == "deconv"
        self.final_layer = FinalLayer(d, p, config.out_channels, adaptive=self.adaptive, deconv=deconv)
        # Activation checkpointing: recompute every k-th block (blocks 0, k, 2k, ...) in the backward
        # pass instead of storing its activations; 0 = off. A speed/memory switch, not architecture, so
        # it is a plain attribute the trainer sets (train.grad_checkpoint_every), not a config field.
        self.grad_checkpoint_every = 0
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (null) class."""
        if self.y_embedder is None or self.config.class_dropout_prob == 0:
            raise ValueError("this model has no null class (unconditional, or trained without label dropout)")
        return self.config.num_classes

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The paper's initialisation: xavier linears, zeroed adaLN modulations and output layer."""
        if self.pos_embed.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.config.hidden_size, *self.grid_hw)[None])
        # Initialise the patch projection like a linear layer over flattened patches.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.zeros_(w[:, self.config.in_channels :])  # inpaint: mask channels start switched off
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.text_embedder is not None:
            for name, param in self.text_embedder.named_parameters():
                if name.startswith("null_"):
                    nn.init.normal_(param, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output starts at zero. Plain adaLN keeps
        # the xavier-initialised modulation (there are no gates to zero).
        if self.config.block_type == "adaLN-Zero":
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
                if block.cross_attn is not None:  # text cross-attention starts silent too: blocks stay identities
                    nn.init.zeros_(block.cross_attn.proj.weight)
                    nn.init.zeros_(block.cross_attn.proj.bias)
        if self.final_layer.adaLN_modulation is not None:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        head = self.final_layer.linear if self.final_layer.linear is not None else self.final_layer.deconv
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens -> (N, C, H, W) image."""
        n, p, c = x.shape[0], self.config.patch_size, self.config.out_channels
        rows, cols = self.grid_hw
        x = x.reshape(n, rows, cols, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(n, c, rows * p, cols * p)  # (N, C, H, W)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | TextCond | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predict from noisy input x (N, C, H, W), timesteps t (N,) and labels y (N,) (null class allowed).

        An `inpaint` model takes x as (N, 2C + 1, H, W): x_t, the known mask and the masked image;
        given only x_t it treats every pixel as unknown.

        `generator` drives label (or caption) dropout in training mode. An unconditional model ignores `y`;
        a text-conditioned one takes a `TextCond` as y.
        """
        h, w = self.config.input_hw
        c_in, c_embed = self.config.in_channels, self.config.embed_channels
        if x.shape[1:] == (c_in, h, w) and c_embed > c_in:  # inpaint model without a mask: nothing known
            x = torch.cat([x, x.new_zeros(x.shape[0], c_embed - c_in, h, w)], dim=1)  # (N, 2C + 1, H, W)
        if x.shape[1:] != (c_embed, h, w):
            raise ValueError(f"DiT expects input of shape (N, {c_embed}, {h}, {w}), got {tuple(x.shape)}")
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        cond = [self.t_embedder(t)]  # [(N, D)]
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this DiT is class-conditional: pass labels y (the null class for unconditional)")
            cond.append(self.y_embedder(y, generator))
        text_tokens = text_mask = None
        if self.text_embedder is not None:
            if y is None:
                raise ValueError("this DiT is text-conditioned: pass a TextCond y (as_null() for unconditional)")
            pooled, text_tokens, text_mask = self.text_embedder(y, generator)
            if pooled is not None:
                cond[0] = cond[0] + pooled  # one conditioning vector: t and pooled text embeddings added
        if self.adaptive:
            c = torch.stack(cond).sum(0)  # (N, D): t and y embeddings added
            if self._chains(x):
                x = self.final_layer.head(self._chained_blocks(x, c))
                return self._head_to_image(x)
            for i, block in enumerate(self.blocks):
                x = self._run_block(i, block, x, c, text_tokens, text_mask)  # (N, T, D)
        else:
            c = torch.stack(cond, dim=1)  # (N, S, D): conditioning tokens, S = 2 (1 if unconditional)
            tokens = x.shape[1]
            context, mask = c, None
            if text_tokens is not None:  # 'cross-attn' blocks attend the text tokens beside t
                context = torch.cat([c, text_tokens.to(c.dtype)], dim=1)  # (N, S + L, D)
                mask = torch.cat([torch.ones(c.shape[:2], dtype=torch.bool, device=c.device), text_mask], dim=1)
            if self.config.block_type == "in-context":
                x = torch.cat([x, c.to(x.dtype)], dim=1)  # (N, T + S, D)
            for i, block in enumerate(self.blocks):
                x = self._run_block(i, block, x, context, mask)
            x = x[:, :tokens]  # (N, T, D): conditioning tokens removed before the final layer
        return self._head_to_image(self.final_layer(x, c))

    def _head_to_image(self, x: torch.Tensor) -> torch.Tensor:
        """The final layer's output, (N, T, p*p*C_out) or (N, T, D) for the deconv head -> (N, C_out, H, W)."""
        if self.final_layer.deconv is not None:
            rows, cols = self.grid_hw
            x = x.transpose(1, 2).reshape(x.shape[0], -1, rows, cols)  # (N, D, h, w)
            return self.final_layer.deconv(x)  # (N, C_out, H, W)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def _chains(self, x: torch.Tensor) -> bool:
        """Whether the blocks may run as one chain (`_chained_blocks`): CPU inference (where the fused pass is;
        elsewhere it would be the same two ops), gated blocks without cross-attention and the final layer as
        built (not wrapped, by `feature_cache` say, nor compiled in place with `Module.compile`, which the
        chain's direct calls would bypass), and no hook to see a block or the final layer run. Not under
        torch.compile (Inductor fuses these passes itself; Dynamo need not trace the checks)."""
        final = self.final_layer

        def plain(module: nn.Module) -> bool:
            return not _has_hooks(module) and getattr(module, "_compiled_call_impl", None) is None

        return (
            not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and x.device.type == "cpu"
            and type(final) is FinalLayer
            and final.adaLN_modulation is not None
            and plain(final)
            and all(type(b) is DiTBlock and b.gated and b.cross_attn is None and plain(b) for b in self.blocks)
        )

    def _chained_blocks(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The blocks and the final layer's norm on x (N, T, D) with each block's last residual and the norm after
        it in one pass (`DiTBlock.gated_branches`): the final norm's output (N, T, D). The same values as block
        after block (the fused pass rounds as the two it replaces); the residual stream is read once fewer per
        block. Each block's modulation is made when the norm before it needs it (one alive at a time, and the
        modules run in the block-by-block order)."""
        blocks, final = list(self.blocks), self.final_layer
        modulation: list[tuple[torch.Tensor, ...]] = []  # the current block's six chunks

        def norm_before(i: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor, float]]:
            def norm() -> tuple[torch.Tensor, torch.Tensor, float]:
                if i == len(blocks):
                    return (*final.adaLN_modulation(c).chunk(2, dim=1), final.norm_final.eps)
                modulation[:] = [blocks[i].adaLN_modulation(c).chunk(6, dim=1)]
                return modulation[0][0], modulation[0][1], blocks[i].norm1.eps

            return norm

        h, x = norm_modulate_residual(x, *norm_before(0)())
        for i, block in enumerate(blocks):
            h, x = block.gated_branches(h, x, modulation[0], norm_before(i + 1))
        return h

    def _run_block(self, i: int, block: nn.Module, x: torch.Tensor, *cond: torch.Tensor | None) -> torch.Tensor:
        """Block i on (x, *cond), through torch.utils.checkpoint when it is one of the checkpointed blocks."""
        k = self.grad_checkpoint_every
        if k and i % k == 0 and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, *cond, use_reentrant=False)
        return block(x, *cond)


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | tuple[int, int],
    learned: bool,
    old_grid: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Positional embedding (1, rows*cols, D) for another token grid (an int is a square grid).

    Fixed sin-cos embeddings are recomputed; learned ones are interpolated bicubically, as when a
    model trained at 256 px is fine-tuned at 512 px. `old_grid` defaults to a square grid.
    """
    _, tokens, dim = pos_embed.shape
    new_hw = size_hw(new_grid)
    if old_grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"pos_embed has {tokens} tokens, not a square grid: pass old_grid")
        old_grid = side
    old_hw = size_hw(old_grid)
    if old_hw[0] * old_hw[1] != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not the {old_hw[0]}x{old_hw[1]} grid given")
    if old_hw == new_hw:
        return pos_embed
    if not learned:
        return sincos_pos_embed_2d(dim, *new_hw)[None].to(pos_embed)
    grid = pos_embed.reshape(1, *old_hw, dim).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    grid = F.interpolate(grid, size=new_hw, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim).to(pos_embed.dtype)  # (1, T', D)


def count_macs(config: ModelConfig, text_tokens: int | None = None) -> int:
    """Multiply-accumulates of one forward pass for one image (the paper's "flops": one MAC = one flop).

    Counts the matrix products (patch embedding, conditioning MLPs, attention projections and scores,
    MLPs, output layer); elementwise work is negligible and left out, as in the paper. A text model also
    counts its text projections and, with text tokens, the cross-attention over `text_tokens` tokens per
    caption (padding included: masked keys are still multiplied); None means the default
    `text.max_length` (TextConfig's), since the token count is a property of the encoder, not the model.
    """
    config.require_resolved()
    d, p, tokens = config.hidden_size, config.patch_size, config.num_tokens
    hidden = _mlp_width(config)
    cond_tokens = 2 if config.conditional else 1
    patch_embed = tokens * config.embed_channels * p * p * d
    t_embed = 256 * d + d * d
    seq = tokens + cond_tokens if config.block_type == "in-context" else tokens
    per_block = (
        seq * d * 3 * d  # qkv
        + 2 * seq * seq * d  # q @ k^T and attn @ v
        + seq * d * d  # output projection
        + 2 * seq * d * hidden  # MLP
        + (tokens * hidden * 9 if config.mlp_type == "dwconv" else 0)  # depthwise 3x3 over the grid
    )
    text_embed = 0
    text_len = 0  # text tokens attended by every block
    if config.text_conditional:
        e = config.text_dim
        if config.text_mode in ("pooled", "both"):
            text_embed += e * d + d * d  # pooled projection MLP
        if config.text_mode in ("tokens", "both"):
            text_len = TextConfig().max_length if text_tokens is None else text_tokens
            if text_len < 1:
                raise ValueError(f"text_tokens must be >= 1, got {text_len}")
            text_embed += text_len * (e * d + d * d)  # token projection MLP
    if config.block_type in ("adaLN-Zero", "adaLN"):
        per_block += d * (6 if config.block_type == "adaLN-Zero" else 4) * d  # adaLN modulation
        if text_len:
            per_block += _cross_attention_macs(tokens, text_len, d)
    elif config.block_type == "cross-attn":
        per_block += _cross_attention_macs(tokens, cond_tokens + text_len, d)  # t (and y) beside the text
    final_modulation = d * 2 * d if config.block_type in ("adaLN-Zero", "adaLN") else 0
    final = final_modulation + tokens * d * p * p * config.out_channels
    return patch_embed + t_embed + text_embed + config.depth * per_block + final


def _cross_attention_macs(queries: int, keys: int, d: int) -> int:
    """MACs of one `CrossAttention` of `queries` image tokens over `keys` conditioning tokens, width d."""
    return (
        queries * d * d  # queries
        + keys * d * 2 * d  # keys and values
        + 2 * queries * keys * d  # scores and weighted sum
        + queries * d * d  # output projection
    )
