"""The `ditkit` command: train, cache, sample, eval, bench, info, convert, demo, text-demo, serve, ..."""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import logging
import math
import sys
from pathlib import Path
from typing import get_args

import torch

from .bench import ALLOCATOR_MODES
from .checkpoint import CheckpointError
from .config import MODEL_PRESETS, ConfigError, ModelConfig, Spacing, load_config
from .data import DataError
from .evaluation.commands import (
    add_eval_commands,
    add_npz_sampling_options,
    check_guidance_channels,
    check_sampling_steps,
    cmd_sample_npz,
    refuse_npz_only_options,
)
from .samplers import SAMPLERS
from .utils.args import port_number, positive_int
from .utils.files import prepare_json_out

__all__ = ["main"]


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result.step == result.start_step and result.step >= config.train.steps:  # resumed at its end: no step ran
        print(
            f"the run had already finished at step {result.step} (train.steps={config.train.steps}); nothing "
            f"was trained; checkpoint: {result.checkpoint} (raise train.steps to train further)"
        )
    elif result.step > result.start_step and math.isfinite(result.final_loss):
        # Short of train.steps only when train.max_minutes stopped it: say so, and how to go on.
        done = (
            "finished"
            if result.step >= config.train.steps
            else f"stopped by train.max_minutes={config.train.max_minutes} (of train.steps={config.train.steps}; "
            "--resume the run folder to go on)"
        )
        print(f"{done} at step {result.step}, loss {result.final_loss:.4f}; checkpoint: {result.checkpoint}")
    else:  # train.max_minutes spent before a step of this call finished
        print(f"stopped at step {result.step} before a training step finished; checkpoint: {result.checkpoint}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .data.cache import build_cache
    from .train import resolve_device

    config = load_config(args.config, args.overrides)
    report = build_cache(
        config,
        args.out,
        dtype=args.dtype,
        shard_items=args.shard_items,
        shard_mb=args.shard_mb,
        batch_size=args.batch_size,
        device=resolve_device(args.device),
        progress=not args.no_progress,
    )
    m = report.manifest
    print(
        f"cache {report.path}: {report.num_items} images in {report.num_shards} shards "
        f"({report.shards_written} written now), latents {'x'.join(map(str, report.latent_shape))}, "
        f"{report.bytes_per_image / 1024:.1f} KiB per image ({args.dtype}, both flips, mean + logvar)"
    )
    print("storage error vs fp32: " + json.dumps(m["storage_error"]))
    print(f"latent mean per channel: {[round(v, 4) for v in m['latent_mean']]}")
    print(f"latent std per channel:  {[round(v, 4) for v in m['latent_std']]}")
    print(f"train from it with: data.cache={report.path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, run_bench, write_json

    json_out = prepare_json_out(args.json) if args.json else None  # before anything is timed
    from .distributed import resolve_device

    device = str(resolve_device(args.device))  # a missing or malformed device is refused before measuring
    settings = BenchSettings(
        preset=args.preset,
        input_size=args.input_size,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        batch=args.batch,
        precisions=tuple(args.precision),
        repeats=args.repeats,
        sample_steps=args.steps,
        what=tuple(args.what),
        gemm_size=args.gemm_size,
        device=device,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
        allocator=args.allocator,
    )
    results = run_bench(settings)
    if json_out is not None:
        print(f"wrote {write_json(results, json_out)}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import check_cuda_graph, generate
    from .train import load_model, resolve_device
    from .utils.images import save_grid

    # generate's own refusal, asked here in the flags' names before a model loads (grids and --npz alike).
    check_cuda_graph(args.cuda_graph, args.feature_cache, names=("--cuda-graph", "--feature-cache"))
    if args.npz or args.protocol:
        return cmd_sample_npz(args)
    refuse_npz_only_options(args)
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    _check_image_out(args.out, args.overwrite)  # before the model loads or anything samples
    device = resolve_device(args.device)
    model, config = load_model(args.checkpoint, args.weights, device)
    check_guidance_channels(args.guidance_channels, config)
    check_sampling_steps(args.steps, config)
    if args.vae is not None:
        if config.autoencoder.kind == "pixel":
            raise ValueError("--vae: this checkpoint is a pixel-space model; it has no autoencoder")
        config = dataclasses.replace(config, autoencoder=dataclasses.replace(config.autoencoder, path=args.vae))
    if config.model.text_conditional or args.prompt:
        return _sample_prompts(args, model, config)
    if config.model.conditional:
        classes = args.classes if args.classes else list(range(min(config.model.num_classes, 10)))
        labels: torch.Tensor | int = torch.tensor(classes).repeat_interleave(args.per_class)
        nrow = args.per_class if args.per_class > 1 else min(len(classes), 10)
    else:
        if args.classes:
            raise ValueError("this model is unconditional (model.num_classes=0): drop --classes")
        labels, nrow = args.per_class, min(args.per_class, 8)
    images = generate(model, config, labels, **_sampling_options(args))
    out = save_grid(images, args.out, nrow=nrow, scale=args.scale)
    print(f"wrote {len(images)} samples to {out}")
    return 0


def _check_image_out(out: str, overwrite: bool | None) -> None:
    """`--out` of sample/inpaint/outpaint: a new (or, with --overwrite, existing) file in a format PIL writes.

    `overwrite=None`: the command has no --overwrite option, so an existing file is refused without offering it.
    """
    from PIL import Image

    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give an image file name such as {path / 'samples.png'}")
    if path.exists() and not overwrite:
        offer = "" if overwrite is None else " or pass --overwrite"
        raise ValueError(f"--out {out} already exists; choose a new file{offer} (nothing was written)")
    # The missing folders are created when the image is written; a file in their place would fail only then.
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder; choose a path inside a folder")
    extensions = Image.registered_extensions()
    if path.suffix.lower() not in extensions:
        raise ValueError(
            f"--out {out}: {'no' if not path.suffix else 'unknown'} image file extension"
            f"{' ' + repr(path.suffix) if path.suffix else ''}; give one such as .png, .jpg or .webp"
        )
    if extensions[path.suffix.lower()] not in Image.SAVE:  # PIL reads the format but cannot write it
        raise ValueError(f"--out {out}: PIL cannot write {extensions[path.suffix.lower()]} files; use .png")


def _sampling_options(args: argparse.Namespace) -> dict[str, object]:
    """`generate` keyword arguments from `ditkit sample`'s flags (unset flags: the checkpoint's config)."""
    return dict(
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        eta=args.eta,
        seed=args.seed,
        sampler=args.sampler,
        spacing=args.spacing,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        clip_denoised=args.clip_denoised,
        progress=not args.no_progress,
        feature_cache_interval=args.feature_cache,
        cuda_graph=args.cuda_graph,
        guidance_channels=args.guidance_channels,
    )


def _sample_prompts(args: argparse.Namespace, model, config) -> int:
    """`ditkit sample --prompt ...`: one grid row of --per-class samples per prompt (text models)."""
    from .sampling import generate
    from .utils.images import save_grid

    if not config.model.text_conditional:
        raise ValueError("--prompt: this checkpoint is not text-conditioned (model.text_dim=0); use --classes")
    if not args.prompt:
        raise ValueError('this checkpoint is text-conditioned: give one or more --prompt "..."')
    if args.classes:
        raise ValueError("this checkpoint is text-conditioned: drop --classes, use --prompt")
    prompts = [p for p in args.prompt for _ in range(args.per_class)]
    images = generate(model, config, prompts=prompts, **_sampling_options(args))
    out = save_grid(images, args.out, nrow=args.per_class, scale=args.scale)
    print(f"wrote {len(images)} samples ({len(args.prompt)} prompt(s) x {args.per_class}) to {out}")
    return 0


def _describe(model_cfg: ModelConfig, text_tokens: int | None = None) -> dict[str, object]:
    from .models import DiT, count_macs

    with torch.device("meta"):  # no memory is allocated, so the largest presets are cheap to inspect
        model = DiT(model_cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "parameters": params,
        "parameters_millions": round(params / 1e6, 2),
        "tokens": model_cfg.num_tokens,
        "gmacs_per_forward": round(count_macs(model_cfg, text_tokens) / 1e9, 3),
        "input": [model_cfg.in_channels, *model_cfg.input_hw],
        "depth": model_cfg.depth,
        "hidden_size": model_cfg.hidden_size,
        "num_heads": model_cfg.num_heads,
        "patch_size": model_cfg.patch_size,
    }


_INFO_DEFAULTS = {"input_size": 32, "in_channels": 4, "num_classes": 1000}
"""`ditkit info PRESET`'s shape where no flag gives one: the paper's ImageNet 256 px (SD-VAE latents)."""


def _cmd_info(args: argparse.Namespace) -> int:
    preset_flags = {
        "--input-size": args.input_size,
        "--in-channels": args.in_channels,
        "--num-classes": args.num_classes,
        "--no-learn-sigma": args.no_learn_sigma or None,
    }
    if args.target in MODEL_PRESETS:
        fields = dict(
            MODEL_PRESETS[args.target],
            input_size=_INFO_DEFAULTS["input_size"] if args.input_size is None else args.input_size,
            in_channels=_INFO_DEFAULTS["in_channels"] if args.in_channels is None else args.in_channels,
            num_classes=_INFO_DEFAULTS["num_classes"] if args.num_classes is None else args.num_classes,
            learn_sigma=not args.no_learn_sigma,
        )
        model_cfg = ModelConfig(**fields)
        name = args.target
        text_tokens = None
    else:
        from .checkpoint import load_config_from_checkpoint, resolve_checkpoint

        if not Path(args.target).exists():  # neither a preset nor a path: say both
            raise ValueError(
                f"{args.target!r} is neither a model preset ({', '.join(MODEL_PRESETS)}) nor an existing "
                "checkpoint or run folder"
            )
        given = [flag for flag, value in preset_flags.items() if value is not None]
        if given:  # a checkpoint's shape is its own: these would be silently ignored
            raise ValueError(f"{', '.join(given)}: only for a preset; a checkpoint's config.json gives its shape")
        path = resolve_checkpoint(args.target)
        saved = load_config_from_checkpoint(path)
        model_cfg, text_tokens = saved.model, saved.text.max_length  # a text model's cross-attention length
        name = str(path)
    info = {"model": name, **_describe(model_cfg, text_tokens)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>20}: {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # refuses a folder of other files itself

    run_demo(args.out, smoke=args.smoke, progress=not args.no_progress)
    return 0


def _cmd_text_demo(args: argparse.Namespace) -> int:
    from .text_demo import run_text_demo  # refuses a folder of other files itself

    run_text_demo(args.out, smoke=args.smoke, progress=not args.no_progress)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.format == "official":  # ditkit convert official FILE.pt OUT_DIR
        if len(args.paths) + (args.out is not None) != 2 or (args.out is not None and len(args.paths) != 1):
            raise ValueError("usage: ditkit convert official FILE.pt OUT_DIR")
        source, out = args.paths[0], Path(args.out or args.paths[1])
    elif args.paths or args.out is None:
        flag = "--checkpoint" if args.format == "to-diffusers" else "--diffusers"
        raise ValueError(f"usage: ditkit convert {args.format} {flag} SRC --out DIR")
    else:
        out = Path(args.out)
    if out.exists() and not out.is_dir():
        option = "--out" if args.out is not None else "OUT_DIR"
        raise ValueError(f"{option} {out} is a file, not a folder; choose a new folder (nothing was written)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder (nothing was written)")
    if args.format == "official":
        return _from_official(source, out, args)
    if args.format == "to-diffusers":
        return _to_diffusers(args, out)
    return _from_diffusers(args, out)


def _from_official(source: str, out, args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .convert.official import from_official

    model, config = from_official(source, num_heads=args.num_heads, vae=args.vae, which=args.weights)
    save_checkpoint(out, config=config, model=model, ema=model)
    m = config.model
    pixel = config.autoencoder.kind == "pixel"
    space = "images, pixel space" if pixel else f"latents ({config.data.image_size} px)"
    print(
        f"wrote a ditkit checkpoint to {out}: {m.depth} blocks, width {m.hidden_size}, patch {m.patch_size}, "
        f"{m.input_hw[0]}x{m.input_hw[1]}x{m.in_channels} {space}, {m.num_classes} classes, "
        f"learned sigma {m.learn_sigma}" + ("" if pixel else f"; autoencoder {config.autoencoder.path}")
    )
    return 0


def _to_diffusers(args: argparse.Namespace, out) -> int:
    from .convert.diffusers import pipeline_mismatch, save_ditkit_config, to_diffusers
    from .train import load_model

    if not args.checkpoint:
        raise ValueError("to-diffusers needs --checkpoint")
    model, config = load_model(args.checkpoint, args.weights)
    try:
        converted = to_diffusers(model)
    except ImportError as err:
        raise ValueError("converting to diffusers needs diffusers: pip install 'ditkit[diffusers]'") from err
    converted.save_pretrained(out, safe_serialization=True)
    # diffusers' config.json holds the network only: the objective, sampling defaults and autoencoder go beside it.
    side = save_ditkit_config(config, out)
    print(
        f"wrote a diffusers DiTTransformer2DModel to {out}, with {side.name} beside it (the objective, sampling "
        "and autoencoder settings diffusers' config.json has no place for; `ditkit convert from-diffusers` "
        "restores them). Note: diffusers' DiT computes timestep features with downscale_freq_shift=1; set "
        "`block.norm1.emb.time_proj.downscale_freq_shift = 0` on every block after loading to reproduce "
        "ditkit's outputs exactly"
    )
    mismatch = pipeline_mismatch(config)
    if mismatch:
        settings = ", ".join(f"{key}={value!r}" for key, value in mismatch.items())
        print(
            f"ditkit convert: warning: this model was trained with {settings}; diffusers' DiTPipeline samples "
            "eps prediction over the DDPM process (process 'vp', 1000 linear betas from 1e-4 to 0.02), so it "
            "would sample this model wrongly. Sample it with ditkit (after `ditkit convert from-diffusers`), "
            "or give the pipeline a scheduler configured to match these settings",
            file=sys.stderr,
        )
    return 0


def _from_diffusers(args: argparse.Namespace, out) -> int:
    import os
    from pathlib import Path

    from .autoencoders import autoencoder_shape, folder_kind, resolve_autoencoder
    from .checkpoint import save_checkpoint
    from .config import AutoencoderConfig, Config, DataConfig
    from .convert.diffusers import DITKIT_CONFIG_FILE, from_diffusers, load_ditkit_config

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
    # A local --vae folder is recorded as an absolute path, so the checkpoint finds it from any directory.
    vae = os.path.abspath(args.vae) if args.vae is not None and Path(args.vae).is_dir() else args.vae
    vae_origin = "--vae"
    saved = load_ditkit_config(source, m)  # written by `ditkit convert to-diffusers`; None for other DiTs
    if saved is not None:
        config = saved
        if vae is not None:
            if saved.autoencoder.kind == "pixel":
                raise ValueError(
                    f"--vae {args.vae}: {source / DITKIT_CONFIG_FILE} records a pixel-space model, which has no "
                    "autoencoder; drop --vae"
                )
            kind = folder_kind(vae)
            if kind == saved.autoencoder.kind:  # the same kind elsewhere: the recorded scale and shift stay
                ae = dataclasses.replace(saved.autoencoder, path=vae, subfolder=None)
            else:  # another kind (TAESD for an SD-VAE model): its shape, scale and shift come from the folder
                ae = AutoencoderConfig(kind=kind, path=vae)
            config = resolve_autoencoder(dataclasses.replace(saved, autoencoder=ae))  # its shape must fit
        else:
            vae_origin = DITKIT_CONFIG_FILE
        settings = f"restored from {DITKIT_CONFIG_FILE}"
    else:
        # Only a whole DiTPipeline folder (transformer/ beside model_index.json) says that its vae/ is this
        # model's autoencoder; any other sibling vae/ folder may belong to something else.
        pipeline = source.name == "transformer" and (source.parent / "model_index.json").is_file()
        if vae is None and pipeline and (source.parent / "vae" / "config.json").is_file():
            vae, vae_origin = os.path.abspath(source.parent / "vae"), "the pipeline's vae/ folder"
        if vae is None:
            if m.in_channels not in (1, 3):
                raise ValueError(
                    f"{source}: a {m.in_channels}-channel model works in an autoencoder's latent space: pass "
                    "--vae FOLDER_OR_HUB_ID (e.g. stabilityai/sd-vae-ft-ema)"
                )
            config = Config(model=m, data=DataConfig(image_size=m.input_size, channels=m.in_channels))
        else:
            ae = AutoencoderConfig(kind=folder_kind(vae), path=vae)  # SD-VAE's AutoencoderKL, or TAESD
            image_channels, _, factor = autoencoder_shape(ae)  # the image side follows from the downsampling
            height, width = (side * factor for side in m.input_hw)
            data = DataConfig(image_size=height if height == width else (height, width), channels=image_channels)
            config = resolve_autoencoder(Config(model=m, data=data, autoencoder=ae))
        settings = f"no {DITKIT_CONFIG_FILE}, so diffusers' DiT defaults: eps prediction over the DDPM process"
    save_checkpoint(out, config=config, model=model, ema=model)
    ae = config.autoencoder
    recorded = "none (pixel space)" if ae.kind == "pixel" else f"{ae.path} ({ae.kind}, from {vae_origin})"
    if ae.kind != "pixel" and not Path(ae.path).expanduser().is_dir():
        recorded += " - not a folder here, so a hub id (fetched on use); if it is a folder elsewhere, pass --vae"
    print(
        f"wrote a ditkit checkpoint to {out} (model and EMA weights are the diffusers weights). Objective and "
        f"sampling settings: {settings} (diffusion.prediction={config.diffusion.prediction!r}, "
        f"diffusion.process={config.diffusion.process!r}). Autoencoder recorded: {recorded}. Note: ditkit "
        "uses the paper's timestep features; diffusers' DiT uses downscale_freq_shift=1, so outputs differ "
        "slightly from the diffusers model's unless it ran with the shift set to 0"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .studio import Limits, serve

    limits = Limits(max_steps=args.max_steps, max_batch=args.max_batch, max_queue=args.max_queue)
    serve(args.checkpoint, host=args.host, port=args.port, device=args.device, weights=args.weights, limits=limits)
    return 0


def _paint_setup(args: argparse.Namespace):
    """Model, config, the request ({'labels': ...} or, for a text model, {'prompts': [...]}) and the output
    path shared by `inpaint` and `outpaint`."""
    from pathlib import Path

    from .train import load_model, resolve_device

    out = Path(args.out)
    _check_image_out(args.out, overwrite=None)  # before any sampling: an existing file, a name PIL cannot write
    model, config = load_model(args.checkpoint, args.weights, resolve_device(args.device))
    check_sampling_steps(args.steps, config)  # named as --steps, as `ditkit sample` does
    if config.model.text_conditional:
        if args.classes:
            raise ValueError("this checkpoint is text-conditioned: drop --classes, use --prompt")
        if not args.prompt:
            raise ValueError('this checkpoint is text-conditioned: give one or more --prompt "..." (one result each)')
        return model, config, {"prompts": list(args.prompt)}, out
    if args.prompt:
        raise ValueError("--prompt: this checkpoint is not text-conditioned (model.text_dim=0); use --classes")
    if config.model.conditional:
        labels: list[int] | int = list(args.classes) if args.classes else [0]
    else:
        if args.classes:
            raise ValueError("this model is unconditional (model.num_classes=0): drop --classes")
        labels = args.num
    return model, config, {"labels": labels}, out


def _paint_options(args: argparse.Namespace) -> dict[str, object]:
    """inpaint/outpaint keyword arguments. RePaint's resampling count defaults to 5, except under
    `--method trained`, which takes none (inpaint refuses settings its method would ignore)."""
    resample = args.resample if args.resample is not None else (1 if args.method == "trained" else 5)
    return {
        "method": args.method,
        "steps": args.steps,
        "sampler": args.sampler,
        "cfg_scale": args.cfg_scale,
        "seed": args.seed,
        "resample": resample,
        "jump": 1 if args.jump is None else args.jump,
        "progress": not args.no_progress,
    }


def _save_results(images: torch.Tensor, out, nrow: int, scale: int) -> None:
    """One image as itself, several as a padded grid."""
    from PIL import Image

    from .utils.images import save_grid, to_uint8

    if len(images) > 1:
        save_grid(images, out, nrow=nrow, scale=scale)
        return
    arr = to_uint8(images)[0]
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def _cmd_inpaint(args: argparse.Namespace) -> int:
    from .inpainting import inpaint, load_image, load_mask

    model, config, request, out = _paint_setup(args)
    image = load_image(args.image, config)
    # The studio's checks too: the mask is the image's size and marks something to fill.
    known = load_mask(args.mask, config.model.input_hw, image=args.image)
    images = inpaint(model, config, image, known, **request, **_paint_options(args))
    _save_results(images, out, nrow=min(len(images), 8), scale=args.scale)
    print(f"wrote {len(images)} inpainted image(s) to {out}")
    return 0


def _cmd_outpaint(args: argparse.Namespace) -> int:
    from .inpainting import load_image, outpaint

    model, config, request, out = _paint_setup(args)
    image = load_image(args.image, config, resize=False)
    h, w = config.model.input_hw
    across = h if args.direction in ("left", "right") else w
    ih, iw = image.shape[2:]
    if (ih if args.direction in ("left", "right") else iw) != across:
        raise ValueError(
            f"--image {args.image} is {iw}x{ih} px; outpainting {args.direction} needs it {across} px "
            f"{'high' if args.direction in ('left', 'right') else 'wide'} (the model's input is {w}x{h})"
        )
    images = outpaint(
        model,
        config,
        image,
        **request,
        direction=args.direction,
        times=args.times,
        overlap=args.overlap,
        **_paint_options(args),
    )
    _save_results(images, out, nrow=1, scale=args.scale)
    print(f"wrote {len(images)} outpainted image(s) of {images.shape[3]}x{images.shape[2]} px to {out}")
    return 0


def _add_studio_parsers(sub) -> None:
    """`serve`, `inpaint` and `outpaint`."""
    p = sub.add_parser("serve", help="the studio: a local web page to sample, compare and inpaint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights to sample")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--max-steps", type=int, default=1000, help="largest steps a request may ask for")
    p.add_argument("--max-batch", type=int, default=64, help="most images per request")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait; more get HTTP 429")
    p.set_defaults(func=_cmd_serve)

    for name, helptext in (
        ("inpaint", "fill the white region of --mask in --image"),
        ("outpaint", "extend --image towards --direction"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder")
        p.add_argument("--image", required=True, help="PNG/JPEG input (pixel values; resized for inpaint)")
        if name == "inpaint":
            p.add_argument("--mask", required=True, help="PNG mask, white = generate here, black = keep")
        else:
            p.add_argument("--direction", choices=["left", "right", "up", "down"], default="right")
            p.add_argument("--times", type=int, default=1, help="inpainting rounds; each adds (1 - overlap) of a side")
            p.add_argument("--overlap", type=float, default=0.5, help="fraction of each window kept from the image")
        p.add_argument("--out", required=True, help="PNG file to write (refused if it exists)")
        p.add_argument("--classes", type=int, nargs="*", help="class labels, one result each (default: 0)")
        p.add_argument("--prompt", action="append", help="text-conditioned models: a prompt, one result each (repeat)")
        p.add_argument("--num", type=positive_int, default=1, help="results, for an unconditional model")
        p.add_argument(
            "--method", choices=["auto", "repaint", "trained"], default="auto", help="auto: trained if the model has it"
        )
        p.add_argument("--resample", type=int, help="RePaint resampling count (default 5; not with --method trained)")
        p.add_argument("--jump", type=int, help="RePaint jump length (default 1; not with --method trained)")
        p.add_argument("--steps", type=positive_int, help="sampling steps (default: the checkpoint's sample.steps)")
        p.add_argument("--sampler", choices=sorted(SAMPLERS), help="sampler of the 'trained' method")
        p.add_argument("--cfg-scale", type=float, help="guidance scale (default: the checkpoint's)")
        p.add_argument("--seed", type=int, default=0, help="seed of the noise")
        p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights to sample")
        p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
        p.add_argument("--scale", type=positive_int, default=1, help="integer upscaling of the written PNG")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=_cmd_inpaint if name == "inpaint" else _cmd_outpaint)


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

    p = sub.add_parser("cache", help="encode a dataset once into a sharded, resumable latent cache")
    p.add_argument("--config", help="YAML or JSON config: its data.* and autoencoder.* sections are used")
    p.add_argument("--out", required=True, help="cache folder (re-run the same command to resume it)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "uint8"], default="fp32", help="storage precision")
    p.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MiB (default 256)")
    p.add_argument("--shard-items", type=int, help="images per shard (overrides --shard-mb)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="encoder batch size")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=_cmd_cache)

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
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the checkpoint's sample.steps)")
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
    p.add_argument(
        "--feature-cache",
        type=positive_int,
        default=1,
        metavar="K",
        help="run the transformer blocks on every K-th step only, reusing their residuals between (faster, "
        "approximate; default 1: off)",
    )
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on a GPU, replay the network from CUDA graphs (default: the checkpoint's sample.cuda_graph)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        help="text-conditioned models: a prompt, one grid row of --per-class samples each (repeat the option)",
    )
    p.add_argument(
        "--vae", help="latent models: where the checkpoint's autoencoder is now (folder or hub id; default: as saved)"
    )
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--scale", type=positive_int, default=2, help="integer upscaling of the written grid")
    p.add_argument(
        "--out", default="samples.png", help="image file of the grid (.png, .jpg, ...; an existing file is refused)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_npz_sampling_options(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("bench", help="time ditkit's DiT against diffusers' at identical settings and weights")
    p.add_argument("--preset", default="DiT-S/2", choices=list(MODEL_PRESETS), help="model preset")
    p.add_argument("--input-size", type=int, default=32, help="input side (32 = 256 px SD-VAE latents)")
    p.add_argument("--in-channels", type=int, default=4, help="input channels")
    p.add_argument("--num-classes", type=int, default=1000, help="classes")
    p.add_argument("--batch", type=int, default=16, help="batch size")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    p.add_argument("--what", nargs="+", choices=["train", "sample"], default=["train", "sample"])
    p.add_argument("--steps", type=int, default=50, help="DDIM steps when timing sampling")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side (medians reported)")
    p.add_argument("--gemm-size", type=int, help="side of the reference GEMM (default: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument(
        "--json", help="write the results as JSON to this new file (an existing one is refused; folders are created)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both models (compile time not timed; CPU sampling compiles with freezing)",
    )
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: ditkit samples with CUDA graphs, as `ditkit sample` does by default (--no-cuda-graph: eager)",
    )
    p.add_argument(
        "--allocator",
        choices=ALLOCATOR_MODES,
        default="retain",
        help="retain: glibc's malloc keeps freed memory for the whole run, so neither side's time includes "
        "re-faulting pages handed back to the OS; system: leave the C allocator alone",
    )
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("info", help="parameters, tokens and GMACs of a preset or checkpoint")
    p.add_argument("target", help=f"a preset ({', '.join(MODEL_PRESETS)}) or a checkpoint folder")
    p.add_argument("--input-size", type=int, help="preset input size (default %d = 256 px SD-VAE latents)"
                   % _INFO_DEFAULTS["input_size"])  # fmt: skip
    p.add_argument("--in-channels", type=int, help="preset input channels (default %d)" % _INFO_DEFAULTS["in_channels"])
    p.add_argument("--num-classes", type=int, help="preset classes (default %d)" % _INFO_DEFAULTS["num_classes"])
    p.add_argument("--no-learn-sigma", action="store_true", help="preset without the learned variance")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="move weights between ditkit, diffusers and the official DiT release")
    p.add_argument("format", choices=["to-diffusers", "from-diffusers", "official"], help="direction")
    p.add_argument("paths", nargs="*", help="official: FILE.pt OUT_DIR")
    p.add_argument("--num-heads", type=int, help="official: heads, if the file is not a paper preset")
    p.add_argument(
        "--vae",
        help="latent models: the autoencoder folder or hub id to record (official default: stabilityai/sd-vae-ft-ema)",
    )
    p.add_argument("--checkpoint", help="to-diffusers: checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--diffusers", help="from-diffusers: a DiTTransformer2DModel folder (config.json + weights)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights to export")
    p.add_argument("--out", help="new folder to write (refused if it exists and is not empty)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="train a DiT on the bundled digits and judge its samples")
    p.add_argument(
        "--out",
        default="outputs/demo",
        help="output folder: new, empty or a previous demo's, which is resumed (default outputs/demo)",
    )
    p.add_argument("--smoke", action="store_true", help="a seconds-long version for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("text-demo", help="train a text-conditioned DiT on captioned digits, prompt it in new wordings")
    p.add_argument(
        "--out",
        default="outputs/text-demo",
        help="output folder: new, empty or a previous text demo's, which is resumed (default outputs/text-demo)",
    )
    p.add_argument("--smoke", action="store_true", help="a seconds-long version for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_text_demo)
    add_eval_commands(sub)
    _add_studio_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ditkit` console script."""
    args = build_parser().parse_args(argv)
    _report_native_crashes()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, ValueError) as err:
        print(f"ditkit {args.command}: error: {err}", file=sys.stderr)
        return 2


def _report_native_crashes() -> None:
    """Print every thread's Python stack if the process dies in native code (SIGSEGV, SIGABRT, ...).

    Long jobs (training, mass sampling, torchrun ranks) otherwise end with a bare "Segmentation fault"
    or "terminate called ..." and no hint of where. Left as it is when stderr is not a real file
    (an embedding host or a test's capture) or when something enabled it already.
    """
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError, RuntimeError):  # stderr without a usable file descriptor
        pass


if __name__ == "__main__":
    sys.exit(main())
