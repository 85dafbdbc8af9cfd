"""The fused, chunked LM-head loss against whole logits differentiated by autodiff."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridlm import config as config_lib
from hybridlm.model.transformer import Transformer
from hybridlm.ops.cross_entropy import chunked_cross_entropy
from hybridlm.train.step import auto_loss_chunk, loss_sums

B, T, D, V = 2, 16, 8, 40


def whole_logits(h, w, targets, weights, logit_scale, z_loss):
    """The oracle: float64 logits of the whole batch, autodiff does the rest."""
    logits = jnp.einsum("btd,dv->btv", h, w) * logit_scale
    log_z = jax.nn.logsumexp(logits, axis=-1)
    ce = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce_sum = jnp.sum(ce * weights)
    return ce_sum + z_loss * jnp.sum(log_z**2 * weights), ce_sum


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(B, T, D))
    w = rng.normal(size=(D, V))
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    weights = (rng.random((B, T)) > 0.25).astype(np.float64)  # some tokens not counted
    return h, w, targets, weights


@pytest.mark.parametrize(("chunk", "z_loss"), [(1, 0.0), (4, 1e-2)])
def test_values_and_gradients_match_whole_logits(inputs, chunk, z_loss):
    h, w, targets, weights = inputs
    with jax.enable_x64():
        fused = functools.partial(chunked_cross_entropy, chunk=chunk, logit_scale=0.7,
                                  z_loss=z_loss)
        oracle = functools.partial(whole_logits, logit_scale=0.7, z_loss=z_loss)
        np.testing.assert_allclose(jax.jit(fused)(h, w, targets, weights),
                                   oracle(h, w, targets, weights), rtol=1e-12)
        # Both outputs carry gradients: a mix of them checks each cotangent's path.
        for mix in ((1.0, 0.0), (0.0, 1.0), (0.3, -2.0)):
            def scalar(f, h, w, mix=mix):
                objective, ce_sum = f(h, w, targets, weights)
                return mix[0] * objective + mix[1] * ce_sum

            got = jax.jit(jax.grad(functools.partial(scalar, fused), argnums=(0, 1)))(h, w)
            want = jax.grad(functools.partial(scalar, oracle), argnums=(0, 1))(h, w)
            for g, e in zip(got, want, strict=True):
                np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_bfloat16_hidden_states_stay_close(inputs):
    h, w = (jnp.asarray(x, jnp.float32) for x in inputs[:2])
    targets, weights = inputs[2], jnp.asarray(inputs[3], jnp.float32)
    fused = jax.grad(lambda h, w: chunked_cross_entropy(
        h.astype(jnp.bfloat16), w, targets, weights, chunk=4)[0], argnums=(0, 1))
    oracle = jax.grad(lambda h, w: whole_logits(h, w, targets, weights, 1.0, 0.0)[0],
                      argnums=(0, 1))
    for g, e in zip(fused(h, w), oracle(h, w), strict=True):
        assert g.dtype == e.dtype == jnp.float32
        np.testing.assert_allclose(g, e, atol=0.02 * float(jnp.max(jnp.abs(e))))


def test_chunk_must_divide_the_length(inputs):
    with pytest.raises(ValueError, match="loss chunk 5 must be a positive divisor of the "
                                         "length 16"):
        chunked_cross_entropy(*inputs, chunk=5)


def test_model_loss_fused_equals_unfused():
    """An untied head with a logit scale; the tied head differs only in where w comes from."""
    cfg = config_lib.load("configs/tiny.py", ["model.d_model=32", "model.num_heads=2",
                                              "model.num_kv_heads=2", "model.head_dim=16",
                                              "model.mlp_dim=64", "model.vocab_size=300",
                                              "data.seq_len=32", "model.tie_embeddings=False",
                                              "model.logit_scale=0.5"])
    graphdef, params = nnx.split(Transformer(config_lib.model_dict(cfg), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(1)
    batch = {"inputs": rng.integers(0, 300, (2, 32)), "targets": rng.integers(0, 300, (2, 32)),
             "positions": np.tile(np.arange(32), (2, 1)), "segment_ids": np.ones((2, 32)),
             "weights": np.ones((2, 32), np.float32)}
    batch = {k: jnp.asarray(v, jnp.float32 if k == "weights" else jnp.int32)
             for k, v in batch.items()}

    def run(chunk):
        fn = jax.value_and_grad(loss_sums, has_aux=True)
        return jax.jit(functools.partial(fn, graphdef=graphdef, z_loss=1e-3,
                                         loss_chunk=chunk))(params, batch=batch)

    (obj0, (ce0, _)), g0 = run(0)
    (obj8, (ce8, _)), g8 = run(8)
    np.testing.assert_allclose(obj8, obj0, rtol=1e-6)
    np.testing.assert_allclose(ce8, ce0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_fused_loss_never_holds_the_batch_logits():
    """XLA's memory analysis (deterministic): the whole-logits gradient needs several copies
    of the [B, T, V] logits as scratch, the fused one a chunk's worth."""
    h = jax.ShapeDtypeStruct((4, 256, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, 4096), jnp.float32)
    targets = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    weights = jax.ShapeDtypeStruct((4, 256), jnp.float32)
    logits_bytes = 4 * 256 * 4096 * 4

    def temp(loss):
        grad = jax.grad(lambda h, w, t, m: loss(h, w, t, m)[0], argnums=(0, 1))
        return jax.jit(grad).lower(h, w, targets, weights).compile().memory_analysis() \
            .temp_size_in_bytes

    whole = temp(functools.partial(whole_logits, logit_scale=1.0, z_loss=0.0))
    fused = temp(functools.partial(chunked_cross_entropy, chunk=16))
    assert whole >= 2 * logits_bytes
    # a few chunks' logits (1 MiB each) and the head and its gradient (1 MiB each), no more
    assert fused < logits_bytes / 2
    assert fused < whole / 6


def test_auto_chunk_is_the_largest_divisor_within_the_budget():
    # CPU budget 8 MiB: 4 rows x 8192 words -> 64 positions (8 MiB exactly).
    assert auto_loss_chunk(1024, 4 * 8192, "cpu") == 64
    assert auto_loss_chunk(1000, 4 * 8192, "cpu") == 50  # divisors of 1000 only
    assert auto_loss_chunk(8192, 1 * 256_000, "tpu") == 1024  # 1 GiB elsewhere
    assert auto_loss_chunk(512, 1e12, "cpu") == 1  # nothing fits: one position at a time


def test_config_names_a_chunk_that_does_not_divide():
    with pytest.raises(config_lib.ConfigError, match=r"train.loss_chunk \(48\) must divide "
                                                     r"data.seq_len \(512\)"):
        config_lib.load("configs/tiny.py", ["train.loss_chunk=48"])
