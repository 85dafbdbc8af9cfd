"""cuDNN flash attention on NVIDIA GPUs, through `jax.nn.dot_product_attention`.

cuDNN skips masked tiles for causal masks and causal sliding windows, which is all
the paper's stack needs. Packed documents (segment ids) go to cuDNN's packed layout:
each row's runs of equal segment id become (offset, length) pairs, so no document sees
another and no cross-document tile is computed. cuDNN supports that layout from Hopper
(compute capability 9.0) on, through JAX's internal cuDNN entry point (the public
`jax.nn.dot_product_attention` takes no segments). What cuDNN cannot express exactly here
(chunks, sink logits, float32, non-causal windows, packing before Hopper) is reported by
`limitation()`; `ops.attention` then falls back to `blockwise` and logs it once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybridlm.ops.blockwise import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, blockwise_attention
from hybridlm.ops.masks import MaskSpec

DTYPES = (jnp.bfloat16, jnp.float16)
# Documents per row that cuDNN's packed layout is built for. Its memory grows with this
# bound (at T=8192 a bound of T asked for 1 TiB on an H100); a batch with a row of more
# documents runs blockwise instead (one lax.cond, both kernels compiled; blockwise loops
# over its blocks, so its program, and the compile, do not grow with T).
MAX_SEGMENTS = 16


def on_nvidia_gpu() -> bool:
    """True when JAX's default backend is CUDA."""
    if jax.default_backend() != "gpu":
        return False
    return "cuda" in getattr(jax.devices()[0].client, "platform_version", "").lower()


def packing_supported() -> bool:
    """cuDNN's packed layout needs compute capability 9.0 (Hopper) or later."""
    if not on_nvidia_gpu():
        return False
    major, *_ = str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")
    return int(major) >= 9


def limitation(q_shape: tuple[int, ...], k_shape: tuple[int, ...], dtype, spec: MaskSpec,
               has_sinks: bool, packing: bool = False) -> str | None:
    """What in this case cuDNN flash attention cannot do, or None. Platform-independent:
    `packing` says whether the device takes cuDNN's packed layout (Hopper or later)."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
        return f"{jnp.dtype(dtype).name} inputs (cuDNN flash attention takes bfloat16/float16)"
    if spec.q_segment_ids is not None and not packing:
        return "packed segments (segment ids) before Hopper (cuDNN's packed layout needs sm_90)"
    if spec.chunk is not None:
        return "chunked attention"
    if not spec.uses_only("causal", "window"):
        return f"a mask rule beyond causal and window ({spec.rule})"
    if has_sinks:
        return "sink logits"
    if spec.window is not None and not spec.causal:
        return "a non-causal window (cuDNN once let such windows see the future)"
    if q_shape[1] != k_shape[1]:
        return "query and key lengths differ"
    head_dim = q_shape[3]
    if head_dim % 8 or head_dim > 256:
        return f"head_dim {head_dim} (cuDNN needs a multiple of 8, at most 256)"
    return None


def unsupported(q: jax.Array, k: jax.Array, spec: MaskSpec, sinks) -> str | None:
    """Why the cudnn kernel cannot run this case here, or None when it can."""
    if not on_nvidia_gpu():
        return f"no NVIDIA GPU (JAX backend: {jax.default_backend()})"
    return limitation(q.shape, k.shape, q.dtype, spec, sinks is not None,
                      packing=spec.q_segment_ids is not None and packing_supported())


def packed_layout(segment_ids: jax.Array, max_segments: int | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, T] segment ids -> cuDNN's packed description of each row.

    Every run of equal ids is one segment: `lengths` [B, M] holds the runs' lengths
    left-aligned, `offsets` [B, M + 1] their start indices; unused entries are -1.
    M = max_segments (default T, which always suffices); `count` [B] is each row's
    number of runs, so a caller can tell when M was too small.
    """
    b, t = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    count = jnp.sum(starts, axis=1, keepdims=True)
    slot = jnp.arange(t)[None, :]
    # Start indices in order, left-aligned: a stable sort puts the starts first.
    first = jnp.argsort(~starts, axis=1, stable=True).astype(jnp.int32)
    end = jnp.where(slot + 1 < count, jnp.roll(first, -1, axis=1), t)
    used = slot < count
    lengths = jnp.where(used, end - first, -1).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.where(used, first, -1),
                               jnp.full((b, 1), -1, jnp.int32)], axis=1)
    m = t if max_segments is None else min(max_segments, t)
    return lengths[:, :m], jnp.concatenate([offsets[:, :m], offsets[:, -1:]], 1), count[:, 0]


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *,
                    scale: float, sinks: jax.Array | None = None, **_) -> jax.Array:
    """A window of W keys is local_window_size=(W - 1, 0): inclusive offsets."""
    assert sinks is None, "cudnn has no sink logits; ops.attention falls back first"
    if spec.q_segment_ids is not None:
        return _packed(q, k, v, spec, scale)
    window = None if spec.window is None else (spec.window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=spec.causal,
                                        local_window_size=window, implementation="cudnn")


def _packed(q, k, v, spec: MaskSpec, scale: float) -> jax.Array:
    """Packed rows through cuDNN's segment offsets (sliding_window_length counts the
    query's own key, like our window); blockwise when a row holds > MAX_SEGMENTS."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

    q_lengths, q_offsets, q_count = packed_layout(spec.q_segment_ids, MAX_SEGMENTS)
    kv_lengths, kv_offsets, kv_count = packed_layout(spec.kv_segment_ids, MAX_SEGMENTS)
    mask = (cudnn_fmha.MaskType.PADDING_CAUSAL if spec.causal
            else cudnn_fmha.MaskType.PADDING)

    def fused(q, k, v):
        return cudnn_fmha.dot_product_attention(
            q, k, v, q_seqlen=q_lengths, kv_seqlen=kv_lengths, q_offsets=q_offsets,
            kv_offsets=kv_offsets, scale=scale, mask_type=mask,
            sliding_window_length=spec.window)

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, spec, scale=scale, block_q=DEFAULT_BLOCK_Q,
                                   block_kv=DEFAULT_BLOCK_KV, keep_probs=False)

    if max(q.shape[1], k.shape[1]) <= MAX_SEGMENTS:  # no row can hold more documents
        return fused(q, k, v)
    fits = jnp.maximum(jnp.max(q_count), jnp.max(kv_count)) <= MAX_SEGMENTS
    return jax.lax.cond(fits, fused, blockwise, q, k, v)
