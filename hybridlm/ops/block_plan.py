"""Which (query block, key block) pairs a mask reaches, and in what order to compute them.

Pure index geometry, no arrays: `plan()` turns the lengths, the tiles and the mask's
causal / window / chunk rule into `Step`s for the kernel in `blockwise.py`. Two layouts:

- steps: step s pairs every query block with its s-th visible key block counted back from
  the diagonal, one batched matmul over all those query blocks (long sequences);
- strips: one query block against its whole visible run of key blocks at once (short
  sequences: fewer, larger matmuls and a plain softmax).

A pair is *masked* unless every (query, key) in it is visible (then the kernel skips the
mask); padding, segment ids and chunks always mask.
"""

from __future__ import annotations

import dataclasses
import functools

from hybridlm.ops.masks import MaskSpec, visible_offsets

# A window or chunk of span S uses blocks of at most S / SPAN_BLOCKS (but >= MIN_BLOCK), so
# that the partly hidden blocks at its two edges add at most ~1/8 of the visible work.
SPAN_BLOCKS = 8
MIN_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class Step:
    """One batched matmul: query block q_blocks[i] against key block kv_blocks[i]."""

    q_blocks: tuple[int, ...]
    kv_blocks: tuple[int, ...]
    masked: bool  # False: every pair in the step is entirely visible, skip the mask
    kv_span: int = 1  # a strip: one query block against kv_span key blocks from kv_blocks[0]


@dataclasses.dataclass(frozen=True)
class Plan:
    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    steps: tuple[Step, ...]
    strips: bool = False  # few steps of bounded size: XLA may run them concurrently

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_kv)

    def computed_pairs(self) -> int:
        """Query-key pairs whose scores the kernel computes (per batch row and head)."""
        blocks = sum(len(s.q_blocks) * s.kv_span for s in self.steps)
        return blocks * self.block_q * self.block_kv


@functools.lru_cache(maxsize=256)
def plan(q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool,
         window: int | None, chunk: int | None, always_mask: bool,
         q_blocks_per_step: int | None = None, strips: bool = False) -> Plan:
    """The steps that cover every visible (query, key) pair, in execution order.

    Query blocks are taken `q_blocks_per_step` at a time (all when None); for each such
    group, step s pairs every query block with its s-th visible key block, diagonal first.
    With `strips`, each step is instead one query block against all its visible key blocks
    (a contiguous run) at once: one plain softmax per row, no online rescaling.
    """
    lo, hi = visible_offsets(causal, window, chunk)  # allowed q_index - kv_index
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    visible = []  # per query block: [(kv block, entirely visible)], nearest first
    for i in range(nq):
        q_first, q_last = i * block_q, min((i + 1) * block_q, q_len) - 1
        row = []
        for j in reversed(range(nk)):
            kv_first, kv_last = j * block_kv, min((j + 1) * block_kv, kv_len) - 1
            d_min, d_max = q_first - kv_last, q_last - kv_first
            if d_max < lo or d_min > hi:
                continue
            padded = (j + 1) * block_kv > kv_len
            full = lo <= d_min and d_max <= hi and not padded and not always_mask
            row.append((j, full))
        visible.append(row)
    if strips:
        return Plan(q_len, kv_len, block_q, block_kv, tuple(
            Step(q_blocks=(i,), kv_blocks=(min(j for j, _ in row),), kv_span=len(row),
                 masked=not all(full for _, full in row))
            for i, row in enumerate(visible) if row), strips=True)
    steps = []
    per_step = q_blocks_per_step or nq
    for first in range(0, nq, per_step):
        group = list(enumerate(visible))[first:first + per_step]
        for s in range(max((len(r) for _, r in group), default=0)):
            pairs = [(i, r[s]) for i, r in group if len(r) > s]
            steps.append(Step(q_blocks=tuple(i for i, _ in pairs),
                              kv_blocks=tuple(j for _, (j, _) in pairs),
                              masked=not all(full for _, (_, full) in pairs)))
    return Plan(q_len, kv_len, block_q, block_kv, tuple(steps))


def block_sizes(spec: MaskSpec, q_len: int, kv_len: int, block_q: int,
                block_kv: int) -> tuple[int, int]:
    """The block sizes used: the configured ones, capped by the sequence lengths and, for
    a window or chunk, by span / SPAN_BLOCKS (never below MIN_BLOCK)."""
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"attention block sizes must be >= 1, got block_q={block_q}, "
                         f"block_kv={block_kv}")
    if spec.span is not None:
        cap = max(MIN_BLOCK, spec.span // SPAN_BLOCKS)
        block_q, block_kv = min(block_q, cap), min(block_kv, cap)
    return min(block_q, q_len), min(block_kv, kv_len)
