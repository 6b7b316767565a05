"""Mass sampling into one ADM-compatible .npz: deterministic per sample, split across ranks, resumable.

The output is what the ADM evaluator (guided-diffusion's evaluations/evaluator.py) and DiT's
sample_ddp.py agree on: `arr_0` uint8 images (N, H, W, C) and, for class-conditional models,
`arr_1` int64 labels (N,).

- Sample i is drawn from generators seeded with `sample_seed(seed, i)` (initial noise and every
  per-step noise), so it does not depend on how many ranks run or which batch it lands in.
- Work is cut into parts of `part_size` consecutive samples; part k belongs to rank k % world_size.
  A part is generated as one batch, so the same part is computed by the same arithmetic whatever the
  number of ranks: 1 and N processes give byte-identical files (on the same device type).
- Each finished part is written atomically to `OUT.npz.parts/part_XXXXXX.npz`; a rerun with the same
  settings skips finished parts. When all parts exist, rank 0 streams them into OUT.npz (no second
  copy of the images in memory) and removes the parts folder only once OUT.npz and its folder entry
  are on disk, so a crash at any point leaves either the parts or the whole OUT.npz.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..autoencoders import Autoencoder, build_autoencoder
from ..config import Config
from ..sampling import generate
from ..utils.files import replace_durably
from ..utils.images import to_uint8
from .features import npz_array_info

__all__ = ["MassSamplingJob", "sample_seed", "sample_labels", "run_mass_sampling", "write_npz_stream"]

log = logging.getLogger(__name__)

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
"""Fixed member timestamps, so equal arrays give byte-identical .npz files."""


def sample_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample `index` in a run seeded with `seed` (numpy SeedSequence hashing)."""
    words = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def sample_labels(num: int, num_classes: int, balanced: bool, seed: int) -> np.ndarray:
    """(num,) int64 class labels: i % num_classes when balanced, else uniform draws seeded by `seed`."""
    if balanced:
        return np.arange(num, dtype=np.int64) % num_classes
    return np.random.default_rng([seed, 0x6C61]).integers(0, num_classes, num, dtype=np.int64)


@dataclass
class MassSamplingJob:
    """What to sample; recorded in the parts folder's manifest.json so a resume cannot mix settings."""

    num: int
    """Number of samples."""
    seed: int = 0
    """Run seed; sample i uses sample_seed(seed, i)."""
    part_size: int = 64
    """Samples per part file and per model batch."""
    balanced_classes: bool = False
    """Labels i % num_classes instead of seeded uniform draws (class-conditional models)."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `ditkit.sampling.generate` (steps, cfg_scale, sampler, ...)."""
    source: str = ""
    """Checkpoint (and weights) the samples come from."""

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError(f"the number of samples must be >= 1, got {self.num}")
        if self.part_size < 1:
            raise ValueError(f"the batch (part) size must be >= 1, got {self.part_size}")

    @property
    def num_parts(self) -> int:
        return -(-self.num // self.part_size)

    def manifest(self) -> dict[str, Any]:
        return {
            "num": self.num,
            "seed": self.seed,
            "part_size": self.part_size,
            "balanced_classes": self.balanced_classes,
            "sampling": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.sampling.items()},
            "source": self.source,
        }


def _npy_header(f, shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)


def write_npz_stream(path: str | Path, parts: list[Path], with_labels: bool, progress: bool = True) -> Path:
    """Concatenate part files (arr_0 images, arr_1 labels) into one uncompressed .npz, streaming, atomically;
    the file and its folder entry are fsynced before this returns."""
    path = Path(path)
    shapes = [npz_array_info(part, "arr_0")[0] for part in parts]  # headers only
    total, image_shape = sum(shape[0] for shape in shapes), shapes[0][1:]
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(zipfile.ZipInfo("arr_0.npy", date_time=_ZIP_DATE), "w", force_zip64=True) as f:
            _npy_header(f, (total, *image_shape), np.uint8)
            for part in tqdm(parts, desc="merging", unit="part", leave=False, disable=not progress):
                with np.load(part) as data:
                    f.write(np.ascontiguousarray(data["arr_0"]).tobytes())
        if with_labels:
            labels = []
            for part in parts:
                with np.load(part) as data:
                    labels.append(data["arr_1"])
            with zf.open(zipfile.ZipInfo("arr_1.npy", date_time=_ZIP_DATE), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64), version=(1, 0))
    replace_durably(tmp, path)  # the caller deletes the parts next: the merged file must be on disk first
    return path


def _save_part(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    np.savez(tmp, **arrays)
    replace_durably(tmp, path)  # the part must be on disk before it counts as finished


def _part_ok(path: Path, expected: int) -> bool:
    try:
        return npz_array_info(path, "arr_0")[0][0] == expected
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """'key: A in the folder, B now' for every setting (nested ones as 'sampling.steps') that differs."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [
            line
            for key in sorted(set(saved) | set(now))
            for line in _differences(saved.get(key), now.get(key), f"{prefix}{key}.")
        ]
    if saved == now:
        return []
    unset = "unset (the checkpoint's default)" if prefix.startswith("sampling.") else "unset"
    shown = [unset if value is None else json.dumps(value) for value in (saved, now)]
    return [f"{prefix[:-1]}: {shown[0]} in the folder, {shown[1]} now"]


def _finished_parts(parts_dir: Path) -> list[Path]:
    """Part files renamed into place (not the temporaries `_save_part` writes first)."""
    return sorted(p for p in parts_dir.glob("part_*.npz") if not p.name.endswith(".tmp.npz"))


def _prepare_parts_dir(parts_dir: Path, manifest: dict[str, Any], rank: int, barrier: Callable[[], None]) -> None:
    manifest_file = parts_dir / "manifest.json"
    if rank == 0:
        parts_dir.mkdir(parents=True, exist_ok=True)
        saved = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
        if saved is not None and saved != manifest and _finished_parts(parts_dir):
            raise ValueError(
                f"{parts_dir} holds parts of a run with other settings ({'; '.join(_differences(saved, manifest))}); "
                "rerun with the same settings to resume, or choose another --npz"
            )
        if saved == manifest:
            log.info("resuming from %s", parts_dir)
        else:  # new, or a folder without a finished part (nothing to lose): these settings take it over
            manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    barrier()


def _remove_if_empty(parts_dir: Path) -> None:
    """Remove a parts folder that holds no finished part (only the manifest or unfinished temporaries)."""
    if not parts_dir.is_dir() or _finished_parts(parts_dir):
        return
    for p in parts_dir.iterdir():
        if p.name != "manifest.json" and not p.name.endswith(".tmp.npz"):
            return  # something that is not ours: leave the folder as it is
    for p in parts_dir.iterdir():
        p.unlink()
    parts_dir.rmdir()


def run_mass_sampling(
    model: nn.Module,
    config: Config,
    out: str | Path,
    job: MassSamplingJob,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    autoencoder: Autoencoder | None = None,
    cuda_graph: bool | None = None,
    progress: bool = True,
) -> Path | None:
    """Sample `job.num` images into the .npz `out`; every rank calls this, rank 0 returns the path.

    A latent model's samples are decoded with `autoencoder`, built once from `config.autoencoder`
    when not given. `cuda_graph` is passed to `generate`; it changes speed, not the samples, so it is
    not part of the job's settings. A run that fails before its first part is written removes the parts
    folder again (one process); a parts folder without finished parts is taken over by new settings.
    """
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; choose a new file (nothing was written)")
    if autoencoder is None and config.autoencoder.kind != "pixel":
        autoencoder = build_autoencoder(config, device=next(model.parameters()).device)
    parts_dir = out.with_name(out.name + ".parts")
    _prepare_parts_dir(parts_dir, job.manifest(), rank, barrier)
    try:
        return _sample_parts(
            model,
            config,
            job,
            out=out,
            parts_dir=parts_dir,
            rank=rank,
            world_size=world_size,
            barrier=barrier,
            autoencoder=autoencoder,
            cuda_graph=cuda_graph,
            progress=progress,
        )
    except BaseException:
        if world_size == 1:  # a run that failed before its first part leaves nothing behind
            _remove_if_empty(parts_dir)
        raise


def _sample_parts(
    model: nn.Module,
    config: Config,
    job: MassSamplingJob,
    *,
    out: Path,
    parts_dir: Path,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    autoencoder: Autoencoder | None,
    cuda_graph: bool | None,
    progress: bool,
) -> Path | None:
    """This rank's missing parts of `job` into `parts_dir`; then rank 0 merges all parts into `out` (returned)
    and removes the folder. The arguments are `run_mass_sampling`'s, with the parts folder it prepared."""
    conditional = config.model.conditional
    labels = sample_labels(job.num, config.model.num_classes, job.balanced_classes, job.seed) if conditional else None
    mine = [k for k in range(job.num_parts) if k % world_size == rank]
    bar = tqdm(total=len(mine) * job.part_size, desc=f"sampling (rank {rank})", unit="img", disable=not progress)
    for k in mine:
        start, stop = k * job.part_size, min((k + 1) * job.part_size, job.num)
        path = parts_dir / f"part_{k:06d}.npz"
        if path.is_file() and _part_ok(path, stop - start):
            bar.update(stop - start)
            continue
        seeds = [sample_seed(job.seed, i) for i in range(start, stop)]
        request = torch.from_numpy(labels[start:stop]) if labels is not None else stop - start
        x = generate(
            model,
            config,
            request,
            sample_seeds=seeds,
            batch_size=job.part_size,
            autoencoder=autoencoder,
            cuda_graph=cuda_graph,
            **job.sampling,
        )
        _save_part(path, to_uint8(x), labels[start:stop] if labels is not None else None)
        bar.update(stop - start)
    bar.close()
    barrier()
    if rank != 0:
        return None
    parts = [parts_dir / f"part_{k:06d}.npz" for k in range(job.num_parts)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise RuntimeError(f"{parts_dir}: parts missing after sampling: {', '.join(missing[:5])}")
    write_npz_stream(out, parts, conditional, progress)
    for p in parts_dir.iterdir():
        p.unlink()
    parts_dir.rmdir()
    return out
