"""`python -m hybridlm` and the `hybridlm` console script: set the process up, then the CLI.

Two things must happen before jax is imported, so they happen here rather than in cli.py:
glibc's malloc on huge pages (hugepages.py re-executes this module once) and no TPU probe
on a machine without a TPU (platforms.py). cli.py itself never runs as `__main__`
(`python -m hybridlm.cli` comes here too), so its error classes exist once.
"""

from __future__ import annotations

import os
import sys

INTERRUPTED = 130  # 128 + SIGINT, what shells report for a program stopped by Ctrl-C


def main() -> None:
    from hybridlm import hugepages, platforms

    hugepages.reexec(["-m", "hybridlm", *sys.argv[1:]])
    platforms.skip_absent_tpu()
    from hybridlm.cli import main as cli_main

    code = cli_main()
    if code >= INTERRUPTED:  # interrupted: XLA or Orbax threads may still run, and an
        sys.stdout.flush()  # interpreter shutting down under them can crash (exit 139)
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
