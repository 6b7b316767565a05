"""Transparent huge pages for PyTorch's large CPU tensors, through glibc's malloc tunable.

PyTorch's CPU allocator does not cache: every activation tensor is a fresh `malloc`, and glibc serves
blocks above its mmap threshold (at most 32 MiB) with a new `mmap` and returns them with `munmap` on
free. A training step of DiT-B/2 at batch 32 therefore faults in its ~4-6 GB of activations page by
page, every step: on this project's 2-core CPU that was 0.6-1.1 million minor page faults and 3-7 s of
kernel time per ~10 s step. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks
for transparent huge pages on those blocks (`madvise(MADV_HUGEPAGE)`), so a step takes ~15,000 faults
instead and runs 1.24x faster (`docs/training.md`). The tunable is read when the process starts, so the
`ditkit` command re-executes itself once with it set; `DITKIT_HUGEPAGES=0` turns that off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["hugepage_environment", "reexec_with_hugepages"]

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None if unknown."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def hugepage_environment(
    environ: Mapping[str, str],
    system: str = sys.platform,
    libc: tuple[str, str] | None = None,
    thp_mode: str | None = "unset",
) -> dict[str, str] | None:
    """The environment to restart with so malloc uses huge pages, or None when there is nothing to do.

    Nothing to do: opted out (`DITKIT_HUGEPAGES=0`), not Linux with glibc >= 2.35, the tunable already
    set, or a kernel whose THP mode is not 'madvise' ('always' already gives huge pages, 'never' none).
    """
    if environ.get("DITKIT_HUGEPAGES", "1") == "0" or not system.startswith("linux"):
        return None
    name, version = platform.libc_ver() if libc is None else libc
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or major_minor < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    if (_thp_mode() if thp_mode == "unset" else thp_mode) != "madvise":
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_hugepages() -> None:
    """Restart this process with the huge-page tunable set, when it helps; otherwise return.

    The same command line (`sys.orig_argv`: interpreter options, `-m ditkit` or the script, arguments),
    the same PID and environment, plus the tunable. Call it first thing, before any work.
    """
    env = hugepage_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
