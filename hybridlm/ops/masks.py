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

`MaskRule` is the static part (causal, window, chunk) with every derived quantity (span,
key bounds, visible counts, block offsets); `MaskSpec` is a rule plus one batch's segment ids
and positions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """The static part of a mask: which keys a query may see, as far as positions say.

    One frozen, hashable value per attention layer (`LayerSpec.mask`), handed whole to every
    kernel, the KV cache, context parallelism, FLOP counting and the analysis, which read it
    only through the methods below. A new mask feature is a field here and its lines in
    `key_bounds`, `span` and `visible_offsets`; kernels that translate the rule into their
    own masks decline what they do not know (`uses_only`) until they implement it.
    """

    causal: bool = True
    window: int | None = None  # the W most recent keys, the query's own included
    chunk: int | None = None  # keys in the query's own C-token chunk only

    # The fields `span` and `visible_offsets` know. A field outside this list (a new mask
    # feature) makes them answer "unbounded" until it is added, so every consumer of the
    # geometry (block skipping, cache sizes, halos) stays exact, only slower, from the moment
    # the feature is in `key_bounds`.
    GEOMETRY = ("causal", "window", "chunk")

    def __post_init__(self):
        for name in ("window", "chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int or None, "
                                 f"got {value!r}")

    @property
    def rule(self) -> MaskRule:
        """The static rule alone (a MaskSpec's without its arrays): hashable, a cache key."""
        return MaskRule(**self._fields())

    def _fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(MaskRule)}

    @property
    def span(self) -> int | None:
        """How far back (in keys, the query's own included) a query can see; None = unbounded."""
        if not self.uses_only(*MaskRule.GEOMETRY):
            return None
        spans = [s for s in (self.window, self.chunk) if s is not None]
        return min(spans) if spans else None

    def key_bounds(self, q_pos) -> tuple[list, list]:
        """(lower bounds, upper bounds), inclusive, on the positions of the keys a query at
        `q_pos` may see: the rule of this module's docstring, written once. Every rule is an
        interval of key positions, so the bounds say everything but the segments. Works on
        ints, numpy and jax arrays alike (operators only)."""
        lower, upper = [], []
        if self.causal:
            upper.append(q_pos)
        if self.window is not None:
            lower.append(q_pos - (self.window - 1))
            if not self.causal:  # a non-causal window is symmetric, never one-sided ahead
                upper.append(q_pos + (self.window - 1))
        if self.chunk is not None:
            start = q_pos // self.chunk * self.chunk
            lower.append(start)
            upper.append(start + (self.chunk - 1))
        return lower, upper

    def visible(self, q_pos, kv_pos, q_segments=None, kv_segments=None):
        """True where a query at `q_pos` may see a key at `kv_pos` (and, with segment ids, only
        within its own segment): the one visibility predicate every kernel, the KV cache and
        context parallelism evaluate. Arguments broadcast against each other (e.g. q_pos
        [..., T, 1], kv_pos [..., 1, S]); jax or numpy arrays."""
        lower, upper = self.key_bounds(q_pos)
        tests = [kv_pos >= bound for bound in lower] + [kv_pos <= bound for bound in upper]
        if q_segments is not None:
            tests.append(q_segments == kv_segments)
        if not tests:  # every key: all True, in the broadcast shape and array type
            return (q_pos >= q_pos) & (kv_pos >= kv_pos)
        return functools.reduce(operator.and_, tests)

    def visible_key_counts(self, q_len: int, kv_len: int | None = None) -> np.ndarray:
        """Keys at positions 0..kv_len-1 visible to each query at positions 0..q_len-1 (one
        unpacked sequence), from `key_bounds`: what FLOP counts and cost checks count."""
        kv_len = q_len if kv_len is None else kv_len
        p = np.arange(q_len, dtype=np.int64)
        lower, upper = self.key_bounds(p)
        first = np.maximum.reduce([np.zeros_like(p), *lower])
        last = np.minimum.reduce([np.full_like(p, kv_len - 1), *upper])
        return np.maximum(0, last - first + 1)

    def visible_offsets(self) -> tuple[float, float]:
        """(lo, hi): the query-minus-key offsets a query may see, as far as index geometry says.

        Inside a segment offsets in positions equal offsets in indices, so a key block whose
        offsets all fall outside [lo, hi] is hidden from the whole query block. A chunk
        bounds the offset by C - 1 on both sides; which keys share the chunk depends on
        positions, so chunked blocks are always masked elementwise. (The bounds of
        `key_bounds` at q_pos = 0, with a chunk's own bounds relaxed to +-(C - 1).)
        """
        if not self.uses_only(*MaskRule.GEOMETRY):
            return -math.inf, math.inf
        hi = self.span - 1 if self.span is not None else math.inf
        lo = 0 if self.causal else -hi
        return lo, hi

    @property
    def offsets_exact(self) -> bool:
        """True when `visible_offsets` alone decides every pair of one sequence (causal and
        window; not a chunk, whose boundaries follow positions): a block inside the offsets
        needs no elementwise mask."""
        return self.uses_only("causal", "window")

    def uses_only(self, *names: str) -> bool:
        """True when every field but `names` is at its default: how a kernel that translates
        only those fields tells that it computes this rule exactly (else it declines, and a
        new mask feature falls back to a kernel that reads the rule whole)."""
        default = MaskRule()
        return all(getattr(self, f.name) == getattr(default, f.name)
                   for f in dataclasses.fields(MaskRule) if f.name not in names)

    def for_tokens(self, **arrays) -> MaskSpec:
        """This rule with per-token arrays (MaskSpec's segment ids and positions)."""
        return MaskSpec(**self._fields(), **arrays)


@dataclasses.dataclass(frozen=True)
class MaskSpec(MaskRule):
    """A rule applied to one batch: the static `MaskRule` plus optional per-token arrays
    ([B, T] / [B, S], int32). A pytree whose leaves are the arrays; `.rule` is the static
    part, for kernels to cache on."""

    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    q_positions: jax.Array | None = None
    kv_positions: jax.Array | None = None

    def __post_init__(self):
        super().__post_init__()
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError("MaskSpec: give both q_segment_ids and kv_segment_ids, or neither")


jax.tree_util.register_dataclass(
    MaskSpec, data_fields=["q_segment_ids", "kv_segment_ids", "q_positions", "kv_positions"],
    meta_fields=[f.name for f in dataclasses.fields(MaskRule)])


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
    return spec.visible(q_pos, kv_pos, None if q_seg is None else q_seg[:, :, None],
                        None if kv_seg is None else kv_seg[:, None, :])
