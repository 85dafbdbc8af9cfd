"""XLA-counted cost of attention and of train steps: deterministic, no arrays needed.

`jax.jit(f).lower(*ShapeDtypeStructs).compile()` reports FLOPs and temp bytes that are
the same on every compile. XLA counts a loop body once, so everything measured here
must be loop-free: the blockwise kernel unrolls its steps in Python (and model costs
should be taken with `scan_layers=False`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hybridlm.ops.attention import attention
from hybridlm.ops.masks import MaskSpec, visible_offsets


def compiled_cost(fn, *args) -> dict[str, float]:
    """{'flops', 'temp_bytes'} of fn compiled for the given abstract arguments."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"flops": float(cost["flops"]),
            "temp_bytes": float(compiled.memory_analysis().temp_size_in_bytes)}


def attention_cost(impl: str, *, batch: int, length: int, heads: int, kv_heads: int,
                   head_dim: int, window: int | None = None, backward: bool = True,
                   dtype=jnp.float32, **kwargs) -> dict[str, float]:
    """Cost of one attention call (forward, or forward + backward) on causal self-attention."""
    spec = MaskSpec(causal=True, window=window)
    q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype)

    def forward(q, k, v):
        return attention(q, k, v, spec, impl, **kwargs)

    if not backward:
        return compiled_cost(forward, q, kv, kv)
    grad = jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32)),
                    argnums=(0, 1, 2))
    return compiled_cost(grad, q, kv, kv)


def visible_pairs(length: int, causal: bool = True, window: int | None = None,
                  chunk: int | None = None) -> int:
    """Exact number of (query, key) pairs the mask shows, self-attention, one head."""
    lo, hi = visible_offsets(causal, window, chunk)
    i = np.arange(length)
    first = np.maximum(0, i - hi) if np.isfinite(hi) else np.zeros_like(i)
    last = np.minimum(length - 1, i - lo) if np.isfinite(lo) else np.full_like(i, length - 1)
    if chunk is not None:
        first = np.maximum(first, i // chunk * chunk)
        last = np.minimum(last, (i // chunk + 1) * chunk - 1)
    return int(np.maximum(0, last - first + 1).sum())


def attention_matmul_flops(pairs: int, batch: int, heads: int, head_dim: int) -> int:
    """Forward matmul FLOPs an exact kernel needs: q.k and p.v, 2*D each per pair."""
    return 4 * batch * heads * head_dim * pairs
