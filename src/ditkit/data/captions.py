"""Captioned images for text-conditioned training: (image in [-1, 1], caption row).

Captions are deduplicated into `dataset.captions`; an item's second element is its caption's row in
that list (so a batch collates to a tensor and text embeddings are looked up once per unique caption).
Sources: a folder of images each with a same-name `.txt` caption (`cat.png` + `cat.txt`, the layout of
kohya/diffusers fine-tuning folders), or a `.csv` / `.jsonl` file of (image, caption) rows with image
paths relative to the file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .datasets import IMAGE_EXTENSIONS, DataError, TensorImageDataset, _open_image, image_to_tensor, list_images

__all__ = ["CaptionedImageDataset", "TensorCaptionDataset", "item_caption", "read_caption_pairs"]

_IMAGE_KEYS = ("image", "file_name", "path")
_CAPTION_KEYS = ("caption", "text")
_ENCODING = "utf-8-sig"
"""UTF-8 that drops a leading byte-order mark (Excel's "CSV UTF-8" and Notepad write one), which would
otherwise become part of the first CSV header ('\ufeffimage') or of a caption."""


def item_caption(dataset: Dataset, index: int) -> str:
    """The caption text of item `index` of a captioned dataset (one with `captions`, its caption table).

    The folder dataset keeps each item's row of the table as `caption_ids`; the tensor and latent-cache
    captioned datasets as their labels; any other captioned dataset (one's own, given to
    `train(dataset=...)`) gives the row as its items' label, which is all that training reads of it.
    """
    rows = getattr(dataset, "caption_ids", None)
    if rows is None:
        rows = getattr(dataset, "labels", None)
    row = dataset[index][1] if rows is None else rows[index]
    return dataset.captions[int(row)]


def _pick(row: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    raise DataError(f"{where}: no {' / '.join(repr(k) for k in keys)} value (keys: {', '.join(map(str, row))})")


def read_caption_pairs(root: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a captioned folder, a .csv or a .jsonl file."""
    root = Path(root)
    if root.is_dir():
        pairs = []
        for path in list_images(root):  # skips hidden files and folders, as image folders do
            text = path.with_suffix(".txt")
            if not text.is_file():
                raise DataError(f"{path} has no caption file {text.name} beside it")
            pairs.append((path, text.read_text(encoding=_ENCODING).strip()))
        if not pairs:
            raise DataError(f"captioned folder {root} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
        return pairs
    if not root.is_file():
        raise DataError(f"data.root={root}: no such captioned folder, .csv or .jsonl file")
    rows: list[tuple[str, dict]] = []
    if root.suffix.lower() == ".csv":
        with open(root, newline="", encoding=_ENCODING) as f:
            rows = [(f"{root} row {i + 2}", row) for i, row in enumerate(csv.DictReader(f))]
    elif root.suffix.lower() == ".jsonl":
        # One record per "\n": str.splitlines() would also split at U+2028, U+0085 and the like, which JSON
        # writes raw inside strings (json.dumps(..., ensure_ascii=False)). Text mode turns \r\n into \n.
        for i, line in enumerate(root.read_text(encoding=_ENCODING).split("\n")):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{root} line {i + 1}: not valid JSON ({err})") from err
            if not isinstance(row, dict):
                raise DataError(f"{root} line {i + 1}: expected an object with 'image' and 'caption'")
            rows.append((f"{root} line {i + 1}", row))
    else:
        raise DataError(f"data.root={root}: expected a folder, a .csv or a .jsonl file")
    pairs = []
    for where, row in rows:
        image = root.parent / _pick(row, _IMAGE_KEYS, where)
        if not image.is_file():
            raise DataError(f"{where}: image {image} does not exist")
        pairs.append((image, _pick(row, _CAPTION_KEYS, where)))
    if not pairs:
        raise DataError(f"{root} lists no (image, caption) rows")
    return pairs


def _index_captions(texts: list[str]) -> tuple[list[str], list[int]]:
    captions = list(dict.fromkeys(texts))
    row = {c: i for i, c in enumerate(captions)}
    return captions, [row[c] for c in texts]


class CaptionedImageDataset(Dataset):
    """Images read from disk with their captions (see `read_caption_pairs`), resized and center-cropped."""

    def __init__(self, root: str | Path, image_size: int | tuple[int, int], channels: int = 3) -> None:
        pairs = read_caption_pairs(root)
        self.paths = [p for p, _ in pairs]
        self.captions, self.caption_ids = _index_captions([c for _, c in pairs])
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return image_to_tensor(_open_image(self.paths[index], self.mode), self.image_size), self.caption_ids[index]


class TensorCaptionDataset(TensorImageDataset):
    """In-memory uint8 images (N, C, H, W) with one caption each."""

    def __init__(self, images: torch.Tensor, captions: list[str]) -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        unique, ids = _index_captions(list(captions))
        super().__init__(images, torch.tensor(ids, dtype=torch.long), unique)
        self.captions = unique

    @property
    def num_classes(self) -> int:  # captions are not classes
        return 0
