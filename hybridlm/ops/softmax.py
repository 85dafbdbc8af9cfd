"""The reference masked softmax of attention, with sink logits and the log-sum-exp.

One definition for everything that forms whole score rows: the dense oracle
(`ops/attention.py`), context parallelism's per-pair attention (`parallel/context.py`) and
the attention-pattern analysis (`eval/analysis_math.py`). The fused kernels (blockwise,
splash, cuDNN) compute the same function online, block by block, and are tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_softmax(scores: jax.Array, mask: jax.Array, sink: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """(probabilities, log-sum-exp) of `scores` over the last axis, keys where `mask`.

    `sink` (optional, broadcastable to scores[..., :1]) is a learned logit that joins every
    denominator and carries no value (GPT-OSS), so a row's probabilities sum to less than
    one. A row that sees no key (and has no sink) gets probabilities 0 and log-sum-exp -inf,
    with finite gradients. The log-sum-exp has the last axis dropped.
    """
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    if sink is not None:
        sink = sink.astype(scores.dtype)
        row_max = jnp.maximum(row_max, sink)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    exp = jnp.exp(scores - row_max)
    denom = jnp.sum(exp, axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + jnp.exp(sink - row_max)
    safe = jnp.where(denom == 0.0, 1.0, denom)
    lse = jnp.where(denom == 0.0, -jnp.inf, row_max + jnp.log(safe))
    return exp / safe, lse[..., 0]
