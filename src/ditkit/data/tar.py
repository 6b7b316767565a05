"""WebDataset-style .tar shards as a random-access dataset.

A shard is a plain (uncompressed) tar whose members are grouped by key as WebDataset groups them
(https://github.com/webdataset/webdataset#the-webdataset-format): the key is the member's folder plus
its file name up to the first dot, the extension everything after it, so `a/0001.jpg`, `a/0001.cls`
and `a/0001.seg.png` are the `jpg`, `cls` and `seg.png` of sample `a/0001`. A sample's image is its
member whose whole extension is one of IMAGE_EXTENSIONS (`png`, `jpg`, ...); members with a longer
extension (`seg.png`, `depth.png`: masks and other per-sample files) are not training images and are
ignored, as are members whose name has no extension. An optional `cls` member holds an integer class
label. Collections too large for a folder of files stay in a few big files; the member offsets are
indexed once, so any sample is one positioned read (what shuffled training needs), not a sequential
stream.

Forked DataLoader workers inherit the parent's open shard handles, and an inherited file shares its
offset with the parent and every sibling, so a seek in one worker followed by a read could return bytes
another worker seeked to. Members are therefore read with `os.pread`, which neither uses nor moves that
offset: a handle serves every process that inherits it (and every thread), so none is reopened. Only
pickling (spawn workers) drops the handles, which the new process then opens lazily for itself.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .datasets import IMAGE_EXTENSIONS, DataError, _open_image, image_to_tensor

__all__ = ["TarShardDataset", "find_shards"]

log = logging.getLogger(__name__)


def find_shards(root: str | Path) -> list[Path]:
    """`root` itself if it is a .tar file, else the sorted .tar files in the folder `root`."""
    root = Path(root)
    if root.is_file():
        if root.suffix != ".tar":
            raise DataError(f"{root} is not a .tar shard")
        return [root]
    if not root.is_dir():
        raise DataError(f"tar shard path {root} does not exist")
    shards = sorted(p for p in root.iterdir() if p.suffix == ".tar" and p.is_file())
    if not shards:
        raise DataError(f"{root} holds no .tar shards")
    return shards


def _key_and_extension(name: str) -> tuple[str | None, str]:
    """WebDataset's split of a member name: (folder + file name before its first dot, the rest).

    (None, '') where the file name has no dot or starts with one (WebDataset skips those members).
    """
    folder, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None, ""
    return folder + slash + stem, ext


class TarShardDataset(Dataset):
    """Samples of WebDataset-style shards: (image in [-1, 1] (C, size, size), label).

    Labels come from `.cls` members; when no sample has one the dataset is unconditional (num_classes
    0, every label 0); a mix is an error. With `skip_bad_files`, images that do not decode are checked
    up front, skipped and counted instead of raising an error naming shard and member.
    """

    def __init__(
        self, root: str | Path, image_size: int | tuple[int, int], channels: int = 3, skip_bad_files: bool = False
    ) -> None:
        self.shards = find_shards(root)
        self.image_size, self.mode = image_size, ("L" if channels == 1 else "RGB")
        # (shard index, image member offset, size, name, label or None)
        index: list[tuple[int, int, int, str, int | None]] = []
        imageless: list[str] = []  # image-like members of samples that have no image (shard:member)
        for shard_id, shard in enumerate(self.shards):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                with tarfile.open(shard, "r:") as tar:
                    for member in tar:
                        key, ext = _key_and_extension(member.name)
                        if member.isfile() and key is not None:
                            groups.setdefault(key, {})["." + ext.lower()] = member
                    labels = {}
                    for key, members in groups.items():
                        if ".cls" in members:
                            data = tar.extractfile(members[".cls"]).read()
                            try:
                                raw = data.decode().strip()
                                labels[key] = int(raw)
                            except UnicodeDecodeError as err:
                                raise DataError(
                                    f"{shard}: {members['.cls'].name} holds {data[:40]!r}, which is not UTF-8 text; "
                                    "expected an integer class label as text, e.g. b'3'"
                                ) from err
                            except ValueError as err:
                                raise DataError(
                                    f"{shard}: {members['.cls'].name} holds {raw!r}, expected an integer"
                                ) from err
            except tarfile.TarError as err:
                raise DataError(f"{shard}: not a readable tar file ({err})") from err
            for key in sorted(groups):
                images = [m for ext, m in groups[key].items() if ext in IMAGE_EXTENSIONS]
                if len(images) > 1:
                    names = ", ".join(m.name for m in images)
                    raise DataError(f"{shard}: sample {key!r} has {len(images)} images ({names}), expected one")
                if images:
                    index.append((shard_id, images[0].offset_data, images[0].size, images[0].name, labels.get(key)))
                else:  # e.g. only `0001.seg.png`: an image file, but not the sample's image
                    imageless += [
                        f"{shard}:{m.name}" for m in groups[key].values() if m.name.lower().endswith(IMAGE_EXTENSIONS)
                    ]
        hint = (
            f"; {len(imageless)} member(s) of samples without an image end like an image after a longer extension, "
            f"e.g. {imageless[0]}: a sample's image is <key> plus exactly one of {', '.join(IMAGE_EXTENSIONS)}"
            if imageless
            else ""
        )
        if not index:
            raise DataError(f"no images found in the tar shards under {root}{hint}")
        if imageless:
            log.warning("%s: ignored samples without an image%s", root, hint)
        with_label = sum(entry[4] is not None for entry in index)
        if 0 < with_label < len(index):
            raise DataError(f"{root}: {with_label} of {len(index)} samples have a .cls label; expected all or none")
        self.labeled = with_label > 0
        self._num_classes = max(entry[4] for entry in index) + 1 if self.labeled else 0
        self._files: dict[int, io.BufferedReader] = {}
        self.skipped_files: list[str] = []
        if skip_bad_files:
            good = []
            for i, entry in enumerate(index):
                try:
                    self._decode(entry)
                    good.append(entry)
                except DataError:
                    self.skipped_files.append(f"{self.shards[entry[0]]}:{entry[3]}")
            if self.skipped_files:
                log.warning("skipped %d unreadable image(s), first: %s", len(self.skipped_files), self.skipped_files[0])
            index = good
            if not index:
                raise DataError(f"{root}: every image was unreadable")
        self.index = index

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.index)

    def _read_member(self, shard_id: int, offset: int, size: int, name: str) -> bytes:
        """`size` bytes at `offset` of a shard, safe in forked workers and threads (see the module docstring)."""
        handle = self._files.get(shard_id)
        if handle is None:  # opened lazily: a shard nobody reads costs no descriptor
            handle = self._files[shard_id] = open(self.shards[shard_id], "rb")
        if hasattr(os, "pread"):  # positioned read: never moves nor reads the (possibly shared) offset
            data = os.pread(handle.fileno(), size, offset)
        else:  # Windows: no fork, so no handle is shared between processes
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise DataError(
                f"{self.shards[shard_id]}:{name}: read {len(data)} of {size} bytes at offset {offset}; "
                "was the shard changed or truncated after it was indexed?"
            )
        return data

    def _decode(self, entry: tuple[int, int, int, str, int | None]):
        shard_id, offset, size, name, _ = entry
        data = self._read_member(shard_id, offset, size, name)
        return _open_image(f"{self.shards[shard_id]}:{name}", self.mode, io.BytesIO(data))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        entry = self.index[i]
        label = entry[4] if entry[4] is not None else 0
        return image_to_tensor(self._decode(entry), self.image_size), label

    def __getstate__(self) -> dict:  # open file handles do not cross process boundaries (spawn, pickling)
        return {**self.__dict__, "_files": {}}
