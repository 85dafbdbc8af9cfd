"""The dense attention oracle against a per-query loop in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridlm import ops
from hybridlm.ops import masks


def loop_attention(q, k, v, *, causal, window, chunk, q_seg, kv_seg, q_pos, kv_pos, sinks):
    b, t, h, d = q.shape
    hkv = k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for i in range(t):
            for hi in range(h):
                kh = hi // (h // hkv)
                logits, values = [], []
                for j in range(k.shape[1]):
                    p, s = q_pos[bi, i], kv_pos[bi, j]
                    if causal and s > p:
                        continue
                    if window is not None and p - s >= window:
                        continue
                    if chunk is not None and p // chunk != s // chunk:
                        continue
                    if q_seg is not None and q_seg[bi, i] != kv_seg[bi, j]:
                        continue
                    logits.append(q[bi, i, hi] @ k[bi, j, kh] / np.sqrt(d))
                    values.append(v[bi, j, kh])
                extra = [sinks[hi]] if sinks is not None else []
                if not logits:
                    continue
                z = np.array(logits + extra)
                e = np.exp(z - z.max())
                probs = e / e.sum()
                out[bi, i, hi] = probs[: len(values)] @ np.array(values)
    return out


CASES = [
    dict(causal=True, window=None, chunk=None),
    dict(causal=True, window=1, chunk=None),
    dict(causal=True, window=4, chunk=None),
    dict(causal=True, window=None, chunk=5),
    dict(causal=True, window=3, chunk=5),
    dict(causal=False, window=None, chunk=None),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("sinks", [False, True])
def test_dense_matches_the_loop(case, packed, sinks):
    rng = np.random.default_rng(0)
    b, t, h, hkv, d = 2, 11, 4, 2, 8
    q, k, v = (rng.standard_normal((b, t, n, d)) for n in (h, hkv, hkv))
    seg = pos = None
    if packed:  # documents of 4, 1 and 6 tokens; positions restart in each
        seg = np.array([[1] * 4 + [2] + [3] * 6] * b)
        pos = np.array([list(range(4)) + [0] + list(range(6))] * b)
    sink = rng.standard_normal(h) if sinks else None
    spec = ops.MaskSpec(**case, q_segment_ids=None if seg is None else jnp.array(seg),
                        kv_segment_ids=None if seg is None else jnp.array(seg),
                        q_positions=None if pos is None else jnp.array(pos),
                        kv_positions=None if pos is None else jnp.array(pos))
    got = ops.attention(*(jnp.array(x, jnp.float32) for x in (q, k, v)), spec, "dense",
                        sinks=None if sink is None else jnp.array(sink, jnp.float32))
    ref_pos = pos if pos is not None else np.broadcast_to(np.arange(t), (b, t))
    want = loop_attention(q, k, v, **case, q_seg=seg, kv_seg=seg, q_pos=ref_pos, kv_pos=ref_pos,
                          sinks=sink)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_rows_that_see_nothing_are_zero_and_have_finite_gradients():
    q = k = v = jnp.ones((1, 4, 2, 8))
    seg_q, seg_kv = jnp.array([[1, 1, 2, 0]]), jnp.array([[1, 1, 1, 1]])
    spec = ops.MaskSpec(causal=True, q_segment_ids=seg_q, kv_segment_ids=seg_kv)
    out = ops.attention(q, k, v, spec, "dense")
    np.testing.assert_array_equal(out[0, 2:], 0.0)
    grads = jax.grad(lambda q, k, v: ops.attention(q, k, v, spec, "dense").sum(),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.attention(jnp.ones((1, 4, 3, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)),
                      ops.MaskSpec())
    with pytest.raises(ValueError, match="window"):
        ops.MaskSpec(window=0)


@pytest.mark.parametrize("case", CASES)
def test_counts_and_block_geometry_follow_the_one_predicate(case):
    """What FLOP counts (`visible_key_counts`) and block skipping (`visible_offsets`) use
    agree with `visible`, the predicate dense (above) is tested with, on numpy arrays."""
    t = 23
    p, s = np.arange(t)[:, None], np.arange(t)[None, :]
    rule = masks.MaskRule(**case)
    mask = rule.visible(p, s)
    assert isinstance(mask, np.ndarray) and mask.shape == (t, t)
    np.testing.assert_array_equal(rule.visible_key_counts(t), mask.sum(axis=1))
    lo, hi = rule.visible_offsets()
    offsets = (p - s)[mask]
    assert offsets.min() >= lo and offsets.max() <= hi


def test_the_rule_travels_whole_and_kernels_see_fields_they_do_not_translate():
    """A MaskSpec is its rule plus arrays: the rule is static (a cache key), the arrays are
    the pytree's leaves; a kernel that translates only some fields can tell the rest are off."""
    pos = jnp.arange(4)[None]
    spec = masks.MaskRule(window=3, chunk=2).for_tokens(q_positions=pos, kv_positions=pos)
    assert spec.rule == masks.MaskRule(window=3, chunk=2) and hash(spec.rule) is not None
    assert len(jax.tree_util.tree_leaves(spec)) == 2 and spec.span == 2
    assert masks.MaskRule(window=4).uses_only("causal", "window")
    assert not masks.MaskRule(chunk=4).uses_only("causal", "window")
    assert not masks.MaskRule(causal=False).uses_only("window")
