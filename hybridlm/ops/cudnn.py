"""cuDNN flash attention on NVIDIA GPUs, through `jax.nn.dot_product_attention`.

cuDNN skips masked tiles for causal masks and causal sliding windows, which is all
the paper's stack needs on unpacked batches. What it cannot express exactly here
(packed segments, chunks, sink logits, float32, non-causal windows) is reported by
`limitation()`; `ops.attention` then falls back to `blockwise` and logs it once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybridlm.ops.masks import MaskSpec

DTYPES = (jnp.bfloat16, jnp.float16)


def on_nvidia_gpu() -> bool:
    """True when JAX's default backend is CUDA."""
    if jax.default_backend() != "gpu":
        return False
    return "cuda" in getattr(jax.devices()[0].client, "platform_version", "").lower()


def limitation(q_shape: tuple[int, ...], k_shape: tuple[int, ...], dtype, spec: MaskSpec,
               has_sinks: bool) -> str | None:
    """What in this case cuDNN flash attention cannot do, or None. Platform-independent."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
        return f"{jnp.dtype(dtype).name} inputs (cuDNN flash attention takes bfloat16/float16)"
    if spec.q_segment_ids is not None:
        return "packed segments (segment ids)"
    if spec.chunk is not None:
        return "chunked attention"
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
    return limitation(q.shape, k.shape, q.dtype, spec, sinks is not None)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *,
                    scale: float, sinks: jax.Array | None = None, **_) -> jax.Array:
    """A window of W keys is local_window_size=(W - 1, 0): inclusive offsets."""
    assert sinks is None, "cudnn has no sink logits; ops.attention falls back first"
    window = None if spec.window is None else (spec.window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=spec.causal,
                                        local_window_size=window, implementation="cudnn")
