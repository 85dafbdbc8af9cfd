"""Cost claims through XLA's cost analysis, which is deterministic (no wall-clock).

XLA counts a loop body once: `cost.compiled_cost` takes FLOPs from the program with the
blockwise kernel's loops unrolled, temp bytes from the program as it runs; the model is
measured with scan_layers=False for the same reason.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from hybridlm import config as config_lib
from hybridlm.model import Transformer
from hybridlm.model.attention import config_tiles
from hybridlm.ops import MaskSpec, attention, blockwise, kernel_tiles
from hybridlm.ops.cost import (
    attention_cost,
    attention_matmul_flops,
    compiled_cost,
    hlo_instructions,
    visible_pairs,
)
from hybridlm.train.state import COUNTERS
from hybridlm.train.step import make_train_step
from hybridlm.train.trainer import BATCH_KEYS

SHAPE = dict(batch=1, heads=2, kv_heads=2, head_dim=64)


def flops(impl, length, window=None, backward=True, **kw):
    return attention_cost(impl, length=length, window=window, backward=backward, **SHAPE,
                          **kw)


def test_windowed_blockwise_costs_double_when_length_doubles():
    """Forward + backward of a W=256 window: FLOPs and temp bytes grow like T, not T^2."""
    small, large = (flops("blockwise", t, window=256) for t in (2048, 4096))
    assert 1.9 < large["flops"] / small["flops"] < 2.15
    assert large["temp_bytes"] < 2.3 * small["temp_bytes"]
    dense = flops("dense", 4096, window=256)
    assert large["flops"] < dense["flops"] / 4 and large["temp_bytes"] < dense["temp_bytes"] / 10


def test_causal_flops_quadruple_and_blockwise_forward_does_about_half_of_dense():
    block = [flops("blockwise", t, backward=False, block_q=128, block_kv=128)["flops"]
             for t in (512, 1024, 2048)]
    for small, large in zip(block, block[1:], strict=False):
        assert 3.5 < large / small < 4.1  # (n^2 + n) / 2 blocks of n = T / 128
    dense = flops("dense", 2048, backward=False)["flops"]
    assert block[-1] < 0.6 * dense  # dense pays every masked score too


@pytest.mark.parametrize("window", [None, 512])
def test_blockwise_forward_flops_within_a_quarter_of_the_visible_pairs(window):
    t = 4096
    exact = attention_matmul_flops(visible_pairs(t, window=window), SHAPE["batch"],
                                   SHAPE["heads"], SHAPE["head_dim"])
    got = flops("blockwise", t, window=window, backward=False,
                **({} if window else dict(block_q=256, block_kv=256)))["flops"]
    assert exact < got < 1.25 * exact


def train_step_cost(model_cfg, length):
    """FLOPs and temp bytes of the trainer's own step (state dict, full batch contract)."""
    cfg = dict(model_cfg.to_dict(), scan_layers=False)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))),
                                 nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(1e-3)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
             **{name: scalar for name in COUNTERS}}
    batch = {key: jax.ShapeDtypeStruct((1, length), jnp.dtype(dtype))
             for key, dtype in BATCH_KEYS.items()}
    step = make_train_step(graphdef, tx, optax.constant_schedule(1e-3))
    with kernel_tiles(*config_tiles(cfg)):  # as the trainer traces it
        cost = compiled_cost(step, state, batch)
    return cost["flops"], cost["temp_bytes"]


def layer_instructions(length: int, window: int | None) -> int:
    """Instructions of one attention layer's compiled forward + backward (tiny heads)."""
    q = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
    spec = MaskSpec(causal=True, window=window)

    def loss(q, k, v, cotangent):
        return jnp.sum(attention(q, k, v, spec, "blockwise") * cotangent)

    return hlo_instructions(jax.grad(loss, argnums=(0, 1, 2)), q, q, q, q)


@pytest.mark.parametrize("window", [None, 1024])
def test_a_layers_program_does_not_grow_with_the_length(window, monkeypatch):
    """The looped kernel's program is the same size at 2k and 32k; the unrolled steps of
    before grew 68x for a full causal layer (docs/performance.md). Strips are pinned off:
    up to MAX_STRIPS query blocks (a full layer at 2k) the default runs strips instead,
    unrolled, at most that many whatever T."""
    monkeypatch.setattr(blockwise, "MAX_STRIPS", 0)
    short, long = (layer_instructions(t, window) for t in (2048, 32768))
    assert abs(long - short) <= 0.1 * short, (short, long)


@pytest.mark.slow
def test_rnope_swa_train_step_at_16k_costs_less_than_all_full_layers():
    """The paper's efficiency claim at T=16k on a model tiny in width (quick to compile):
    3 of 4 layers with a 1024-key window against the same model with every layer full,
    both on the default kernel (blockwise on CPU).
    One tile per 8192 tokens for the full layers keeps the unrolled program short."""
    t = 16384
    costs = {}
    for variant in ("rnope_swa", "rnope"):
        cfg = config_lib.load(f"configs/paper.py:variant={variant},window=1024,seq_len={t}", [
            "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
            "model.head_dim=16", "model.mlp_dim=64", "model.vocab_size=300",
            "model.attention_block_q=8192", "model.attention_block_kv=8192"])
        costs[variant] = train_step_cost(cfg.model, t)
    (swa_flops, swa_temp), (full_flops, full_temp) = costs["rnope_swa"], costs["rnope"]
    assert swa_flops < 0.6 * full_flops, costs
    # blockwise keeps every layer's scratch O(T * block), full layers too: the window saves
    # compute in training, and must not cost memory (docs/performance.md).
    assert swa_temp <= 1.1 * full_temp, costs


def _layer_scan_grad_temp_bytes(length: int) -> int:
    """Temp bytes of d/dx of two scanned full causal layers on packed documents (loops)."""
    def layer(x, segments, positions):
        spec = MaskSpec(causal=True, q_segment_ids=segments, kv_segment_ids=segments,
                        q_positions=positions, kv_positions=positions)
        return x + blockwise.blockwise_attention(x, x, x, spec, scale=0.25, strips=False)

    def loss(x, segments, positions):
        body = lambda h, _: (layer(h, segments, positions), None)  # noqa: E731
        return jax.lax.scan(body, x, None, length=2)[0].sum()

    x = jnp.ones((1, length, 4, 16))
    ids = jnp.zeros((1, length), jnp.int32)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    compiled = jax.jit(jax.grad(loss)).lower(x, ids, positions).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_differentiating_a_layer_scan_leaves_the_mask_inside_the_kernels_loop():
    """The mask depends only on block indices and positions, both the same in every layer;
    unless the kernel ties it to its loop, differentiating the layers' scan hoists it out,
    every iteration's mask at once: temp bytes O(T^2) (34 GB at 128k), not O(T)."""
    small, large = (_layer_scan_grad_temp_bytes(t) for t in (4096, 8192))
    assert large < 2.3 * small, (small, large)
