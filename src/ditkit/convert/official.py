"""Checkpoints of the official DiT release (Peebles & Xie 2023) <-> ditkit.

The published files (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`) are plain state dicts of the
paper's model: class-conditional (1000 classes plus the null class of classifier-free guidance),
learned sigma, fixed sin-cos positions, in SD-VAE latent space (8x downsampling, 4 channels). ditkit's
DiT uses the same parameter names and shapes, so conversion is reading the tensors, inferring the
architecture from their shapes, and writing a self-describing ditkit checkpoint whose config also
names the autoencoder and the diffusion settings the release was trained with. Training checkpoints
of the official code (a dict with "model", "ema", "opt", "args") load too; "ema" is used.

Only `torch.load(..., weights_only=True)` is used; the argparse Namespace those training checkpoints
pickle is allow-listed for that call (it holds plain values), nothing else is.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from ..config import (
    MODEL_PRESETS,
    AutoencoderConfig,
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
)
from ..models import DiT
from ..utils.safe_load import load_failure_reason, load_weights_only

__all__ = [
    "OfficialFormatError",
    "load_official_state_dict",
    "official_model_config",
    "official_config",
    "from_official",
    "to_official_state_dict",
    "SD_VAE_DOWNSAMPLE",
]

SD_VAE_DOWNSAMPLE = 8
"""The published models work on Stable Diffusion VAE latents: 4 channels at 1/8 of the image side."""
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
"""The VAE the release's sampling script uses by default (its 'ema' choice)."""


class OfficialFormatError(ConfigError):
    """A file is not an official-format DiT state dict; the message names the file and the problem."""


def load_official_state_dict(path: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """Tensors of an official DiT .pt file: a plain state dict (the released files, one set of weights, which
    is taken whatever `which` says), or a training checkpoint's `which` ('ema' or 'model') entry."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    path = Path(path)
    if not path.is_file():
        raise OfficialFormatError(f"{path} does not exist")
    try:
        obj = load_weights_only(path, allowed=(argparse.Namespace,))
    except Exception as err:  # whatever the unpickler raised (KeyError for a text file), it is not one to read
        raise OfficialFormatError(
            f"{path}: not a PyTorch file of plain tensors ({load_failure_reason(err)}); ditkit reads .pt files "
            "with torch.load(weights_only=True) only, so it never runs code pickled in them"
        ) from err
    if isinstance(obj, dict) and any(isinstance(obj.get(key), dict) for key in ("ema", "model")):
        # A training checkpoint of the official code: {'model', 'ema', 'opt', 'args'}.
        if not isinstance(obj.get(which), dict):
            held = " and ".join(repr(k) for k in ("ema", "model") if isinstance(obj.get(k), dict))
            raise OfficialFormatError(f"{path}: a training checkpoint without {which!r} weights (it holds {held})")
        obj = obj[which]
    if isinstance(obj, dict):
        # A model saved while wrapped in DistributedDataParallel names every tensor 'module.<name>';
        # strip that before looking for the DiT's tensors, or such files are refused as not-a-DiT.
        obj = {k.removeprefix("module.") if isinstance(k, str) else k: v for k, v in obj.items()}
    if not isinstance(obj, dict) or "x_embedder.proj.weight" not in obj:
        raise OfficialFormatError(f"{path}: not a DiT state dict (no 'x_embedder.proj.weight' tensor)")
    return obj


def official_model_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> ModelConfig:
    """The ModelConfig whose DiT has exactly these tensors (heads from the paper's presets if not given)."""
    required = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise OfficialFormatError(f"not a complete DiT state dict: no {', '.join(map(repr, missing))} tensor")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise OfficialFormatError(f"pos_embed has {tokens} tokens, not a square grid")
    out = state["final_layer.linear.weight"].shape[0]
    learn_sigma = out == patch * patch * in_channels * 2
    if num_heads is None:
        matches = [p["num_heads"] for p in MODEL_PRESETS.values() if (p["depth"], p["hidden_size"]) == (depth, hidden)]
        if not matches:
            raise OfficialFormatError(
                f"depth {depth} / width {hidden} is not a paper preset, so the head count cannot be inferred: "
                "pass num_heads"
            )
        num_heads = matches[0]
    table = state.get("y_embedder.embedding_table.weight")
    return ModelConfig(
        input_size=grid * patch,
        in_channels=in_channels,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=0 if table is None else table.shape[0] - 1,  # the last row is the null class
        learn_sigma=learn_sigma,
    )


def official_config(model: ModelConfig, vae: str | None = None) -> Config:
    """A full ditkit Config for a model in the official layout: linear-beta eps diffusion, DDPM sampling,
    and the space its channels say. 4 channels (the released models): SD-VAE latents (`vae`, by default
    the ft-EMA SD-VAE the release used). 1 or 3 channels without a `vae`: pixel space (a model trained on
    images, exported to the official layout). Any other count works in some autoencoder's latent space,
    which the tensors cannot name: OfficialFormatError unless `vae` is given."""
    diffusion = DiffusionConfig(schedule="linear", num_timesteps=1000, prediction="eps")
    sample = SampleConfig(sampler="ddpm", steps=250, cfg_scale=4.0)
    if vae is None and model.in_channels in (1, 3):
        side = model.input_hw[0]
        data = DataConfig(dataset="folder", root="images/train", image_size=side, channels=model.in_channels)
        return Config(model=model, diffusion=diffusion, data=data, sample=sample)
    if vae is None and model.in_channels != 4:
        raise OfficialFormatError(
            f"a {model.in_channels}-channel model works in an autoencoder's latent space that its tensors do not "
            "name: pass the autoencoder (--vae FOLDER_OR_HUB_ID); 4-channel models default to the SD-VAE"
        )
    side = model.input_hw[0] * SD_VAE_DOWNSAMPLE
    return Config(
        model=model,
        diffusion=diffusion,
        data=DataConfig(dataset="folder", root="imagenet/train", image_size=side, channels=3, hflip=True),
        autoencoder=AutoencoderConfig(
            kind="kl",
            path=vae or DEFAULT_VAE,
            scale=0.18215,
            shift=0.0,
            latent_channels=model.in_channels,
            downsample=SD_VAE_DOWNSAMPLE,
        ),  # fmt: skip
        sample=sample,
    )


def from_official(
    path: str | Path, *, num_heads: int | None = None, vae: str | None = None, which: str = "ema"
) -> tuple[DiT, Config]:
    """A ditkit DiT (eval mode) and its Config from an official DiT .pt file (`official_config` says which
    space it works in; `vae` names its autoencoder; `which`: a training checkpoint's 'ema' or 'model')."""
    state = load_official_state_dict(path, which)
    try:
        model_config = official_model_config(state, num_heads)
        config = official_config(model_config, vae)
    except ConfigError as err:  # these see tensors only; say which file they came from
        raise OfficialFormatError(f"{path}: {err}") from err
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise OfficialFormatError(
            f"{path}: not a plain state dict: {', '.join(map(repr, not_tensors[:5]))} "
            f"{'is not a tensor' if len(not_tensors) == 1 else 'are not tensors'}"
        )
    with torch.device("meta"):
        model = DiT(config.model)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    except RuntimeError as err:
        raise OfficialFormatError(f"{path}: tensors do not fit the inferred {config.model}: {err}") from err
    return model.eval(), config


def to_official_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    """The official layout of a ditkit DiT (same names), for the paper-style adaLN-Zero sin-cos model only.

    The layout is bare tensors, and `official_model_config` reads the architecture back from their shapes.
    Models whose settings those shapes cannot carry are refused here rather than exported into a file
    that re-imports as a different model.
    """
    c = model.config
    paper = ("adaLN-Zero", "sincos", "linear", "gelu_tanh", False, "linear")
    if (c.block_type, c.pos_embed, c.mlp_type, c.mlp_act, c.qk_norm, c.unpatchify) != paper:
        raise ConfigError(
            "only the paper's architecture (adaLN-Zero blocks, sin-cos positions, linear tanh-GELU MLP, "
            "no QK-norm, linear output head) has an official layout"
        )
    refused = []
    if c.conditional and c.class_dropout_prob == 0:
        # The label table has a null-class row only when classes are dropped; re-import always reads
        # its last row as the null class, so num_classes would come back one short.
        refused.append(
            f"class_dropout_prob=0.0 (the official layout's label table always ends in a null-class row, "
            f"which this {c.num_classes}-class model, trained without class dropout, does not have)"
        )
    if c.input_hw[0] != c.input_hw[1]:
        # Only the token count is stored (pos_embed); re-import takes its square root as the grid side.
        refused.append(f"input_size={c.input_size} (the official layout stores square inputs only)")
    if c.inpaint:
        refused.append("inpaint=True (the official layout has no mask and masked-image input channels)")
    if c.text_conditional:
        refused.append(f"text_dim={c.text_dim} (the official layout is class-conditional, with no text inputs)")
    preset_heads = {
        p["num_heads"] for p in MODEL_PRESETS.values() if (p["depth"], p["hidden_size"]) == (c.depth, c.hidden_size)
    }
    if preset_heads and c.num_heads not in preset_heads:
        # No tensor shape carries the head count: re-import takes the paper preset's for this depth and width.
        refused.append(
            f"num_heads={c.num_heads} (the layout does not store the head count, and a depth-{c.depth}, "
            f"width-{c.hidden_size} file re-imports with the paper preset's {min(preset_heads)} heads)"
        )
    if refused:
        raise ConfigError(f"this model has no official DiT layout: model.{'; model.'.join(refused)}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
