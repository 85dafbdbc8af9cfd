"""blockwise against the dense oracle (itself tested against a float64 loop): forward
outputs and gradients of q, k, v (and sinks) on random inputs.

Tolerances: float32 outputs 2e-5 and gradients 1e-4 absolute (values are O(1));
bfloat16 inputs are compared with dense on the same bf16 inputs at 3e-2 for outputs
and 6e-2 for gradients (bf16 keeps 8 bits of mantissa; p and ds are rounded to bf16
before their matmuls, as flash kernels do).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridlm import ops
from hybridlm.ops import blockwise, cost
from hybridlm.ops.block_plan import schedule
from hybridlm.ops.blockwise import block_sizes, blockwise_attention, plan
from hybridlm.ops.masks import MaskRule

B, T, H, D = 2, 37, 4, 8  # 37: not a multiple of any block size used here
BLOCK = dict(block_q=16, block_kv=16)


def use_plan(kind: str, monkeypatch) -> str:
    """strips: what these short sequences get by default (and all the other tests here),
    keeping their probabilities for the backward pass; strips-recompute: strips too large to
    keep them; steps: what long sequences get."""
    if kind == "steps":
        monkeypatch.setattr(blockwise, "MAX_STRIPS", 0)
    if kind == "strips-recompute":
        monkeypatch.setattr(blockwise, "KEEP_PROBS", 0)
    return kind


@pytest.fixture(params=["strips", "steps"])
def plan_kind(request, monkeypatch):
    return use_plan(request.param, monkeypatch)


@pytest.fixture(params=["strips", "strips-recompute", "steps"])
def every_plan(request, monkeypatch):
    return use_plan(request.param, monkeypatch)


def inputs(seed, t=T, s=None, h=H, hkv=2, dtype=jnp.float32, sinks=False):
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    q = jnp.array(rng.standard_normal((B, t, h, D)), dtype)
    k = jnp.array(rng.standard_normal((B, s, hkv, D)), dtype)
    v = jnp.array(rng.standard_normal((B, s, hkv, D)), dtype)
    sink = jnp.array(rng.standard_normal(h), jnp.float32) if sinks else None
    cotangent = jnp.array(rng.standard_normal((B, t, h, D)), jnp.float32)
    return q, k, v, sink, cotangent


def packed(t=T):
    """Documents of 9, 1 (a one-token document), 12 and t-22 tokens; positions restart."""
    lengths = [9, 1, 12, t - 22]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    seg, pos = (jnp.array(np.stack([x, x])) for x in (seg, pos))
    return dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)


def outputs_and_grads(impl, q, k, v, sink, cotangent, spec, **kw):
    def loss(q, k, v, sink):
        out = ops.attention(q, k, v, spec, impl, sinks=sink, **kw)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    argnums = (0, 1, 2, 3) if sink is not None else (0, 1, 2)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, sink)
    return out, grads


def assert_matches_dense(spec, *, seed=0, dtype=jnp.float32, hkv=2, sinks=False, t=T,
                         s=None, **kw):
    q, k, v, sink, cot = inputs(seed, t=t, s=s, hkv=hkv, dtype=dtype, sinks=sinks)
    want, want_grads = outputs_and_grads("dense", q, k, v, sink, cot, spec)
    got, got_grads = outputs_and_grads("blockwise", q, k, v, sink, cot, spec, **(kw or BLOCK))
    out_tol, grad_tol = (2e-5, 1e-4) if dtype == jnp.float32 else (3e-2, 6e-2)
    assert got.dtype == q.dtype
    assert bool(jnp.isfinite(got.astype(jnp.float32)).all())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=out_tol, rtol=0)
    names = "q k v sinks".split()[:len(want_grads)]
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        scale = max(1.0, float(jnp.abs(w.astype(jnp.float32)).max()))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=grad_tol * scale, rtol=0, err_msg=f"d{name}")


MASKS = {
    "causal": dict(causal=True),
    "window1": dict(causal=True, window=1),
    "window7": dict(causal=True, window=7),
    "window_one_block": dict(causal=True, window=16),
    "window_exactly_T": dict(causal=True, window=T),
    "window_beyond_T": dict(causal=True, window=T + 20),
    "chunk": dict(causal=True, chunk=10),
    "chunk_and_window": dict(causal=True, chunk=12, window=5),
    "bidirectional_window": dict(causal=False, window=6),
}


@pytest.mark.usefixtures("plan_kind")
@pytest.mark.parametrize("name", MASKS)
def test_masks_match_dense(name):
    assert_matches_dense(ops.MaskSpec(**MASKS[name]))


@pytest.mark.usefixtures("every_plan")
@pytest.mark.parametrize("name", ["causal", "chunk_and_window"])
def test_packed_documents_match_dense(name):  # with sink logits too
    assert_matches_dense(ops.MaskSpec(**MASKS[name], **packed()), sinks=True)


@pytest.mark.parametrize("hkv", [4, 1])  # GQA ratios 1 and 4 (2 is every other test)
def test_gqa_ratios(hkv):
    assert_matches_dense(ops.MaskSpec(causal=True, window=11), hkv=hkv, sinks=True)


@pytest.mark.parametrize("blocks", [(16, 8), (12, 20), (64, 64)])
def test_block_shapes(blocks):
    bq, bk = blocks
    assert_matches_dense(ops.MaskSpec(causal=True, window=13, **packed()), block_q=bq,
                         block_kv=bk)


@pytest.mark.parametrize("name", ["causal", "chunk"])
def test_bfloat16(name):
    spec = ops.MaskSpec(**MASKS[name], **(packed() if name == "chunk" else {}))
    assert_matches_dense(spec, dtype=jnp.bfloat16, sinks=name == "causal")


@pytest.mark.parametrize("case,t,s", [(dict(causal=True), 21, 37),
                                      (dict(causal=False, window=5), 37, 21)])
def test_query_and_key_lengths_may_differ(case, t, s):
    assert_matches_dense(ops.MaskSpec(**case), t=t, s=s)


def test_rows_that_see_nothing_are_zero_with_finite_gradients():
    q = k = v = jnp.ones((1, 40, 2, 8))
    seg_q = jnp.array([[1] * 20 + [2] * 10 + [0] * 10])  # segment 2 and 0 own no key
    seg_kv = jnp.array([[1] * 40])
    spec = ops.MaskSpec(causal=True, q_segment_ids=seg_q, kv_segment_ids=seg_kv)

    def run(q, k, v):
        return blockwise_attention(q, k, v, spec, scale=0.3, block_q=16, block_kv=16)

    out = jax.jit(run)(q, k, v)
    np.testing.assert_array_equal(out[0, 20:], 0.0)
    grads = jax.jit(jax.grad(lambda *a: run(*a).sum(), (0, 1, 2)))(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_plan_skips_hidden_blocks_and_masks_only_edges():
    p = plan(1024, 1024, 128, 128, MaskRule(), False, None)
    pairs = sum(len(s.q_blocks) for s in p.steps)
    assert pairs == 8 * 9 // 2  # the causal triangle of 8 x 8 blocks, diagonal included
    assert [s.masked for s in p.steps] == [True] + [False] * 7  # only the diagonal
    w = plan(1024, 1024, 128, 128, MaskRule(window=256), False, None)
    assert [len(s.q_blocks) for s in w.steps] == [8, 7, 6]  # diagonal, one back, the edge
    assert [s.masked for s in w.steps] == [True, False, True]


def test_strip_plan_covers_each_query_blocks_visible_run():
    p = plan(1024, 1024, 256, 256, MaskRule(), False, None, strips=True)
    assert [(s.q_blocks, s.kv_blocks, s.kv_span, s.masked) for s in p.steps] == [
        ((0,), (0,), 1, True), ((1,), (0,), 2, True), ((2,), (0,), 3, True),
        ((3,), (0,), 4, True)]
    assert p.computed_pairs() == 10 * 256 * 256  # the same causal triangle as steps
    w = plan(1024, 1024, 128, 128, MaskRule(window=256), False, None, strips=True)
    assert [(s.kv_blocks[0], s.kv_span) for s in w.steps][-2:] == [(4, 3), (5, 3)]


@pytest.mark.parametrize("geometry,max_pairs", [
    ((32768, 32768, 256, 256, MaskRule(), False), 32),  # a full causal layer at 32k
    ((32768, 32768, 128, 128, MaskRule(window=1024), False), 64),  # a window of 1024
    ((37, 37, 16, 16, MaskRule(window=13), True), 3),  # packed (every pair masked), padded
    ((21, 37, 8, 16, MaskRule(causal=False, window=5), False), 2),  # T != S, bidirectional window
])
def test_schedule_runs_every_visible_pair_once_in_iterations_of_one_shape(geometry, max_pairs):
    p = plan(*geometry)
    pairs = {(i, j): step.masked for step in p.steps
             for i, j in zip(step.q_blocks, step.kv_blocks, strict=True)}
    sched = schedule(p, max_pairs)
    assert 1 <= len(sched.loops) <= 2
    seen = []
    for tiles in sched.loops:
        assert len({len(row) for row in tiles.q + tiles.kv}) == 1  # one shape
        assert len(tiles.q) >= 2 and len(tiles.q[0]) <= max_pairs
        for qs, ks in zip(tiles.q, tiles.kv, strict=True):
            real = [(i, j) for i, j in zip(qs, ks, strict=True) if i < p.num_q_blocks]
            assert len({i for i, _ in real}) == len(real)  # distinct query blocks
            assert tiles.masked or (len(real) == len(qs) and not any(map(pairs.get, real)))
            seen += real
    assert sorted(seen) == sorted(pairs)  # each visible block pair exactly once
    if geometry[4].window is None:  # causal: no padding at all
        assert sched.computed_pairs() == p.computed_pairs()


def test_windows_cap_block_sizes():
    assert block_sizes(ops.MaskSpec(window=512), 8192, 8192, 256, 256) == (64, 64)
    assert block_sizes(ops.MaskSpec(window=4096), 8192, 8192, 256, 256) == (256, 256)
    assert block_sizes(ops.MaskSpec(), 100, 50, 256, 256) == (100, 50)
    with pytest.raises(ValueError, match="block sizes"):
        block_sizes(ops.MaskSpec(), 100, 100, 0, 16)


def test_model_threads_block_sizes_and_matches_dense():
    """A tiny RNoPE-SWA model (window 5) on packed documents: blockwise with 8-token tiles
    (several tiles per sequence, set through the config and installed as the trainer does)
    gives dense's logits."""
    from hybridlm.model.attention import config_tiles
    from tests.helpers import build, random_tokens, tiny_model_config

    tokens = random_tokens(0, (2, 37))
    extra = packed()
    logits = {}
    for impl in ("dense", "blockwise"):
        cfg = tiny_model_config("rnope_swa", attention_impl=impl, attention_block_q=8,
                                attention_block_kv=8)
        with ops.kernel_tiles(*config_tiles(cfg)):
            logits[impl] = build(cfg)(tokens, extra["q_positions"], extra["q_segment_ids"])
    np.testing.assert_allclose(logits["blockwise"], logits["dense"], atol=2e-5)


def test_kept_strip_probabilities_spare_the_backward_its_score_matmul(monkeypatch):
    """With strips small enough to keep, the backward pass reads each strip's probabilities
    instead of recomputing q.k (XLA's FLOP count is deterministic); too large, it recomputes."""
    b, t, h, d = 2, 256, 4, 16
    pairs = plan(t, t, 64, 64, MaskRule(), False, None, strips=True).computed_pairs()
    assert b * h * pairs <= blockwise.KEEP_PROBS

    def grad_flops():
        return cost.attention_cost("blockwise", batch=b, length=t, heads=h, kv_heads=h,
                                   head_dim=d, block_q=64, block_kv=64)["flops"]

    kept = grad_flops()
    monkeypatch.setattr(blockwise, "KEEP_PROBS", 0)
    recomputed = grad_flops()
    score_matmul = 2 * b * h * pairs * d
    assert recomputed - kept >= score_matmul
