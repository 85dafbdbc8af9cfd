"""Reference for bench/induction/control.py: a pre-norm transformer in plain JAX (RoPE,
causal softmax attention, SwiGLU MLP, tied embeddings), the same rows and optimizer.

    python bench/induction/reference.py LR STEPS T NMIN NMAX ALPHABET DISTINCT BATCH LAYERS D
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from control import rows

VOCAB, HEADS = 260, 4


def init(layers, d):
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 1 + 6 * layers))
    out_std = 0.02 / np.sqrt(2 * layers)

    def normal(shape, std=0.02):
        return jax.random.normal(next(keys), shape) * std

    return {"emb": normal((VOCAB, d)), "final": jnp.ones(d), "layers": [
        {"wq": normal((d, d)), "wk": normal((d, d)), "wv": normal((d, d)),
         "wo": normal((d, d), out_std), "wi": normal((d, 8 * d)),
         "wout": normal((4 * d, d), out_std), "g1": jnp.ones(d), "g2": jnp.ones(d)}
        for _ in range(layers)]}


def rms(x, gain):
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * gain


def rope(x):
    hd = x.shape[-1]
    angles = jnp.arange(x.shape[1])[:, None] * 10000.0 ** (-jnp.arange(0, hd, 2) / hd)
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x1, x2 = jnp.split(x, 2, -1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def forward(p, tokens):
    h = p["emb"][tokens]
    b, t, d = h.shape
    causal = jnp.tril(jnp.ones((t, t), bool))
    for layer in p["layers"]:
        y = rms(h, layer["g1"])
        q, k, v = [(y @ layer[w]).reshape(b, t, HEADS, d // HEADS) for w in ("wq", "wk", "wv")]
        scores = jnp.einsum("bqhd,bkhd->bhqk", rope(q), rope(k)) / np.sqrt(d // HEADS)
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), -1)
        h = h + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d) @ layer["wo"]
        gate, up = jnp.split(rms(h, layer["g2"]) @ layer["wi"], 2, -1)
        h = h + (jax.nn.silu(gate) * up) @ layer["wout"]
    return rms(h, p["final"]) @ p["emb"].T


def main(argv):
    lr, (steps, length, nmin, nmax, alphabet, distinct, batch, layers, d) = float(argv[0]), map(
        int, argv[1:])
    params = init(layers, d)
    decay = jax.tree.map(lambda v: v.ndim == 2, params)
    schedule = optax.warmup_cosine_decay_schedule(0, lr, 30, steps, lr / 10)
    tx = optax.adamw(schedule, b2=0.95, weight_decay=0.1, mask=decay)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, repeated):
        def loss_fn(params):
            logits = forward(params, x[:, :-1])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
            hit = (logits.argmax(-1) == x[:, 1:]) * repeated
            return loss.mean(), hit.sum() / repeated.sum()
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss, acc

    rng, t0 = np.random.default_rng(0), time.time()
    for i in range(1, steps + 1):
        x, repeated = rows(rng, batch, length, nmin, nmax, alphabet, distinct)
        params, opt, loss, acc = step(params, opt, jnp.asarray(x), jnp.asarray(repeated))
        if i % 50 == 0:
            print(i, f"loss {float(loss):.3f} rep_acc {float(acc):.3f}",
                  f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
