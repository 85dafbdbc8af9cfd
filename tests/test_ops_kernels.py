"""Every kernel that runs on CPU against the mask's definition and the dense oracle:
the three silent window bugs known elsewhere, splash (Pallas interpret mode) against
dense, and the dispatch rules (auto, cuDNN fallback, logging once)."""

import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridlm import ops
from hybridlm.ops import cudnn, splash

attention_module = importlib.import_module("hybridlm.ops.attention")

CPU_IMPLS = ["dense", "blockwise", "splash"]
T, W = 32, 5


def visible_keys(impl, spec, query, t=T):
    """Keys whose values reach out[query]: where d out[query] / d v is nonzero."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.array(rng.standard_normal((1, t, 2, 8)), jnp.float32) for _ in range(3))
    grad = jax.jit(jax.grad(lambda v: ops.attention(q, k, v, spec, impl, block_q=16,
                                                    block_kv=16)[0, query].sum()))(v)
    return set(np.flatnonzero(np.abs(np.asarray(grad[0])).sum(axis=(1, 2)) > 0).tolist())


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_window_is_applied_without_any_other_mask(impl):
    """Bug 1: a window silently ignored when no segment mask is passed."""
    spec = ops.MaskSpec(causal=True, window=W)  # no segment ids, no positions
    assert visible_keys(impl, spec, 20) == set(range(20 - W + 1, 21))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_window_never_sees_the_future(impl):
    """Bug 2: a window that lets a query see keys after it (causal), or more than W-1
    keys after it (bidirectional windows are symmetric)."""
    assert max(visible_keys(impl, ops.MaskSpec(causal=True, window=W), 9)) == 9
    assert visible_keys(impl, ops.MaskSpec(causal=False, window=W), 9) == set(
        range(9 - W + 1, 9 + W))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_window_counts_the_query_itself(impl):
    """Bug 3: inclusive/exclusive off-by-one: W=5 means keys p-4..p, not p-5..p."""
    seen = visible_keys(impl, ops.MaskSpec(causal=True, window=W), 30)
    assert 30 - (W - 1) in seen and 30 - W not in seen and len(seen) == W


def packed(t):
    lengths = [7, 1, t - 8]  # includes a one-token document
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    return jnp.array(seg[None].repeat(2, 0))


SPLASH_CASES = {
    "causal_gqa_sinks": (dict(causal=True), 32, True),
    "window_packed_unaligned": (dict(causal=True, window=6), 40, False),
    "chunk": (dict(causal=True, chunk=8), 32, False),
    "bidirectional_window": (dict(causal=False, window=4), 32, False),
}


@pytest.mark.parametrize("name", SPLASH_CASES)
def test_splash_matches_dense(name):
    """Splash in interpret mode (tiny cases: interpret mode is slow). Tolerance 1e-5 on
    outputs, 1e-4 on gradients, float32."""
    case, t, with_sinks = SPLASH_CASES[name]
    rng = np.random.default_rng(0)
    q = jnp.array(rng.standard_normal((2, t, 4, 8)), jnp.float32)
    k, v = (jnp.array(rng.standard_normal((2, t, 2, 8)), jnp.float32) for _ in range(2))
    sinks = jnp.array(rng.standard_normal(4), jnp.float32) if with_sinks else None
    seg = packed(t) if name == "window_packed_unaligned" else None
    spec = ops.MaskSpec(**case, q_segment_ids=seg, kv_segment_ids=seg)
    cot = jnp.array(rng.standard_normal(q.shape), jnp.float32)

    def run(impl):
        def loss(q, k, v):
            out = ops.attention(q, k, v, spec, impl, sinks=sinks, block_q=16, block_kv=16)
            return jnp.sum(out * cot), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    (got, got_grads), (want, want_grads) = run("splash"), run("dense")
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_splash_refuses_what_its_index_masks_cannot_see():
    q = jnp.zeros((1, 32, 2, 8))
    pos = jnp.arange(32)[None]
    assert splash.unsupported(q, q, ops.MaskSpec(chunk=8), None) is None
    assert "positions" in splash.unsupported(q, q, ops.MaskSpec(chunk=8, q_positions=pos), None)
    assert "non-causal chunk" in splash.unsupported(q, q, ops.MaskSpec(causal=False, chunk=8),
                                                    None)


def test_auto_picks_the_platform_kernel():
    assert ops.resolve_impl("auto") == "blockwise"  # this CPU
    assert ops.resolve_impl("auto", backend="tpu") == "splash"
    assert ops.resolve_impl("auto", backend="gpu") == "blockwise"  # not CUDA here
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        ops.resolve_impl("flash")


@pytest.mark.parametrize("case,reason", [
    (dict(dtype=jnp.float32), "float32"),
    (dict(spec=dict(q_segment_ids=1)), "packed segments (segment ids) before Hopper"),
    (dict(spec=dict(chunk=64)), "chunked"),
    (dict(sinks=True), "sink"),
    (dict(spec=dict(causal=False, window=64)), "non-causal window"),
    (dict(kv_len=100), "lengths differ"),
    (dict(head_dim=12), "head_dim 12"),
])
def test_cudnn_limitations(case, reason):
    spec_fields = dict(causal=True, window=128)
    spec_fields.update(case.get("spec", {}))
    if "q_segment_ids" in spec_fields:
        spec_fields["q_segment_ids"] = spec_fields["kv_segment_ids"] = jnp.ones((1, 64))
    d = case.get("head_dim", 64)
    q_shape, k_shape = (1, 64, 8, d), (1, case.get("kv_len", 64), 2, d)
    supported = cudnn.limitation((1, 64, 8, 64), (1, 64, 2, 64), jnp.bfloat16,
                                 ops.MaskSpec(causal=True, window=128), False)
    assert supported is None  # bf16, causal window, GQA: cuDNN's case
    got = cudnn.limitation(q_shape, k_shape, case.get("dtype", jnp.bfloat16),
                           ops.MaskSpec(**spec_fields), case.get("sinks", False))
    assert got is not None and reason in got


def test_cudnn_takes_packed_segments_from_hopper_on():
    ids = jnp.ones((1, 64), jnp.int32)
    spec = ops.MaskSpec(causal=True, window=128, q_segment_ids=ids, kv_segment_ids=ids)
    shape = (1, 64, 8, 64)
    assert cudnn.limitation(shape, shape, jnp.bfloat16, spec, False, packing=True) is None


def test_cudnn_packed_layout_describes_each_run():
    ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
    lengths, offsets, count = cudnn.packed_layout(ids)
    np.testing.assert_array_equal(lengths, [[3, 2, 1, 2, -1, -1, -1, -1],
                                            [8, -1, -1, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1, -1, -1, -1, -1],
                                            [0, -1, -1, -1, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(count, [4, 1])
    lengths, offsets, _ = cudnn.packed_layout(ids, max_segments=3)  # what cuDNN gets
    np.testing.assert_array_equal(lengths, [[3, 2, 1], [8, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1], [0, -1, -1, -1]])
    # Random packings: the runs rebuild the ids' change points exactly.
    rng = np.random.default_rng(0)
    ids = np.cumsum(rng.random((4, 300)) < 0.05, axis=1).astype(np.int32)
    lengths, offsets, _ = (np.asarray(x)
                           for x in jax.jit(cudnn.packed_layout)(jnp.asarray(ids)))
    for row, n, o in zip(ids, lengths, offsets, strict=True):
        used = n > 0
        assert n[used].sum() == row.size and (o[: used.sum()] == np.cumsum(n[used]) - n[used]).all()
        rebuilt = np.repeat(np.arange(used.sum()), n[used])
        assert (np.diff(rebuilt) != 0).tolist() == (np.diff(row) != 0).tolist()


def test_cudnn_falls_back_to_blockwise_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(attention_module, "_logged", set())
    rng = np.random.default_rng(0)
    q, k, v = (jnp.array(rng.standard_normal((1, 40, 2, 8)), jnp.bfloat16) for _ in range(3))
    spec = ops.MaskSpec(causal=True, window=9)
    with caplog.at_level(logging.WARNING, logger="hybridlm.ops.attention"):
        got = jax.jit(lambda q, k, v: ops.attention(q, k, v, spec, "cudnn"))(q, k, v)
        again = jax.jit(lambda q, k, v: ops.attention(q, k, v, spec, "cudnn"))(q, k, v)
    records = [r for r in caplog.records if "cudnn cannot handle" in r.getMessage()]
    assert len(records) == 1 and "no NVIDIA GPU" in records[0].getMessage()
    want = jax.jit(lambda q, k, v: ops.attention(q, k, v, spec, "blockwise"))(q, k, v)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(want, np.float32))


def test_splash_falls_back_for_positioned_chunks(caplog, monkeypatch):
    monkeypatch.setattr(attention_module, "_logged", set())
    q = jnp.ones((1, 16, 2, 8))
    spec = ops.MaskSpec(chunk=4, q_positions=jnp.arange(16)[None])
    with caplog.at_level(logging.WARNING, logger="hybridlm.ops.attention"):
        got = jax.jit(lambda q: ops.attention(q, q, q, spec, "splash"))(q)
    assert any("splash cannot handle" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(got, ops.attention(q, q, q, spec, "dense"), atol=1e-6)
