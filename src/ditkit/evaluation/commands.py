"""Command-line pieces of evaluation: `ditkit sample --npz`, `ditkit eval` and `ditkit ref-stats`.

`ditkit.cli` registers these; they live here so the shared CLI module only gains a few lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from ..config import Config
from ..utils.args import positive_int
from ..utils.files import prepare_json_out
from .inception import InceptionWeightsError
from .protocols import PROTOCOLS, Protocol, get_protocol

__all__ = [
    "add_npz_sampling_options",
    "refuse_npz_only_options",
    "check_guidance_channels",
    "check_sampling_steps",
    "cmd_sample_npz",
    "add_eval_commands",
]


def add_npz_sampling_options(p: argparse.ArgumentParser) -> None:
    """Options of `ditkit sample` that switch it to mass sampling into an ADM-format .npz."""
    g = p.add_argument_group("mass sampling to .npz (ADM format; torchrun splits the work across ranks)")
    g.add_argument("--npz", help="write samples to this .npz (arr_0 uint8 NHWC, arr_1 labels) instead of a grid")
    g.add_argument(
        "--num-samples",
        "--num",
        dest="num",
        type=int,
        help="number of samples for --npz (default: the protocol's); under torchrun spell it --num-samples, "
        "since torchrun's own parser takes --num for its --numa-binding",
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        help="samples per batch and per resumable part (default 64)",
    )
    g.add_argument(
        "--balanced-classes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="labels i %% num_classes (default: the protocol's, else seeded uniform labels)",
    )
    g.add_argument(
        "--guidance-channels",
        type=positive_int,
        metavar="N",
        help="guide only the first N channels (3: the DiT release; also for grids without --npz)",
    )
    g.add_argument("--protocol", choices=sorted(PROTOCOLS), help="a paper's settings; explicit flags win")


NPZ_ONLY_OPTIONS = {"num": "--num-samples", "batch_size": "--batch-size", "balanced_classes": "--balanced-classes"}
"""Options of `ditkit sample` that mean something only with --npz (dest -> flag)."""


def refuse_npz_only_options(args: argparse.Namespace) -> None:
    """A grid (no --npz) refuses the mass-sampling options instead of ignoring them."""
    given = [flag for dest, flag in NPZ_ONLY_OPTIONS.items() if getattr(args, dest, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only for mass sampling with --npz OUT.npz (this command writes a grid)")


def check_guidance_channels(channels: int | None, config: Config) -> None:
    """`--guidance-channels N` must name some of the model's input channels."""
    if channels is not None and channels > config.model.in_channels:
        raise ValueError(
            f"--guidance-channels {channels}: this model has {config.model.in_channels} input channel(s); "
            f"give 1 to {config.model.in_channels}"
        )


def _pick(explicit: object, protocol: Protocol | None, field: str, default: object = None) -> object:
    if explicit is not None:
        return explicit
    return getattr(protocol, field) if protocol is not None else default


def _apply_autoencoder(config: Config, protocol: Protocol | None, vae: str | None) -> Config:
    """The checkpoint's config with `--vae` applied; refuses a protocol whose VAE it does not use."""
    ae = config.autoencoder
    if vae is not None:
        if ae.kind == "pixel":
            raise ValueError("--vae: this checkpoint is a pixel-space model; it has no autoencoder")
        config = dataclasses.replace(config, autoencoder=dataclasses.replace(ae, path=vae))
    if protocol is None or protocol.autoencoder is None:
        return config
    if ae.kind == "pixel":
        raise ValueError(
            f"protocol {protocol.name} is for latent models decoded by {protocol.autoencoder}; "
            "this checkpoint is a pixel-space model"
        )
    if ae.path != protocol.autoencoder and vae is None:
        raise ValueError(
            f"protocol {protocol.name} decodes with {protocol.autoencoder}, but this checkpoint names "
            f"autoencoder.path={ae.path!r}; if that is a copy of the same VAE, pass --vae {ae.path}"
        )
    return config


def cmd_sample_npz(args: argparse.Namespace) -> int:
    """`ditkit sample --npz OUT`: mass sampling, one process or one per torchrun rank (`ditkit.cli` has refused
    --cuda-graph with --feature-cache already, as for grids)."""
    from ..checkpoint import resolve_checkpoint
    from ..train import load_model, resolve_device
    from .mass_sampling import MassSamplingJob, run_mass_sampling

    protocol = get_protocol(args.protocol) if args.protocol else None
    if not args.npz:
        raise ValueError("--protocol needs --npz OUT.npz (protocols describe mass sampling for metrics)")
    if args.classes:
        raise ValueError("--classes picks grid rows; with --npz use --balanced-classes (or seeded uniform labels)")
    if args.prompt:
        raise ValueError("--prompt: mass sampling with --npz is for class-conditional and unconditional models")
    num = _pick(args.num, protocol, "num_samples")
    if num is None:
        raise ValueError("--npz needs --num N (or a --protocol)")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = resolve_device(args.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    model, config = load_model(args.checkpoint, args.weights, device)
    config = _apply_autoencoder(config, protocol, getattr(args, "vae", None))
    # Checked before the parts folder and its manifest are written.
    if config.model.text_conditional:
        raise ValueError(
            "--npz: this checkpoint is text-conditioned; mass sampling to .npz takes class-conditional or "
            'unconditional models (sample a text model as a grid with --prompt "...")'
        )
    check_guidance_channels(args.guidance_channels, config)
    sampling = {
        "steps": _pick(args.steps, protocol, "steps"),
        "cfg_scale": _pick(args.cfg_scale, protocol if config.model.conditional else None, "cfg_scale"),
        "sampler": _pick(args.sampler, protocol, "sampler"),
        "eta": args.eta,
        "spacing": args.spacing if args.spacing is not None else ("linear" if protocol else None),
        "guidance_interval": tuple(args.guidance_interval) if args.guidance_interval else None,
        "clip_denoised": _pick(args.clip_denoised, protocol, "clip_denoised"),
        "guidance_channels": _pick(args.guidance_channels, protocol, "guidance_channels"),
        # 1 (off) is left out, so the settings of runs from before the option still match on resume.
        "feature_cache_interval": args.feature_cache if args.feature_cache != 1 else None,
    }
    check_sampling_steps(sampling["steps"], config)
    job = MassSamplingJob(
        num=int(num),
        seed=args.seed,
        part_size=args.batch_size or 64,
        balanced_classes=bool(_pick(args.balanced_classes, protocol, "balanced_classes", False)),
        sampling={k: v for k, v in sampling.items() if v is not None},
        source=f"{resolve_checkpoint(args.checkpoint).resolve()}:{args.weights}",  # a run folder's newest, pinned
    )
    barrier = lambda: None  # noqa: E731
    if world > 1:
        import torch.distributed as dist

        # Ranks wait at the final barrier while slower ranks finish their parts: allow a long wait.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=24))
        barrier = dist.barrier
    try:
        out = run_mass_sampling(
            model,
            config,
            args.npz,
            job,
            rank=rank,
            world_size=world,
            barrier=barrier,
            cuda_graph=args.cuda_graph,
            progress=not args.no_progress,
        )
    finally:
        if world > 1:
            dist.destroy_process_group()
    if out is not None:
        print(f"wrote {job.num} samples to {out}")
    return 0


def check_sampling_steps(steps: object, config: Config) -> None:
    """`--steps` (when given) against the rule of the checkpoint's noise process (`NoiseProcess.check_num_steps`),
    before anything samples."""
    from ..diffusion import build_process

    if steps is not None:
        build_process(config.diffusion).check_num_steps(int(steps), name="--steps")


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register `ditkit eval` and `ditkit ref-stats`."""
    p = sub.add_parser("eval", help="FID, sFID, IS, precision/recall of a sample .npz against a reference")
    p.add_argument("--samples", required=True, help="ADM-format .npz of samples (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument(
        "--ref",
        required=True,
        help="reference: image folder, ADM reference .npz, ref-stats .npz, or 'mnist' (the bundled digits)",
    )
    _feature_options(p)
    p.add_argument(
        "--json", help="also write the metrics to this new JSON file (an existing one is refused; folders are created)"
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("ref-stats", help="save reference statistics (mu/sigma + features) of an image folder or .npz")
    p.add_argument("source", help="image folder or ADM-format .npz (arr_0)")
    p.add_argument("--out", required=True, help="new .npz to write")
    _feature_options(p)
    p.set_defaults(func=_cmd_ref_stats)


def _feature_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--features",
        choices=["inception", "classifier"],
        default="inception",
        help="feature network: the FID Inception-v3 (needs its weights file) or the offline digit classifier",
    )
    p.add_argument("--inception-weights", help="path of pt_inception-2015-12-05-6726825d.pth (or .safetensors)")
    p.add_argument("--classifier", help="digit classifier folder (default: train once on the bundled digits, cached)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images per feature batch")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _image_size(path: str) -> int:
    """Height of the images of a source (latent cache, image folder or .npz), to pick the digit judge."""
    from ..data import DataError
    from .features import cache_image_size, is_latent_cache, iter_folder_images, npz_array_info

    if is_latent_cache(path):
        return cache_image_size(path)
    if Path(path).is_dir():
        return next(iter_folder_images(path, 1, 1)).shape[1]  # (1, H, W, 1)
    shape, _ = npz_array_info(path, "arr_0")
    if len(shape) != 4:
        raise DataError(f"{path}: arr_0 must be images (N, H, W, C), got shape {shape}")
    return shape[1]


def _net(args: argparse.Namespace, size_from: str | int):
    """The feature network of `args`; `size_from` is the source whose image height picks the cached digit
    judge, or that height when the caller has read it already."""
    from ..train import resolve_device
    from .evaluate import build_feature_net

    # The image size picks (or trains) the cached judge; a judge folder given with --classifier needs none.
    size = 28
    if args.features == "classifier" and not args.classifier:
        size = size_from if isinstance(size_from, int) else _image_size(size_from)
    try:
        return build_feature_net(
            args.features,
            inception_weights=args.inception_weights,
            classifier=args.classifier,
            image_size=size,
            device=resolve_device(args.device),
            progress=not args.no_progress,
        )
    except InceptionWeightsError as err:
        raise ValueError(str(err)) from err


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..data import DataError
    from .evaluate import check_sample_count, evaluate_npz
    from .features import NpzReader

    if args.json:
        prepare_json_out(args.json)
    with NpzReader(args.samples) as samples:  # opened once, for the checks and the scoring
        # Refuse a bad, empty or one-image sample file before loading or training a network.
        first = samples.iter_images(1)
        if next(first, None) is None:
            raise DataError(f"{args.samples}: arr_0 holds no sample images (0 images)")
        first.close()
        shape = check_sample_count(samples)
        net = _net(args, shape[1])
        result = evaluate_npz(
            samples, args.ref, net, batch_size=args.batch_size, progress=not args.no_progress, json_out=args.json
        )
    print(json.dumps(result, indent=2))
    return 0


def _cmd_ref_stats(args: argparse.Namespace) -> int:
    from .features import reference_from_source, save_reference

    if Path(args.out).exists():
        raise ValueError(f"{args.out} exists; choose a new file (nothing was written)")
    ref = reference_from_source(args.source, _net(args, args.source), args.batch_size, not args.no_progress)
    save_reference(ref, args.out)
    print(f"wrote {args.features} reference statistics of {len(ref.get('pool', []))} images to {args.out}")
    return 0
