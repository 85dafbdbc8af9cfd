"""The global row plan: which pieces go into which row of the global batch, from lengths alone.

The stream of pieces is a pure function of the data config and the seed: per source, the
piece table (packing.piece_table: document, first token, pairs) shuffled by Grain's index
shuffle (epoch e with seed + e), sources mixed by data.weights (Grain's MapDataset.mix).
Packing it into rows needs only the pieces' lengths, which every process has (the prepared
index), so every process computes the same rows and reads the tokens of its own rows only:
the global batch at step s does not depend on the number of processes or devices.

  first_fit / best_fit  pieces are packed in windows of PACK_WINDOW consecutive pieces
                        (rows open as needed; a window's last rows are the least full), rows
                        in the order they were opened. Position: (window, row in window).
  concat                the pieces laid end to end and cut every seq_len pairs; a piece cut at
                        a row end continues in the next row as its own segment. Position:
                        (piece, pairs of it already used).

A position plus the number of rows delivered is the whole state of the stream, the same on
every process: a checkpoint written by N processes continues on M.
"""

from __future__ import annotations

import functools
import sys

import grain
import numpy as np

from hybridlm.data.packing import fit_rows

PACKINGS = ("first_fit", "best_fit", "concat")  # how pieces become rows (above)
PACK_WINDOW = 1024  # pieces first/best fit packs together (a piece never leaves its window)


def _tag(source: int, index: int) -> tuple[int, int]:
    return source, index


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class PieceStream:
    """Element i: (source, document, first token, pairs) of the i-th piece of the stream.

    `tables`: one piece table per source. Training: shuffled per source, each repeating on
    its own (num_epochs=None: forever), mixed by `weights`. Validation (shuffle=False,
    weights=None): the sources' pieces in file order, one after the other.
    """

    def __init__(self, tables: list[np.ndarray], *, seed: int = 0, shuffle: bool = True,
                 weights: list[float] | None = None, num_epochs: int | None = None):
        self._tables = tables
        parts = []
        for i, table in enumerate(tables):
            ds = grain.MapDataset.range(len(table))
            if shuffle:
                ds = ds.shuffle(seed=_seed(seed, i))
            parts.append(ds.repeat(num_epochs).map(functools.partial(_tag, i)))
        if len(parts) == 1:
            self._ds = parts[0]
        elif weights is None:
            self._ds = grain.MapDataset.concatenate(parts)
        else:
            self._ds = grain.MapDataset.mix(parts, weights)
        self.length = len(self._ds)  # sys.maxsize when infinite

    @property
    def finite(self) -> bool:
        return self.length < sys.maxsize

    def take(self, start: int, stop: int) -> np.ndarray:
        """[n, 4] int64 rows (source, document, first token, pairs) of elements start..stop."""
        tagged = np.asarray([self._ds[i] for i in range(start, min(stop, self.length))],
                            np.int64).reshape(-1, 2)
        out = np.empty((len(tagged), 4), np.int64)
        out[:, 0] = tagged[:, 0]
        for source, table in enumerate(self._tables):
            mine = tagged[:, 0] == source
            out[mine, 1:] = table[tagged[mine, 1]]
        return out


class Rows:
    """Consecutive rows of the global row stream: row i holds segments[ptr[i]:ptr[i + 1]],
    each (source, document, first token, pairs), laid out left to right."""

    def __init__(self, ptr: np.ndarray, segments: np.ndarray):
        self.ptr, self.segments = ptr, segments

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def select(self, rows: np.ndarray) -> np.ndarray:
        """The segments of `rows` (global row numbers; rows past the end stay empty) as
        packing.read_rows wants them: (row in `rows`, offset, segment id, source, document,
        first token, pairs)."""
        out = []
        for local, row in enumerate(np.asarray(rows).tolist()):
            if row >= len(self):
                continue
            segs = self.segments[self.ptr[row]:self.ptr[row + 1]]
            offsets = np.cumsum(segs[:, 3]) - segs[:, 3]
            ids = np.arange(1, len(segs) + 1)
            out.append(np.column_stack([np.full(len(segs), local), offsets, ids, segs]))
        return np.concatenate(out) if out else np.zeros((0, 7), np.int64)


def _concat_rows(parts: list[Rows]) -> Rows:
    if not parts:
        return Rows(np.zeros(1, np.int64), np.zeros((0, 4), np.int64))
    ptrs, base = [np.zeros(1, np.int64)], 0
    for part in parts:
        ptrs.append(part.ptr[1:] + base)
        base += part.ptr[-1]
    return Rows(np.concatenate(ptrs), np.concatenate([p.segments for p in parts]))


class RowPlanner:
    """The global stream of packed rows, from a position; `take(n)` gives the next n."""

    def __init__(self, stream: PieceStream, seq_len: int, packing: str,
                 position: tuple[int, int] = (0, 0), rows_done: int = 0):
        self.stream, self.seq_len, self.packing = stream, seq_len, packing
        self.position, self.rows_done = tuple(position), rows_done
        self._window: tuple[int, np.ndarray, Rows | None] | None = None

    def _pieces(self, window: int) -> tuple[np.ndarray, Rows | None]:
        """Window `window` of the piece stream and (first/best fit) its packed rows."""
        if self._window is None or self._window[0] != window:
            pieces = self.stream.take(window * PACK_WINDOW, (window + 1) * PACK_WINDOW)
            rows = None
            if self.packing != "concat":
                row = fit_rows(pieces[:, 3], self.seq_len, best=self.packing == "best_fit")
                counts = np.bincount(row, minlength=row.max(initial=-1) + 1)
                rows = Rows(np.concatenate([[0], np.cumsum(counts)]),
                            pieces[np.argsort(row, kind="stable")])
            self._window = (window, pieces, rows)
        return self._window[1], self._window[2]

    def take(self, n: int) -> Rows:
        """The next n rows (fewer only where a finite stream ends)."""
        parts = self._take_fit(n) if self.packing != "concat" else self._take_concat(n)
        rows = _concat_rows(parts)
        self.rows_done += len(rows)
        return rows

    def _take_fit(self, n: int) -> list[Rows]:
        window, row = self.position
        parts = []
        while n > 0 and window * PACK_WINDOW < self.stream.length:
            _, rows = self._pieces(window)
            k = min(n, len(rows) - row)
            ptr = rows.ptr[row:row + k + 1]
            parts.append(Rows(ptr - ptr[0], rows.segments[ptr[0]:ptr[-1]]))
            n, row = n - k, row + k
            if row == len(rows):
                window, row = window + 1, 0
        self.position = (window, row)
        return parts

    def _take_concat(self, n: int) -> list[Rows]:
        piece, used = self.position
        ptr, segments = [0], []
        while len(ptr) <= n:
            fill = 0
            while fill < self.seq_len and piece < self.stream.length:
                pieces, _ = self._pieces(piece // PACK_WINDOW)
                source, doc, start, pairs = pieces[piece % PACK_WINDOW].tolist()
                k = min(pairs - used, self.seq_len - fill)
                segments.append((source, doc, start + used, k))
                fill, used = fill + k, used + k
                if used == pairs:
                    piece, used = piece + 1, 0
            if fill == 0:
                break
            ptr.append(len(segments))
        self.position = (piece, used)
        return [Rows(np.asarray(ptr, np.int64), np.asarray(segments, np.int64).reshape(-1, 4))]
