"""Small building blocks: parameters with logical axis names, norms, the SwiGLU MLP.

Parameters carry logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp,
layers) as `out_sharding` metadata, activations pass through `constrain(x, names)`;
`hybridlm.parallel` maps the names to mesh axes. The model never shards anything itself,
so eager sharding is off for every parameter and `constrain` is the identity until
parallel/ installs what the names mean (`constraint_resolver`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
Resolver = Callable[[jax.Array, Axes], jax.Array]
_resolver: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "constrain_resolver", default=None)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: Axes, std: float | None,
          dtype=jnp.float32) -> nnx.Param:
    """A parameter drawn from N(0, std^2) truncated at 2 std (std=None: ones)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *in] @ w [*in, *out] as one 2-D matmul.

    Flattening the leading (batch, length) axes into one makes the weight gradient a
    plain matmul; on CPU the 3-D form was ~2x slower in the backward pass.
    """
    lead, k_shape = x.shape[: x.ndim - contract], x.shape[x.ndim - contract:]
    out_shape = w.shape[contract:]
    k = 1
    for n in k_shape:
        k *= n
    y = jnp.dot(x.reshape(-1, k), w.astype(x.dtype).reshape(k, -1))
    return y.reshape(*lead, *out_shape)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Sharding hint by logical axis names: the installed resolver's, or the identity."""
    resolve = _resolver.get()
    return x if resolve is None else resolve(x, axes)


@contextlib.contextmanager
def constraint_resolver(resolve: Resolver | None) -> Iterator[None]:
    """Every `constrain(x, axes)` traced inside this block becomes `resolve(x, axes)`."""
    token = _resolver.set(resolve)
    try:
        yield
    finally:
        _resolver.reset(token)


NORMS = ("rms", "layernorm")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}  # the gate of the MLP (SwiGLU, GeGLU)


class Norm(nnx.Module):
    """RMSNorm, or Cohere's LayerNorm (mean-centred, scale only, no bias)."""

    def __init__(self, dim: int, kind: str, eps: float, axes: Axes, rngs: nnx.Rngs,
                 learnable: bool = True):
        self.kind, self.eps = kind, eps
        self.scale = param(rngs, (dim,), axes, None) if learnable else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        if self.kind == "layernorm":
            xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale[...]
        return y.astype(x.dtype)


class MLP(nnx.Module):
    """Gated MLP: down(act(x @ gate) * (x @ up)), gate and up fused in one matmul."""

    def __init__(self, d_model: int, mlp_dim: int, activation: str, std: float,
                 out_std: float, rngs: nnx.Rngs):
        self.activation = activation
        self.wi = param(rngs, (d_model, 2, mlp_dim), ("embed", None, "mlp"), std)
        self.wo = param(rngs, (mlp_dim, d_model), ("mlp", "embed"), out_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = dense(x, self.wi[...])
        h = ACTIVATIONS[self.activation](gate_up[..., 0, :]) * gate_up[..., 1, :]
        return dense(h, self.wo[...])
