"""Synthetic retrieval documents to train on: `data.source=stdlib,retrieval:4000`.

A model of a few million parameters trained on source code alone never learns to retrieve a
number from far back, so the paper's needle and attention-mass measurements would see
nothing. Mixing in documents built by the very generators the evaluation uses
(hybridlm/data/retrieval_text.py: passkey-style single needles, multi-key, multi-value,
multi-query, variable tracking), with the answer appended, teaches the skill; the training
documents draw keys and numbers from the `train` split of `Content`, disjoint from the
`heldout` split that evaluation asks (it asks the `train` split too, and reports both).

The generators work on token ids; here they run on characters (one id per Unicode code
point), so the documents are text and go through `hybridlm prepare` like any other source.
The haystack is stdlib text from files in the upper half of the name-hash range, which no
`data.val_fraction` up to 0.5 holds out: validation text is never trained on.

Spec: `retrieval:COUNT[:CHARS[:TASKS]]`, COUNT documents of CHARS/4..CHARS characters, BOS
counted (default 1024; keep it at most data.seq_len so that a question is not cut from its
context or its answer), of the tasks TASKS ('+'-separated, default the five retrieval
tasks; `copy` adds text that ends repeating a span of it, `repeat` a random string of letters
and digits repeated to the length, `repeat_ngram` one over 4 characters) in turn.

`repeat` is induction practice with the densest signal: after its first period every
character is predictable only by looking back for where the current context occurred and
copying what followed, the circuit a needle's answer needs. On 2 CPU cores a model learns it
within minutes from short rows (`retrieval:COUNT:64:repeat` at data.seq_len 64, where a
needle does not fit), then learns needles at the training length from those weights.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Iterator

import numpy as np

from hybridlm.data.retrieval_text import as_document, fitted_sample, haystack_ids
from hybridlm.errors import ConfigError

FORMAT = 5  # part of the source's cache key: a change to the documents bumps it
TRAIN_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
               "variable_tracking")
REPEATS = ("repeat", "repeat_ngram")  # need no haystack
TASKS = (*TRAIN_TASKS, "copy", *REPEATS)  # the last three on request only: induction practice
COPY_SPAN = (24, 96)  # characters repeated at the end of a `copy` document
DEFAULT_CHARS = 1024
MIN_CHARS = 256  # a single needle, its question and answer fit; several need ~340
MIN_REPEAT_CHARS = 16  # `repeat` alone: a string of 4+ characters, repeated
REPEAT_ALPHABET = string.ascii_letters + string.digits  # 62: few repeats within a period
NGRAM_ALPHABET = 4  # `repeat_ngram`: characters per string, so one character is ambiguous
HAYSTACK_FILES = 200  # stdlib files joined as filler (a few MB)


def parse_spec(location: str) -> tuple[int, int, tuple[str, ...]]:
    """'4000' -> (4000, 1024, TRAIN_TASKS); '4000:2048' -> (4000, 2048, TRAIN_TASKS);
    '4000:512:niah_single+niah_multikey' -> those tasks in turn; anything else: ConfigError."""
    parts = location.split(":")
    try:
        count = int(parts[0])
        chars = int(parts[1]) if len(parts) > 1 else DEFAULT_CHARS
    except (ValueError, IndexError):
        count = chars = -1
    tasks = tuple(parts[2].split("+")) if len(parts) > 2 else TRAIN_TASKS
    min_chars = MIN_REPEAT_CHARS if set(tasks) <= set(REPEATS) else MIN_CHARS
    if len(parts) > 3 or count < 1 or chars < min_chars:
        raise ConfigError(f"data.source 'retrieval:{location}': write retrieval:COUNT, "
                          f"retrieval:COUNT:CHARS or retrieval:COUNT:CHARS:TASK+TASK with "
                          f"COUNT >= 1 documents and CHARS >= {min_chars} characters each at "
                          "most")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"data.source 'retrieval:{location}': unknown task {unknown[0]!r}; "
                          f"choose from {'+'.join(TASKS)}")
    return count, chars, tasks


class CharCodec:
    """Characters as ids, so the token-level task generators build text."""

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return np.asarray(ids, np.uint32).tobytes().decode("utf-32-le")


@functools.cache
def haystack_chars() -> np.ndarray:
    """Stdlib text that is never validation (name hash in the upper half), as code points;
    ASCII files only, so a document of N characters is N byte tokens."""
    from hybridlm.data import corpus
    from hybridlm.data.split import name_hash

    root = corpus.stdlib_dir().parent
    texts = []
    for path in corpus.stdlib_files():
        data = path.read_bytes()
        if name_hash(path.relative_to(root).as_posix()) >= 2**62 and data.isascii():
            texts.append(data.decode("ascii"))  # one byte a character: lengths are exact
        if len(texts) == HAYSTACK_FILES:
            break
    if not texts:
        raise ConfigError("data.source 'retrieval:...': found no stdlib text for haystacks")
    return CharCodec().encode("\n".join(texts))


def copy_document(haystack: np.ndarray, length: int, depth: float,
                  rng: np.random.Generator) -> np.ndarray:
    """`length` characters of text whose last line repeats a span of it from `depth`: to
    continue it, look back for where the span began and copy on, which is the look-back a
    needle's answer needs (the question ends as the needle began) with a denser signal."""
    span = int(rng.integers(*COPY_SPAN))
    text = haystack_ids(haystack, max(length - span - 1, span), rng)
    start = int(round(depth * (len(text) - span)))
    return np.concatenate([text, CharCodec().encode("\n"), text[start:start + span]])


def repeat_document(length: int, rng: np.random.Generator,
                    symbols: int = len(REPEAT_ALPHABET)) -> np.ndarray:
    """`length` characters: a random string (a sixth to a half of the length) repeated; after
    its first period each character follows from looking back. Over all 62 letters and
    digits one character locates the copy; over `symbols` = NGRAM_ALPHABET random ones
    (`repeat_ngram`) each occurs many times per period, so only the several characters before
    it do, as only the words before it ("... for KEY is") locate a needle's first digit."""
    period = int(rng.integers(max(length // 6, 4), max(length // 2, 4) + 1))
    alphabet = CharCodec().encode(REPEAT_ALPHABET)
    if symbols < len(alphabet):
        alphabet = rng.choice(alphabet, symbols, replace=False)
    return np.resize(rng.choice(alphabet, size=period), length)


def retrieval_documents(count: int, max_chars: int, tasks: tuple[str, ...] = TRAIN_TASKS,
                        seed: int = 0) -> Iterator[tuple[str, str]]:
    """(name, text) of `count` retrieval documents, each a task prompt plus its answer, of
    max_chars/4..max_chars characters with the BOS that prepare puts first (so with
    max_chars = data.seq_len a document fills at most one row: never cut). Tasks take turns;
    one whose needles and question alone are longer than that gives way to the next."""
    codec = CharCodec()
    haystack = haystack_chars() if set(tasks) - set(REPEATS) else None
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        length = int(rng.integers(max_chars // 4, max_chars + 1)) - 1  # the BOS comes first
        depth = float(rng.uniform())
        for k in range(len(tasks)):  # the task in turn, or the next one that fits
            task = tasks[(i + k) % len(tasks)]
            if task == "repeat":
                ids = repeat_document(length, rng)
            elif task == "repeat_ngram":
                ids = repeat_document(length, rng, NGRAM_ALPHABET)
            elif task == "copy":
                ids = copy_document(haystack, length, depth, rng)
            else:
                ids = as_document(fitted_sample(task, codec, haystack, length, depth,
                                                [seed, i, 1], "train"), codec)
            if len(ids) < max_chars:
                break
        yield f"retrieval/{task}/{i:07d}", codec.decode(ids)
