"""Which (query block, key block) pairs a mask reaches, and in what order to compute them.

Pure index geometry, no arrays: `plan()` turns the lengths, the tiles and the layer's
`MaskRule` (its visible offsets) into `Step`s for the kernel in `blockwise.py`. Two layouts:

- steps: step s pairs every query block with its s-th visible key block counted back from
  the diagonal; `schedule()` regroups them into loop iterations of one shape (`Tiles`), so
  the kernel's program does not grow with the sequence (long sequences);
- strips: one query block against its whole visible run of key blocks at once (short
  sequences: fewer, larger matmuls and a plain softmax, unrolled).

A pair is *masked* unless every (query, key) in it is visible (then the kernel skips the
mask); padding, segment ids and chunks always mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from hybridlm.ops.masks import MaskRule

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
def plan(q_len: int, kv_len: int, block_q: int, block_kv: int, rule: MaskRule,
         always_mask: bool,
         q_blocks_per_step: int | None = None, strips: bool = False) -> Plan:
    """The steps that cover every visible (query, key) pair.

    Query blocks are taken `q_blocks_per_step` at a time (all when None); for each such
    group, step s pairs every query block with its s-th visible key block, diagonal first
    (the pairs of one step share their distance from the diagonal, so one mask flag fits
    them all). With `strips`, each step is instead one query block against all its visible key
    blocks (a contiguous run) at once: one plain softmax per row, no online rescaling.
    """
    lo, hi = rule.visible_offsets()  # allowed q_index - kv_index
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    visible = []  # per query block: [(kv block, entirely visible)], nearest first
    for i in range(nq):
        q_first, q_last = i * block_q, min((i + 1) * block_q, q_len) - 1
        # only key blocks whose offsets can reach [lo, hi]
        first = 0 if hi == math.inf else max(0, (q_first - hi) // block_kv)
        last = nk - 1 if lo == -math.inf else min(nk - 1, (q_last - lo) // block_kv)
        row = []
        for j in reversed(range(first, last + 1)):
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


# -- tiles: the steps regrouped into loop iterations of one shape -----------------------------

@dataclasses.dataclass(frozen=True)
class Tiles:
    """One loop: `q[n][p]`, `kv[n][p]` are the blocks of pair p of iteration n (p < P, the
    same for every iteration). The query blocks of one iteration are distinct, so the
    forward pass updates each row's running softmax once per iteration. Padding pairs
    point one past the last blocks (query `num_q_blocks`, key `num_kv_blocks`): they read
    a clipped block, are hidden by the mask (their keys lie beyond the sequence) and their
    writes are dropped. Only masked loops have padding."""

    q: tuple[tuple[int, ...], ...]
    kv: tuple[tuple[int, ...], ...]
    masked: bool

    @property
    def pairs(self) -> int:
        """Block pairs computed, padding included."""
        return len(self.q) * (len(self.q[0]) if self.q else 0)


@dataclasses.dataclass(frozen=True)
class Schedule:
    plan: Plan
    loops: tuple[Tiles, ...]  # run one after the other: the full pairs, then the masked

    def computed_pairs(self) -> int:
        """Query-key pairs whose scores the kernel computes (per batch row and head)."""
        return sum(t.pairs for t in self.loops) * self.plan.block_q * self.plan.block_kv


def _wrap(rows: dict[int, list[int]], iterations: int, width: int) -> list[list[tuple]]:
    """McNaughton's wrap-around: the pairs listed query block by query block, pair k goes to
    iteration k mod `iterations`. A query block with at most `iterations` pairs (they are
    consecutive) lands in distinct iterations. Takes the first iterations * width pairs."""
    flat = [(i, j) for i in sorted(rows) for j in rows[i]][:iterations * width]
    out = [[] for _ in range(iterations)]
    for k, pair in enumerate(flat):
        out[k % iterations].append(pair)
    return out


def _as_tiles(groups: list[list[tuple]], width: int, pad: tuple[int, int],
              masked: bool) -> Tiles:
    padded = [g + [pad] * (width - len(g)) for g in groups]
    return Tiles(q=tuple(tuple(i for i, _ in g) for g in padded),
                 kv=tuple(tuple(j for _, j in g) for g in padded), masked=masked)


def _iterations(rows: dict[int, list[int]], total: int, max_pairs: int) -> int:
    """Iterations a loop needs: at least the busiest query block's pairs, at least
    total / max_pairs, and two when there are two pairs or more (XLA inlines a loop of one
    iteration, and the program's shape, and its memory, would then change with T)."""
    return max(max(map(len, rows.values())), -(-total // max_pairs), min(2, total))


@functools.lru_cache(maxsize=256)
def schedule(p: Plan, max_pairs: int) -> Schedule:
    """The steps of plan `p` (not strips) as at most two loops of at most `max_pairs` pairs
    per iteration: the entirely visible pairs (no mask, no padding) and the masked ones.

    A loop needs at least as many iterations as the busiest query block has pairs, and at
    least pairs / max_pairs: it gets the larger of the two, and its width is what fills
    them. Full pairs that would leave an iteration short move to the masked loop.
    """
    full: dict[int, list[int]] = {}
    masked: dict[int, list[int]] = {}
    for step in p.steps:
        for i, j in zip(step.q_blocks, step.kv_blocks, strict=True):
            (masked if step.masked else full).setdefault(i, []).append(j)
    loops = []
    total = sum(map(len, full.values()))
    if total:
        n = _iterations(full, total, max_pairs)
        width = total // n
        groups = _wrap(full, n, width)
        taken = {pair for g in groups for pair in g}
        for i, row in full.items():  # the short iteration's pairs go to the masked loop
            masked.setdefault(i, []).extend(j for j in row if (i, j) not in taken)
        if width:
            loops.append(_as_tiles(groups, width, (-1, -1), masked=False))
    total = sum(map(len, masked.values()))
    if total:
        n = _iterations(masked, total, max_pairs)
        width = -(-total // n)
        groups = _wrap(masked, n, width)
        loops.append(_as_tiles(groups, width, (p.num_q_blocks, p.num_kv_blocks), masked=True))
    return Schedule(p, tuple(loops))


def block_sizes(rule: MaskRule, q_len: int, kv_len: int, block_q: int,
                block_kv: int) -> tuple[int, int]:
    """The block sizes used: the configured ones, capped by the sequence lengths and, for
    a window or chunk, by span / SPAN_BLOCKS (never below MIN_BLOCK)."""
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"attention block sizes must be >= 1, got block_q={block_q}, "
                         f"block_kv={block_kv}")
    if rule.span is not None:
        cap = max(MIN_BLOCK, rule.span // SPAN_BLOCKS)
        block_q, block_kv = min(block_q, cap), min(block_kv, cap)
    return min(block_q, q_len), min(block_kv, kv_len)
