"""Training step time of a latent DiT: encoding images on the fly vs reading the latent cache.

DiT-S/2 on 4x32x32 latents of 256 px images, with a random-weight AutoencoderKL built from Stable
Diffusion's published VAE configuration (no download). Both paths run in one process, interleaved,
and report medians; the cache's bytes per image are measured from the files it wrote at each precision.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/latent_cache.py --batch-size 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditkit.autoencoders import build_autoencoder
from ditkit.config import AutoencoderConfig, Config, DataConfig, ModelConfig, TrainConfig
from ditkit.data import build_dataset
from ditkit.data.cache import CacheDataset, build_cache
from ditkit.data.sources import CachedBatches, ImageBatches
from ditkit.diffusion import build_process, diffusion_loss
from ditkit.models import DiT

# Stable Diffusion's VAE (sd-vae-ft-ema / ft-mse share it): 4 down blocks, 8x downsampling, 4 channels.
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per path (after one warm-up each)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    from diffusers import AutoencoderKL

    work = Path(tempfile.mkdtemp(prefix="ditkit-bench-"))
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(work / "sd-vae-random")
    rng = np.random.default_rng(0)
    n_images = 2 * args.batch_size
    for k in range(n_images):
        (work / "images" / "a").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(work / "images" / "a" / f"{k:03d}.png")
    config = Config(
        model=ModelConfig(patch_size=2, hidden_size=384, depth=12, num_heads=6, num_classes=1000),
        data=DataConfig(
            dataset="folder", root=str(work / "images"), image_size=args.image_size, channels=3, hflip=True
        ),
        autoencoder=AutoencoderConfig(kind="kl", path=str(work / "sd-vae-random"), latent_channels=4, downsample=8),
        train=TrainConfig(batch_size=args.batch_size, device="cpu"),
    )
    ae = build_autoencoder(config)
    bytes_per_image, build_rate = {}, {}
    for dtype in ("fp32", "fp16", "uint8"):
        t0 = time.perf_counter()
        report = build_cache(config, work / f"cache-{dtype}", dtype=dtype, autoencoder=ae, progress=False)
        build_rate[dtype] = report.num_items / (time.perf_counter() - t0)
        files = sum(p.stat().st_size for p in (work / f"cache-{dtype}").glob("shard_*"))
        bytes_per_image[dtype] = {"formula": report.bytes_per_image, "files": files / report.num_items}
        bytes_per_image[dtype]["storage_error"] = report.manifest["storage_error"]
    images = build_dataset(config.data)
    cache = CacheDataset(work / "cache-fp32")
    model = DiT(config.model)
    process = build_process(config.diffusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    generator = torch.Generator().manual_seed(0)
    sources = {
        "encode on the fly": (ImageBatches(ae), lambda idx: _stack([images[i] for i in idx])),
        "latent cache": (CachedBatches(ae), cache.__getitems__),
    }

    def step(name: str) -> float:
        source, read = sources[name]
        idx = torch.randperm(n_images, generator=generator)[: args.batch_size].tolist()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            flip = torch.rand(len(idx), generator=generator) < 0.5
            noise = torch.randn(len(idx), 4, args.image_size // 8, args.image_size // 8, generator=generator)
            x0, y = source(read(idx), torch.device("cpu"), flip=flip, posterior_noise=noise)
            loss = diffusion_loss(model, process, x0.float(), y, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in sources}
    for name in sources:
        step(name)  # warm-up
    for _ in range(args.repeats):
        for name in sources:
            times[name].append(step(name))
    median = {name: statistics.median(v) for name, v in times.items()}
    ratio = median["encode on the fly"] / median["latent cache"]
    side = args.image_size // 8
    print(f"DiT-S/2, 4x{side}x{side} latents of {args.image_size} px images, batch {args.batch_size}, {args.precision}")
    for name, value in median.items():
        print(f"  {name:18s} {value * 1000:8.0f} ms/step  {args.batch_size / value:7.1f} img/s")
    print(f"  cache speedup: {ratio:.1f}x")
    print("cache size per image (both flips, mean + logvar, label):")
    for dtype, b in bytes_per_image.items():
        err = b["storage_error"]
        print(
            f"  {dtype:5s} {b['files'] / 1024:6.1f} KiB in files ({b['formula'] / 1024:.1f} KiB payload); "
            f"max |error| of the mean {err['max_abs_mean']:.2e}, rms error / posterior std "
            f"{err['rms_mean_over_posterior_std']:.2e}; built at {build_rate[dtype]:.1f} img/s"
        )
    if args.json:
        results = {"median_s": median, "speedup": ratio, "bytes_per_image": bytes_per_image, "args": vars(args)}
        Path(args.json).write_text(json.dumps(results, indent=2))


def _stack(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


if __name__ == "__main__":
    main()
