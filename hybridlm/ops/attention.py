"""`attention(q, k, v, spec, impl)`: one entry point, several kernels.

Shapes: q [B, T, H, D], k and v [B, S, Hkv, D] with H a multiple of Hkv (GQA: query
head h reads key/value head h // (H // Hkv)). The model calls only this function;
which kernel runs is a config choice (`model.attention_impl`), never model code.

    dense      the oracle: full T x S scores, masked (O(T^2) time and memory)
    blockwise  flash-style pure JAX that computes only blocks the mask reaches
    cudnn      cuDNN flash attention on NVIDIA GPUs
    splash     Pallas splash attention on TPU (interpret mode elsewhere, for tests)
    auto       splash on TPU, cudnn on NVIDIA GPUs, blockwise elsewhere

A kernel that cannot express a case (cuDNN and packing, say) hands it to blockwise
and says so once in the log.

Tiles: `block_q` / `block_kv` given to `attention` win; otherwise those of the innermost
`kernel_tiles(block_q, block_kv)` block the call is traced in (whoever runs the model
installs the config's `model.attention_block_q/kv` there); otherwise each kernel's default.

Parallelism hook: code that runs the model over a device mesh installs a handler with
`parallel_attention(handler)` around tracing. `attention` then calls
`handler(q, k, v, spec, local=..., scale=..., sinks=...)` instead of a kernel; `local` is
this module's kernel dispatch with the kernel (`local.impl`) and tiles bound, for the
handler to run on each device's shard (hybridlm/parallel/: context parallelism splits
the sequence this way, and kernels XLA cannot partition, `MANUAL_KERNELS`, run per
device). Without a handler nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from hybridlm.ops import cudnn, splash
from hybridlm.ops.blockwise import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, blockwise_attention
from hybridlm.ops.masks import MaskSpec, dense_mask
from hybridlm.ops.softmax import masked_softmax

IMPLS = ("auto", "dense", "blockwise", "cudnn", "splash")
MANUAL_KERNELS = ("splash",)  # Mosaic kernels: XLA's partitioner cannot split them
log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()
_handler: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "attention_parallel_handler", default=None)
_tiles: contextvars.ContextVar[tuple[int | None, int | None]] = contextvars.ContextVar(
    "attention_tiles", default=(None, None))


def dense_attention(q, k, v, spec: MaskSpec, *, scale: float, sinks=None) -> jax.Array:
    """The oracle: full [T, S] scores, masked, softmax in float32.

    Rows that see no key return zeros. `sinks` ([H], optional) is a learned logit
    per head that joins every softmax denominator and carries no value (GPT-OSS).
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    mask = dense_mask(spec, t, k.shape[1])[:, None, None]  # [B|1, 1, 1, T, S]
    sink = None if sinks is None else sinks.reshape(1, hkv, h // hkv, 1, 1)
    probs, _ = masked_softmax(scores, mask, sink)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


_KERNELS: dict[str, Callable] = {"dense": dense_attention, "blockwise": blockwise_attention,
                                  "cudnn": cudnn.cudnn_attention,
                                  "splash": splash.splash_attention}
_UNSUPPORTED = {"cudnn": cudnn.unsupported, "splash": splash.unsupported}


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """The kernel `impl` names on this platform: `auto` is splash on TPU, cudnn on
    NVIDIA GPUs, blockwise elsewhere."""
    if impl == "auto":
        backend = backend or jax.default_backend()
        if backend == "tpu":
            return "splash"
        if backend == "gpu" and cudnn.on_nvidia_gpu():
            return "cudnn"
        return "blockwise"
    if impl not in _KERNELS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    return impl


def _fall_back(impl: str, reason: str) -> str:
    if (impl, reason) not in _logged:
        _logged.add((impl, reason))
        log.warning("attention: %s cannot handle %s; using blockwise for this case", impl,
                    reason)
    return "blockwise"


@contextlib.contextmanager
def parallel_attention(handler: Callable | None) -> Iterator[None]:
    """Route every `attention` call traced inside this block through `handler`."""
    token = _handler.set(handler)
    try:
        yield
    finally:
        _handler.reset(token)


@contextlib.contextmanager
def kernel_tiles(block_q: int | None, block_kv: int | None) -> Iterator[None]:
    """Tile sizes of every `attention` call traced inside this block (None: the default).

    Read at trace time, so, like the handler, it is not part of jit's cache key: a function
    already traced elsewhere keeps the tiles it was traced with.
    """
    token = _tiles.set((block_q, block_kv))
    try:
        yield
    finally:
        _tiles.reset(token)


@dataclasses.dataclass(frozen=True)
class LocalKernel:
    """`impl`'s kernel with its tiles bound, on arrays this device sees whole."""

    impl: str  # the kernel resolved for this platform (before any per-case fallback)
    block_q: int | None = None
    block_kv: int | None = None

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *,
                 scale: float, sinks: jax.Array | None = None) -> jax.Array:
        return local_attention(q, k, v, spec, impl=self.impl, scale=scale, sinks=sinks,
                               block_q=self.block_q, block_kv=self.block_kv)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, impl: str = "auto",
              *, scale: float | None = None, sinks: jax.Array | None = None,
              block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """Masked multi-head attention; returns [B, T, H, D] in q's dtype.

    block_q / block_kv: tile sizes for blockwise and splash (None: `kernel_tiles`'s, else
    the kernel's defaults).
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q [B,T,H,D], k=v [B,S,Hkv,D]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} disagree (batch, head_dim, "
                         "or heads not a multiple of kv heads)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tile_q, tile_kv = _tiles.get()
    local = LocalKernel(resolve_impl(impl), block_q or tile_q, block_kv or tile_kv)
    handler = _handler.get()
    if handler is not None:
        return handler(q, k, v, spec, local=local, scale=scale, sinks=sinks)
    return local(q, k, v, spec, scale=scale, sinks=sinks)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *,
                    impl: str, scale: float, sinks: jax.Array | None = None,
                    block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """The kernel `impl` resolves to, on arrays this device sees whole."""
    name = resolve_impl(impl)
    if name in _UNSUPPORTED:
        reason = _UNSUPPORTED[name](q, k, spec, sinks)
        if reason is not None:
            name = _fall_back(name, reason)
    kernel = _KERNELS[name]
    if name in ("blockwise", "splash"):
        blocks = dict(block_q=block_q or DEFAULT_BLOCK_Q, block_kv=block_kv or DEFAULT_BLOCK_KV)
        return kernel(q, k, v, spec, scale=scale, sinks=sinks, **blocks)
    return kernel(q, k, v, spec, scale=scale, sinks=sinks)
