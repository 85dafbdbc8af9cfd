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
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np


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
        return span(self.window, self.chunk)


def span(window: int | None, chunk: int | None) -> int | None:
    """How far back (in keys, the query's own included) a query can see; None = unbounded."""
    spans = [s for s in (window, chunk) if s is not None]
    return min(spans) if spans else None


def key_bounds(q_pos, *, causal: bool, window: int | None, chunk: int | None
               ) -> tuple[list, list]:
    """(lower bounds, upper bounds), inclusive, on the positions of the keys a query at
    `q_pos` may see: the rule of this module's docstring, written once. Every rule is an
    interval of key positions, so the bounds say everything but the segments. Works on ints,
    numpy and jax arrays alike (operators only)."""
    lower, upper = [], []
    if causal:
        upper.append(q_pos)
    if window is not None:
        lower.append(q_pos - (window - 1))
        if not causal:  # a non-causal window is symmetric, never one-sided into the future
            upper.append(q_pos + (window - 1))
    if chunk is not None:
        start = q_pos // chunk * chunk
        lower.append(start)
        upper.append(start + (chunk - 1))
    return lower, upper


def visible(q_pos, kv_pos, *, causal: bool, window: int | None = None,
            chunk: int | None = None, q_segments=None, kv_segments=None):
    """True where a query at `q_pos` may see a key at `kv_pos` (and, with segment ids, only
    within its own segment): the one visibility predicate every kernel, the KV cache and
    context parallelism evaluate. Arguments broadcast against each other (e.g. q_pos
    [..., T, 1], kv_pos [..., 1, S]); jax or numpy arrays."""
    lower, upper = key_bounds(q_pos, causal=causal, window=window, chunk=chunk)
    tests = [kv_pos >= bound for bound in lower] + [kv_pos <= bound for bound in upper]
    if q_segments is not None:
        tests.append(q_segments == kv_segments)
    if not tests:  # every key: all True, in the broadcast shape and array type
        return (q_pos >= q_pos) & (kv_pos >= kv_pos)
    return functools.reduce(operator.and_, tests)


def visible_key_counts(q_len: int, kv_len: int | None = None, *, causal: bool = True,
                       window: int | None = None, chunk: int | None = None) -> np.ndarray:
    """Keys at positions 0..kv_len-1 visible to each query at positions 0..q_len-1 (one
    unpacked sequence), from `key_bounds`: what FLOP counts and cost checks count."""
    kv_len = q_len if kv_len is None else kv_len
    p = np.arange(q_len, dtype=np.int64)
    lower, upper = key_bounds(p, causal=causal, window=window, chunk=chunk)
    first = np.maximum.reduce([np.zeros_like(p), *lower])
    last = np.minimum.reduce([np.full_like(p, kv_len - 1), *upper])
    return np.maximum(0, last - first + 1)


def visible_offsets(causal: bool, window: int | None,
                    chunk: int | None) -> tuple[float, float]:
    """(lo, hi): the query-minus-key offsets a query may see, as far as index geometry says.

    Inside a segment offsets in positions equal offsets in indices, so a key block whose
    offsets all fall outside [lo, hi] is hidden from the whole query block. A chunk
    bounds the offset by C - 1 on both sides; which keys share the chunk depends on
    positions, so chunked blocks are always masked elementwise. (The bounds of
    `key_bounds` at q_pos = 0, with a chunk's own bounds relaxed to +-(C - 1).)
    """
    s = span(window, chunk)
    hi = s - 1 if s is not None else math.inf
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
    q_seg, kv_seg = spec.q_segment_ids, spec.kv_segment_ids
    return visible(q_pos, kv_pos, causal=spec.causal, window=spec.window, chunk=spec.chunk,
                   q_segments=None if q_seg is None else q_seg[:, :, None],
                   kv_segments=None if kv_seg is None else kv_seg[:, None, :])
