"""Captioned data through the latent cache: captions stored with the latents, text-conditioned training from it."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.autoencoders import build_autoencoder, resolve_autoencoder
from ditkit.config import AutoencoderConfig, Config, DataConfig, ModelConfig, TextConfig, TrainConfig
from ditkit.data import build_dataset
from ditkit.data.cache import CAPTIONS, CacheDataset, CacheError, build_cache, read_manifest
from ditkit.data.sources import CachedBatches, ImageBatches, TextBatches, make_batch_source

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import test_latent  # noqa: E402
import test_text  # noqa: E402

# Shared fixtures: a tiny random AutoencoderKL and class folders of images; a random 1-layer BERT.
kl_path, image_folder, tiny_bert = test_latent.kl_path, test_latent.image_folder, test_text.tiny_bert

CAPTION_TEXTS = ["top bar", "the digit seven", "bottom bar", "top bar", "a bar", "the digit seven", "one", "top bar"]


@pytest.fixture(scope="module")
def captioned_folder(tmp_path_factory) -> Path:
    """8 random 16x16 RGB images, each with a same-name .txt caption (some captions repeat)."""
    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(1)
    for k, text in enumerate(CAPTION_TEXTS):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{k:02d}.png")
        (root / f"{k:02d}.txt").write_text(text + "\n")
    return root


def text_latent_config(kl_path, root, tiny_bert, out_dir, dataset="captions", **train) -> Config:
    return Config(
        model=ModelConfig(
            patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=0, learn_sigma=False, text_dim=16
        ),
        data=DataConfig(dataset=dataset, root=str(root), image_size=16, channels=3, holdout=0, hflip=True),
        autoencoder=AutoencoderConfig(kind="kl", path=str(kl_path)),
        train=TrainConfig(
            **{"batch_size": 4, "steps": 2, "log_every": 1, "ckpt_every": 2, "device": "cpu", "out_dir": str(out_dir)}
            | train
        ),
        text=TextConfig(encoder=tiny_bert, max_length=4, cache=str(Path(out_dir).parent / "text.safetensors")),
    )


def with_cache(config: Config, cache: str | None) -> Config:
    """The config with data.cache set to `cache`."""
    return dataclasses.replace(config, data=dataclasses.replace(config.data, cache=cache))


def test_cached_caption_batches_equal_direct_encoding(kl_path, captioned_folder, tiny_bert, tmp_path):
    from ditkit.text import TextEncoder

    config = resolve_autoencoder(text_latent_config(kl_path, captioned_folder, tiny_bert, tmp_path / "run"))
    report = build_cache(config, tmp_path / "cache", shard_items=3, batch_size=2, progress=False)
    stored = json.loads((tmp_path / "cache" / CAPTIONS).read_text())["captions"]
    assert stored == CAPTION_TEXTS  # the text of every item, in item order
    assert report.manifest["captions"]["unique"] == 5
    cache = CacheDataset(tmp_path / "cache")
    images = build_dataset(config.data)
    assert cache.captions == images.captions and cache.labels.tolist() == images.caption_ids
    assert cache.num_classes == 0

    ae = build_autoencoder(config)
    from_cache = make_batch_source(with_cache(config, str(tmp_path / "cache")), ae, cache)
    assert isinstance(from_cache, TextBatches) and isinstance(from_cache.source, CachedBatches)
    indices = [7, 2, 4, 1, 0]
    flip = torch.tensor([True, False, True, False, True])
    noise = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    x0, cond = from_cache(cache.__getitems__(indices), cpu, flip=flip, posterior_noise=noise)
    direct = TextEncoder(tiny_bert, max_length=4).encode([CAPTION_TEXTS[i] for i in indices])
    assert torch.equal(cond.tokens, direct.tokens) and torch.equal(cond.mask, direct.mask)
    assert torch.equal(cond.pooled, direct.pooled) and cond.null is None
    # A flip changes the latents, never the caption.
    x0_unflipped, cond_unflipped = from_cache(cache.__getitems__(indices), cpu, posterior_noise=noise)
    assert torch.equal(cond_unflipped.tokens, cond.tokens) and torch.equal(cond_unflipped.pooled, cond.pooled)
    assert not torch.allclose(x0_unflipped[flip], x0[flip], atol=1e-3)
    torch.testing.assert_close(x0_unflipped[~flip], x0[~flip])
    # The same batch as encoding the captioned images on the fly.
    on_the_fly = make_batch_source(with_cache(config, None), ae, images)
    assert isinstance(on_the_fly.source, ImageBatches)
    raw = (torch.stack([images[i][0] for i in indices]), torch.tensor([images[i][1] for i in indices]))
    x0_images, cond_images = on_the_fly(raw, cpu, flip=flip, posterior_noise=noise)
    torch.testing.assert_close(x0, x0_images, atol=1e-5, rtol=1e-5)
    assert torch.equal(cond_images.tokens, cond.tokens) and torch.equal(cond_images.pooled, cond.pooled)


def test_captioned_cache_lists_and_reads_captions_once_and_its_check_reads_none(
    kl_path, captioned_folder, tiny_bert, tmp_path, monkeypatch
):
    """Caption files count in the fingerprint by size and time, like the images: building reads each
    once (for the dataset; its file list is fingerprinted, not listed again) and checking reads none."""
    import pathlib

    from ditkit.data import cache as cache_module
    from ditkit.data import captions as captions_module
    from ditkit.data import datasets as datasets_module
    from ditkit.data.cache import verify_cache

    data = tmp_path / "data"  # a copy: a caption is edited below
    data.mkdir()
    for path in captioned_folder.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    reads, listings = [], []
    read_text, list_images = pathlib.Path.read_text, datasets_module.list_images

    def counting_read_text(self, *args, **kwargs):
        if self.suffix == ".txt":
            reads.append(self.name)
        return read_text(self, *args, **kwargs)

    def counting_list_images(folder):
        listings.append(folder)
        return list_images(folder)

    monkeypatch.setattr(pathlib.Path, "read_text", counting_read_text)
    for module in (datasets_module, captions_module, cache_module):
        monkeypatch.setattr(module, "list_images", counting_list_images, raising=False)
    config = resolve_autoencoder(text_latent_config(kl_path, data, tiny_bert, tmp_path / "run"))
    build_cache(config, tmp_path / "cache", shard_items=4, progress=False)
    assert sorted(reads) == [f"{k:02d}.txt" for k in range(8)] and listings == [data]
    reads.clear()
    verify_cache(tmp_path / "cache")
    assert reads == []
    (data / "03.txt").write_text("the digit seven\n")  # an edited caption is still seen: its size changed
    with pytest.raises(CacheError, match=r"it now holds 16 files of \d+ bytes; the cache was built from 16 of"):
        verify_cache(tmp_path / "cache")
    assert reads == []


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_from_captioned_cache_matches_training_on_images(kl_path, captioned_folder, tiny_bert, tmp_path):
    from ditkit.sampling import generate
    from ditkit.text import TextEmbeddingCache
    from ditkit.train import load_model, train

    config = resolve_autoencoder(text_latent_config(kl_path, captioned_folder, tiny_bert, tmp_path / "cached"))
    build_cache(config, tmp_path / "cache", shard_items=5, progress=False)
    from_cache = train(with_cache(config, str(tmp_path / "cache")), progress=False)
    from_images = train(text_latent_config(kl_path, captioned_folder, tiny_bert, tmp_path / "images"), progress=False)
    cached_losses, image_losses = _losses(tmp_path / "cached"), _losses(tmp_path / "images")
    assert len(cached_losses) == 2 and all(np.isfinite(cached_losses))
    # Same draws per sample (flips, posterior noise, t, caption dropout): the same losses up to float noise.
    np.testing.assert_allclose(cached_losses, image_losses, rtol=1e-4)
    assert sorted(TextEmbeddingCache(tmp_path / "text.safetensors").captions) == sorted(set(CAPTION_TEXTS))
    # Longer, from the cache alone: the loss falls (8 images, 5 captions, a 1-block model).
    longer = with_cache(config, str(tmp_path / "cache"))
    longer.train = dataclasses.replace(longer.train, steps=60, batch_size=8, lr=3e-3, out_dir=str(tmp_path / "long"))
    train(longer, progress=False)
    losses = _losses(tmp_path / "long")
    assert np.mean(losses[-15:]) < 0.5 * np.mean(losses[:15])
    model, saved = load_model(from_cache.checkpoint)
    assert saved.data.cache == str(tmp_path / "cache") and from_images.step == 2
    images = generate(model, saved, prompts=["top bar", "a bar"], steps=2, cfg_scale=2.0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_cache_without_captions_names_the_folder_and_the_fix(kl_path, image_folder, tiny_bert, tmp_path):
    from ditkit.train import train

    config = resolve_autoencoder(text_latent_config(kl_path, image_folder, tiny_bert, tmp_path / "run", "folder"))
    build_cache(config, tmp_path / "plain", shard_items=6, progress=False)
    assert read_manifest(tmp_path / "plain")["captions"] is None and CacheDataset(tmp_path / "plain").captions is None
    with pytest.raises(CacheError) as err:
        train(with_cache(config, str(tmp_path / "plain")), progress=False)
    message = str(err.value)
    assert f"data.cache={tmp_path / 'plain'} was built without captions" in message
    assert "data.dataset='folder'" in message and "ditkit cache" in message and "data.dataset=captions" in message


def test_interrupted_captioned_cache_resumes_to_identical_files(kl_path, captioned_folder, tmp_path, capsys):
    from ditkit.cli import main

    data = tmp_path / "data"  # a copy: its captions are edited below
    data.mkdir()
    for path in captioned_folder.iterdir():
        (data / path.name).write_bytes(path.read_bytes())

    def cache_cmd(out: Path) -> list[str]:
        return [
            "cache",
            "--out",
            str(out),
            "--shard-items",
            "3",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "data.dataset=captions",
            f"data.root={data}",
            "data.image_size=16",
            "data.channels=3",
            "model.num_classes=0",
            "model.text_dim=16",
            "autoencoder.kind=kl",
            f"autoencoder.path={kl_path}",
        ]

    assert main(cache_cmd(tmp_path / "whole")) == 0
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert sorted(whole) == ["cache.json", CAPTIONS, *(f"shard_{k:05d}.safetensors" for k in range(3))]
    # What a run killed after its first shard leaves: an incomplete manifest, one shard, a stray temp file,
    # and (killed right after writing the manifest) no captions file yet.
    out = tmp_path / "killed"
    out.mkdir()
    summary = ("complete", "num_shards", "latent_mean", "latent_std", "storage_error")
    settings = {k: v for k, v in json.loads(whole["cache.json"]).items() if k not in summary}
    (out / "cache.json").write_text(json.dumps({**settings, "complete": False}, indent=2) + "\n")
    (out / "shard_00000.safetensors").write_bytes(whole["shard_00000.safetensors"])
    (out / "shard_00001.safetensors.tmp").write_bytes(b"partial")
    with pytest.raises(CacheError, match="incomplete"):
        CacheDataset(out)
    assert main(cache_cmd(out)) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == whole
    assert CacheDataset(out).captions == list(dict.fromkeys(CAPTION_TEXTS))
    # Edited captions: a resumed run refuses the folder and changes nothing in it.
    (data / "03.txt").write_text("bottom bar\n")
    capsys.readouterr()
    assert main(cache_cmd(out)) == 2
    assert "holds a cache of other captions" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == whole
    # A captions file changed behind the cache's back is caught when reading.
    (out / CAPTIONS).write_bytes(whole[CAPTIONS].replace(b'"a bar"', b'"one"'))
    with pytest.raises(CacheError, match="sha256"):
        CacheDataset(out)
