"""The pure training and evaluation steps: functions of (state, batch), jitted once.

The train state is a plain pytree (what a checkpoint stores):

    step         loop steps done (skipped ones included): which batch comes next
    params       the model's parameters as a pure dict (`nnx.to_pure_dict`)
    opt_state    optax state
    applied      updates applied (the learning-rate schedule's clock)
    nan_streak   non-finite losses in a row; nan_skipped: in total

The model is rebuilt from the graph definition with `nnx.merge` at trace time only; no NNX
graph work runs per step. A batch is a dict of [B, T] arrays: inputs, targets, positions,
segment_ids (0 = padding) and weights (0 = not counted in the loss).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hybridlm.model.layers import constrain
from hybridlm.ops.cross_entropy import chunked_cross_entropy, softmax_cross_entropy

Batch = dict[str, jax.Array]
State = dict[str, Any]
# Logits bytes per device per chunk of the fused loss (train.loss_chunk=-1). On CPU, below
# glibc's 32 MiB mmap threshold: larger buffers are mapped and page-faulted afresh on every
# call (docs/performance.md).
LOGITS_CHUNK_BYTES = {"cpu": 8 << 20, "default": 1 << 30}


def loss_sums(params, graphdef: nnx.GraphDef, batch: Batch, z_loss: float = 0.0,
              loss_chunk: int = 0,
              unroll: bool = False) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(objective summed over tokens, (cross-entropy sum, weight sum)).

    Sums rather than means, so that microbatches add up to exactly the full batch.
    `loss_chunk` > 0: the LM head and loss are fused over chunks of that many positions
    (`hybridlm.ops.cross_entropy`), never holding the whole batch's logits; 0: the logits
    are formed whole and differentiated by autodiff (the reference the fused path is
    tested against). `unroll` unrolls the chunk loop (for XLA's cost analysis).
    """
    model = nnx.merge(graphdef, params)
    weights = batch["weights"].astype(jnp.float32)
    if loss_chunk:
        h = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
        objective, ce_sum = chunked_cross_entropy(
            h, model.head_weight(), batch["targets"], weights, chunk=loss_chunk,
            logit_scale=model.logit_scale, z_loss=z_loss, unroll=unroll)
        return objective, (ce_sum, jnp.sum(weights))
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    ce, log_z, _ = softmax_cross_entropy(logits.astype(jnp.float32), batch["targets"])
    ce_sum = jnp.sum(ce * weights)
    objective = ce_sum + z_loss * jnp.sum(jnp.square(log_z) * weights) if z_loss else ce_sum
    return objective, (ce_sum, jnp.sum(weights))


def auto_loss_chunk(length: int, floats_per_position: float, platform: str) -> int:
    """The largest divisor of `length` whose float32 logits chunk fits the platform's
    budget (`LOGITS_CHUNK_BYTES`); `floats_per_position` is what one position of a chunk
    costs a device: its rows x its share of the vocabulary / the context shards."""
    budget = LOGITS_CHUNK_BYTES.get(platform, LOGITS_CHUNK_BYTES["default"])
    fits = [c for c in range(1, length + 1)
            if length % c == 0 and c * floats_per_position * 4 <= budget]
    return max(fits, default=1)


def microbatches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...] where microbatch i holds rows i, i+k, i+2k, ...

    Taking every k-th row keeps each device's share of every microbatch on that device
    (the batch is split over devices in contiguous blocks of rows).
    """
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch", "length"))

    return jax.tree.map(split, batch)


def gradients(params, graphdef: nnx.GraphDef, batch: Batch, *, grad_accum: int,
              z_loss: float, loss_chunk: int = 0,
              unroll: bool = False) -> tuple[Any, jax.Array, jax.Array]:
    """(gradient of the summed objective, cross-entropy sum, weight sum) over the batch,
    accumulated over `grad_accum` microbatches."""
    grad_fn = functools.partial(jax.value_and_grad(loss_sums, has_aux=True),
                                loss_chunk=loss_chunk, unroll=unroll)
    if grad_accum == 1:
        (_, (ce_sum, w_sum)), grads = grad_fn(params, graphdef, batch, z_loss)
        return grads, ce_sum, w_sum

    def body(carry, micro):
        grads, ce_sum, w_sum = carry
        (_, (ce, w)), g = grad_fn(params, graphdef, micro, z_loss)
        return (jax.tree.map(jnp.add, grads, g), ce_sum + ce, w_sum + w), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), zero, zero)
    (grads, ce_sum, w_sum), _ = jax.lax.scan(body, init, microbatches(batch, grad_accum))
    return grads, ce_sum, w_sum


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, *, grad_accum: int = 1,
                    z_loss: float = 0.0, loss_chunk: int = 0,
                    unroll: bool = False) -> Callable[[State, Batch], tuple[State, dict]]:
    """state, batch -> new state, metrics. A non-finite loss or gradient skips the update
    (parameters and optimizer state stay as they were) and is counted. `loss_chunk` and
    `unroll`: see `loss_sums`."""

    def train_step(state: State, batch: Batch) -> tuple[State, dict]:
        params, opt_state = state["params"], state["opt_state"]
        grads, ce_sum, w_sum = gradients(params, graphdef, batch, grad_accum=grad_accum,
                                         z_loss=z_loss, loss_chunk=loss_chunk, unroll=unroll)
        w_sum = jnp.maximum(w_sum, 1.0)
        grads = jax.tree.map(lambda g: g / w_sum, grads)
        loss, grad_norm = ce_sum / w_sum, optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        bad = 1 - finite.astype(jnp.int32)
        new_state = {
            "step": state["step"] + 1,
            "params": keep_if_finite(new_params, params),
            "opt_state": keep_if_finite(new_opt_state, opt_state),
            "applied": state["applied"] + 1 - bad,
            "nan_streak": (state["nan_streak"] + 1) * bad,
            "nan_skipped": state["nan_skipped"] + bad,
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state["applied"]),
                   "nan_streak": new_state["nan_streak"],
                   "nan_skipped": new_state["nan_skipped"]}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef,
                   loss_chunk: int = 0) -> Callable[[Any, Batch], tuple[jax.Array, ...]]:
    """params, batch -> (cross-entropy sum, weight sum)."""

    def eval_step(params, batch: Batch) -> tuple[jax.Array, jax.Array]:
        return loss_sums(params, graphdef, batch, loss_chunk=loss_chunk)[1]

    return eval_step
