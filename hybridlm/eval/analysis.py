"""The paper's attention analysis on a real model: per layer, where do the question tokens look?

A needle sample at 50% depth; the question-and-completion tokens (the question followed by
the true answer) are the queries. For every layer, the layer's own q and k (after its
QK-norm and RoPE, exactly what its attention uses) give the queries' post-softmax attention
over all keys under the layer's mask (window, chunk), summed over the four key segments of
analysis_math.py, averaged over heads and queries; plus entropy. Reported per layer, per
layer type and overall. Only [qc x T] probabilities are formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybridlm.eval import analysis_math as am
from hybridlm.eval.tasks import Sample
from hybridlm.model.transformer import Transformer


def layer_masses(model: Transformer, tokens: jax.Array, query_start: int,
                 key_segments: jax.Array) -> jax.Array:
    """[layers, 5]: segment masses and entropy of queries tokens[query_start:], per layer."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    x = model.embed_tokens(tokens)
    rows = []
    for block in model.blocks():
        spec = block.attn.spec
        q, k, _ = block.attn.project(block.attn_norm(x), positions)
        sinks = None if block.attn.sinks is None else block.attn.sinks[...]
        probs = am.query_probs(q[0, query_start:], k[0], positions[0, query_start:],
                               spec.window, spec.chunk, sinks)
        rows.append(am.mass_and_entropy(probs, key_segments))
        x = block(x, positions, None)
    return jnp.stack(rows)


def analyze_sample(model: Transformer, sample: Sample, answer_ids: np.ndarray) -> dict:
    """Per-layer, per-layer-type and overall attention statistics for one needle sample."""
    tokens = np.concatenate([sample.ids, answer_ids]).astype(np.int32)
    qc_start = sample.question_span[0]
    segments = am.segment_ids_for_keys(len(tokens), sample.needle_spans[0], qc_start)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, t, seg: layer_masses(nnx.merge(graphdef, state), t, qc_start,
                                                     seg))
    table = np.asarray(run(state, jnp.asarray(tokens)[None], jnp.asarray(segments)))
    specs = [block.attn.spec for block in model.blocks()]
    per_layer = [{"layer": i, "type": s.name, "rope": s.rope, "window": s.window,
                  "chunk": s.chunk, **am.as_dict(row)} for i, (s, row) in
                 enumerate(zip(specs, table, strict=True))]
    by_type = {name: am.as_dict(table[[i for i, s in enumerate(specs) if s.name == name]]
                                .mean(0)) for name in dict.fromkeys(s.name for s in specs)}
    return {"length": int(len(tokens)), "needle_span": list(sample.needle_spans[0]),
            "qc_start": int(qc_start), "per_layer": per_layer, "by_type": by_type,
            "overall": am.as_dict(table.mean(0))}


def average(results: Sequence[dict]) -> dict:
    """Average several samples' statistics (same model and length)."""
    keys = (*am.SEGMENTS, "entropy")

    def mean(dicts):
        return {k: float(np.mean([d[k] for d in dicts])) for k in keys}

    return {"samples": len(results), "length": results[0]["length"],
            "overall": mean([r["overall"] for r in results]),
            "by_type": {t: mean([r["by_type"][t] for r in results])
                        for t in results[0]["by_type"]},
            "per_layer": [{**results[0]["per_layer"][i],
                           **mean([r["per_layer"][i] for r in results])}
                          for i in range(len(results[0]["per_layer"]))]}
