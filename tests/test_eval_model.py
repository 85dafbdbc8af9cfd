"""Evaluation pieces on a real (tiny, untrained) model: analysis, perplexity by position."""

import numpy as np
import pytest

from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.eval import analysis, perplexity, tasks
from hybridlm.eval.analysis_math import SEGMENTS
from tests.helpers import build, tiny_model_config

TOK = ByteTokenizer()
HAY = TOK.encode("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 50)


def test_attention_analysis_per_layer_and_type():
    cfg = tiny_model_config("rnope_swa", vocab_size=300)  # window 5
    model = build(cfg).model
    (sample,) = tasks.make_samples("niah_single", TOK, HAY, [400], [0.5], 1, seed=0)
    result = analysis.analyze_sample(model, sample, TOK.encode(sample.answer))
    exact = len(sample.ids) + len(TOK.encode(sample.answer)) - sample.question_span[0]
    padded = analysis.analyze_sample(model, sample, TOK.encode(sample.answer), exact + 9)
    assert padded["overall"] == pytest.approx(result["overall"], abs=1e-5)  # extra rows: weight 0
    assert [r["type"] for r in result["per_layer"]] == ["local", "local", "local", "global"]
    for row in result["per_layer"]:
        assert sum(row[s] for s in SEGMENTS) == pytest.approx(1.0, abs=1e-4)
        if row["type"] == "local":  # a window of 5 keys never reaches the needle or the start
            assert row["begin"] == 0.0 and row["needle"] == 0.0  # only context and qc keys
            assert row["qc"] > 0.9  # all but the first few queries see only qc keys
            assert row["entropy"] <= np.log(5) + 1e-4
    assert result["by_type"]["global"]["context"] > 0.5  # an untrained NoPE layer looks broadly
    avg = analysis.average([result, result])
    assert avg["overall"] == pytest.approx(result["overall"])


def test_loss_by_position_buckets_and_an_oracle():
    assert perplexity.buckets(10) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    np.testing.assert_allclose(perplexity.token_losses(logits, np.array([0, 1])),
                               [np.log(2), -np.log(0.8)])
    # a "model" that puts probability 1/2 on the true next token everywhere: loss = log 2
    docs = [np.arange(40) % 7, np.arange(30) % 5]

    def forward(tokens):
        t = tokens.shape[1]
        logits = np.full((1, t, 8), -1e9)
        for i in range(t):
            nxt = (tokens[0, i] + 1) % (7 if tokens[0, :7].max() == 6 else 5)
            logits[0, i, nxt] = 0.0
            logits[0, i, (nxt + 1) % 8] = 0.0
        return logits

    out = perplexity.loss_by_position(forward, docs, 16)
    assert out["documents"] == 2
    assert all(b["loss"] == pytest.approx(np.log(2)) for b in out["buckets"])
    with pytest.raises(ValueError, match="longer than"):
        perplexity.loss_by_position(forward, docs, 64)
