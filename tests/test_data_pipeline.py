"""The Grain pipelines: nothing lost or duplicated, consistent segments, exact resume, shards."""

import collections
import json

import numpy as np
import pytest

from hybridlm.config import ConfigError
from hybridlm.data import plan
from hybridlm.data.pipeline import data_record, make_eval_iterator, make_train_iterator
from tests.test_data_sources import BOS, CORPUS_FILES, data_config, make_corpus, oracle_tokens

EOS = 256
SEQ = 128


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def config(cache, corpus_dir, *overrides):
    return data_config(cache, corpus_dir, f"data.seq_len={SEQ}", "train.batch_size=8",
                       "data.val_fraction=0.25", *overrides)


def oracle_pieces(tokens: list[int], seq_len: int = SEQ) -> list[tuple[int, ...]]:
    """Consecutive pieces of at most seq_len pairs (seq_len + 1 tokens), independent code."""
    tokens = tokens + [EOS]
    out, start = [], 0
    while start < len(tokens) - 1:
        out.append(tuple(tokens[start:start + seq_len + 1]))
        start += seq_len
    return out


@pytest.fixture(scope="module")
def doc_pieces(corpus_dir):
    return {name: oracle_pieces(oracle_tokens(corpus_dir / name)) for name in CORPUS_FILES}


def segments(batch) -> list[tuple[int, ...]]:
    """Check every row's invariants and return its segments as token tuples."""
    out = []
    for row in range(batch["inputs"].shape[0]):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        inp, tgt, w = batch["inputs"][row], batch["targets"][row], batch["weights"][row]
        assert np.array_equal(w, (seg > 0).astype(np.float32))
        real = int((seg > 0).sum())
        assert np.all(seg[real:] == 0), "padding only at the end of a row"
        ids = seg[:real]
        assert np.all(np.diff(ids) >= 0) and (real == 0 or ids[0] == 1)
        assert np.all(np.diff(ids) <= 1), "segment ids count up by one"
        for s in np.unique(ids):
            mask = seg == s
            n = int(mask.sum())
            assert np.array_equal(pos[mask], np.arange(n)), "positions restart per piece"
            assert np.array_equal(tgt[mask][:-1], inp[mask][1:]), "targets are next tokens"
            out.append((*inp[mask].tolist(), int(tgt[mask][-1])))
    return out


def drain(it) -> tuple[list, list[tuple[int, ...]]]:
    batches = list(it)
    return batches, [s for b in batches for s in segments(b)]


def pairs(pieces) -> collections.Counter:
    return collections.Counter(p for piece in pieces for p in zip(piece[:-1], piece[1:],
                                                                   strict=False))


def test_one_epoch_loses_and_duplicates_nothing_and_holds_out_documents(cache, corpus_dir,
                                                                        doc_pieces):
    cfg = config(cache, corpus_dir, "eval.steps=-1")
    batches, train = drain(make_train_iterator(cfg, num_epochs=1, progress=False))
    _, val = drain(make_eval_iterator(cfg, progress=False))
    assert all(b["inputs"].shape == (8, SEQ) and b["inputs"].dtype == np.int32 for b in batches)
    assert all(b["weights"].dtype == np.float32 for b in batches)
    everything = [p for pieces in doc_pieces.values() for p in pieces]
    assert sorted(train + val) == sorted(everything)
    train_docs = {n for n, ps in doc_pieces.items() if set(ps) <= set(train)}
    val_docs = {n for n, ps in doc_pieces.items() if set(ps) <= set(val)}
    assert train_docs and val_docs and train_docs | val_docs == set(CORPUS_FILES)
    assert not train_docs & val_docs
    record = data_record(cfg)["sources"][0]
    assert record["validation_documents"] == len(val_docs)
    assert record["train_tokens"] == sum(len(oracle_tokens(corpus_dir / n)) for n in train_docs)
    longest = max(doc_pieces.values(), key=len)
    assert len(longest) > 100, "a long document arrives whole, as ~170 pieces"


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_other_packings_keep_every_pair_once(cache, corpus_dir, doc_pieces, packing):
    cfg = config(cache, corpus_dir, f"data.packing={packing}", "data.val_fraction=0.0")
    batches, got = drain(make_train_iterator(cfg, num_epochs=1, progress=False))
    everything = [p for pieces in doc_pieces.values() for p in pieces]
    assert pairs(got) == pairs(everything)
    if packing == "concat":  # no padding except in the last batch
        assert all(b["weights"].all() for b in batches[:-1])


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def global_batches(cfg, parts: list[np.ndarray], steps: int, state=None):
    """The global batches that processes holding rows `parts` build together, each process's
    rows put back in their places; and the processes' data states after each step."""
    its = [make_train_iterator(cfg, rows=rows, progress=False) for rows in parts]
    if state is not None:
        for it in its:
            it.set_state(state)
    out, states = [], []
    for _ in range(steps):
        batch = {}
        for rows, it in zip(parts, its, strict=True):
            for k, v in next(it).items():
                batch.setdefault(k, np.zeros((cfg.train.batch_size, *v.shape[1:]), v.dtype))
                batch[k][rows] = v
        out.append(batch)
        states.append([json.loads(json.dumps(it.get_state())) for it in its])
    for it in its:
        it.close()
    return out, states


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_the_global_batch_is_the_same_built_by_1_2_or_4_processes(cache, corpus_dir, packing,
                                                                monkeypatch):
    """Each process plans the whole batch from piece lengths and reads only its rows: the
    rows of 2 blocks or of 4 interleaved sets put together are the 1-process batch, step
    after step (across packing windows), and every process holds the same state, which
    continues the stream on any other number of processes."""
    monkeypatch.setattr(plan, "PACK_WINDOW", 16)  # many windows in a few steps
    cfg = config(cache, corpus_dir, f"data.packing={packing}", "data.seq_len=64")
    steps, everything = 12, np.arange(8)
    one, one_states = global_batches(cfg, [everything], steps)
    assert len({tuple(s[0]["position"]) for s in one_states}) == steps
    two, two_states = global_batches(cfg, [everything[:4], everything[4:]], steps)
    four, four_states = global_batches(cfg, [everything[i::4] for i in range(4)], steps)
    assert_same(two, one)
    assert_same(four, one)
    for states in (two_states, four_states):
        assert all(s == [one_states[i][0]] * len(s) for i, s in enumerate(states))
    resumed, _ = global_batches(cfg, [everything[i::4] for i in range(4)], 5,
                                state=two_states[6][1])
    assert_same(resumed, one[7:])
    assert segments(one[0]) and all(b["weights"].any() for b in one)
    with pytest.raises(ConfigError, match=r"train.batch_size \(8\) must be divisible.*\(3\)"):
        make_train_iterator(cfg, 0, 3, progress=False)
    cfg.data.seq_len = 32
    it = make_train_iterator(cfg, progress=False)
    with pytest.raises(ConfigError, match="data.seq_len=64; this config has .* 32"):
        it.set_state(one_states[0][0])


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_restoring_the_state_continues_exactly_across_an_epoch_boundary(cache, corpus_dir,
                                                                        packing):
    cfg = config(cache, corpus_dir, f"data.packing={packing}", "data.seq_len=512")
    epoch = len(list(make_train_iterator(cfg, num_epochs=1, progress=False)))
    stop = epoch + 3
    reference = take(make_train_iterator(cfg, progress=False), stop + 6)
    it = make_train_iterator(cfg, progress=False)
    assert_same(take(it, stop), reference[:stop])
    state = json.loads(json.dumps(it.get_state()))
    resumed = make_train_iterator(cfg, progress=False)
    resumed.set_state(state)
    assert_same(take(resumed, 6), reference[stop:])


def test_epochs_are_reshuffled_and_seeds_decide_the_order(cache, corpus_dir):
    cfg = config(cache, corpus_dir, "data.seq_len=512")
    epoch = len(list(make_train_iterator(cfg, num_epochs=1, progress=False)))
    a = take(make_train_iterator(cfg, progress=False), 2 * epoch)
    assert_same(a, take(make_train_iterator(cfg, progress=False), 2 * epoch))
    cfg.train.seed = 1
    b = take(make_train_iterator(cfg, progress=False), 2)
    assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])
    assert not np.array_equal(a[0]["inputs"], a[epoch]["inputs"])


def test_min_length_and_long_document_upweighting(cache, corpus_dir, doc_pieces):
    cfg = config(cache, corpus_dir, "data.val_fraction=0.0", "data.min_doc_tokens=3000",
                 "data.long_doc_tokens=15000", "data.long_doc_repeat=3")
    _, got = drain(make_train_iterator(cfg, num_epochs=1, progress=False))
    expected = []
    for name, pieces in doc_pieces.items():
        n = len(oracle_tokens(corpus_dir / name))
        if n >= 3000:
            expected += pieces * (3 if n >= 15000 else 1)
    assert any(len(oracle_tokens(corpus_dir / n)) < 3000 for n in CORPUS_FILES)
    assert sorted(got) == sorted(expected)


def test_sources_mix_in_proportion_to_their_weights(tmp_path, cache, corpus_dir, doc_pieces):
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("x" * 20000)
    cfg = config(cache, f"{corpus_dir},{other}", "data.weights=3,1", "data.val_fraction=0.0")
    rows = take(make_train_iterator(cfg, progress=False), 40)
    pieces = [s for b in rows for s in segments(b)]
    from_other = sum(set(p) <= {ord("x"), BOS, EOS} for p in pieces)
    known = set(p for ps in doc_pieces.values() for p in ps)
    assert all(p in known or set(p) <= {ord("x"), BOS, EOS} for p in pieces)
    assert 0.15 < from_other / len(pieces) < 0.35
    it = make_train_iterator(cfg, progress=False)
    take(it, 25)
    resumed = make_train_iterator(cfg, progress=False)
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    assert_same(take(resumed, 15), rows[25:])


def test_eval_gives_a_fixed_number_of_batches_padded_past_the_end(cache, corpus_dir):
    cfg = config(cache, corpus_dir, "eval.steps=-1")
    full = list(make_eval_iterator(cfg, progress=False))
    cfg.eval.steps = len(full) + 2
    fixed = list(make_eval_iterator(cfg, progress=False))
    assert_same(fixed[:len(full)], full)
    assert len(fixed) == len(full) + 2 and not fixed[-1]["weights"].any()
    cfg.eval.steps = 2
    assert_same(list(make_eval_iterator(cfg, progress=False)), full[:2])
    cfg.eval.steps = -1  # one pass, the same length on every process
    halves = [list(make_eval_iterator(cfg, i, 2, progress=False)) for i in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(full)
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a}
              for a, b in zip(halves[0], halves[1], strict=True)]
    assert_same(joined, full)
    with pytest.raises(ConfigError, match="no validation documents.*raise data.val_fraction"):
        make_eval_iterator(config(cache, corpus_dir, "data.val_fraction=0.0"), progress=False)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume_exactly(cache, corpus_dir):
    """Two workers each read every other batch: the same batches as none; their state is
    global, so the pipeline without workers continues it."""
    cfg = config(cache, corpus_dir)
    reference = take(make_train_iterator(cfg, progress=False), 12)
    cfg.data.workers = 2
    it = make_train_iterator(cfg, progress=False)
    assert_same(take(it, 7), reference[:7])
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    cfg.data.workers = 0
    resumed = make_train_iterator(cfg, progress=False)
    resumed.set_state(state)
    assert_same(take(resumed, 5), reference[7:])
    resumed.close()
