"""Scoring generated continuations against a sample's answer.

- needle tasks with one value (niah_single, niah_multikey): exact match: the first number
  the model writes must be the needle's value.
- tasks with several values (multi-value, multi-query, variable tracking, common words):
  RULER's string_match_all: the fraction of expected values that appear in the output.

`wilson` gives the 95% interval printed next to every mean score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from hybridlm.data.retrieval_text import Sample

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


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% for z = 1.96) of a proportion from `successes` of n trials.

    Exact-match scores are Bernoulli trials. A fractional score (string_match_all) in [0, 1]
    with mean p has variance at most p (1 - p), so passing the sum of the scores gives an
    interval at least as wide as the truth needs (conservative)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
