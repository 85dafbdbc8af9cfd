"""Optimizer and learning-rate schedule from the `train` config section."""

from __future__ import annotations

import jax
import ml_collections as mlc
import optax


def schedule(t: mlc.ConfigDict) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to 10% of it at the last step."""
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
        decay_steps=max(t.steps, warmup + 1), end_value=0.1 * t.learning_rate)


def decay_mask(params):
    """Weight decay on matrices only (not on norm scales, sinks or other vectors)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(t: mlc.ConfigDict) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    parts.append(optax.adamw(schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
