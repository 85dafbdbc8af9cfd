"""Task generators, scoring, and the attention-mass math on hand-made cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.eval import analysis_math as am
from hybridlm.eval import scoring, tasks

TOK = ByteTokenizer()
HAY = TOK.encode("The quick brown fox jumps over the lazy dog. " * 400)


@pytest.mark.parametrize("task", tasks.RULER_TASKS)
def test_samples_have_the_requested_length_and_exact_spans(task):
    (s,) = tasks.make_samples(task, TOK, HAY, [700], [0.3], 1, seed=1)
    assert abs(len(s.ids) - 700) <= 40
    assert s.depth == 0.3  # the requested depth (grids group samples by it)
    q0, q1 = s.question_span
    assert q1 == len(s.ids) and TOK.decode(s.ids[q0:q1]).strip().endswith(
        ("is", "are", "order,"))
    if s.needle_spans:  # the target needle holds the (first) answer
        a, b = s.needle_spans[0]
        assert s.answers[0] in TOK.decode(s.ids[a:b]) or task == "variable_tracking"
    if task == "niah_single":
        a, b = s.needle_spans[0]
        assert s.answers[0] in TOK.decode(s.ids[a:b])
        assert abs(a / (len(s.ids) - (q1 - q0)) - 0.3) < 0.05  # needle at the requested depth


def test_same_seed_same_samples_and_train_eval_content_is_disjoint():
    a = tasks.make_samples("niah_multikey", TOK, HAY, [400], [0.5], 3, seed=7)
    b = tasks.make_samples("niah_multikey", TOK, HAY, [400], [0.5], 3, seed=7)
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b, strict=True))
    train = tasks.make_samples("niah_single", TOK, HAY, [300], [0.5], 50, seed=7, split="train")
    test = tasks.make_samples("niah_single", TOK, HAY, [300], [0.5], 50, seed=7, split="heldout")
    assert not {s.answers[0] for s in train} & {s.answers[0] for s in test}
    train_keys = {TOK.decode(s.ids[s.question_span[0]:]).split()[7] for s in train}
    test_keys = {TOK.decode(s.ids[s.question_span[0]:]).split()[7] for s in test}
    assert len(train_keys) > 10 and not train_keys & test_keys


def test_scoring_on_constructed_outputs():
    (s,) = tasks.make_samples("niah_single", TOK, HAY, [300], [0.5], 1, seed=0)
    value = s.answers[0]
    assert scoring.score(s, f" {value}. And more") == 1.0
    assert scoring.score(s, f" {value[:-1]}0.") == 0.0 or value.endswith("0")
    assert scoring.score(s, f" 12 then {value}") == 0.0  # the first number counts
    assert scoring.score(s, " no idea") == 0.0
    (m,) = tasks.make_samples("niah_multivalue", TOK, HAY, [300], [0.5], 1, seed=0)
    assert scoring.score(m, " " + ", ".join(m.answers)) == 1.0
    assert scoring.score(m, " " + m.answers[1]) == pytest.approx(1 / 3)
    assert scoring.match_all([], "x") == 0.0


def test_segment_labels_on_a_hand_made_case():
    labels = am.segment_ids_for_keys(40, needle=(20, 25), qc_start=34)
    assert list(labels[:10]) == [0] * 10
    assert list(labels[20:25]) == [1] * 5 and labels[19] == 2 and labels[25] == 2
    assert list(labels[34:]) == [3] * 6


def test_segment_masses_sum_to_one_and_match_a_known_answer():
    # One head; keys 0..39; the query (at 39) has a huge dot product with key 22 only.
    d = 4
    k = np.zeros((40, 1, d), np.float32)
    k[22, 0, 0] = 1.0
    q = np.zeros((1, 1, d), np.float32)
    q[0, 0, 0] = 60.0
    probs = am.query_probs(jnp.array(q), jnp.array(k), jnp.array([39]), None, None)
    masses = am.summarize(probs, am.segment_ids_for_keys(40, (20, 25), 34))
    assert sum(masses[s] for s in am.SEGMENTS) == pytest.approx(1.0, abs=1e-5)
    assert masses["needle"] > 0.99 and masses["entropy"] < 0.1
    # Uniform attention (q = 0): mass is proportional to segment sizes, entropy = log(40).
    probs = am.query_probs(jnp.zeros((2, 2, d)), jnp.array(np.random.randn(40, 1, d)),
                           jnp.array([39, 39]), None, None)
    masses = am.summarize(probs, am.segment_ids_for_keys(40, (20, 25), 34))
    assert masses["begin"] == pytest.approx(10 / 40, abs=1e-5)
    assert masses["needle"] == pytest.approx(5 / 40, abs=1e-5)
    assert masses["qc"] == pytest.approx(6 / 40, abs=1e-5)
    assert masses["entropy"] == pytest.approx(np.log(40), abs=1e-4)


def test_windowed_layer_puts_no_mass_outside_its_window():
    probs = am.query_probs(jnp.zeros((1, 1, 4)), jnp.ones((40, 1, 4)), jnp.array([39]), 8, None)
    masses = am.summarize(probs, am.segment_ids_for_keys(40, (20, 25), 34))
    assert masses["begin"] == 0.0 and masses["needle"] == 0.0
    assert masses["qc"] == pytest.approx(6 / 8)
