"""Reading user .pt files without running pickled code, and saying briefly why one could not be read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["load_weights_only", "load_failure_reason"]


def load_weights_only(path: str | Path, allowed: tuple[type, ...] = ()) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU, with `allowed` classes allow-listed for this call only."""
    with torch.serialization.safe_globals(list(allowed)):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_failure_reason(err: BaseException) -> str:
    """The short reason a `load_weights_only` failed, e.g. "UnpicklingError: Unsupported global: GLOBAL x.Y ...".

    PyTorch's weights-only message is a page long and suggests loading with weights_only=False, which
    is exactly what an untrusted file must not get; this keeps the unpickler's own first sentence.
    """
    text = str(err)
    if "WeightsUnpickler error:" in text:  # the unpickler's own reason follows PyTorch's preamble
        text = text.split("WeightsUnpickler error:", 1)[1]
    boilerplate = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines()]
    details = [line for line in lines if line and not line.startswith(boilerplate)]
    reason = details[0].split(". ")[0].rstrip(".") if details else "no details"
    return f"{type(err).__name__}: {reason}"
