"""Sweeps: a list of points, each a config plus overrides, run into its own workdir.

A sweep file has `get_sweep(arg) -> list[dict]`; each dict has `config` (a config spec such
as `configs/paper.py:variant=rope`), optionally `name`, optionally `after` (hybridlm
commands run on the point's trained workdir, e.g. `["eval", "--task", "niah"]`; each gets
`--workdir`), optionally `init_from` (the name of an earlier point: this point is a new
stage that starts from that point's trained parameters, `train.init_from`), and
`section.field: value` overrides. A point and the stages that start from it form a chain,
which runs in order. Launchers:
  print  write the commands (one per line) and do nothing else
  local  run the chains here, `jobs` of them at a time; finished points are skipped and
         interrupted ones resume from their checkpoints
  slurm  write a job-array script (one array task per chain) and submit it with sbatch
The local launcher records each attempt in the point's workdir (`record_attempt`);
hybridlm/sweep_status.py reads the workdirs while points run (`hybridlm sweep --status`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hybridlm import config as config_lib
from hybridlm.errors import ConfigError


def load_sweep(spec: str) -> list[dict[str, Any]]:
    get_sweep, arg, path = config_lib.load_function(spec, "get_sweep")
    points = get_sweep(arg)
    if not isinstance(points, list) or not points:
        raise ConfigError(f"{path}: get_sweep must return a non-empty list of dicts")
    names = set()
    for i, point in enumerate(points):
        if not isinstance(point, dict) or "config" not in point:
            raise ConfigError(f"{path}: sweep point {i} must be a dict with a 'config' key")
        point.setdefault("name", point_name(point))
        if point["name"] in names:
            raise ConfigError(f"{path}: two sweep points are named {point['name']!r}")
        if point.get("init_from") is not None and point["init_from"] not in names:
            raise ConfigError(f"{path}: sweep point {point['name']!r} starts from "
                              f"{point['init_from']!r} (init_from), which is no earlier point")
        names.add(point["name"])
    return points


def chains(points: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The points grouped into chains: a point without init_from (or whose start is not
    among `points`: `--only` a later stage, its start already trained), then (in sweep order)
    the points that start from it or from a later stage of it."""
    out: list[list[dict[str, Any]]] = []
    chain_of: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        start = point.get("init_from")
        chain = chain_of.get(start) if start is not None else None
        if chain is None:
            chain = []
            out.append(chain)
        chain.append(point)
        chain_of[point["name"]] = chain
    return out


def point_name(point: dict[str, Any]) -> str:
    """A workdir-safe name from a point's config argument and overrides."""
    parts = [point["config"].partition(":")[2]] + [
        f"{k.split('.')[-1]}={v}" for k, v in point.items() if k not in NOT_OVERRIDES]
    return re.sub(r"[^A-Za-z0-9=._+-]+", "_", ",".join(p for p in parts if p)) or "point"


NOT_OVERRIDES = ("config", "name", "after", "init_from")


def command(point: dict[str, Any], root: Path, extra: list[str] = ()) -> list[str]:
    cmd = ["hybridlm", "train", "--config", point["config"], "--workdir",
           str(root / point["name"])]
    cmd += [f"--config.{o}" for o in overrides(point)]
    if point.get("init_from") is not None:
        cmd.append(f"--config.train.init_from={root / point['init_from']}")
    return cmd + list(extra)


def after_commands(point: dict[str, Any], root: Path) -> list[list[str]]:
    """The point's post-training commands, each pointed at its workdir."""
    return [["hybridlm", *map(str, args), "--workdir", str(root / point["name"])]
            for args in point.get("after", [])]


def full_command(point: dict[str, Any], root: Path, extra: list[str] = ()) -> str:
    """Training, then the after-commands, as one shell line."""
    return " && ".join(shlex.join(c) for c in
                       [command(point, root, extra), *after_commands(point, root)])


def is_finished(workdir: Path) -> bool:
    """A point is done when its metrics reached the resolved config's train.steps."""
    config, metrics = workdir / "config.json", workdir / "metrics.jsonl"
    if not config.exists() or not metrics.exists():
        return False
    steps = json.loads(config.read_text())["train"]["steps"]
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return bool(lines) and lines[-1].get("step", -1) >= steps


def overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in point.items() if k not in NOT_OVERRIDES]


def check_points(points: list[dict[str, Any]], extra: list[str] = ()) -> None:
    """Every point's config must load (and validate) before the first one starts (a later
    stage without its train.init_from, whose workdir does not exist yet)."""
    shared = [e.removeprefix("--config.") for e in extra if e.startswith("--config.")]
    for point in points:
        try:
            config_lib.load(point["config"], overrides(point) + shared)
        except ConfigError as e:
            raise ConfigError(f"sweep point {point['name']!r}: {e}") from None


def run(spec: str, launcher: str, root: Path, extra: list[str] = (),
        only: str | None = None, jobs: int = 1) -> int:
    """Run (local, `jobs` chains at a time), submit (slurm) or print the points' commands
    (`only`: one point and the stages that start from it)."""
    if launcher not in ("local", "slurm", "print"):
        raise ConfigError(f"--launcher {launcher!r}: choose local, slurm or print")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: run at least 1 chain at a time")
    points = load_sweep(spec)
    if only is not None:
        points = _only(points, only, root)
    check_points(points, extra)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"sweep": spec, "points": points,
                                                 "extra": list(extra)}, indent=2))
    if launcher == "print":
        for point in points:
            print(full_command(point, root, extra))
        return 0
    if launcher == "slurm":
        return _submit_slurm(spec, chains(points), root, extra)
    children = _Children()
    previous = {s: signal.signal(s, children.forward) for s in (signal.SIGTERM, signal.SIGINT)}
    numbers = {p["name"]: i + 1 for i, p in enumerate(points)}
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            statuses = list(pool.map(lambda c: _run_chain(c, root, extra, children, numbers),
                                     chains(points)))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    failed = next((s for s in statuses if s != 0), 0)
    if failed == 0:
        print(f"sweep: all {len(points)} points finished under {root}", flush=True)
    return failed


def _only(points: list[dict[str, Any]], only: str, root: Path) -> list[dict[str, Any]]:
    """The point `only` and the later stages that start from it."""
    by_name = {p["name"]: p for p in points}
    if only not in by_name:
        raise ConfigError(f"--only {only!r}: the sweep has no such point; it has "
                          f"{list(by_name)}")
    start = by_name[only].get("init_from")
    if start is not None and not is_finished(root / start):
        raise ConfigError(f"--only {only!r} starts from point {start!r}, which has not "
                          "finished training; run that one first")
    keep = {only}
    for p in points:
        if p.get("init_from") in keep:
            keep.add(p["name"])
    return [p for p in points if p["name"] in keep]


class _Children:
    """The running commands of a local sweep. SIGTERM/SIGINT sent to the sweep go to each
    (a training run saves a checkpoint and exits), nothing new starts, and the sweep waits
    for them instead of orphaning them."""

    def __init__(self):
        self.live: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def run(self, cmd: list[str]) -> int:
        with self.lock:
            if self.stopping:
                return 1
            child = subprocess.Popen(cmd)
            self.live.add(child)
        try:
            return child.wait()
        finally:
            with self.lock:
                self.live.discard(child)

    def forward(self, signum, frame) -> None:
        with self.lock:
            self.stopping = True
            for child in self.live:
                child.send_signal(signum)


def _run_chain(chain: list[dict[str, Any]], root: Path, extra, children: _Children,
               numbers: dict[str, int]) -> int:
    """Train each point of a chain (unless finished) and run its after-commands, in order;
    stop at the first failure."""
    for point in chain:
        if children.stopping:  # the sweep was signalled: start nothing, record nothing
            return 1
        workdir, label = root / point["name"], f"[{numbers[point['name']]}/{len(numbers)}]"
        if is_finished(workdir):
            print(f"{label} {point['name']}: trained, skipped", flush=True)
        else:
            print(f"{label} {point['name']}: running", flush=True)
            cmd = command(point, root, extra)
            record_attempt(workdir, "running")
            returncode = children.run([sys.executable, "-m", "hybridlm.cli", *cmd[1:]])
            record_attempt(workdir, "done" if is_finished(workdir) else
                           "failed" if returncode else "stopped", returncode)
            if returncode != 0:
                print(f"sweep: point {point['name']} failed with status {returncode}; "
                      "rerun the same command to resume it", file=sys.stderr)
                return returncode
            if not is_finished(workdir):  # e.g. stopped by SIGTERM after saving a checkpoint
                print(f"sweep: point {point['name']} stopped before its train.steps; rerun "
                      "the same command to resume it", file=sys.stderr)
                return 1
        returncode = run_after(point, root, children)
        if returncode != 0:
            return returncode
    return 0


def run_after(point: dict[str, Any], root: Path, children: _Children | None = None) -> int:
    """Each after-command once: a marker under WORKDIR/after/ records the ones that ran."""
    children = children or _Children()
    markers = root / point["name"] / "after"
    for k, cmd in enumerate(after_commands(point, root)):
        marker = markers / f"{k}.done"
        if marker.exists():
            continue
        print(f"  {point['name']}: {shlex.join(cmd[1:])}", flush=True)
        returncode = children.run([sys.executable, "-m", "hybridlm.cli", *cmd[1:]])
        if returncode != 0:
            print(f"sweep: {shlex.join(cmd)} failed with status {returncode}; rerun the "
                  "sweep to retry it", file=sys.stderr)
            return returncode
        markers.mkdir(exist_ok=True)
        marker.write_text(shlex.join(cmd) + "\n")
    return 0


def _array_task(spec: str, chain: list[dict[str, Any]], root: Path, extra) -> str:
    """A chain's array-task command: its one training run, or, when it has after-commands
    or later stages, this sweep restricted to it (which forwards SIGTERM to whichever
    command runs)."""
    first = chain[0]
    if len(chain) == 1 and not first.get("after"):
        return shlex.join(command(first, root, extra))
    return shlex.join(["hybridlm", "sweep", "--sweep", spec, "--root", str(root), "--launcher",
                       "local", "--only", first["name"], *extra])


def _submit_slurm(spec: str, point_chains, root: Path, extra) -> int:
    # sbatch's own SBATCH_* variables (SBATCH_PARTITION, SBATCH_TIMELIMIT, ...) add resources;
    # SIGTERM three minutes before the limit (B: the batch shell, which exec makes the
    # training process): the point saves, and a resubmission resumes it
    lines = ["#!/usr/bin/env bash", "#SBATCH --job-name=hybridlm-sweep",
             f"#SBATCH --array=0-{len(point_chains) - 1}", "#SBATCH --signal=B:TERM@180",
             f"#SBATCH --output={root}/%x-%A_%a.out", "set -euo pipefail",
             "cmds=("] + [f"  {shlex.quote(_array_task(spec, c, root, extra))}"
                          for c in point_chains]
    lines += [")", 'eval "exec ${cmds[$SLURM_ARRAY_TASK_ID]}"']
    script = root / "sweep.sbatch"
    script.write_text("\n".join(lines) + "\n")
    print(f"wrote {script}; submitting with sbatch; follow it with: "
          f"{shlex.join(['hybridlm', 'sweep', '--sweep', spec, '--root', str(root)])} "
          "--status", flush=True)
    try:
        return subprocess.run(["sbatch", str(script)]).returncode
    except FileNotFoundError:
        raise ConfigError(f"sbatch not found; submit {script} on the cluster yourself") from None


def point_summary(workdir: Path) -> dict[str, Any]:
    """Final training metrics and every eval result's `summary` scalars of one point."""
    row: dict[str, Any] = {}
    metrics = workdir / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        if lines:
            last = lines[-1]
            row.update({k: last.get(k) for k in ("step", "loss", "tokens_per_s")})
            vals = [x["val_loss"] for x in lines if x.get("val_loss") is not None]
            row["val_loss"] = vals[-1] if vals else None
    for result in sorted((workdir / "eval").glob("*.json")):
        data = json.loads(result.read_text())
        scalars = {**data, **data.get("summary", {})} if isinstance(data, dict) else {}
        row.update({f"{result.stem}/{k}": v for k, v in scalars.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return row


def summarize(spec: str, root: Path) -> Path:
    """summary.md, summary.csv and summary.png under root; returns the markdown path."""
    import csv

    points = load_sweep(spec)
    rows = {p["name"]: point_summary(root / p["name"]) for p in points}
    columns = sorted({k for r in rows.values() for k in r}, key=lambda k: ("/" in k, k))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["point", *columns])
        for name, r in rows.items():
            writer.writerow([name, *(r.get(c, "") for c in columns)])
    md = [f"Sweep `{spec}`: the last logged training step of each point (`-`: none yet).", "",
          "| point | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    md += [f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in columns) + " |"
           for name, r in rows.items()]
    (root / "summary.md").write_text("\n".join(md) + "\n")
    _plot(rows, root / "summary.png", spec)
    return root / "summary.md"


def _plot(rows: dict[str, dict[str, Any]], out: Path, spec: str) -> None:
    """Final training loss (and validation loss where there is one) per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    series = [c for c in ("loss", "val_loss") if any(rows[n].get(c) is not None for n in names)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.5))
    width = 0.8 / max(len(series), 1)
    for j, column in enumerate(series):
        values = [rows[n].get(column) for n in names]
        ax.bar([i + j * width for i in range(len(names))],
               [float("nan") if v is None else v for v in values], width, label=column)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names,
                  rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("\n".join(textwrap.wrap(f"sweep {spec}", 55)), fontsize=8)
    if series:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


ATTEMPT = "sweep_attempt.json"  # written into a point's workdir by the local launcher


def record_attempt(workdir: Path, state: str, returncode: int | None = None) -> None:
    """The local launcher's record of a point: running (with the sweep's host and pid, so
    that --status can tell a live run from a dead one), then done / stopped / failed."""
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"state": state, "host": socket.gethostname(), "pid": os.getpid(),
              "time": time.time(), "returncode": returncode}
    (workdir / ATTEMPT).write_text(json.dumps(record) + "\n")
