"""A comparison report of sweep points: tables and plots a person reads side by side.

`hybridlm sweep --summarize --report docs/experiments.md` gathers, for every point of a sweep,
its training curve and final losses, the wall time of training and of its after-commands
(file times), held-out loss / needle / RULER scores by context length, and the paper's
attention-mass table per layer type, into markdown tables and PNG plots (under
`<report dir>/img/<report name>/`). In an existing file, only the text between the
`<!-- report:begin -->` and `<!-- report:end -->` markers is replaced, so prose written
around the numbers survives a re-run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridlm.eval import plots
from hybridlm.eval.analysis_math import SEGMENTS

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _minutes(start: Path, end: Path) -> float | None:
    if not (start.exists() and end.exists()):
        return None
    return (end.stat().st_mtime - start.stat().st_mtime) / 60


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _training(root: Path, names: Sequence[str], img: Path) -> tuple[str, list[str]]:
    rows, curves, total = [], {}, 0.0
    for name in names:
        w, lines = root / name, _metrics(root / name)
        steps = [x for x in lines if x.get("loss") is not None]
        vals = [x["val_loss"] for x in lines if x.get("val_loss") is not None]
        done = sorted((w / "after").glob("*.done"), key=lambda p: p.stat().st_mtime)
        train = _minutes(w / "config.json", w / "metrics.jsonl")
        evals = _minutes(w / "metrics.jsonl", done[-1]) if done else None
        total += (train or 0) + (evals or 0)
        if steps:
            curves[name] = ([x["step"] for x in steps], [x["loss"] for x in steps])
        rows.append([name, str(steps[-1]["step"]) if steps else "-",
                     _f(steps[-1]["loss"] if steps else None), _f(vals[-1] if vals else None),
                     _f(train, 1), _f(evals, 1)])
    text = _table(["point", "steps", "train loss", "val loss", "train min", "eval min"], rows)
    text += f"\nTotal wall time: {total:.0f} minutes.\n"
    if not curves:
        return text, []
    plots.curves_by_step(curves, img / "train_loss.png", "training loss (nats)",
                         "training loss")
    return text, ["train_loss.png"]


def _length_table(title: str, results: dict[str, dict[int, float | None]], train_len: int,
                  img: Path, image: str, ylabel: str) -> tuple[str, list[str]]:
    results = {k: v for k, v in results.items() if v}
    if not results:
        return "", []
    lengths = sorted({n for r in results.values() for n in r})
    head = ["point", *(f"{n}{' (train)' if n == train_len else ''}" for n in lengths)]
    rows = [[name, *(_f(r.get(n)) for n in lengths)] for name, r in results.items()]
    series = {name: [float("nan") if r.get(n) is None else r[n] for n in lengths]
              for name, r in results.items()}
    plots.lines_by_length(series, lengths, img / image, ylabel, title, train_len)
    return f"**{title}**\n\n" + _table(head, rows), [image]


def _evaluations(root: Path, names: Sequence[str], train_len: int,
                 img: Path) -> tuple[str, list[str]]:
    loss, niah, ruler, curves = {}, {}, {}, {}
    for name in names:
        ev = root / name / "eval"
        ppl, nd, rd = _json(ev / "ppl.json"), _json(ev / "niah.json"), _json(ev / "ruler.json")
        if ppl:
            loss[name] = {r["length"]: r["mean_loss"] for r in ppl["lengths"] if r["documents"]}
            longest = max((r for r in ppl["lengths"] if r["documents"]),
                          key=lambda r: r["length"], default=None)
            if longest:
                curves[name] = ([b["center"] for b in longest["buckets"]],
                                [b["loss"] for b in longest["buckets"]])
        if nd:
            niah[name] = {int(n): v for n, v in nd["by_length"].items()}
        if rd:
            ruler[name] = {int(k.rsplit("_", 1)[1]): v for k, v in rd["summary"].items()
                           if k.startswith("ruler_")}
    parts, images = [], []
    for title, results, image, ylabel in (
            ("held-out loss (nats) by context length", loss, "heldout_loss.png", "loss"),
            ("needle in a haystack (exact match) by length", niah, "niah.png", "score"),
            ("RULER-style tasks (mean score) by length", ruler, "ruler.png", "score")):
        text, made = _length_table(title, results, train_len, img, image, ylabel)
        parts.append(text)
        images += made
    if curves:
        plots.loss_by_position(curves, img / "loss_by_position.png", train_len,
                               "held-out loss by position, longest evaluated length")
        images.append("loss_by_position.png")
    return "\n".join(p for p in parts if p), images


def _attention(root: Path, names: Sequence[str], img: Path) -> tuple[str, list[str]]:
    rows, bars = [], {}
    for name in names:
        result = _json(root / name / "eval" / "analysis.json")
        for r in (result or {}).get("lengths", []):
            overall = [("all", r["overall"])] if len(r["by_type"]) > 1 else []
            for kind, m in [*r["by_type"].items(), *overall]:
                rows.append([name, str(r["length"]), kind,
                             *(_f(m[s]) for s in SEGMENTS), _f(m["entropy"], 2)])
                if r is result["lengths"][0]:
                    bars[f"{name} {kind}"] = {s: m[s] for s in SEGMENTS}
    if not rows:
        return "", []
    plots.segment_bars(bars, img / "attention_mass.png",
                       "attention mass of the question tokens, shortest analysed length")
    text = ("**Attention mass of the question + answer tokens** (the paper's table 2: summed "
            "over key segments, averaged over heads; entropy in nats)\n\n")
    return text + _table(["point", "length", "layers", *SEGMENTS, "entropy"], rows), \
        ["attention_mass.png"]


def write_report(root: Path, names: Sequence[str], out: Path, title: str) -> Path:
    """The report of the points `names` under `root`, written into `out` (markdown)."""
    root, out = Path(root), Path(out)
    img = out.parent / "img" / out.stem
    cfg = _json(root / names[0] / "config.json") if names else None
    train_len = cfg["data"]["seq_len"] if cfg else 0
    sections, images = [f"_{title}_\n"], []
    for text, made in (_training(root, names, img), _evaluations(root, names, train_len, img),
                       _attention(root, names, img)):
        if text:
            sections.append(text)
        images += made
    rel = os.path.relpath(img, out.parent)
    sections.append("\n".join(f"![{Path(i).stem}]({rel}/{i})" for i in images) + "\n")
    body = f"{BEGIN}\n" + "\n".join(sections) + f"{END}"
    old = out.read_text() if out.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + body + old[old.index(END) + len(END):]
    else:
        new = (old + "\n" if old else "") + body + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(new)
    return out
