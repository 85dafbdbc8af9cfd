"""Flash-style attention in pure JAX that never forms a block the mask hides.

The sequence is cut into query blocks of `block_q` rows and key blocks of `block_kv`
columns. `plan()` decides, from the mask's index geometry alone, which (query block,
key block) pairs hold any visible pair (those are computed) and which are entirely
visible (those skip the mask). Causal attention then costs about T^2/2 score
entries, a window W about T*(W + block), never T^2.

The pairs are computed in *steps* (`block_plan.py`): step s takes, for every query
block, its s-th visible key block counted back from the diagonal. One step is one
batched matmul over all the query blocks it touches, so a causal layer is ~T/block
large matmuls rather than (T/block)^2 small ones; on a CPU this is what makes it fast.
The softmax is online (running max and sum per row), so memory is O(T * block), and
the backward pass is a custom VJP that recomputes each block's probabilities from the
saved log-sum-exp instead of storing them. Short sequences (at most MAX_STRIPS query
blocks) run as *strips* instead: each query block against its whole visible run of
keys in one matmul, which needs no rescaling and runs faster on a CPU; when they are
small enough (`KEEP_PROBS`), strips also keep their probabilities for the backward pass,
which then skips the scores' matmul, mask and exp. Strips are formed keys-first ([keys,
queries]), the layout in which the backward's dv and dk are plain matmuls.

Blocks are skipped by sequence index; inside a computed block the mask is the full
rule of `masks.py`, evaluated on positions and segment ids. That is exact because
positions advance by one per token inside a segment (see `masks.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hybridlm.ops.block_plan import Plan, Step, block_sizes, plan
from hybridlm.ops.masks import MaskSpec, positions_or_default

__all__ = ["DEFAULT_BLOCK_KV", "DEFAULT_BLOCK_Q", "block_sizes", "blockwise_attention", "plan"]

DEFAULT_BLOCK_Q = 256  # measured on a 2-core CPU: see docs/performance.md
DEFAULT_BLOCK_KV = 256
# Score entries one step may form (all batch rows and heads), 2^23 floats = 32 MiB: smaller
# steps keep scratch small (the CPU runtime page-faults scratch above ~32 MB in again on every
# call) but multiply the unrolled steps and so the compile time (docs/performance.md).
SCORES_PER_STEP = 2**23
# Strips (a query block against all its visible keys at once) are unrolled one per query
# block; beyond this many, steps batch the query blocks instead.
MAX_STRIPS = 8
# Strips keep their probabilities for the backward pass (instead of recomputing scores,
# mask and exp there) when all of them together hold at most this many floats (64 MiB).
KEEP_PROBS = 2**24


# -- static block indexing: slices where the blocks are a contiguous run -----------------

def _run(blocks: tuple[int, ...]) -> int | None:
    """First index if `blocks` is a contiguous increasing run, else None."""
    first = blocks[0]
    return first if blocks == tuple(range(first, first + len(blocks))) else None


def _take(x: jax.Array, blocks: tuple[int, ...], axis: int, after=None) -> jax.Array:
    """x[blocks] along axis. `after` (an int32 zero computed from the previous step's
    results) makes the read wait for that step: XLA's CPU scheduler otherwise hoists
    every step's slices and matmuls to the front and keeps them all alive at once
    (optimization barriers are stripped before scheduling on CPU)."""
    first = _run(blocks)
    if first is None:
        index = np.asarray(blocks, np.int32)
        return jnp.take(x, index if after is None else index + after, axis=axis)
    if after is None:
        if first == 0 and len(blocks) == x.shape[axis]:
            return x
        return jax.lax.slice_in_dim(x, first, first + len(blocks), axis=axis)
    return jax.lax.dynamic_slice_in_dim(x, first + after, len(blocks), axis=axis)


def _zero_after(x: jax.Array) -> jax.Array:
    """An int32 0 that XLA cannot compute before x (no float exceeds +inf)."""
    return (x.reshape(-1)[0] > jnp.inf).astype(jnp.int32)


def _put(x: jax.Array, blocks: tuple[int, ...], value: jax.Array, axis: int,
         add: bool) -> jax.Array:
    """x with `value` written (or added) at `blocks` along `axis` (blocks may repeat)."""
    first = _run(blocks)
    if first is None:
        index = (slice(None),) * axis + (np.asarray(blocks),)
        return x.at[index].add(value) if add else x.at[index].set(value)
    if add:
        value = _take(x, blocks, axis) + value
    if first == 0 and len(blocks) == x.shape[axis]:
        return value
    return jax.lax.dynamic_update_slice_in_dim(x, value, first, axis=axis)


def _kv_blocks(step: Step) -> tuple[int, ...]:
    """The key blocks a step reads, in order (a strip's whole run)."""
    if step.kv_span == 1:
        return step.kv_blocks
    return tuple(range(step.kv_blocks[0], step.kv_blocks[0] + step.kv_span))


def _take_kv(x: jax.Array, step: Step, axis: int, after=None) -> jax.Array:
    """A step's key-side blocks along `axis`; a strip's run is merged into one block."""
    x = _take(x, _kv_blocks(step), axis, after)
    if step.kv_span == 1:
        return x
    shape = x.shape
    return x.reshape(*shape[:axis], 1, shape[axis] * shape[axis + 1], *shape[axis + 2:])


def _put_kv(x: jax.Array, step: Step, value: jax.Array, axis: int) -> jax.Array:
    """x with a step's key-side gradient blocks added (a strip's merged block split)."""
    if step.kv_span > 1:
        value = value.reshape(*value.shape[:axis], step.kv_span, -1, *value.shape[axis + 2:])
    return _put(x, _kv_blocks(step), value, axis, add=True)


# -- the kernel ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Static:
    plan: Plan
    groups: int  # query heads per key/value head
    causal: bool
    window: int | None
    chunk: int | None
    keep_probs: bool = False  # strips only: save each strip's probabilities for backward


def _step_mask(st: _Static, step: Step, aux, keys_first: bool) -> jax.Array:
    """Mask of one step on positions and segment ids: [B|1, 1, n, 1, bq, bk], or
    [B|1, 1, n, bk, 1, bq] with keys_first."""
    q_pos, kv_pos, q_seg, kv_seg = aux

    def rows(x, blocks):  # query-side values, broadcast along keys
        x = _take(x, blocks, 1)
        return x[:, None, :, None, None, :] if keys_first else x[:, None, :, None, :, None]

    def cols(x):  # key-side values, broadcast along queries
        x = _take_kv(x, step, 1)
        return x[:, None, :, :, None, None] if keys_first else x[:, None, :, None, None, :]

    p, s = rows(q_pos, step.q_blocks), cols(kv_pos)
    bk = st.plan.block_kv
    kv_index = np.arange(st.plan.num_kv_blocks)[None, :, None] * bk + np.arange(bk)
    mask = cols(jnp.asarray(kv_index < st.plan.kv_len))
    if st.causal:
        mask = mask & (s <= p)
    if st.window is not None:
        mask = mask & (p - s < st.window)
        if not st.causal:
            mask = mask & (s - p < st.window)
    if st.chunk is not None:
        mask = mask & (p // st.chunk == s // st.chunk)
    if q_seg is not None:
        mask = mask & (rows(q_seg, step.q_blocks) == cols(kv_seg))
    return mask


def _scores(st: _Static, step: Step, qb, kb, aux, keys_first: bool = False) -> jax.Array:
    """Scores of one step, float32, -inf where hidden: [B, Hkv, n, G*bq, bk], or
    [B, Hkv, n, bk, G*bq] with keys_first (q arrives pre-scaled)."""
    if keys_first:
        s = jnp.einsum("bhnkd,bhnqd->bhnkq", kb, qb, preferred_element_type=jnp.float32)
    else:
        s = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, kb, preferred_element_type=jnp.float32)
    if step.masked:
        shape = s.shape
        split = (*shape[:4], st.groups, shape[4] // st.groups) if keys_first else (
            *shape[:3], st.groups, shape[3] // st.groups, shape[4])
        mask = _step_mask(st, step, aux, keys_first)
        s = jnp.where(mask, s.reshape(split), -jnp.inf).reshape(shape)
    return s


def _finite(m: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _sink_rows(sinks: jax.Array, hkv: int, groups: int, rows: int) -> jax.Array:
    """Per-head sink logits laid out like the rows of a block: [1, Hkv, 1, G*bq]."""
    per_head = sinks.astype(jnp.float32).reshape(hkv, groups)
    return jnp.repeat(per_head, rows // groups, axis=1)[None, :, None, :]


def _forward(st: _Static, q, k, v, sinks, aux):
    """Online softmax over the steps. Returns (out f32, log-sum-exp per row)."""
    b, hkv, nq, rows, d = q.shape
    m = jnp.full((b, hkv, nq, rows), -jnp.inf, jnp.float32)
    denom = jnp.zeros((b, hkv, nq, rows), jnp.float32)
    acc = jnp.zeros((b, hkv, nq, rows, d), jnp.float32)
    seen: set[int] = set()
    after = None
    for step in st.plan.steps:
        qb = _take(q, step.q_blocks, 2, after)
        kb, vb = (_take_kv(x, step, 2, after) for x in (k, v))
        s = _scores(st, step, qb, kb, aux)
        row_max = s.max(axis=-1)
        if seen.isdisjoint(step.q_blocks):  # first visit of these rows: nothing to rescale
            m_new = row_max
            p = jnp.exp(s - _finite(m_new)[..., None])
            denom_new = p.sum(axis=-1)
            acc_new = jnp.einsum("bhnqk,bhnkd->bhnqd", p.astype(v.dtype), vb,
                                 preferred_element_type=jnp.float32)
        else:
            m_old = _take(m, step.q_blocks, 2)
            m_new = jnp.maximum(m_old, row_max)
            p = jnp.exp(s - _finite(m_new)[..., None])
            alpha = jnp.exp(m_old - _finite(m_new))
            denom_new = alpha * _take(denom, step.q_blocks, 2) + p.sum(axis=-1)
            acc_new = alpha[..., None] * _take(acc, step.q_blocks, 2) + jnp.einsum(
                "bhnqk,bhnkd->bhnqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        seen.update(step.q_blocks)
        m = _put(m, step.q_blocks, m_new, 2, add=False)
        denom = _put(denom, step.q_blocks, denom_new, 2, add=False)
        acc = _put(acc, step.q_blocks, acc_new, 2, add=False)
        after = None if st.plan.strips else _zero_after(acc_new)
    if sinks is not None:  # a sink joins every denominator and carries no value
        sink = _sink_rows(sinks, hkv, st.groups, rows)
        m_sink = jnp.maximum(m, sink)
        alpha = jnp.exp(m - m_sink)
        denom = alpha * denom + jnp.exp(sink - m_sink)
        acc = alpha[..., None] * acc
        m = m_sink
    safe = jnp.where(denom == 0.0, 1.0, denom)  # rows that saw no key: output 0, lse 0
    out = acc / safe[..., None]
    lse = jnp.where(denom == 0.0, 0.0, _finite(m) + jnp.log(safe))
    return out, lse


def _strips_forward(st: _Static, q, k, v, sinks, aux):
    """Strips with a plain softmax, formed keys-first as the backward pass reads them.
    Returns (out f32, log-sum-exp per row, each strip's probabilities [B, Hkv, 1, bk, rows])."""
    b, hkv, nq, rows, d = q.shape
    out = jnp.zeros((b, hkv, nq, rows, d), jnp.float32)
    lse = jnp.zeros((b, hkv, nq, rows), jnp.float32)
    probs = []
    sink = None if sinks is None else _sink_rows(sinks, hkv, st.groups, rows)
    for step in st.plan.steps:
        qb = _take(q, step.q_blocks, 2)
        kb, vb = (_take_kv(x, step, 2) for x in (k, v))
        s = _scores(st, step, qb, kb, aux, keys_first=True)  # [B, Hkv, 1, bk, rows]
        m = s.max(axis=-2)
        if sinks is not None:  # a sink joins every denominator and carries no value
            m = jnp.maximum(m, sink)
        e = jnp.exp(s - _finite(m)[..., None, :])
        denom = e.sum(axis=-2)
        if sinks is not None:
            denom = denom + jnp.exp(sink - _finite(m))
        safe = jnp.where(denom == 0.0, 1.0, denom)  # rows that saw no key: output 0, lse 0
        p = e / safe[..., None, :]
        out_b = jnp.einsum("bhnkd,bhnkq->bhndq", vb, p.astype(v.dtype),
                           preferred_element_type=jnp.float32).swapaxes(-1, -2)
        lse_b = jnp.where(denom == 0.0, 0.0, _finite(m) + jnp.log(safe))
        out = _put(out, step.q_blocks, out_b, 2, add=False)
        lse = _put(lse, step.q_blocks, lse_b, 2, add=False)
        probs.append(p.astype(q.dtype))
    return out, lse, tuple(probs)


def _backward(st: _Static, q, k, v, sinks, aux, out, lse, d_out, probs=None):
    """Flash backward: per step recompute p = exp(s - lse) (or take the kept `probs`),
    accumulate dq, dk, dv.

    Scores are formed keys-first ([bk, rows]) so that dv = p @ dO and dk = ds @ q are
    plain matmuls; only dq contracts the key axis, and it is formed as k^T ds (the small
    operand transposed) and transposed back (measured faster on CPU than ds^T k, and than
    queries-first scores, where dv and dk both would contract a transposed operand).
    """
    b, hkv, nq, rows, d = q.shape
    delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)  # [B, Hkv, nq, rows]
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    d_out = d_out.astype(q.dtype)
    after = None
    for i, step in enumerate(st.plan.steps):
        qb, dob = (_take(x, step.q_blocks, 2, after) for x in (q, d_out))
        kb, vb = (_take_kv(x, step, 2, after) for x in (k, v))
        if probs is None:
            s = _scores(st, step, qb, kb, aux, keys_first=True)  # [B, Hkv, n, bk, rows]
            p = jnp.exp(s - _take(lse, step.q_blocks, 2)[..., None, :])
        else:
            p = probs[i]
        dv_part = jnp.einsum("bhnkq,bhnqd->bhnkd", p.astype(q.dtype), dob,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bhnkd,bhnqd->bhnkq", vb, dob, preferred_element_type=jnp.float32)
        ds = (p * (dp - _take(delta, step.q_blocks, 2)[..., None, :])).astype(q.dtype)
        dq_part = jnp.einsum("bhnkd,bhnkq->bhndq", kb, ds,
                             preferred_element_type=jnp.float32).swapaxes(-1, -2)
        dk_part = jnp.einsum("bhnkq,bhnqd->bhnkd", ds, qb, preferred_element_type=jnp.float32)
        dq = _put(dq, step.q_blocks, dq_part, 2, add=True)
        dk = _put_kv(dk, step, dk_part, 2)
        dv = _put_kv(dv, step, dv_part, 2)
        after = None if st.plan.strips else _zero_after(dq_part)
    d_sinks = None
    if sinks is not None:  # d lse / d sink = p_sink, and out moves by -out * p_sink
        p_sink = jnp.exp(_sink_rows(sinks, hkv, st.groups, rows) - lse)
        per_row = -(p_sink * delta).reshape(b, hkv, nq, st.groups, rows // st.groups)
        d_sinks = per_row.sum(axis=(0, 2, 4)).reshape(-1).astype(sinks.dtype)
    return dq, dk, dv, d_sinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st: _Static, q, k, v, sinks, aux):
    out, _ = _forward(st, q, k, v, sinks, aux)
    return out.astype(q.dtype)


def _attend_fwd(st, q, k, v, sinks, aux):
    if st.keep_probs:
        out, lse, probs = _strips_forward(st, q, k, v, sinks, aux)
    else:
        (out, lse), probs = _forward(st, q, k, v, sinks, aux), None
    out = out.astype(q.dtype)
    return out, (q, k, v, sinks, aux, out, lse, probs)


def _attend_bwd(st, residuals, d_out):
    q, k, v, sinks, aux, out, lse, probs = residuals
    dq, dk, dv, d_sinks = _backward(st, q, k, v, sinks, aux, out.astype(jnp.float32), lse,
                                    d_out, probs)
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
    False, steps over all query blocks; None, strips when there are at most `MAX_STRIPS`
    and each fits `SCORES_PER_STEP` (short sequences: on a 2-core CPU a causal layer at
    T=1024 ran in 0.63x the time of steps, docs/performance.md).
    `keep_probs`: strips keep their probabilities for the backward pass when all together
    fit `KEEP_PROBS` floats (a causal layer at T=1024 then takes ~0.8x the time); False
    always recomputes them (the cuDNN path's fallback: a lax.cond keeps both branches'
    residuals, taken or not).
    """
    b, t, h, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    bq, bk = block_sizes(spec, t, s_len, block_q, block_kv)
    always_mask = spec.q_segment_ids is not None or spec.chunk is not None
    geometry = (t, s_len, bq, bk, spec.causal, spec.window, spec.chunk, always_mask)
    chosen = plan(*geometry, strips=True)
    widest = max((step.kv_span for step in chosen.steps), default=1)
    if strips is None:
        strips = (len(chosen.steps) <= MAX_STRIPS
                  and b * h * bq * bk * widest <= SCORES_PER_STEP)
    if not strips:
        per_step = max(1, SCORES_PER_STEP // (b * h * bq * bk))  # query blocks per step
        chosen = plan(*geometry, per_step)
    keep_probs = keep_probs and strips and b * h * chosen.computed_pairs() <= KEEP_PROBS
    st = _Static(chosen, groups=h // hkv, causal=spec.causal, window=spec.window,
                 chunk=spec.chunk, keep_probs=keep_probs)
    nq, nk = st.plan.num_q_blocks, st.plan.num_kv_blocks
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
