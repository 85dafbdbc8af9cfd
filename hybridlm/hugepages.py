"""Run the process with glibc's malloc on transparent huge pages (the `hybridlm` entry point).

XLA's CPU runtime allocates a step's scratch (hundreds of MB for a training step) afresh
on every call. glibc serves such sizes with fresh mmaps, and the kernel then faults every
4 KB page in again: ~190k faults and ~0.7 s of system time per step of the reference
model on a 2-core machine. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35)
malloc asks for 2 MB pages instead: the faults vanish and the step runs ~10-15% faster
(docs/performance.md). A tunable is read when the process starts, so the entry point
re-executes itself once with it set (hybridlm/__main__.py). Nothing here imports jax.

Off with HYBRIDLM_HUGE_PAGES=0; skipped where it cannot apply (not Linux, not glibc,
glibc older than 2.35, transparent huge pages disabled, or the tunable already set).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def applies(environ: dict[str, str] | None = None) -> bool:
    """Whether re-executing with the tunable would change anything here."""
    env = os.environ if environ is None else environ
    if env.get("HYBRIDLM_HUGE_PAGES", "1") == "0" or TUNABLE in env.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux"):
        return False
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def reexec(argv: Sequence[str]) -> None:
    """Replace this process with `argv` under the tunable (same PID), if it applies."""
    if not applies():
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


def main() -> None:
    """The console script of installs made before it became `hybridlm.__main__:main`: runs
    `python -m hybridlm` in this process (which re-executes itself, if it applies)."""
    import runpy

    runpy.run_module("hybridlm", run_name="__main__", alter_sys=True)
