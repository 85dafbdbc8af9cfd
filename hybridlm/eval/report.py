"""A comparison report of sweep points: tables and plots a person reads side by side.

`hybridlm sweep --summarize --report docs/experiments.md` gathers, for every point of a sweep,
its training curve and final losses, the wall time of training and of its after-commands
(file times), held-out loss / needle / RULER scores by context length, the KV-cache
fraction, and the paper's attention-mass table per layer type, into markdown tables and PNG
plots (under `<report dir>/img/<report name>/`, with every point's numbers in
`points.json` there). In an existing file, only the text between the
`<!-- report:begin -->` and `<!-- report:end -->` markers is replaced, so prose written
around the numbers survives a re-run.

Points named `NAME_s<seed>` are seeds of one group `NAME`: the tables show the group's mean,
the 95% Wilson interval of the pooled samples of all its seeds in brackets, and the range of
the seeds' own values in parentheses. Every score has its chance level beside it and every
attention mass what uniform attention would give (in parentheses).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hybridlm.eval import plots
from hybridlm.eval.analysis_math import SEGMENTS
from hybridlm.eval.scoring import wilson
from hybridlm.infer import cache_bytes

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
KV_LENGTH = 128 * 1024  # the KV-cache fraction is also given at this length (the paper's)


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def group_of(name: str) -> str:
    """'rope_s2' -> 'rope': the seeds of one configuration form a group."""
    return re.sub(r"_s\d+$", "", name)


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _groups(names: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(group_of(name), []).append(name)
    return out


def _label(group: str, members: Sequence[str]) -> str:
    return group if len(members) == 1 else f"{group} ({len(members)} seeds)"


def _spread(values: Sequence[float]) -> str:
    return f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""


# ---- training -------------------------------------------------------------------------------

def _training(root: Path, names: Sequence[str], img: Path) -> tuple[str, list[str]]:
    rows, curves, spans, total = [], {}, [], 0.0
    for name in names:
        w, lines = root / name, _metrics(root / name)
        steps = [x for x in lines if x.get("loss") is not None]
        vals = [x["val_loss"] for x in lines if x.get("val_loss") is not None]
        times = [p.stat().st_mtime for p in (w / "config.json", w / "metrics.jsonl")
                 if p.exists()]
        done = sorted(p.stat().st_mtime for p in (w / "after").glob("*.done"))
        train = (times[1] - times[0]) / 60 if len(times) == 2 else None
        evals = (done[-1] - times[1]) / 60 if done and len(times) == 2 else None
        total += (train or 0) + (evals or 0)
        if times:
            spans += [times[0], (done or times)[-1]]
        if steps:
            curves[name] = ([x["step"] for x in steps], [x["loss"] for x in steps])
        rows.append([name, str(steps[-1]["step"]) if steps else "-",
                     _f(steps[-1]["loss"] if steps else None), _f(vals[-1] if vals else None),
                     _f(train, 1), _f(evals, 1)])
    text = _table(["point", "steps", "train loss", "val loss", "train min", "eval min"], rows)
    wall = (max(spans) - min(spans)) / 60 if spans else 0.0
    text += (f"\nWall time: {wall:.0f} minutes from the first start to the last finish; the "
             f"points' own times add up to {total:.0f} minutes.\n")
    if not curves:
        return text, []
    plots.curves_by_step(curves, img / "train_loss.png", "training loss (nats)",
                         "training loss")
    return text, ["train_loss.png"]


# ---- scores by length, with intervals and chance -------------------------------------------

def _scores(results: dict[str, dict], lengths: Sequence[int]) -> dict[int, dict]:
    """Per length: pooled mean, Wilson interval of the pooled samples, the seeds' values.
    `results`: point -> {"by_length": {n: score}, "n": samples per length}."""
    out = {}
    for n in lengths:
        have = [r for r in results.values() if str(n) in r["by_length"]]
        if not have:
            continue
        trials = sum(r["n"] for r in have)
        hits = sum(r["by_length"][str(n)] * r["n"] for r in have)
        out[n] = {"mean": hits / trials, "interval": wilson(hits, trials),
                  "seeds": [r["by_length"][str(n)] for r in have]}
    return out


def _score_cell(s: dict | None) -> str:
    if s is None:
        return "-"
    lo, hi = s["interval"]
    return f"{s['mean']:.3f} [{lo:.2f}, {hi:.2f}]{_spread(s['seeds'])}"


def _score_table(title: str, per_group: dict[str, dict], labels: dict[str, str],
                 chance: dict[str, float], train_len: int, img: Path,
                 image: str) -> tuple[str, list[str]]:
    per_group = {g: s for g, s in per_group.items() if s}
    if not per_group:
        return "", []
    lengths = sorted({n for s in per_group.values() for n in s})
    head = ["point", *(f"{n}{' (train)' if n == train_len else ''}" for n in lengths),
            "chance"]
    rows = [[labels[g], *(_score_cell(s.get(n)) for n in lengths), f"{chance[g]:.3g}"]
            for g, s in per_group.items()]
    series = {labels[g]: [s[n]["mean"] if n in s else float("nan") for n in lengths]
              for g, s in per_group.items()}
    bands = {labels[g]: [s[n]["interval"] if n in s else (float("nan"),) * 2 for n in lengths]
             for g, s in per_group.items()}
    plots.lines_by_length(series, lengths, img / image, "score", title, train_len, bands,
                          chance=max(chance.values()))
    return f"**{title}**\n\n" + _table(head, rows), [image]


def _needle_results(nd: dict) -> dict:
    return {"by_length": nd["by_length"], "n": nd["n_per_length"]}


def _depth_table(title: str, niah: dict[str, list[dict]], labels: dict[str, str]) -> str:
    rows = []
    for g, results in niah.items():
        if not results:
            continue
        lengths, depths = results[0]["lengths"], results[0]["depths"]
        grid = np.mean([np.asarray(r["grid"]) for r in results], axis=0)
        rows += [[labels[g], f"{d:.0%}", *(f"{v:.2f}" for v in grid[i])]
                 for i, d in enumerate(depths)]
    if not rows:
        return ""
    return f"**{title}**\n\n" + _table(["point", "depth", *map(str, lengths)], rows)


def _seed_table(niah: dict[str, dict[str, dict]], train_len: int) -> str:
    """Needles at every evaluated length, one column per seed (held-out / training-split
    values): where each seed either retrieves or does not, the pooled mean hides the split,
    and only a retrieving seed's row shows how retrieval holds beyond the training length."""
    rows, seeds = [], sorted({m.rsplit("_s", 1)[1] for ms in niah.values() for m in ms
                              if len(ms) > 1}, key=int)
    for g, members in niah.items():
        if len(members) < 2:
            continue
        lengths = sorted({int(n) for x in members.values() for n in x["by_length"]})
        for n in map(str, lengths):
            cells = {m.rsplit("_s", 1)[1]: f"{x['by_length'][n]:.2f} / "
                     + _f(x.get("train_values", {}).get("by_length", {}).get(n), 2)
                     for m, x in members.items() if n in x["by_length"]}
            label = f"{n} (train)" if int(n) == train_len else n
            rows.append([g, label, *(cells.get(s, "-") for s in seeds)])
    if not rows:
        return ""
    return ("**needle in a haystack, seed by seed** (held-out / training-split values)\n\n"
            + _table(["point", "length", *(f"seed {s}" for s in seeds)], rows))


def _evaluations(root: Path, names: Sequence[str], train_len: int,
                 img: Path) -> tuple[str, list[str]]:
    groups = _groups(names)
    labels = {g: _label(g, m) for g, m in groups.items()}
    parts, images = [], []
    loss, curves, kv = {}, {}, {}
    niah, niah_train, ruler, chance, depth_grids, by_seed = {}, {}, {}, {}, {}, {}
    for g, members in groups.items():
        ev = {m: root / m / "eval" for m in members}
        ppl = {m: _json(e / "ppl.json") for m, e in ev.items()}
        ppl = {m: p for m, p in ppl.items() if p}
        if ppl:
            by_len: dict[int, list[float]] = {}
            for p in ppl.values():
                for r in p["lengths"]:
                    if r["documents"]:
                        by_len.setdefault(r["length"], []).append(r["mean_loss"])
            loss[g] = by_len
            longest = max((r for r in next(iter(ppl.values()))["lengths"] if r["documents"]),
                          key=lambda r: r["length"], default=None)
            if longest:
                curves[labels[g]] = ([b["center"] for b in longest["buckets"]],
                                     [b["loss"] for b in longest["buckets"]])
        by_seed[g] = {m: x for m, x in ((m, _json(e / "niah.json")) for m, e in ev.items())
                      if x}
        nds = list(by_seed[g].values())
        rds = [x for x in (_json(e / "ruler.json") for e in ev.values()) if x]
        lengths = sorted({int(n) for x in nds + rds for n in x.get("by_length", {})}
                         | {int(k.rsplit("_", 1)[1]) for x in rds for k in x["summary"]
                            if k.startswith("ruler_") and k[6:].isdigit()})
        niah[g] = _scores({i: _needle_results(x) for i, x in enumerate(nds)}, lengths)
        niah_train[g] = _scores({i: _needle_results(x["train_values"])
                                 for i, x in enumerate(nds) if "train_values" in x}, lengths)
        ruler[g] = _scores({i: {"by_length": {k[6:]: v for k, v in x["summary"].items()
                                              if k.startswith("ruler_") and k[6:].isdigit()},
                                "n": sum(t["n_per_length"] for t in x["tasks"].values())}
                            for i, x in enumerate(rds)}, lengths)
        chance[g] = {"niah": nds[0]["chance"] if nds else 0.0,
                     "ruler": rds[0]["chance"] if rds else 0.0}
        depth_grids[g] = nds
        cfg = _json(root / members[0] / "config.json")
        if cfg and "layer_types" in cfg.get("model", {}):
            kv[g] = cfg["model"]
    if loss:
        lengths = sorted({n for r in loss.values() for n in r})
        head = ["point", *(f"{n}{' (train)' if n == train_len else ''}" for n in lengths)]
        rows = [[labels[g], *(f"{np.mean(r[n]):.3f}{_spread(r[n])}" if n in r else "-"
                              for n in lengths)] for g, r in loss.items()]
        plots.lines_by_length({labels[g]: [np.mean(r[n]) if n in r else float("nan")
                                           for n in lengths] for g, r in loss.items()},
                              lengths, img / "heldout_loss.png", "loss",
                              "held-out loss by context length", train_len)
        parts.append("**held-out loss (nats) by context length** (natural text only)\n\n"
                     + _table(head, rows))
        images.append("heldout_loss.png")
    for title, scores, key, image in (
            ("needle in a haystack, held-out keys and values (exact match) by length", niah,
             "niah", "niah.png"),
            ("needle in a haystack, training-split keys and values (exact match) by length",
             niah_train, "niah", "niah_train.png"),
            ("RULER-style tasks (mean score) by length", ruler, "ruler", "ruler.png")):
        text, made = _score_table(title, scores, labels, {g: c[key] for g, c in chance.items()},
                                  train_len, img, image)
        parts.append(text)
        images += made
    parts.append(_seed_table(by_seed, train_len))
    parts.append(_depth_table("needle (held-out values) by depth and length, mean over seeds",
                              depth_grids, labels))
    if kv:
        lengths = sorted({n for s in niah.values() for n in s}) or [train_len]
        rows = [[labels[g], *(f"{cache_bytes(m, 1, n)['fraction']:.3f}"
                              for n in [*lengths, KV_LENGTH])] for g, m in kv.items()]
        parts.append("**KV-cache size as a fraction of full attention's**\n\n"
                     + _table(["point", *map(str, lengths), "131072"], rows))
    if curves:
        plots.loss_by_position(curves, img / "loss_by_position.png", train_len,
                               "held-out loss by position, longest evaluated length")
        images.append("loss_by_position.png")
    return "\n".join(p for p in parts if p), images


# ---- attention mass ---------------------------------------------------------------------------

def _attention(root: Path, names: Sequence[str], img: Path) -> tuple[str, list[str]]:
    rows, bars = [], {}
    keys = (*SEGMENTS, "entropy")
    for g, members in _groups(names).items():
        results = [r for r in (_json(root / m / "eval" / "analysis.json") for m in members) if r]
        if not results:
            continue
        for i, r in enumerate(results[0]["lengths"]):
            same = [x["lengths"][i] for x in results]
            overall = [("all", "overall")] if len(r["by_type"]) > 1 else []
            for kind, field in [*((t, t) for t in r["by_type"]), *overall]:
                ms = [x["by_type"][field] if field != "overall" else x["overall"] for x in same]
                mean = {k: float(np.mean([m[k] for m in ms])) for k in keys}
                uni = {k: float(np.mean([m.get("uniform", {}).get(k, np.nan) for m in ms]))
                       for k in keys}
                rows.append([_label(g, members), str(r["length"]), kind,
                             *(f"{mean[k]:.3f} ({uni[k]:.3f})" for k in SEGMENTS),
                             f"{mean['entropy']:.2f} ({uni['entropy']:.2f})"])
                if i == 0:
                    bars[f"{g} {kind}"] = {s: mean[s] for s in SEGMENTS}
    if not rows:
        return "", []
    plots.segment_bars(bars, img / "attention_mass.png",
                       "attention mass of the question tokens, shortest analysed length")
    text = ("**Attention mass of the question + answer tokens** (the paper's table 2: summed "
            "over key segments, averaged over heads and samples (and seeds); entropy in nats; "
            "in parentheses what uniform attention over the keys each query sees would "
            "give)\n\n")
    return text + _table(["point", "length", "layers", *SEGMENTS, "entropy"], rows), \
        ["attention_mass.png"]


def _points_json(root: Path, names: Sequence[str], path: Path) -> None:
    """Every point's summaries (training, each eval file's "summary" and intervals)."""
    out = {}
    for name in names:
        lines = [x for x in _metrics(root / name) if x.get("loss") is not None]
        point = {"group": group_of(name), "step": lines[-1]["step"] if lines else None,
                 "loss": lines[-1]["loss"] if lines else None}
        for f in sorted((root / name / "eval").glob("*.json")):
            data = _json(f)
            point[f.stem] = {k: data[k] for k in ("summary", "interval", "chance") if k in data}
        out[name] = point
    path.write_text(json.dumps(out, indent=1) + "\n")


def write_report(root: Path, names: Sequence[str], out: Path, title: str) -> Path:
    """The report of the points `names` under `root`, written into `out` (markdown)."""
    root, out = Path(root), Path(out)
    # points that never ran (a partial sweep) are neither rows nor seeds in a group's label
    names = [n for n in names if (root / n).is_dir()] or list(names)
    img = out.parent / "img" / out.stem
    img.mkdir(parents=True, exist_ok=True)
    evaluated = [n for n in names if any((root / n / "eval").glob("*.json"))] or list(names)
    cfg = _json(root / evaluated[0] / "config.json") if evaluated else None
    train_len = cfg["data"]["seq_len"] if cfg else 0  # of the evaluated points, not a warm stage
    sections, images = [f"_{title}_\n"], []
    for text, made in (_training(root, names, img), _evaluations(root, names, train_len, img),
                       _attention(root, names, img)):
        if text:
            sections.append(text)
        images += made
    _points_json(root, names, img / "points.json")
    rel = os.path.relpath(img, out.parent)
    sections.append("\n".join(f"![{Path(i).stem}]({rel}/{i})" for i in images) + "\n")
    sections.append(f"Every point's numbers: [{rel}/points.json]({rel}/points.json).\n")
    body = f"{BEGIN}\n" + "\n".join(sections) + f"{END}"
    old = out.read_text() if out.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + body + old[old.index(END) + len(END):]
    else:
        new = (old + "\n" if old else "") + body + "\n"
    out.write_text(new)
    return out
