"""Images in (ADM-format .npz files, image folders, tensors) -> feature sets and reference statistics out.

A feature network maps a uint8 (N, C, H, W) batch to named features: 'pool' (FID and precision/
recall), optionally 'spatial' (sFID) and 'logits' (Inception Score, class accuracy). Two are built in:
the FID Inception-v3 (`ditkit.evaluation.inception`) and the digit classifier, which needs no download
and judges the bundled digits (classifier-feature FID, as in e.g. the MNIST experiments of the FID paper).

Image files are read in batches: an .npz is streamed member by member from its zip archive, so a
50,000-image 256 px file (~10 GB) never has to fit in memory.
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import DataError
from ..data.datasets import IMAGE_EXTENSIONS, _open_image, list_images
from ..distributed import tf32
from .inception import SPATIAL_DIM
from .metrics import FeatureStats

if TYPE_CHECKING:
    from ..data.cache import CacheDataset

__all__ = [
    "FeatureNet",
    "InceptionFeatures",
    "ClassifierFeatures",
    "NpzReader",
    "npz_array_info",
    "folder_images",
    "iter_folder_images",
    "iter_cache_images",
    "cache_image_size",
    "is_latent_cache",
    "rgb_to_gray",
    "compute_features",
    "reference_from_features",
    "reference_from_source",
    "save_reference",
    "REFERENCE_KIND_KEY",
    "REFERENCE_NET_KEY",
    "feature_net_id",
    "check_reference_net",
]

REFERENCE_KIND_KEY = "ditkit_features"
"""Key of a reference .npz that names the feature network its statistics came from."""
REFERENCE_NET_KEY = "ditkit_feature_net"
"""Which network of its kind made a reference (a digit judge's weights): statistics of one judge do not
compare with another's, so `evaluate_npz` refuses the mix. Absent for Inception (one standard network)."""

FeatureNet = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""uint8 (N, C, H, W) images -> {'pool': (N, D), optionally 'spatial' and 'logits'}; has `.kind`."""


class InceptionFeatures:
    """The FID Inception-v3 as a FeatureNet (grayscale images are repeated to RGB)."""

    kind = "inception"
    feature_dim = 2048
    """Width of the 'pool' features: the FID graph's pool_3 (fixed by FID's definition, whatever the weights)."""
    spatial_dim = SPATIAL_DIM
    """Width of the 'spatial' (sFID) features: ADM's first 7 channels of mixed_6/conv, 7 * 17 * 17."""

    def __init__(self, network: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        self.network, self.device = network.to(device).eval(), torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with tf32(self.device, False):  # full fp32 on a GPU too: statistics must not depend on the device
            return self.network(x)


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> uint8 gray (N, 1, H, W), exactly as PIL's `Image.convert("L")`.

    ITU-R 601-2 luma in PIL's fixed point, L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, so RGB images
    read from a folder, an .npz or a model's samples all reach a 1-channel judge as the same gray
    images that a 1-channel dataset (PIL "L") would have given; gray pixels (R = G = B) stay unchanged.
    """
    x = images.to(torch.int32)
    gray = (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + (1 << 15)) >> 16  # (N, 1, H, W)
    return gray.to(torch.uint8)


class ClassifierFeatures:
    """A DigitClassifier as a FeatureNet: 'pool' = its pooled features, 'logits' = its class logits."""

    kind = "classifier"

    def __init__(
        self,
        classifier: torch.nn.Module,
        device: str | torch.device = "cpu",
        image_hw: tuple[int, int] | None = None,
    ) -> None:
        """`image_hw`: the (H, W) the judge was trained at, when known; other sizes are refused (it pools
        globally, so it would run on them, giving features unrelated to those of its own size)."""
        self.classifier, self.device = classifier.to(device).eval(), torch.device(device)
        self.image_hw = None if image_hw is None else tuple(image_hw)

    @property
    def feature_dim(self) -> int:
        """Width of the 'pool' features."""
        return self.classifier.feature_dim

    @functools.cached_property
    def net_id(self) -> str:
        """Which judge this is (`feature_net_id`): a hash of its weights, computed once."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.classifier.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return "classifier:" + digest.hexdigest()[:16]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        want = self.classifier.config.in_channels
        if images.shape[1] != want:
            if want == 1 and images.shape[1] == 3:
                images = rgb_to_gray(images)  # the one RGB -> gray conversion of every image source
            else:
                raise ValueError(f"the classifier takes {want}-channel images, got {images.shape[1]} channels")
        if self.image_hw is not None and tuple(images.shape[2:]) != self.image_hw:
            (h, w), (jh, jw) = images.shape[2:], self.image_hw
            raise DataError(
                f"the digit judge was trained on {jw}x{jh} px images, got {w}x{h} px: the samples and the "
                "reference must both be at the judge's size (it follows the samples' size)"
            )
        x = images.to(self.device).float() / 127.5 - 1  # (N, C, H, W) in [-1, 1], as the classifier trained
        with tf32(self.device, False):  # full fp32 on a GPU too, as for Inception
            feats = self.classifier.features(x)
            return {"pool": feats, "logits": self.classifier.head(feats)}


class NpzReader:
    """An .npz file opened once: its array names, array headers, streamed image batches and whole arrays.

    Every read of an .npz goes through it (`npz_array_info` for a one-off header read); a caller that
    reads several things of one file (`evaluate_npz`) keeps it open. Use it as a context manager; errors
    are DataErrors that name the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
            self.keys = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"{path}: not a readable .npz file ({err})") from err

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _check_key(self, key: str) -> None:
        if key not in self.keys:
            raise DataError(f"{self.path}: no array {key!r} (has {', '.join(self.keys) or 'none'})")

    def array_info(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one array, read from its header only."""
        self._check_key(key)
        try:
            with self._zip.open(f"{key}.npy") as f:
                shape, _, dtype = _read_npy_header(f, self.path, key)
        except DataError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError) as err:  # numpy's header parser raises ValueError
            raise DataError(f"{self.path}: array {key!r} has no readable .npy header ({err})") from err
        return shape, dtype

    def iter_images(self, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
        """Yield (b, H, W, C) uint8 batches of an ADM-style image array without loading it whole."""
        self._check_key(key)
        with self._zip.open(f"{key}.npy") as f:
            shape, fortran, dtype = _read_npy_header(f, self.path, key)
            if dtype != np.uint8 or len(shape) != 4 or fortran or shape[-1] not in (1, 3):
                raise DataError(
                    f"{self.path}: {key} must be uint8 images (N, H, W, C) with C = 1 or 3 in C order, "
                    f"got {dtype} {shape}{' (Fortran order)' if fortran else ''}"
                )
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                buf = f.read(n * per_image)
                if len(buf) != n * per_image:
                    raise DataError(f"{self.path}: {key} is truncated at image {start}")
                yield np.frombuffer(bytearray(buf), np.uint8).reshape(n, *shape[1:])  # writable, for torch

    def read(self, key: str) -> np.ndarray:
        """One whole array (not pickled objects)."""
        self._check_key(key)
        with self._zip.open(f"{key}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)


def npz_array_info(path: str | Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an .npz, read from its header only."""
    with NpzReader(path) as npz:
        return npz.array_info(key)


def _read_npy_header(f, path: str | Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise DataError(f"{path}: array {key!r} has unsupported .npy version {version}")
    return shape, fortran, dtype


def folder_images(folder: str | Path) -> list[Path]:
    """The images an evaluation reads from `folder`: those training reads (`ditkit.data.list_images`: any
    depth, sorted, hidden files and folders such as `.ipynb_checkpoints` skipped); DataError if none."""
    files = list_images(Path(folder))
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def iter_folder_images(
    folder: str | Path, batch_size: int, channels: int = 3, files: list[Path] | None = None
) -> Iterator[np.ndarray]:
    """Yield (b, H, W, C) uint8 batches of the images under `folder` (`folder_images`, or `files` when the
    caller has listed them already)."""
    files = folder_images(folder) if files is None else files
    mode = "RGB" if channels == 3 else "L"
    size = None
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            arr = np.asarray(_open_image(path, mode), dtype=np.uint8)
            size = size or arr.shape[:2]
            if arr.shape[:2] != size:
                raise DataError(
                    f"{path}: is {arr.shape[1]}x{arr.shape[0]}, the folder's first image {size[1]}x{size[0]}"
                )
            batch.append(arr.reshape(*arr.shape[:2], channels))
        yield np.stack(batch)


def iter_cache_images(
    cache: str | Path | CacheDataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    indices: list[int] | None = None,
) -> tuple[int, Iterator[np.ndarray]]:
    """(count, (b, H, W, C) uint8 batches) of a latent cache's images: posterior means decoded by its VAE.

    `cache` is a cache folder or an open `CacheDataset`; `indices` picks items (default: all, in order).
    The unflipped view of every picked image is decoded on `device` with the autoencoder the cache was
    built with, so the reference is what that autoencoder can reproduce of the data (its reconstruction).
    """
    from ..autoencoders import build_autoencoder
    from ..config import AutoencoderConfig
    from ..data.cache import CacheDataset

    dataset = cache if isinstance(cache, CacheDataset) else CacheDataset(cache)
    picks = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    built = dataset.manifest["autoencoder"]
    ae = build_autoencoder(
        AutoencoderConfig(kind=built["kind"], path=built["path"], subfolder=built["subfolder"]), device=device
    )

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(picks), batch_size):
            (mean, _), _ = dataset.__getitems__(picks[start : start + batch_size])  # mean: (b, 2 flips, C, h, w)
            with torch.no_grad():
                images = ae.decode_raw(mean[:, 0].to(device)).clamp(-1, 1)
            yield ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    return len(picks), batches()


def cache_image_size(cache: str | Path) -> int:
    """Height of the images a latent cache was built from (its manifest's data.image_size)."""
    from ..data.cache import MANIFEST, CacheError, read_manifest

    manifest = read_manifest(cache)
    try:
        size = manifest["data"]["image_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CacheError(f"{Path(cache) / MANIFEST}: expected data.image_size (an int or [h, w]) ({err!r})") from err


def compute_features(
    net: FeatureNet,
    batches: Iterator[np.ndarray],
    total: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run `net` over (b, H, W, C) uint8 batches; returns each feature concatenated, float64 (N, D)."""
    out: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=total, desc=f"{getattr(net, 'kind', 'features')} features", unit="img", disable=not progress)
    for batch in batches:
        # A fresh NCHW tensor whatever the source's strides: the stride of a size-1 axis is free in numpy's
        # and PyTorch's contiguity checks, so a one-channel NHWC view of an NCHW tensor and the same images
        # read from a file look alike there, yet PyTorch picks other convolution kernels for the two
        # (features 1e-6 apart, FIDs 1e-6 relative). A uint8 copy per batch makes every route the same.
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # (b, C, H, W)
        x = x.clone(memory_format=torch.contiguous_format)
        for name, value in net(x).items():
            out.setdefault(name, []).append(value.detach().double().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    if not out:
        raise DataError("no images to compute features of")
    return {name: np.concatenate(parts) for name, parts in out.items()}


def feature_net_id(net: FeatureNet) -> str | None:
    """'classifier:<sha256 of its weights, 16 hex>' for a digit judge; None for Inception (always the same)."""
    return getattr(net, "net_id", None)


def reference_from_features(
    features: dict[str, np.ndarray], kind: str, net_id: str | None = None
) -> dict[str, np.ndarray]:
    """Reference statistics (mu/sigma, spatial mu_s/sigma_s, pool features) of computed features, with
    `net_id` (`feature_net_id` of the network that computed them) when given."""
    ref = {REFERENCE_KIND_KEY: np.array(kind), "pool": features["pool"].astype(np.float32)}
    if net_id is not None:
        ref[REFERENCE_NET_KEY] = np.array(net_id)
    stats = FeatureStats.from_features(features["pool"])
    ref["mu"], ref["sigma"] = stats.mu, stats.sigma
    if "spatial" in features:
        spatial = FeatureStats.from_features(features["spatial"])
        ref["mu_s"], ref["sigma_s"] = spatial.mu, spatial.sigma
    return ref


def is_latent_cache(path: str | Path) -> bool:
    """Whether `path` is a ditkit latent cache folder (it holds the cache manifest, cache.json)."""
    from ..data.cache import MANIFEST

    return (Path(path) / MANIFEST).is_file()


def reference_from_source(
    source: str | Path, net: FeatureNet, batch_size: int = 100, progress: bool = True
) -> dict[str, np.ndarray]:
    """Reference statistics from an image folder, a ditkit latent cache, an ADM .npz (arr_0 images and/or
    mu/sigma), or a saved file.

    Returns {'mu', 'sigma', optionally 'mu_s', 'sigma_s', 'pool' (features for precision/recall)}.
    Stored mu/sigma win over recomputing them from stored images, as in the ADM evaluator.
    """
    source = Path(source)
    kind = getattr(net, "kind", "inception")
    if is_latent_cache(source):  # decode its posterior means where the feature network runs
        n, batches = iter_cache_images(source, batch_size, device=getattr(net, "device", "cpu"))
        return reference_from_features(compute_features(net, batches, n, progress), kind, feature_net_id(net))
    if source.is_dir():
        # Read as RGB whatever the judge takes: a 1-channel judge converts to gray itself
        # (`rgb_to_gray`), the one conversion that .npz images and samples go through too.
        files = folder_images(source)
        if len(files) == 1:
            raise DataError(f"{source}: 1 image; reference statistics need at least 2 (a covariance)")
        feats = compute_features(net, iter_folder_images(source, batch_size, 3, files), len(files), progress)
        return reference_from_features(feats, kind, feature_net_id(net))
    if not source.is_file():
        raise DataError(f"reference {source}: no such file or folder")
    with NpzReader(source) as npz:
        keys = npz.keys
        stored_kind = str(npz.read(REFERENCE_KIND_KEY)) if REFERENCE_KIND_KEY in keys else "inception"
        if stored_kind != kind and ("mu" in keys or "pool" in keys):
            raise DataError(f"{source}: holds {stored_kind} statistics, but {kind} features were asked for")
        ref: dict[str, np.ndarray] = {}
        if "arr_0" in keys and not ("pool" in keys and "mu" in keys):
            shape, _ = npz.array_info("arr_0")
            if not shape or not shape[0]:
                raise DataError(f"{source}: arr_0 holds no images (shape {shape})")
            if shape[0] < 2:
                raise DataError(f"{source}: 1 image in arr_0; reference statistics need at least 2 (a covariance)")
            feats = compute_features(net, npz.iter_images(batch_size), shape[0], progress)
            ref = reference_from_features(feats, kind, feature_net_id(net))
        stored = [key for key in ("mu", "sigma", "mu_s", "sigma_s", "pool", REFERENCE_NET_KEY) if key in keys]
        ref.update({key: npz.read(key) for key in stored})
    if "mu" not in ref or "sigma" not in ref:
        raise DataError(f"{source}: a reference needs images (arr_0) or statistics (mu, sigma); has {keys}")
    ref[REFERENCE_KIND_KEY] = np.array(kind)
    return ref


def _ref_stats_hint(net: FeatureNet) -> str:
    """How to make a reference with `net`: the `ditkit ref-stats` command line of its kind."""
    if getattr(net, "kind", "inception") == "classifier":
        return "ditkit ref-stats IMAGES --out NEW.npz --features classifier --classifier JUDGE_FOLDER"
    return "ditkit ref-stats IMAGES --out NEW.npz [--inception-weights FILE] (Inception is the default --features)"


def check_reference_net(ref: dict[str, np.ndarray], net: FeatureNet, ref_name: str) -> None:
    """Refuse reference statistics that cannot score `net`'s features, before any sample is scored: ones
    without FID statistics (mu, sigma), another judge's (by the id the reference records,
    `REFERENCE_NET_KEY`), statistics of another width than `net`'s features (a reference made before
    judge ids existed, or by another network, e.g. a judge's against Inception), sFID statistics without
    their other half (mu_s without sigma_s or the reverse), or a covariance that is not (D, D) for its
    D-wide mean; these would otherwise fail only after every sample's features were computed, with a bare
    KeyError or shape error. `ref_name` (the reference's file) is named in the error."""
    if "mu" not in ref or "sigma" not in ref:
        raise DataError(
            f"the reference {ref_name} has no FID statistics: it needs 'mu' and 'sigma', and has "
            f"{', '.join(sorted(ref)) or 'nothing'}; make it with {_ref_stats_hint(net)}"
        )
    if ("mu_s" in ref) != ("sigma_s" in ref):
        has, lacks = ("mu_s", "sigma_s") if "mu_s" in ref else ("sigma_s", "mu_s")
        raise DataError(
            f"the reference {ref_name} has {has!r} but no {lacks!r}: sFID statistics need both (or neither, "
            f"for a reference without sFID); make it again with {_ref_stats_hint(net)}"
        )
    made_by, scoring = ref.get(REFERENCE_NET_KEY), feature_net_id(net)
    if made_by is not None and scoring is not None and str(made_by) != scoring:
        # Another judge's features live in another space: the FID would be meaningless, not just off.
        raise DataError(
            f"the reference {ref_name} was made with another digit judge ({made_by}) than the one scoring these "
            f"samples ({scoring}); make the reference with the same judge: {_ref_stats_hint(net)}"
        )
    expected = getattr(net, "feature_dim", None)
    expected_spatial = getattr(net, "spatial_dim", None)
    for key, want in (("mu", expected), ("pool", expected), ("mu_s", expected_spatial)):
        found = np.shape(ref[key])[-1:] if key in ref else (want,)
        if want is not None and found != (want,):
            width = f"{found[0]}-wide" if found else "scalar"
            raise DataError(
                f"the reference {ref_name} holds {width} {key!r} features, but the {getattr(net, 'kind', '')} "
                f"network scoring these samples gives {want}-wide ones: the reference was made by another "
                f"network; make it again with this one: {_ref_stats_hint(net)}"
            )
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mu_key not in ref:
            continue
        mu_shape, sigma_shape = np.shape(ref[mu_key]), np.shape(ref[sigma_key])
        if len(mu_shape) != 1:
            problem = f"{mu_key!r} of shape {mu_shape}; expected a 1-D mean of shape (D,)"
        elif sigma_shape != (mu_shape[0], mu_shape[0]):
            d = mu_shape[0]
            problem = (
                f"{mu_key!r} of shape {mu_shape} and {sigma_key!r} of shape {sigma_shape}; expected {sigma_key!r} "
                f"of shape ({d}, {d}), the covariance of those {d} features"
            )
        else:
            continue
        raise DataError(f"the reference {ref_name} holds {problem}; make it again with {_ref_stats_hint(net)}")


def save_reference(ref: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write reference statistics as an .npz (refuses to overwrite)."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists; choose a new file (nothing was written)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **ref)
    tmp.replace(path)
    return path
