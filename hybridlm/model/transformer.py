"""The decoder: embeddings, pattern groups of blocks scanned over depth, the LM head.

A block is pre-norm, sequential (x + attn, then x + mlp) or parallel (Cohere: attention
and MLP read the same normed input and both add to x). One *group* holds one block per
pattern entry (e.g. local, local, local, global); the decoder scans one group's code
over the stacked parameters of all groups, so compile time stays flat as depth grows.
`scan_layers=False` unrolls the same loop (same parameters, same numbers), which XLA's
cost analysis needs to count every layer. Layers past the last full group (a depth that
is not a multiple of the pattern) form a short unstacked tail group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hybridlm.model.attention import Attention
from hybridlm.model.layers import MLP, Norm, constrain, dense, param
from hybridlm.model.pattern import LayerSpec, group_specs

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Block(nnx.Module):
    def __init__(self, cfg: Mapping[str, Any], spec: LayerSpec, rngs: nnx.Rngs):
        d, std = cfg["d_model"], cfg["init_std"]
        out_std = std / math.sqrt(2 * cfg["num_layers"])
        self.parallel = cfg["block"] == "parallel"
        norm = dict(kind=cfg["norm"], eps=cfg["norm_eps"], axes=("embed",), rngs=rngs)
        self.attn_norm = Norm(d, **norm)
        self.attn = Attention(d_model=d, num_heads=cfg["num_heads"],
                              num_kv_heads=cfg["num_kv_heads"], head_dim=cfg["head_dim"],
                              spec=spec, norm_eps=cfg["norm_eps"], std=std, out_std=out_std,
                              impl=cfg["attention_impl"], rngs=rngs,
                              block_q=cfg.get("attention_block_q"),
                              block_kv=cfg.get("attention_block_kv"))
        self.mlp_norm = None if self.parallel else Norm(d, **norm)
        self.mlp = MLP(d, cfg["mlp_dim"], cfg["activation"], std, out_std, rngs)

    def __call__(self, x, positions, segment_ids):
        h = self.attn_norm(x)
        if self.parallel:
            return x + self.attn(h, positions, segment_ids) + self.mlp(h)
        x = x + self.attn(h, positions, segment_ids)
        return x + self.mlp(self.mlp_norm(x))


class Group(nnx.Module):
    """One repetition of the pattern: a block per pattern entry."""

    def __init__(self, cfg: Mapping[str, Any], specs: list[LayerSpec], rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, spec, rngs) for spec in specs])

    def __call__(self, x, positions, segment_ids):
        for block in self.blocks:
            x = constrain(block(x, positions, segment_ids), ("batch", "length", "embed"))
        return x


class Transformer(nnx.Module):
    """`model(tokens [B, T], positions=None, segment_ids=None) -> logits [B, T, vocab]`."""

    def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs):
        cfg = {k: config[k] for k in config.keys()}
        group, num_groups, tail = group_specs(cfg["layer_types"], cfg["pattern"],
                                              cfg["num_layers"])
        self.num_groups, self.scan_layers = num_groups, cfg["scan_layers"]
        self.remat = cfg["remat"]
        self.dtype = DTYPES[cfg["dtype"]]
        self.logit_scale = cfg["logit_scale"]
        d, vocab = cfg["d_model"], cfg["vocab_size"]
        self.embed = param(rngs, (vocab, d), ("vocab", "embed"), cfg["init_std"])

        @nnx.split_rngs(splits=max(num_groups, 1))
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_groups(rngs):
            return Group(cfg, group, rngs)

        self.groups = make_groups(rngs) if num_groups else None
        self.tail = Group(cfg, tail, rngs) if tail else None
        self.final_norm = Norm(d, cfg["norm"], cfg["norm_eps"], ("embed",), rngs)
        self.head = None if cfg["tie_embeddings"] else param(
            rngs, (d, vocab), ("embed", "vocab"), cfg["init_std"])

    def _run_groups(self, x, positions, segment_ids):
        graphdef, stacked = nnx.split(self.groups)

        def body(x, group_state):
            return nnx.merge(graphdef, group_state)(x, positions, segment_ids), None

        if REMAT_POLICIES[self.remat] is not None:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        unroll = 1 if self.scan_layers else self.num_groups
        x, _ = jax.lax.scan(body, x, stacked, unroll=unroll)
        return x

    def features(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Final normed hidden states [B, T, d_model]."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                         tokens.shape)
        table = constrain(self.embed[...], ("vocab", "embed"))  # gathered whole per shard
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        if self.groups is not None:
            x = self._run_groups(x, positions, segment_ids)
        if self.tail is not None:
            x = self.tail(x, positions, segment_ids)
        return self.final_norm(x)

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden states -> float32 logits (tied or untied head, times logit_scale)."""
        w = self.embed[...].T if self.head is None else self.head[...]
        out = dense(h, w).astype(jnp.float32)
        if self.logit_scale != 1.0:
            out = out * self.logit_scale
        return constrain(out, ("batch", "length", "vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return self.logits(self.features(tokens, positions, segment_ids))
