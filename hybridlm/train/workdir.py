"""A run's workdir: one run at a time in it, and history that no other run overwrites.

Lock: process 0 holds `<workdir>/.lock` for the run's life with flock(2). The kernel
releases it on any exit, SIGKILL included; the file records the holder (host, pid, start
time, command), so that a second run refuses naming it, and the next run can say that it
takes over from a process that ended without releasing it. Across hosts the lock holds
where the shared filesystem passes flock on to the server (NFSv4, Lustre, GPFS, CephFS; on
Linux NFS clients flock is a POSIX byte-range lock): docs/checkpoints.md says more.

History: a workdir whose metrics.jsonl has rows, or whose checkpoint directory holds
checkpoints, belongs to a run. A run that would not resume it (checkpoint.enabled=False,
or no checkpoint to resume from) would start metrics.jsonl over and replace config.json,
so it refuses, unless told to `restart`: then the old run is first moved aside, whole, to
`<workdir>.old-<time>/` (nothing is deleted). One exception, so that an unattended restart
is never stuck: rows of the same config that all precede the first checkpoint's step (the
run died before it) are an attempt that resumes at step 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

import ml_collections as mlc

from hybridlm import config as config_lib
from hybridlm.errors import UserError
from hybridlm.runs import checkpoint_steps

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _command() -> str:
    """This process's command line as the user typed it (`python -m hybridlm` and the
    console script both run hybridlm/__main__.py)."""
    program = "hybridlm" if sys.argv[0].endswith("hybridlm/__main__.py") else sys.argv[0]
    return shlex.join([program, *sys.argv[1:]])


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}: {holder.get('command')}")


class WorkdirLock:
    """`lock = WorkdirLock.acquire(workdir)` ... `lock.release()`; UserError if held."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, workdir: Path) -> WorkdirLock:
        path = workdir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserError(
                f"--workdir {workdir} is in use by another run ("
                f"{describe(holder) if holder else 'its holder is starting'}); let it finish "
                "or stop it, or choose another --workdir") from None
        previous = _read(fd)
        if previous:  # a holder that ended without releasing (SIGKILL, a crash)
            gone = ("is no longer running" if previous.get("host") != socket.gethostname()
                    or not _alive(int(previous.get("pid", 0))) else "no longer holds it")
            print(f"note: taking over the lock of {workdir} from {describe(previous)}, which "
                  f"{gone}", flush=True)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(fd, path)

    def release(self) -> None:
        """Clear the record (a clean exit) and unlock."""
        if self.fd < 0:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def _read(fd: int) -> dict:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"command": text[:200]}


# ---- history ---------------------------------------------------------------------------
def logged_steps(workdir: Path) -> list[int]:
    """The steps of metrics.jsonl's rows (a line cut short by a kill counts as none)."""
    path, steps = workdir / "metrics.jsonl", []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return steps


def stopped_before_first_checkpoint(cfg: mlc.ConfigDict, workdir: Path,
                                    steps: list[int]) -> bool:
    """Whether the rows are of this same config, stopped (killed, crashed) before its first
    checkpoint was due: then starting over is resuming from step 0."""
    saved = workdir / "config.json"
    first_save = min(cfg.checkpoint.every or cfg.train.steps, cfg.train.steps)
    try:
        same = json.loads(saved.read_text()) == json.loads(config_lib.to_json(cfg))
    except (OSError, ValueError):
        return False
    return same and cfg.checkpoint.enabled and max(steps) < first_save


def check_history(cfg: mlc.ConfigDict, workdir: Path, checkpoint_dir: Path) -> None:
    """Refuse a run that would overwrite another run's history without resuming it."""
    rows, steps = logged_steps(workdir), sorted(checkpoint_steps(checkpoint_dir))
    if not rows and not steps:
        return
    if cfg.checkpoint.enabled and steps:
        return  # it resumes this run
    if rows and not steps and stopped_before_first_checkpoint(cfg, workdir, rows):
        print(f"note: {workdir} holds {len(rows)} rows of this config that stopped before its "
              "first checkpoint; starting over from step 0 (the rows move to "
              "metrics.superseded.jsonl)", flush=True)
        return
    held = [f"metrics.jsonl with {len(rows)} rows"] if rows else []
    held += [f"checkpoints of steps {steps} in {checkpoint_dir}"] if steps else []
    why = ("checkpoint.enabled=False" if not cfg.checkpoint.enabled else
           f"there is no checkpoint to resume from in {checkpoint_dir}")
    raise UserError(
        f"--workdir {workdir} holds a run ({', '.join(held)}) that this one would not "
        f"resume ({why}), and would overwrite its config.json and metrics.jsonl; nothing was "
        "changed. Choose another --workdir, or add --restart to move the old run aside to "
        f"{workdir}.old-<time>/ (nothing is deleted)")


def move_aside(workdir: Path, checkpoint_dir: Path) -> Path | None:
    """--restart: move everything of the old run but the lock to `<workdir>.old-<time>/`
    (and a checkpoint.dir outside the workdir to `<dir>.old-<time>`); None if empty."""
    entries = [p for p in workdir.iterdir() if p.name != LOCK_FILE]
    outside = checkpoint_dir.is_dir() and workdir.absolute() not in checkpoint_dir.parents
    if not entries and not outside:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = workdir.parent / f"{workdir.name}.old-{stamp}"
    target.mkdir()
    for entry in entries:
        entry.rename(target / entry.name)
    if outside:
        checkpoint_dir.rename(checkpoint_dir.with_name(f"{checkpoint_dir.name}.old-{stamp}"))
    print(f"--restart: moved the previous run in {workdir} aside to {target}", flush=True)
    return target


def claim(cfg: mlc.ConfigDict, workdir: Path, checkpoint_dir: Path, *,
          restart: bool = False) -> WorkdirLock:
    """Create the workdir, lock it, and check (or, restarting, move aside) its history."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a directory; choose another")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {workdir} cannot be created: {e.strerror}") from None
    lock = WorkdirLock.acquire(workdir)
    try:
        if restart:
            move_aside(workdir, checkpoint_dir)
        else:
            check_history(cfg, workdir, checkpoint_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def check_disk_space(directory: Path, checkpoint_bytes: int, keep: int) -> None:
    """Refuse to start without room for one checkpoint (a save that fails mid-run costs
    every step since the last one); warn when there is no room for checkpoint.keep + 1."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < checkpoint_bytes * 1.05 + (1 << 20):
        raise UserError(
            f"checkpoint.dir {directory} has {free / 2**20:,.1f} MiB free, and one checkpoint "
            f"of this model takes about {checkpoint_bytes / 2**20:,.1f} MiB: free some space, "
            "or point --config.checkpoint.dir at a disk with room")
    if keep and free < checkpoint_bytes * (keep + 1):
        print(f"warning: {directory} has room for about {free // checkpoint_bytes} "
              f"checkpoints; checkpoint.keep={keep} keeps {keep + 1} at a time while the "
              "newest is written", flush=True)
