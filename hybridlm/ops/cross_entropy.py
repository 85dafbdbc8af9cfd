"""The LM head and its cross-entropy, fused and computed over chunks of the sequence.

Materialising the logits of a whole batch costs tokens x vocab floats (134 MB for 4 x 1024
tokens over 8192 words; 125 GiB for one 128k sequence over Gemma's 256k), and autodiff
keeps them, their softmax and their gradient alive at once. Here the tokens are split into
chunks and each chunk's logits live only inside one step of a scan:

- the forward pass (`jax.grad` or not) forms a chunk's logits, its log-normaliser and its
  cross-entropy, and, when differentiated, at once the gradient w.r.t. the logits
  (softmax - one-hot, times the token weight): the loss is a plain sum over tokens, so that
  gradient is known before the backward pass starts;
- it contracts that gradient straight away into the hidden states' gradient (chunk by
  chunk) and the head's gradient (accumulated over chunks); only those two are kept;
- the backward pass scales them by the incoming cotangent.

Chunks are strided (chunk i holds positions i, i + n, i + 2n, ...), so when the sequence is
split over devices (context parallelism) every chunk is spread over all of them.
The arithmetic is the autodiff of `logits -> logsumexp - logits[target]`, reordered: equal
to the unchunked loss within float rounding (tests/test_ops_cross_entropy.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LossSums = tuple[jax.Array, jax.Array]


def _float(dtype) -> jnp.dtype:
    """The loss arithmetic's dtype: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cross-entropy, log Z, softmax) per position of integer `targets` under `logits`
    [..., V], in the logits' dtype: the one cross-entropy of hybridlm (the fused loss below,
    the whole-logits loss of `train/step.py`, evaluation). Autodiff of it is exact too."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    log_z = (top + jnp.log(total))[..., 0]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z, exp / total


def _chunk_losses(h, w_vd, targets, scale):
    """Per-token (softmax, log Z, cross-entropy) for one chunk, in float32 (or float64)."""
    logits = jnp.einsum("bcd,vd->bcv", h, w_vd.astype(h.dtype),
                        preferred_element_type=_float(h.dtype))
    if scale != 1.0:
        logits = logits * scale
    ce, log_z, probs = softmax_cross_entropy(logits, targets)
    return probs, log_z, ce


def _strided_chunks(x: jax.Array, n: int) -> jax.Array:
    """[B, T, ...] -> [n, B, T/n, ...]; chunk i holds positions i, i + n, ..."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // n, n, *x.shape[2:]), 2, 0)


def _unstride(x: jax.Array) -> jax.Array:
    """Inverse of `_strided_chunks`."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 2).reshape(b, n * c, *x.shape[3:])


def chunked_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array,
                          weights: jax.Array, *, chunk: int, logit_scale: float = 1.0,
                          z_loss: float = 0.0, unroll: bool = False) -> LossSums:
    """(objective, cross-entropy sum) of the head `h @ w * logit_scale` over weighted tokens.

    h [B, T, d] final hidden states (compute dtype); w [d, V] the head (tied: the embedding
    transposed); targets [B, T] int; weights [B, T] (0: not counted). objective is the
    weighted cross-entropy sum plus `z_loss * sum(weights * log Z^2)`. `chunk` positions per
    row per chunk; T must be a multiple of it. `unroll` unrolls the loop over chunks, so
    that XLA's cost analysis counts every chunk (it counts a loop body once).
    """
    t = h.shape[1]
    if chunk <= 0 or t % chunk:
        raise ValueError(f"loss chunk {chunk} must be a positive divisor of the length {t}")
    n = t // chunk
    scan = functools.partial(jax.lax.scan, unroll=n if unroll else 1)
    real = _float(h.dtype)
    weights = weights.astype(real)
    scale = float(logit_scale)
    tokens = (_strided_chunks(targets, n), _strided_chunks(weights, n))

    def sums(ce, log_z, wc):
        ce_sum = jnp.sum(ce * wc)
        return ce_sum + z_loss * jnp.sum(jnp.square(log_z) * wc) if z_loss else ce_sum, ce_sum

    # Inside the loop every matmul reads and writes its operands as laid out, with no
    # transpose: the logits and the hidden states' gradient use the head vocabulary-major,
    # [V, d] (a tied head's own layout); the head's gradient is accumulated as [d, V] from
    # hidden-state chunks transposed once before the loop ([d, c] @ [c, V]). Accumulating it
    # as [V, d] made XLA transpose each chunk's [c, V] logit gradient instead: the head's
    # fwd+bwd took 0.58 s instead of 0.48 s on the reference config (docs/performance.md).
    @jax.custom_vjp
    def head_loss(h, w_vd):
        def body(acc, xs):
            hc, tc, wc = xs
            _, log_z, ce = _chunk_losses(hc, w_vd, tc, scale)
            return jax.tree.map(jnp.add, acc, sums(ce, log_z, wc)), None

        zero = jnp.zeros((), real)
        return scan(body, (zero, zero), (_strided_chunks(h, n), *tokens))[0]

    def forward(h, w_vd):
        # Per token, d objective / d logits = scale * weight * (softmax - onehot + 2 z log Z
        # softmax); d ce_sum / d logits drops the z term. With z_loss both are kept.
        parts = 2 if z_loss else 1

        def body(carry, xs):
            acc, dw = carry
            hc, hc_t, tc, wc = xs
            probs, log_z, ce = _chunk_losses(hc, w_vd, tc, scale)
            d_ce = probs - jax.nn.one_hot(tc, probs.shape[-1], dtype=probs.dtype)
            d_logits = [d_ce]
            if z_loss:
                d_logits.insert(0, d_ce + (2.0 * z_loss) * log_z[..., None] * probs)
            d_logits = jnp.stack(d_logits) * (scale * wc[..., None])
            d_logits = d_logits.astype(hc.dtype)
            dh = jnp.einsum("pbcv,vd->pbcd", d_logits, w_vd.astype(hc.dtype),
                            preferred_element_type=real).astype(hc.dtype)
            dw = dw + jax.lax.dot_general(hc_t, d_logits, (((1, 2), (1, 2)), ((), ())),
                                          preferred_element_type=real)
            return (jax.tree.map(jnp.add, acc, sums(ce, log_z, wc)), dw), dh

        zero = jnp.zeros((), real)
        vocab, d_model = w_vd.shape
        init = ((zero, zero), jnp.zeros((d_model, parts, vocab), real))
        chunks = _strided_chunks(h, n)  # [n, B, c, d] and, transposed, [n, d, B, c]
        (out, dw), dh = scan(body, init, (chunks, jnp.moveaxis(chunks, -1, 1), *tokens))
        return out, (dh, dw.astype(w_vd.dtype))

    def backward(residuals, cotangents):
        dh, dw = residuals  # [n, parts, ...], [d, parts, V]: per part (objective, ce_sum)
        g_objective, g_ce = cotangents
        g = jnp.stack([g_objective, g_ce]) if z_loss else (g_objective + g_ce)[None]
        dh = jnp.einsum("p,np...->n...", g.astype(dh.dtype), dh)
        return _unstride(dh), jnp.einsum("p,dpv->vd", g.astype(dw.dtype), dw)

    head_loss.defvjp(forward, backward)
    return head_loss(h, w.T)
