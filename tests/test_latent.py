"""Autoencoders, the latent cache, tar shards and latent training, with tiny random-weight diffusers VAEs."""

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_tiny_autoencoder_kl, save_tiny_autoencoder_tiny
from ditkit import autoencoders
from ditkit.autoencoders import (
    AutoencoderError,
    autoencoder_shape,
    build_autoencoder,
    read_autoencoder_config,
    resolve_autoencoder,
)
from ditkit.config import AutoencoderConfig, Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from ditkit.data import DataError, TarShardDataset, build_dataset
from ditkit.data import cache as cache_module
from ditkit.data.cache import CacheDataset, CacheError, build_cache, verify_cache
from ditkit.data.sources import CachedBatches, ImageBatches

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def kl_path(tmp_path_factory) -> Path:
    """A tiny AutoencoderKL (RGB, 4 latent channels, downsampling 2) saved like a hub folder."""
    path = tmp_path_factory.mktemp("vae") / "tiny-kl"
    save_tiny_autoencoder_kl(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """12 random 16x16 RGB images in 3 class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k in range(12):
        folder = root / f"class{k % 3}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k:02d}.png")
    return root


def latent_config(kl_path, root, **data) -> Config:
    return Config(
        model=ModelConfig(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3, learn_sigma=False),
        data=DataConfig(dataset="folder", root=str(root), image_size=16, channels=3, holdout=0, **data),
        autoencoder=AutoencoderConfig(kind="kl", path=str(kl_path)),
        train=TrainConfig(batch_size=4, steps=3, log_every=1, ckpt_every=3, device="cpu", out_dir="unused"),
    )


def test_model_shape_and_scale_follow_the_autoencoder(kl_path, image_folder):
    given = latent_config(kl_path, image_folder)
    assert given.model.in_channels is None  # open until the autoencoder's config is read
    config = resolve_autoencoder(given)
    # A copy throughout: changing the result (as callers do, e.g. data.cache) leaves the input alone.
    config.data.root, config.train.steps = "elsewhere", 12345
    assert given.data.root == str(image_folder) and given.train.steps != 12345 and given.model.in_channels is None
    ae = config.autoencoder
    assert (ae.latent_channels, ae.downsample, ae.scale, ae.shift) == (4, 2, 0.18215, 0.0)
    assert config.model.in_channels == 4 and config.model.input_hw == (8, 8)
    with pytest.raises(ConfigError, match="model.in_channels=3 conflicts with autoencoder.latent_channels=4"):
        Config(model=ModelConfig(in_channels=3), data=config.data, autoencoder=config.autoencoder)


def test_a_config_without_scaling_factor_gets_diffusers_default(kl_path, image_folder, tmp_path):
    """VAE folders saved before diffusers wrote `scaling_factor` (late 2022) have none: diffusers then
    uses the class default, 0.18215 for AutoencoderKL; resolving the config must agree with loading it."""
    import json
    import shutil

    old = tmp_path / "old-kl"
    shutil.copytree(kl_path, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["scaling_factor"]
    (old / "config.json").write_text(json.dumps(cfg))
    resolved = resolve_autoencoder(latent_config(old, image_folder))
    assert resolved.autoencoder.scale == 0.18215
    assert build_autoencoder(AutoencoderConfig(kind="kl", path=str(old))).config.scale == 0.18215


def test_encode_decode_shapes_and_posterior(kl_path):
    ae = build_autoencoder(AutoencoderConfig(kind="kl", path=str(kl_path)))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    dist = ae.encode_distribution(images)
    assert dist.mean.shape == dist.logvar.shape == (2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    z = ae.encode(images, g)
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (dist.mean + (0.5 * dist.logvar).exp() * noise) * 0.18215)
    assert ae.decode(z).shape == (2, 3, 16, 16)


def test_scale_and_shift_are_applied_exactly_once(kl_path):
    cfg = AutoencoderConfig(kind="kl", path=str(kl_path), scale=[0.5, 2.0, 1.0, 4.0], shift=0.25)
    ae = build_autoencoder(cfg)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    raw = z / torch.tensor([0.5, 2.0, 1.0, 4.0]).reshape(1, 4, 1, 1) + 0.25
    torch.testing.assert_close(ae.decode(z), ae.module.decode(raw).sample)
    torch.testing.assert_close(ae.normalize(ae.denormalize(z)), z)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    mean = ae.module.encode(images).latent_dist.mean
    torch.testing.assert_close(ae.normalize(ae.encode_distribution(images).mean), (mean - 0.25) * ae.scale)


def test_tiny_autoencoder_is_deterministic(tmp_path):
    tiny = diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )
    tiny.save_pretrained(tmp_path / "taesd")
    ae = build_autoencoder(AutoencoderConfig(kind="tiny", path=str(tmp_path / "taesd")))
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert ae.encode_distribution(images).logvar is None
    torch.testing.assert_close(ae.encode(images), ae.encode(images))
    assert ae.encode(images).shape == (2, 4, 4, 4) and ae.decode(ae.encode(images)).shape == (2, 3, 8, 8)
    # TAESD's latents are already roughly unit-scaled: diffusers' AutoencoderTiny defaults are
    # scaling_factor 1.0 and shift_factor 0.0 (docs/latent.md), not the KL VAE's 0.18215.
    assert (ae.config.scale, ae.config.shift) == (1.0, 0.0)
    assert ae.scale.eq(1).all() and ae.shift.eq(0).all()
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(images), tiny.encode(images).latents, atol=0, rtol=0)
    cfg = json.loads((tmp_path / "taesd" / "config.json").read_text())
    del cfg["scaling_factor"], cfg["shift_factor"]  # as written before diffusers recorded them
    (tmp_path / "taesd" / "config.json").write_text(json.dumps(cfg))
    config = Config(
        model=ModelConfig(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=0, learn_sigma=False),
        data=DataConfig(dataset="folder", root=str(tmp_path), image_size=8, channels=3),
        autoencoder=AutoencoderConfig(kind="tiny", path=str(tmp_path / "taesd")),
    )
    resolved = resolve_autoencoder(config).autoencoder
    assert (resolved.scale, resolved.shift) == (1.0, 0.0)
    loaded = build_autoencoder(config.autoencoder)
    assert (loaded.config.scale, loaded.config.shift) == (1.0, 0.0)


@pytest.mark.parametrize("where", ["local", "hub"])
def test_missing_autoencoder_error_names_it(tmp_path, where):
    path = str(tmp_path / "no-vae") if where == "local" else "nobody-here/no-such-vae"
    with pytest.raises(AutoencoderError) as err:
        build_autoencoder(AutoencoderConfig(kind="kl", path=path))
    assert path in str(err.value)


@pytest.fixture(scope="module")
def taesd_path(tmp_path_factory) -> Path:
    """A tiny AutoencoderTiny (RGB, 4 latent channels, downsampling 2) saved like a hub folder."""
    path = tmp_path_factory.mktemp("taesd") / "tiny-taesd"
    save_tiny_autoencoder_tiny(path)
    return path


@pytest.mark.parametrize(
    ("kind", "folder", "found"), [("kl", "taesd", "AutoencoderTiny"), ("tiny", "kl", "AutoencoderKL")]
)
def test_autoencoder_kind_must_match_the_class_of_the_folder(kl_path, taesd_path, image_folder, kind, folder, found):
    # diffusers builds either class from either folder (random weights where the names differ) and only logs it
    path = str(taesd_path if folder == "taesd" else kl_path)
    config = latent_config(path, image_folder)
    config = dataclasses.replace(config, autoencoder=AutoencoderConfig(kind=kind, path=path))
    for load in (autoencoder_shape, build_autoencoder, lambda ae: resolve_autoencoder(config)):
        with pytest.raises(AutoencoderError) as err:
            load(config.autoencoder)
        message = str(err.value)
        assert path in message and f"autoencoder.kind={kind!r}" in message and found in message
        assert f"set autoencoder.kind={'tiny' if kind == 'kl' else 'kl'!r}" in message


def test_a_subclass_of_a_known_autoencoder_class_loads(kl_path, taesd_path, tmp_path):
    """A folder saved from a subclass names its own class: not the other kind's, so it is not refused by
    name; its weights are all found (build_autoencoder checks that). folder_kind reads the class."""
    from ditkit.autoencoders import folder_kind

    path = tmp_path / "myvae"
    shutil.copytree(kl_path, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "_class_name": "MyVAE"}))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mine, theirs = (build_autoencoder(AutoencoderConfig(kind="kl", path=str(p))) for p in (path, kl_path))
    assert torch.equal(mine.encode_distribution(images).mean, theirs.encode_distribution(images).mean)
    assert (folder_kind(str(kl_path)), folder_kind(str(taesd_path)), folder_kind(str(path))) == ("kl", "tiny", "kl")


@pytest.mark.parametrize("case", ["weights", "class"])
def test_weights_missing_from_the_folder_are_refused(kl_path, tmp_path, case):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "vae"
    shutil.copytree(kl_path, path)
    if case == "weights":  # a truncated or edited weight file: AutoencoderKL would initialise the rest at random
        weights = load_file(path / "diffusion_pytorch_model.safetensors")
        del weights["decoder.conv_out.bias"], weights["quant_conv.weight"]
        save_file(weights, path / "diffusion_pytorch_model.safetensors")
        kind, key = "kl", "decoder.conv_out.bias"
    else:  # no _class_name to compare: the wrong class is caught by its weights
        cfg = json.loads((path / "config.json").read_text())
        del cfg["_class_name"]
        (path / "config.json").write_text(json.dumps(cfg))
        kind, key = "tiny", "decoder.layers"
    with pytest.raises(AutoencoderError) as err:
        build_autoencoder(AutoencoderConfig(kind=kind, path=str(path)))
    assert str(path) in str(err.value) and key in str(err.value) and "random" in str(err.value)


def test_config_json_without_keys_at_their_defaults_gets_diffusers_defaults(kl_path, tmp_path, monkeypatch):
    path = tmp_path / "vae"
    shutil.copytree(kl_path, path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["latent_channels"], cfg["in_channels"]  # diffusers' defaults: 4 and 3, what this model has
    (path / "config.json").write_text(json.dumps(cfg))
    assert diffusers.AutoencoderKL.from_pretrained(path).config.latent_channels == 4
    ae_config = AutoencoderConfig(kind="kl", path=str(path))
    assert autoencoder_shape(ae_config) == (3, 4, 2)
    assert build_autoencoder(ae_config).latent_channels == 4
    monkeypatch.setattr(autoencoders, "_init_defaults", lambda kind: {})  # a class without a default for it
    with pytest.raises(AutoencoderError) as err:
        autoencoder_shape(ae_config)
    assert str(path) in str(err.value) and "'in_channels'" in str(err.value)


def test_autoencoder_path_under_the_home_folder(kl_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(kl_path, tmp_path / "vaes" / "kl")
    ae_config = AutoencoderConfig(kind="kl", path="~/vaes/kl")
    assert read_autoencoder_config(ae_config)["latent_channels"] == 4
    ae = build_autoencoder(ae_config)
    reference = build_autoencoder(AutoencoderConfig(kind="kl", path=str(kl_path)))
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ae.encode_distribution(images).mean, reference.encode_distribution(images).mean)


def test_cache_contents_equal_direct_encoding(kl_path, image_folder, tmp_path):
    config = resolve_autoencoder(latent_config(kl_path, image_folder))
    report = build_cache(config, tmp_path / "cache", shard_items=5, batch_size=3, progress=False)
    assert (report.num_items, report.num_shards) == (12, 3)
    cache = CacheDataset(tmp_path / "cache")
    ae = build_autoencoder(config)
    images = build_dataset(config.data)
    x = torch.stack([images[i][0] for i in range(12)])
    (mean, logvar), labels = cache.__getitems__(list(range(12)))
    for view, batch in ((0, x), (1, x.flip(-1))):
        dist = ae.encode_distribution(batch)
        torch.testing.assert_close(mean[:, view], dist.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logvar[:, view], dist.logvar, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [images[i][1] for i in range(12)]
    # latent statistics of the manifest: per-channel mean of the posterior means of both views
    both = torch.cat([ae.encode_distribution(x).mean, ae.encode_distribution(x.flip(-1)).mean])
    np.testing.assert_allclose(report.manifest["latent_mean"], both.mean((0, 2, 3)).double().numpy(), rtol=1e-4)


def test_cache_and_image_batches_are_the_same_batch(kl_path, image_folder, tmp_path):
    config = resolve_autoencoder(latent_config(kl_path, image_folder, hflip=True))
    build_cache(config, tmp_path / "cache", shard_items=4, progress=False)
    ae = build_autoencoder(config)
    indices = [3, 0, 7, 11, 5]
    images = build_dataset(config.data)
    raw_batch = (torch.stack([images[i][0] for i in indices]), torch.tensor([images[i][1] for i in indices]))
    flip = torch.tensor([True, False, True, True, False])
    noise = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cpu = torch.device("cpu")
    from_images = ImageBatches(ae)(raw_batch, cpu, flip=flip, posterior_noise=noise)
    cached = CacheDataset(tmp_path / "cache").__getitems__(indices)
    from_cache = CachedBatches(ae)(cached, cpu, flip=flip, posterior_noise=noise)
    torch.testing.assert_close(from_cache[0], from_images[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(from_cache[1], from_images[1])
    unflipped = ImageBatches(ae)(raw_batch, cpu, posterior_noise=noise)[0]
    assert not torch.allclose(unflipped, from_images[0], atol=1e-3)  # the flip mattered


@pytest.mark.parametrize("dtype", ["fp16", "uint8"])
def test_storage_error_is_within_the_reported_bound(kl_path, image_folder, tmp_path, dtype):
    config = resolve_autoencoder(latent_config(kl_path, image_folder))
    build_cache(config, tmp_path / "fp32", shard_items=6, progress=False)
    report = build_cache(config, tmp_path / dtype, dtype=dtype, shard_items=6, progress=False)
    (exact, exact_lv), _ = CacheDataset(tmp_path / "fp32").__getitems__(list(range(12)))
    (stored, stored_lv), _ = CacheDataset(tmp_path / dtype).__getitems__(list(range(12)))
    err = report.manifest["storage_error"]
    measured = (stored - exact).abs().max().item()
    assert measured == pytest.approx(err["max_abs_mean"], rel=1e-5)
    assert (stored_lv - exact_lv).abs().max().item() == pytest.approx(err["max_abs_logvar"], rel=1e-5)
    if dtype == "uint8":  # half a code step of each (image, view, channel) range
        flat = exact.flatten(3)
        bound = ((flat.amax(-1) - flat.amin(-1)) / 255 / 2)[..., None]
        assert ((stored - exact).flatten(3).abs() <= bound + 1e-6).all()
    else:  # fp16 rounding: relative 2^-11
        assert measured <= exact.abs().max().item() * 2**-11
    assert 0 < measured
    values = 2 * 2 * 4 * 8 * 8  # (image, mirror) x (mean, logvar) x C x h x w
    per_range = 2 * 2 * 4 * 8  # uint8: a float32 lo and step per (image, mirror) x (mean, logvar) x channel
    assert report.bytes_per_image == {"fp16": 2 * values, "uint8": values + per_range}[dtype] + 8  # + the label


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"shard_items": 0}, "shard_items (--shard-items) must be at least 1, got 0"),
        ({"shard_mb": 0.0}, "shard_mb (--shard-mb) must be above 0, got 0.0"),
        ({"batch_size": 0}, "batch_size (--batch-size) must be at least 1, got 0"),
    ],
)
def test_cache_refuses_empty_shards_and_batches_before_writing(kl_path, image_folder, tmp_path, setting, message):
    config = resolve_autoencoder(latent_config(kl_path, image_folder))
    with pytest.raises(ValueError, match=re.escape(message)):
        build_cache(config, tmp_path / "cache", progress=False, **setting)
    assert not (tmp_path / "cache").exists()


def test_cache_refuses_other_settings_and_incomplete_reads(kl_path, image_folder, tmp_path):
    config = resolve_autoencoder(latent_config(kl_path, image_folder))
    build_cache(config, tmp_path / "cache", shard_items=6, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    with pytest.raises(CacheError, match="dtype"):
        build_cache(config, tmp_path / "cache", dtype="fp16", shard_items=6, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    (tmp_path / "cache" / "cache.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(CacheError, match="incomplete"):
        CacheDataset(tmp_path / "cache")


def _own_images(root: Path, count: int = 6) -> Path:
    """`count` random 16x16 images in 2 class folders, for tests that change them after caching."""
    rng = np.random.default_rng(1)
    for k in range(count):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"c{k % 2}" / f"{k}.png")
    return root


def _replace_images(root: Path, seed: int) -> None:
    """New content under the same names (same PNG sizes, as random pixels do not compress)."""
    rng = np.random.default_rng(seed)
    for path in sorted(root.rglob("*.png")):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        stat = path.stat()  # 1 s later: file times come from a coarse clock, a fast test could reuse a tick
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_cache_refuses_images_replaced_under_the_same_names(kl_path, tmp_path, caplog):
    images = _own_images(tmp_path / "img")
    config = resolve_autoencoder(latent_config(kl_path, images))
    build_cache(config, tmp_path / "cache", shard_items=3, progress=False)
    verify_cache(tmp_path / "cache")  # unchanged: no false alarm
    before = _folder_bytes(tmp_path / "cache")
    _replace_images(images, seed=2)
    with pytest.raises(CacheError) as err:
        build_cache(config, tmp_path / "cache", shard_items=3, progress=False)
    assert f"images under data.root={images} changed" in str(err.value) and "modification times" in str(err.value)
    assert f"delete {tmp_path / 'cache'} yourself" in str(err.value)
    assert _folder_bytes(tmp_path / "cache") == before  # the user's cache is never touched
    # What training from data.cache runs: names and sizes unchanged (random pixels keep PNG sizes), so
    # only the times tell, as after a `cp -r` of the images; a reader warns and goes on.
    with caplog.at_level("WARNING", logger="ditkit.data.cache"):
        verify_cache(tmp_path / "cache")
    assert "may have changed since the cache" in caplog.text and "cp -r" in caplog.text
    (images / "c1" / "1.png").write_bytes(b"x")  # a size changed: refused
    with pytest.raises(CacheError, match="it now holds 6 files"):
        verify_cache(tmp_path / "cache")
    (images / "c0" / "0.png").unlink()
    with pytest.raises(CacheError, match="it now holds 5 files"):
        verify_cache(tmp_path / "cache")
    images.rename(tmp_path / "moved")  # a cache copied to a machine without the images: nothing to compare
    with caplog.at_level("INFO", logger="ditkit.data.cache"):
        verify_cache(tmp_path / "cache")
    assert "not checking whether its images changed" in caplog.text


def test_resumed_cache_refuses_images_changed_since_the_interruption(kl_path, tmp_path, monkeypatch):
    images = _own_images(tmp_path / "img")
    config = resolve_autoencoder(latent_config(kl_path, images))
    encode = cache_module._encode_shard
    calls = []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return encode(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_encode_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config, tmp_path / "cache", shard_items=3, progress=False)
    monkeypatch.setattr(cache_module, "_encode_shard", encode)
    before = _folder_bytes(tmp_path / "cache")
    assert "shard_00000.safetensors" in before and "shard_00001.safetensors" not in before
    _replace_images(images, seed=3)
    with pytest.raises(CacheError, match="changed since the cache"):  # shard 0 holds the old images' latents
        build_cache(config, tmp_path / "cache", shard_items=3, progress=False)
    assert _folder_bytes(tmp_path / "cache") == before


def test_cache_refuses_other_autoencoder_weights_at_the_same_path(kl_path, tmp_path, monkeypatch):
    vae_path = tmp_path / "vae"
    shutil.copytree(kl_path, vae_path)
    config = resolve_autoencoder(latent_config(vae_path, _own_images(tmp_path / "img")))
    build_cache(config, tmp_path / "cache", shard_items=3, progress=False)
    weights = vae_path / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    verify_cache(tmp_path / "cache")  # same bytes, newer time (a copy): the weights are hashed, so still accepted
    vae = diffusers.AutoencoderKL.from_pretrained(vae_path)
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(0.01)
    vae.save_pretrained(vae_path)
    for check in (
        lambda: verify_cache(tmp_path / "cache"),
        lambda: build_cache(config, tmp_path / "cache", shard_items=3, progress=False),
    ):
        with pytest.raises(CacheError) as err:
            check()
        assert f"autoencoder weights at autoencoder.path={vae_path} changed" in str(err.value)


def test_cache_from_before_fingerprints_loads_with_a_warning(kl_path, tmp_path, caplog):
    config = resolve_autoencoder(latent_config(kl_path, _own_images(tmp_path / "img")))
    build_cache(config, tmp_path / "cache", shard_items=3, progress=False)
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert manifest["sources"]["files"] == 6 and manifest["autoencoder_weights"]["sha256"]
    old = {k: v for k, v in manifest.items() if k not in ("sources", "autoencoder_weights")}
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(old, indent=2) + "\n")
    with caplog.at_level("WARNING", logger="ditkit.data.cache"):
        verify_cache(tmp_path / "cache")
        report = build_cache(config, tmp_path / "cache", shard_items=3, progress=False)
    assert caplog.text.count("cannot check whether they changed") == 2
    assert report.shards_written == 0 and len(CacheDataset(tmp_path / "cache")) == 6
    assert "sources" not in json.loads((tmp_path / "cache" / "cache.json").read_text())  # not certified afterwards


def test_cache_reports_the_class_count_of_its_dataset(kl_path, tmp_path):
    # Not the largest label + 1: a flat folder has no classes (every label 0), and a class folder
    # without images still counts. Training's guard against a conditional model on unconditional data
    # reads this count.
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(3):
        Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(flat / f"{k}.png")
    build_cache(resolve_autoencoder(latent_config(kl_path, flat)), tmp_path / "flat-cache", progress=False)
    assert build_dataset(DataConfig(dataset="folder", root=str(flat), image_size=16)).num_classes == 0
    assert CacheDataset(tmp_path / "flat-cache").num_classes == 0
    images = _own_images(tmp_path / "img")
    (images / "c2-empty").mkdir()  # a trailing class folder with no images
    config = resolve_autoencoder(latent_config(kl_path, images))
    build_cache(config, tmp_path / "cache", shard_items=4, progress=False)
    assert CacheDataset(tmp_path / "cache").num_classes == build_dataset(config.data).num_classes == 3
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["num_classes"] == 3
    # An empty folder added before c1 moves c1's labels without changing any file the fingerprint sees.
    (images / "c0-empty").mkdir()
    with pytest.raises(CacheError) as err:
        build_cache(config, tmp_path / "cache", shard_items=4, progress=False)
    assert f"{tmp_path / 'cache'} holds a cache of 3 classes" in str(err.value) and "now has 4" in str(err.value)


def test_cache_from_before_class_counts_loads_and_resumes_with_a_warning(kl_path, tmp_path, caplog):
    config = resolve_autoencoder(latent_config(kl_path, _own_images(tmp_path / "img")))
    build_cache(config, tmp_path / "cache", shard_items=4, progress=False)
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    old = {k: v for k, v in manifest.items() if k != "num_classes"}
    (tmp_path / "cache" / "cache.json").write_text(json.dumps({**old, "complete": False}, indent=2) + "\n")
    (tmp_path / "cache" / "shard_00001.safetensors").unlink()  # an interrupted older run, resumed now
    report = build_cache(config, tmp_path / "cache", shard_items=4, progress=False)
    assert report.shards_written == 1 and "num_classes" not in report.manifest  # not certified afterwards
    with caplog.at_level("WARNING", logger="ditkit.data.cache"):
        cache = CacheDataset(tmp_path / "cache")
    assert cache.num_classes == 2  # the largest label + 1
    assert "did not record its dataset's number of classes: assuming 2" in caplog.text


def test_truncated_or_garbled_shard_is_named_and_re_encoded(kl_path, tmp_path):
    config = resolve_autoencoder(latent_config(kl_path, _own_images(tmp_path / "img", count=4)))
    build_cache(config, tmp_path / "cache", shard_items=2, progress=False)
    shard = tmp_path / "cache" / "shard_00001.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # an interrupted copy: the header survives
    with pytest.raises(CacheError) as err:
        CacheDataset(tmp_path / "cache")
    message = str(err.value)
    assert f"{shard}: {len(whole) // 2} bytes, but its header says its tensors end at byte {len(whole)}" in message
    assert "truncated" in message and "copy it again" in message and "`ditkit cache` command again" in message
    shard.write_bytes(whole[:5])  # not even the header's length
    with pytest.raises(CacheError, match=re.escape(f"{shard}: unreadable shard header (error: ")):
        CacheDataset(tmp_path / "cache")
    shard.write_bytes(whole[:8] + b"{not json" + whole[17:])
    with pytest.raises(CacheError, match=re.escape(f"{shard}: unreadable shard header (JSONDecodeError: ")):
        CacheDataset(tmp_path / "cache")
    # What the message promises: the same command encodes that shard again, byte for byte.
    assert build_cache(config, tmp_path / "cache", shard_items=2, progress=False).shards_written == 1
    assert shard.read_bytes() == whole and len(CacheDataset(tmp_path / "cache")) == 4


def _other_weights(src: Path, dst: Path) -> None:
    """A copy of the VAE folder `src` at `dst` with other weights (the same config and file names)."""
    vae = diffusers.AutoencoderKL.from_pretrained(src)
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(0.01)
    vae.save_pretrained(dst)


def test_cache_check_reads_relative_paths_from_where_the_cache_was_built(kl_path, tmp_path, monkeypatch, caplog):
    """A relative data.root / autoencoder.path names folders from the folder `ditkit cache` ran in; a
    reader starting in another folder must check those, not whatever the same names mean there."""
    built_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    _own_images(built_in / "img")
    shutil.copytree(kl_path, built_in / "vae")
    _own_images(elsewhere / "img", count=4)  # other images and weights under the same relative names
    _other_weights(kl_path, elsewhere / "vae")
    monkeypatch.chdir(built_in)
    config = resolve_autoencoder(latent_config("vae", "img"))
    build_cache(config, tmp_path / "cache", shard_items=3, progress=False)
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert (manifest["data"]["root"], manifest["autoencoder"]["path"]) == ("img", "vae")  # settings as given
    monkeypatch.chdir(elsewhere)
    verify_cache(tmp_path / "cache")  # the project's files are unchanged: no false alarm from ./img, ./vae here
    monkeypatch.chdir(tmp_path)  # neither name exists from here: still checked, not skipped
    with caplog.at_level("INFO", logger="ditkit.data.cache"):
        verify_cache(tmp_path / "cache")
    assert "not here" not in caplog.text
    (built_in / "img" / "c0" / "0.png").unlink()
    with pytest.raises(CacheError, match=rf"data.root=img \(at {re.escape(str(built_in / 'img'))}\).*now holds 5"):
        verify_cache(tmp_path / "cache")
    _own_images(built_in / "img")
    _other_weights(kl_path, built_in / "vae")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CacheError, match=rf"autoencoder.path=vae \(at {re.escape(str(built_in / 'vae'))}\) changed"):
        verify_cache(tmp_path / "cache")


def test_a_project_moved_whole_checks_its_moved_images(kl_path, tmp_path, monkeypatch, caplog):
    """Relative paths, and the project (images, VAE, cache) moved elsewhere: the recorded folders are gone,
    so the copies the relative names reach from the current folder are checked, with a warning, not skipped."""
    built_in, moved = tmp_path / "project", tmp_path / "scratch" / "project"
    _own_images(built_in / "img")
    shutil.copytree(kl_path, built_in / "vae")
    monkeypatch.chdir(built_in)
    build_cache(resolve_autoencoder(latent_config("vae", "img")), built_in / "cache", shard_items=3, progress=False)
    moved.parent.mkdir()
    shutil.move(built_in, moved)
    monkeypatch.chdir(moved)
    with caplog.at_level("WARNING", logger="ditkit.data.cache"):
        verify_cache("cache")  # unchanged copies: accepted
    assert f"was at {built_in / 'img'} when the cache was built, which is gone" in caplog.text
    (moved / "img" / "c0" / "0.png").unlink()
    with pytest.raises(CacheError, match=rf"data.root=img \(at {re.escape(str(moved / 'img'))}\).*now holds 5"):
        verify_cache("cache")


def test_a_cache_staged_alone_is_not_checked_against_a_folder_that_only_shares_its_images_name(
    kl_path, tmp_path, monkeypatch, caplog
):
    """Only the cache copied to a node, under a folder named like the images' (data/cache256): the images
    are not there, so the check is skipped as for any absent folder, not run against that folder."""
    project, node = tmp_path / "project", tmp_path / "node"
    _own_images(project / "data")
    monkeypatch.chdir(project)
    build_cache(resolve_autoencoder(latent_config(kl_path, "data")), project / "cache", shard_items=3, progress=False)
    (node / "data").mkdir(parents=True)
    shutil.copytree(project / "cache", node / "data" / "cache256")
    shutil.rmtree(project)
    monkeypatch.chdir(node)
    with caplog.at_level("INFO", logger="ditkit.data.cache"):
        verify_cache("data/cache256")
    assert "is not here: not checking whether its images changed" in caplog.text


def test_cache_without_recorded_folders_checks_relative_paths_from_the_current_folder(kl_path, tmp_path, monkeypatch):
    """A cache from before the build folder was recorded keeps the old behaviour (relative to the current
    folder), and a refusal says that is where it looked."""
    built_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    _own_images(built_in / "img")
    _own_images(elsewhere / "img", count=4)
    monkeypatch.chdir(built_in)
    build_cache(resolve_autoencoder(latent_config(kl_path, "img")), tmp_path / "cache", shard_items=3, progress=False)
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert manifest["sources"].pop("root") == str(built_in / "img")
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(manifest, indent=2) + "\n")
    verify_cache(tmp_path / "cache")  # from the folder it was built in, as before
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CacheError, match=r"data.root=img \(at .*elsewhere.img, from the current folder: this cache"):
        verify_cache(tmp_path / "cache")


def _cache_cmd(kl_path, root, out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ditkit",
        "cache",
        "--out",
        str(out),
        "--shard-items",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "data.dataset=folder",
        f"data.root={root}",
        "data.image_size=16",
        "data.channels=3",
        "autoencoder.kind=kl",
        f"autoencoder.path={kl_path}",
    ]


def test_killed_cache_run_resumes_to_identical_files(kl_path, image_folder, tmp_path):
    env = {**os.environ, "DITKIT_TEST_CACHE_SHARD_DELAY": "1.0", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cache_cmd(kl_path, image_folder, out), env=env)
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard_*.safetensors"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards_at_kill = sorted(p.name for p in out.glob("shard_*.safetensors"))
    assert 2 <= len(shards_at_kill) < 6, "the run should have been killed part-way"
    assert not json.loads((out / "cache.json").read_text())["complete"]
    with pytest.raises(CacheError, match="incomplete"):
        CacheDataset(out)
    mtimes = {name: (out / name).stat().st_mtime_ns for name in shards_at_kill}
    env.pop("DITKIT_TEST_CACHE_SHARD_DELAY")
    subprocess.run(_cache_cmd(kl_path, image_folder, out), env=env, check=True, capture_output=True)
    assert {name: (out / name).stat().st_mtime_ns for name in shards_at_kill} == mtimes  # not redone
    subprocess.run(_cache_cmd(kl_path, image_folder, tmp_path / "whole"), env=env, check=True, capture_output=True)
    resumed = {p.name: p.read_bytes() for p in out.iterdir()}
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    manifests = [json.loads(files.pop("cache.json")) for files in (resumed, whole)]
    assert [m.pop("built_in") for m in manifests] == [str(out), str(tmp_path / "whole")]  # each its own folder
    assert resumed == whole and manifests[0] == manifests[1]
    assert len(CacheDataset(out)) == 12


def _write_tar(path: Path, items: list[tuple[str, bytes, int | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data, label in items:
            for name, payload in ((f"{key}.png", data), (f"{key}.cls", None if label is None else str(label).encode())):
                if payload is None:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_shards_dataset(tmp_path):
    _write_tar(tmp_path / "a.tar", [("s/0", _png((255, 0, 0)), 2), ("s/1", _png((0, 255, 0)), 0)])
    _write_tar(tmp_path / "b.tar", [("s/2", _png((0, 0, 255)), 1)])
    ds = TarShardDataset(tmp_path, image_size=8)
    assert len(ds) == 3 and ds.num_classes == 3
    labels = [ds[i][1] for i in range(3)]
    assert labels == [2, 0, 1]
    image = ds[2][0]
    assert image.shape == (3, 8, 8) and image[2].eq(1).all() and image[0].eq(-1).all()
    assert len(build_dataset(DataConfig(dataset="tar", root=str(tmp_path / "b.tar"), image_size=8, channels=3))) == 1


def test_unreadable_tar_member_is_named_or_skipped(tmp_path):
    _write_tar(tmp_path / "a.tar", [("x/0", _png((1, 2, 3)), None), ("x/1", b"not a png", None)])
    ds = TarShardDataset(tmp_path, image_size=8)
    assert ds.num_classes == 0
    with pytest.raises(DataError) as err:
        ds[1]
    assert "a.tar:x/1.png" in str(err.value)
    skipping = TarShardDataset(tmp_path, image_size=8, skip_bad_files=True)
    assert len(skipping) == 1 and skipping.num_skipped == 1


def _write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_tar_sample_keys_end_at_the_first_dot_as_in_webdataset(tmp_path, caplog):
    # WebDataset's key is the folder plus the file name up to its first dot: 0001.seg.png is the
    # `seg.png` of sample 0001, not a sample `0001.seg` whose mask would be trained on as an image.
    _write_members(
        tmp_path / "a.tar",
        [
            ("0001.png", _png((255, 0, 0))),
            ("0001.seg.png", _png((0, 0, 0))),
            ("0001.cls", b"2"),
            ("v1.0/0002.jpg", _png((0, 0, 255))),  # a dot in the folder does not end the key
            ("v1.0/0002.cls", b"1"),
        ],
    )
    ds = TarShardDataset(tmp_path, image_size=8)
    assert [entry[3] for entry in ds.index] == ["0001.png", "v1.0/0002.jpg"] and ds.num_classes == 3
    (red, label), (blue, other) = ds[0], ds[1]
    assert (label, other) == (2, 1)
    assert red[0].eq(1).all() and red[1:].eq(-1).all()  # the photo, not the black mask
    assert blue[2].eq(1).all() and blue[:2].eq(-1).all()
    # A sample whose only image-like member has a longer extension has no image: named, not trained on.
    _write_members(tmp_path / "b.tar", [("0003.seg.png", _png((0, 0, 0))), ("0003.cls", b"0")])
    with caplog.at_level("WARNING", logger="ditkit.data.tar"):
        assert len(TarShardDataset(tmp_path, image_size=8)) == 2
    assert f"{tmp_path / 'b.tar'}:0003.seg.png" in caplog.text
    with pytest.raises(DataError) as err:
        TarShardDataset(tmp_path / "b.tar", image_size=8)
    assert "no images found" in str(err.value) and "b.tar:0003.seg.png" in str(err.value)


def test_tar_label_that_is_not_utf8_is_named(tmp_path):
    _write_members(tmp_path / "a.tar", [("s/0001.png", _png((1, 2, 3))), ("s/0001.cls", "3".encode("utf-16"))])
    with pytest.raises(DataError) as err:
        TarShardDataset(tmp_path, image_size=8)
    message = str(err.value)
    assert (
        f"{tmp_path / 'a.tar'}: s/0001.cls" in message and "not UTF-8" in message and "expected an integer" in message
    )
    _write_members(tmp_path / "a.tar", [("s/0001.png", _png((1, 2, 3))), ("s/0001.cls", b"three")])
    with pytest.raises(DataError, match=r"a.tar: s/0001.cls holds 'three', expected an integer"):
        TarShardDataset(tmp_path, image_size=8)


def test_tar_workers_read_through_the_parents_handles_without_moving_them(tmp_path, monkeypatch):
    # skip_bad_files decodes every member up front, so the main process holds an open shard handle when
    # the DataLoader forks. Workers share it: an inherited handle shares its file offset with the parent
    # and siblings (concurrent seek + read returned other members' bytes), so members are read with
    # os.pread, which never uses that offset; with it, reopening the shard in each worker is not needed.
    import pickle

    from ditkit.data import tar as tar_module

    _write_tar(tmp_path / "a.tar", [(f"k/{i:02d}", _png((5 * i, 0, 0)), i) for i in range(40)])
    ds = TarShardDataset(tmp_path, image_size=8, skip_bad_files=True)
    fd = ds._files[0].fileno()
    offset = os.lseek(fd, 0, os.SEEK_CUR)
    parent = os.getpid()

    def open_in_the_parent_only(*args, **kwargs):
        if os.getpid() != parent:
            raise AssertionError("a worker reopened a shard its parent had open")
        return open(*args, **kwargs)

    monkeypatch.setattr(tar_module, "open", open_in_the_parent_only, raising=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="fork")
    red, labels = [], []
    for images, label in loader:
        red += ((images[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()
        labels += label.tolist()
    assert labels == list(range(40)) and red == [5 * i for i in labels]  # every item is its own member
    assert os.lseek(fd, 0, os.SEEK_CUR) == offset  # the workers never moved the parent's file offset
    assert ds[7][1] == 7 and round((float(ds[7][0][0, 0, 0]) + 1) * 127.5) == 35
    # A spawned worker gets a pickled copy: no handles, opened again where first read.
    monkeypatch.undo()
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._files == {} and copy[7][1] == 7 and round((float(copy[7][0][0, 0, 0]) + 1) * 127.5) == 35


def test_train_from_cache_and_sample_through_the_autoencoder(kl_path, image_folder, tmp_path, monkeypatch):
    from ditkit.sampling import generate
    from ditkit.train import load_model, train

    config = resolve_autoencoder(latent_config(kl_path, image_folder, hflip=True))
    build_cache(config, tmp_path / "cache", shard_items=5, progress=False)
    config.data.cache = str(tmp_path / "cache")
    config.autoencoder.stats, config.autoencoder.scale, config.autoencoder.shift = "data", None, None
    config.train.out_dir = str(tmp_path / "run")
    result = train(config, progress=False)
    assert np.isfinite(result.final_loss)
    model, saved = load_model(result.checkpoint)
    manifest = CacheDataset(tmp_path / "cache").manifest
    np.testing.assert_allclose(saved.autoencoder.shift, manifest["latent_mean"], rtol=1e-6)
    np.testing.assert_allclose(saved.autoencoder.scale, 1 / np.asarray(manifest["latent_std"]), rtol=1e-6)
    images = generate(model, saved, [0, 2], steps=2, cfg_scale=1.0)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    latents = generate(model, saved, [0, 2], steps=2, cfg_scale=1.0, decode=False)
    assert latents.shape == (2, 4, 8, 8)
    # The images are those latents decoded with the measured statistics the checkpoint recorded:
    # raw = z / scale + shift, then the VAE's decoder (clamped, as generate returns them).
    vae = build_autoencoder(AutoencoderConfig(kind="kl", path=str(kl_path)))
    scale, shift = (torch.tensor(v).view(1, -1, 1, 1) for v in (saved.autoencoder.scale, saved.autoencoder.shift))
    with torch.no_grad():
        by_hand = vae.decode_raw(latents / scale + shift).clamp(-1, 1)
    torch.testing.assert_close(by_hand, images, atol=1e-5, rtol=1e-5)
    # A resume keeps the statistics the run was trained with instead of measuring them again.
    import ditkit.train as train_module

    def measure_again(*args, **kwargs):
        raise AssertionError("a resumed run measured its latent statistics again")

    monkeypatch.setattr(train_module, "measure_latent_stats", measure_again)
    config.train.steps = result.step + 1
    resumed = train(config, resume=tmp_path / "run", progress=False)
    _, again = load_model(resumed.checkpoint)
    assert resumed.step == result.step + 1
    assert (again.autoencoder.shift, again.autoencoder.scale) == (saved.autoencoder.shift, saved.autoencoder.scale)


def test_from_diffusers_latent_model_records_its_autoencoder(kl_path, taesd_path, tmp_path, capsys):
    from ditkit.cli import main
    from ditkit.convert.diffusers import to_diffusers
    from ditkit.models import DiT
    from ditkit.train import load_model

    model = DiT(ModelConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2))
    to_diffusers(model).save_pretrained(tmp_path / "dit")
    assert main(["convert", "from-diffusers", "--diffusers", str(tmp_path / "dit"), "--out", str(tmp_path / "a")]) == 2
    assert "--vae" in capsys.readouterr().err
    args = ["convert", "from-diffusers", "--diffusers", str(tmp_path / "dit"), "--vae", str(kl_path)]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    _, config = load_model(tmp_path / "b")
    assert config.autoencoder.path == str(kl_path) and config.autoencoder.scale == 0.18215
    assert config.data.image_size == 16 and config.model.in_channels == 4
    # A TAESD folder is recorded as kind 'tiny', from its config.json (convert has no kind option to set)
    args = ["convert", "from-diffusers", "--diffusers", str(tmp_path / "dit"), "--vae", str(taesd_path)]
    assert main([*args, "--out", str(tmp_path / "c")]) == 0
    _, config = load_model(tmp_path / "c")
    assert (config.autoencoder.kind, config.autoencoder.path) == ("tiny", str(taesd_path))
    # So with a ditkit_config.json recording the KL autoencoder: TAESD's own shape and scale replace it
    from ditkit.convert.diffusers import save_ditkit_config

    _, kl_config = load_model(tmp_path / "b")
    save_ditkit_config(kl_config, tmp_path / "dit")
    assert main([*args, "--out", str(tmp_path / "d")]) == 0
    _, config = load_model(tmp_path / "d")
    ae = config.autoencoder
    assert (ae.kind, ae.path, ae.scale) == ("tiny", str(taesd_path), 1.0)
    assert config.diffusion == kl_config.diffusion


def test_reference_statistics_from_a_latent_cache_decode_its_means(kl_path, image_folder, tmp_path):
    from ditkit.evaluation.features import ClassifierFeatures, compute_features, reference_from_source
    from ditkit.models.classifier import ClassifierConfig, DigitClassifier

    config = resolve_autoencoder(latent_config(kl_path, image_folder))
    build_cache(config, tmp_path / "cache", shard_items=5, progress=False)
    torch.manual_seed(0)
    net = ClassifierFeatures(DigitClassifier(ClassifierConfig(in_channels=3, width=8)))
    ref = reference_from_source(tmp_path / "cache", net, batch_size=5, progress=False)
    ae = build_autoencoder(config)
    images = torch.stack([build_dataset(config.data)[i][0] for i in range(12)])
    decoded = ae.decode_raw(ae.encode_distribution(images).mean).clamp(-1, 1)
    uint8 = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    direct = compute_features(net, iter([uint8]), 12, False)
    np.testing.assert_allclose(ref["mu"], direct["pool"].mean(0), rtol=1e-4, atol=1e-5)


def test_source_names_on_another_windows_drive_are_fingerprinted_by_their_absolute_path(monkeypatch):
    # os.path.relpath raises ValueError for paths on two drives (Windows); a caption list may name such images.
    def relpath(path, start):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(os.path, "relpath", relpath)
    assert cache_module._relative_name(Path("/data/a.png"), Path("/work")) == str(Path("/data/a.png").absolute())
