"""Needle-in-a-haystack grids and RULER-style tasks, scored on generated answers.

For each (task, length, depth) cell, `per_cell` samples are generated from a seed; the model
greedily continues each prompt for as many tokens as the answer has (plus a few), and the
continuation is scored (scoring.py). Every score by length comes with its 95% Wilson
interval over the samples of that length and the task's chance level (tasks.chance). One
Generator per length keeps the KV cache sized to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from hybridlm.eval import scoring, tasks

GenerateFn = Callable[[np.ndarray, int], np.ndarray]  # (prompt ids [n], new tokens) -> ids


def run_task(task: str, generate: GenerateFn, tokenizer, haystack: np.ndarray,
             lengths: Sequence[int], depths: Sequence[float], per_cell: int, seed: int,
             progress: bool = True, split: str = "heldout") -> dict:
    """Scores of one task over lengths x depths, keys and values from `split`; JSON-ready."""
    samples = tasks.make_samples(task, tokenizer, haystack, lengths, depths, per_cell, seed,
                                 split)
    rows = []
    for s in tqdm(samples, desc=task, disable=not progress, leave=False):
        new = len(tokenizer.encode(s.answer)) + 4
        out = generate(s.ids, new)
        text = tokenizer.decode(out)
        rows.append({"length": s.length, "depth": s.depth, "score": scoring.score(s, text),
                     "answer": s.answer.strip(), "output": text})
    grid = np.zeros((len(depths), len(lengths)))
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            grid[i, j] = np.mean([r["score"] for r in rows
                                  if r["length"] == n and r["depth"] == d])
    by_length = {str(n): float(grid[:, j].mean()) for j, n in enumerate(lengths)}
    n_per_length = len(depths) * per_cell
    interval = {str(n): list(scoring.wilson(by_length[str(n)] * n_per_length, n_per_length))
                for n in lengths}
    return {"task": task, "values": split, "lengths": list(lengths), "depths": list(depths),
            "per_cell": per_cell, "seed": seed, "grid": grid.tolist(),
            "by_length": by_length, "interval": interval, "n_per_length": n_per_length,
            "chance": tasks.chance(task, split), "mean": float(grid.mean()), "samples": rows}
