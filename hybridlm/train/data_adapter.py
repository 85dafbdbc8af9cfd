"""Stand-in for `hybridlm.data.pipeline` until the Grain pipeline lands (then delete this).

Same contract: `make_train_iterator(cfg, process_index, process_count)` and
`make_eval_iterator(...)` return iterators whose `next()` is a dict of numpy arrays for this
process's rows (global batch / process_count): inputs, targets, positions, segment_ids
(0 = padding) and weights, all [rows, seq_len]; with `get_state()` / `set_state()`.
Batches are random windows of the built-in corpus (hybridlm/data/stream.py) drawn by
(seed, batch index), so the state is just the batch index.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections as mlc
import numpy as np

from hybridlm.config import ConfigError
from hybridlm.data.corpus import stdlib_documents
from hybridlm.data.stream import split_stream, token_stream, window_batch
from hybridlm.data.tokenizers import get_tokenizer

VAL_FRACTION = 0.02


@functools.cache
def _splits(source: str, tokenizer: str) -> tuple[np.ndarray, np.ndarray]:
    if source != "stdlib":
        raise ConfigError(f"data.source {source!r} is not available; use 'stdlib'")
    stream = token_stream(stdlib_documents(), get_tokenizer(tokenizer))
    return split_stream(stream, VAL_FRACTION)


class WindowIterator:
    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 process_index: int, process_count: int):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        rows = batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = window_batch(self.tokens, self.batch_size, self.seq_len, self.seed, self.index)
        self.index += 1
        inputs = batch["inputs"][self.rows].astype(np.int32)
        shape = inputs.shape
        return {"inputs": inputs, "targets": batch["targets"][self.rows].astype(np.int32),
                "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
                "segment_ids": np.ones(shape, np.int32), "weights": np.ones(shape, np.float32)}

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def make_train_iterator(cfg: mlc.ConfigDict, process_index: int,
                        process_count: int) -> WindowIterator:
    train, _ = _splits(cfg.data.source, cfg.data.tokenizer)
    return WindowIterator(train, cfg.train.batch_size, cfg.data.seq_len, cfg.train.seed,
                          process_index, process_count)


def make_eval_iterator(cfg: mlc.ConfigDict, process_index: int,
                       process_count: int) -> WindowIterator:
    _, val = _splits(cfg.data.source, cfg.data.tokenizer)
    return WindowIterator(val, cfg.train.batch_size, cfg.data.seq_len, cfg.train.seed + 1,
                          process_index, process_count)
