"""Small file helpers shared across the package: hashing, new JSON outputs, durable renames."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "prepare_json_out", "fsync_dir", "replace_durably"]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_json_out(path: str, option: str = "--json") -> Path:
    """A new JSON file to write at the end of a command, checked before anything is computed: an existing
    path is refused, missing parent folders are created now (so a bad location fails first, not last)."""
    out = Path(path)
    if out.exists():
        raise ValueError(f"{option} {path} already exists; choose a new file (nothing was written)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot create its folder {out.parent} ({err.strerror or err})") from err
    return out


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where the platform cannot (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """Rename the finished file `tmp` to `path` so that a crash leaves either no `path` or all of it: the
    file's bytes reach the disk before the rename, and the folder's new entry after it."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
