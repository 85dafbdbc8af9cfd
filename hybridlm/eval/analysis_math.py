"""The paper's attention-pattern measurement, as array math.

For the question-and-completion tokens (qc, the queries) of a needle sample, take each
layer's post-softmax attention over all keys, sum it over four key segments

    begin:   the first 10 tokens: the BOS and the nine after it (where attention sinks form)
    needle:  the needle's tokens
    context: every other haystack token
    qc:      the question + completion tokens themselves

and average over queries and heads. Also the attention entropy (nats) per query, averaged.
Only [queries x keys] probabilities are formed, never [T x T], so it runs at long lengths.

Every mass has a baseline: what uniform attention over the keys a query can see (its
layer's window or chunk) would give, i.e. each segment's share of the visible keys (and
log of their number as the entropy). A needle of 56 of 512 keys gets 0.11 from uniform
attention alone; only mass above that is a preference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hybridlm.ops import MaskRule, dense_mask
from hybridlm.ops.softmax import masked_softmax

SEGMENTS = ("begin", "needle", "context", "qc")
BEGIN_TOKENS = 10


def segment_ids_for_keys(num_keys: int, needle: tuple[int, int], qc_start: int) -> np.ndarray:
    """Label every key position 0..num_keys-1 with its segment index (SEGMENTS order)."""
    labels = np.full(num_keys, SEGMENTS.index("context"), dtype=np.int32)
    labels[needle[0]:needle[1]] = SEGMENTS.index("needle")
    labels[qc_start:] = SEGMENTS.index("qc")
    labels[:BEGIN_TOKENS] = SEGMENTS.index("begin")  # the sink wins if spans overlap
    return labels


def query_probs(q: jax.Array, k: jax.Array, q_positions: jax.Array, rule: MaskRule,
                sinks: jax.Array | None = None) -> jax.Array:
    """Post-softmax probabilities [H, Q, S] of queries q [Q, H, D] over keys k [S, Hkv, D].

    Keys sit at positions 0..S-1, masked by the layer's `rule`. With a sink logit the
    probabilities of a row sum to less than one (the sink takes the rest), as in the model.
    """
    num_q, h, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(num_q, hkv, h // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("qkgd,skd->kgqs", qg, k.astype(jnp.float32)) / np.sqrt(d)
    mask = visible_keys(q_positions, k.shape[0], rule)
    sink = None if sinks is None else sinks.reshape(hkv, h // hkv, 1, 1)
    probs, _ = masked_softmax(scores, mask, sink)
    return probs.reshape(h, num_q, k.shape[0])


def visible_keys(q_positions: jax.Array, num_keys: int, rule: MaskRule) -> jax.Array:
    """[Q, S] bool: which keys (at positions 0..S-1) each query may attend to."""
    spec = rule.for_tokens(q_positions=q_positions[None, :],
                           kv_positions=jnp.arange(num_keys)[None])
    return dense_mask(spec, len(q_positions), num_keys)[0]


def uniform_probs(q_positions: jax.Array, num_keys: int, rule: MaskRule) -> jax.Array:
    """[1, Q, S]: uniform attention over each query's visible keys (the baseline)."""
    mask = visible_keys(q_positions, num_keys, rule).astype(jnp.float32)
    return (mask / mask.sum(-1, keepdims=True))[None]


def mass_and_entropy(probs: jax.Array, key_segments: jax.Array,
                     query_weights: jax.Array | None = None) -> jax.Array:
    """[mass per segment (SEGMENTS order)..., entropy], averaged over heads and queries
    (queries weighted by query_weights [Q], e.g. 0 for padding rows)."""
    h, num_q = probs.shape[:2]
    w = jnp.ones(num_q, jnp.float32) if query_weights is None else query_weights
    one_hot = jax.nn.one_hot(key_segments, len(SEGMENTS), dtype=jnp.float32)
    mass = jnp.einsum("hqs,sc,q->c", probs, one_hot, w) / (h * w.sum())
    entropy = -(probs * jnp.log(jnp.clip(probs, 1e-30, 1.0))).sum(-1)  # [H, Q]
    return jnp.concatenate([mass, ((entropy * w).sum() / (h * w.sum()))[None]])


def as_dict(values) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    return {**{name: float(v) for name, v in zip(SEGMENTS, values[:-1], strict=True)},
            "entropy": float(values[-1])}


def summarize(probs: jax.Array, key_segments: np.ndarray) -> dict[str, float]:
    """Mass per segment and entropy, averaged over heads and queries."""
    return as_dict(mass_and_entropy(probs, jnp.asarray(key_segments)))
