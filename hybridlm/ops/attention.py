"""`attention(q, k, v, spec, impl)`: one entry point, several kernels.

Shapes: q [B, T, H, D], k and v [B, S, Hkv, D] with H a multiple of Hkv (GQA: query
head h reads key/value head h // (H // Hkv)). The model calls only this function;
which kernel runs is a config choice (`model.attention_impl`), never model code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from hybridlm.ops.masks import MaskSpec, dense_mask

IMPLS = ("auto", "dense")


def dense_attention(q, k, v, spec: MaskSpec, *, scale: float, sinks=None) -> jax.Array:
    """The oracle: full [T, S] scores, masked, softmax in float32.

    Rows that see no key return zeros. `sinks` ([H], optional) is a learned logit
    per head that joins every softmax denominator and carries no value (GPT-OSS).
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    mask = dense_mask(spec, t, k.shape[1])[:, None, None]  # [B|1, 1, 1, T, S]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, hkv, h // hkv, 1, 1)
        row_max = jnp.maximum(row_max, sink)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    probs = jnp.exp(scores - row_max)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - row_max)
    probs = probs / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


_KERNELS: dict[str, Callable] = {"dense": dense_attention}


def resolve_impl(impl: str) -> str:
    """The kernel `impl` runs on this platform. `auto` picks the best one available."""
    if impl == "auto":
        return "dense"
    if impl not in _KERNELS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, impl: str = "auto",
              *, scale: float | None = None, sinks: jax.Array | None = None) -> jax.Array:
    """Masked multi-head attention; returns [B, T, H, D] in q's dtype."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q [B,T,H,D], k=v [B,S,Hkv,D]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} disagree (batch, head_dim, "
                         "or heads not a multiple of kv heads)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _KERNELS[resolve_impl(impl)](q, k, v, spec, scale=scale, sinks=sinks)
