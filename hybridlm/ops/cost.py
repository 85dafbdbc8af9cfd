"""XLA-counted cost of attention and of train steps: deterministic, no arrays needed.

`jax.jit(f).lower(*ShapeDtypeStructs)` gives a program whose FLOPs (XLA's HLO cost analysis)
and, compiled, temp bytes are the same every time. XLA counts a loop body once, so FLOPs are
counted on the program traced with the blockwise kernel's loops unrolled
(`blockwise.unrolled`: the same iterations as straight code), as lowered: compiling that
unrolled twin would take as long as the unrolled kernels of before, and the lowered count is
within 0.2% of the compiled one on the kernels measured (docs/performance.md). Temp bytes
come from the looped program as compiled and run. Model costs should be taken with
`scan_layers=False`, for the same reason.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from hybridlm.ops.attention import attention
from hybridlm.ops.blockwise import unrolled
from hybridlm.ops.masks import MaskRule, MaskSpec

_INSTRUCTION = re.compile(r"^\s+(ROOT )?%?[\w.\-]+ = ", re.MULTILINE)


def _lower(fn, args):
    # A fresh function each time: jit's trace cache must not hand the looped trace to
    # the unrolled count, or the other way round.
    return jax.jit(lambda *a: fn(*a)).lower(*args)


def compiled_cost(fn, *args) -> dict[str, float]:
    """{'flops': every loop iteration counted, 'temp_bytes': as compiled and run} of fn for
    the given abstract arguments."""
    with unrolled():
        cost = _lower(fn, args).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    compiled = _lower(fn, args).compile()
    return {"flops": float(cost["flops"]),
            "temp_bytes": float(compiled.memory_analysis().temp_size_in_bytes)}


def count_instructions(hlo_text: str) -> int:
    """Instructions in an HLO module's text, every computation's."""
    return len(_INSTRUCTION.findall(hlo_text))


def hlo_instructions(fn, *args) -> int:
    """Instructions in fn's compiled program (XLA's optimised HLO): the program's size,
    which is what compile time and compile memory follow."""
    return count_instructions(jax.jit(fn).lower(*args).compile().as_text())


def attention_cost(impl: str, *, batch: int, length: int, heads: int, kv_heads: int,
                   head_dim: int, window: int | None = None, backward: bool = True,
                   dtype=jnp.float32, **kwargs) -> dict[str, float]:
    """Cost of one attention call (forward, or forward + backward) on causal self-attention."""
    spec = MaskSpec(causal=True, window=window)
    q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), dtype)

    def forward(q, k, v):
        return attention(q, k, v, spec, impl, **kwargs)

    if not backward:
        return compiled_cost(forward, q, kv, kv)
    grad = jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32)),
                    argnums=(0, 1, 2))
    return compiled_cost(grad, q, kv, kv)


def visible_pairs(length: int, rule: MaskRule | None = None, **rule_fields) -> int:
    """Exact number of (query, key) pairs the mask shows, self-attention, one head; the
    mask is `rule`, or the MaskRule of `rule_fields` (window=..., chunk=...)."""
    rule = MaskRule(**rule_fields) if rule is None else rule
    return int(rule.visible_key_counts(length).sum())


def attention_matmul_flops(pairs: int, batch: int, heads: int, head_dim: int) -> int:
    """Forward matmul FLOPs an exact kernel needs: q.k and p.v, 2*D each per pair."""
    return 4 * batch * heads * head_dim * pairs
