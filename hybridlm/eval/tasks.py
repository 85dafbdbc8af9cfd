"""Evaluation grids of the retrieval tasks, in the training format, and their chance levels.

Prompts come from the generators the training documents come from
(hybridlm/data/retrieval_text.py via hybridlm/data/synthetic.py), so needles and questions
read exactly as in training. What differs is the content: the haystack is held-out natural
text (heldout.py: validation documents of the run's non-synthetic sources), and keys and
values come from the `heldout` split (never trained on) or, to tell "cannot copy" from
"cannot copy unseen digits", from the `train` split. Every prompt starts with the
tokenizer's BOS, as every prepared document does (hybridlm/data/prepare.py), so position 0
of a prompt is what position 0 was in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from hybridlm.data import retrieval_text as rt
from hybridlm.data.retrieval_text import Sample

TASKS = rt.TASKS
RULER_TASKS = tuple(TASKS)
VALUE_SPLITS = rt.SPLITS


def with_bos(sample: Sample, bos_id: int) -> Sample:
    """The sample's prompt behind a BOS token, its spans shifted by one."""
    return dataclasses.replace(
        sample, ids=np.concatenate([[bos_id], sample.ids]).astype(np.int32),
        needle_spans=[(a + 1, b + 1) for a, b in sample.needle_spans],
        question_span=(sample.question_span[0] + 1, sample.question_span[1] + 1))


def make_samples(task: str, tokenizer, haystack: np.ndarray, lengths: Sequence[int],
                 depths: Sequence[float], per_cell: int, seed: int,
                 split: str = "heldout") -> list[Sample]:
    """A grid of prompts: lengths x depths x per_cell, reproducible from seed; keys and
    values from `split`. BOS, prompt and answer together are about `length` tokens, so at
    the training length the model answers within the window it was trained on."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    out = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for k in range(per_cell):
                sample = rt.fitted_sample(task, tokenizer, haystack, int(length) - 1,
                                          float(depth),
                                          [seed, li, di, k, sorted(TASKS).index(task)], split)
                out.append(dataclasses.replace(with_bos(sample, tokenizer.bos_id),
                                               length=int(length)))
    return out


def chance(task: str, split: str = "heldout") -> float:
    """The expected score of a guess that knows the answer's form but not the context.

    Numbers (and variable names) are guessed uniformly from their range, which a needle
    task's exact match almost never hits; where the prompt itself offers the candidates the
    guess picks among them: niah_multikey, one of the 1 + distractors needles' values;
    common_words, `top` of the words in the list (each asked word is among them with
    probability top / words).
    """
    if task == "niah_multikey":
        return 1.0 / (rt.MULTIKEY_DISTRACTORS + 1)
    if task == "common_words":
        return rt.COMMON_TOP / len(rt.WORDS[1::2])
    if task == "variable_tracking":
        return 1.0 / 90_000  # names X10000..X99999
    return 1.0 / rt.split_size(split)
