"""One attention layer, as the paper describes it.

    q, k, v = projections of x               (GQA: fewer key/value heads than query heads)
    q, k    = QK-norm, if the layer has it   ("pre_rope": the paper's QK-Norm variant)
    q, k    = RoPE(q, k, positions)          (only on RoPE layers; NoPE layers skip it)
    q, k    = QK-norm after RoPE             ("post_rope": Llama 4)
    q       = q * temperature(positions)     (Llama 4 NoPE layers)
    out     = softmax(q k^T / sqrt(D) + mask) v, through hybridlm.ops.attention

The mask (causal, window, chunk, segments) comes from the layer's LayerSpec; which
kernel computes it is `impl`, chosen by config, never here, and its tiles are set by
whoever runs the model (`config_tiles`). Training runs `__call__` over whole
sequences; decoding runs `decode` over new tokens against a KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hybridlm import ops
from hybridlm.model.layers import Norm, constrain, dense, param
from hybridlm.model.pattern import LayerSpec
from hybridlm.model.rope import apply_rope


def temperature(positions: jax.Array, floor: int, scale: float) -> jax.Array:
    """Llama 4's attention temperature tuning: grows with log of the position."""
    steps = jnp.floor((positions.astype(jnp.float32) + 1.0) / floor)
    return jnp.log(steps + 1.0) * scale + 1.0


def config_tiles(model_cfg: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(block_q, block_kv) the config asks of the attention kernels: whoever runs the model
    (training, evaluation, decoding) traces it inside `ops.kernel_tiles(*these)`."""
    return model_cfg.get("attention_block_q"), model_cfg.get("attention_block_kv")


class Attention(nnx.Module):
    def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 spec: LayerSpec, norm_eps: float, std: float, out_std: float, impl: str,
                 rngs: nnx.Rngs):
        self.spec, self.impl = spec, impl
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.wq = param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), std)
        self.wkv = param(rngs, (d_model, 2, num_kv_heads, head_dim),
                         ("embed", None, "kv_heads", "head_dim"), std)
        self.wo = param(rngs, (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"),
                        out_std)
        if spec.qk_norm != "none":
            kw = dict(kind="rms", eps=norm_eps, axes=("head_dim",), rngs=rngs,
                      learnable=spec.qk_norm_scale)
            self.q_norm, self.k_norm = Norm(head_dim, **kw), Norm(head_dim, **kw)
        self.sinks = param(rngs, (num_heads,), ("heads",), 0.0) if spec.sink else None

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]:
        """q [B, T, H, D], k and v [B, T, Hkv, D], with QK-norm, RoPE and temperature applied."""
        spec = self.spec
        q = dense(x, self.wq[...])  # [B, T, H, D]
        kv = dense(x, self.wkv[...])  # [B, T, 2, Hkv, D]
        k, v = kv[:, :, 0], kv[:, :, 1]
        if spec.qk_norm == "pre_rope":
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.rope:
            q = apply_rope(q, positions, spec.rope_theta, spec.rope_style)
            k = apply_rope(k, positions, spec.rope_theta, spec.rope_style)
        if spec.qk_norm == "post_rope":
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.temperature_floor is not None:
            scale = temperature(positions, spec.temperature_floor, spec.temperature_scale)
            q = (q * scale[:, :, None, None]).astype(q.dtype)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, v

    def sink_logits(self) -> jax.Array | None:
        return None if self.sinks is None else self.sinks[...]

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None) -> jax.Array:
        """[B, T, d_model] -> [B, T, d_model]: the sequence attends to itself."""
        spec = self.spec
        q, k, v = self.project(x, positions)
        mask = spec.mask.for_tokens(q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                    q_positions=positions, kv_positions=positions)
        out = ops.attention(q, k, v, mask, self.impl, sinks=self.sink_logits())
        return dense(out, self.wo[...], contract=2)

    def decode(self, x: jax.Array, positions: jax.Array,
               cache: ops.LayerCache) -> tuple[jax.Array, ops.LayerCache]:
        """New tokens [B, n, d_model] against the layer's KV cache: (output, updated cache)."""
        q, k, v = self.project(x, positions)
        out, cache = ops.kv_cache.attend(cache, q, k, v, positions, self.spec.mask,
                                         impl=self.impl, sinks=self.sink_logits())
        return dense(out, self.wo[...], contract=2), cache
