"""Decoding with the hybrid KV cache equals a full forward pass, position by position."""

import numpy as np
import pytest

from hybridlm import config as config_lib
from hybridlm.infer import Generator, cache_bytes
from tests.helpers import build, neighbour_model_config, random_tokens, tiny_model_config

# windows (rnope_swa), chunks + temperature (llama4), a tail group + QK-norm (gemma3), sinks
CASES = [("paper", "rnope_swa"), ("neighbour", "llama4"), ("neighbour", "gemma3"),
         ("neighbour", "gpt_oss")]


@pytest.mark.parametrize("kind,name", CASES)
def test_cached_decoding_matches_the_full_forward_pass(kind, name):
    cfg = tiny_model_config(name) if kind == "paper" else neighbour_model_config(name)
    forward = build(cfg)
    tokens = np.asarray(random_tokens(11, (2, 30)))  # window 5, chunk 6: far past both
    full = np.asarray(forward(tokens))
    gen = Generator(forward.model, cfg.to_dict(), batch=2, max_len=32)
    stepwise = gen.logits_stepwise(tokens, prompt_len=9)
    np.testing.assert_allclose(stepwise, full, atol=2e-4, rtol=2e-4)


def test_greedy_generation_continues_like_argmax_of_the_full_pass():
    cfg = tiny_model_config("rnope_swa")
    forward = build(cfg)
    prompt = np.asarray(random_tokens(12, (1, 12)))
    gen = Generator(forward.model, cfg.to_dict(), batch=1, max_len=24)
    out = gen.generate(prompt, 8)
    seq = np.concatenate([prompt, out], axis=1)
    greedy = np.asarray(forward(seq)).argmax(-1)  # what the full pass predicts at each step
    np.testing.assert_array_equal(out, greedy[:, 11:19])
    aligned = Generator(forward.model, cfg.to_dict(), batch=1, max_len=24, prefill_multiple=5)
    np.testing.assert_array_equal(aligned.generate(prompt, 8), out)  # 10 prefilled, 2 stepped
    with pytest.raises(ValueError, match="exceed max_len"):
        gen.generate(prompt, 20)


def test_sampling_is_seeded_and_respects_top_k():
    cfg = tiny_model_config("rope")
    gen = Generator(build(cfg).model, cfg.to_dict(), batch=1, max_len=20)
    prompt = np.asarray(random_tokens(13, (1, 6)))
    a = gen.generate(prompt, 6, temperature=1.0, top_k=5, seed=3)
    b = gen.generate(prompt, 6, temperature=1.0, top_k=5, seed=3)
    np.testing.assert_array_equal(a, b)
    greedy = gen.generate(prompt, 6, temperature=1.0, top_k=1, seed=4)
    np.testing.assert_array_equal(greedy, gen.generate(prompt, 6))


def test_cache_bytes_of_rnope_swa_at_128k_is_about_27_percent():
    cfg = config_lib.load("configs/paper.py:variant=rnope_swa,size=8b").model.to_dict()
    report = cache_bytes(cfg, batch=1, max_len=131072)
    assert report["fraction"] == pytest.approx((3 * 4096 + 131072) / (4 * 131072))
    assert 0.26 < report["fraction"] < 0.28
    full = 32 * 131072 * 2 * 8 * 128 * 2  # layers x positions x (k, v) x kv heads x dim x bf16
    assert report["full_bytes"] == full
