"""One training code path for 1 process, DDP and FSDP2, with randomness that ignores the world size.

Implements data-parallel training as in PyTorch's DistributedDataParallel (Li et al. 2020,
https://arxiv.org/abs/2006.15704) and fully sharded data parallelism (FSDP2, `fully_shard`; Zhao et
al. 2023, https://arxiv.org/abs/2304.11277), launched by `torchrun` through the `env://` protocol.

Rank-invariant randomness. Every random draw of a training step (timestep, noise, flip, label
dropout) for the sample at position `j` of global batch number `b` comes from its own stream seeded by
`stream_seed(seed, b, j)`. A rank draws only the positions it owns, so a step sees the same draws
whether the global batch is computed by 1 process, by N ranks, or in gradient-accumulation pieces:
the world size changes only the floating-point summation order. The streams are counter-based (a
function of the data position), so the training randomness has no state to save beyond the data
position a checkpoint already holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "choose_device",
    "init_distributed",
    "resolve_device",
    "shutdown_distributed",
    "wrap_model",
    "full_state_dict",
    "full_optimizer_state",
    "load_full_optimizer_state",
    "local_tensor",
    "stream_seed",
    "draw_streams",
    "draw_normal",
    "all_sum",
    "barrier",
    "full_tensor",
    "grad_sync",
    "tf32",
    "shard_blocks",
]

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics, samples and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use (launched by torchrun with WORLD_SIZE set)."""
        return self.world_size > 1 or dist.is_initialized()


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is passed to torch.device, and must be a
    device this machine has (ValueError naming the value otherwise, instead of a failure deep inside)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a device name ('auto', 'cpu', 'cuda', 'cuda:1', ...): {err}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: this machine (or this PyTorch build) has no CUDA GPU; use 'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine")
    return device


def choose_device(name: str, world_size: int, local_rank: int) -> torch.device:
    """The device of this process for train.device=`name`, checked by `resolve_device` in every case.

    A single process takes that device (a bare 'cuda' becomes the current GPU: set_device needs an
    index). Under torchrun (`world_size` > 1) a rank runs on the CPU, or on the GPU numbered
    `local_rank` (LOCAL_RANK), which must exist; other device types have no tested backend here and
    are refused, instead of training on the CPU over gloo as they once did without a word.
    """
    device = resolve_device(name)
    if world_size == 1:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(
            f"train.device={name!r}: {device.type} devices are not supported under torchrun "
            f"(WORLD_SIZE={world_size}); use 'cpu' or 'cuda'"
        )
    if device.index is not None:
        raise ValueError(
            f"train.device={name!r} names one GPU, but under torchrun each rank takes the GPU numbered "
            f"by its LOCAL_RANK; use 'cuda' or 'auto'"
        )
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise ValueError(
            f"LOCAL_RANK={local_rank} has no GPU of its own: this machine has {count} CUDA GPU(s) (cuda:0 to "
            f"cuda:{count - 1}), and each rank takes the GPU numbered by its LOCAL_RANK; start at most {count} "
            f"processes per node (torchrun --nproc-per-node) or train on 'cpu'"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device_name: str = "auto") -> DistEnv:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, ...), if any.

    Without WORLD_SIZE this is a plain single process. Under torchrun each rank takes the GPU
    numbered LOCAL_RANK with NCCL, or the CPU with gloo (`choose_device`). A process group that is
    already initialised is reused (and left for its owner to destroy).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name, world_size, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world_size, local_rank, device)


def shutdown_distributed(owned: bool) -> None:
    """Destroy the process group if this run created it."""
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op on a single process)."""
    if env.distributed:
        dist.barrier()


def all_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a small tensor over ranks (a copy; the input is untouched)."""
    values = values.detach().clone()
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def wrap_model(model: nn.Module, env: DistEnv, parallel: str) -> nn.Module:
    """DDP (a wrapper; `model` stays the plain module) or FSDP2 (`model` itself is sharded in place).

    On a single process the model is returned as is, for either setting.
    """
    if not env.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp":
        shard_blocks(model, env.device)
        return model
    raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def shard_blocks(model: nn.Module, device: torch.device) -> None:
    """Apply FSDP2 to each transformer block, then to the root (embedders and final layer), sharded over
    all ranks on `device`'s type.

    The mesh is explicit: `fully_shard`'s default mesh is on CUDA whenever a GPU is visible, so CPU
    training under torchrun on a machine with fewer GPUs than ranks failed with 'invalid device ordinal'
    (found on a one-GPU machine).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unwrapped, unsharded CPU state dict of the plain module; a collective under FSDP.

    Every rank must call it; the tensors are complete on rank 0 (other ranks may get an empty dict).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer state keyed by parameter names (not indices); a collective, complete on rank 0."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a name-keyed full optimizer state (every rank passes the whole dict; FSDP shards it)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def stream_seed(seed: int, batch_index: int, position: int) -> int:
    """Seed of the random stream of sample `position` in global batch `batch_index` (SplitMix64 mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + batch_index * 0xD1B54A32D192ED03 + position * 0xABC98388FB8FAC03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def draw_streams(
    process: Any,
    shape: tuple[int, ...],
    positions: range,
    *,
    seed: int,
    batch_index: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample training draws for `positions` of one global batch: (t, noise, u_flip, u_drop).

    t is (n,) from `process.sample_t`, noise (n, *shape) standard normal, u_flip and u_drop (n,)
    uniforms in [0, 1) for the horizontal flip and the label dropout.
    """
    g = torch.Generator(device)
    t, noise, uniforms = [], [], []
    for j in positions:
        g.manual_seed(stream_seed(seed, batch_index, j))
        t.append(process.sample_t(1, generator=g, device=device))
        noise.append(torch.randn((1, *shape), generator=g, device=device))
        uniforms.append(torch.rand(1, 2, generator=g, device=device))
    u = torch.cat(uniforms)  # (n, 2)
    return torch.cat(t), torch.cat(noise), u[:, 0], u[:, 1]


def draw_normal(
    shape: tuple[int, ...],
    positions: range,
    *,
    seed: int,
    batch_index: int,
    device: torch.device,
    salt: int,
) -> torch.Tensor:
    """(n, *shape) standard normals, one per position of the global batch, from a stream keyed by `salt`.

    A second family of per-sample streams beside `draw_streams` (e.g. the VAE posterior draw of a latent
    image), independent of it and, like it, the same whatever the number of processes.
    """
    g = torch.Generator(device)
    out = []
    for j in positions:
        g.manual_seed(stream_seed(seed + 7919 * salt, batch_index, j))
        out.append(torch.randn((1, *shape), generator=g, device=device))
    return torch.cat(out)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (replicated or sharded) DTensor, or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, env: DistEnv, enabled: bool) -> Iterator[None]:
    """Forward+backward inside this block reduce gradients across ranks only when `enabled`.

    Gradient accumulation runs its first micro-batches with `enabled=False` (DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync(False)`) and communicates once, on the last.
    """
    if not env.distributed or enabled:
        if hasattr(wrapped, "set_requires_gradient_sync"):
            wrapped.set_requires_gradient_sync(True)
        yield
    elif hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(False)
        yield
    else:
        yield


@contextlib.contextmanager
def tf32(device: torch.device, enabled: bool) -> Iterator[None]:
    """Within the context, CUDA matmuls and convolutions use TF32 tensor cores if `enabled` (train.tf32)
    and full fp32 if not. PyTorch's own defaults are mixed (cuDNN convolutions may use TF32, cuBLAS
    matmuls may not), so False is not "leave alone": it makes both fp32, which is what evaluation's
    feature networks run under. The process's previous flags come back on exit, so no global switch
    is left behind for the user's later work. Nothing to do on CPU."""
    if device.type != "cuda":
        if enabled:
            log.warning("train.tf32=true has no effect on %s", device)
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
