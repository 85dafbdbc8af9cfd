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
from collections.abc import Iterator, Mapping
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
BLOCKS = ("sequential", "parallel")  # x+attn then x+mlp | both from one norm (Cohere)


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

    def __call__(self, x, positions, segment_ids, cache=None):
        """x + attention + MLP; with a KV cache, (output, updated cache)."""
        h = self.attn_norm(x)
        a = self.attn(h, positions, segment_ids, cache)
        if cache is not None:
            a, cache = a
        if self.parallel:
            x = x + a + self.mlp(h)
        else:
            x = x + a
            x = x + self.mlp(self.mlp_norm(x))
        return x if cache is None else (x, cache)


class Group(nnx.Module):
    """One repetition of the pattern: a block per pattern entry."""

    def __init__(self, cfg: Mapping[str, Any], specs: list[LayerSpec], rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, spec, rngs) for spec in specs])

    def __call__(self, x, positions, segment_ids, caches=None):
        """Run the blocks in order; with caches (one per block), also return the new ones."""
        if caches is None:
            for block in self.blocks:
                x = constrain(block(x, positions, segment_ids), ("batch", "length", "embed"))
            return x
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block(x, positions, segment_ids, cache)
            new.append(cache)
        return x, tuple(new)


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

    def _run_groups(self, x, positions, segment_ids, caches=None):
        """Scan one group's code over the stacked groups (and their stacked caches)."""
        graphdef, stacked = nnx.split(self.groups)

        def body(x, xs):
            group_state, group_caches = xs
            out = nnx.merge(graphdef, group_state)(x, positions, segment_ids, group_caches)
            return (out, None) if group_caches is None else out

        if REMAT_POLICIES[self.remat] is not None:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        unroll = 1 if self.scan_layers else self.num_groups
        return jax.lax.scan(body, x, (stacked, caches), unroll=unroll)

    def blocks(self) -> Iterator[Block]:
        """Every block in depth order, as separate modules (a Python loop, for analysis)."""
        if self.groups is not None:
            graphdef, stacked = nnx.split(self.groups)
            for g in range(self.num_groups):
                yield from nnx.merge(graphdef, jax.tree.map(lambda a, g=g: a[g], stacked)).blocks
        if self.tail is not None:
            yield from self.tail.blocks

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        table = constrain(self.embed[...], ("vocab", "embed"))  # gathered whole per shard
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def features(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: dict | None = None):
        """Final normed hidden states [B, T, d_model]; with a cache, (states, new cache)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                         tokens.shape)
        x = self.embed_tokens(tokens)
        new_cache = {"groups": None, "tail": None}
        if self.groups is not None:
            x, new_cache["groups"] = self._run_groups(
                x, positions, segment_ids, None if cache is None else cache["groups"])
        if self.tail is not None:
            out = self.tail(x, positions, segment_ids, None if cache is None else cache["tail"])
            x, new_cache["tail"] = (out, None) if cache is None else out
        return self.final_norm(x) if cache is None else (self.final_norm(x), new_cache)

    def head_weight(self) -> jax.Array:
        """The LM head [d_model, vocab]: the embedding transposed when tied."""
        return self.embed[...].T if self.head is None else self.head[...]

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden states -> float32 logits (tied or untied head, times logit_scale)."""
        out = dense(h, self.head_weight()).astype(jnp.float32)
        if self.logit_scale != 1.0:
            out = out * self.logit_scale
        return constrain(out, ("batch", "length", "vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: dict | None = None):
        """Logits [B, T, vocab]; with a KV cache (hybridlm.infer), (logits, new cache)."""
        if cache is None:
            return self.logits(self.features(tokens, positions, segment_ids))
        h, cache = self.features(tokens, positions, segment_ids, cache)
        return self.logits(h), cache


def abstract_model(model_cfg: Mapping[str, Any], seed: int = 0
                   ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, abstract parameters with their metadata); allocates nothing."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))
    return nnx.split(model, nnx.Param)
