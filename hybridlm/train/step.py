"""The pure training step: loss, gradients, optimizer update. No NNX graph work inside
beyond one `nnx.merge` at trace time."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy in float32 over positions with weight > 0."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if weights is None:
        return losses.mean()
    weights = weights.astype(jnp.float32)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def loss_fn(params, graphdef: nnx.GraphDef, batch: dict[str, Any]) -> jax.Array:
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    return cross_entropy(logits, batch["targets"], batch.get("weights"))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """(params, opt_state), batch -> (params, opt_state), metrics."""

    def train_step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    return lambda params, batch: loss_fn(params, graphdef, batch)
