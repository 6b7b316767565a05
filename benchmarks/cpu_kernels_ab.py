"""Two versions of ditkit's C kernels, timed side by side in one process on a DiT pass.

    python benchmarks/cpu_kernels_ab.py --old HEAD~1 [--new WORKTREE] [--preset DiT-B/2]
        [--what sample train] [--repeats 9]

Each version of `src/ditkit/models/_cpu_kernels.c` (a git revision, a file, or `WORKTREE` for the
checked-out file) is compiled into its own library, and the two are swapped in before every call, in
interleaved rounds (old, new, old, ...): the machine's drift, which moves whole runs by several per cent
on this project's 2-core CPU, then falls on both alike. Only the C changes; the Python around it is the
working tree's, so the two versions must declare the same entry points (the script compares the two
sources' exported signatures and refuses otherwise).

`sample` times one inference forward at 2 x --batch (a guided sampling step) under bf16 autocast (or in plain
fp32 with `--precision fp32`) inside
`reuse_cast_weights` (the weights cast once, as in `generate`); `train` times forward + backward at
--batch (the training step without the optimizer). docs/speed.md reports what this measured.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from ditkit.bench import BenchSettings, interleaved_medians, paired_models, retain_freed_memory
from ditkit.config import MODEL_PRESETS
from ditkit.models import cpu_kernels, layers

SOURCE = "src/ditkit/models/_cpu_kernels.c"


def source_file(version: str, folder: Path) -> Path:
    """The C source of `version` (a git revision, a path, or WORKTREE) as a file."""
    if version == "WORKTREE":
        return cpu_kernels.SOURCE
    if Path(version).is_file():
        return Path(version)
    repo = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{version}:{SOURCE}"], cwd=repo, capture_output=True, text=True)
    if text.returncode != 0:
        raise SystemExit(f"--old/--new {version!r}: not a file, and git could not show {SOURCE} there: {text.stderr}")
    path = folder / f"{version.replace('/', '_')}.c"
    path.write_text(text.stdout)
    return path


def entry_points(path: Path) -> dict[str, str]:
    """The exported functions of a C source and their parameter lists (whitespace-normalised)."""
    found = re.findall(r"^(?:void|int32_t)\s+(ditkit_\w+)\(([^)]*)\)", path.read_text(), flags=re.M)
    return {name: " ".join(params.split()) for name, params in found}


def check_same_entry_points(old: Path, new: Path) -> None:
    """Both versions are called through the working tree's Python (ctypes): refuse where a signature differs,
    since a call with the other version's arguments would read garbage or crash."""
    a, b = entry_points(old), entry_points(new)
    differ = sorted(name for name in a.keys() & b.keys() if a[name] != b[name])
    if differ:
        raise SystemExit(
            f"the two versions' entry points differ ({', '.join(differ)}): the working tree's Python calls both "
            "with one set of arguments, so they cannot be timed against each other here"
        )


def build(path: Path):
    """The library compiled from `path` (cached like the package's own), with its entry points declared."""
    original = cpu_kernels.SOURCE
    cpu_kernels.SOURCE = path
    try:
        lib = cpu_kernels.load_library.__wrapped__()
    finally:
        cpu_kernels.SOURCE = original
    if lib is None:
        raise SystemExit(f"{path}: the kernels could not be built here (see the warning above)")
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="git revision, file, or WORKTREE")
    parser.add_argument("--new", default="WORKTREE", help="git revision, file, or WORKTREE (default)")
    parser.add_argument("--preset", default="DiT-B/2", choices=list(MODEL_PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--what", nargs="+", choices=["sample", "train"], default=["sample", "train"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast, or plain fp32")
    args = parser.parse_args()

    retain_freed_memory()  # as ditkit bench does: no page faults in either side's time
    with tempfile.TemporaryDirectory() as folder:
        sources = {name: source_file(version, Path(folder)) for name, version in (("old", args.old), ("new", args.new))}
        check_same_entry_points(sources["old"], sources["new"])
        libs = {name: build(path) for name, path in sources.items()}
    current = {"lib": libs["new"]}
    cpu_kernels.load_library = lambda: current["lib"]  # every kernel call looks the library up through this
    layers.cpu_kernels.load_library = cpu_kernels.load_library

    model, _, config = paired_models(BenchSettings(preset=args.preset, batch=args.batch), torch.device("cpu"))
    for what in args.what:
        n = 2 * args.batch if what == "sample" else args.batch
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, config.in_channels, *config.input_hw, generator=g)
        t = torch.rand(n, generator=g) * 999
        y = torch.randint(0, config.num_classes, (n,), generator=g)

        bf16 = args.precision == "bf16"

        def run(name: str, what: str = what):
            def call() -> None:
                current["lib"] = libs[name]
                if what == "sample":
                    model.eval()
                    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                        model(x, t, y)
                else:
                    model.train()
                    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                        out = model(x, t, y)
                    out.float().square().mean().backward()
                    model.zero_grad(set_to_none=True)

            return call

        with layers.reuse_cast_weights():
            seconds = interleaved_medians({"old": run("old"), "new": run("new")}, args.repeats, torch.device("cpu"))
        print(
            f"{args.preset} {what} {args.precision} (batch {n}): old {seconds['old'] * 1e3:.1f} ms, new {seconds['new'] * 1e3:.1f} ms, "
            f"old/new {seconds['old'] / seconds['new']:.3f}"
        )


if __name__ == "__main__":
    main()
