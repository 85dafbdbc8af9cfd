"""Needle-in-a-haystack grids and RULER-style tasks, scored on generated answers.

For each (task, length, depth) cell, `per_cell` samples are generated from a seed; the model
greedily continues each prompt for as many tokens as the answer has (plus a few), and the
continuation is scored (scoring.py). Every score by length comes with its 95% Wilson
interval over the samples of that length and the task's chance level (tasks.chance). One
Generator per length keeps the KV cache sized to it.

Prompts of the same token length and answer length are continued together, `batch` at a
time: a needle grid's hundreds of prompts are a few dozen batched programs, not thousands
of one-token dispatches (greedy continuations do not depend on their batch neighbours).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from hybridlm.eval import scoring, tasks

GenerateFn = Callable[[np.ndarray, int], np.ndarray]  # (prompts [B, n], new) -> ids [B, new]
BATCH = 32  # prompts continued together at most


def continue_all(prompts: Sequence[np.ndarray], new: Sequence[int], generate: GenerateFn,
                 batch: int = BATCH, desc: str = "", progress: bool = True
                 ) -> list[np.ndarray]:
    """Greedy continuations of every prompt (`new[i]` tokens for prompt i), in input order;
    prompts of one length and continuation length go through `generate` `batch` at a time."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (p, n) in enumerate(zip(prompts, new, strict=True)):
        groups[(len(p), int(n))].append(i)
    outputs: list[np.ndarray] = [np.zeros(0, np.int32)] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        for (_, n), members in groups.items():
            for start in range(0, len(members), batch):
                chunk = members[start:start + batch]
                out = generate(np.stack([prompts[i] for i in chunk]), n)
                for i, row in zip(chunk, out, strict=True):
                    outputs[i] = row
                bar.update(len(chunk))
    return outputs


def run_task(task: str, generate: GenerateFn, tokenizer, haystack: np.ndarray,
             lengths: Sequence[int], depths: Sequence[float], per_cell: int, seed: int,
             progress: bool = True, split: str = "heldout", batch: int = BATCH) -> dict:
    """Scores of one task over lengths x depths, keys and values from `split`; JSON-ready."""
    samples = tasks.make_samples(task, tokenizer, haystack, lengths, depths, per_cell, seed,
                                 split)
    new = [len(tokenizer.encode(s.answer)) + 4 for s in samples]
    outs = continue_all([s.ids for s in samples], new, generate, batch, task, progress)
    rows = []
    for s, out in zip(samples, outs, strict=True):
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
