"""`ditkit bench`: ditkit's DiT against diffusers' `DiTTransformer2DModel`, side by side in one process.

Both models hold the same weights (ditkit's, exported through `ditkit.convert.diffusers`) and run at the
same batch, precision and settings. Timings are interleaved (A, B, A, B, ...) after a warm-up, and
medians are reported, so drift of the machine's speed hits both sides alike. Next to them the run
measures this machine's bf16 and fp32 GEMM rate (through PyTorch's `@` and, on CPU, oneDNN's matmul
directly; the faster is the reference), so achieved GFLOP/s can be read as a fraction of what matmuls
alone reach (on CUDA that fraction is the MFU against the measured, not the datasheet,
peak). FLOPs are 2 x the multiply-adds of `count_macs` (the paper's count), x3 for a training step
(forward + backward), x2 per sampling step with classifier-free guidance (the batched cond + uncond pass).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import resource  # POSIX: page-fault counts
except ImportError:  # Windows
    resource = None

from .config import MODEL_PRESETS, DiffusionConfig, ModelConfig
from .diffusion import NoiseProcess, build_process, diffusion_loss
from .models import DiT, count_macs
from .models.fused import fused_kernels_available, fused_kernels_enabled
from .models.layers import cpu_paths, reuse_cast_weights
from .utils.files import prepare_json_out

__all__ = [
    "BenchSettings",
    "run_bench",
    "paired_models",
    "paired_forwards",
    "interleaved_medians",
    "interleaved_measurements",
    "gemm_gflops",
    "gemm_backends",
    "gemm_rates",
    "saved_activation_bytes",
    "SavedBytes",
    "retain_freed_memory",
]


ALLOCATOR_MODES = ("retain", "system")
"""`BenchSettings.allocator` (`--allocator`): keep freed memory in glibc's malloc, or leave the C allocator alone."""


@dataclass
class BenchSettings:
    """What `ditkit bench` measures."""

    preset: str = "DiT-S/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    batch: int = 16
    precisions: tuple[str, ...] = ("fp32", "bf16")
    repeats: int = 5
    sample_steps: int = 50
    cfg_scale: float = 4.0
    what: tuple[str, ...] = ("train", "sample")
    gemm_size: int | None = None
    """Side of the reference GEMM; None: 2048 on CPU, 8192 on CUDA (big enough to reach the GPU's peak)."""
    device: str = "cpu"
    compile: bool = False
    """torch.compile both models (fixed shapes); compilation happens in the untimed warm-up."""
    cuda_graph: bool = True
    """ditkit's sampling replays the network from CUDA graphs on CUDA (`generate`'s default); False: eager."""
    allocator: str = "retain"
    """'retain': before timing, tell glibc's malloc to keep freed memory (`retain_freed_memory`), so that
    neither side's time includes faulting back pages the allocator returned to the OS (which side pays
    for that depends on what ran before it, docs/speed.md); 'system': leave the C allocator as it is."""

    def __post_init__(self) -> None:
        # Checked before anything runs: a bad count otherwise surfaces minutes later (after the GEMM
        # measurement and the training timings) or as a oneDNN error about an empty matmul.
        counts = {
            "batch (--batch)": self.batch,
            "repeats (--repeats)": self.repeats,
            "sample_steps (--steps)": self.sample_steps,
            "in_channels (--in-channels)": self.in_channels,
        }
        if self.gemm_size is not None:
            counts["gemm_size (--gemm-size)"] = self.gemm_size
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"bench setting {name} must be at least 1, got {value}")
        # More steps than the sampled process has timesteps would fail only when sampling starts, after
        # the GEMM and training timings.
        _sample_process().check_num_steps(self.sample_steps, name="bench setting sample_steps (--steps)")
        if not self.precisions or not self.what:
            raise ValueError("bench settings need at least one precision (--precision) and one workload (--what)")
        if self.cfg_scale == 1.0:
            # Guidance at scale 1 is one batch-N pass in ditkit, while diffusers' side always runs the
            # batched cond + uncond pass (and the FLOP count assumes it): the sides would differ 2x.
            raise ValueError("bench setting cfg_scale must not be 1: sampling is timed with guidance")
        if self.allocator not in ALLOCATOR_MODES:
            raise ValueError(
                f"bench setting allocator (--allocator) must be one of {ALLOCATOR_MODES}, got {self.allocator!r}"
            )


def _sample_process() -> NoiseProcess:
    """The noise process the bench trains and samples with: the default diffusion config's (1000 vp
    timesteps, as diffusers' DDIM scheduler on the other side)."""
    return build_process(DiffusionConfig())


def fused_state(triton_kernels: bool, gelu_epilogue: bool, compiled: bool = False) -> str:
    """What the bench prints about ditkit's fused GPU kernels (`models.fused`) on CUDA."""
    if compiled:  # models.fused steps aside while torch.compile traces, so neither route runs
        return "off under --compile (Inductor fuses these ops itself)"
    if triton_kernels:
        return "on (Triton norm+modulation and gated residual, cuBLASLt GELU epilogue)"
    if gelu_epilogue:
        return "Triton kernels off (Triton missing or unusable); cuBLASLt GELU epilogue on"
    return "off (DITKIT_FUSED_KERNELS=0)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(size: int, dtype: torch.dtype, device: torch.device, repeats: int = 5, backend: str = "aten") -> float:
    """Median GFLOP/s of a (size x size) @ (size x size) matmul in `dtype` on `device`.

    `backend` 'aten' is `a @ b` (BLAS, or oneDNN where PyTorch routes it there); 'onednn' calls oneDNN's
    matmul directly (CPU only), which on some CPUs is much faster than the BLAS for fp32.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    if backend == "onednn":
        b_t = b.t()  # oneDNN's linear takes the (out, in) weight: a @ b = linear(a, b^T)

        def product() -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")
    else:

        def product() -> torch.Tensor:
            return a @ b

    product()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        product()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def gemm_backends(device: torch.device) -> tuple[str, ...]:
    """The matmul routes `ditkit bench` measures on `device` (oneDNN's only on CPUs whose PyTorch has it)."""
    from .models.layers import _onednn_fp32

    return ("aten", "onednn") if device.type == "cpu" and _onednn_fp32() else ("aten",)


def gemm_rates(size: int, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """GFLOP/s of a size^3 GEMM through every route of `gemm_backends`; the max of them is the reference."""
    return {backend: gemm_gflops(size, dtype, device, backend=backend) for backend in gemm_backends(device)}


class SavedBytes:
    """Counts the bytes autograd saves for backward: each storage once, the `exclude`d ones (the model's
    parameters) not at all. Use `pack` as the pack hook of `torch.autograd.graph.saved_tensors_hooks`.

    Counting every saved tensor instead counted the weights a matmul saves, once per use, and the same
    activation once per op that saves it: ditkit read 7% below diffusers where the two are equal.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            key = t.untyped_storage().data_ptr()
        except RuntimeError:  # tensors without storage (e.g. some views under compile)
            return t
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t


def saved_activation_bytes(step: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the activations autograd saves for backward during `step()` (see `SavedBytes`)."""
    counter = SavedBytes(exclude)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = step()
    loss.backward()
    return counter.bytes


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Seconds per call of each function: one warm-up call each, then `repeats` rounds (A, B, A, B, ...), medians."""
    return {name: m["seconds"] for name, m in interleaved_measurements(fns, repeats, device).items()}


def interleaved_measurements(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, dict[str, float | None]]:
    """As `interleaved_medians`, with each function's median minor page faults per call next to its seconds.

    {name: {"seconds": s, "page_fault_mib": minor faults x the base page size, None where the OS does not
    count them}}. Page faults are the allocator's share of a CPU timing: memory the C allocator handed
    back to the OS is zeroed and mapped again, page by page, when it is next used. A fault that maps a
    transparent huge page counts as one base page, so with huge pages in use the figure is a lower bound.
    """
    for fn in fns.values():  # warm-up (allocations, kernel selection)
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            f0, t0 = _minor_faults(), time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if f0 is not None:
                faults[name].append(_minor_faults() - f0)
    return {
        name: {
            "seconds": statistics.median(times[name]),
            "page_fault_mib": statistics.median(faults[name]) * mmap.PAGESIZE / 2**20 if faults[name] else None,
        }
        for name in fns
    }


def _minor_faults() -> int | None:
    """This process's minor page faults so far (None where `resource` is missing, e.g. on Windows)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_ALLOCATOR_ENV = ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")  # fmt: skip
"""Environment variables that change the C allocator (jemalloc/tcmalloc preloads, glibc's tunables)."""


# glibc's mallopt parameters (malloc.h) and the values `retain_freed_memory` sets: never trim the heap's
# top (the largest int mallopt takes, 2 GiB), and serve blocks up to 1 GiB from the heap rather than from
# a fresh mmap that free() unmaps again. A fixed threshold also turns off glibc's dynamic threshold.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_RETAIN = {"M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 2**31 - 1), "M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, 2**30)}


def retain_freed_memory() -> dict[str, int] | None:
    """Make glibc's malloc keep the memory this process frees instead of handing it back to the OS.

    For the rest of the process's life; the same as starting it with `MALLOC_TRIM_THRESHOLD_` and
    `MALLOC_MMAP_THRESHOLD_` set (docs/speed.md). A freed block is then reused as it is, where otherwise
    its next use can fault every page back in, zeroed. Returns the mallopt settings glibc accepted, or
    None where the C library is not glibc (macOS, Windows, musl); an allocator preloaded in its place
    (jemalloc, tcmalloc) ignores them.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    mallopt = ctypes.CDLL(None).mallopt  # this process's own C library
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return {name: value for name, (param, value) in _RETAIN.items() if mallopt(param, value) == 1}


def paired_models(settings: BenchSettings, device: torch.device) -> tuple[DiT, torch.nn.Module, ModelConfig]:
    """ditkit's DiT for `settings` (random weights off adaLN-Zero's identity start) and its diffusers export."""
    from .convert.diffusers import to_diffusers

    if settings.preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {settings.preset!r}; choose from {', '.join(MODEL_PRESETS)}")
    config = ModelConfig(
        input_size=settings.input_size,
        in_channels=settings.in_channels,
        num_classes=settings.num_classes,
        **MODEL_PRESETS[settings.preset],
    )
    torch.manual_seed(0)
    ours = DiT(config)
    with torch.no_grad():  # leave adaLN-Zero's identity init so every layer does real work
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    theirs = to_diffusers(ours)
    return ours.to(device), theirs.to(device), config


def paired_forwards(
    ours: DiT, theirs: torch.nn.Module, batch: int, device: torch.device
) -> dict[str, Callable[[], torch.Tensor]]:
    """One forward of each model (`paired_models`) on the same random inputs of `batch` images; the
    caller chooses grad mode and autocast around the calls."""
    c = ours.config
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, c.in_channels, *c.input_hw, generator=g, device=device)
    t = torch.randint(0, 1000, (batch,), generator=g, device=device)
    y = torch.randint(0, c.num_classes, (batch,), generator=g, device=device)
    return {
        "ditkit": lambda: ours(x, t.float(), y),
        "diffusers": lambda: theirs(x, timestep=t, class_labels=y).sample,
    }


def _train_steps(ours: DiT, theirs: torch.nn.Module, settings: BenchSettings, precision: str, device: torch.device):
    """One full training step (eps loss, backward, AdamW) for each implementation, same data and noise."""
    from .train import make_adamw

    process = _sample_process()
    c = ours.config
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(settings.batch, c.in_channels, *c.input_hw, generator=g, device=device)
    y = torch.randint(0, c.num_classes, (settings.batch,), generator=g, device=device)
    # AdamW with the kernel `ditkit train` uses by default (fused where PyTorch has it), on both sides.
    optimizers = {
        "ditkit": make_adamw([p for p in ours.parameters() if p.requires_grad], lr=1e-4),
        "diffusers": make_adamw(list(theirs.parameters()), lr=1e-4),
    }

    their_model = _compiled(theirs, settings)

    def eager_diffusers(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, generator=None) -> torch.Tensor:
        return theirs(x_t, timestep=t, class_labels=labels).sample

    def diffusers_forward(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, generator=None) -> torch.Tensor:
        return their_model(x_t, timestep=t, class_labels=labels).sample

    forwards = {"ditkit": _compiled(ours, settings), "diffusers": diffusers_forward}

    def loss_of(name: str, eager: bool = False) -> torch.Tensor:
        forward = (ours if name == "ditkit" else eager_diffusers) if eager else forwards[name]
        with _autocast(device, precision):
            return diffusion_loss(forward, process, x0, y, generator=torch.Generator(device).manual_seed(1))

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            loss = loss_of(name)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()

        return run

    ours.train()
    theirs.train()
    # No label dropout on either side: ditkit.train draws it outside the model, so ditkit's embedder is
    # off, and each diffusers block's class embedder would otherwise drop labels with its own draws.
    if ours.y_embedder is not None:
        ours.y_embedder.eval()
    from diffusers.models.embeddings import LabelEmbedding

    for module in theirs.modules():
        if isinstance(module, LabelEmbedding):
            module.eval()
    # Saved activations of the eager models (saved-tensor hooks do not see inside compiled graphs).
    params = {"ditkit": list(ours.parameters()), "diffusers": list(theirs.parameters())}
    memory = {name: saved_activation_bytes(lambda n=name: loss_of(n, eager=True), params[name]) for name in forwards}
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    return {name: step(name) for name in forwards}, memory


def _sample_runs(ours: DiT, theirs: torch.nn.Module, settings: BenchSettings, precision: str, device: torch.device):
    """DDIM with classifier-free guidance: ditkit's generate vs diffusers' model + DDIMScheduler."""
    from diffusers import DDIMScheduler

    c = ours.config
    labels = torch.arange(settings.batch, device=device) % c.num_classes
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    ours.eval()
    theirs.eval()
    freeze = device.type == "cpu"  # see _compiled
    our_model, their_model = _compiled(ours, settings, freeze), _compiled(theirs, settings, freeze)

    @torch.no_grad()
    def run_ours() -> None:
        with _autocast(device, precision):
            _ditkit_ddim(our_model, labels, settings, device)

    @torch.no_grad()
    def run_theirs() -> None:
        scheduler.set_timesteps(settings.sample_steps)
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(settings.batch, c.in_channels, *c.input_hw, generator=g, device=device)
        class_in = torch.cat([labels, torch.full_like(labels, c.num_classes)])
        with _autocast(device, precision):
            for t in scheduler.timesteps:
                t_in = t.expand(2 * len(x)).to(device)
                out = their_model(torch.cat([x, x]), timestep=t_in, class_labels=class_in).sample
                eps_c, eps_u = out[:, : c.in_channels].float().chunk(2)
                eps = eps_u + settings.cfg_scale * (eps_c - eps_u)
                x = scheduler.step(eps, t, x).prev_sample

    return {"ditkit": run_ours, "diffusers": run_theirs}


def _compiled(model: torch.nn.Module, settings: BenchSettings, freeze: bool = False):
    """`model`, or its torch.compile'd form (fixed shapes) when the bench compiles.

    `freeze`: Inductor's freezing (weights folded in as constants: bf16 casts done once, oneDNN weights
    prepacked), the mode meant for CPU inference. The compiled graph keeps the weights it was compiled
    with, so only for sampling, which changes none.
    """
    if not settings.compile:
        return model
    return torch.compile(model, dynamic=False, options={"freezing": True} if freeze else None)


def _ditkit_ddim(model: DiT, labels: torch.Tensor, settings: BenchSettings, device: torch.device) -> None:
    """What `ditkit.sampling.generate` runs (guided DDIM, batched cond + uncond pass), minus decoding."""
    from .diffusion import ModelDenoiser
    from .models.cuda_graph import CUDAGraphForward
    from .samplers import ClassifierFreeGuidance, sample_ddim

    process = _sample_process()
    # As `generate` does (sample.cuda_graph); the wrapper itself steps aside on CPU and for a compiled model.
    network = CUDAGraphForward(model) if settings.cuda_graph else model
    denoiser = ClassifierFreeGuidance(ModelDenoiser(network, process), settings.cfg_scale)
    c = model.config
    g = torch.Generator(device).manual_seed(0)
    x = process.prior((len(labels), c.in_channels, *c.input_hw), generator=g, device=device)
    with reuse_cast_weights():
        sample_ddim(denoiser, x, settings.sample_steps, cond=labels, generator=g)


def run_bench(settings: BenchSettings, progress: Callable[[str], None] = print) -> dict:
    """Measure everything `settings` asks for; returns the JSON-able results."""
    device = torch.device(settings.device)
    mallopt = retain_freed_memory() if settings.allocator == "retain" else None
    if settings.allocator == "retain" and mallopt is None:
        progress("allocator: not glibc, left as it is (page faults below may differ between the sides)")
    ours, theirs, config = paired_models(settings, device)
    macs = count_macs(config)
    results: dict = {
        "settings": {**settings.__dict__, "precisions": list(settings.precisions), "what": list(settings.what)},
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        # the CPU kernels ditkit's DiT takes here depend on the CPU (models.layers.cpu_paths)
        "cpu_paths": cpu_paths() if device.type == "cpu" else None,
        "allocator_env": {k: os.environ[k] for k in _ALLOCATOR_ENV if k in os.environ},
        "allocator_mallopt": mallopt,
        "gmacs_per_forward": macs / 1e9,
        "compiled": settings.compile,
        # ditkit's fused GPU kernels (models.fused): the Triton norm+modulation and gated residual, and
        # the cuBLASLt GELU epilogue of inference's fc1, which needs no Triton and so is recorded apart;
        # DITKIT_FUSED_KERNELS=0 times ditkit without either, and so does --compile: models.fused steps
        # aside while torch.compile traces (Inductor generates its own fused kernels).
        "fused_kernels": device.type == "cuda"
        and not settings.compile
        and fused_kernels_enabled()
        and fused_kernels_available(device),
        "gelu_epilogue": device.type == "cuda" and not settings.compile and fused_kernels_enabled(),
        "gemm_gflops": {},
        "gemm_gflops_by_backend": {},
        "runs": [],
    }
    gemm_size = settings.gemm_size or (8192 if device.type == "cuda" else 2048)
    results["settings"]["gemm_size"] = gemm_size
    if device.type == "cuda":
        state = fused_state(results["fused_kernels"], results["gelu_epilogue"], settings.compile)
        progress(f"ditkit's fused GPU kernels: {state}")
    elif device.type == "cpu":
        paths = results["cpu_paths"]
        progress(
            f"CPU: {paths['cpu_model'] or 'unknown model'} (AMX: {'yes' if paths['amx'] else 'no'}); ditkit's "
            f"fp32 linears: {paths['fp32_linear']}, inference attention: {paths['fp32_inference_attention']}; "
            f"bf16 inference linears: {paths['bf16_inference_linear']}, "
            f"attention: {paths['bf16_inference_attention']}, GELU: {paths['bf16_inference_gelu']}; bf16 training "
            f"attention: {paths['bf16_training_attention']}"
        )
    for precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        rates = gemm_rates(gemm_size, dtype, device)
        results["gemm_gflops_by_backend"][precision] = rates
        results["gemm_gflops"][precision] = max(rates.values())  # the fractions are of the faster route
        listed = ", ".join(f"{b} {r:.0f}" for b, r in rates.items())
        progress(f"GEMM {gemm_size}^3 {precision}: {listed} GFLOP/s")
    for precision in settings.precisions:
        if "train" in settings.what:
            fns, memory = _train_steps(ours, theirs, settings, precision, device)
            measured = interleaved_measurements(fns, settings.repeats, device)
            flops = 3 * 2 * macs * settings.batch
            results["runs"].append(_record("train", precision, measured, flops, settings.batch, results, memory))
            _report(results["runs"][-1], progress, settings.allocator)
        if "sample" in settings.what:
            fns = _sample_runs(ours, theirs, settings, precision, device)
            measured = interleaved_measurements(fns, settings.repeats, device)
            flops = 2 * 2 * macs * settings.batch * settings.sample_steps
            results["runs"].append(_record("sample", precision, measured, flops, settings.batch, results, None))
            _report(results["runs"][-1], progress, settings.allocator)
    return results


def _record(kind, precision, measured, flops, batch, results, memory) -> dict:
    gemm = results["gemm_gflops"]["bf16" if precision != "fp32" else "fp32"]
    med = {name: m["seconds"] for name, m in measured.items()}
    record = {"kind": kind, "precision": precision, "seconds": med, "speedup": med["diffusers"] / med["ditkit"]}
    faults = {name: m["page_fault_mib"] for name, m in measured.items()}
    if all(v is not None for v in faults.values()):  # host-side faults (the CUDA case included)
        record["page_fault_mib_per_iteration"] = faults
    record["img_per_s"] = {name: batch / s for name, s in med.items()}
    record["gflops"] = {name: flops / s / 1e9 for name, s in med.items()}
    record["fraction_of_gemm"] = {name: v / gemm for name, v in record["gflops"].items()}
    if memory is not None:
        record["saved_activation_mib"] = {name: b / 2**20 for name, b in memory.items()}
    return record


FAULT_NOTE_MIB = 64
"""Page faults per iteration, one side against the other, from which `ditkit bench` prints a note."""


def _report(record: dict, progress: Callable[[str], None], allocator: str) -> None:
    progress(_line(record))
    faults = record.get("page_fault_mib_per_iteration")
    if faults and abs(faults["ditkit"] - faults["diffusers"]) >= FAULT_NOTE_MIB:
        remedy = (
            "even with --allocator retain: glibc still maps and frees some blocks itself, e.g. in a worker "
            "thread's arena"
            if allocator == "retain"
            else "--allocator retain keeps most of it out on glibc"
        )
        progress(
            f"  note: ditkit faulted {faults['ditkit']:.0f} MiB of pages per iteration, diffusers "
            f"{faults['diffusers']:.0f}: the C allocator is part of this ratio (docs/speed.md, "
            f"'The C allocator's share'; {remedy})"
        )


def _line(r: dict) -> str:
    mem = ""
    if "saved_activation_mib" in r:
        mem = " | activations MiB " + " vs ".join(f"{v:.0f}" for v in r["saved_activation_mib"].values())
    if "page_fault_mib_per_iteration" in r:
        mem += " | page faults MiB/iter " + " vs ".join(f"{v:.0f}" for v in r["page_fault_mib_per_iteration"].values())
    return (
        f"{r['kind']:6s} {r['precision']:4s} ditkit {r['img_per_s']['ditkit']:7.2f} img/s "
        f"({r['fraction_of_gemm']['ditkit']:.0%} of GEMM) | diffusers {r['img_per_s']['diffusers']:7.2f} img/s "
        f"({r['fraction_of_gemm']['diffusers']:.0%}) | ditkit/diffusers {r['speedup']:.2f}x{mem}"
    )


def write_json(results: dict, path: str | Path) -> Path:
    """Write the results of `run_bench` as JSON to a new file (`prepare_json_out`: missing folders are
    created; an existing file is refused, not overwritten)."""
    out = prepare_json_out(str(path))
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


def cuda_script_device(parser: argparse.ArgumentParser, json_out: str | None) -> torch.device:
    """The GPU a CUDA-only benchmark script (`benchmarks/`) runs on, after refusing (`parser.error`) an
    existing `--json` file before anything is measured, and a machine without a CUDA GPU."""
    if json_out:  # refused now, not after the whole run: an existing file is never overwritten
        try:
            prepare_json_out(json_out)
        except ValueError as err:
            parser.error(str(err))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    return torch.device("cuda")


def write_rows(path: str | Path, settings: dict, rows: list) -> Path:
    """A benchmark script's results (`benchmarks/`): the device, PyTorch's version, the settings and
    the measured rows, written by `write_json` (to a new file only)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return write_json({"device": device, "torch": torch.__version__, "settings": settings, "rows": rows}, path)
