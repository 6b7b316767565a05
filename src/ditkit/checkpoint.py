"""Self-describing checkpoints: one folder per checkpoint, written atomically.

    step_0001000/
      config.json        the full job config (Config), enough to rebuild the model
      model.safetensors  trained weights (config JSON also stored in the safetensors metadata)
      ema.safetensors    exponential moving average of the weights (what sampling uses by default)
      state.pt           optimizer, LR schedule, grad scaler, step, RNG and data position: plain
                         tensors and numbers that `torch.load(weights_only=True)` accepts

The folder is written under a temporary name and renamed into place, so a crash leaves either the
previous checkpoint or the new one, never a half-written one under the final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import Config, ConfigError, config_from_dict, config_to_dict
from .utils.safe_load import load_failure_reason, load_weights_only

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_state",
    "load_weights",
    "load_config_from_checkpoint",
    "find_latest_checkpoint",
    "resolve_checkpoint",
    "prune_checkpoints",
    "checkpoint_name",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")
REQUIRED_FILES = ("config.json", "model.safetensors", "ema.safetensors")


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing or invalid; the message names it."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:07d}"


def _fsync_dir(path: Path) -> None:
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


def _state_dict_for_save(module: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


KILL_HOOK_ENV = "DITKIT_TEST_KILL_DURING_SAVE"
"""Test hook: "step_0000004/ema.safetensors" makes the process SIGKILL itself right after writing that
file of that checkpoint (any other value, or unset: nothing happens). Used by the crash tests."""


def _kill_point(name: str, file: str) -> None:
    if os.environ.get(KILL_HOOK_ENV) == f"{name}/{file}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    path: str | Path,
    *,
    config: Config,
    model: nn.Module | dict[str, torch.Tensor],
    ema: nn.Module | dict[str, torch.Tensor],
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder at `path` atomically (replacing an older one of the same name).

    `model` and `ema` are modules or (unwrapped, full) state dicts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    config_json = json.dumps(config_to_dict(config), indent=2)
    metadata = {"format": "ditkit", "ditkit_version": __version__, "config": config_json}
    save_file(_state_dict_for_save(model), tmp / "model.safetensors", metadata=metadata)
    _kill_point(path.name, "model.safetensors")
    save_file(_state_dict_for_save(ema), tmp / "ema.safetensors", metadata=metadata)
    _kill_point(path.name, "ema.safetensors")
    if state is not None:
        torch.save(state, tmp / "state.pt")
        _kill_point(path.name, "state.pt")
    (tmp / "config.json").write_text(config_json + "\n")
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")


def load_config_from_checkpoint(path: str | Path) -> Config:
    """The Config saved in a checkpoint folder."""
    path = Path(path)
    _check_folder(path)
    file = path / "config.json"
    try:
        return config_from_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    except ConfigError as err:
        raise CheckpointError(f"{file}: {err}") from err


def load_weights(path: str | Path, which: str = "ema", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """State dict of the 'ema' or 'model' weights of a checkpoint folder."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    path = Path(path)
    _check_folder(path)
    file = path / f"{which}.safetensors"
    try:
        return load_file(file, device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err


def load_state(path: str | Path) -> dict[str, Any]:
    """Training state of a checkpoint folder (loaded with weights_only=True: no pickled code runs)."""
    file = Path(path) / "state.pt"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no training state (state.pt); it cannot be resumed")
    try:
        return load_weights_only(file)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{file} could not be loaded safely ({load_failure_reason(err)})") from err


def _step_dirs(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    out = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            out.append((int(match.group(1)), child))
    return sorted(out)


def find_latest_checkpoint(folder: str | Path) -> Path | None:
    """Newest complete step_* checkpoint under `folder` (a run's checkpoints/ folder), or None."""
    for _, path in reversed(_step_dirs(Path(folder))):
        if all((path / f).is_file() for f in REQUIRED_FILES):
            return path
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run's checkpoints/ folder or a run folder; return the checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    for folder in (path, path / "checkpoints"):
        latest = find_latest_checkpoint(folder)
        if latest is not None:
            return latest
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    raise CheckpointError(
        f"{path} is not a checkpoint (expected {', '.join(REQUIRED_FILES)}) and holds no step_* checkpoints"
    )


def prune_checkpoints(folder: str | Path, keep_last: int) -> None:
    """Delete all but the `keep_last` newest step_* checkpoints under `folder`, and the temporary
    folders of writes that a crash interrupted (call it from the only process that writes there)."""
    dirs = _step_dirs(Path(folder))
    for _, path in dirs[: max(0, len(dirs) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in Path(folder).glob(".step_*.tmp-*"):
        if stale.is_dir() and not stale.name.endswith(f".tmp-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
