"""Pallas splash attention (the TPU kernel), behind the common attention contract.

Splash skips masked blocks on TPU from a static block map built from its mask objects:
`CausalMask`, `LocalMask` (window), `ChunkedCausalMask`, and `SegmentIds` for packing.
Off TPU it runs in Pallas interpret mode, which is how the tests check it against the
dense oracle on CPU (slowly: keep those cases small).

Traps handled here (see shared STACK_NOTES): splash takes [H, T, D] without a batch
axis (vmapped here), does not scale q (pre-scaled here), needs the backward block
sizes set explicitly, and a window of W keys is `LocalMask((W - 1, 0))`, inclusive.
Block sizes are rounded to multiples of 128 (TPU lanes; splash checks this even in
interpret mode) and lengths padded to a multiple of them; padding sits in its own segment. On TPU,
Mosaic rejects `jax_default_matmul_precision="highest"` with bfloat16 operands ("Bad lhs
type"): leave the global precision at its default when compiling splash for TPU.

Mosaic kernels are opaque to XLA's partitioner, so under a mesh this function must see
one device's arrays: hybridlm/parallel/ runs it inside `jax.shard_map` through the hook
of ops/attention.py (`MANUAL_KERNELS`). The kernel compiles for the mesh's platform, not
the host's, so a TPU mesh of compile-only devices (`hybridlm compile`) gets the real
Mosaic kernel on a CPU machine.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mi

from hybridlm.ops.masks import MaskRule, MaskSpec

PAD_SEGMENT = -1  # segment id of padding keys: no real query shares it
LANES = 128  # splash tiles are multiples of the TPU lane width, in interpret mode too


def unsupported(q: jax.Array, k: jax.Array, spec: MaskSpec, sinks) -> str | None:
    """Why splash cannot compute this case exactly, or None when it can."""
    del sinks  # splash takes per-head sinks
    if not spec.uses_only("causal", "window", "chunk"):
        return f"a mask rule beyond causal, window and chunk ({spec.rule})"
    if q.shape[1] != k.shape[1]:
        return "query and key lengths differ (splash here is self-attention only)"
    if spec.chunk is not None and not spec.causal:
        return "a non-causal chunk (splash has only ChunkedCausalMask)"
    if spec.chunk is not None and (spec.q_positions is not None or
                                   spec.q_segment_ids is not None):
        return ("a chunk with positions or packed segments (chunk boundaries follow "
                "positions; splash masks see only sequence indices)")
    return None


def _mask(rule: MaskRule, length: int, heads: int) -> sm.MultiHeadMask:
    shape = (length, length)
    if rule.chunk is not None:
        mask = sm.ChunkedCausalMask(shape, rule.chunk)
        if rule.window is not None:
            mask = sm.LogicalAnd(mask, sm.LocalMask(shape, (rule.window - 1, 0), 0))
    elif rule.window is not None:
        right = 0 if rule.causal else rule.window - 1
        mask = sm.LocalMask(shape, (rule.window - 1, right), 0)
    elif rule.causal:
        mask = sm.CausalMask(shape)
    else:
        mask = sm.FullMask(shape)
    return sm.MultiHeadMask([mask] * heads)


@functools.lru_cache(maxsize=64)
def _kernel(rule: MaskRule, length: int, heads: int, block_q: int, block_kv: int,
            interpret: bool):
    sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                          block_q_dkv=block_q, block_kv_dkv=block_kv,
                          block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                          block_kv_dq=block_kv)

    def build():
        return sk.make_splash_mha(_mask(rule, length, heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)

    # The mask tables must be concrete host arrays, safe to cache across traces. JAX's trace
    # and mesh contexts are thread-local: a fresh thread builds them outside both (inside a
    # TPU mesh of compile-only devices, eager arrays would have nowhere to live).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(build).result()


def tiles(block_q: int, block_kv: int, t: int) -> tuple[int, int, int]:
    """(block_q, block_kv, padded length) that splash uses for these requested sizes."""
    bq, bk = (max(LANES, block // LANES * LANES) for block in (block_q, block_kv))
    tile = math.lcm(bq, bk)
    return bq, bk, -(-t // tile) * tile  # both block sizes must divide the padded length


def visited_blocks(rule: MaskRule, t: int, block_q: int = 512,
                   block_kv: int = 512) -> tuple[int, int, int]:
    """(blocks the forward kernel computes, block_q, block_kv) for one head and sequence:
    the work XLA's cost analysis cannot see inside the kernel.

    Splash visits a block when its mask is not all zeros. For causal and window masks that
    is interval arithmetic on the block's first and last query and key (what splash's own
    block map says, checked in tests; building that map takes minutes at 128k); chunked
    masks are counted from splash's map itself.
    """
    bq, bk, length = tiles(block_q, block_kv, t)
    if rule.chunk is not None:
        info, _ = mi.process_mask(_mask(rule, length, 1), (bq, bk), shrink_grid=False)
        return int((info.block_mask != 0).sum()), bq, bk
    q_first = np.arange(length // bq)[:, None] * bq
    k_first = np.arange(length // bk)[None, :] * bk
    q_last, k_last = q_first + bq - 1, k_first + bk - 1
    lo, hi = rule.visible_offsets()  # keys p - hi .. p - lo
    left, right = hi, -lo
    visited = (k_first <= q_last + right) & (k_last >= q_first - left)
    return int(visited.sum()), bq, bk


def _target_platform() -> str:
    """The platform the current trace compiles for: the mesh's devices when a mesh is set."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *,
                     scale: float, sinks: jax.Array | None = None, block_q: int = 512,
                     block_kv: int = 512) -> jax.Array:
    """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]; interpret mode off TPU."""
    q_seg, kv_seg = (None if x is None else x.astype(jnp.int32)
                     for x in (spec.q_segment_ids, spec.kv_segment_ids))
    return _splash_local(q, k, v, q_seg, kv_seg, sinks,
                         rule=spec.rule, scale=scale,
                         block_q=block_q, block_kv=block_kv,
                         interpret=_target_platform() != "tpu")


def _splash_local(q, k, v, q_seg, kv_seg, sinks, *, rule: MaskRule, scale: float, block_q: int,
                  block_kv: int, interpret: bool) -> jax.Array:
    """The kernel on the arrays it is given (one device's share under a mesh)."""
    b, t, h, _ = q.shape
    bq, bk, length = tiles(block_q, block_kv, t)
    if q_seg is None and length != t:  # padding needs a segment of its own
        q_seg = kv_seg = jnp.zeros((b, t), jnp.int32)
    if q_seg is not None:
        q_seg, kv_seg = (jnp.pad(x, ((0, 0), (0, length - t)), constant_values=PAD_SEGMENT)
                         for x in (q_seg, kv_seg))

    def heads_first(x):
        return jnp.pad(x, ((0, 0), (0, length - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q_scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)
    kernel = _kernel(rule, length, h, bq, bk, interpret)

    def one(qi, ki, vi, ids):
        return kernel(qi, ki, vi, segment_ids=ids, sinks=sinks)

    ids = None if q_seg is None else sk.SegmentIds(q=q_seg, kv=kv_seg)
    out = jax.vmap(one)(heads_first(q_scaled), heads_first(k), heads_first(v), ids)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
