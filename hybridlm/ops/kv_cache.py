"""Attention with a KV cache for decoding, sized by what each layer can see.

A full-attention layer keeps every key (a buffer of the maximum length); a windowed layer
keeps a ring buffer of its W most recent keys; a chunked layer keeps one chunk. Slot
`position % size` holds a key, and the mask rules of `masks.py`, applied to the positions
stored next to the keys, decide what a query sees, so a slot overwritten by a newer key
never leaks and an empty slot (position -1) is never attended. For RNoPE-SWA at 128k with
W = 4096 the cache is (3W + L) / 4L = 27% of a full-attention cache.

Use: the first call with a cache gives the whole prompt (it must find the cache empty;
attention among the prompt's own tokens then runs on the configured kernel); every later
call gives one new token per sequence, attended against the cache densely.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hybridlm.ops.attention import attention
from hybridlm.ops.masks import MaskRule


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    k: jax.Array  # [B, size, Hkv, D]
    v: jax.Array  # [B, size, Hkv, D]
    positions: jax.Array  # [B, size] int32; -1 marks an empty slot

    @property
    def size(self) -> int:
        return self.k.shape[1]


def cache_size(max_len: int, rule: MaskRule) -> int:
    """Slots a layer needs: all positions, or its span (window or chunk), whichever is less."""
    return max_len if rule.span is None else min(max_len, rule.span)


def empty_cache(batch: int, size: int, kv_heads: int, head_dim: int,
                dtype=jnp.float32) -> LayerCache:
    zeros = jnp.zeros((batch, size, kv_heads, head_dim), dtype)
    return LayerCache(zeros, zeros, jnp.full((batch, size), -1, jnp.int32))


def write(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """Store new keys/values at slot position % size (only the last `size` of them fit)."""
    size = cache.size
    if k.shape[1] > size:
        k, v, positions = k[:, -size:], v[:, -size:], positions[:, -size:]
    slots = positions % size
    rows = jnp.arange(k.shape[0])[:, None]
    return LayerCache(cache.k.at[rows, slots].set(k.astype(cache.k.dtype)),
                      cache.v.at[rows, slots].set(v.astype(cache.v.dtype)),
                      cache.positions.at[rows, slots].set(positions.astype(jnp.int32)))


def attend(cache: LayerCache, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
           rule: MaskRule, *, impl: str = "auto",
           sinks: jax.Array | None = None, **kernel) -> tuple[jax.Array, LayerCache]:
    """Attention of the new tokens (q, k, v at `positions` [B, n]) given the cache; returns
    (output [B, n, H, D], updated cache). `rule` must be causal: the cache holds only
    keys up to the newest token."""
    if q.shape[1] > 1:  # the prompt: the cache is empty, the prompt attends to itself
        spec = rule.for_tokens(q_positions=positions, kv_positions=positions)
        out = attention(q, k, v, spec, impl, sinks=sinks, **kernel)
    else:
        keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
        values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
        kv_pos = jnp.concatenate([cache.positions, positions.astype(jnp.int32)], axis=1)
        spec = rule.for_tokens(q_segment_ids=jnp.ones_like(positions, jnp.int32),
                               kv_segment_ids=(kv_pos >= 0).astype(jnp.int32),
                               q_positions=positions, kv_positions=kv_pos)
        out = attention(q, keys.astype(q.dtype), values.astype(q.dtype), spec, "dense",
                        sinks=sinks)
    return out, write(cache, k, v, positions)
