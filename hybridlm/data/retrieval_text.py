"""Retrieval text: needle-in-a-haystack and RULER-style prompts, built piece by piece.

One format serves training and evaluation. hybridlm/data/synthetic.py turns prompts plus
their answers into training documents (`as_document`); hybridlm/eval/tasks.py makes the
evaluation grids from the same generators. Every sample is built from text pieces
(haystack, needles, question), tokenised piece by piece, so the token span of every needle
and of the question is known exactly: the attention analysis needs those spans, and scoring
needs the answer. Keys and values come from one of two disjoint splits (`Content`):
training documents use `train`; evaluation asks both, to tell "cannot copy" from "cannot
copy unseen digits".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

WORDS = ("apple banana cherry dragon eagle falcon garden harbor island jungle kettle lemon "
         "mango needle orange pepper quartz river silver tiger umbrella violet walnut yellow "
         "zebra anchor bridge candle desert engine forest glacier hammer igloo jacket lantern "
         "marble nickel oyster pillow rocket saddle tunnel valley window").split()


@dataclasses.dataclass
class Sample:
    """One prompt. `ids` = context + question; the model must continue with `answer`."""

    task: str
    ids: np.ndarray  # int32 prompt tokens (context then question)
    answer: str  # expected continuation (scored after stripping)
    answers: tuple[str, ...]  # every value that must appear (multi-value / multi-query tasks)
    needle_spans: list[tuple[int, int]]  # [start, end) of each needle; [0] is the target
    question_span: tuple[int, int]  # [start, end) of the question tokens
    length: int  # requested context length in tokens
    depth: float  # requested needle depth in [0, 1]


SPLITS = ("train", "heldout")
NUMBERS = (1_000_000, 10_000_000)  # [low, high): 7 digits; a split takes every other number
MULTIKEY_DISTRACTORS = 3  # needles with other keys in niah_multikey
COMMON_TOP = 3  # words asked for in common_words


def number_split(number: int) -> str:
    """'train' when the digit sum is even, else 'heldout': the splits are disjoint yet both
    put every digit in every position, so a held-out value is new as a number but not as
    digits (split by range, held-out first digits would be ones never written after "is")."""
    return "train" if sum(map(int, str(number))) % 2 == 0 else "heldout"


def split_size(split: str) -> int:
    """Numbers in one split: half the range for either split, since the last digit walks
    0-9 within every ten and so alternates the digit sum's parity (the test counts both)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return (NUMBERS[1] - NUMBERS[0]) // 2


class Content:
    """Random keys and values of one split. The splits are disjoint (keys from alternate
    words, numbers by digit-sum parity): training documents use `train` only, so a
    `heldout` item is never trained on."""

    def __init__(self, rng: np.random.Generator, split: str = "heldout"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.rng, self.split = rng, split
        self.words = WORDS[0::2] if split == "train" else WORDS[1::2]

    def number(self) -> str:
        """A uniform number of the split (drawn until it falls in it: two draws expected)."""
        while number_split(n := int(self.rng.integers(*NUMBERS))) != self.split:
            pass
        return str(n)

    def key(self) -> str:
        return "-".join(self.rng.choice(self.words, size=2, replace=False))

    def keys(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            k = self.key()
            if k not in out:
                out.append(k)
        return out


class Builder:
    """Assembles token pieces and records spans."""

    def __init__(self, tokenizer):
        self.tok, self.pieces, self.pos = tokenizer, [], 0

    def add(self, text_or_ids) -> tuple[int, int]:
        ids = (self.tok.encode(text_or_ids) if isinstance(text_or_ids, str)
               else np.asarray(text_or_ids, dtype=np.int32))
        start = self.pos
        self.pieces.append(ids.astype(np.int32))
        self.pos += len(ids)
        return start, self.pos

    def ids(self) -> np.ndarray:
        return np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.int32)


def haystack_ids(haystack: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n tokens of filler from a random offset of the haystack token stream (wrapping)."""
    if n <= 0:
        return np.zeros(0, np.int32)
    start = int(rng.integers(0, len(haystack)))
    idx = (start + np.arange(n)) % len(haystack)
    return haystack[idx].astype(np.int32)


def _with_needles(task, tokenizer, haystack, length, depths, needles, question, answer,
                  answers, rng) -> Sample:
    """Haystack of about `length` tokens with needle texts inserted at the given depths."""
    needle_ids = [tokenizer.encode(n) for n in needles]
    q_ids = tokenizer.encode(question)
    filler = max(length - sum(len(n) for n in needle_ids) - len(q_ids), 0)
    cuts = sorted(int(round(d * filler)) for d in depths)
    order = np.argsort([int(round(d * filler)) for d in depths], kind="stable")
    hay = haystack_ids(haystack, filler, rng)
    b, spans, prev = Builder(tokenizer), [None] * len(needles), 0
    for cut, i in zip(cuts, order, strict=True):
        b.add(hay[prev:cut])
        spans[i] = b.add(needle_ids[i])
        prev = cut
    b.add(hay[prev:])
    q_span = b.add(q_ids)
    return Sample(task, b.ids(), answer, tuple(answers), spans, q_span, length, depths[0])


def niah_single(tokenizer, haystack, length, depth, c: Content) -> Sample:
    rng = c.rng
    key, value = c.key(), c.number()
    needle = f"\nThe special magic number for {key} is {value}.\n"
    question = (f"\nWhat is the special magic number for {key}? "
                f"The special magic number for {key} is")
    return _with_needles("niah_single", tokenizer, haystack, length, [depth], [needle], question,
                         f" {value}.", [value], rng)


def niah_multikey(tokenizer, haystack, length, depth, c: Content,
                  distractors: int = MULTIKEY_DISTRACTORS) -> Sample:
    rng = c.rng
    keys = c.keys(distractors + 1)
    values = [c.number() for _ in keys]
    needles = [f"\nThe special magic number for {k} is {v}.\n" for k, v in zip(keys, values,
                                                                               strict=True)]
    depths = [depth] + list(rng.uniform(0.05, 0.95, size=distractors))
    question = (f"\nWhat is the special magic number for {keys[0]}? The special magic number "
                f"for {keys[0]} is")
    return _with_needles("niah_multikey", tokenizer, haystack, length, depths, needles, question,
                         f" {values[0]}.", [values[0]], rng)


def niah_multivalue(tokenizer, haystack, length, depth, c: Content, n_values: int = 3) -> Sample:
    rng = c.rng
    key = c.key()
    values = [c.number() for _ in range(n_values)]
    needles = [f"\nOne of the special magic numbers for {key} is {v}.\n" for v in values]
    depths = [depth] + list(rng.uniform(0.05, 0.95, size=n_values - 1))
    question = f"\nWhat are all the special magic numbers for {key}? They are"
    return _with_needles("niah_multivalue", tokenizer, haystack, length, depths, needles,
                         question, " " + ", ".join(values) + ".", values, rng)


def niah_multiquery(tokenizer, haystack, length, depth, c: Content, n_queries: int = 2) -> Sample:
    rng = c.rng
    keys = c.keys(n_queries)
    values = [c.number() for _ in keys]
    needles = [f"\nThe special magic number for {k} is {v}.\n" for k, v in zip(keys, values,
                                                                               strict=True)]
    depths = [depth] + list(rng.uniform(0.05, 0.95, size=len(keys) - 1))
    question = (f"\nWhat are the special magic numbers for {' and '.join(keys)}? "
                "They are, in that order,")
    return _with_needles("niah_multiquery", tokenizer, haystack, length, depths, needles,
                         question, " " + ", ".join(values) + ".", values, rng)


def variable_tracking(tokenizer, haystack, length, depth, c: Content, hops: int = 3) -> Sample:
    rng = c.rng
    names = [f"X{int(n)}" for n in rng.choice(90_000, size=hops + 1, replace=False) + 10_000]
    value = c.number()
    chain = [f"\nVAR {names[0]} = {value}.\n"] + [
        f"\nVAR {names[i + 1]} = VAR {names[i]}.\n" for i in range(hops)]
    depths = sorted(np.linspace(depth * 0.5, min(depth + 0.3, 0.95), hops + 1))
    question = (f"\nFind all variables that are assigned the value {value}. "
                "Answer: they are")
    answers = names
    sample = _with_needles("variable_tracking", tokenizer, haystack, length, depths, chain,
                           question, " " + ", ".join(names) + ".", answers, rng)
    return dataclasses.replace(sample, depth=depth)  # the requested depth, not the first link


def common_words(tokenizer, haystack, length, depth, c: Content,
                 top: int = COMMON_TOP) -> Sample:
    """A numbered list of words; `top` of them repeat far more often than the rest."""
    rng = c.rng
    q = (f"\nWhat are the {top} most common words in the list above? They are")
    frequent = list(rng.choice(c.words, size=top, replace=False))
    rare = [w for w in c.words if w not in frequent]
    words, budget = [], max(length - len(tokenizer.encode(q)) - 8, 0)
    used = 0
    while True:
        pick = frequent if rng.random() < 0.5 else rare
        w = str(rng.choice(pick))
        item = f"{len(words) + 1}. {w}\n"
        n = len(tokenizer.encode(item))
        if used + n > budget:
            break
        words.append(w)
        used += n
    b = Builder(tokenizer)
    b.add("".join(f"{i + 1}. {w}\n" for i, w in enumerate(words)))
    q_span = b.add(q)
    counts = {w: words.count(w) for w in set(words)}
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[:top]
    return Sample("common_words", b.ids(), " " + ", ".join(ranked) + ".", tuple(ranked), [],
                  q_span, length, depth)


TASKS: dict[str, Callable] = {
    "niah_single": niah_single, "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue, "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking, "common_words": common_words,
}


def as_document(sample: Sample, tokenizer) -> np.ndarray:
    """A training document: the prompt followed by its answer tokens."""
    return np.concatenate([sample.ids, tokenizer.encode(sample.answer)]).astype(np.int32)


def fitted_sample(task: str, tokenizer, haystack: np.ndarray, total: int, depth: float,
                  seed: Sequence[int], split: str) -> Sample:
    """A sample whose prompt and answer together take about `total` tokens (`length`), so a
    model reads and writes it within that window: built once to measure the answer, then
    again from the same seed (the same keys and values) with the prompt shorter by it."""
    def build(n: int) -> Sample:
        return TASKS[task](tokenizer, haystack, n, depth,
                           Content(np.random.default_rng(list(seed)), split))

    answer = len(tokenizer.encode(build(total).answer))
    return dataclasses.replace(build(total - answer), length=total)
