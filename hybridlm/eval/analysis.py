"""The paper's attention analysis on a real model: per layer, where do the question tokens look?

A needle sample at 50% depth; the question-and-completion tokens (the question followed by
the true answer) are the queries. For every layer, the layer's own q and k (after its
QK-norm and RoPE, exactly what its attention uses) give the queries' post-softmax attention
over all keys under the layer's mask (window, chunk), summed over the four key segments of
analysis_math.py, averaged over heads and queries; plus entropy. Reported per layer, per
layer type and overall, each next to its uniform-attention baseline ("uniform": what
attention spread evenly over the keys the layer lets a query see would give). Only [qc x T]
probabilities are formed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybridlm.eval import analysis_math as am
from hybridlm.eval.tasks import Sample
from hybridlm.model.transformer import Transformer


def layer_masses(model: Transformer, tokens: jax.Array, num_queries: int,
                 query_start: jax.Array, key_segments: jax.Array) -> jax.Array:
    """[layers, 2, 5]: segment masses and entropy of the queries tokens[query_start:], per
    layer: [:, 0] the model's attention, [:, 1] uniform attention under the layer's mask.

    Attention is formed for the last `num_queries` tokens only (static, so samples whose
    question lengths differ share one compile); rows before `query_start` get weight 0.
    """
    t = tokens.shape[1]
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    q_pos = positions[0, t - num_queries:]
    weights = (q_pos >= query_start).astype(jnp.float32)
    x = model.embed_tokens(tokens)
    rows = []
    for block in model.blocks():
        spec = block.attn.spec
        q, k, _ = block.attn.project(block.attn_norm(x), positions)
        sinks = None if block.attn.sinks is None else block.attn.sinks[...]
        probs = am.query_probs(q[0, t - num_queries:], k[0], q_pos, spec.mask, sinks)
        uniform = am.uniform_probs(q_pos, t, spec.mask)
        rows.append(jnp.stack([am.mass_and_entropy(probs, key_segments, weights),
                               am.mass_and_entropy(uniform, key_segments, weights)]))
        x = block(x, positions, None)
    return jnp.stack(rows)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _layer_masses(graphdef, state, tokens, num_queries, query_start, key_segments):
    return layer_masses(nnx.merge(graphdef, state), tokens, num_queries, query_start,
                        key_segments)


def analyze_sample(model: Transformer, sample: Sample, answer_ids: np.ndarray,
                   num_queries: int | None = None) -> dict:
    """Per-layer, per-layer-type and overall attention statistics for one needle sample.
    `num_queries` (>= the question + answer length) lets samples share a compile."""
    tokens = np.concatenate([sample.ids, answer_ids]).astype(np.int32)
    qc_start = sample.question_span[0]
    num_queries = num_queries or len(tokens) - qc_start
    if num_queries < len(tokens) - qc_start:
        raise ValueError(f"num_queries {num_queries} < {len(tokens) - qc_start} qc tokens")
    segments = am.segment_ids_for_keys(len(tokens), sample.needle_spans[0], qc_start)
    graphdef, state = nnx.split(model)
    table = np.asarray(_layer_masses(graphdef, state, jnp.asarray(tokens)[None], num_queries,
                                     jnp.int32(qc_start), jnp.asarray(segments)))
    specs = [block.attn.spec for block in model.blocks()]

    def stats(rows):  # [n, 2, 5] -> the model's mean masses with the uniform ones beside
        mean = rows.mean(0)
        return {**am.as_dict(mean[0]), "uniform": am.as_dict(mean[1])}

    per_layer = [{"layer": i, "type": s.name, "rope": s.rope, "window": s.window,
                  "chunk": s.chunk, **stats(table[i:i + 1])} for i, s in enumerate(specs)]
    by_type = {name: stats(table[[i for i, s in enumerate(specs) if s.name == name]])
               for name in dict.fromkeys(s.name for s in specs)}
    return {"length": int(len(tokens)), "needle_span": list(sample.needle_spans[0]),
            "qc_start": int(qc_start), "per_layer": per_layer, "by_type": by_type,
            "overall": stats(table)}


def average(results: Sequence[dict]) -> dict:
    """Average several samples' statistics (same model and length)."""
    keys = (*am.SEGMENTS, "entropy")

    def mean(dicts):
        return {**{k: float(np.mean([d[k] for d in dicts])) for k in keys},
                "uniform": {k: float(np.mean([d["uniform"][k] for d in dicts])) for k in keys}}

    return {"samples": len(results), "length": results[0]["length"],
            "overall": mean([r["overall"] for r in results]),
            "by_type": {t: mean([r["by_type"][t] for r in results])
                        for t in results[0]["by_type"]},
            "per_layer": [{**results[0]["per_layer"][i],
                           **mean([r["per_layer"][i] for r in results])}
                          for i in range(len(results[0]["per_layer"]))]}
