"""The model's KV cache: one LayerCache per layer, laid out like the model's layers.

`init_cache` follows the decoder's `LayerLayout`: for the scanned groups, one LayerCache
per pattern entry stacked over the groups (a leading axis the scan walks), and one per
layer of the tail; `Transformer.decode` reads and returns it.
Each layer's size follows its span (`ops.kv_cache.cache_size`): RNoPE-SWA's windowed layers
keep W entries, its global layers all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybridlm.model.pattern import layer_layout
from hybridlm.model.transformer import DTYPES, Cache
from hybridlm.ops.kv_cache import cache_size, empty_cache


def init_cache(model_cfg: Mapping[str, Any], batch: int, max_len: int,
               dtype: Any = None) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated)."""
    dtype = dtype or DTYPES[model_cfg["dtype"]]
    layout = layer_layout(model_cfg)
    hkv, hd = model_cfg["num_kv_heads"], model_cfg["head_dim"]

    def layer(spec):
        return empty_cache(batch, cache_size(max_len, spec.mask), hkv, hd, dtype)

    def stacked(spec):
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (layout.num_groups, *a.shape)),
                            layer(spec))

    return {"groups": tuple(map(stacked, layout.group)) if layout.num_groups else None,
            "tail": tuple(map(layer, layout.tail)) if layout.tail else None}


def cache_bytes(model_cfg: Mapping[str, Any], batch: int, max_len: int,
                bytes_per_value: int = 2) -> dict[str, float]:
    """Bytes of keys and values held by the hybrid cache and by a full-attention cache of
    the same model (every layer keeping max_len entries), and their ratio."""
    per_entry = 2 * batch * model_cfg["num_kv_heads"] * model_cfg["head_dim"] * bytes_per_value
    layers = layer_layout(model_cfg).layers()
    hybrid = sum(cache_size(max_len, s.mask) for s in layers) * per_entry
    full = len(layers) * max_len * per_entry
    return {"hybrid_bytes": float(hybrid), "full_bytes": float(full),
            "fraction": float(np.float64(hybrid) / full)}
