"""PNG plots of evaluation results (matplotlib, no display needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _title(ax, title: str, width: int = 55) -> None:
    """A title wrapped to the figure: the long ones of the sweep report were cut off."""
    ax.set_title("\n".join(textwrap.wrap(title, width)))


def needle_heatmap(scores: np.ndarray, lengths: Sequence[int], depths: Sequence[float],
                   path: str | Path, title: str = "needle in a haystack",
                   train_len: int | None = None) -> None:
    """scores [len(depths), len(lengths)] in [0, 1] as a green-red grid."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)))
    im = ax.imshow(scores, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            ax.text(j, i, f"{scores[i, j]:.2f}", ha="center", va="center", fontsize=7)
    if train_len is not None and train_len in lengths:
        ax.axvline(list(lengths).index(train_len) + 0.5, color="black", lw=1, ls="--")
    _title(ax, title)
    fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, path)


def lines_by_length(series: Mapping[str, Sequence[float]], lengths: Sequence[int],
                    path: str | Path, ylabel: str, title: str,
                    train_len: int | None = None,
                    intervals: Mapping[str, Sequence[Sequence[float]]] | None = None,
                    chance: float | None = None) -> None:
    """One line per series (task or variant) over context lengths; with `intervals`
    (name -> [lo, hi] per length) a shaded band each, with `chance` a dotted line."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in series.items():
        line, = ax.plot(range(len(lengths)), values, marker="o", label=name)
        if intervals and name in intervals:
            lo, hi = np.asarray(intervals[name], dtype=float).T
            ax.fill_between(range(len(lengths)), lo, hi, color=line.get_color(), alpha=0.15)
    if chance is not None:
        ax.axhline(chance, color="black", lw=1, ls=":", label="chance")
    ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
    if train_len is not None and train_len in lengths:
        ax.axvline(list(lengths).index(train_len), color="gray", lw=1, ls="--",
                   label="training length")
    _finish(fig, ax, path, "context length (tokens)", ylabel, title)


def loss_by_position(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                     path: str | Path, train_len: int | None = None,
                     title: str = "loss by position") -> None:
    """curves: name -> (bucket centre positions, mean loss)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker=".", label=name)
    if train_len is not None:
        ax.axvline(train_len, color="gray", lw=1, ls="--", label="training length")
    ax.set_xscale("log", base=2)
    _finish(fig, ax, path, "token position", "mean loss (nats)", title)


def segment_bars(masses: Mapping[str, Mapping[str, float]], path: str | Path,
                 title: str = "attention mass of the question tokens") -> None:
    """masses: row label (variant / layer type / length) -> {segment: mass}; stacked bars."""
    rows = list(masses)
    segments = list(next(iter(masses.values())))
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(rows), 3.8))
    bottom = np.zeros(len(rows))
    for seg in segments:
        vals = np.array([masses[r][seg] for r in rows])
        ax.bar(range(len(rows)), vals, bottom=bottom, label=seg)
        bottom += vals
    ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("attention mass")
    _title(ax, title)
    ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _finish(fig, ax, path, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, legend and grid of a line plot, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bars(values: Mapping[str, Mapping[str, float | None]], path: str | Path, ylabel: str,
         title: str) -> None:
    """Grouped bars: one group per row (e.g. sweep point), one bar per metric."""
    rows = list(values)
    metrics = list(next(iter(values.values())))
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(rows), 3.6))
    for i, m in enumerate(metrics):
        ys = [values[r][m] if values[r][m] is not None else np.nan for r in rows]
        ax.bar(np.arange(len(rows)) + i * width, ys, width, label=m)
    ax.set_xticks(np.arange(len(rows)) + width * (len(metrics) - 1) / 2, rows, rotation=30,
                  ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    ax.legend(fontsize=7)
    _save(fig, path)


def curves_by_step(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                   path: str | Path, ylabel: str, title: str) -> None:
    """curves: name -> (steps, values); one line each (training loss of sweep points)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    _finish(fig, ax, path, "step", ylabel, title)
