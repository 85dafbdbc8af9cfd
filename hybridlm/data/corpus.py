"""The built-in corpus: the Python standard library's own source files.

Real text that ships with every Python, so the default run needs no download: about
1,800 files, several hundred of them longer than 8k tokens, which is what long-context
training needs.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The stdlib's .py files in a fixed order (tests and site-packages excluded)."""
    root = stdlib_dir()
    skip = ("site-packages", "test", "tests", "idle_test", "__pycache__")
    files = [p for p in root.rglob("*.py")
             if not any(part in skip for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents() -> Iterator[str]:
    """Each stdlib source file as one document (undecodable bytes replaced)."""
    for path in stdlib_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield text
