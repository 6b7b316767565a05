"""The studio's sampling queue: validated requests run one at a time on a worker thread.

A request is checked against `Limits` before it is queued (steps, batch, resampling, outpainting
rounds and canvas size, guidance, image sizes, prompt lengths and a total work budget), so one request
cannot exhaust the machine. The queue is bounded: a full queue refuses new work (HTTP 429) instead of
growing. Only the worker thread runs the model; a text-conditioned checkpoint's text encoder and a latent
checkpoint's autoencoder are loaded once, on the first request that needs them. `Studio.close` (or leaving
a `with Studio(...)` block) cancels the jobs and ends the worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import logging
import math
import queue
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import autoencoders
from ..config import Config, ConfigError
from ..diffusion import build_process
from ..inpainting import DIRECTIONS, check_image_model, inpaint, known_mask_from, outpaint, outpaint_keep
from ..samplers import SAMPLERS
from ..sampling import generate
from ..utils.images import make_grid, to_uint8

__all__ = ["Limits", "StudioError", "Job", "Studio", "conditioning_kind", "guidable"]

log = logging.getLogger(__name__)

KINDS = ("sample", "inpaint", "outpaint")
METHODS = ("auto", "repaint", "trained")


@dataclass(frozen=True)
class Limits:
    """Bounds on one request and on the queue."""

    max_steps: int = 1000
    """Sampling steps per request."""
    max_batch: int = 64
    """Images per request."""
    max_queue: int = 8
    """Requests waiting (not counting the running one); more are refused with HTTP 429."""
    max_resample: int = 20
    """RePaint resampling count."""
    max_times: int = 8
    """Outpainting rounds."""
    max_cfg: float = 20.0
    """Largest guidance scale."""
    max_work: int = 64_000
    """Budget of images x denoiser steps (x2 for Heun, x2 under guidance, x resampling x rounds) per
    request; an outpainting request also counts its result as images x the model-size tiles in the final
    picture."""
    max_image_side: int = 4096
    """Largest side of an uploaded image, and of an outpainted picture (after scaling the image to the
    model's side across the direction, and after all rounds), in pixels."""
    max_prompt_chars: int = 1000
    """Characters per prompt (the text encoder reads only its first `text.max_length` tokens anyway)."""
    keep_jobs: int = 64
    """Finished jobs kept for download; older ones are forgotten."""

    def __post_init__(self) -> None:
        names = ("max_steps", "max_batch", "max_queue", "max_resample", "max_times", "max_work", "max_image_side")
        for name in (*names, "max_prompt_chars", "keep_jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"studio limit {name} must be >= 1, got {getattr(self, name)}")
        if self.max_cfg < 1:
            raise ValueError(f"studio limit max_cfg must be >= 1, got {self.max_cfg}")


class StudioError(Exception):
    """A request the studio refuses; `status` is the HTTP status, the message is shown to the user."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


FINISHED = ("done", "error", "cancelled")
"""Statuses of a job that will not change again (the others: queued, running)."""


class _Cancelled(Exception):
    """Raised from the progress callback to stop a cancelled job's sampling."""


@dataclass
class Job:
    """One request and what it produced."""

    id: str
    params: dict[str, Any]
    status: str = "queued"
    step: int = 0
    num_steps: int = 0
    round: int = 0
    rounds: int = 1
    error: str | None = None
    created: float = field(default_factory=time.time)
    seconds: float | None = None
    preview: torch.Tensor | None = None
    images: torch.Tensor | None = None
    nrow: int = 8
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    cancel_requested: bool = False

    def progress(self) -> float:
        """Fraction done in [0, 1]."""
        if self.status == "done":
            return 1.0
        if not self.num_steps:
            return 0.0
        return min(1.0, (self.round + self.step / self.num_steps) / self.rounds)

    def png(self, which: str, index: int | None = None) -> bytes:
        """'grid', 'image' (with index) or 'preview' as PNG bytes."""
        with self.lock:
            images, preview = self.images, self.preview
        if which == "preview":
            if preview is None:
                raise StudioError("no preview yet", 404)
            return _png(make_grid(preview, self.nrow))
        if images is None:
            raise StudioError(f"job {self.id} has no images yet (status: {self.status})", 404)
        if which == "grid":
            return _png(make_grid(images, self.nrow))
        if index is None or not 0 <= index < len(images):
            raise StudioError(f"job {self.id} has images 0..{len(images) - 1}, not {index}", 404)
        return _png(to_uint8(images[index : index + 1])[0])


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def conditioning_kind(config: Config) -> str:
    """'text' (prompts), 'class' (labels) or 'none' (unconditional), as the page shows controls for."""
    m = config.model
    if m.text_conditional:
        return "text"
    return "class" if m.conditional else "none"


def guidable(config: Config) -> bool:
    """Whether classifier-free guidance applies: the model learned a null class or a null text."""
    m = config.model
    if m.text_conditional:
        return m.caption_dropout_prob > 0
    return m.conditional and m.class_dropout_prob > 0


# Numbers sent as strings must be plain ASCII decimals: str.isdigit() and float() also take other
# scripts' digits ("٣"), superscripts ("²") and "1_000", which a request should not be read as.
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,30}", re.ASCII)
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,4})?", re.ASCII)


def _shown(value: Any, limit: int = 60) -> str:
    """repr(value), shortened: error messages echo the request, which may be a huge string or number."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python converts to text
        return f"an integer of {value.bit_length()} bits"
    if len(text) <= limit:
        return text
    if isinstance(value, int):
        return f"{text[:20]}... ({len(text.lstrip('-'))} digits)"
    return text[: limit - 3] + "..."


def _int(payload: dict, key: str, default: int, lo: int, hi: int) -> int:
    """A whole number from a JSON integer, an integral float, or an ASCII decimal string."""
    value = payload.get(key, default)
    if value is None:
        value = default
    if isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise StudioError(f"{key} must be a whole number, got {_shown(value)}")
    if not lo <= number <= hi:
        raise StudioError(f"{key} must be between {lo} and {hi}, got {_shown(value)}")
    return number


def _float(payload: dict, key: str, default: float, lo: float, hi: float) -> float:
    """A finite number from a JSON number or an ASCII decimal string, within [lo, hi]."""
    value = payload.get(key, default)
    if value is None:
        value = default
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        number = float(value.strip())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range (JSON allows any number of digits)
            number = math.inf if value > 0 else -math.inf
    else:
        raise StudioError(f"{key} must be a number, got {_shown(value)}")
    if math.isnan(number):
        raise StudioError(f"{key} must be a number, got {_shown(value)}")
    if not lo <= number <= hi:
        raise StudioError(f"{key} must be between {lo:g} and {hi:g}, got {_shown(value)}")
    return number


def _bool(payload: dict, key: str, default: bool) -> bool:
    """A JSON true or false (a string such as "false" is refused, not read as true)."""
    value = payload.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, bool):
        raise StudioError(f"{key} must be true or false, got {_shown(value)}")
    return value


def _choice(payload: dict, key: str, default: str, choices: tuple[str, ...] | list[str]) -> str:
    value = payload.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, str) or value not in choices:
        raise StudioError(f"{key} must be one of {', '.join(choices)}, got {_shown(value)}")
    return value


def decode_image(data: Any, key: str, max_side: int, mode: str) -> Image.Image:
    """A PNG/JPEG given as a data URL or bare base64 string -> PIL image in `mode` ('L', 'RGB'; 'mask': as
    uploaded, for `ditkit.inpainting.known_mask_from`)."""
    if not isinstance(data, str) or not data:
        raise StudioError(f"{key} must be an image (a PNG data URL)")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
        img = Image.open(io.BytesIO(raw))
        if max(img.size) > max_side:
            raise StudioError(f"{key} is {img.size[0]}x{img.size[1]} px; the largest side allowed is {max_side}")
        img.load()
    except StudioError:
        raise
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as err:
        raise StudioError(f"{key} is not a readable image ({err})") from None
    if mode == "mask":
        return img  # its alpha, if painted over transparency, is read by known_mask_from
    return img.convert("L" if mode == "L" else "RGB")


def _image_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return (arr[None, None] if arr.dim() == 2 else arr.permute(2, 0, 1)[None]).contiguous()  # (1, C, H, W)


class _LoadOnce:
    """A resource a job needs, built on first use, once. A failure is remembered and answered again
    (StudioError 500, saying to restart the studio) without retrying: a hub lookup alone can take half a
    minute, and the request that met it was fine."""

    def __init__(self, what: str, build: Any) -> None:
        self.what, self.build = what, build
        self.value: Any = None
        self.error: str | None = None
        self.lock = threading.Lock()

    def get(self) -> Any:
        with self.lock:
            if self.value is None and self.error is None:
                try:
                    self.value = self.build()
                except (ConfigError, OSError, ValueError) as err:
                    log.error("studio: cannot load the %s: %s", self.what, err)
                    self.error = (
                        f"the studio cannot load this checkpoint's {self.what}: {err} "
                        "(restart the studio once it is available)"
                    )
            if self.error is not None:
                raise StudioError(self.error, 500)
            return self.value


class Studio:
    """A loaded model, the request validation and the job queue with its worker thread.

    `close()` (or the end of a `with` block) stops it; a studio dropped without closing ends its worker
    thread once it is garbage-collected (the thread holds it only while running a job).
    """

    preview_min_interval: float = 0.2
    """Latent checkpoints: least seconds between two decoded previews (the page polls every 0.15 s)."""
    preview_overhead: float = 0.2
    """Latent checkpoints: largest share of a job's time spent decoding previews; a decode that took d
    seconds waits d * (1 / share - 1) before the next."""

    def __init__(self, model: nn.Module, config: Config, *, name: str = "", limits: Limits | None = None) -> None:
        self.model, self.config, self.name = model, config, name
        self.limits = limits or Limits()
        # The model's noise process bounds the steps too: a vp process trained with T timesteps grids at
        # most T sampling steps, which is refused at validation, not after the request has queued.
        self.process = build_process(config.diffusion)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.jobs_lock = threading.Lock()
        # Unbounded: max_queue counts the jobs still waiting (`submit`), so that cancelled ones, which
        # stay in the queue until the worker passes them, take no place. None tells the worker to end.
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.ids = itertools.count(1)
        self.closed = False
        self._text_encoder = _LoadOnce("text encoder", self._load_text_encoder)
        self._autoencoder = _LoadOnce("autoencoder", self._load_autoencoder)
        # The thread gets a weak reference: a bound method would keep the studio (and its model) alive for
        # as long as the thread waits. The finalizer wakes the thread to end when the studio is collected.
        self.worker = threading.Thread(
            target=_work, args=(weakref.ref(self), self.queue), name="ditkit-studio-worker", daemon=True
        )
        self.worker.start()
        weakref.finalize(self, self.queue.put, None)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the studio: refuse new requests (503), cancel the queued jobs and the running one (it stops
        at its next step), and end the worker thread, waiting up to `timeout` seconds for it. Calling it
        again only waits for the thread."""
        with self.jobs_lock:  # submit checks `closed` under the same lock: no job slips in after this
            first, self.closed = not self.closed, True
            jobs = list(self.jobs.values())
        if first:
            for job in jobs:
                try:
                    self.cancel(job)
                except StudioError:  # already finished
                    pass
            self.queue.put(None)
        if threading.current_thread() is not self.worker:
            self.worker.join(timeout)

    def __enter__(self) -> Studio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- what the page needs to know -------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Model facts, defaults and limits for the page."""
        m, sc, lim, ae = self.config.model, self.config.sample, self.limits, self.config.autoencoder
        kind = conditioning_kind(self.config)
        guided = guidable(self.config)
        # The images the page shows: a latent model's are its latents decoded, `downsample` times larger.
        latent = ae.kind != "pixel" and ae.downsample is not None
        factor = ae.downsample if latent else 1
        return {
            "checkpoint": self.name,
            "conditioning": kind,
            "num_classes": m.num_classes,
            "channels": self.config.data.channels if latent else m.in_channels,
            "height": m.input_hw[0] * factor,
            "width": m.input_hw[1] * factor,
            "latent": [m.in_channels, *m.input_hw] if latent else None,  # (C, H, W) the model samples
            "inpaint_model": m.inpaint,
            "guidance": guided,
            "samplers": list(SAMPLERS),
            "methods": list(METHODS),
            "directions": list(DIRECTIONS),
            "defaults": {
                "sampler": sc.sampler,
                "steps": self.default_steps,
                "cfg_scale": sc.cfg_scale if guided else 1.0,
                "eta": sc.eta,
                "seed": sc.seed,
            },
            "limits": {
                "max_steps": self.max_steps,
                "max_batch": lim.max_batch,
                "max_queue": lim.max_queue,
                "max_resample": lim.max_resample,
                "max_times": lim.max_times,
                "max_cfg": lim.max_cfg if guided else 1.0,
                "max_work": lim.max_work,
                "max_image_side": lim.max_image_side,
                "max_prompt_chars": lim.max_prompt_chars,
            },
        }

    @property
    def max_steps(self) -> int:
        """Most sampling steps per request: `Limits.max_steps`, or fewer where the model's process has fewer
        timesteps."""
        process_max = self.process.max_steps
        return self.limits.max_steps if process_max is None else min(self.limits.max_steps, process_max)

    @property
    def default_steps(self) -> int:
        """Steps of a request that names none: the checkpoint's `sample.steps`, within `max_steps` (a config
        may ask for more steps than its own process has, which would refuse every such request)."""
        return min(self.config.sample.steps, self.max_steps)

    def text_encoder(self) -> Any:
        """The text encoder the checkpoint's config names (`config.text`), loaded on first use, once.

        StudioError(500) when it cannot be loaded (not installed, not available offline, or its weights
        missing or corrupt): the message says what to install or download, since the request itself was
        fine. A failed load is not retried by later requests (a hub lookup alone can take half a minute):
        they get the same answer until the studio is restarted."""
        return self._text_encoder.get()

    def _load_text_encoder(self) -> Any:
        from ..text import load_text_encoder

        encoder = load_text_encoder(self.config.text, device=next(self.model.parameters()).device)
        # TextEncoder reads its weights on first use: load them here, once, so that missing or corrupt
        # weights are this request's answer (and remembered) instead of every job's error.
        _ = encoder.model
        return encoder

    def autoencoder(self) -> autoencoders.Autoencoder | None:
        """A latent checkpoint's autoencoder (`config.autoencoder`) on the model's device, built on first use,
        once, and passed to every job (which would otherwise load it from disk each time); None for a
        pixel-space checkpoint. StudioError(500) when it cannot be built, answered again without retrying,
        as for the text encoder."""
        if self.config.autoencoder.kind == "pixel":
            return None
        return self._autoencoder.get()

    def _load_autoencoder(self) -> autoencoders.Autoencoder:
        return autoencoders.build_autoencoder(self.config, device=next(self.model.parameters()).device)

    # ----- validation ------------------------------------------------------------------------

    def _prompts(self, payload: dict) -> list[str]:
        prompts, lim = payload.get("prompts"), self.limits
        if not isinstance(prompts, list) or not prompts:
            raise StudioError("prompts must be a non-empty list of strings (one image per prompt)")
        if len(prompts) > lim.max_batch:
            raise StudioError(f"at most {lim.max_batch} images per request, got {len(prompts)} prompts")
        for value in prompts:
            if not isinstance(value, str) or not value.strip():
                raise StudioError(f"prompts must be non-empty strings, got {_shown(value)}")
            if len(value) > lim.max_prompt_chars:
                raise StudioError(
                    f"prompts must be at most {lim.max_prompt_chars} characters, got one of {len(value)}: "
                    f"{_shown(value)}"
                )
        return prompts

    def validate(self, payload: Any) -> dict[str, Any]:
        """Check a request against the model and the limits; return the parameters a job runs with."""
        if not isinstance(payload, dict):
            raise StudioError("the request body must be a JSON object")
        known = {"kind", "labels", "batch", "prompts", "sampler", "steps", "cfg_scale", "seed", "eta", "preview"}
        known |= {"image", "mask", "method", "resample", "jump", "direction", "times", "overlap", "nrow"}
        unknown = sorted(set(payload) - known)
        if unknown:
            shown = ", ".join(_shown(k, 40) if not k.isidentifier() else k for k in unknown[:10])
            raise StudioError(f"unknown field(s) {shown}; expected some of {', '.join(sorted(known))}")
        m, sc, lim = self.config.model, self.config.sample, self.limits
        p: dict[str, Any] = {"kind": _choice(payload, "kind", "sample", KINDS), "prompts": None}
        kind = conditioning_kind(self.config)
        if kind == "text":
            if payload.get("labels") is not None:
                raise StudioError("this model is text-conditioned: it takes prompts, not labels")
            p["prompts"] = self._prompts(payload)
            p["labels"] = None
            n = len(p["prompts"])
        elif payload.get("prompts"):
            raise StudioError("this model takes no prompts (it is not text-conditioned)")
        elif kind == "class":
            labels = payload.get("labels")
            if not isinstance(labels, list) or not labels:
                raise StudioError(f"labels must be a non-empty list of class labels in 0..{m.num_classes - 1}")
            if len(labels) > lim.max_batch:
                raise StudioError(f"at most {lim.max_batch} images per request, got {len(labels)} labels")
            for value in labels:
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < m.num_classes:
                    raise StudioError(
                        f"class labels must be whole numbers in 0..{m.num_classes - 1}, got {_shown(value)}"
                    )
            p["labels"] = labels
            n = len(labels)
        else:
            if payload.get("labels"):
                raise StudioError("this model is unconditional: it takes a batch size, not labels")
            n = _int(payload, "batch", 8, 1, lim.max_batch)
            p["labels"] = n
        guided = guidable(self.config)
        default_cfg = sc.cfg_scale if guided else 1.0
        p["cfg_scale"] = _float(payload, "cfg_scale", default_cfg, 0.0, lim.max_cfg if guided else 1.0)
        if not guided and p["cfg_scale"] != 1.0:
            null = "null text: trained without caption dropout" if kind == "text" else "null class"
            raise StudioError(f"this model cannot be guided (no {null}): cfg_scale must be 1")
        p["sampler"] = _choice(payload, "sampler", sc.sampler, list(SAMPLERS))
        p["steps"] = _int(payload, "steps", self.default_steps, 1, lim.max_steps)
        try:
            self.process.check_num_steps(p["steps"], name="steps")
        except ValueError as err:
            raise StudioError(str(err)) from None
        p["seed"] = _int(payload, "seed", sc.seed, 0, 2**63 - 1)
        p["eta"] = _float(payload, "eta", sc.eta, 0.0, 1.0) if p["sampler"] == "ddim" else None
        p["preview"] = _bool(payload, "preview", True)
        p["nrow"] = _int(payload, "nrow", min(n, 8), 1, lim.max_batch)
        # Network evaluations per image: Heun evaluates twice per step, guidance runs the conditional and the
        # unconditional pass (one batch of twice the images).
        work = n * p["steps"] * (2 if p["sampler"] == "heun" else 1) * (2 if p["cfg_scale"] != 1 else 1)
        if p["kind"] != "sample":
            method = _choice(payload, "method", "auto", METHODS)
            p["method"] = ("trained" if m.inpaint else "repaint") if method == "auto" else method
            if p["method"] == "trained" and not m.inpaint:
                raise StudioError("method 'trained' needs a model fine-tuned with model.inpaint=true; use repaint")
            p["resample"] = _int(payload, "resample", 1, 1, lim.max_resample)
            p["jump"] = _int(payload, "jump", 1, 1, p["steps"])
            work *= p["resample"] if p["method"] == "repaint" else 1
            try:
                check_image_model(self.config)  # the same refusal as `ditkit inpaint`/`outpaint`
            except ConfigError as err:
                raise StudioError(str(err)) from None
            mode = "L" if m.in_channels == 1 else "RGB"
            image = decode_image(payload.get("image"), "image", lim.max_image_side, mode)
        h, w = m.input_hw
        if p["kind"] == "inpaint":
            mask = decode_image(payload.get("mask"), "mask", lim.max_image_side, "mask")
            try:  # the same checks as `ditkit inpaint`: the image's size, something to fill
                p["known_mask"] = known_mask_from(mask, image.size, (h, w))
            except ValueError as err:
                raise StudioError(str(err)) from None
            image = image.resize((w, h), Image.Resampling.LANCZOS) if image.size != (w, h) else image
            p["image"] = _image_tensor(image)
        elif p["kind"] == "outpaint":
            p["direction"] = _choice(payload, "direction", "right", DIRECTIONS)
            p["times"] = _int(payload, "times", 1, 1, lim.max_times)
            p["overlap"] = _float(payload, "overlap", 0.5, 0.1, 0.9)
            work *= p["times"]
            sideways = p["direction"] in ("left", "right")
            across, window = (h, w) if sideways else (w, h)  # the model's side across / along the direction
            iw, ih = image.size
            # The image is scaled so that its side across the direction is the model's; the other side
            # follows and then grows by each round (as ditkit.inpainting.outpaint does). Bound the final
            # picture before resizing: a 4096x1 upload would otherwise become 8x32768 on an 8 px model.
            along = max(1, round((iw / ih if sideways else ih / iw) * across))
            try:  # the rule `ditkit outpaint` applies: each round must add a pixel
                keep = outpaint_keep(p["overlap"], window)
            except ValueError as err:
                raise StudioError(str(err)) from None
            final = along + p["times"] * (window - keep)
            if final > lim.max_image_side:
                side = "wide" if sideways else "tall"
                raise StudioError(
                    f"outpainting {p['direction']} would make a picture {final} px {side} (the {iw}x{ih} px image "
                    f"scaled to the model's {across} px, plus {p['times']} round(s)); the largest side allowed is "
                    f"{lim.max_image_side} px: crop the image or use fewer rounds"
                )
            if along < keep:
                raise StudioError(
                    f"the image is too short along the direction for this overlap: scaled to the model's {across} px "
                    f"it is {along} px {'wide' if sideways else 'tall'}, and overlap {p['overlap']:g} keeps {keep} px"
                )
            size = (along, across) if sideways else (across, along)
            p["image"] = _image_tensor(image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image)
            # The picture is held (and returned) whole for every image: count it in model-size tiles.
            work += n * math.ceil(final / window)
        if work > lim.max_work:
            raise StudioError(
                f"this request needs {work:,} image-steps; the limit is {lim.max_work:,} "
                "(fewer images, steps, resampling or rounds, or a smaller picture to outpaint)"
            )
        if p["prompts"] is not None:
            self.text_encoder()  # loaded now, so that a missing encoder is this request's answer
        self.autoencoder()  # likewise (None for a pixel-space checkpoint)
        return p

    # ----- queue -----------------------------------------------------------------------------

    def submit(self, payload: Any) -> Job:
        """Validate and queue a request; StudioError(429) when the queue is full."""
        if self.closed:
            raise StudioError("the studio is shutting down", 503)
        params = self.validate(payload)
        job = Job(id=str(next(self.ids)), params=params, nrow=params["nrow"])
        with self.jobs_lock:
            if self.closed:
                raise StudioError("the studio is shutting down", 503)
            waiting = sum(j.status == "queued" for j in self.jobs.values())
            # The queue also holds cancelled jobs until the worker passes them (without their inputs, see
            # `cancel`); bound those too, so that submitting and cancelling cannot grow it without end.
            if waiting >= self.limits.max_queue:
                raise StudioError(f"the studio is busy ({waiting} requests waiting); try again shortly", 429)
            if self.queue.qsize() >= self.limits.max_queue + self.limits.keep_jobs:
                passed = self.queue.qsize() - waiting
                raise StudioError(
                    f"the studio is busy ({waiting} requests waiting, {passed} cancelled ones not yet passed by "
                    "the running job); try again shortly",
                    429,
                )
            self.queue.put_nowait(job)
            self.jobs[job.id] = job
            self._forget_old()
        return job

    def cancel(self, job: Job) -> Job:
        """Stop a job: a queued one never starts, a running one stops at its next step (its images are
        not kept). StudioError(409) for a job that has already finished."""
        with job.lock:  # the worker settles a job's final status under the same lock
            if job.status in FINISHED:
                raise StudioError(f"job {job.id} has already finished ({job.status})", 409)
            job.cancel_requested = True
            if job.status == "queued":
                job.params = {"kind": job.params["kind"]}  # its images and masks are not needed any more
                job.status = "cancelled"
        return job

    def _forget_old(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.status in FINISHED]
        for key in finished[: max(0, len(self.jobs) - self.limits.keep_jobs)]:
            del self.jobs[key]

    def get(self, job_id: str) -> Job:
        """The job with this id, or StudioError(404)."""
        with self.jobs_lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise StudioError(f"no job {job_id!r} (finished jobs are kept for a while only)", 404)
        return job

    def position(self, job: Job) -> int:
        """How many queued jobs are ahead of this one (0 when running or finished)."""
        if job.status != "queued":
            return 0
        with self.jobs_lock:
            queued = [j for j in self.jobs.values() if j.status == "queued"]
        return next((i for i, j in enumerate(queued) if j is job), 0)

    def status(self, job: Job) -> dict[str, Any]:
        """What the page polls."""
        p = job.params
        count = len(job.images) if job.images is not None else 0
        return {
            "id": job.id,
            "kind": p["kind"],
            "status": job.status,
            "position": self.position(job),
            "step": job.step,
            "num_steps": job.num_steps,
            "round": job.round,
            "rounds": job.rounds,
            "progress": round(job.progress(), 4),
            "error": job.error,
            "seconds": job.seconds,
            "has_preview": job.preview is not None,
            "images": count,
            "grid_url": f"/api/jobs/{job.id}/grid.png" if count else None,
            "image_urls": [f"/api/jobs/{job.id}/images/{k}.png" for k in range(count)],
        }

    def wait(self, job: Job, timeout: float = 60.0) -> Job:
        """Block until the job finishes (for tests and scripts)."""
        deadline = time.time() + timeout
        while job.status in ("queued", "running"):
            if time.time() > deadline:
                raise TimeoutError(f"job {job.id} still {job.status} after {timeout} s")
            time.sleep(0.01)
        return job

    # ----- the worker ------------------------------------------------------------------------

    def _run_job(self, job: Job) -> None:
        """Run one job from the queue (on the worker thread) and settle its final status."""
        with job.lock:  # against a cancel arriving now
            if job.cancel_requested:
                return
            job.status = "running"
        start = time.perf_counter()
        # Every result field is set before `status` says the job finished: a poll that reads "done"
        # (or "error") must also find its images and seconds.
        images = None
        try:
            images = self._run(job).detach().float().cpu()
            status = "done"
        except _Cancelled:
            status = "cancelled"
        except ValueError as err:  # a request the model refuses: its message is for the user
            job.error, status = str(err), "error"
        except Exception:  # a bug: the details go to the log, not to the page
            log.exception("studio job %s failed", job.id)
            job.error, status = "internal error while sampling (details are in the server log)", "error"
        with job.lock:  # a cancel answered while the last step finished still cancels (see `cancel`)
            if status == "done" and job.cancel_requested:
                status = "cancelled"
            if status == "done":
                job.images = images
            job.seconds = round(time.perf_counter() - start, 3)
            job.status = status

    def _callback(self, job: Job):
        # A latent checkpoint's x0 estimate is latents: the preview decodes it, but not at every step (a
        # decode can cost more than a step); `preview_min_interval` and `preview_overhead` bound how often.
        autoencoder = self.autoencoder() if job.params["preview"] else None
        last_end, wait = -math.inf, 0.0
        share = min(max(self.preview_overhead, 1e-3), 1.0)  # of a job's time spent decoding previews

        def callback(info: dict[str, Any]) -> None:
            nonlocal last_end, wait
            if job.cancel_requested:  # stops the sampler between steps
                raise _Cancelled
            job.step, job.num_steps = int(info["i"]) + 1, int(info["num_steps"])
            job.round, job.rounds = int(info.get("round", 0)), int(info.get("rounds", 1))
            if not job.params["preview"]:
                return
            denoised = info["denoised"].detach()
            if autoencoder is not None:
                began = time.perf_counter()
                if began - last_end < wait:
                    return
                with torch.no_grad():
                    denoised = autoencoder.decode(denoised)  # (N, C, H, W) images from (N, c, h, w) latents
                last_end = time.perf_counter()
                wait = max(self.preview_min_interval, (last_end - began) * (1 / share - 1))
            preview = denoised.float().cpu().clamp(-1, 1)
            with job.lock:
                job.preview = preview

        return callback

    def _run(self, job: Job) -> torch.Tensor:
        p = job.params
        common = {"steps": p["steps"], "cfg_scale": p["cfg_scale"], "seed": p["seed"], "callback": self._callback(job)}
        text = {"prompts": p["prompts"], "text_encoder": self.text_encoder()} if p["prompts"] is not None else {}
        if p["kind"] == "sample":
            return generate(
                self.model,
                self.config,
                p["labels"],
                sampler=p["sampler"],
                eta=p["eta"],
                # One batch for the whole request (at most max_batch images, as inpainting runs too): progress
                # then rises once from 0 to 1 and the preview shows every image.
                batch_size=self.limits.max_batch,
                autoencoder=self.autoencoder(),
                **text,
                **common,
            )
        # Each method gets only its own settings (`inpaint` refuses a setting its method would ignore): the
        # page sends a sampler with every request, which RePaint does not use.
        if p["method"] == "repaint":
            options = {"method": "repaint", "resample": p["resample"], "jump": p["jump"]}
        else:
            options = {"method": "trained", "sampler": p["sampler"]}
            if p["eta"] is not None:
                options["eta"] = p["eta"]
        if p["kind"] == "inpaint":
            return inpaint(
                self.model, self.config, p["image"], p["known_mask"], p["labels"], **options, **text, **common
            )
        return outpaint(
            self.model,
            self.config,
            p["image"],
            p["labels"],
            direction=p["direction"],
            times=p["times"],
            overlap=p["overlap"],
            **options,
            **text,
            **common,
        )


def _work(studio_ref: weakref.ref[Studio], jobs: queue.Queue[Job | None]) -> None:
    """The worker thread: run queued jobs until None arrives (`Studio.close`, or the studio's collection).

    It holds the studio only while running a job, so that an unclosed studio can still be collected."""
    while True:
        job = jobs.get()
        try:
            studio = studio_ref() if job is not None else None
            if studio is None:
                return
            studio._run_job(job)
            del studio
        finally:
            jobs.task_done()
