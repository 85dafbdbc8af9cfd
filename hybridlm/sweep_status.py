"""`hybridlm sweep --status`: where each point of a sweep is, read from the workdirs.

Works while points run, from any host that sees the sweep's root. A point is
  done     its metrics.jsonl reached its train.steps
  running  the local launcher that started it is alive (its record in the workdir names the
           host and pid) or, for points it did not start (slurm array tasks, by hand), its
           metrics.jsonl keeps growing
  failed   the local launcher saw it exit non-zero
  stopped  begun, none of the above (a rerun resumes it from its checkpoint)
  pending  not begun
The end-of-sweep report is the same table plus what to run next.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import time
from pathlib import Path
from typing import Any

from hybridlm import config as config_lib
from hybridlm.sweep import ATTEMPT, _fmt, load_sweep, overrides
from hybridlm.train.summary import read_metrics, validation

STATES = ("done", "running", "stopped", "failed", "pending")
STALE_S = 600  # without the launcher's record: no new metrics line for this long = not running


def _alive(record: dict) -> bool | None:
    """Whether the sweep process that started a point still runs (None: another host)."""
    if record.get("host") != socket.gethostname():
        return None
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that pid
        return True
    return True


def point_state(workdir: Path, steps: int, log_every: int, now: float) -> dict[str, Any]:
    """State, step, last losses and recent seconds per step of one point."""
    rows = read_metrics(workdir)
    last = rows[-1] if rows else {}
    final, _ = validation(rows)
    attempt = workdir / ATTEMPT
    record = json.loads(attempt.read_text()) if attempt.is_file() else {}
    times = [r["step_time_s"] for r in rows[-5:] if r.get("step_time_s")]
    step_s = sum(times) / len(times) if times else None
    touched = max([p.stat().st_mtime for p in (workdir / "metrics.jsonl", attempt)
                   if p.is_file()], default=None)
    quiet_for = STALE_S if step_s is None else max(STALE_S, 3 * step_s * log_every)
    fresh = touched is not None and now - touched < quiet_for
    step = last.get("step", 0)
    if step >= steps:
        state = "done"
    elif record.get("state") == "running":
        alive = _alive(record)
        state = "running" if alive or (alive is None and fresh) else "stopped"
    elif record.get("state") in ("failed", "stopped"):
        state = record["state"]
    elif rows:
        state = "running" if fresh else "stopped"
    else:
        state = "pending"
    return {"state": state, "step": step, "steps": steps, "loss": last.get("loss"),
            "val_loss": None if final is None else final["val_loss"], "step_s": step_s,
            "returncode": record.get("returncode")}


def status(spec: str, root: Path, extra: list[str] = ()) -> dict[str, dict[str, Any]]:
    """Every point's state and ETA: its remaining steps at its own recent step time, or, for
    a point that has not logged yet, at the tokens per second of the points that have.
    `extra`: the sweep's --config.* overrides (default: those it was launched with)."""
    saved = root / "sweep.json"
    launched = json.loads(saved.read_text()) if saved.is_file() else {}
    shared = [e.removeprefix("--config.") for e in (list(extra) or launched.get("extra", []))
              if e.startswith("--config.")]
    now, out, tokens = time.time(), {}, {}
    for point in load_sweep(spec):
        workdir = root / point["name"]
        if (workdir / "config.json").is_file():  # what the point actually runs
            cfg = json.loads((workdir / "config.json").read_text())
        else:
            cfg = config_lib.load(point["config"], overrides(point) + shared).to_dict()
        t = cfg["train"]
        tokens[point["name"]] = t.get("batch_size", 0) * cfg.get("data", {}).get("seq_len", 0)
        out[point["name"]] = point_state(workdir, t["steps"],
                                         cfg.get("log", {}).get("every", 1), now)
    rates = [tokens[n] / r["step_s"] for n, r in out.items() if r["step_s"] and tokens[n]]
    for name, r in out.items():
        left = r["steps"] - r["step"]
        r["estimated"] = not r["step_s"]
        if r["state"] == "done":
            r["eta_s"] = 0.0
        elif r["step_s"]:
            r["eta_s"] = left * r["step_s"]
        else:
            r["eta_s"] = (left * tokens[name] / (sum(rates) / len(rates))
                          if rates and tokens[name] else None)
    return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_status(spec: str, root: Path, points: dict[str, dict[str, Any]]) -> str:
    """The counts, a table (point, state, step/steps, loss, val_loss, ETA) and the total
    ETA ('~': estimated from the other points' speed)."""
    counts = {s: sum(r["state"] == s for r in points.values()) for s in STATES}
    lines = [f"sweep {spec} in {root}: " + ", ".join(f"{n} {s}" for s, n in counts.items())]

    def eta(r: dict) -> str:
        if r["state"] == "done":
            return "-"
        if r["eta_s"] is None:
            return "?"
        return ("~" if r["estimated"] else "") + _duration(r["eta_s"])

    table = [("point", "state", "step", "loss", "val_loss", "eta")]
    for name, r in points.items():
        state, code = r["state"], r["returncode"]
        if state == "failed" and code:  # a negative status: killed by that signal
            state += f" ({signal.Signals(-code).name})" if code < 0 else f" (status {code})"
        table.append((name, state, f"{r['step']}/{r['steps']}", _fmt(r["loss"]),
                      _fmt(r["val_loss"]), eta(r)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in table]
    left = [r["eta_s"] for r in points.values() if r["state"] != "done"]
    if left:
        total = "?" if None in left else "~" + _duration(sum(left))
        lines.append(f"remaining: {total} of training, one point after another")
    return "\n".join(lines)


def finished_summary(spec: str, root: Path, extra: list[str] = ()) -> str:
    """The end-of-sweep report: each point's final losses, and what to run next."""
    sweep = shlex.join(["hybridlm", "sweep", "--sweep", spec, "--root", str(root)])
    q = shlex.quote(str(root))
    return "\n".join([
        format_status(spec, root, status(spec, root, extra)), "next:",
        f"  {sweep} --summarize --report {shlex.quote(str(root / 'report.md'))}",
        f"  tensorboard --logdir {q}   # every point's curves side by side",
        f"  hybridlm eval --workdir {q}/POINT --task all"])
