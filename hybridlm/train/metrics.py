"""Where training numbers go: metrics.jsonl, TensorBoard event files and the console.

MFU (model FLOPs utilisation) is the analytic training FLOPs per token
(`hybridlm.model.flops_per_token`: 6N plus attention, honouring windows) times tokens per
second, over the peak of all devices. Peaks are dense bfloat16 FLOP/s per chip from the
vendors' data sheets; a CPU has no entry, so its MFU is null unless `log.peak_flops` says.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

# device_kind substring (lower case) -> dense bf16 peak FLOP/s of one chip.
# Order matters: the first matching entry wins ("v5 lite" before "v5").
PEAK_FLOPS = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("a100", 312e12),
    ("h100", 989e12),  # SXM; dense (no sparsity)
    ("h200", 989e12),
)


def peak_flops(device: jax.Device) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPUs)."""
    kind = device.device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_device: float | None,
        num_devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None without a known peak."""
    if not peak_per_device:
        return None
    return tokens_per_s * flops_per_token / (peak_per_device * num_devices)


def peak_memory_gb(devices: list[jax.Device]) -> float | None:
    """Largest peak allocation over this process's devices, where the platform says."""
    peaks = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 1e9 if peaks else None


def _clean(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def set_aside_rows_after(path: Path, step: int) -> None:
    """A resumed run logs the steps after its checkpoint again: the rows of those steps that
    the stopped run logged (and any line a kill cut short) move, verbatim, to
    metrics.superseded.jsonl beside it, so that metrics.jsonl reads as one run and nothing
    logged is lost. The rewrite is atomic (a new file renamed over the old)."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if keep(line)]
    if len(kept) == len(lines):
        return
    with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
        f.writelines(line if line.endswith("\n") else line + "\n"
                     for line in lines if not keep(line))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsWriter:
    """One JSON object per logged step in <workdir>/metrics.jsonl, the same scalars in
    <workdir>/tb/, a console line per log with the ETA, and a progress bar on terminals.

    Only process 0 writes (`enabled=False` elsewhere).
    """

    def __init__(self, workdir: Path, total_steps: int, first_step: int = 0,
                 enabled: bool = True):
        self.enabled, self.total_steps, self.first_step = enabled, total_steps, first_step
        self.start = time.perf_counter()
        self._jsonl = self._tb = None
        self._bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                         disable=not enabled or not sys.stderr.isatty(), leave=False)
        if enabled:
            from tensorboardX import SummaryWriter

            workdir.mkdir(parents=True, exist_ok=True)
            set_aside_rows_after(workdir / "metrics.jsonl", first_step)
            self._jsonl = open(workdir / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(workdir / "tb"))

    def advance(self) -> None:
        """One step done (updates the progress bar; cheap)."""
        self._bar.update(1)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step" and value is not None:
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self._tb.add_scalar(tag, value, step)
        self._tb.flush()
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step - self.first_step, 1) * (self.total_steps - step)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items()
                          if k != "step" and v is not None)
        self._bar.set_postfix_str(f"loss {row['loss']:.4g}" if row.get("loss") else "")
        tqdm.write(f"step {step}/{self.total_steps}  {shown}  eta {_fmt(eta)}", file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self._bar.close()
        if self._jsonl:
            self._jsonl.close()
            self._tb.close()


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
