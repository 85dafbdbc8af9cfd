"""The Grain input pipelines the trainer consumes.

    it = make_train_iterator(cfg, process_index, process_count)
    batch = next(it)  # this process's rows of the global batch, numpy:
    #   inputs, targets, positions, segment_ids [b, T] int32; weights [b, T] float32
    state = it.get_state(); it.set_state(state)  # JSON-serialisable, resumes exactly

Training: every training-split piece (packing.py) of every source, shuffled with
train.seed and reshuffled each epoch (Grain's index shuffle: epoch e uses seed + e), cut into
a disjoint slice per process (this process takes positions process_index::process_count of
the shuffled order), read from the prepared shards, packed, batched. Several sources are
mixed with data.weights, each source repeating on its own. Only the piece table (24 bytes a
piece) is in memory; a resume restores the stream position and re-packs at most one packing
window, never replays the run.

Validation: documents whose name hash falls below data.val_fraction (sources.py), never
trained on. An eval iterator is a fixed pass, in file order, over this process's slice of
the validation pieces: exactly data.eval_batches batches (rows past the end of the split are
padding with weight 0), or with data.eval_batches=0 the whole slice once (single process).
"""

from __future__ import annotations

import grain
import ml_collections as mlc
import numpy as np

from hybridlm.data import packing
from hybridlm.data.prepare import Prepared, resolve, resolve_tokenizer
from hybridlm.data.sources import is_validation
from hybridlm.data.tokenizers import Tokenizer, static_vocab_size
from hybridlm.errors import ConfigError

READ_THREADS = 2  # threads reading records per process (the data are small and local)
PREFETCH = 64  # pieces read ahead per process
MIN_PACKING_BINS = 16  # first/best-fit rows packed together (more bins: less padding)


def local_batch_size(cfg: mlc.ConfigDict, process_count: int) -> int:
    batch = cfg.train.batch_size
    if process_count < 1 or batch % process_count:
        raise ConfigError(f"train.batch_size ({batch}) must be divisible by the number of "
                          f"processes ({process_count}): every process reads the same number "
                          "of rows")
    return batch // process_count


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


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


def train_dataset(cfg: mlc.ConfigDict, process_index: int = 0, process_count: int = 1, *,
                  num_epochs: int | None = None, progress: bool = True) -> grain.IterDataset:
    """The training pipeline as a Grain IterDataset (infinite unless num_epochs is given)."""
    data, seed = cfg.data, cfg.train.seed
    batch = local_batch_size(cfg, process_count)
    _, sources = resolve(data, progress=progress)
    parts, weights = [], []
    for i, (prepared, weight) in enumerate(sources):
        pieces = split_pieces(prepared, data, "train")
        _check_nonempty(pieces, prepared, data, "train")
        ds = grain.MapDataset.source(packing.PieceSource(prepared, pieces))
        ds = ds.shuffle(seed=_seed(seed, i)).repeat(num_epochs)
        parts.append(ds[process_index::process_count])
        weights.append(weight)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                              prefetch_buffer_size=PREFETCH))
    ds = packing.pack(ds, data.packing, data.seq_len, max(batch, MIN_PACKING_BINS),
                      seed=_seed(seed, process_index, 1), shuffle_bins=True)
    ds = ds.batch(batch, drop_remainder=False).map(packing.finalize(batch))
    if data.workers:
        _mark_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.workers))
    return ds


def _mark_flags_parsed() -> None:
    """Grain's worker processes read absl flags, which must count as parsed; a program that
    does not run absl.app (pytest, a notebook, our CLI) has not parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(cfg: mlc.ConfigDict, process_index: int = 0, process_count: int = 1,
                        *, num_epochs: int | None = None, progress: bool = True,
                        ) -> grain.DatasetIterator:
    """This process's training batches (see the module docstring for the contract)."""
    return iter(train_dataset(cfg, process_index, process_count, num_epochs=num_epochs,
                              progress=progress))


def eval_dataset(cfg: mlc.ConfigDict, process_index: int = 0, process_count: int = 1, *,
                 progress: bool = True) -> grain.IterDataset:
    """One pass over this process's slice of the validation pieces, in order."""
    data = cfg.data
    batch = local_batch_size(cfg, process_count)
    _, sources = resolve(data, progress=progress)
    parts = []
    for prepared, _ in sources:
        pieces = split_pieces(prepared, data, "validation")
        _check_nonempty(pieces, prepared, data, "validation")
        parts.append(grain.MapDataset.source(packing.PieceSource(prepared, pieces)))
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    ds = ds[process_index::process_count].to_iter_dataset(
        grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH))
    ds = packing.pack(ds, data.packing, data.seq_len, max(batch, MIN_PACKING_BINS), seed=0,
                      shuffle_bins=False)
    return ds.batch(batch, drop_remainder=False).map(packing.finalize(batch))


class EvalIterator:
    """Exactly `num_batches` batches of a validation pass; past its end, empty batches."""

    def __init__(self, it: grain.DatasetIterator, num_batches: int, batch_size: int,
                 seq_len: int):
        self._it, self._left = it, num_batches
        self._empty = packing.to_batch({k: np.zeros((0, seq_len), np.int32) for k in (
            "inputs", "targets", "inputs_positions", "inputs_segment_ids")}, batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._left <= 0:
            raise StopIteration
        self._left -= 1
        try:
            return next(self._it)
        except StopIteration:
            return {k: v.copy() for k, v in self._empty.items()}

    def get_state(self) -> dict:
        return {"left": self._left, "grain": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        self._left = state["left"]
        self._it.set_state(state["grain"])


def make_eval_iterator(cfg: mlc.ConfigDict, process_index: int = 0, process_count: int = 1,
                       *, progress: bool = True):
    """This process's validation batches: data.eval_batches of them on every process, or
    with data.eval_batches=0 one full pass (single process only: processes' passes differ in
    length, and a multi-process step must run the same number of times everywhere)."""
    n = cfg.data.eval_batches
    if n == 0 and process_count > 1:
        raise ConfigError("data.eval_batches=0 (one full validation pass) needs a single "
                          f"process; with {process_count} processes set a number of batches")
    it = iter(eval_dataset(cfg, process_index, process_count, progress=progress))
    if n == 0:
        return it
    return EvalIterator(it, n, local_batch_size(cfg, process_count), cfg.data.seq_len)


def load_tokenizer(cfg: mlc.ConfigDict, progress: bool = True) -> Tokenizer:
    """The tokenizer the pipelines use (a BPE is trained on first use, then found in the
    cache). Whether prepared sources match it is checked when the pipeline is built."""
    return resolve_tokenizer(cfg.data, progress=progress)


def check_vocab(cfg: mlc.ConfigDict) -> int:
    """Raise ConfigError unless model.vocab_size covers the tokenizer; returns its vocabulary."""
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
