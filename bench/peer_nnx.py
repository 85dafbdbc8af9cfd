"""A plain Flax NNX transformer, written the usual way, as a same-machine stand-in for peers.

STACK_NOTES.md: MaxText, levanter and a plain Flax NNX model all ran the reference config at
~2.2 s/step on this machine when its 2048^3 matmul ran at ~400 GFLOP/s. This is such a
plain model (nnx.Linear on 3-D activations, separate q/k/v and gate/up projections,
`jax.nn.dot_product_attention` with is_causal, a tied head), trained with the same AdamW in
one jitted pure step (split once, merge inside), so timing it next to hybridlm on the same
machine at the same time gives the peers' speed under today's conditions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def rope(x: jax.Array, theta: float = 10_000.0) -> jax.Array:
    t, d = x.shape[1], x.shape[-1]
    inv = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv  # [T, D/2]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, head_dim: int, mlp: int, rngs: nnx.Rngs):
        self.heads, self.head_dim = heads, head_dim
        linear = dict(use_bias=False, rngs=rngs)
        self.norm1, self.norm2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.q, self.k, self.v = (nnx.Linear(d, heads * head_dim, **linear) for _ in range(3))
        self.o = nnx.Linear(heads * head_dim, d, **linear)
        self.gate, self.up = nnx.Linear(d, mlp, **linear), nnx.Linear(d, mlp, **linear)
        self.down = nnx.Linear(mlp, d, **linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        h = self.norm1(x)
        split = (b, t, self.heads, self.head_dim)
        q, k = rope(self.q(h).reshape(split)), rope(self.k(h).reshape(split))
        v = self.v(h).reshape(split)
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        x = x + self.o(attn.reshape(b, t, -1))
        h = self.norm2(x)
        return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class PlainLM(nnx.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, head_dim: int, mlp: int,
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, head_dim, mlp, rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.norm(x))


def make_step(seq_len: int, batch: int, vocab: int = 8192, d: int = 256, layers: int = 4,
              heads: int = 4, head_dim: int = 64, mlp: int = 1024):
    """(compiled step, state, batch) for the plain model at the reference shape."""
    model = PlainLM(vocab, d, layers, heads, head_dim, mlp, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, b2=0.95,
                                                                 weight_decay=0.1))

    def loss_fn(params, inputs, targets):
        logits = nnx.merge(graphdef, params)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def step(state, inputs, targets):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, vocab)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    state = (params, tx.init(params))
    compiled = jax.jit(step, donate_argnums=0).lower(state, inputs, targets).compile()
    return compiled, state, (inputs, targets)
