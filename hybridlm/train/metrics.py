"""Where training numbers go: metrics.jsonl, TensorBoard event files and the console."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsWriter:
    """One JSON object per logged step in <workdir>/metrics.jsonl, the same scalars in
    <workdir>/tb/, and a console line with the ETA."""

    def __init__(self, workdir: Path, total_steps: int, enabled: bool = True):
        self.enabled, self.total_steps = enabled, total_steps
        self.start = time.perf_counter()
        self._jsonl = self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, metrics: dict[str, Any], first_step: int = 0) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step" and value is not None:
                self._tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss",
                                    value, step)
        self._tb.flush()
        elapsed = time.perf_counter() - self.start
        done = max(step - first_step, 1)
        eta = elapsed / done * (self.total_steps - step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step" and v is not None)
        print(f"step {step}/{self.total_steps}  {shown}  eta {_fmt(eta)}", flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._tb.close()


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
