"""Scoring generated continuations against a sample's answer.

- needle tasks with one value (niah_single, niah_multikey): exact match: the first number
  the model writes must be the needle's value.
- tasks with several values (multi-value, multi-query, variable tracking, common words):
  RULER's string_match_all: the fraction of expected values that appear in the output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from hybridlm.eval.tasks import Sample

EXACT_TASKS = ("niah_single", "niah_multikey")


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def exact_match(answer_value: str, generated: str) -> float:
    return float(first_number(generated) == answer_value)


def match_all(answers: Iterable[str], generated: str) -> float:
    answers = list(answers)
    if not answers:
        return 0.0
    low = generated.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def score(sample: Sample, generated: str) -> float:
    """Score in [0, 1] for one generated continuation."""
    if sample.task in EXACT_TASKS:
        return exact_match(sample.answers[0], generated)
    return match_all(sample.answers, generated)
