"""Which keys a query may see: one description shared by every attention kernel.

A query at position p sees a key at position s when all of these hold:
  causal:   s <= p
  window W: p - s < W          (the W most recent keys, the query's own included)
  chunk C:  p // C == s // C   (Llama-4 chunked attention)
  segments: same segment id    (packed documents never see each other)

Positions default to 0..T-1. Packed documents restart their positions at 0, and
since positions then advance by one per token inside a document, the rules above
measured in positions agree with the same rules measured in sequence indices for
every pair of tokens in the same segment. Kernels that skip blocks rely on that.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static mask rules plus optional per-token arrays ([B, T] / [B, S], int32)."""

    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    chunk: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    q_positions: jax.Array | None = None
    kv_positions: jax.Array | None = None

    def __post_init__(self):
        for name in ("window", "chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MaskSpec.{name} must be a positive int or None, got {value!r}")
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError("MaskSpec: give both q_segment_ids and kv_segment_ids, or neither")

    @property
    def span(self) -> int | None:
        """How far back (in keys, query included) any query can see; None = unbounded."""
        spans = [s for s in (self.window, self.chunk) if s is not None]
        return min(spans) if spans else None


def visible_offsets(causal: bool, window: int | None,
                    chunk: int | None) -> tuple[float, float]:
    """(lo, hi): the query-minus-key offsets a query may see, as far as index geometry says.

    Inside a segment offsets in positions equal offsets in indices, so a key block whose
    offsets all fall outside [lo, hi] is hidden from the whole query block. A chunk
    bounds the offset by C - 1 on both sides; which keys share the chunk depends on
    positions, so chunked blocks are always masked elementwise.
    """
    spans = [s for s in (window, chunk) if s is not None]
    hi = min(spans) - 1 if spans else math.inf
    lo = 0 if causal else -hi
    return lo, hi


def positions_or_default(positions: jax.Array | None, length: int) -> jax.Array:
    if positions is None:
        return jnp.arange(length, dtype=jnp.int32)[None, :]
    return positions.astype(jnp.int32)


def dense_mask(spec: MaskSpec, q_len: int, kv_len: int) -> jax.Array:
    """Boolean [B or 1, T, S] mask: True where the query may attend to the key."""
    q_pos = positions_or_default(spec.q_positions, q_len)[:, :, None]
    kv_pos = positions_or_default(
        spec.kv_positions if spec.kv_positions is not None else
        (spec.q_positions if q_len == kv_len else None), kv_len)[:, None, :]
    mask = jnp.ones((1, q_len, kv_len), dtype=bool)
    if spec.causal:
        mask = mask & (kv_pos <= q_pos)
    if spec.window is not None:
        mask = mask & (q_pos - kv_pos < spec.window)
        if not spec.causal:  # a non-causal window is symmetric, never one-sided into the future
            mask = mask & (kv_pos - q_pos < spec.window)
    if spec.chunk is not None:
        mask = mask & (q_pos // spec.chunk == kv_pos // spec.chunk)
    if spec.q_segment_ids is not None:
        mask = mask & (spec.q_segment_ids[:, :, None] == spec.kv_segment_ids[:, None, :])
    return mask
