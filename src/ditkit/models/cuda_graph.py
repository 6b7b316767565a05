"""Replay a network's inference forward as a CUDA graph, one graph per input shape.

A DiT forward launches a few hundred small kernels (12 per block and more); at sampling batch sizes
a GPU finishes many of them faster than Python can launch the next, so the step time is the launch
time. A CUDA graph records the launches once and replays them with one call
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs). Sampling calls the network with the
same shapes at every step, which is exactly the case graphs serve.

`CUDAGraphForward(model)` is a drop-in for `model(x, t, y)` in inference: the first call at a new
(shapes, dtypes, autocast) key runs the model once on a side stream (allocator and kernel warm-up),
captures one forward into a graph whose inputs are static buffers, and from then on copies the
arguments into those buffers and replays. Every graph of one wrapper shares one memory pool. It
steps aside, calling the model eagerly, wherever a graph would be wrong or impossible: CPU tensors,
gradients enabled, a model in training mode, a torch.compile'd model, arguments other than tensors,
None and text conditions (`TextCond`, whose tensors get static buffers like any input), or keyword
arguments. Replay is the same kernels on the same data, so outputs equal eager ones
(`tests/test_cuda.py`, whose GPU tests run where CUDA is present).

Under autocast, eager PyTorch casts every linear and convolution weight to the autocast dtype at every
call, and a graph captured as is would replay those casts too (autocast's cache of cast weights cannot
be captured: it is freed when the caller's autocast region ends). The wrapper instead keeps its own
autocast-dtype copies of those weights (`WeightCasts`), runs the captured forward on them, and
refreshes a copy before a replay only when its weight has changed in place since (an optimizer or
EMA step, `load_state_dict`), which PyTorch's version counter on every tensor records. The cast is
the one autocast makes, so the numbers stay those of eager.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .fused import for_graph_capture
from .text import TextCond

__all__ = ["CUDAGraphForward", "WeightCasts"]

# The layers whose parameters autocast casts on every call (F.linear and the convolutions are on its
# lower-precision list; embeddings, norms and elementwise ops are not).
_CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class WeightCasts:
    """Copies of a model's linear and convolution weights in an autocast dtype, kept current.

    `tensors` maps parameter names to the copies, for `torch.func.functional_call`; `refresh()`
    re-casts, in place (so a captured graph sees the new values), each copy whose parameter was
    modified in place or replaced since the last cast. Parameters already in the dtype, and float64
    ones (which autocast leaves alone), are not copied.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self._entries: list[list] = []  # [module, attribute, copy, parameter seen, version seen]
        for prefix, module in model.named_modules():
            if not isinstance(module, _CAST_LAYERS):
                continue
            for attr, param in module.named_parameters(recurse=False):
                if param.dtype in (torch.float32, torch.float16, torch.bfloat16) and param.dtype != dtype:
                    copy = param.detach().to(dtype)
                    self.tensors[f"{prefix}.{attr}" if prefix else attr] = copy
                    self._entries.append([module, attr, copy, param, param._version])

    def refresh(self) -> int:
        """Re-cast the copies whose parameters changed since the last cast; returns how many did."""
        changed = 0
        for entry in self._entries:
            module, attr, copy, seen, version = entry
            param = module._parameters.get(attr)
            if param is not seen or param._version != version:
                if param is None or param.shape != copy.shape or param.device != copy.device:
                    now = "removed" if param is None else f"{tuple(param.shape)} on {param.device}"
                    before, after = f"{tuple(copy.shape)} on {copy.device}", now
                    raise RuntimeError(
                        f"parameter {attr!r} of {type(module).__name__} changed shape or device after a CUDA graph "
                        f"was captured ({before} -> {after}); wrap the model again"
                    )
                with torch.no_grad():
                    copy.copy_(param)
                entry[3], entry[4] = param, param._version
                changed += 1
        return changed


class _Captured:
    """One graph with its static inputs and output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor | None], output: torch.Tensor) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


class CUDAGraphForward:
    """`model(x, t, y)` replayed from CUDA graphs (fixed shapes, no grad); attributes read through to `model`."""

    def __init__(self, model: nn.Module, cast_weights: bool = True) -> None:
        self.model = model
        self.graphs: dict[tuple, _Captured] = {}
        self._pool = None
        # cast_weights=False replays autocast's per-call weight casts inside the graph (the benchmark's baseline).
        self.cast_weights = cast_weights
        self._casts: dict[torch.dtype, WeightCasts] = {}

    def __getattr__(self, name: str):
        # Only reached for attributes this wrapper lacks (config, null_class, ...): the model's.
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def _key(self, args: tuple) -> tuple | None:
        """The graph key of a call, or None when the call must run eagerly."""
        if torch.is_grad_enabled() or self.model.training or torch.compiler.is_compiling():
            return None
        if hasattr(self.model, "_orig_mod"):  # a torch.compile'd model: its mode="reduce-overhead" does graphs
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
            return None
        layout = _layout(args)
        if layout is None:
            return None
        key: list = [x.device]
        for leaf in _leaves(args):
            if leaf is None:
                key.append(None)
            elif leaf.device == x.device:
                key.append((tuple(leaf.shape), leaf.dtype))
            else:  # a tensor elsewhere: not captured
                return None
        amp = torch.is_autocast_enabled("cuda")
        key.append((layout, (amp, torch.get_autocast_dtype("cuda") if amp else None)))
        return tuple(key)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        key = None if kwargs else self._key(args)
        if key is None:
            return self.model(*args, **kwargs)
        embedder = getattr(self.model, "text_embedder", None)
        for a in args:  # what the text embedder checks eagerly, checked here: a graph cannot raise
            if isinstance(a, TextCond) and embedder is not None:
                embedder.check(a)
        with torch.cuda.device(args[0].device):  # the model's GPU, whichever is current
            captured = self.graphs.get(key)
            amp = key[-1][1]
            if captured is None:
                captured = self.graphs[key] = self._capture(args, amp)
            elif amp[0] and self.cast_weights:
                self._casts[amp[1]].refresh()
            for static, leaf in zip(captured.inputs, _leaves(args)):
                if static is not None:
                    static.copy_(leaf)
            captured.graph.replay()
        # A copy, so that the next replay (which rewrites the static output) cannot change what the
        # caller holds.
        return captured.output.clone()

    def _capture(self, args: tuple, amp: tuple[bool, torch.dtype | None]) -> _Captured:
        inputs = [None if leaf is None else leaf.clone() for leaf in _leaves(args)]
        static_args = _rebuild(args, inputs)
        # Autocast's cache of cast weights lives until the caller's autocast region ends; a graph that
        # read from it would read freed memory later. Capture with the cache off: the weights' casts
        # join the graph, unless (cast_weights, the default) the forward reads WeightCasts' copies.
        enabled, dtype = amp
        autocast = torch.autocast("cuda", dtype=dtype, cache_enabled=False) if enabled else contextlib.nullcontext()
        forward = self.model
        if enabled and self.cast_weights:
            casts = self._casts.get(dtype)
            if casts is None:
                casts = self._casts[dtype] = WeightCasts(self.model, dtype)
            else:
                casts.refresh()

            def forward(*a):  # the model, reading the autocast-dtype copies of its weights
                return torch.func.functional_call(self.model, casts.tensors, a, strict=False)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # warm-up off the capture: cuBLAS handles, allocator blocks, the fused kernels' compilation
        with torch.cuda.stream(side), autocast, for_graph_capture():
            forward(*static_args)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), autocast, for_graph_capture():
            output = forward(*static_args)
        return _Captured(graph, inputs, output)


def _layout(args: tuple) -> tuple | None:
    """The structure of a call's arguments (None, tensor, or a text condition with or without null
    rows), or None when an argument is of a kind graphs do not take."""
    layout = []
    for a in args:
        if a is None or isinstance(a, torch.Tensor):
            layout.append(None if a is None else "tensor")
        elif isinstance(a, TextCond):
            layout.append(("text", a.null is not None))
        else:
            return None
    return tuple(layout)


def _leaves(args: tuple) -> list[torch.Tensor | None]:
    """The tensors of a call's arguments in a fixed order (a TextCond gives tokens, mask, pooled, null)."""
    leaves: list[torch.Tensor | None] = []
    for a in args:
        if isinstance(a, TextCond):
            leaves.extend([a.tokens, a.mask, a.pooled, a.null])
        else:
            leaves.append(a)
    return leaves


def _rebuild(args: tuple, leaves: list[torch.Tensor | None]) -> tuple:
    """`args` with their tensors replaced, in `_leaves` order, by `leaves` (the graph's static buffers)."""
    rebuilt, i = [], 0
    for a in args:
        if isinstance(a, TextCond):
            rebuilt.append(TextCond(*leaves[i : i + 4]))
            i += 4
        else:
            rebuilt.append(leaves[i])
            i += 1
    return tuple(rebuilt)
