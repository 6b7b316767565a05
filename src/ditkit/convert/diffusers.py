"""Lossless weight exchange with diffusers' `DiTTransformer2DModel`.

diffusers stores the DiT under other names: separate q/k/v projections instead of one `qkv`, and a
copy of the timestep and class embedders inside every block's AdaLayerNormZero (all copies equal).
ditkit -> diffusers copies the shared embedders into every block; diffusers -> ditkit takes block 0's
and checks the others agree. diffusers is an optional dependency, imported only by `to_diffusers`.

One behavioural difference remains outside the weights: diffusers' DiT builds its sinusoidal
timestep features with `downscale_freq_shift=1` (frequency exponent divided by half - 1), while the
paper's model and ditkit divide by half. `to_diffusers(..., match_timestep_features=True)` (the
default) sets the shift to 0 on the returned model so both give the same outputs.

diffusers -> ditkit refuses what ditkit cannot hold: config options with no ditkit equivalent (LayerNorm
affine weights, gated or other activations) and any tensor the mapping does not use, so no weight is
ever dropped. `attention_bias=False` imports as zero q/k/v biases, the same function. Options that do
not change the eval-mode function of the weights are not carried: `dropout` (ditkit's DiT has none),
`upcast_attention` (a precision switch), `norm_num_groups` (unused by the DiT block) and `norm_eps` of
the MLP's LayerNorm: ditkit keeps the paper's 1e-6 where diffusers defaults to 1e-5, which moves outputs
by about 1e-5 of their scale, and refusing it would refuse diffusers' default configuration.

diffusers' config.json describes the network only. What else makes the checkpoint the same model (the
objective and noise process, the sampling defaults, the autoencoder and its latent scale) travels in a
side file, `ditkit_config.json` (`save_ditkit_config` / `load_ditkit_config`), so a round trip through
diffusers keeps a v-prediction or flow model what it was. A folder without it (a DiT from the hub) gets
diffusers' own DiT setting: eps prediction over the DDPM process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError, ModelConfig, config_from_dict, config_to_dict
from ..models import DiT

__all__ = [
    "DITKIT_CONFIG_FILE",
    "diffusers_config",
    "to_diffusers_state_dict",
    "from_diffusers_state_dict",
    "to_diffusers",
    "from_diffusers",
    "save_ditkit_config",
    "load_ditkit_config",
    "pipeline_mismatch",
]

DITKIT_CONFIG_FILE = "ditkit_config.json"
"""Written beside diffusers' config.json: the ditkit config sections a DiTTransformer2DModel cannot hold."""
_SIDE_SECTIONS = ("diffusion", "sample", "autoencoder", "data")
_SIDE_DATA_KEYS = ("image_size", "channels")
_PIPELINE_DIFFUSION = {
    "process": "vp",
    "prediction": "eps",
    "schedule": "linear",
    "num_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
}
"""The process diffusers' DiTPipeline samples as published (facebook/DiT-XL-2-*: DDPM-family schedulers)."""

_BLOCK_MAP = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_TOP_MAP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_ACTIVATIONS = {"gelu-approximate": "gelu_tanh", "gelu": "gelu"}
"""diffusers `activation_fn` -> ditkit `mlp_act`; both use `ff.net.0.proj` for the first MLP layer."""
_PIXEL_POS_EMBED = "pos_embed.pos_embed"
"""diffusers' fixed sin-cos table (rebuilt by both sides, so never copied)."""

_EMBED_MAP = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}


def diffusers_config(config: ModelConfig) -> dict[str, Any]:
    """`DiTTransformer2DModel` keyword arguments for a ditkit model config."""
    config.require_resolved()
    if config.input_hw[0] != config.input_hw[1]:
        raise ValueError(
            f"diffusers' DiTTransformer2DModel takes square inputs only; this model's is {config.input_size}"
        )
    if not config.conditional:
        raise ValueError("diffusers' DiTTransformer2DModel is class-conditional only; this model is unconditional")
    if config.class_dropout_prob == 0:
        raise ValueError("diffusers' DiT always has a null class: convert a model trained with class dropout")
    paper = {
        "block_type": "adaLN-Zero",
        "pos_embed": "sincos",
        "mlp_type": "linear",
        "qk_norm": False,
        "unpatchify": "linear",
        "inpaint": False,
    }
    other = {k: getattr(config, k) for k, v in paper.items() if getattr(config, k) != v}
    if config.mlp_ratio != 4:  # diffusers' BasicTransformerBlock builds its FeedForward with a fixed mult=4
        other["mlp_ratio"] = config.mlp_ratio
    if other:
        raise ValueError(
            f"diffusers' DiTTransformer2DModel has no equivalent of model options {other} "
            "(it has adaLN-Zero blocks, sin-cos positions, a linear MLP of 4x the width, no QK-norm, "
            "a linear output head and no inpainting input)"
        )
    activation = {v: k for k, v in _ACTIVATIONS.items()}[config.mlp_act]
    return {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "sample_size": config.input_hw[0],
        "patch_size": config.patch_size,
        "num_embeds_ada_norm": config.num_classes,
        "activation_fn": activation,
        "norm_eps": 1e-6,  # the paper's LayerNorms use 1e-6
    }


def to_diffusers_state_dict(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename a ditkit DiT state dict into diffusers' layout (pos_embed is rebuilt by diffusers)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        name, _, leaf = key.rpartition(".")
        if name in _TOP_MAP:
            out[f"{_TOP_MAP[name]}.{leaf}"] = value
        elif name in _EMBED_MAP:
            for i in range(depth):
                out[f"transformer_blocks.{i}.{_EMBED_MAP[name]}.{leaf}"] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            sub, _, leaf = rest.rpartition(".")
            prefix = f"transformer_blocks.{index}"
            if sub == "attn.qkv":
                q, k, v = value.chunk(3, dim=0)
                out[f"{prefix}.attn1.to_q.{leaf}"], out[f"{prefix}.attn1.to_k.{leaf}"] = q, k
                out[f"{prefix}.attn1.to_v.{leaf}"] = v
            elif sub in _BLOCK_MAP:
                out[f"{prefix}.{_BLOCK_MAP[sub]}.{leaf}"] = value
            else:
                raise KeyError(f"no diffusers name for ditkit parameter {key!r}")
        else:
            raise KeyError(f"no diffusers name for ditkit parameter {key!r}")
    return out


def from_diffusers_state_dict(
    state: dict[str, torch.Tensor], depth: int, *, attention_bias: bool = True
) -> dict[str, torch.Tensor]:
    """Rename a diffusers DiT state dict into ditkit's layout (without `pos_embed`, which is fixed).

    `attention_bias=False` (diffusers' option for q/k/v projections without biases) gives zero biases.
    Raises ValueError naming any tensor that is missing or that the mapping would leave unused.
    """
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"diffusers state dict has no {key!r} tensor (expected a {depth}-block DiT)")
        used.add(key)
        return state[key]

    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_MAP.items():
        for leaf in ("weight", "bias"):
            out[f"{ours}.{leaf}"] = take(f"{theirs}.{leaf}")
    for ours, theirs in _EMBED_MAP.items():
        for leaf in ("weight", "bias"):
            key = f"transformer_blocks.0.{theirs}.{leaf}"
            if key not in state:
                continue  # embedding tables have no bias
            for i in range(1, depth):
                if not torch.equal(take(f"transformer_blocks.{i}.{theirs}.{leaf}"), state[key]):
                    raise ValueError(f"diffusers block {i} has its own {theirs}; ditkit shares one embedder")
            out[f"{ours}.{leaf}"] = take(key)
    for i in range(depth):
        prefix = f"transformer_blocks.{i}"
        qkv = [take(f"{prefix}.attn1.to_{n}.weight") for n in "qkv"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(qkv)
        if attention_bias:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(f"{prefix}.attn1.to_{n}.bias") for n in "qkv"])
        else:  # no bias computes the same as a zero bias, which ditkit's fused qkv projection always has
            out[f"blocks.{i}.attn.qkv.bias"] = qkv[0].new_zeros(sum(w.shape[0] for w in qkv))
        for ours, theirs in _BLOCK_MAP.items():
            for leaf in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{leaf}"] = take(f"{prefix}.{theirs}.{leaf}")
    unused = sorted(set(state) - used - {_PIXEL_POS_EMBED})
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise ValueError(
            f"diffusers state dict has {len(unused)} tensor(s) ditkit's DiT has no place for: {shown}; "
            "converting would drop them"
        )
    return out


def to_diffusers(model: DiT, *, match_timestep_features: bool = True) -> Any:
    """A diffusers `DiTTransformer2DModel` holding the same weights as `model`."""
    from diffusers import DiTTransformer2DModel

    out = DiTTransformer2DModel(**diffusers_config(model.config))
    missing, unexpected = out.load_state_dict(
        to_diffusers_state_dict(model.state_dict(), model.config.depth), strict=False
    )
    missing = [k for k in missing if not k.endswith("pos_embed.pos_embed")]
    if missing or unexpected:
        raise ValueError(f"diffusers layout mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if match_timestep_features:
        for block in out.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
    dtype = next(model.parameters()).dtype
    return (out if dtype == torch.float32 else out.to(dtype)).eval()


def from_diffusers(diffusers_model: Any, num_classes: int | None = None) -> DiT:
    """A ditkit DiT holding the weights of a diffusers `DiTTransformer2DModel`.

    Raises ValueError naming the config options (and values) ditkit's DiT cannot represent, and any
    tensor the conversion would drop.
    """
    cfg = diffusers_model.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
    unsupported = {}
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        unsupported["out_channels"] = out_channels  # ditkit outputs in_channels, or twice with learn_sigma
    if cfg.norm_type != "ada_norm_zero":
        unsupported["norm_type"] = cfg.norm_type  # ditkit's equivalent is block_type adaLN-Zero only
    if cfg.activation_fn not in _ACTIVATIONS:
        unsupported["activation_fn"] = cfg.activation_fn
    if cfg.norm_elementwise_affine:
        unsupported["norm_elementwise_affine"] = True  # ditkit's block LayerNorms have no weight or bias
    if cfg.num_embeds_ada_norm is None:
        unsupported["num_embeds_ada_norm"] = None
    if unsupported:
        options = ", ".join(f"{k}={v!r}" for k, v in unsupported.items())
        raise ValueError(
            f"ditkit's DiT has no equivalent of diffusers DiTTransformer2DModel options {options} (it takes "
            f"out_channels = in_channels or twice it, norm_type='ada_norm_zero', activation_fn one of "
            f"{sorted(_ACTIVATIONS)}, norm_elementwise_affine=False and a class count)"
        )
    config = ModelConfig(
        input_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        patch_size=cfg.patch_size,
        hidden_size=hidden,
        depth=cfg.num_layers,
        num_heads=cfg.num_attention_heads,
        num_classes=num_classes or cfg.num_embeds_ada_norm,
        class_dropout_prob=0.1,
        learn_sigma=out_channels == 2 * cfg.in_channels,
        mlp_act=_ACTIVATIONS[cfg.activation_fn],
    )
    model = DiT(config)
    state = from_diffusers_state_dict(diffusers_model.state_dict(), config.depth, attention_bias=cfg.attention_bias)
    state["pos_embed"] = model.pos_embed.detach().clone()
    model.load_state_dict(state)
    return model.eval()


def save_ditkit_config(config: Config, folder: str | Path) -> Path:
    """Write what a diffusers DiT folder cannot hold of `config` into `folder`/ditkit_config.json.

    That is the objective and noise process (`diffusion`), the sampling defaults (`sample`), the autoencoder
    with its latent scale and shift (`autoencoder`; a local folder's path made absolute) and the image shape
    behind the latents (`data.image_size`, `data.channels`). `text` is not needed: diffusers' DiT takes class
    labels only, so `diffusers_config` refuses text-conditioned models before anything is written. Training
    settings stay with the checkpoint.
    """
    data = config_to_dict(config)
    side = {name: data[name] for name in ("diffusion", "sample", "autoencoder")}
    path = side["autoencoder"].get("path")
    if path and Path(path).expanduser().is_dir():  # a local folder, found again from any directory
        side["autoencoder"]["path"] = os.path.abspath(Path(path).expanduser())
    side["data"] = {key: data["data"][key] for key in _SIDE_DATA_KEYS}
    path = Path(folder) / DITKIT_CONFIG_FILE
    path.write_text(json.dumps(side, indent=2) + "\n")
    return path


def load_ditkit_config(folder: str | Path, model: ModelConfig) -> Config | None:
    """The config `save_ditkit_config` wrote into `folder`, around `model`; None without that file.

    Raises ConfigError naming the file and what in it is wrong (unreadable JSON, an unknown section or key,
    a value of the wrong type, an autoencoder or image shape that does not fit `model`).
    """
    path = Path(folder) / DITKIT_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        side = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not readable as JSON ({err})") from err
    if not isinstance(side, dict) or set(side) - set(_SIDE_SECTIONS):
        found = ", ".join(sorted(map(str, side))) if isinstance(side, dict) else f"a {type(side).__name__}"
        raise ConfigError(f"{path}: expected a mapping of the sections {', '.join(_SIDE_SECTIONS)}; found {found}")
    try:
        return config_from_dict({**side, "model": config_to_dict(model)})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def pipeline_mismatch(config: Config) -> dict[str, Any]:
    """The `diffusion.*` settings of `config` that diffusers' DiTPipeline, as published, does not sample.

    Its schedulers predict eps over the DDPM process of 1000 linear betas from 1e-4 to 0.02; a model
    trained otherwise (v or flow prediction, a cosine schedule, ...) comes out wrong from it, unnoticed.
    Empty when the pipeline matches.
    """
    return {
        f"diffusion.{key}": getattr(config.diffusion, key)
        for key, value in _PIPELINE_DIFFUSION.items()
        if getattr(config.diffusion, key) != value
    }
