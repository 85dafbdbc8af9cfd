"""Attention kernels behind one function; the model never picks one itself."""

from hybridlm.ops.attention import IMPLS, attention, dense_attention, resolve_impl
from hybridlm.ops.blockwise import blockwise_attention
from hybridlm.ops.masks import MaskSpec, dense_mask

__all__ = ["IMPLS", "MaskSpec", "attention", "blockwise_attention", "dense_attention",
           "dense_mask", "resolve_impl"]
