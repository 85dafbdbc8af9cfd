"""Prefill a prompt, then decode one token at a time with the hybrid KV cache.

Greedy decoding by default; temperature and top-k sampling on request. The prompt is run
once through the model's own kernels (it fills the empty cache), each new token is one
jitted step over the cache. Positions continue from the prompt's length.

Prompts of many lengths (evaluation samples) would each compile their own prefill; with
`prefill_multiple=m` only the first multiple of m tokens is prefilled and the few left are
fed through the (once compiled) one-token step, so every prompt length shares m-aligned
prefill programs. The compiled steps are shared by every Generator of the same model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hybridlm.infer.cache import init_cache
from hybridlm.model.attention import config_tiles
from hybridlm.model.transformer import Transformer
from hybridlm.ops import kernel_tiles


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Next tokens [B] from logits [B, V]: argmax when temperature == 0."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(graphdef, tiles, state, tokens, positions, cache):
    with kernel_tiles(*tiles):
        return nnx.merge(graphdef, state).decode(tokens, positions, cache)


class Generator:
    """Compiled prefill and decode steps for one model, batch size and maximum length.

    When the model spans several processes, each step is waited for before the next is
    issued: with dozens of small steps queued, XLA's CPU runtime deadlocked between its
    per-device limit on queued computations and the gloo collectives of the steps ahead
    (2 processes x 4 CPU devices hung in 4 of 4 runs of 18 needle samples, and in 0 of 3
    with this wait; docs/evaluation.md)."""

    def __init__(self, model: Transformer, model_cfg: dict, batch: int, max_len: int,
                 prefill_multiple: int = 1):
        self.model_cfg, self.batch, self.max_len = model_cfg, batch, max_len
        self.prefill_multiple = prefill_multiple
        self.graphdef, self.state = nnx.split(model)
        self.tiles = config_tiles(model_cfg)  # the prompt's attention: the config's tiles
        self.lockstep = jax.process_count() > 1

    def _wait(self, x):
        return jax.block_until_ready(x) if self.lockstep else x

    def _step(self, tokens, positions, cache):
        return self._wait(_step(self.graphdef, self.tiles, self.state, tokens, positions,
                                cache))

    def prefill(self, prompt: np.ndarray) -> tuple[jax.Array, dict]:
        """(logits of the prompt's last token [B, V], the filled cache)."""
        b, n = prompt.shape
        cache = init_cache(self.model_cfg, b, self.max_len)
        head, logits = n - n % self.prefill_multiple, None
        if head:  # one token at a time for the rest (a single token takes the decode path)
            positions = jnp.broadcast_to(jnp.arange(head, dtype=jnp.int32), (b, head))
            logits, cache = self._step(jnp.asarray(prompt[:, :head], jnp.int32), positions,
                                       cache)
        for i in range(head, n):
            logits, cache = self._step(jnp.asarray(prompt[:, i:i + 1], jnp.int32),
                                       jnp.full((b, 1), i, jnp.int32), cache)
        return logits[:, -1], cache

    def generate(self, prompt: np.ndarray, max_new: int, *, temperature: float = 0.0,
                 top_k: int = 0, seed: int = 0) -> np.ndarray:
        """prompt [B, n] int -> generated tokens [B, max_new] (the prompt not included)."""
        b, n = prompt.shape
        if b != self.batch:
            raise ValueError(f"prompt batch {b} != the generator's batch {self.batch}")
        if n + max_new > self.max_len:
            raise ValueError(f"prompt ({n}) + new tokens ({max_new}) exceed max_len "
                             f"{self.max_len}; build the Generator with a larger max_len")
        logits, cache = self.prefill(np.asarray(prompt))
        key = jax.random.key(seed)
        out = []
        for i in range(max_new):
            key, sub = jax.random.split(key)
            token = self._wait(sample(logits, sub, temperature, top_k))
            out.append(token)
            if i + 1 < max_new:
                pos = jnp.full((b, 1), n + i, jnp.int32)
                logits, cache = self._step(token[:, None], pos, cache)
                logits = logits[:, -1]
        tokens = jnp.stack(out, axis=1)
        if not tokens.is_fully_addressable:  # a batch split over processes: each gets all
            tokens = multihost_utils.process_allgather(tokens, tiled=True)
        return np.asarray(tokens)

    def logits_stepwise(self, tokens: np.ndarray, prompt_len: int) -> np.ndarray:
        """Teacher-forced logits [B, T, V]: the prompt tokens[:, :prompt_len] at once, then the
        rest one at a time through the cache (what tests compare with a full forward pass)."""
        b, t = tokens.shape
        cache = init_cache(self.model_cfg, b, self.max_len)
        positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (b, prompt_len))
        logits, cache = self._step(jnp.asarray(tokens[:, :prompt_len], jnp.int32),
                                   positions, cache)
        outs = [logits]
        for i in range(prompt_len, t):
            pos = jnp.full((b, 1), i, jnp.int32)
            logits, cache = self._step(jnp.asarray(tokens[:, i:i + 1], jnp.int32),
                                       pos, cache)
            outs.append(logits)
        return np.asarray(jnp.concatenate(outs, axis=1))
