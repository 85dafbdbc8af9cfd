"""Task generators, scoring, and the attention-mass math on hand-made cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from hybridlm.data import retrieval_text as rt
from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.eval import analysis_math as am
from hybridlm.eval import scoring, tasks
from hybridlm.ops import MaskRule

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
    probs = am.query_probs(jnp.array(q), jnp.array(k), jnp.array([39]), MaskRule())
    masses = am.summarize(probs, am.segment_ids_for_keys(40, (20, 25), 34))
    assert sum(masses[s] for s in am.SEGMENTS) == pytest.approx(1.0, abs=1e-5)
    assert masses["needle"] > 0.99 and masses["entropy"] < 0.1
    # Uniform attention (q = 0): mass is proportional to segment sizes, entropy = log(40).
    probs = am.query_probs(jnp.zeros((2, 2, d)), jnp.array(np.random.randn(40, 1, d)),
                           jnp.array([39, 39]), MaskRule())
    masses = am.summarize(probs, am.segment_ids_for_keys(40, (20, 25), 34))
    assert masses["begin"] == pytest.approx(10 / 40, abs=1e-5)
    assert masses["needle"] == pytest.approx(5 / 40, abs=1e-5)
    assert masses["qc"] == pytest.approx(6 / 40, abs=1e-5)
    assert masses["entropy"] == pytest.approx(np.log(40), abs=1e-4)


def test_windowed_layer_puts_no_mass_outside_its_window():
    probs = am.query_probs(jnp.zeros((1, 1, 4)), jnp.ones((40, 1, 4)), jnp.array([39]),
                           MaskRule(window=8))
    masses = am.summarize(probs, am.segment_ids_for_keys(40, (20, 25), 34))
    assert masses["begin"] == 0.0 and masses["needle"] == 0.0
    assert masses["qc"] == pytest.approx(6 / 8)


def test_prompts_start_with_bos_and_spans_follow():
    for task in tasks.RULER_TASKS:
        (s,) = tasks.make_samples(task, TOK, HAY, [600], [0.5], 1, seed=2)
        assert s.ids[0] == TOK.BOS and TOK.BOS not in s.ids[1:]
        total = len(s.ids) + len(TOK.encode(s.answer))  # prompt + answer: the length
        assert total == 600 if s.needle_spans else 580 <= total <= 600  # a list: by items
        q0, q1 = s.question_span
        assert TOK.decode(s.ids[q0:q1]).startswith("\n") and q1 == len(s.ids)
        for a, b in s.needle_spans:
            assert TOK.decode(s.ids[a:b]).startswith("\n") and TOK.decode(s.ids[a:b]).strip()


def test_wilson_interval_against_a_hand_computation():
    # p = 0.8, n = 10, z = 1.96: centre (0.8 + 1.9208 / 10) / 1.38416 = 0.71686, half-width
    # 1.96 / 1.38416 * sqrt(0.016 + 0.009604) = 0.22658: the textbook [0.490, 0.943]
    lo, hi = scoring.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9434, abs=1e-4)
    assert scoring.wilson(0, 100) == pytest.approx((0.0, 3.8416 / 103.8416))  # z^2/(n+z^2)
    lo, hi = scoring.wilson(50, 100)  # the widest case: 100 needles give +-0.1 or better
    assert hi - lo < 0.2 and lo == pytest.approx(1 - hi)


def test_chance_levels():
    assert tasks.chance("niah_multikey") == 0.25  # one of four needles' values
    assert tasks.chance("common_words") == 3 / 22  # 3 of the 22 words of the split
    assert tasks.chance("niah_single") < 1e-6


def test_uniform_baseline_of_a_hand_made_case():
    """Keys 0..39: begin 0-9, needle 20-24, context the rest, qc 34-39; queries at 38, 39."""
    segments = am.segment_ids_for_keys(40, (20, 25), 34)
    q = jnp.array([38, 39])
    full = am.summarize(am.uniform_probs(q, 40, MaskRule()), segments)
    # query 38 sees 39 keys (10 begin, 5 needle, 19 context, 5 qc), query 39 sees 40 (.., 6 qc)
    assert full["begin"] == pytest.approx((10 / 39 + 10 / 40) / 2)
    assert full["needle"] == pytest.approx((5 / 39 + 5 / 40) / 2)
    assert full["context"] == pytest.approx((19 / 39 + 19 / 40) / 2)
    assert full["qc"] == pytest.approx((5 / 39 + 6 / 40) / 2)
    assert full["entropy"] == pytest.approx((np.log(39) + np.log(40)) / 2)
    local = am.summarize(am.uniform_probs(q, 40, MaskRule(window=8)), segments)
    # a window of 8: query 38 sees 31-38 (3 context, 5 qc), query 39 sees 32-39 (2, 6)
    assert local["begin"] == 0.0 and local["needle"] == 0.0
    assert local["context"] == pytest.approx((3 / 8 + 2 / 8) / 2)
    assert local["qc"] == pytest.approx((5 / 8 + 6 / 8) / 2)
    assert local["entropy"] == pytest.approx(np.log(8))


def test_haystacks_and_loss_documents_hold_no_synthetic_text(tmp_path):
    """A run trained on code plus retrieval documents: evaluation's haystack and held-out
    documents come from the code alone (the retrieval source's own validation documents,
    with their magic numbers and questions, never), without BOS tokens inside."""
    from hybridlm import config as config_lib
    from hybridlm.eval import heldout
    from tests.test_data_sources import make_corpus

    cfg = config_lib.load("configs/tiny.py", [
        f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.5",
        f"data.source={make_corpus(tmp_path / 'corpus')},retrieval:60:256"])
    _, sources = __import__("hybridlm.data.prepare", fromlist=["resolve"]).resolve(
        cfg.data, progress=False)
    retrieval = sources[1][0]
    assert (retrieval.name_hashes < 2**62).any(), "the retrieval source has held-out docs"
    hay = heldout.haystack(cfg, TOK)
    text = TOK.decode(hay)
    assert "magic number" not in text and "VAR X" not in text and TOK.BOS not in hay
    assert "import" in text  # the code corpus's validation files
    docs = heldout.held_out_documents(cfg)
    assert docs and all(d[0] == TOK.BOS for d in docs)
    assert not any(b"magic number" in bytes(t for t in d if t < 256) for d in docs)


def test_value_splits_are_disjoint_and_share_every_digit_position():
    """Held-out values are numbers never trained on, written with digits trained in every
    position; the split sizes behind `chance` are counted, not assumed."""
    numbers = np.arange(*rt.NUMBERS)
    digit_sum = sum((numbers // 10**k) % 10 for k in range(7))
    for split, parity in (("train", 0), ("heldout", 1)):
        assert rt.split_size(split) == int(np.sum(digit_sum % 2 == parity))
        c = rt.Content(np.random.default_rng(1), split)
        drawn = [c.number() for _ in range(2000)]
        assert all(rt.number_split(int(v)) == split for v in drawn)
        assert {v[0] for v in drawn} == set("123456789")
        assert {v[-1] for v in drawn} == set("0123456789")
    with pytest.raises(ValueError, match="split must be one of"):
        rt.split_size("validation")
