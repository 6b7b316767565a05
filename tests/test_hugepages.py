"""The huge-page restart: when it applies, what environment it sets, and that the restart really happens."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ditkit.utils.hugepages import TUNABLE, hugepage_environment

LINUX = dict(system="linux", libc=("glibc", "2.36"), thp_mode="madvise")


def test_sets_the_tunable_and_keeps_the_environment():
    env = hugepage_environment({"PATH": "/bin"}, **LINUX)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    env = hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"  # other tunables kept


@pytest.mark.parametrize(
    "environ, overrides",
    [
        ({"DITKIT_HUGEPAGES": "0"}, {}),  # opted out
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user chose already
        ({}, {"system": "darwin"}),
        ({}, {"libc": ("glibc", "2.31")}),  # the tunable arrived in 2.35
        ({}, {"libc": ("", "")}),  # musl and friends
        ({}, {"thp_mode": "always"}),  # every mapping gets huge pages already
        ({}, {"thp_mode": "never"}),
        ({}, {"thp_mode": None}),  # no THP in this kernel
    ],
)
def test_does_nothing_where_it_cannot_help(environ, overrides):
    assert hugepage_environment(environ, **{**LINUX, **overrides}) is None


def test_the_process_restarts_once_with_the_tunable():
    if hugepage_environment({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}) is None:
        pytest.skip("this machine gains nothing from the tunable (not glibc >= 2.35 with THP in madvise mode)")
    code = (
        "import os, sys; print('start', os.getpid(), flush=True)\n"
        "from ditkit.utils.hugepages import reexec_with_hugepages; reexec_with_hugepages()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DITKIT_HUGEPAGES")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    starts = [line for line in out.splitlines() if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # run twice, as the same process (execve)
    assert out.splitlines()[-1] == f"tunables {TUNABLE}"
