"""Does the hybridlm Transformer learn induction? A plain optax loop, no trainer, no pipeline.

    python bench/induction/control.py VARIANT LR STEPS T NMIN NMAX ALPHABET DISTINCT BATCH \
        LAYERS D

Rows: BOS, then a random string of NMIN..NMAX symbols (from ALPHABET symbols; DISTINCT=1: no
symbol twice) repeated to T tokens; loss on every token. `rep_acc` is the argmax accuracy on
the repeated positions: chance (~1/ALPHABET) until the model looks back and copies.
bench/induction/reference.py is the same loop around a transformer written in plain JAX.
Results (2 shared CPU cores, 2026-12-03): bench/results/induction-controls-2026-12-03.txt.
"""

import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hybridlm import config as config_lib
from hybridlm.model import Transformer


def rows(rng, batch, length, nmin, nmax, alphabet, distinct):
    """[batch, length + 1] tokens and [batch, length] 1.0 where the target is a repeat."""
    out = np.zeros((batch, length + 1), np.int32)
    repeated = np.zeros((batch, length), np.float32)
    for i in range(batch):
        period = int(rng.integers(nmin, nmax + 1))
        s = rng.choice(np.arange(33, 33 + alphabet), size=period, replace=not distinct)
        out[i] = np.concatenate([[259], np.tile(s, length // period + 1)])[:length + 1]
        repeated[i, period:] = 1
    return out, repeated


def main(argv):
    variant, lr, steps, length, nmin, nmax, alphabet, distinct, batch, layers, d = argv
    lr, (steps, length, nmin, nmax, alphabet, distinct, batch, layers, d) = float(lr), map(
        int, (steps, length, nmin, nmax, alphabet, distinct, batch, layers, d))
    cfg = config_lib.load(
        f"configs/paper.py:variant={variant},size=tiny,seq_len={length},window=64",
        [f"model.d_model={d}", "model.num_heads=4", "model.num_kv_heads=4",
         f"model.head_dim={d // 4}", f"model.mlp_dim={4 * d}", "model.vocab_size=260",
         "model.attention_impl=dense", f"model.num_layers={layers}"])
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg.model.to_dict(), rngs=nnx.Rngs(params=0))
    schedule = optax.warmup_cosine_decay_schedule(0, lr, 30, steps, lr / 10)
    opt = nnx.Optimizer(model, optax.adamw(schedule, b2=0.95, weight_decay=0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, repeated):
        def loss_fn(m):
            logits = m(x[:, :-1])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
            hit = (logits.argmax(-1) == x[:, 1:]).astype(jnp.float32)
            return loss.mean(), (hit * repeated).sum() / repeated.sum()
        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, acc

    rng, t0 = np.random.default_rng(0), time.time()
    for i in range(1, steps + 1):
        x, repeated = rows(rng, batch, length, nmin, nmax, alphabet, distinct)
        loss, acc = step(model, opt, jnp.asarray(x), jnp.asarray(repeated))
        if i % 50 == 0:
            print(i, f"loss {float(loss):.3f} rep_acc {float(acc):.3f}",
                  f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
