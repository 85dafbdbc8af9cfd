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


def token_losses(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-token cross-entropy (nats) from logits [T, V] and targets [T]."""
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    return logz - logits[np.arange(len(targets)), targets]


def loss_by_position(forward: Callable[[np.ndarray], np.ndarray],
                     documents: Sequence[np.ndarray], length: int) -> dict:
    """forward(tokens [1, T]) -> logits [1, T, V]. Uses documents of > length tokens."""
    usable = [d for d in documents if len(d) > length]
    if not usable:
        raise ValueError(f"no held-out document is longer than {length} tokens")
    sums = np.zeros(length)
    for doc in usable:
        tokens = doc[: length + 1].astype(np.int32)
        logits = np.asarray(forward(tokens[None, :-1]))[0]
        sums += token_losses(logits, tokens[1:])
    per_position = sums / len(usable)
    rows = [{"start": a, "end": b, "center": (a + b - 1) / 2,
             "loss": float(per_position[a:b].mean())} for a, b in buckets(length)]
    return {"length": length, "documents": len(usable), "buckets": rows,
            "mean_loss": float(per_position.mean())}
