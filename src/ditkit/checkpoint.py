"""Self-describing checkpoints: one folder per checkpoint, written atomically.

    step_0001000/
      config.json        the full job config (Config), enough to rebuild the model
      model.safetensors  trained weights (config JSON also stored in the safetensors metadata)
      ema.safetensors    exponential moving average of the weights (what sampling uses by default)
      state.pt           optimizer, LR schedule, grad scaler, step, RNG, data position and the
                         metrics log's open window: plain tensors and numbers that
                         `torch.load(weights_only=True)` accepts

The folder is written under a temporary name and renamed into place, so a crash leaves either the
previous checkpoint or the new one, never a half-written one under the final name. Replacing a
checkpoint of the same name takes two renames (old one aside to `.NAME.old-PID`, new one into place);
a crash between them leaves the only copy under the `.old` name, which find_latest_checkpoint still
finds and the next save or prune puts back (or deletes, once a complete NAME exists again).
"""

from __future__ import annotations

import json
import logging
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
from .utils.files import fsync_dir
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
    "checkpoints_after",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_DIR = re.compile(r"^\.(.+)\.old-\d+$")  # a checkpoint set aside by an interrupted same-name replace
_OLD_STEP_DIR = re.compile(r"^\.(step_(\d+))\.old-\d+$")
log = logging.getLogger(__name__)
REQUIRED_FILES = ("config.json", "model.safetensors", "ema.safetensors")
CHECKPOINT_FILES = (*REQUIRED_FILES, "state.pt")
"""Everything `save_checkpoint` writes into a checkpoint folder."""


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing or invalid; the message names it."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:07d}"


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
    """Write a checkpoint folder at `path` atomically (replacing an older checkpoint of the same name; a
    folder holding anything else is refused).

    `model` and `ema` are modules or (unwrapped, full) state dicts.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        # Only a checkpoint folder is ever replaced; a file here is the user's, not ours to move.
        raise CheckpointError(f"cannot save a checkpoint at {path}: it exists and is not a folder (nothing written)")
    if path.is_dir():
        others = sorted(entry.name for entry in path.iterdir() if entry.name not in CHECKPOINT_FILES)
        if others:  # a folder of the user's own files, not an older checkpoint: nothing of it is replaced
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise CheckpointError(
                f"cannot save a checkpoint at {path}: the folder holds files that are not a checkpoint's ({shown}); "
                "choose another folder (nothing written)"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_replaced(path.parent, path.name)
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
    fsync_dir(tmp)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
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


def _old_step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """`.step_N.old-PID` folders whose step_N is missing: the only copy of checkpoint N after a crash
    between the two renames of a same-name replace."""
    if not folder.is_dir():
        return []
    out = []
    for child in folder.iterdir():
        match = _OLD_STEP_DIR.match(child.name)
        if match and child.is_dir() and not (folder / match.group(1)).exists():
            out.append((int(match.group(2)), child))
    return sorted(out)


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in REQUIRED_FILES)


def find_latest_checkpoint(folder: str | Path) -> Path | None:
    """Newest complete step_* checkpoint under `folder` (a run's checkpoints/ folder), or None.

    A checkpoint left only under `.step_N.old-PID` by a crash in the middle of a same-name replace
    counts too, when step_N itself is missing. This function only reads: another process
    may be writing there right now, so putting such a folder back is left to the writer's next
    save_checkpoint or prune_checkpoints.
    """
    folder = Path(folder)
    # `_old_step_dirs` holds only steps whose step_N is missing, so no step appears twice.
    for _, path in reversed(sorted(_step_dirs(folder) + _old_step_dirs(folder))):
        if _complete(path):
            return path
    return None


def _recover_replaced(folder: Path, name: str | None = None) -> None:
    """Finish same-name replaces that a crash interrupted (for checkpoint `name`, or every step_*).

    `.NAME.old-PID` is the previous copy of NAME, moved aside just before the new one was renamed
    into place. If NAME is missing, the crash came between the two renames and the old folder is the
    only copy: it goes back. If a complete NAME exists, the replace finished and the old copy is
    surplus. Anything else (an incomplete NAME) is left for a person to look at. Call this only from
    the process that writes into `folder`, when it is not in the middle of a save.
    """
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        match = _OLD_DIR.match(child.name)
        if not match or not child.is_dir():
            continue
        target = match.group(1)
        if (target != name) if name is not None else not _STEP_DIR.match(target):
            continue
        final = folder / target
        if not final.exists():
            os.replace(child, final)
            log.warning("restored checkpoint %s from %s (a save was interrupted while replacing it)", final, child)
        elif final.is_dir() and _complete(final):
            shutil.rmtree(child, ignore_errors=True)


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
    """Delete all but the `keep_last` (at least 1) newest step_* checkpoints under `folder`, and the
    temporary folders of writes that a crash interrupted; put back checkpoints an interrupted same-name
    replace left aside. Call it from the only process that writes there.

    The checkpoint a run has just written is the newest there (a run resumed from an older checkpoint
    first moves the later ones aside, see ditkit.train), so it is always among those kept.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (the checkpoint just written), got {keep_last}")
    folder = Path(folder)
    _recover_replaced(folder)
    dirs = _step_dirs(folder)
    for _, path in dirs[: max(0, len(dirs) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in Path(folder).glob(".step_*.tmp-*"):
        if stale.is_dir() and not stale.name.endswith(f".tmp-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def checkpoints_after(folder: str | Path, step: int) -> list[Path]:
    """Every checkpoint under `folder` for a step after `step`: step_N, and the `.old` leftover of an
    interrupted same-name replace that is the only copy. Not the `.tmp` of an interrupted write: a
    half-written save is no checkpoint, and the next save or prune deletes it, so an ordinary
    crash-resume is not mistaken for a roll-back."""
    folder = Path(folder)
    return sorted(path for number, path in _step_dirs(folder) + _old_step_dirs(folder) if number > step)
