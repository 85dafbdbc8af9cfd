"""The model's KV cache: one LayerCache per layer, laid out like the model's layers.

`init_cache` mirrors the decoder: for the scanned groups, one LayerCache per pattern entry
stacked over the groups (a leading axis the scan walks), and one per layer of the tail.
Each layer's size follows its span (`ops.kv_cache.cache_size`): RNoPE-SWA's windowed layers
keep W entries, its global layers all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybridlm.model.pattern import expand, group_specs
from hybridlm.model.transformer import DTYPES
from hybridlm.ops.kv_cache import cache_size, empty_cache


def init_cache(model_cfg: Mapping[str, Any], batch: int, max_len: int,
               dtype: Any = None) -> dict:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated)."""
    dtype = dtype or DTYPES[model_cfg["dtype"]]
    group, num_groups, tail = group_specs(model_cfg["layer_types"], model_cfg["pattern"],
                                          model_cfg["num_layers"])
    hkv, hd = model_cfg["num_kv_heads"], model_cfg["head_dim"]

    def layer(spec):
        return empty_cache(batch, cache_size(max_len, spec.window, spec.chunk), hkv, hd, dtype)

    def stacked(spec):
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_groups, *a.shape)), layer(spec))

    return {"groups": tuple(stacked(s) for s in group) if num_groups else None,
            "tail": tuple(layer(s) for s in tail) if tail else None}


def cache_bytes(model_cfg: Mapping[str, Any], batch: int, max_len: int,
                bytes_per_value: int = 2) -> dict[str, float]:
    """Bytes of keys and values held by the hybrid cache and by a full-attention cache of
    the same model (every layer keeping max_len entries), and their ratio."""
    per_entry = 2 * batch * model_cfg["num_kv_heads"] * model_cfg["head_dim"] * bytes_per_value
    layers = expand(model_cfg["layer_types"], model_cfg["pattern"], model_cfg["num_layers"])
    hybrid = sum(cache_size(max_len, s.window, s.chunk) for s in layers) * per_entry
    full = len(layers) * max_len * per_entry
    return {"hybrid_bytes": float(hybrid), "full_bytes": float(full),
            "fraction": float(np.float64(hybrid) / full)}
