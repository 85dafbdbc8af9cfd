"""Rotary position embeddings, with positions taken from the data.

Packed documents restart their positions at 0, so RoPE must read positions from the
batch rather than assume 0..T-1. Two pairings of the head dimension are in use:
  half:        (x[i], x[i + D/2]) rotate together (Llama, NeoX, SmolLM3, Gemma)
  interleaved: (x[2i], x[2i + 1]) rotate together (GPT-J, Cohere, Llama 4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """[B, T] positions -> [B, T, head_dim / 2] angles p * theta^(-2i / head_dim)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, style: str = "half") -> jax.Array:
    """Rotate x [B, T, H, D] by its positions [B, T]; computed in float32."""
    angles = rope_angles(positions, x.shape[-1], theta)[:, :, None, :]  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    if style == "half":
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif style == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    else:
        raise ValueError(f"unknown rope_style {style!r}")
    return out.astype(x.dtype)
