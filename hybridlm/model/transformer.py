"""The decoder: embeddings, pattern groups of blocks scanned over depth, the LM head.

A block is pre-norm, sequential (x + attn, then x + mlp) or parallel (Cohere: attention
and MLP read the same normed input and both add to x). One *group* holds one block per
pattern entry (e.g. local, local, local, global); the decoder scans one group's code
over the stacked parameters of all groups, so compile time stays flat as depth grows.
`scan_layers=False` unrolls the same loop (same parameters, same numbers), which XLA's
cost analysis needs to count every layer. Layers past the last full group (a depth that
is not a multiple of the pattern) form a short unstacked tail group; `LayerLayout`
(model/pattern.py) says which layer is where.

Two paths: `model(tokens, positions, segment_ids) -> logits` trains and evaluates on
whole sequences; `model.decode(tokens, positions, cache) -> (logits, cache)` continues
sequences through a KV cache (hybridlm.infer builds the cache and calls it).

`model.remat` rematerialises each block on its own, in the scanned groups and the tail
alike: the backward pass need hold only one block's recomputed activations, whatever
the pattern's length (docs/scaling.md has the bytes).
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
from hybridlm.model.pattern import LayerSpec, layer_layout
from hybridlm.ops.kv_cache import LayerCache

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BLOCKS = ("sequential", "parallel")  # x+attn then x+mlp | both from one norm (Cohere)
Cache = dict[str, tuple[LayerCache, ...] | None]  # {"groups": stacked per entry, "tail": ...}


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
                              impl=cfg["attention_impl"], rngs=rngs)
        self.mlp_norm = None if self.parallel else Norm(d, **norm)
        self.mlp = MLP(d, cfg["mlp_dim"], cfg["activation"], std, out_std, rngs)

    def _residual(self, x: jax.Array, h: jax.Array, a: jax.Array) -> jax.Array:
        """x + attention output a (of h = attn_norm(x)) + MLP."""
        if self.parallel:
            return x + a + self.mlp(h)
        x = x + a
        return x + self.mlp(self.mlp_norm(x))

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None) -> jax.Array:
        h = self.attn_norm(x)
        return self._residual(x, h, self.attn(h, positions, segment_ids))

    def decode(self, x: jax.Array, positions: jax.Array,
               cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        h = self.attn_norm(x)
        a, cache = self.attn.decode(h, positions, cache)
        return self._residual(x, h, a), cache


def rematerialised(block: Block, policy: str) -> Block | Any:
    """`block`, or a function of the same arguments whose activations the backward pass
    recomputes (`jax.checkpoint` with the named policy) instead of keeping them."""
    if REMAT_POLICIES[policy] is None:
        return block
    graphdef, state = nnx.split(block)

    def run(state, x, positions, segment_ids):
        return nnx.merge(graphdef, state)(x, positions, segment_ids)

    run = jax.checkpoint(run, policy=REMAT_POLICIES[policy])
    return lambda x, positions, segment_ids: run(state, x, positions, segment_ids)


class Group(nnx.Module):
    """One repetition of the pattern: a block per pattern entry."""

    def __init__(self, cfg: Mapping[str, Any], specs: tuple[LayerSpec, ...], rngs: nnx.Rngs):
        self.remat = cfg["remat"]
        self.blocks = nnx.List([Block(cfg, spec, rngs) for spec in specs])

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None) -> jax.Array:
        for block in self.blocks:
            x = rematerialised(block, self.remat)(x, positions, segment_ids)
            x = constrain(x, ("batch", "length", "embed"))
        return x

    def decode(self, x: jax.Array, positions: jax.Array, caches: tuple[LayerCache, ...]
               ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """The blocks in order, each with its own cache; returns the updated caches."""
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.decode(x, positions, cache)
            new.append(cache)
        return x, tuple(new)


class Transformer(nnx.Module):
    """`model(tokens [B, T], positions=None, segment_ids=None) -> logits [B, T, vocab]`."""

    def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs):
        cfg = {k: config[k] for k in config.keys()}
        layout = layer_layout(cfg)
        self.num_groups, self.scan_layers = layout.num_groups, cfg["scan_layers"]
        self.dtype = DTYPES[cfg["dtype"]]
        self.logit_scale = cfg["logit_scale"]
        d, vocab = cfg["d_model"], cfg["vocab_size"]
        self.embed = param(rngs, (vocab, d), ("vocab", "embed"), cfg["init_std"])

        @nnx.split_rngs(splits=max(layout.num_groups, 1))
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_groups(rngs):
            return Group(cfg, layout.group, rngs)

        self.groups = make_groups(rngs) if layout.num_groups else None
        self.tail = Group(cfg, layout.tail, rngs) if layout.tail else None
        self.final_norm = Norm(d, cfg["norm"], cfg["norm_eps"], ("embed",), rngs)
        self.head = None if cfg["tie_embeddings"] else param(
            rngs, (d, vocab), ("embed", "vocab"), cfg["init_std"])

    def _scan_groups(self, step, x: jax.Array, xs: Any) -> tuple[jax.Array, Any]:
        """Scan `step(group, x, xs_g) -> (x, ys_g)` over the stacked groups."""
        graphdef, stacked = nnx.split(self.groups)

        def body(x, args):
            group_state, xs_g = args
            return step(nnx.merge(graphdef, group_state), x, xs_g)

        unroll = 1 if self.scan_layers else self.num_groups
        return jax.lax.scan(body, x, (stacked, xs), unroll=unroll)

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
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Final normed hidden states [B, T, d_model] (what the LM head reads)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                         tokens.shape)
        x = self.embed_tokens(tokens)
        if self.groups is not None:
            x, _ = self._scan_groups(
                lambda group, x, _: (group(x, positions, segment_ids), None), x, None)
        if self.tail is not None:
            x = self.tail(x, positions, segment_ids)
        return self.final_norm(x)

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
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, vocab] of whole sequences (training, evaluation)."""
        return self.logits(self.features(tokens, positions, segment_ids))

    def decode(self, tokens: jax.Array, positions: jax.Array,
               cache: Cache) -> tuple[jax.Array, Cache]:
        """(logits [B, n, vocab], updated cache) for n new tokens per sequence at `positions`
        [B, n], continuing what `cache` holds (`hybridlm.infer.init_cache` lays it out)."""
        x = self.embed_tokens(tokens)
        new: Cache = {"groups": None, "tail": None}
        if self.groups is not None:
            x, new["groups"] = self._scan_groups(
                lambda group, x, caches: group.decode(x, positions, caches), x,
                cache["groups"])
        if self.tail is not None:
            x, new["tail"] = self.tail.decode(x, positions, cache["tail"])
        return self.logits(self.final_norm(x)), new


def abstract_model(model_cfg: Mapping[str, Any], seed: int = 0
                   ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, abstract parameters with their metadata); allocates nothing."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))
    return nnx.split(model, nnx.Param)
