"""Synthetic retrieval documents: well-formed, reproducible, train content only, trainable."""

import re

import numpy as np
import pytest

from hybridlm import config as config_lib
from hybridlm.config import ConfigError
from hybridlm.data import corpus, synthetic
from hybridlm.data.pipeline import make_train_iterator
from hybridlm.data.retrieval_text import WORDS
from hybridlm.data.sources import parse_sources
from hybridlm.data.split import is_validation, name_hash
from hybridlm.data.tokenizers import ByteTokenizer


@pytest.mark.parametrize("spec,message", [
    ("retrieval:", "retrieval:COUNT"), ("retrieval:x", "retrieval:COUNT"),
    ("retrieval:0", "retrieval:COUNT"), ("retrieval:10:64", "CHARS >= 256"),
    ("retrieval:10:256:niah_single:3", "retrieval:COUNT:CHARS:TASK"),
    ("retrieval:10:256:niah_single+nosuch", "unknown task 'nosuch'"),
    ("retrieval:10:64:repeat+niah_single", "CHARS >= 256"),
    ("retrieval:10:8:repeat", "CHARS >= 16")])
def test_bad_specs_name_the_source(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_sources(spec)


def test_documents_are_reproducible_and_end_with_their_answer():
    docs = list(synthetic.retrieval_documents(10, 400))
    assert docs == list(synthetic.retrieval_documents(10, 400))
    assert [n.split("/")[1] for n, _ in docs[:5]] == list(synthetic.TRAIN_TASKS)
    chosen = synthetic.parse_spec("4:400:niah_single+variable_tracking")
    assert [n.split("/")[1] for n, _ in synthetic.retrieval_documents(*chosen)] == \
        ["niah_single", "variable_tracking"] * 2
    for name, text in docs:
        assert 100 - 2 <= len(text) <= 400 + 40, (name, len(text))
        if "niah_single" in name:
            key, value = re.search(r"magic number for (\S+) is (\d+)\.", text).groups()
            assert text.endswith(f"The special magic number for {key} is {value}.")
            assert text.count(value) == 2  # the needle and the answer


@pytest.mark.parametrize("task", synthetic.REPEATS)
def test_repeat_documents_are_periodic_from_their_first_period(task):
    """Every character after the first period equals the one a period earlier, and the
    period is at most half the document: each is followed by at least one repeat."""
    docs = list(synthetic.retrieval_documents(*synthetic.parse_spec(f"30:64:{task}")))
    assert len(docs) == 30 and all(n.split("/")[1] == task for n, _ in docs)
    for _, text in docs:
        assert 15 <= len(text) <= 63 and set(text) <= set(synthetic.REPEAT_ALPHABET)
        periods = [p for p in range(1, len(text)) if text[p:] == text[:-p]]
        assert periods and periods[0] <= len(text) // 2, text


def test_ngram_repeats_need_more_than_one_character_to_locate_the_copy():
    """Over 4 characters a period repeats its characters, so the one before the current
    position occurs several times in a period: a one-character match is ambiguous."""
    for _, text in synthetic.retrieval_documents(20, 64, ("repeat_ngram",)):
        assert len(set(text)) <= synthetic.NGRAM_ALPHABET
        period = next(p for p in range(1, len(text)) if text[p:] == text[:-p])
        assert period > synthetic.NGRAM_ALPHABET  # some character repeats within a period


def test_documents_use_train_content_only():
    """Keys from the train half of the word list, numbers of even digit sum: evaluation
    content (the other half, odd digit sums) never appears."""
    eval_words = set(WORDS[1::2])
    for _, text in synthetic.retrieval_documents(40, 300):
        for key in re.findall(r"magic number for ([a-z]+-[a-z]+)", text):
            assert not set(key.split("-")) & eval_words
        for number in re.findall(r"\b(\d{7})\b", text):
            assert 1_000_000 <= int(number) < 10_000_000
            assert sum(map(int, number)) % 2 == 0, number


def test_haystack_is_never_validation_text():
    root = corpus.stdlib_dir().parent
    haystack = synthetic.CharCodec().decode(synthetic.haystack_chars())
    held_out = [p for p in corpus.stdlib_files()[:400]
                if is_validation(np.int64(name_hash(p.relative_to(root).as_posix())), 0.5)]
    texts = [p.read_text(errors="replace") for p in held_out]
    assert texts and not any(len(t) > 200 and t in haystack for t in texts)


def test_packed_rows_hold_whole_documents_each_behind_a_bos(tmp_path):
    """Documents of at most seq_len characters (BOS counted) fill one piece each: in the
    packed rows every segment starts with the BOS and ends with its answer and the EOS."""
    cfg = config_lib.load("configs/tiny.py", [
        f"data.cache_dir={tmp_path}", "data.source=retrieval:60:256", "data.seq_len=256",
        "train.batch_size=4"])
    batch = next(make_train_iterator(cfg, 0, 1, progress=False))
    text = bytes(t for t in batch["inputs"][batch["segment_ids"] > 0].tolist() if t < 256)
    assert b"magic number" in text or b"VAR X" in text
    assert batch["inputs"].shape == (4, 256) and batch["weights"].sum() > 0
    bos, eos = ByteTokenizer.BOS, ByteTokenizer.EOS
    segments = 0
    for row in range(4):
        seg = batch["segment_ids"][row]
        for s in set(seg[seg > 0].tolist()):
            inputs, targets = batch["inputs"][row][seg == s], batch["targets"][row][seg == s]
            assert inputs[0] == bos and bos not in inputs[1:] and bos not in targets
            assert targets[-1] == eos and chr(targets[-2]) == "."  # the answer's full stop
            assert batch["positions"][row][seg == s][0] == 0
            segments += 1
    assert segments >= 4
