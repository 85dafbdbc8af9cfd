"""Loss by position: does a model use more context, or fall apart past its training length?

Each long held-out document is cut to `length` tokens and scored in one forward pass; the
next-token losses are averaged over documents within position buckets (powers of two by
default, so short and long positions get equal room on a log axis).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def buckets(length: int) -> list[tuple[int, int]]:
    """[start, end) position ranges: [0,1), [1,2), [2,4), ... up to length."""
    edges = [0, 1]
    while edges[-1] < length:
        edges.append(min(edges[-1] * 2, length))
    return list(zip(edges[:-1], edges[1:], strict=True))


def loss_by_position(losses: Callable[[np.ndarray], np.ndarray],
                     documents: Sequence[np.ndarray], length: int, batch: int = 1) -> dict:
    """losses(tokens [B, length + 1]) -> next-token losses [B, length], computed where the
    model runs (only B x length floats come back). Uses documents of > length tokens, `batch`
    at a time (the last batch padded with copies that are not counted)."""
    usable = [d[: length + 1].astype(np.int32) for d in documents if len(d) > length]
    if not usable:
        raise ValueError(f"no held-out document is longer than {length} tokens")
    sums = np.zeros(length)
    for i in range(0, len(usable), batch):
        rows = usable[i:i + batch]
        tokens = np.stack(rows + [rows[-1]] * (batch - len(rows)))
        sums += np.asarray(losses(tokens), np.float64)[: len(rows)].sum(0)
    per_position = sums / len(usable)
    rows = [{"start": a, "end": b, "center": (a + b - 1) / 2,
             "loss": float(per_position[a:b].mean())} for a, b in buckets(length)]
    return {"length": length, "documents": len(usable), "buckets": rows,
            "mean_loss": float(per_position.mean())}
