"""What a bench result records about where it ran: the CPU's name and the commit."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit(tree: str | Path | None = None) -> str | None:
    """The short commit of `tree` (default: this checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                              cwd=tree or Path(__file__).resolve().parent, capture_output=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
