"""The input pipelines the trainer consumes: global batches, each process reading its rows.

    it = make_train_iterator(cfg, rows=process_rows(mesh, cfg.train.batch_size))
    batch = next(it)  # this process's rows of the global batch, numpy:
    #   inputs, targets, positions, segment_ids [len(rows), T] int32; weights float32
    state = it.get_state(); it.set_state(state)  # JSON; the same on every process

The global batch at step s is a pure function of the data config, train.seed and s
(plan.py): every training-split piece (packing.py) of every source, shuffled with
train.seed and reshuffled each epoch, sources mixed by data.weights, packed into rows from
the pieces' lengths alone. Every process plans the same rows and reads the tokens of the
rows it holds (the mesh's batch sharding says which: parallel.process_rows), so the same
config trains on the same batches as 1 process x 8 devices or 2 x 4, and the data state
in a checkpoint (a position in the global row stream, not one state per process) continues
on any number of processes. Only the piece tables (24 bytes a piece) are in memory; a
resume re-plans at most one packing window, never replays the run. Reading runs in a
background thread, or with data.workers=N in N Grain worker processes that each take every
N-th batch (the same batches for any N).

Validation: documents whose name hash falls below data.val_fraction (sources.py), never
trained on, in file order (no shuffle), packed the same way: exactly eval.steps
global batches (rows past the end of the split are padding with weight 0), or with
eval.steps=-1 the whole split once.
"""

from __future__ import annotations

import dataclasses

import grain
import ml_collections as mlc
import numpy as np

from hybridlm.data import packing
from hybridlm.data.plan import PieceStream, RowPlanner
from hybridlm.data.prepare import Prepared, resolve, resolve_tokenizer
from hybridlm.data.split import is_validation
from hybridlm.data.tokenizers import Tokenizer, static_vocab_size
from hybridlm.errors import ConfigError

PREFETCH_BATCHES = 4  # batches read ahead (by the background thread, or per worker)
STATE_FORMAT = "hybridlm-global-rows-v1"


def block_rows(cfg: mlc.ConfigDict, process_index: int, process_count: int) -> np.ndarray:
    """Rows of process p of P when the batch is cut into P equal blocks in process order
    (what a batch sharding over devices listed process by process gives)."""
    batch = cfg.train.batch_size
    if process_count < 1 or batch % process_count:
        raise ConfigError(f"train.batch_size ({batch}) must be divisible by the number of "
                          f"processes ({process_count}): every process reads the same number "
                          "of rows")
    per = batch // process_count
    return np.arange(process_index * per, (process_index + 1) * per)


def split_pieces(prepared: Prepared, data: mlc.ConfigDict, split: str) -> np.ndarray:
    """The piece table of one source's training or validation documents."""
    held_out = is_validation(prepared.name_hashes, data.val_fraction)
    lengths = prepared.lengths
    if split == "validation":
        return packing.piece_table(lengths, data.seq_len, np.flatnonzero(held_out))
    keep = ~held_out & (lengths >= data.min_doc_tokens)
    docs = np.flatnonzero(keep)
    if data.long_doc_tokens and data.long_doc_repeat > 1:
        long = lengths[docs] >= data.long_doc_tokens
        docs = np.repeat(docs, np.where(long, data.long_doc_repeat, 1))
    return packing.piece_table(lengths, data.seq_len, docs)


def _check_nonempty(pieces: np.ndarray, prepared: Prepared, data: mlc.ConfigDict,
                    split: str) -> None:
    if len(pieces):
        return
    hint = ("raise data.val_fraction, or train without validation with eval.steps=0"
            if split == "validation" else
            "lower data.min_doc_tokens or data.val_fraction")
    raise ConfigError(f"data.source {prepared.manifest['source']!r} has no {split} documents "
                      f"({prepared.manifest['documents']} documents, val_fraction "
                      f"{data.val_fraction}, min_doc_tokens {data.min_doc_tokens}); {hint}")


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a batch needs, picklable (worker processes get a copy)."""

    stream: PieceStream
    readers: tuple[packing.PieceSource, ...]
    seq_len: int
    packing: str
    batch_size: int  # global rows per batch
    rows: np.ndarray  # the global rows this process builds, ascending


class _Batches(grain.IterDataset):
    """This process's rows of consecutive global batches from a stream position. Grain's
    worker processes each take every n-th batch (set_slice): the same batches for any n."""

    def __init__(self, spec: BatchSpec, position: tuple[int, int], rows_done: int):
        super().__init__()
        self._spec, self._position, self._rows_done = spec, position, rows_done
        self._slice = slice(0, None, 1)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        self._slice = sl

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._spec, self._position, self._rows_done,
                              self._slice.start or 0, self._slice.step or 1)


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, spec: BatchSpec, position, rows_done: int, first: int, every: int):
        super().__init__()
        self._spec, self._first, self._every = spec, first, every
        self._planner = RowPlanner(spec.stream, spec.seq_len, spec.packing, position, rows_done)
        self._count = 0

    def __next__(self) -> dict[str, np.ndarray]:
        spec = self._spec
        while True:
            rows = self._planner.take(spec.batch_size)
            if not len(rows):
                raise StopIteration
            self._count += 1
            if (self._count - 1) % self._every == self._first:
                break
        batch = packing.read_rows(rows.select(spec.rows), spec.readers, len(spec.rows),
                                  spec.seq_len)
        batch["position"] = np.asarray([*self._planner.position, self._planner.rows_done])
        return batch

    def get_state(self) -> dict:
        return {"position": list(self._planner.position), "rows": self._planner.rows_done,
                "count": self._count}

    def set_state(self, state: dict) -> None:
        spec = self._spec
        self._planner = RowPlanner(spec.stream, spec.seq_len, spec.packing,
                                   tuple(state["position"]), state["rows"])
        self._count = state["count"]


class BatchIterator:
    """This process's rows of consecutive global batches (the contract above).

    The state is the position in the global row stream after the last batch delivered:
    {"format", "packing", "seq_len", "position": [a, b], "rows": rows delivered so far},
    identical on every process. Reading ahead happens in a background thread (or in
    data.workers processes); `close()` stops it.
    """

    def __init__(self, spec: BatchSpec, workers: int = 0):
        self.spec, self._workers = spec, workers
        self._position, self._rows_done = (0, 0), 0
        self._it = None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            ds = _Batches(self.spec, self._position, self._rows_done)
            if self._workers:
                _mark_flags_parsed()
                ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
            else:
                ds = grain.experimental.ThreadPrefetchIterDataset(
                    ds, prefetch_buffer_size=PREFETCH_BATCHES)
            self._it = iter(ds)
        batch = next(self._it)
        *position, self._rows_done = batch.pop("position").tolist()
        self._position = tuple(position)
        return batch

    def get_state(self) -> dict:
        return {"format": STATE_FORMAT, "packing": self.spec.packing,
                "seq_len": self.spec.seq_len, "position": list(self._position),
                "rows": self._rows_done}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"the data state {str(state)[:120]!r} is not a position in the "
                              f"global row stream ({STATE_FORMAT}); it was written by another "
                              "version of the pipeline")
        saved = (state["packing"], state["seq_len"])
        if saved != (self.spec.packing, self.spec.seq_len):
            raise ConfigError(f"the checkpoint's data position is for data.packing="
                              f"{saved[0]} and data.seq_len={saved[1]}; this config has "
                              f"{self.spec.packing} and {self.spec.seq_len}: set them back, or "
                              "start a new stage from these weights with train.init_from")
        self.close()
        self._position, self._rows_done = tuple(state["position"]), int(state["rows"])

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


def _mark_flags_parsed() -> None:
    """Grain's worker processes read absl flags, which must count as parsed; a program that
    does not run absl.app (pytest, a notebook, our CLI) has not parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _rows(cfg: mlc.ConfigDict, process_index: int, process_count: int,
          rows: np.ndarray | None) -> np.ndarray:
    if rows is None:
        return block_rows(cfg, process_index, process_count)
    rows = np.asarray(rows, np.int64)
    if not (np.all(np.diff(rows) > 0) and rows.min(initial=0) >= 0
            and rows.max(initial=0) < cfg.train.batch_size):
        raise ValueError(f"rows must ascend within [0, train.batch_size={cfg.train.batch_size})"
                         f"; got {rows.tolist()[:16]}")
    return rows


def make_train_iterator(cfg: mlc.ConfigDict, process_index: int = 0, process_count: int = 1,
                        *, rows: np.ndarray | None = None, num_epochs: int | None = None,
                        progress: bool = True) -> BatchIterator:
    """This process's rows of the global training batches (infinite unless num_epochs).

    `rows`: the global rows this process holds, ascending (the trainer passes
    parallel.process_rows(mesh, batch)); by default block `process_index` of
    `process_count` equal blocks.
    """
    data = cfg.data
    rows = _rows(cfg, process_index, process_count, rows)
    _, sources = resolve(data, progress=progress)
    tables, readers, weights = [], [], []
    for prepared, weight in sources:
        pieces = split_pieces(prepared, data, "train")
        _check_nonempty(pieces, prepared, data, "train")
        tables.append(pieces)
        readers.append(packing.PieceSource(prepared, pieces))
        weights.append(weight)
    stream = PieceStream(tables, seed=cfg.train.seed, weights=weights, num_epochs=num_epochs)
    spec = BatchSpec(stream, tuple(readers), data.seq_len, data.packing,
                     cfg.train.batch_size, rows)
    return BatchIterator(spec, data.workers)


class EvalIterator:
    """Exactly `num_batches` batches of a validation pass; past its end, empty batches."""

    def __init__(self, it: BatchIterator, num_batches: int):
        self._it, self._left = it, num_batches
        self._empty = packing.empty_batch(len(it.spec.rows), it.spec.seq_len)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._left <= 0:
            self.close()
            raise StopIteration
        self._left -= 1
        try:
            return next(self._it)
        except StopIteration:
            return {k: v.copy() for k, v in self._empty.items()}

    def close(self) -> None:
        self._it.close()


def make_eval_iterator(cfg: mlc.ConfigDict, process_index: int = 0, process_count: int = 1,
                       *, rows: np.ndarray | None = None, progress: bool = True):
    """This process's rows of the validation batches: eval.steps global batches, or with
    eval.steps=-1 one full pass (the same length on every process: the pass is global).
    `rows` as for make_train_iterator."""
    data = cfg.data
    rows = _rows(cfg, process_index, process_count, rows)
    _, sources = resolve(data, progress=progress)
    tables, readers = [], []
    for prepared, _ in sources:
        pieces = split_pieces(prepared, data, "validation")
        _check_nonempty(pieces, prepared, data, "validation")
        tables.append(pieces)
        readers.append(packing.PieceSource(prepared, pieces))
    stream = PieceStream(tables, shuffle=False, num_epochs=1)
    it = BatchIterator(BatchSpec(stream, tuple(readers), data.seq_len, data.packing,
                                 cfg.train.batch_size, rows))
    steps = cfg.eval.steps
    return it if steps < 0 else EvalIterator(it, steps)


def load_tokenizer(cfg: mlc.ConfigDict, progress: bool = True) -> Tokenizer:
    """The tokenizer the pipelines use (a BPE is trained on first use, then found in the
    cache). Whether prepared sources match it is checked when the pipeline is built."""
    return resolve_tokenizer(cfg.data, progress=progress)


def check_vocab(cfg: mlc.ConfigDict) -> int:
    """Raise ConfigError unless model.vocab_size covers the tokenizer; returns its vocabulary.
    Config validation checks `byte` and `bpe:N` without reading anything; a tokenizer file's
    vocabulary is known once it is read, which this does (the trainer calls it first)."""
    vocab = static_vocab_size(cfg.data.tokenizer)
    if vocab is None:
        vocab = load_tokenizer(cfg).vocab_size
    if cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the "
                          f"vocabulary of data.tokenizer {cfg.data.tokenizer!r} ({vocab}); "
                          f"raise model.vocab_size to at least {vocab} (or use a smaller "
                          "tokenizer)")
    return vocab


def data_record(cfg: mlc.ConfigDict) -> dict:
    """What a run reads, to store with it (e.g. <workdir>/data.json): the tokenizer record
    and, per source, its prepared directory, fingerprint and split sizes in tokens."""
    tokenizer, sources = resolve(cfg.data, progress=False)
    out = []
    for prepared, weight in sources:
        held_out = is_validation(prepared.name_hashes, cfg.data.val_fraction)
        m = prepared.manifest
        out.append({"source": m["source"], "directory": str(prepared.directory),
                    "fingerprint": m["fingerprint"], "weight": weight,
                    "documents": m["documents"], "tokens": m["tokens"],
                    "train_documents": int((~held_out).sum()),
                    "train_tokens": int(prepared.lengths[~held_out].sum()),
                    "validation_documents": int(held_out.sum()),
                    "validation_tokens": int(prepared.lengths[held_out].sum())})
    return {"tokenizer": tokenizer.describe(), "sources": out}
