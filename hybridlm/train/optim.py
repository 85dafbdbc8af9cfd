"""Optimizer and learning-rate schedules from the `train` config section.

Schedules (all start with a linear warmup from 0 to the peak over `warmup_steps`):
  cosine    cosine decay to min_lr_ratio x peak at the last step
  wsd       warmup-stable-decay: hold the peak, then decay linearly to min_lr_ratio x peak
            over the last decay_fraction of the steps (MiniCPM; cheap to extend a run)
  constant  hold the peak
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections as mlc
import optax
from flax import nnx

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "wsd", "constant")


def schedule(t: mlc.ConfigDict) -> optax.Schedule:
    """The learning rate as a function of the number of applied updates."""
    steps, peak = max(t.steps, 1), t.learning_rate
    warmup = min(t.warmup_steps, steps - 1)
    end = t.min_lr_ratio * peak
    ramp = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if t.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif t.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(steps - warmup, 1), alpha=t.min_lr_ratio)
    elif t.schedule == "wsd":
        decay = max(min(round(t.decay_fraction * steps), steps - warmup), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)],
            [steps - warmup - decay])
    else:
        raise ValueError(f"unknown schedule {t.schedule!r}")
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(abstract_params: nnx.State) -> dict[str, Any]:
    """True for weights that get weight decay: matrices, judged by their logical axes.

    A stacked norm scale is [layers, embed], 2-D in memory but a vector per layer; counting
    axes other than `layers` keeps it (and sinks, and every norm) out of the decay.
    """
    def is_matrix(var: nnx.Variable) -> bool:
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return sum(1 for name in names if name != "layers") >= 2

    mask = jax.tree.map(lambda v: v.replace(is_matrix(v)), abstract_params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(mask)


def make_optimizer(t: mlc.ConfigDict, mask: Any = None) -> optax.GradientTransformation:
    """Clip the global norm, then AdamW or Adafactor with decoupled weight decay on `mask`."""
    lr = schedule(t)
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    if t.optimizer == "adamw":
        parts.append(optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=mask))
    elif t.optimizer == "adafactor":
        # optax.adafactor adds its weight decay after the learning rate (unscaled by it);
        # build it so the decay is decoupled exactly as in AdamW: lr * wd * p.
        parts += [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                  optax.add_decayed_weights(t.weight_decay, mask),
                  optax.scale_by_learning_rate(lr)]
    else:
        raise ValueError(f"unknown optimizer {t.optimizer!r}")
    return optax.chain(*parts)
