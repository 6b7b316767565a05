"""A latent cache: encode a dataset once, keep the whole posterior of each image and of its mirror image.

Training a latent DiT re-encodes every image at every step unless latents are cached; but caching one
posterior draw of one (randomly flipped) view, as is common, freezes the augmentation and the VAE's
sampling noise for the whole run. This cache stores, per image, the posterior mean and log-variance
of the image *and* of its horizontal flip, so training draws a flip and a posterior sample on the fly
(`ditkit.data.sources.CachedBatches`) exactly as if it were encoding images.

Layout of a cache folder:
- `cache.json`: settings (autoencoder, data, dtype, shard size), `complete`, the dataset's `num_classes`
  (0 for unconditional data), fingerprints of the source files and of the autoencoder weights
  (`sources`, `autoencoder_weights`, see `verify_cache`), and when complete the per-channel latent
  statistics and the measured storage error;
- `shard_00000.safetensors`, ...: `shard_items` images each, a few hundred MB (not one file per image):
  `mean`, `logvar` (N, 2, C, h, w) (index 1 of dim 1 = flipped image) and `label` (N,); with uint8
  storage, `mean`/`logvar` are uint8 codes with per-(image, flip, channel) `*_lo` and `*_step`;
- `captions.json`, for captioned data only: the caption text of every item, in item order. The
  manifest's `captions` setting holds its SHA-256, so a resumed run refuses changed captions, and
  `label` holds each item's row in the deduplicated caption list (first-appearance order). A caption
  belongs to the image, not the view: both flips share it.

Interruption-safe: each shard is written to a temporary file and renamed into place, so a shard
either exists complete or not at all; a re-run skips finished shards and encodes the rest with the same
batch boundaries, so the files equal those of an uninterrupted run byte for byte. Readers refuse a
cache whose `cache.json` does not say `complete`.

Settings alone cannot tell that the images were replaced under the same names, or that other weights
were saved at the same autoencoder path: the cache would silently serve (or, resumed, mix in) latents
of the old ones. So the manifest also fingerprints the source file list (relative path, size, mtime)
and the autoencoder's weight files (content hash); a re-run or `verify_cache` refuses a mismatch. Each
fingerprint records the absolute folder it was taken at (`root`, and `path` for a local autoencoder):
a relative `data.root` or `autoencoder.path` means a folder of the directory `ditkit cache` ran in, so
a reader started elsewhere checks that folder, not what the same name means from its own directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..autoencoders import Autoencoder, build_autoencoder, resolve_autoencoder
from ..config import Config, config_to_dict
from ..utils.files import file_sha256
from .captions import item_caption
from .datasets import DataError, build_dataset, image_folder_samples, list_images

__all__ = [
    "CacheError",
    "CacheDataset",
    "CacheReport",
    "build_cache",
    "verify_cache",
    "source_fingerprint",
    "autoencoder_fingerprint",
    "read_manifest",
    "read_captions",
    "MANIFEST",
    "CAPTIONS",
    "BYTES_PER_VALUE",
]

log = logging.getLogger(__name__)

MANIFEST = "cache.json"
CAPTIONS = "captions.json"
_CAPTIONS_FORMAT = "ditkit-cache-captions-v1"
CACHE_VERSION = 1
BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "uint8": 1}
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I64": np.int64}
_DATA_KEYS = ("dataset", "root", "image_size", "channels", "holdout", "split_seed", "skip_bad_files")
_AE_KEYS = ("kind", "path", "subfolder", "latent_channels", "downsample")


class CacheError(DataError):
    """A cache folder is missing, incomplete or was built with other settings; the message says which."""


def _settings(config: Config, dtype: str, shard_items: int) -> dict:
    data, ae = config_to_dict(config.data), config_to_dict(config.autoencoder)
    return {
        "version": CACHE_VERSION,
        "autoencoder": {k: ae[k] for k in _AE_KEYS},
        "data": {k: data[k] for k in _DATA_KEYS},
        "dtype": dtype,
        "shard_items": shard_items,
    }


def _source_files(data: dict, dataset: Dataset | None = None) -> tuple[Path, list[Path]] | None:
    """(folder the names are relative to, every file the dataset `data` describes reads), decoding nothing.

    Lists the files itself, or takes the list `dataset` (built from `data`) made, so that `build_cache`
    lists them once. The two must agree, hence side by side. Reads no file, except a .csv/.jsonl caption
    list, which is the only place that names its images. None for the bundled MNIST digits, which have no
    files of the user's to change.
    """
    if data["dataset"] == "mnist":
        return None
    path = Path(data["root"])
    base = path if path.is_dir() else path.parent
    if data["dataset"] == "tar":
        from .tar import find_shards

        return base, list(dataset.shards) if dataset is not None else find_shards(path)
    if data["dataset"] == "captions":
        from .captions import read_caption_pairs

        if dataset is not None:
            images = list(dataset.paths)
        elif path.is_dir():  # as read_caption_pairs lists them, without reading the .txt captions
            images = list_images(path)
        else:
            images = [image for image, _ in read_caption_pairs(path)]
        texts = [image.with_suffix(".txt") for image in images] if path.is_dir() else [path]  # the captions' files
        return base, images + texts
    return base, list(dataset.files) if dataset is not None else [image for image, _ in image_folder_samples(path)[1]]


def _relative_name(file: Path, base: Path) -> str:
    """`file` relative to `base`, or its absolute path where it has none (Windows: another drive, which a
    caption list may name; os.path.relpath raises there)."""
    try:
        return os.path.relpath(file, base)
    except ValueError:
        return str(Path(file).absolute())


def source_fingerprint(data: dict, dataset: Dataset | None = None) -> dict | None:
    """Fingerprint of the files `data` (the manifest's `data` settings) reads: names, sizes, mtimes.

    Two digests, so a mismatch can say whether names/sizes changed or only modification times (files
    edited in place, or copied without keeping their times), and `root`, the absolute folder they were
    taken at. Stats every file and reads none: the caption .txt files of a captioned folder count by
    size and time like the images (their text is hashed into the manifest's `captions` when building),
    so checking a cache costs no more for captioned data. The one exception is a .csv/.jsonl caption
    list, read for the images it names. `dataset`: the dataset built from `data`, whose file list is used
    instead of listing the files again. None for bundled data.
    """
    listed = _source_files(data, dataset)
    if listed is None:
        return None
    base, files = listed
    names_sizes, full, total = hashlib.sha256(), hashlib.sha256(), 0
    for file in files:
        stat = file.stat()
        name = os.fsencode(_relative_name(file, base))
        names_sizes.update(b"%s\0%d\n" % (name, stat.st_size))
        full.update(b"%s\0%d\0%d\n" % (name, stat.st_size, stat.st_mtime_ns))
        total += stat.st_size
    return {
        "root": str(Path(data["root"]).absolute()),
        "files": len(files),
        "bytes": total,
        "names_sizes_sha256": names_sizes.hexdigest(),
        "sha256": full.hexdigest(),
    }


def _autoencoder_folder(ae: dict) -> Path | None:
    """The local folder holding the autoencoder `ae` (kind/path/subfolder) names; None if not on this machine."""
    local = Path(ae["path"]).expanduser()
    if not local.exists():
        try:  # a hub id: its snapshot in the Hugging Face cache, never downloaded here
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(ae["path"], local_files_only=True))
        except Exception:  # not cached, or not a valid id: nothing to fingerprint on this machine
            return None
    folder = local / ae["subfolder"] if ae.get("subfolder") else local
    return folder if folder.is_dir() else None


def autoencoder_fingerprint(ae: dict) -> dict | None:
    """SHA-256 of the autoencoder's weight files (content, so copies match); None when they are not found.

    Only the weights diffusers loads by default (`diffusion_pytorch_model.safetensors`, else `.bin`), so
    e.g. an added fp16 variant does not count as a change; config.json is left out because its settings
    are compared already and re-saving it rewrites `_diffusers_version`. Reads ~0.3 s per 300 MB. For a
    local folder, `path` is its absolute path (a hub id is looked up again by id, so a new revision counts).

    Not `ditkit.text.encoder_fingerprint`, on purpose: a mismatch here refuses the cache (an hours-long
    rebuild), so a false alarm must not come from file times or a rewritten config.json, while a text
    encoder's mismatch only re-encodes captions, and its tokenizer files count too.
    """
    folder = _autoencoder_folder(ae)
    if folder is None:
        return None
    files = [folder / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
    files = [f for f in files if f.is_file()][:1] or sorted(
        f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()
    )
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(b"%s\0%s\n" % (file.name.encode(), file_sha256(file).encode()))
    local = Path(ae["path"]).expanduser()
    where = {"path": str(local.absolute())} if local.exists() else {}
    return {**where, "files": [f.name for f in files], "sha256": digest.hexdigest()}


_REBUILD = (
    "build a new cache into another folder with `ditkit cache --out NEW`, or delete {path} yourself and rebuild it"
)


def _where(setting: str, value: str, built: dict, now: dict, field: str) -> str:
    """`setting=value`, plus the absolute folder `now` was taken at (`field`) where it says more than `value`."""
    at = now.get(field)
    if at is None or at == value:
        return f"{setting}={value}"
    if field not in built:  # a cache from before the folder was recorded: relative to the current one
        return f"{setting}={value} (at {at}, from the current folder: this cache does not record where it was built)"
    return f"{setting}={_shown(value, at)}"


def _fingerprint_mismatch(
    key: str, built: dict, now: dict, manifest: dict, path: Path, times_only_warn: bool = False
) -> str | None:
    """What changed between the fingerprint `built` (in the manifest) and `now`, or None if nothing.

    `times_only_warn`: where only the images' modification times differ, log a warning and return None.
    """
    if built.get("sha256") == now.get("sha256"):
        return None
    if key == "autoencoder_weights":
        ae = manifest["autoencoder"]
        where = _where("autoencoder.path", ae["path"], built, now, "path")
        where += f" (subfolder {ae['subfolder']!r})" if ae.get("subfolder") else ""
        return (
            f"the autoencoder weights at {where} changed since the cache {path} was encoded "
            f"(sha256 of {', '.join(now['files'])} is {now['sha256'][:12]}..., was {built['sha256'][:12]}...)"
        )
    root = _where("data.root", manifest["data"]["root"], built, now, "root")
    if (built["files"], built["bytes"]) != (now["files"], now["bytes"]):
        what = (
            f"it now holds {now['files']} files of {now['bytes']} bytes; "
            f"the cache was built from {built['files']} of {built['bytes']}"
        )
    elif built["names_sizes_sha256"] != now["names_sizes_sha256"]:
        what = "file names or sizes differ (the count and total size are the same)"
    else:
        what = (
            "file names and sizes are unchanged but modification times differ: files were edited in place, or "
            "copied without keeping their times (`cp -r` instead of `cp -a` / `rsync -a`)"
        )
        if times_only_warn:
            log.warning("the images under %s may have changed since the cache %s was built: %s; "
                        "training on its latents as they are", root, path, what)  # fmt: skip
            return None
    return f"the images under {root} changed since the cache {path} was built: {what}"


def _check_fingerprints(path: Path, manifest: dict, now: dict[str, dict | None], times_only_warn: bool = False) -> None:
    """CacheError naming every fingerprint in `now` that differs from the manifest's; warn where unknown."""
    if not all(key in manifest for key in now):  # written before fingerprints existed
        log.warning(
            "%s was built by an older ditkit that did not fingerprint its images and autoencoder weights: "
            "cannot check whether they changed since; rebuild the cache to enable the check",
            path,
        )
        return
    problems = []
    for key, value in now.items():
        if manifest[key] is not None and value is not None:
            try:
                problem = _fingerprint_mismatch(key, manifest[key], value, manifest, path, times_only_warn)
            except (KeyError, TypeError, AttributeError) as err:  # an entry edited by hand or cut short
                raise CacheError(
                    f"{path / MANIFEST}: its {key!r} entry is malformed ({type(err).__name__}: {err}); "
                    + _REBUILD.format(path=path)
                ) from None
            if problem:
                problems.append(problem)
    if problems:
        raise CacheError("; ".join(problems) + ". Its latents would be of the old files; " + _REBUILD.format(path=path))


def _recorded(fingerprint: object, field: str, configured: str, setting: str, path: Path, manifest: dict) -> str:
    """The folder to check: the absolute one a fingerprint recorded (`field`), else the manifest's setting
    `configured` (`setting`), read from the current folder.

    A recorded folder that is gone, where the relative `configured` reaches a folder from here that sits
    where the recorded one sat relative to the cache (`built_in`, the cache's folder when it was built),
    is the project moved or copied as a whole (the cache with its images, `rsync -a` to a node's scratch,
    say): that copy is checked, with a warning saying so, rather than the check being skipped. Any other
    folder of that name (the cache staged alone, under a folder that happens to share the name) is not
    taken for the images: the check is skipped, as for a recorded folder that is absent.
    """
    at = fingerprint.get(field) if isinstance(fingerprint, dict) else None
    if not isinstance(at, str):
        return configured
    built_in = manifest.get("built_in")
    if Path(at).exists() or Path(configured).is_absolute() or not isinstance(built_in, str):
        return at
    try:
        moved_whole = os.path.relpath(at, built_in) == os.path.relpath(Path(configured).absolute(), path.absolute())
    except ValueError:  # Windows: on different drives, so not where it was relative to the cache
        moved_whole = False
    if moved_whole and Path(configured).exists():
        log.warning(
            "%s=%s of the cache %s was at %s when the cache was built, which is gone; checking %s from the "
            "current folder instead (%s), which sits where it sat beside the cache (the project was moved)",
            setting, configured, path, at, configured, Path(configured).absolute(),
        )  # fmt: skip
        return configured
    return at


def _shown(configured: str, at: str) -> str:
    """A setting's value for messages, with the folder it was resolved to when that differs."""
    return configured if at == configured else f"{configured} (at {at})"


def verify_cache(path: str | Path, manifest: dict | None = None) -> None:
    """Refuse (CacheError) a cache whose source images or autoencoder weights changed since it was built.

    For readers (training from `data.cache`): compares the manifest's fingerprints with the files now
    at the folders its `data.root` and `autoencoder.path` named when it was built (recorded absolute, so
    the reader's current directory does not matter; caches from before that was recorded: relative to
    it). Either being absent on this machine (a cache copied to a node without the images) skips that
    check with an info message; a cache from an older ditkit without fingerprints loads with a warning.
    Stats every source image (seconds for ImageNet).
    """
    path = Path(path)
    manifest = read_manifest(path) if manifest is None else manifest
    now: dict[str, dict | None] = {"sources": None, "autoencoder_weights": None}
    if not all(key in manifest for key in now):
        _check_fingerprints(path, manifest, now)  # warns that an older cache cannot be checked
        return
    data, ae = manifest["data"], manifest["autoencoder"]
    if manifest["sources"] is not None:
        root = _recorded(manifest["sources"], "root", data["root"], "data.root", path, manifest)
        if not Path(root).exists():
            log.info("data.root=%s of the cache %s is not here: not checking whether its images changed",
                     _shown(data["root"], root), path)  # fmt: skip
        else:
            try:
                now["sources"] = source_fingerprint({**data, "root": root})
            except (DataError, OSError) as err:  # e.g. the folder now holds no shards, or a file vanished
                raise CacheError(
                    f"the images under data.root={_shown(data['root'], root)} changed since the cache {path} was "
                    f"built ({err}); " + _REBUILD.format(path=path)
                ) from err
    if manifest["autoencoder_weights"] is not None:
        at = _recorded(manifest["autoencoder_weights"], "path", ae["path"], "autoencoder.path", path, manifest)
        now["autoencoder_weights"] = autoencoder_fingerprint({**ae, "path": at})
        if now["autoencoder_weights"] is None:
            log.info("autoencoder.path=%s is not here: not checking whether its weights changed",
                     _shown(ae["path"], at))  # fmt: skip
    # Readers only warn where nothing but file times changed: a copy made without keeping them (`cp -r`,
    # routine when staging data on a node) would otherwise block training until an hours-long rebuild.
    # build_cache still refuses that case, since resuming it would mix latents of old and new files.
    _check_fingerprints(path, manifest, now, times_only_warn=True)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _item_captions(dataset: Dataset) -> list[str] | None:
    """Every item's caption text, in item order, for a captioned dataset (None: not captioned)."""
    if getattr(dataset, "captions", None) is None:
        return None
    return [item_caption(dataset, i) for i in range(len(dataset))]


def _captions_bytes(captions: list[str]) -> bytes:
    """The captions.json a cache of these per-item captions holds (deterministic, so resumes are byte-stable)."""
    body = {"format": _CAPTIONS_FORMAT, "num_items": len(captions), "captions": captions}
    return (json.dumps(body, ensure_ascii=False, indent=0) + "\n").encode("utf-8")


def read_captions(path: str | Path, manifest: dict) -> list[str] | None:
    """Per-item captions of a cache folder, checked against its manifest (None: built without captions)."""
    expected = manifest.get("captions")
    if expected is None:
        return None
    file = Path(path) / expected["file"]
    try:
        data = file.read_bytes()
    except OSError as err:
        raise CacheError(f"{file} is missing from the captioned cache {path}: run `ditkit cache` again") from err
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CacheError(f"{file} does not match the sha256 in {Path(path) / MANIFEST}: the caption file was changed")
    body = json.loads(data)
    if body.get("format") != _CAPTIONS_FORMAT or len(body.get("captions", [])) != manifest["num_items"]:
        raise CacheError(f"{file}: expected {manifest['num_items']} captions in format {_CAPTIONS_FORMAT}")
    return body["captions"]


def read_manifest(path: str | Path) -> dict:
    """The cache.json of a cache folder (ConfigError-style CacheError when absent or unreadable)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise CacheError(f"{path} is not a ditkit latent cache (no {MANIFEST}); build one with `ditkit cache`")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{file} is not valid JSON: {err}") from err


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes of (N, 2, C, h, w) with an affine map per (N, 2, C): x ~ lo + code * step."""
    flat = x.flatten(3)
    lo, hi = flat.amin(-1), flat.amax(-1)
    step = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(lo))
    codes = ((flat - lo[..., None]) / step[..., None]).round().clamp(0, 255).to(torch.uint8)
    return codes.reshape(x.shape), lo, step


def _dequantize(codes: np.ndarray, lo: np.ndarray, step: np.ndarray) -> np.ndarray:
    return lo[..., None, None] + codes.astype(np.float32) * step[..., None, None]


def _store(name: str, x: torch.Tensor, dtype: str, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Add `x` to the shard's tensors in the storage dtype; returns what a reader will get back."""
    if dtype == "fp32":
        out[name] = x.contiguous()
        return x
    if dtype == "fp16":
        out[name] = x.half().contiguous()
        return out[name].float()
    codes, lo, step = _quantize(x)
    out[name], out[name + "_lo"], out[name + "_step"] = codes.contiguous(), lo.contiguous(), step.contiguous()
    return torch.from_numpy(_dequantize(codes.numpy(), lo.numpy(), step.numpy()))


@dataclass
class CacheReport:
    """What `build_cache` did and what the cache holds."""

    path: Path
    num_items: int
    num_shards: int
    shards_written: int
    bytes_per_image: float
    latent_shape: tuple[int, int, int]
    manifest: dict


def _shard_path(root: Path, k: int) -> Path:
    return root / f"shard_{k:05d}.safetensors"


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


_REPAIR = "copy it again from where the cache was built, or run the same `ditkit cache` command again to re-encode it"


def _shard_layout(path: Path) -> tuple[int, dict]:
    """(byte where the tensor data starts, header) of a shard whose header and length agree, else CacheError.

    A truncated copy (an interrupted rsync) keeps an intact header; only its length gives it away, and
    np.memmap would then fail with a bare "mmap length is greater than file size".
    """
    try:
        size = path.stat().st_size
        start, header = _safetensors_header(path)
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = (int(offset) for offset in info["data_offsets"])
            nbytes = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_NP_DTYPES[info["dtype"]]).itemsize
            if stop - begin != nbytes:
                raise ValueError(f"tensor {name!r} spans {stop - begin} bytes, expected {nbytes} for its shape")
            end = max(end, stop)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as err:
        # json and UTF-8 decoding errors are ValueErrors; a header that is not a mapping, AttributeError
        raise CacheError(f"{path}: unreadable shard header ({type(err).__name__}: {err}); {_REPAIR}") from err
    if start + end > size:
        raise CacheError(
            f"{path}: {size} bytes, but its header says its tensors end at byte {start + end}: the shard is "
            f"truncated (an interrupted copy?); {_REPAIR}"
        )
    return start, header


def _shard_is_complete(path: Path, count: int) -> bool:
    try:
        _, header = _shard_layout(path)  # a truncated shard is encoded again
        return int(json.loads(header["__metadata__"]["ditkit_cache"])["count"]) == count
    except (OSError, ValueError, KeyError, struct.error):  # CacheError is a ValueError
        return False


@torch.no_grad()
def _encode_shard(
    ae: Autoencoder, dataset: Dataset, start: int, stop: int, batch_size: int, dtype: str, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    means, logvars, labels = [], [], []
    for b in range(start, stop, batch_size):
        items = [dataset[i] for i in range(b, min(b + batch_size, stop))]
        images = torch.stack([img for img, _ in items]).to(device)
        labels += [int(label) for _, label in items]
        both = torch.cat([images, images.flip(-1)])  # one encoder call for the images and their mirrors
        dist = ae.encode_distribution(both)
        n = len(items)
        means.append(torch.stack([dist.mean[:n], dist.mean[n:]], 1).float().cpu())  # (n, 2, C, h, w)
        if dist.logvar is not None:
            logvars.append(torch.stack([dist.logvar[:n], dist.logvar[n:]], 1).float().cpu())
    tensors: dict[str, torch.Tensor] = {"label": torch.tensor(labels, dtype=torch.int64)}
    mean = torch.cat(means)
    stored_mean = _store("mean", mean, dtype, tensors)
    err = (stored_mean - mean).double()
    stats = {
        "sum_mean": mean.double().sum((0, 1, 3, 4)).tolist(),
        "sum_mean_sq": mean.double().pow(2).sum((0, 1, 3, 4)).tolist(),
        "max_err_mean": float(err.abs().max()),
        "sq_err_mean": float(err.pow(2).sum()),
    }
    if logvars:
        logvar = torch.cat(logvars)
        stored_logvar = _store("logvar", logvar, dtype, tensors)
        std = torch.exp(0.5 * logvar.double())
        err_std = torch.exp(0.5 * stored_logvar.double()) - std
        stats.update(
            sum_var=torch.exp(logvar.double()).sum((0, 1, 3, 4)).tolist(),
            max_err_logvar=float((stored_logvar - logvar).abs().max()),
            sq_err_std=float(err_std.pow(2).sum()),
            sum_std=float(std.sum()),
            sq_err_mean_over_std=float((err / std).pow(2).sum()),
        )
    return tensors, stats


def build_cache(
    config: Config,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    shard_items: int | None = None,
    shard_mb: float = 256.0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    autoencoder: Autoencoder | None = None,
    progress: bool = True,
) -> CacheReport:
    """Encode `config.data` through `config.autoencoder` into a sharded cache at `out_dir` (resumable).

    Re-running on a partly written cache continues it; a cache built with other settings, or from
    images or autoencoder weights that changed since (see `verify_cache`), is never touched (CacheError
    names what differs).
    """
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"cache dtype must be one of {', '.join(BYTES_PER_VALUE)}, got {dtype!r}")
    if shard_items is not None and shard_items < 1:
        raise ValueError(f"shard_items (--shard-items) must be at least 1, got {shard_items}")
    if not shard_mb > 0:
        raise ValueError(f"shard_mb (--shard-mb) must be above 0, got {shard_mb}")
    if batch_size < 1:
        raise ValueError(f"batch_size (--batch-size) must be at least 1, got {batch_size}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"out_dir (--out) {out_dir} is a file, not a folder; choose a new or empty folder")
    if config.autoencoder.kind == "pixel":
        raise CacheError("autoencoder.kind='pixel' trains on images directly; a latent cache needs 'kl' or 'tiny'")
    config = resolve_autoencoder(config)
    device = torch.device(device)
    ae = autoencoder if autoencoder is not None else build_autoencoder(config, device=device)
    dataset = build_dataset(config.data, "train")
    c, (h, w) = ae.latent_channels, (side // ae.downsample for side in config.data.image_hw)
    has_logvar = config.autoencoder.kind == "kl"
    per_value = BYTES_PER_VALUE[dtype]
    bytes_per_image = 2 * c * h * w * per_value * (2 if has_logvar else 1)
    if dtype == "uint8":
        bytes_per_image += 2 * c * 8 * (2 if has_logvar else 1)  # lo and step, float32 each
    bytes_per_image += 8  # the label
    if shard_items is None:
        shard_items = max(1, int(shard_mb * 2**20 // bytes_per_image))
    out = Path(out_dir)
    settings = _settings(config, dtype, shard_items)
    num_items = len(dataset)
    captions = _item_captions(dataset)
    captions_file = None if captions is None else _captions_bytes(captions)
    settings.update(
        num_items=num_items,
        latent_shape=[c, h, w],
        has_logvar=has_logvar,
        # None for uncaptioned data (also what caches from before captions were cached read as).
        captions=None
        if captions is None
        else {"file": CAPTIONS, "unique": len(set(captions)), "sha256": hashlib.sha256(captions_file).hexdigest()},
    )
    fingerprints = {
        "sources": source_fingerprint(settings["data"], dataset),  # the files the dataset listed, not listed again
        "autoencoder_weights": autoencoder_fingerprint(settings["autoencoder"]),
    }
    # The dataset's own count, not the largest label + 1: a flat folder is unconditional (0 classes, every
    # label 0) and empty trailing class folders still count. Kept out of `settings`, so that caches from
    # before it was recorded still resume (they keep lacking it, like fingerprints: see CacheDataset).
    classes = {"num_classes": 0 if captions is not None else int(dataset.num_classes)}  # captions are not classes
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        for key, value in settings.items():
            if key == "captions" and manifest.get(key) != value:
                raise CacheError(
                    f"{out} holds a cache of other captions ({CAPTIONS} in it: {manifest.get(key)!r}; the data "
                    f"now gives {value!r}): were caption files edited? choose another folder (left untouched)"
                )
            if manifest.get(key) != value:
                raise CacheError(
                    f"{out} holds a cache built with {key}={manifest.get(key)!r}, not {value!r}; "
                    "choose another folder (the existing cache is left untouched)"
                )
        # A resumed run must not append latents of other images or weights to the shards already written,
        # nor may a re-run report an outdated complete cache as up to date.
        _check_fingerprints(out, manifest, fingerprints)
        if "num_classes" in manifest and manifest["num_classes"] != classes["num_classes"]:
            # The files are unchanged (fingerprints), but a class folder was added or removed: labels moved.
            raise CacheError(
                f"{out} holds a cache of {manifest['num_classes']} classes, but data.root={settings['data']['root']} "
                f"now has {classes['num_classes']} (a class folder added or removed?); choose another folder "
                "(the existing cache is left untouched)"
            )
        # Keep what the manifest says: an older cache stays unfingerprinted and an unknown (None) one stays
        # unknown, since shards already written may predate any check.
        fingerprints = {key: manifest[key] for key in fingerprints if key in manifest}
        classes = {key: manifest[key] for key in classes if key in manifest}
    else:
        if out.exists() and any(out.iterdir()):
            raise CacheError(f"{out} exists and is not a ditkit cache; choose an empty or new folder")
        out.mkdir(parents=True, exist_ok=True)
        # built_in: where the cache was written, so that a reader can tell a project moved whole (see _recorded)
        manifest = {**settings, **fingerprints, **classes, "built_in": str(out.absolute()), "complete": False}
        _write_json_atomic(out / MANIFEST, manifest)
    for stale in out.glob("*.tmp"):  # left by a killed run; never read
        stale.unlink()
    if captions_file is not None and not (
        (out / CAPTIONS).is_file() and (out / CAPTIONS).read_bytes() == captions_file
    ):  # written after the manifest, so a run killed in between left a folder that is still resumable
        tmp = out / (CAPTIONS + ".tmp")
        tmp.write_bytes(captions_file)
        os.replace(tmp, out / CAPTIONS)
    num_shards = math.ceil(num_items / shard_items)
    written = 0
    bar = tqdm(total=num_items, desc="caching latents", unit="img", disable=not progress, dynamic_ncols=True)
    for k in range(num_shards):
        start, stop = k * shard_items, min((k + 1) * shard_items, num_items)
        path = _shard_path(out, k)
        if path.exists() and _shard_is_complete(path, stop - start):
            bar.update(stop - start)
            continue
        tensors, stats = _encode_shard(ae, dataset, start, stop, batch_size, dtype, device)
        # One metadata key: safetensors does not keep the order of several, and shards must be byte-stable.
        metadata = {"ditkit_cache": json.dumps({"first": start, "count": stop - start, "stats": stats})}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        written += 1
        bar.update(stop - start)
        if os.environ.get("DITKIT_TEST_CACHE_SHARD_DELAY"):  # lets tests kill a run between shards
            import time

            time.sleep(float(os.environ["DITKIT_TEST_CACHE_SHARD_DELAY"]))
    bar.close()
    if not manifest.get("complete"):
        summary = _summarize(out, num_shards, c)
        where = {"built_in": manifest["built_in"]} if "built_in" in manifest else {}  # as first written
        manifest = {
            **settings,
            **fingerprints,
            **classes,
            **where,
            "complete": True,
            "num_shards": num_shards,
            **summary,
        }
        _write_json_atomic(out / MANIFEST, manifest)
        log.info("latent cache %s complete: %d images in %d shards", out, num_items, num_shards)
    return CacheReport(out, num_items, num_shards, written, bytes_per_image, (c, h, w), manifest)


def _summarize(out: Path, num_shards: int, channels: int) -> dict:
    """Per-channel latent statistics and the storage error, aggregated from every shard's metadata."""
    totals: dict[str, np.ndarray | float] = {}
    values = 0
    for k in range(num_shards):
        _, header = _safetensors_header(_shard_path(out, k))
        meta = json.loads(header["__metadata__"]["ditkit_cache"])
        stats = meta["stats"]
        values += int(meta["count"]) * 2 * int(np.prod(header["mean"]["shape"][2:]))
        for key, value in stats.items():
            value = np.asarray(value, dtype=np.float64)
            if key.startswith("max_"):
                totals[key] = max(float(totals.get(key, 0.0)), float(value))
            else:
                totals[key] = totals.get(key, 0.0) + value
    per_channel = values / channels
    mean = totals["sum_mean"] / per_channel
    second = totals["sum_mean_sq"] / per_channel + (totals["sum_var"] / per_channel if "sum_var" in totals else 0.0)
    std = np.sqrt(np.maximum(second - mean**2, 1e-12))
    error = {"max_abs_mean": totals["max_err_mean"], "rms_mean": math.sqrt(totals["sq_err_mean"] / values)}
    if "sum_var" in totals:
        error.update(
            max_abs_logvar=totals["max_err_logvar"],
            rms_std=math.sqrt(totals["sq_err_std"] / values),
            mean_posterior_std=float(totals["sum_std"] / values),
            rms_mean_over_posterior_std=math.sqrt(totals["sq_err_mean_over_std"] / values),
        )
    return {"latent_mean": mean.tolist(), "latent_std": std.tolist(), "storage_error": error}


def _memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only numpy memmap (no copy into memory)."""
    start, header = _shard_layout(path)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, _ = info["data_offsets"]
        try:
            arrays[name] = np.memmap(
                path, _NP_DTYPES[info["dtype"]], "r", offset=start + begin, shape=tuple(info["shape"])
            )
        except (OSError, ValueError) as err:  # e.g. shortened since its header was checked
            raise CacheError(f"{path}: cannot map tensor {name!r} ({type(err).__name__}: {err}); {_REPAIR}") from err
    return arrays


class CacheDataset(Dataset):
    """A complete latent cache as a dataset; a batch is ((mean, logvar or None) (N, 2, C, h, w), labels).

    Shards are memory-mapped, so a cache larger than RAM reads only the rows a batch asks for. A cache
    of captioned data has `captions` (the unique captions) and its labels are rows of that list, as in
    `CaptionedImageDataset`; otherwise `captions` is None.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise CacheError(f"{self.path} is an incomplete cache (interrupted?): run `ditkit cache` again to finish")
        self.shard_items = int(self.manifest["shard_items"])
        self.num_items = int(self.manifest["num_items"])
        self.dtype = self.manifest["dtype"]
        self._shards: list[dict[str, np.ndarray]] | None = None
        labels = np.concatenate([self._arrays(k)["label"] for k in range(self.manifest["num_shards"])])
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self._num_classes = self.manifest.get("num_classes")
        if self._num_classes is None and self.manifest.get("captions") is None:
            self._num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
            log.warning(
                "%s was built by an older ditkit that did not record its dataset's number of classes: assuming "
                "%d (the largest label + 1), which is 1 for an unconditional (flat folder or unlabelled tar) "
                "dataset and misses empty trailing class folders; rebuild the cache to record it",
                self.path,
                self._num_classes,
            )
        self.captions: list[str] | None = None
        item_captions = read_captions(self.path, self.manifest)
        if item_captions is not None:
            self.captions = list(dict.fromkeys(item_captions))
            row = {text: i for i, text in enumerate(self.captions)}
            if [row[text] for text in item_captions] != self.labels.tolist():
                raise CacheError(f"{self.path}: the shards' caption rows disagree with {CAPTIONS}; rebuild the cache")

    def _arrays(self, k: int) -> dict[str, np.ndarray]:
        if self._shards is None:
            self._shards = [{} for _ in range(self.manifest["num_shards"])]
        if not self._shards[k]:
            path = _shard_path(self.path, k)
            if not path.is_file():
                raise CacheError(f"{path} is missing from the cache")
            self._shards[k] = _memmap_safetensors(path)
        return self._shards[k]

    def __getstate__(self) -> dict:  # memmaps are reopened in worker processes
        return {**self.__dict__, "_shards": None}

    @property
    def num_classes(self) -> int:
        if self.captions is not None:  # captions are not classes
            return 0
        return self._num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])

    def __len__(self) -> int:
        return self.num_items

    def _read(self, name: str, shard: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        if self.dtype == "uint8":
            return _dequantize(shard[name][rows], shard[name + "_lo"][rows], shard[name + "_step"][rows])
        return shard[name][rows].astype(np.float32)

    def __getitems__(self, indices: list[int]) -> tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        c, h, w = self.latent_shape
        mean = np.empty((len(idx), 2, c, h, w), np.float32)
        logvar = np.empty_like(mean) if self.manifest["has_logvar"] else None
        shard_of = idx // self.shard_items
        for k in np.unique(shard_of):
            where = np.nonzero(shard_of == k)[0]
            rows = idx[where] - k * self.shard_items
            order = np.argsort(rows)  # memmap reads are fastest in file order
            shard = self._arrays(int(k))
            mean[where[order]] = self._read("mean", shard, rows[order])
            if logvar is not None:
                logvar[where[order]] = self._read("logvar", shard, rows[order])
        moments = (torch.from_numpy(mean), None if logvar is None else torch.from_numpy(logvar))
        return moments, self.labels[torch.from_numpy(idx)]

    def __getitem__(self, index: int):
        (mean, logvar), labels = self.__getitems__([index])
        return (mean[0], None if logvar is None else logvar[0]), int(labels[0])
