"""Decoding with the hybrid KV cache."""

from hybridlm.infer.cache import cache_bytes, init_cache
from hybridlm.infer.generate import Generator

__all__ = ["Generator", "cache_bytes", "init_cache"]
