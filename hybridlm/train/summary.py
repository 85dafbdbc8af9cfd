"""What a finished training run made, and the commands that use it: printed once at its end.

Everything is read back from the workdir (metrics.jsonl, config.json, the checkpoints
directory), not from the loop's memory, so a run resumed three times reports its whole
history. `read_metrics` is also what `hybridlm sweep --status` reads while points run (this
module imports nothing heavy at the top for that reason).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    """The rows of <workdir>/metrics.jsonl (a line cut short by a kill is skipped)."""
    path = Path(workdir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def validation(rows: list[dict[str, Any]]) -> tuple[dict | None, dict | None]:
    """(last, best) rows that carry a val_loss, or None."""
    evaluated = [r for r in rows if r.get("val_loss") is not None]
    if not evaluated:
        return None, None
    return evaluated[-1], min(evaluated, key=lambda r: r["val_loss"])


def run_summary(workdir: str | Path) -> str:
    """The end-of-run report: losses, checkpoint, metrics and TensorBoard, what to run next."""
    from hybridlm.runs import checkpoint_steps, checkpoints_dir

    workdir = Path(workdir)
    rows = read_metrics(workdir)
    config = json.loads((workdir / "config.json").read_text())
    steps = config["train"]["steps"]
    last = rows[-1] if rows else {}
    lines = [f"finished {steps} steps in {workdir}"]
    if last.get("loss") is not None:
        lines.append(f"  training loss    {last['loss']:.4f} at step {last['step']}")
    final, best = validation(rows)
    if final is None:
        lines.append("  validation loss  not measured (eval.steps=0)")
    else:
        lines.append(f"  validation loss  {final['val_loss']:.4f} at step {final['step']} "
                     f"(final), best {best['val_loss']:.4f} at step {best['step']}")
    directory = checkpoints_dir(workdir)
    saved = checkpoint_steps(directory)
    if saved:
        lines.append(f"  checkpoint       {directory / str(saved[0])} (step {saved[0]})")
    else:
        lines.append("  checkpoint       none (checkpoint.enabled=False)")
    tb = workdir / "tb"
    lines += [f"  metrics          {workdir / 'metrics.jsonl'}",
              f"  TensorBoard      {tb}:  tensorboard --logdir {shlex.quote(str(tb))}"]
    if saved:
        w = shlex.quote(str(workdir))
        lines += ["next:",
                  f"  hybridlm eval --workdir {w} --task all",
                  f"  hybridlm generate --workdir {w} --prompt 'your text'",
                  f"  hybridlm export --workdir {w} --out {shlex.quote(str(workdir / 'export'))}"
                  "  # --format hf: a transformers checkpoint"]
    return "\n".join(lines)


def print_if_finished(workdir: str | Path, steps: int) -> None:
    """The report, when metrics.jsonl reached `steps` (not after a stop at a signal)."""
    rows = read_metrics(Path(workdir))
    if rows and rows[-1].get("step") == steps:
        print(run_summary(workdir), flush=True)
