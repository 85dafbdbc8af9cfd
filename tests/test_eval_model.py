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
    for key in ("overall", "uniform"):  # extra rows: weight 0, in the masses and the baseline
        got, want = (r["overall"] if key == "overall" else r["overall"]["uniform"]
                     for r in (padded, result))
        assert {k: v for k, v in got.items() if k != "uniform"} == pytest.approx(
            {k: v for k, v in want.items() if k != "uniform"}, abs=1e-5)
    assert [r["type"] for r in result["per_layer"]] == ["local", "local", "local", "global"]
    for row in result["per_layer"]:
        assert sum(row[s] for s in SEGMENTS) == pytest.approx(1.0, abs=1e-4)
        if row["type"] == "local":  # a window of 5 keys never reaches the needle or the start
            assert row["begin"] == 0.0 and row["needle"] == 0.0  # only context and qc keys
            assert row["qc"] > 0.9  # all but the first few queries see only qc keys
            assert row["entropy"] <= np.log(5) + 1e-4
    assert result["by_type"]["global"]["context"] > 0.5  # an untrained NoPE layer looks broadly
    avg = analysis.average([result, result])
    assert {k: v for k, v in avg["overall"].items() if k != "uniform"} == pytest.approx(
        {k: v for k, v in result["overall"].items() if k != "uniform"})


def test_loss_by_position_buckets_and_batches():
    assert perplexity.buckets(10) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]
    docs = [np.arange(40), np.arange(30) + 100, np.arange(50) + 200, np.arange(5)]
    seen = []

    def losses(tokens):  # the loss at position i of a row: its first token + i
        seen.append(tokens.shape)
        return tokens[:, :1] + np.arange(tokens.shape[1] - 1)[None]

    out = perplexity.loss_by_position(losses, docs, 16, batch=2)
    assert out["documents"] == 3 and seen == [(2, 17), (2, 17)]  # last batch padded
    mean_first = (0 + 100 + 200) / 3  # the padding copy is not counted
    assert out["buckets"][0]["loss"] == pytest.approx(mean_first)
    assert out["buckets"][-1] == {"start": 8, "end": 16, "center": 11.5,
                                  "loss": pytest.approx(mean_first + 11.5)}
    assert out["mean_loss"] == pytest.approx(mean_first + 7.5)
    with pytest.raises(ValueError, match="longer than"):
        perplexity.loss_by_position(losses, docs, 64)


def test_batched_continuations_equal_one_prompt_at_a_time():
    """Needle prompts continued in batches (grouped by length, padded to a power of two)
    give the tokens each prompt gets alone, in the input order."""
    from hybridlm.eval.commands import Decoder
    from hybridlm.eval.retrieval import continue_all

    cfg = tiny_model_config("rnope_swa", vocab_size=300)
    model = build(cfg).model
    samples = tasks.make_samples("niah_single", TOK, HAY, [96], [0.0, 1.0], 3, seed=0)
    prompts = [s.ids for s in samples]
    new = [5 + i % 2 for i in range(len(samples))]  # two answer lengths within a length
    decode = Decoder(model, cfg)
    batched = continue_all(prompts, new, decode, batch=4, progress=False)
    alone = continue_all(prompts, new, decode, batch=1, progress=False)
    assert len(batched) == len(samples)
    for b, a, n in zip(batched, alone, new, strict=True):
        assert len(b) == n
        np.testing.assert_array_equal(b, a)
    sizes = {b for _, b in decode.generators}  # groups of equal prompt and answer length
    assert max(sizes) > 1 and all(b & (b - 1) == 0 for b in sizes)
