"""Documents -> pieces of at most seq_len next-token pairs -> packed rows.

A document of L tokens plus its end-of-document token has L (input, target) pairs. It is
cut into consecutive pieces of at most seq_len pairs: piece k covers tokens
[k * seq_len, min((k + 1) * seq_len, L) + 1), so neighbouring pieces share one token and every
pair of the document is trained on exactly once. Nothing is truncated: a 200k-token file
becomes ~400 pieces of 512. Grain's first-fit / best-fit packers need every element to fit
a row already, which pieces do; concat-then-split cuts pieces again at row ends.

Positions restart at 0 in every piece (and, with concat-then-split, in every part of a cut
piece), and segment ids keep pieces in one row from attending to each other.
"""

from __future__ import annotations

import functools

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


def pack(ds: grain.IterDataset, packing: str, seq_len: int, num_bins: int, seed: int,
         shuffle_bins: bool) -> grain.IterDataset:
    """Pack pieces into rows of seq_len: adds inputs_segment_ids / inputs_positions."""
    lengths = {"inputs": seq_len, "targets": seq_len}
    if packing == "concat":
        return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    packer = {"first_fit": grain.experimental.FirstFitPackIterDataset,
              "best_fit": grain.experimental.BestFitPackIterDataset}[packing]
    return packer(ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed,
                  shuffle_bins=shuffle_bins)


def to_batch(rows: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Grain's packed rows -> the batch contract, padded with empty rows to batch_size."""
    segment_ids = rows["inputs_segment_ids"].astype(np.int32)
    batch = {
        "inputs": rows["inputs"].astype(np.int32),
        "targets": rows["targets"].astype(np.int32),
        "positions": rows["inputs_positions"].astype(np.int32),
        "segment_ids": segment_ids,
        "weights": (segment_ids > 0).astype(np.float32),
    }
    missing = batch_size - len(segment_ids)
    if missing > 0:
        batch = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
                 for k, v in batch.items()}
    return batch


def finalize(batch_size: int):
    """A picklable map function (worker processes receive it) for to_batch."""
    return functools.partial(to_batch, batch_size=batch_size)
