"""Documents -> pieces of at most seq_len next-token pairs -> packed rows.

A document of L tokens plus its end-of-document token has L (input, target) pairs. It is
cut into consecutive pieces of at most seq_len pairs: piece k covers tokens
[k * seq_len, min((k + 1) * seq_len, L) + 1), so neighbouring pieces share one token and every
pair of the document is trained on exactly once. Nothing is truncated: a 200k-token file
becomes ~400 pieces of 512.

Packing decides rows from piece lengths alone (`fit_rows`, and plan.py for the stream), so
every process can plan the global batch without reading a token; `read_rows` then reads the
tokens of the rows a process holds. A segment is a piece, or with concat-then-split a part of
one: positions restart at 0 in every segment and segment ids (1, 2, ... in a row, 0 =
padding) keep segments of one row from attending to each other.
"""

from __future__ import annotations

import grain
import numpy as np

from hybridlm.data.prepare import Prepared


def piece_table(lengths: np.ndarray, seq_len: int, docs: np.ndarray | None = None) -> np.ndarray:
    """[pieces, 3] int64 rows (document, first token, pairs) for `docs` (default: all)."""
    docs = np.arange(len(lengths)) if docs is None else np.asarray(docs, np.int64)
    pairs = lengths[docs].astype(np.int64)
    counts = -(-pairs // seq_len)  # ceil
    doc_of_piece = np.repeat(docs, counts)
    first_piece = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(counts.sum()) - first_piece
    start = k * seq_len
    size = np.minimum(seq_len, np.repeat(pairs, counts) - start)
    return np.stack([doc_of_piece, start, size], axis=1)


class PieceSource:
    """Random access to pieces: piece i -> {"inputs", "targets"} int32, read from the shards.

    A Grain RandomAccessDataSource: picklable (the reader is opened lazily in each process).
    """

    def __init__(self, prepared: Prepared, pieces: np.ndarray):
        self._paths = prepared.shard_paths
        self._lengths = prepared.lengths
        self._first_record = prepared.first_record
        self._dtype = prepared.dtype
        self._record_tokens = int(prepared.manifest["record_tokens"])
        self._eos = int(prepared.manifest["tokenizer"]["eos_id"])
        self._pieces = pieces
        self._reader = None

    def __len__(self) -> int:
        return len(self._pieces)

    def tokens(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of document `doc` followed by its end-of-document token."""
        if self._reader is None:
            self._reader = grain.sources.ArrayRecordDataSource(self._paths)
        length, r = int(self._lengths[doc]), self._record_tokens
        real_stop = min(stop, length)
        first = int(self._first_record[doc])
        chunks = [np.frombuffer(self._reader[first + i], dtype=self._dtype)
                  for i in range(start // r, (real_stop - 1) // r + 1)]
        out = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        offset = start - (start // r) * r
        out = out[offset:offset + real_stop - start].astype(np.int32)
        if stop > length:
            out = np.append(out, np.int32(self._eos))
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        doc, start, pairs = (int(x) for x in self._pieces[index])
        tokens = self.tokens(doc, start, start + pairs + 1)
        return {"inputs": tokens[:-1], "targets": tokens[1:]}

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}


def fit_rows(lengths: np.ndarray, seq_len: int, best: bool = False) -> np.ndarray:
    """Row of each piece (in order) under first fit, or best fit: a piece goes into the first
    row (best fit: the fullest row) with room for it; a new row opens when none has room."""
    free = np.empty(len(lengths), np.int64)
    out = np.empty(len(lengths), np.int64)
    rows = 0
    for k, length in enumerate(np.asarray(lengths, np.int64).tolist()):
        fits = np.flatnonzero(free[:rows] >= length) if length < seq_len else ()
        if len(fits) == 0:
            row, free[rows] = rows, seq_len
            rows += 1
        else:
            row = fits[np.argmin(free[fits])] if best else fits[0]
        free[row] -= length
        out[k] = row
    return out


BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """All-padding rows: every array 0, weights 0."""
    batch = {k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS[:-1]}
    batch["weights"] = np.zeros((rows, seq_len), np.float32)
    return batch


def read_rows(segments: np.ndarray, readers: list[PieceSource], rows: int,
              seq_len: int) -> dict[str, np.ndarray]:
    """The batch contract for `rows` rows from their segments.

    `segments` [n, 7] int64: (row, offset in row, segment id, source, document, first token,
    pairs); a segment fills [offset, offset + pairs) of its row with tokens
    [first, first + pairs] of the document (its last pair's target included).
    """
    batch = empty_batch(rows, seq_len)
    for row, offset, segment, source, doc, start, pairs in segments.tolist():
        tokens = readers[source].tokens(doc, start, start + pairs + 1)
        span = slice(offset, offset + pairs)
        batch["inputs"][row, span] = tokens[:-1]
        batch["targets"][row, span] = tokens[1:]
        batch["positions"][row, span] = np.arange(pairs, dtype=np.int32)
        batch["segment_ids"][row, span] = segment
    batch["weights"] = (batch["segment_ids"] > 0).astype(np.float32)
    return batch
