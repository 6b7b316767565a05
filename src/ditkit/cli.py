"""The `ditkit` command: train, sample, info, convert, demo, eval, ref-stats."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import get_args

import torch

from .checkpoint import CheckpointError
from .config import MODEL_PRESETS, ConfigError, ModelConfig, Spacing, load_config
from .data import DataError
from .evaluation.commands import add_eval_commands, add_npz_sampling_options, cmd_sample_npz
from .samplers import SAMPLERS

__all__ = ["main"]


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"finished at step {result.step}, loss {result.final_loss:.4f}; checkpoint: {result.checkpoint}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import generate
    from .train import load_model, resolve_device
    from .utils.images import save_grid

    if args.npz or args.protocol:
        return cmd_sample_npz(args)
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    device = resolve_device(args.device)
    model, config = load_model(args.checkpoint, args.weights, device)
    if config.model.conditional:
        classes = args.classes if args.classes else list(range(min(config.model.num_classes, 10)))
        labels: torch.Tensor | int = torch.tensor(classes).repeat_interleave(args.per_class)
        nrow = args.per_class if args.per_class > 1 else min(len(classes), 10)
    else:
        if args.classes:
            raise ValueError("this model is unconditional (model.num_classes=0): drop --classes")
        labels, nrow = args.per_class, min(args.per_class, 8)
    images = generate(
        model,
        config,
        labels,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        eta=args.eta,
        seed=args.seed,
        sampler=args.sampler,
        spacing=args.spacing,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        clip_denoised=args.clip_denoised,
        progress=not args.no_progress,
    )
    out = save_grid(images, args.out, nrow=nrow, scale=args.scale)
    print(f"wrote {len(images)} samples to {out}")
    return 0


def _describe(model_cfg: ModelConfig) -> dict[str, object]:
    from .models import DiT, count_macs

    with torch.device("meta"):  # no memory is allocated, so the largest presets are cheap to inspect
        model = DiT(model_cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "parameters": params,
        "parameters_millions": round(params / 1e6, 2),
        "tokens": model_cfg.num_tokens,
        "gmacs_per_forward": round(count_macs(model_cfg) / 1e9, 3),
        "input": [model_cfg.in_channels, *model_cfg.input_hw],
        "depth": model_cfg.depth,
        "hidden_size": model_cfg.hidden_size,
        "num_heads": model_cfg.num_heads,
        "patch_size": model_cfg.patch_size,
    }


def _cmd_info(args: argparse.Namespace) -> int:
    if args.target in MODEL_PRESETS:
        fields = dict(
            MODEL_PRESETS[args.target],
            input_size=args.input_size,
            in_channels=args.in_channels,
            num_classes=args.num_classes,
            learn_sigma=not args.no_learn_sigma,
        )
        model_cfg = ModelConfig(**fields)
        name = args.target
    else:
        from .checkpoint import load_config_from_checkpoint, resolve_checkpoint

        path = resolve_checkpoint(args.target)
        model_cfg = load_config_from_checkpoint(path).model
        name = str(path)
    info = {"model": name, **_describe(model_cfg)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>20}: {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, smoke=args.smoke, progress=not args.no_progress)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder (nothing was written)")
    if args.format == "to-diffusers":
        return _to_diffusers(args, out)
    return _from_diffusers(args, out)


def _to_diffusers(args: argparse.Namespace, out) -> int:
    from .convert.diffusers import to_diffusers
    from .train import load_model

    if not args.checkpoint:
        raise ValueError("to-diffusers needs --checkpoint")
    model, _ = load_model(args.checkpoint, args.weights)
    try:
        converted = to_diffusers(model)
    except ImportError as err:
        raise ValueError("converting to diffusers needs diffusers: pip install 'ditkit[diffusers]'") from err
    converted.save_pretrained(out, safe_serialization=True)
    print(
        f"wrote a diffusers DiTTransformer2DModel to {out}. Note: diffusers' DiT computes timestep features "
        "with downscale_freq_shift=1; set `block.norm1.emb.time_proj.downscale_freq_shift = 0` on every "
        "block after loading to reproduce ditkit's outputs exactly"
    )
    return 0


def _from_diffusers(args: argparse.Namespace, out) -> int:
    from pathlib import Path

    from .checkpoint import save_checkpoint
    from .config import Config, DataConfig
    from .convert.diffusers import from_diffusers

    source = Path(args.diffusers or "")
    if not (source / "config.json").is_file():
        raise ValueError(f"--diffusers {source}: not a diffusers model folder (no config.json)")
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as err:
        raise ValueError("converting from diffusers needs diffusers: pip install 'ditkit[diffusers]'") from err
    try:
        model = from_diffusers(DiTTransformer2DModel.from_pretrained(source))
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise ValueError(f"--diffusers {source}: could not read a DiTTransformer2DModel ({err})") from err
    m = model.config
    if m.in_channels not in (1, 3):
        raise ValueError(
            f"{source}: a {m.in_channels}-channel (latent) model needs an autoencoder config, which ditkit "
            "checkpoints cannot describe yet; pixel models (1 or 3 channels) convert"
        )
    config = Config(model=m, data=DataConfig(image_size=m.input_hw[0], channels=m.in_channels))
    save_checkpoint(out, config=config, model=model, ema=model)
    print(
        f"wrote a ditkit checkpoint to {out} (model and EMA weights are the diffusers weights). Note: ditkit "
        "uses the paper's timestep features; diffusers' DiT uses downscale_freq_shift=1, so outputs differ "
        "slightly from the diffusers model's unless it ran with the shift set to 0"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditkit", description="Train, sample and inspect Diffusion Transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a DiT from a config file")
    p.add_argument("--config", help="YAML or JSON config file (defaults apply to missing keys)")
    p.add_argument("--resume", help="checkpoint or run folder to continue from")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=500")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="sample a grid of images from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--classes", type=int, nargs="*", help="class labels, one grid row each (default: 0..9)")
    p.add_argument(
        "--per-class",
        type=int,
        default=8,
        help="samples per class; for an unconditional model, the number of samples (default 8)",
    )
    p.add_argument("--cfg-scale", type=float, help="guidance scale (default: the checkpoint's sample.cfg_scale)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's sample.steps)")
    p.add_argument(
        "--sampler", choices=sorted(SAMPLERS), help="sampling algorithm (default: the checkpoint's sample.sampler)"
    )
    p.add_argument("--eta", type=float, help="DDIM eta (default: the checkpoint's sample.eta)")
    p.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="guide only for LO <= t <= HI (default: the checkpoint's sample.guidance_interval)",
    )
    p.add_argument(
        "--spacing", choices=list(get_args(Spacing)), help="time grid (default: the checkpoint's sample.spacing)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument(
        "--clip-denoised",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clamp x0 estimates to [-1, 1] while sampling (default: the checkpoint's sample.clip_denoised)",
    )
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights to sample")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--scale", type=int, default=2, help="integer upscaling of the written grid")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_npz_sampling_options(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("info", help="parameters, tokens and GMACs of a preset or checkpoint")
    p.add_argument("target", help=f"a preset ({', '.join(MODEL_PRESETS)}) or a checkpoint folder")
    p.add_argument("--input-size", type=int, default=32, help="preset input size (32 = 256 px SD-VAE latents)")
    p.add_argument("--in-channels", type=int, default=4, help="preset input channels")
    p.add_argument("--num-classes", type=int, default=1000, help="preset classes")
    p.add_argument("--no-learn-sigma", action="store_true", help="preset without the learned variance")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="move weights between ditkit and diffusers")
    p.add_argument("format", choices=["to-diffusers", "from-diffusers"], help="direction")
    p.add_argument("--checkpoint", help="to-diffusers: checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--diffusers", help="from-diffusers: a DiTTransformer2DModel folder (config.json + weights)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights to export")
    p.add_argument("--out", required=True, help="new folder to write (refused if it exists and is not empty)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="train a DiT on the bundled digits and judge its samples")
    p.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long version for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    add_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ditkit` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, ValueError) as err:
        print(f"ditkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
