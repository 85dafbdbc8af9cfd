"""Sweeps: a list of points, each a config plus overrides, run into its own workdir.

A sweep file has `get_sweep(arg) -> list[dict]`; each dict has `config` (a config spec such
as `configs/paper.py:variant=rope`), optionally `name`, and `section.field: value`
overrides. Launchers:
  print  write the commands (one per line) and do nothing else
  local  run the points one after another here; finished points are skipped and
         interrupted ones resume from their checkpoints
  slurm  write a job-array script (one array task per point) and submit it with sbatch
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from hybridlm.config import ConfigError, resolve_config_path


def load_sweep(spec: str) -> list[dict[str, Any]]:
    path_str, _, arg = spec.partition(":")
    path = resolve_config_path(path_str)
    module_spec = importlib.util.spec_from_file_location(f"hybridlm_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"sweep file {path} has no get_sweep(arg) function")
    points = module.get_sweep(arg or None)
    if not isinstance(points, list) or not points:
        raise ConfigError(f"{path}: get_sweep must return a non-empty list of dicts")
    names = set()
    for i, point in enumerate(points):
        if not isinstance(point, dict) or "config" not in point:
            raise ConfigError(f"{path}: sweep point {i} must be a dict with a 'config' key")
        point.setdefault("name", point_name(point))
        if point["name"] in names:
            raise ConfigError(f"{path}: two sweep points are named {point['name']!r}")
        names.add(point["name"])
    return points


def point_name(point: dict[str, Any]) -> str:
    """A workdir-safe name from a point's config argument and overrides."""
    parts = [point["config"].partition(":")[2]] + [
        f"{k.split('.')[-1]}={v}" for k, v in point.items() if k not in ("config", "name")]
    return re.sub(r"[^A-Za-z0-9=._+-]+", "_", ",".join(p for p in parts if p)) or "point"


def command(point: dict[str, Any], root: Path, extra: list[str] = ()) -> list[str]:
    cmd = ["hybridlm", "train", "--config", point["config"], "--workdir",
           str(root / point["name"])]
    cmd += [f"--config.{k}={v}" for k, v in point.items() if k not in ("config", "name")]
    return cmd + list(extra)


def is_finished(workdir: Path) -> bool:
    """A point is done when its metrics reached the resolved config's train.steps."""
    config, metrics = workdir / "config.json", workdir / "metrics.jsonl"
    if not config.exists() or not metrics.exists():
        return False
    steps = json.loads(config.read_text())["train"]["steps"]
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return bool(lines) and lines[-1].get("step", -1) >= steps


def run(spec: str, launcher: str, root: Path, extra: list[str] = ()) -> int:
    points = load_sweep(spec)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"sweep": spec, "points": points}, indent=2))
    if launcher == "print":
        for point in points:
            print(shlex.join(command(point, root, extra)))
        return 0
    if launcher == "slurm":
        return _submit_slurm(points, root, extra)
    if launcher != "local":
        raise ConfigError(f"--launcher {launcher!r}: choose local, slurm or print")
    for i, point in enumerate(points):
        workdir = root / point["name"]
        if is_finished(workdir):
            print(f"[{i + 1}/{len(points)}] {point['name']}: finished, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(points)}] {point['name']}: running", flush=True)
        cmd = command(point, root, extra)
        result = subprocess.run([sys.executable, "-m", "hybridlm.cli", *cmd[1:]])
        if result.returncode != 0:
            print(f"sweep: point {point['name']} failed with status {result.returncode}; "
                  "rerun the same command to resume it", file=sys.stderr)
            return result.returncode
    return 0


def _submit_slurm(points, root: Path, extra) -> int:
    lines = ["#!/usr/bin/env bash", f"#SBATCH --array=0-{len(points) - 1}",
             f"#SBATCH --output={root}/%x-%A_%a.out", "set -euo pipefail",
             "cmds=("] + [f"  {shlex.quote(shlex.join(command(p, root, extra)))}" for p in points]
    lines += [")", 'eval "${cmds[$SLURM_ARRAY_TASK_ID]}"']
    script = root / "sweep.sbatch"
    script.write_text("\n".join(lines) + "\n")
    print(f"wrote {script}; submitting with sbatch", flush=True)
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
    for result in sorted((workdir / "eval").glob("*.json")) if (workdir / "eval").exists() else []:
        summary = json.loads(result.read_text()).get("summary", {})
        row.update({f"{result.stem}/{k}": v for k, v in summary.items()
                    if isinstance(v, (int, float))})
    return row


def summarize(spec: str, root: Path) -> Path:
    """summary.md, summary.csv and summary.png under root; returns the markdown path."""
    import csv

    from hybridlm.eval import plots

    points = load_sweep(spec)
    rows = {p["name"]: point_summary(root / p["name"]) for p in points}
    columns = sorted({k for r in rows.values() for k in r}, key=lambda k: ("/" in k, k))
    with open(root / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["point", *columns])
        for name, r in rows.items():
            writer.writerow([name, *(r.get(c, "") for c in columns)])
    md = ["| point | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    md += [f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in columns) + " |"
           for name, r in rows.items()]
    (root / "summary.md").write_text("\n".join(md) + "\n")
    numeric = [c for c in ("val_loss", "loss") if any(r.get(c) is not None for r in rows.values())]
    if numeric:
        plots.bars({name: {c: r.get(c) for c in numeric} for name, r in rows.items()},
                   root / "summary.png", ylabel="loss (nats)", title=f"sweep {spec}")
    return root / "summary.md"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
