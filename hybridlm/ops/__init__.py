"""Attention kernels behind one function; the model never picks one itself."""

from hybridlm.ops import kv_cache
from hybridlm.ops.attention import (
    IMPLS,
    attention,
    dense_attention,
    kernel_tiles,
    resolve_impl,
)
from hybridlm.ops.blockwise import blockwise_attention
from hybridlm.ops.kv_cache import LayerCache
from hybridlm.ops.masks import MaskRule, MaskSpec, dense_mask

__all__ = ["IMPLS", "LayerCache", "MaskRule", "MaskSpec", "attention", "blockwise_attention",
           "dense_attention", "dense_mask", "kernel_tiles", "kv_cache", "resolve_impl"]
