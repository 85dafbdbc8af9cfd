"""A simple, exactly reproducible batch source: random windows of one token stream.

Documents are tokenised, joined with an end-of-document token, and batch `step` is a set
of windows drawn with a generator seeded by (seed, step). A batch depends on nothing but
its step, so a resumed run sees the same data without replaying anything.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def token_stream(documents: Iterable[str], tokenizer) -> np.ndarray:
    pieces = []
    for doc in documents:
        pieces.append(tokenizer.encode(doc))
        pieces.append(np.array([tokenizer.EOS], dtype=np.int32))
    return np.concatenate(pieces).astype(np.int32)


def split_stream(stream: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): the validation tokens are the stream's tail."""
    cut = int(len(stream) * (1.0 - val_fraction))
    return stream[:cut], stream[cut:]


def window_batch(stream: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 step: int) -> dict[str, np.ndarray]:
    """inputs/targets [batch_size, seq_len] for this step; targets are inputs shifted by one."""
    if len(stream) <= seq_len + 1:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one sequence of "
                         f"{seq_len + 1}; lower data.seq_len")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
    windows = stream[starts[:, None] + np.arange(seq_len + 1)[None, :]]
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
