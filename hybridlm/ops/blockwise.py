"""Flash-style attention in pure JAX that never forms a block the mask hides.

The sequence is cut into query blocks of `block_q` rows and key blocks of `block_kv`
columns. `plan()` decides, from the mask's index geometry alone, which (query block,
key block) pairs hold any visible pair (those are computed) and which are entirely
visible (those skip the mask). Causal attention then costs about T^2/2 score
entries, a window W about T*(W + block), never T^2.

Long sequences run as *loops* (`block_plan.schedule`): the pairs are regrouped into
iterations of one shape, P pairs each (distinct query blocks), at most two loops (pairs
entirely visible, pairs that need the mask). One iteration gathers its P query and key
blocks, forms their scores in one batched matmul and updates the rows' online softmax
(running max and sum), so memory is O(T * block) and the program's size does not depend on
T. The backward pass is a custom VJP that loops over the same iterations, recomputes each
block's probabilities from the saved log-sum-exp and scatter-adds dq, dk, dv. Short
sequences (at most MAX_STRIPS query blocks) run as *strips* instead, unrolled: each query
block against its whole visible run of keys in one matmul, which needs no rescaling and runs
faster on a CPU; when they are small enough (`KEEP_PROBS`), strips also keep their
probabilities for the backward pass, which then skips the scores' matmul, mask and exp.
Backward scores are formed keys-first ([keys, queries]), the layout in which dv and dk are
plain matmuls.

Blocks are skipped by sequence index; inside a computed block the mask is the rule of
`masks.py` (`visible`), evaluated on positions and segment ids. That is exact because
positions advance by one per token inside a segment (see `masks.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from hybridlm.ops.block_plan import Plan, Schedule, Tiles, block_sizes, plan, schedule
from hybridlm.ops.masks import MaskRule, MaskSpec, positions_or_default

__all__ = ["DEFAULT_BLOCK_KV", "DEFAULT_BLOCK_Q", "block_sizes", "blockwise_attention", "plan",
           "unrolled"]

DEFAULT_BLOCK_Q = 256  # measured on a 2-core CPU: see docs/performance.md
DEFAULT_BLOCK_KV = 256
# Score entries one loop iteration (or one strip) may form, all batch rows and heads: 2^23
# floats = 32 MiB, below the size where the CPU runtime page-faults scratch in again on
# every call (docs/performance.md).
SCORES_PER_STEP = 2**23
# Strips (a query block against all its visible keys at once) are unrolled one per query
# block; beyond this many, loops batch the query blocks instead.
MAX_STRIPS = 8
# Strips keep their probabilities for the backward pass (instead of recomputing scores,
# mask and exp there) when all of them together hold at most this many floats (64 MiB).
KEEP_PROBS = 2**24
_unroll = contextvars.ContextVar("blockwise_unroll", default=False)


@contextlib.contextmanager
def unrolled() -> Iterator[None]:
    """Trace the kernel's loops unrolled inside this block: the same iterations as straight
    code, so that XLA's cost analysis (which counts a loop body once) counts all of them.
    For cost measurements only; the program then grows with T again."""
    token = _unroll.set(True)
    try:
        yield
    finally:
        _unroll.reset(token)


@dataclasses.dataclass(frozen=True)
class _Static:
    plan: Plan
    schedule: Schedule | None  # None: strips
    groups: int  # query heads per key/value head
    rule: MaskRule
    keep_probs: bool = False  # strips only: save each strip's probabilities for backward


# -- masks and scores, shared by strips and loops ----------------------------------------

def _mask(st: _Static, q_pos, kv_pos, q_seg, kv_seg, kv_real, keys_first: bool):
    """The rule's `visible` for n block pairs, from query-side values [B|1, n, bq]
    and key-side values [B|1, n, bk] (kv_real [n, bk]: False for padding keys, None when
    there are none): [B|1, 1, n, 1, bq, bk], or [B|1, 1, n, bk, 1, bq] with keys_first."""

    def rows(x):  # query-side values, broadcast along keys
        return x[:, None, :, None, None, :] if keys_first else x[:, None, :, None, :, None]

    def cols(x):  # key-side values, broadcast along queries
        return x[:, None, :, :, None, None] if keys_first else x[:, None, :, None, None, :]

    segments = {} if q_seg is None else dict(q_segments=rows(q_seg), kv_segments=cols(kv_seg))
    mask = st.rule.visible(rows(q_pos), cols(kv_pos), **segments)
    return mask if kv_real is None else mask & cols(kv_real[None])


def _scores(st: _Static, qb, kb, mask, keys_first: bool = False) -> jax.Array:
    """Scores of n block pairs, float32, -inf where `mask` (None: all visible) hides:
    [B, Hkv, n, G*bq, bk], or [B, Hkv, n, bk, G*bq] with keys_first (q arrives scaled)."""
    if keys_first:
        s = jnp.einsum("bhnkd,bhnqd->bhnkq", kb, qb, preferred_element_type=jnp.float32)
    else:
        s = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, kb, preferred_element_type=jnp.float32)
    if mask is not None:
        shape = s.shape
        split = (*shape[:4], st.groups, shape[4] // st.groups) if keys_first else (
            *shape[:3], st.groups, shape[3] // st.groups, shape[4])
        s = jnp.where(mask, s.reshape(split), -jnp.inf).reshape(shape)
    return s


def _finite(m: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _sink_rows(sinks: jax.Array, hkv: int, groups: int, rows: int) -> jax.Array:
    """Per-head sink logits laid out like the rows of a block: [1, Hkv, 1, G*bq]."""
    per_head = sinks.astype(jnp.float32).reshape(hkv, groups)
    return jnp.repeat(per_head, rows // groups, axis=1)[None, :, None, :]


def _lse(m, denom):
    """Log-sum-exp per row, 0 for rows that saw no key (their output is 0)."""
    return jnp.where(denom == 0.0, 0.0, _finite(m) + jnp.log(jnp.where(denom == 0.0, 1.0, denom)))


def _sink_grad(st: _Static, sinks, lse, delta):
    """d loss / d sink: d lse / d sink = p_sink, and out moves by -out * p_sink."""
    b, hkv, nq, rows = lse.shape
    p_sink = jnp.exp(_sink_rows(sinks, hkv, st.groups, rows) - lse)
    per_row = -(p_sink * delta).reshape(b, hkv, nq, st.groups, rows // st.groups)
    return per_row.sum(axis=(0, 2, 4)).reshape(-1).astype(sinks.dtype)


# -- loops: iterations of P (query block, key block) pairs ----------------------------------

def _gather(x: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """x's blocks `index` along `axis`; a padding pair's index past the end reads the last."""
    return jnp.take(x, index, axis=axis, mode="clip")


def _scatter(x: jax.Array, index: jax.Array, value: jax.Array, add: bool) -> jax.Array:
    """x with `value` written (or added) at blocks `index` of axis 2; past the end: dropped."""
    at = x.at[:, :, index]
    return at.add(value, mode="drop") if add else at.set(value, mode="drop")


def _tied(index, carry_part):
    """The iteration's block indices, tied to the loop's carry. Without the tie, JAX's
    partial evaluation (differentiating an enclosing scan, e.g. over layers) finds the mask
    depends only on the indices and the positions, which do not change across layers, and
    hoists it out of both loops: every iteration's mask stacked at once, O(T^2 / block)
    booleans (34 GB at 128k). An optimization barrier makes the indices depend on the carry,
    so the mask is formed inside the iteration that uses it."""
    qi, ki = index
    return jax.lax.optimization_barrier((qi, ki, carry_part))


def _loop(body, carry, tiles: Tiles):
    """lax.scan of body over the iterations' index arrays (unrolled under `unrolled()`)."""
    index = (jnp.asarray(np.asarray(tiles.q, np.int32)), jnp.asarray(np.asarray(tiles.kv,
                                                                             np.int32)))
    return jax.lax.scan(body, carry, index, unroll=len(tiles.q) if _unroll.get() else 1)[0]


def _tile_mask(st: _Static, tiles: Tiles, aux, qi, ki, keys_first: bool):
    if not tiles.masked:
        return None
    q_pos, kv_pos, q_seg, kv_seg = aux
    bk = st.plan.block_kv
    kv_real = ki[:, None] * bk + jnp.arange(bk) < st.plan.kv_len  # padding pairs: none real
    return _mask(st, _gather(q_pos, qi, 1), _gather(kv_pos, ki, 1),
                 None if q_seg is None else _gather(q_seg, qi, 1),
                 None if kv_seg is None else _gather(kv_seg, ki, 1), kv_real, keys_first)


def _loop_forward(st: _Static, q, k, v, sinks, aux):
    """Online softmax over the schedule's loops. Returns (out f32, log-sum-exp per row)."""
    b, hkv, nq, rows, d = q.shape
    m = jnp.full((b, hkv, nq, rows), -jnp.inf, jnp.float32)
    denom = jnp.zeros((b, hkv, nq, rows), jnp.float32)
    acc = jnp.zeros((b, hkv, nq, rows, d), jnp.float32)
    for tiles in st.schedule.loops:
        def body(carry, index, tiles=tiles):
            m, denom, acc = carry
            qi, ki, m = _tied(index, m)
            qb, kb, vb = _gather(q, qi, 2), _gather(k, ki, 2), _gather(v, ki, 2)
            s = _scores(st, qb, kb, _tile_mask(st, tiles, aux, qi, ki, keys_first=False))
            m_old, denom_old, acc_old = (_gather(x, qi, 2) for x in carry)
            m_new = jnp.maximum(m_old, s.max(axis=-1))
            p = jnp.exp(s - _finite(m_new)[..., None])
            alpha = jnp.exp(m_old - _finite(m_new))
            denom_new = alpha * denom_old + p.sum(axis=-1)
            acc_new = alpha[..., None] * acc_old + jnp.einsum(
                "bhnqk,bhnkd->bhnqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
            return tuple(_scatter(x, qi, new, add=False) for x, new in
                         zip(carry, (m_new, denom_new, acc_new), strict=True)), None

        m, denom, acc = _loop(body, (m, denom, acc), tiles)
    if sinks is not None:  # a sink joins every denominator and carries no value
        sink = _sink_rows(sinks, hkv, st.groups, rows)
        m_sink = jnp.maximum(m, sink)
        alpha = jnp.exp(m - m_sink)
        denom = alpha * denom + jnp.exp(sink - m_sink)
        acc = alpha[..., None] * acc
        m = m_sink
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]  # rows that saw no key: 0
    return out, _lse(m, denom)


def _loop_backward(st: _Static, q, k, v, aux, lse, delta, d_out):
    """Flash backward over the same loops: recompute p = exp(s - lse), scatter-add dq,
    dk, dv. dq contracts the key axis; it is formed as k^T ds (the small operand
    transposed) and transposed back (measured faster on CPU than ds^T k)."""
    grads = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    for tiles in st.schedule.loops:
        def body(carry, index, tiles=tiles):
            dq, dk, dv = carry
            qi, ki, dq = _tied(index, dq)
            qb, dob = _gather(q, qi, 2), _gather(d_out, qi, 2)
            kb, vb = _gather(k, ki, 2), _gather(v, ki, 2)
            mask = _tile_mask(st, tiles, aux, qi, ki, keys_first=True)
            s = _scores(st, qb, kb, mask, keys_first=True)  # [B, Hkv, P, bk, rows]
            p = jnp.exp(s - _gather(lse, qi, 2)[..., None, :])
            dq_part, dk_part, dv_part = _pair_grads(p, qb, kb, vb, dob,
                                                    _gather(delta, qi, 2))
            return (_scatter(dq, qi, dq_part, add=True), _scatter(dk, ki, dk_part, add=True),
                    _scatter(dv, ki, dv_part, add=True)), None

        grads = _loop(body, grads, tiles)
    return grads


def _pair_grads(p, qb, kb, vb, dob, delta):
    """(dq, dk, dv) of block pairs from their keys-first probabilities p [.., bk, rows]."""
    dv = jnp.einsum("bhnkq,bhnqd->bhnkd", p.astype(qb.dtype), dob,
                    preferred_element_type=jnp.float32)
    dp = jnp.einsum("bhnkd,bhnqd->bhnkq", vb, dob, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None, :])).astype(qb.dtype)
    dq = jnp.einsum("bhnkd,bhnkq->bhndq", kb, ds,
                    preferred_element_type=jnp.float32).swapaxes(-1, -2)
    dk = jnp.einsum("bhnkq,bhnqd->bhnkd", ds, qb, preferred_element_type=jnp.float32)
    return dq, dk, dv


# -- strips: one query block against its whole visible run of keys, unrolled ---------------

def _strip_blocks(st: _Static, step, q, k, v, aux, keys_first: bool):
    """One strip's (q block [B, Hkv, 1, rows, D], its keys and values merged into one block
    [B, Hkv, 1, span * bk, D], the mask or None)."""
    i, first, span = step.q_blocks[0], step.kv_blocks[0], step.kv_span
    bk = st.plan.block_kv

    def run(x, axis):  # the strip's key blocks merged into one
        x = jax.lax.slice_in_dim(x, first, first + span, axis=axis)
        return x.reshape(*x.shape[:axis], 1, span * x.shape[axis + 1], *x.shape[axis + 2:])

    qb = jax.lax.slice_in_dim(q, i, i + 1, axis=2)
    mask = None
    if step.masked:
        q_pos, kv_pos, q_seg, kv_seg = aux
        kv_real = np.arange(first * bk, (first + span) * bk)[None] < st.plan.kv_len
        mask = _mask(st, jax.lax.slice_in_dim(q_pos, i, i + 1, axis=1), run(kv_pos, 1),
                     None if q_seg is None else jax.lax.slice_in_dim(q_seg, i, i + 1, axis=1),
                     None if kv_seg is None else run(kv_seg, 1),
                     None if kv_real.all() else jnp.asarray(kv_real), keys_first)
    return qb, run(k, 2), run(v, 2), mask


def _strips_forward(st: _Static, q, k, v, sinks, aux):
    """Strips with a plain softmax. Returns (out f32, log-sum-exp per row, each strip's
    probabilities [B, Hkv, 1, bk, rows]). Formed keys-first, as the backward pass reads
    them, when they are kept; queries-first otherwise, so that XLA cannot merge them with
    the backward's recomputation and keep them alive after all."""
    b, hkv, nq, rows, d = q.shape
    out = jnp.zeros((b, hkv, nq, rows, d), jnp.float32)
    lse = jnp.zeros((b, hkv, nq, rows), jnp.float32)
    probs = []
    sink = None if sinks is None else _sink_rows(sinks, hkv, st.groups, rows)
    keys_first = st.keep_probs
    axis = -2 if keys_first else -1  # the key axis of the scores
    for step in st.plan.steps:
        i = step.q_blocks[0]
        qb, kb, vb, mask = _strip_blocks(st, step, q, k, v, aux, keys_first)
        s = _scores(st, qb, kb, mask, keys_first)
        m = s.max(axis=axis)
        if sinks is not None:  # a sink joins every denominator and carries no value
            m = jnp.maximum(m, sink)
        e = jnp.exp(s - jnp.expand_dims(_finite(m), axis))
        denom = e.sum(axis=axis)
        if sinks is not None:
            denom = denom + jnp.exp(sink - _finite(m))
        p = e / jnp.expand_dims(jnp.where(denom == 0.0, 1.0, denom), axis)  # no key: 0
        if keys_first:
            out_b = jnp.einsum("bhnkd,bhnkq->bhndq", vb, p.astype(v.dtype),
                               preferred_element_type=jnp.float32).swapaxes(-1, -2)
            probs.append(p.astype(q.dtype))
        else:
            out_b = jnp.einsum("bhnqk,bhnkd->bhnqd", p.astype(v.dtype), vb,
                               preferred_element_type=jnp.float32)
        out = jax.lax.dynamic_update_slice_in_dim(out, out_b, i, axis=2)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, _lse(m, denom), i, axis=2)
    return out, lse, tuple(probs) if keys_first else None


def _strips_backward(st: _Static, q, k, v, aux, lse, delta, d_out, probs):
    """The strips' flash backward, from kept probabilities or recomputed ones."""
    dq, dk, dv = (jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    for n, step in enumerate(st.plan.steps):
        i, first, span = step.q_blocks[0], step.kv_blocks[0], step.kv_span
        qb, kb, vb, mask = _strip_blocks(st, step, q, k, v, aux, keys_first=True)
        dob, lse_b, delta_b = (jax.lax.slice_in_dim(x, i, i + 1, axis=2)
                               for x in (d_out, lse, delta))
        if probs is None:
            p = jnp.exp(_scores(st, qb, kb, mask, keys_first=True) - lse_b[..., None, :])
        else:
            p = probs[n]
        dq_b, dk_b, dv_b = _pair_grads(p, qb, kb, vb, dob, delta_b)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_b, i, axis=2)
        dk, dv = (jax.lax.dynamic_update_slice_in_dim(
            x, jax.lax.slice_in_dim(x, first, first + span, axis=2) + part.reshape(
                *part.shape[:2], span, -1, part.shape[-1]), first, axis=2)
            for x, part in ((dk, dk_b), (dv, dv_b)))
    return dq, dk, dv


# -- the custom VJP ------------------------------------------------------------------------

def _forward(st: _Static, q, k, v, sinks, aux):
    """(out f32, log-sum-exp, kept strip probabilities or None)."""
    if st.schedule is not None:
        return (*_loop_forward(st, q, k, v, sinks, aux), None)
    return _strips_forward(st, q, k, v, sinks, aux)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st: _Static, q, k, v, sinks, aux):
    return _forward(st, q, k, v, sinks, aux)[0].astype(q.dtype)


def _attend_fwd(st, q, k, v, sinks, aux):
    out, lse, probs = _forward(st, q, k, v, sinks, aux)
    out = out.astype(q.dtype)
    return out, (q, k, v, sinks, aux, out, lse, probs)


def _attend_bwd(st, residuals, d_out):
    q, k, v, sinks, aux, out, lse, probs = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    d_out = d_out.astype(q.dtype)
    if st.schedule is not None:
        dq, dk, dv = _loop_backward(st, q, k, v, aux, lse, delta, d_out)
    else:
        dq, dk, dv = _strips_backward(st, q, k, v, aux, lse, delta, d_out, probs)
    d_sinks = None if sinks is None else _sink_grad(st, sinks, lse, delta)
    aux_zero = jax.tree.map(lambda x: None, aux)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_sinks, aux_zero


_attend.defvjp(_attend_fwd, _attend_bwd)


# -- layout: [B, T, H, D] <-> [B, Hkv, blocks, G * block, D] -------------------------------

def _pad_to(x: jax.Array, length: int, axis: int, value=0) -> jax.Array:
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _to_blocks(x: jax.Array, hkv: int, block: int) -> jax.Array:
    b, t, h, d = x.shape
    n = -(-t // block)
    x = _pad_to(x, n * block, 1).reshape(b, n, block, hkv, h // hkv, d)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(b, hkv, n, (h // hkv) * block, d)


def _from_blocks(x: jax.Array, heads: int, length: int) -> jax.Array:
    b, hkv, n, rows, d = x.shape
    g = heads // hkv
    x = x.reshape(b, hkv, n, g, rows // g, d).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, n * (rows // g), heads, d)[:, :length]


def _blocked_ids(ids: jax.Array | None, n: int, block: int) -> jax.Array | None:
    if ids is None:
        return None
    return _pad_to(ids.astype(jnp.int32), n * block, 1, value=-1).reshape(ids.shape[0], n, block)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *,
                        scale: float, sinks: jax.Array | None = None,
                        block_q: int = DEFAULT_BLOCK_Q,
                        block_kv: int = DEFAULT_BLOCK_KV,
                        strips: bool | None = None, keep_probs: bool = True) -> jax.Array:
    """Attention that computes only blocks the mask reaches; same contract as dense.

    `strips` picks the plan: True, a query block's visible key blocks in one matmul each;
    False, loops over iterations of query blocks; None, strips when there are at most
    `MAX_STRIPS` and each fits `SCORES_PER_STEP` (short sequences: docs/performance.md).
    `keep_probs`: strips keep their probabilities for the backward pass when all together
    fit `KEEP_PROBS` floats; False always recomputes them (the cuDNN path's fallback: a
    lax.cond keeps both branches' residuals, taken or not).
    """
    b, t, h, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    bq, bk = block_sizes(spec, t, s_len, block_q, block_kv)
    always_mask = spec.q_segment_ids is not None or not spec.offsets_exact
    geometry = (t, s_len, bq, bk, spec.rule, always_mask)
    chosen = plan(*geometry, strips=True)
    widest = max((step.kv_span for step in chosen.steps), default=1)
    if strips is None:
        strips = (len(chosen.steps) <= MAX_STRIPS
                  and b * h * bq * bk * widest <= SCORES_PER_STEP)
    loops = None
    if not strips:
        chosen = plan(*geometry)
        per_iteration = max(1, SCORES_PER_STEP // (b * h * bq * bk))  # block pairs
        loops = schedule(chosen, min(per_iteration, chosen.num_q_blocks))
    keep_probs = keep_probs and strips and b * h * chosen.computed_pairs() <= KEEP_PROBS
    st = _Static(chosen, loops, groups=h // hkv, rule=spec.rule, keep_probs=keep_probs)
    nq, nk = chosen.num_q_blocks, chosen.num_kv_blocks
    kv_positions = spec.kv_positions
    if kv_positions is None and t == s_len:
        kv_positions = spec.q_positions
    aux = (_blocked_ids(positions_or_default(spec.q_positions, t), nq, bq),
           _blocked_ids(positions_or_default(kv_positions, s_len), nk, bk),
           _blocked_ids(spec.q_segment_ids, nq, bq),
           _blocked_ids(spec.kv_segment_ids, nk, bk))
    q_scaled = (q.astype(jnp.float32) * scale).astype(q.dtype) if scale != 1.0 else q
    out = _attend(st, _to_blocks(q_scaled, hkv, bq), _to_blocks(k, hkv, bk),
                  _to_blocks(v, hkv, bk), sinks, aux)
    return _from_blocks(out, h, t)
