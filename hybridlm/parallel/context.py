"""Context parallelism: attention when the sequence is split over the mesh's `context` axis.

Everything but attention is per token, so once the sequence axis (`length`) is sharded over
`context` the only layer that needs other devices' tokens is attention. The trainer installs
`context_parallel(mesh, ...)` around tracing; `hybridlm.ops.attention` then hands every call
to `context_attention`, which runs in `jax.shard_map` over the whole mesh (batch over
data x fsdp, heads over tensor, the sequence over context) and fetches the keys it needs:

  windowed / chunked layers (span S)  a halo: the S - 1 keys and values just before each
      local chunk, from the device that holds them (one `ppermute`). Each device then runs
      the configured kernel on [halo; chunk] with dummy queries over the halo rows, so the
      kernel sees ordinary self-attention and its block skipping stays exact.
  full causal layers  every earlier key: `allgather` (gather K/V once, `all_gather`) or
      `ring` (pass K/V blocks around the ring, `ppermute` per step), both with an online
      softmax over (query chunk, key chunk) pairs that skips the pairs causality hides.

Causal load balancing: with `layout="zigzag"` the sequence is cut into 2n chunks and device
r holds chunks r and 2n-1-r, so every device owns an early and a late chunk and does the same
causal work (with `contiguous`, the last device does n times the first's). The reorder is
applied to the batch on the host (`reorder_batch`); positions travel with the tokens, so the
positions-based masks of `hybridlm.ops.masks` stay right and the loss, a sum over tokens, is
unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from hybridlm.errors import ConfigError
from hybridlm.ops.attention import parallel_attention
from hybridlm.ops.masks import MaskRule, MaskSpec, dense_mask
from hybridlm.ops.softmax import masked_softmax
from hybridlm.parallel.rules import ACTIVATION_RULES, logical_to_spec

AXIS = "context"
IMPLS = ("allgather", "ring")  # how full causal layers fetch keys and values
LAYOUTS = ("zigzag", "contiguous")  # which sequence chunks each device holds
HIDDEN_SEGMENT = int(np.iinfo(np.int32).min)  # segment of a halo that does not exist
NO_KEYS = -1e30  # finite log-sum-exp of a row that saw no key (keeps gradients finite)
log = logging.getLogger(__name__)
_logged: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which global sequence chunks each of the `shards` devices holds, in local order."""

    shards: int
    kind: str = "zigzag"

    @property
    def per_shard(self) -> int:
        return 2 if self.kind == "zigzag" else 1

    def chunks(self, shard: int) -> tuple[int, ...]:
        if self.kind == "zigzag":
            return shard, 2 * self.shards - 1 - shard
        return (shard,)

    def table(self) -> np.ndarray:
        """[shards, per_shard] global chunk ids."""
        return np.asarray([self.chunks(r) for r in range(self.shards)], np.int32)

    def left_of(self, shard: int, slot: int) -> tuple[int, int] | None:
        """(shard, slot) holding the chunk just before this one; None for chunk 0."""
        g = self.chunks(shard)[slot] - 1
        if g < 0:
            return None
        return next((r, s) for r in range(self.shards) for s, c in enumerate(self.chunks(r))
                    if c == g)

    def order(self, length: int) -> np.ndarray:
        """order[i] = the original sequence index of layout index i."""
        n_chunks = self.shards * self.per_shard
        if length % n_chunks:
            raise ValueError(f"sequence length {length} does not split into {n_chunks} chunks")
        size = length // n_chunks
        return np.concatenate([np.arange(g * size, (g + 1) * size) for g in
                               self.table().reshape(-1)]).astype(np.int32)


def layout_of(mesh: Mesh, mesh_cfg: Mapping[str, Any]) -> Layout:
    """The mesh's layout (configs written before these fields existed get the default)."""
    return Layout(mesh.shape[AXIS], mesh_cfg.get("context_layout", "zigzag"))


def check_length(mesh: Mesh, mesh_cfg: Mapping[str, Any], seq_len: int) -> None:
    """The sequence must cut into the layout's chunks: ConfigError naming the fields if not."""
    layout = layout_of(mesh, mesh_cfg)
    n_chunks = layout.shards * layout.per_shard
    if layout.shards > 1 and seq_len % n_chunks:
        raise ConfigError(
            f"data.seq_len ({seq_len}) must be a multiple of {n_chunks}: mesh.context "
            f"({layout.shards}) x {layout.per_shard} chunks per device "
            f"(mesh.context_layout={layout.kind!r})")


def reorder_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                  mesh_cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """[rows, T] host arrays in the layout's order (a no-op without context parallelism);
    arrays of other ranks pass through."""
    layout = layout_of(mesh, mesh_cfg)
    if layout.shards == 1 or layout.kind == "contiguous":
        return dict(batch)
    return {key: value[:, layout.order(value.shape[1])] if np.ndim(value) == 2 else value
            for key, value in batch.items()}


@contextlib.contextmanager
def context_parallel(mesh: Mesh, mesh_cfg: Mapping[str, Any]) -> Iterator[None]:
    """Trace inside this so that attention splits the sequence over `mesh`'s context axis."""
    if mesh.shape[AXIS] == 1:
        yield
        return
    impl = mesh_cfg.get("context_attention", "allgather")
    handler = functools.partial(context_attention, mesh=mesh, impl=impl,
                                layout=layout_of(mesh, mesh_cfg))
    with parallel_attention(handler):
        yield


def _say_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *,
                      local: Callable, scale: float, sinks: jax.Array | None, mesh: Mesh,
                      impl: str, layout: Layout) -> jax.Array:
    """`hybridlm.ops.attention` with the sequence split over `context` (see module doc).

    q [B, T, H, D], k/v [B, T, Hkv, D] in the layout's order; positions (true ones) and
    segment ids as in `spec`. Falls back to `local` under plain GSPMD for what it does not
    split (cross-attention, any rule under which a query sees a later key: the halo and the
    skipping of later chunks assume it cannot).
    """
    b, t, h, d = q.shape
    if k.shape[1] != t or spec.visible_offsets()[0] < 0:  # some query sees a later key
        _say_once("context parallelism: non-causal or cross-attention runs unsplit (GSPMD)")
        return local(q, k, v, spec, scale=scale, sinks=sinks)
    if t % (layout.shards * layout.per_shard):
        raise ValueError(f"context parallelism: sequence length {t} does not split into "
                         f"{layout.shards * layout.per_shard} chunks")
    tensor = mesh.shape["tensor"]
    if k.shape[2] % tensor and h % tensor == 0:  # kv heads cannot split: give each q head its own
        k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh,
                             ACTIVATION_RULES)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh,
                              ACTIVATION_RULES)
    ids_spec = P(q_spec[0], q_spec[1])
    positions = spec.q_positions
    if positions is None:  # the true positions of the layout's order
        positions = jnp.asarray(layout.order(t))[None]
    positions = jnp.broadcast_to(positions.astype(jnp.int32), (b, t))
    segments = spec.q_segment_ids
    segments = jnp.zeros((b, t), jnp.int32) if segments is None else segments.astype(jnp.int32)
    body = functools.partial(_shard_attention, rule=spec.rule, local=local, scale=scale,
                             layout=layout, impl=impl)
    args, specs = [q, k, v, positions, segments], [q_spec, kv_spec, kv_spec, ids_spec, ids_spec]
    if sinks is not None:
        args.append(sinks)
        specs.append(P(q_spec[2]))
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec,
                         check_vma=False)(*args)


def _shard_attention(q, k, v, positions, segments, sinks=None, *, rule: MaskRule, local,
                     scale, layout: Layout, impl: str):
    """One device's share: its query chunks against the keys they may see."""
    reach = rule.span
    chunk_len = q.shape[1] // layout.per_shard
    if reach is not None and reach - 1 <= chunk_len:
        return _halo_attention(q, k, v, positions, segments, sinks, rule=rule, local=local,
                               scale=scale, layout=layout)
    if reach is not None:
        _say_once(f"context parallelism: span {reach} exceeds a chunk of {chunk_len} tokens; "
                  "this layer fetches all earlier keys like a full layer")
    full = functools.partial(_full_attention, rule=rule, scale=scale, layout=layout,
                             impl=impl)
    # Rematerialised: the backward pass re-fetches the keys rather than keeping the
    # whole sequence's keys and per-pair outputs alive from forward to backward.
    return jax.checkpoint(full)(q, k, v, positions, segments, sinks)


# -- windowed and chunked layers: a halo from the left neighbour ---------------------------

def _chunks(x: jax.Array, per_shard: int) -> jax.Array:
    return x.reshape(x.shape[0], per_shard, x.shape[1] // per_shard, *x.shape[2:])


def exchange_halos(tails: list[jax.Array], layout: Layout) -> list[jax.Array]:
    """tails: arrays [B, slots, W, ...] (each local chunk's last W tokens) -> for every
    local chunk, the last W tokens of the chunk just before it, wherever it lives
    (zeros for the sequence's first chunk)."""
    r = jax.lax.axis_index(AXIS)
    out = [jnp.zeros_like(x) for x in tails]
    for slot in range(layout.per_shard):
        for src_slot in range(layout.per_shard):
            pairs, at_home = [], []
            for dst in range(layout.shards):
                left = layout.left_of(dst, slot)
                if left is None or left[1] != src_slot:
                    continue
                (pairs if left[0] != dst else at_home).append((left[0], dst))
            for i, x in enumerate(tails):
                piece = x[:, src_slot]
                got = jnp.zeros_like(piece)
                if pairs:
                    got = jax.lax.ppermute(piece, AXIS, pairs)
                if at_home:
                    home = jnp.any(r == jnp.asarray([dst for _, dst in at_home]))
                    got = jnp.where(home, piece, got)
                if pairs or at_home:
                    out[i] = out[i].at[:, slot].add(got)
    return out


def _halo_attention(q, k, v, positions, segments, sinks, *, rule: MaskRule, local, scale,
                    layout: Layout):
    b, tl, h, d = q.shape
    m = layout.per_shard
    c = tl // m
    w = rule.span - 1  # keys a query sees before it
    qc, kc, vc, pc, sc = (_chunks(x, m) for x in (q, k, v, positions, segments))
    if w:
        halo_k, halo_v, halo_p, halo_s = exchange_halos(
            [x[:, :, c - w:] for x in (kc, vc, pc, sc)], layout)
        has_left = jnp.asarray([[layout.left_of(r, s) is not None for s in range(m)]
                                for r in range(layout.shards)])[jax.lax.axis_index(AXIS)]
        halo_s = jnp.where(has_left[None, :, None], halo_s, HIDDEN_SEGMENT)
        halo_q = jnp.zeros((b, m, w, h, d), q.dtype)  # dummy queries: outputs are dropped
        qc, kc, vc, pc, sc = (jnp.concatenate([hx, x], axis=2) for hx, x in
                              ((halo_q, qc), (halo_k, kc), (halo_v, vc), (halo_p, pc),
                               (halo_s, sc)))

    def rows(x):  # [B, m, w + c, ...] -> [B * m, w + c, ...]: one kernel call for all chunks
        return x.reshape(b * m, w + c, *x.shape[3:])

    mask = rule.for_tokens(q_segment_ids=rows(sc), kv_segment_ids=rows(sc),
                           q_positions=rows(pc), kv_positions=rows(pc))
    out = local(rows(qc), rows(kc), rows(vc), mask, scale=scale, sinks=sinks)
    return out.reshape(b, m, w + c, h, d)[:, :, w:].reshape(b, tl, h, d)


# -- full causal layers: all keys, by all-gather or ring, online softmax over chunk pairs --

def _pair(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, scale, rule: MaskRule):
    """Attention of one query chunk to one key chunk: (out [B, c, H, D] f32, lse [B, c, H])."""
    b, c, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, c, hkv, h // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    spec = rule.for_tokens(q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos,
                           kv_positions=kv_pos)
    p, lse = masked_softmax(s, dense_mask(spec, c, k.shape[1])[:, None, None])
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32).reshape(b, c, h, d)
    lse = jnp.where(jnp.isfinite(lse), lse, NO_KEYS)  # [B, Hkv, G, c]
    return out, lse.reshape(b, h, c).transpose(0, 2, 1)


def _merge(acc, part):
    """Online softmax: two partial attentions over disjoint keys -> one."""
    (o1, l1), (o2, l2) = acc, part
    lse = jnp.logaddexp(l1, l2)
    return o1 * jnp.exp(l1 - lse)[..., None] + o2 * jnp.exp(l2 - lse)[..., None], lse


def _full_attention(q, k, v, positions, segments, sinks, *, rule: MaskRule, scale,
                    layout: Layout, impl: str):
    b, tl, h, d = q.shape
    n, m = layout.shards, layout.per_shard
    c = tl // m
    r = jax.lax.axis_index(AXIS)
    table = jnp.asarray(layout.table())
    mine = table[r]
    pair = jax.checkpoint(functools.partial(_pair, scale=scale, rule=rule))

    def empty(*args):
        return jnp.zeros((b, c, h, d), jnp.float32), jnp.full((b, c, h), NO_KEYS, jnp.float32)

    qc, pc, sc = (_chunks(x, m) for x in (q, positions, segments))
    acc = [empty() for _ in range(m)]
    kv = (k, v, positions, segments)
    if impl == "allgather":
        gathered = [jax.lax.all_gather(x, AXIS, axis=1, tiled=True) for x in kv]
    for step in range(n):  # at step s this device attends to device (r - s)'s keys
        src = (r - step) % n
        if impl == "allgather":
            kv = tuple(jax.lax.dynamic_slice_in_dim(x, src * tl, tl, axis=1) for x in gathered)
        elif step:
            kv = tuple(jax.lax.ppermute(x, AXIS, [(i, (i + 1) % n) for i in range(n)])
                       for x in kv)
        kc, vc, kpc, ksc = (_chunks(x, m) for x in kv)
        for a in range(m):
            for j in range(m):
                visible = mine[a] >= table[src, j]  # causality hides later chunks entirely
                part = jax.lax.cond(visible, pair, empty, qc[:, a], kc[:, j], vc[:, j],
                                    pc[:, a], kpc[:, j], sc[:, a], ksc[:, j])
                acc[a] = _merge(acc[a], part)
    if sinks is not None:  # a sink joins every denominator and carries no value
        sink = jnp.broadcast_to(sinks.astype(jnp.float32), (b, c, h))
        acc = [_merge(x, (jnp.zeros((b, c, h, d), jnp.float32), sink)) for x in acc]
    return jnp.concatenate([o for o, _ in acc], axis=1).astype(q.dtype)
