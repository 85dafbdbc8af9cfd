"""Context parallelism on 8 fake CPU devices: the sequence split over `context` gives the
same attention, loss and gradients as one device (the dense oracle / context=1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridlm import ops
from hybridlm.config import ConfigError
from hybridlm.model import abstract_model
from hybridlm.parallel import activation_sharding, make_mesh, put_batch
from hybridlm.parallel.context import Layout, check_length, context_parallel, reorder_batch
from hybridlm.train.optim import decay_mask, make_optimizer
from hybridlm.train.state import init_state, make_layout
from hybridlm.train.step import loss_sums
from tests.train_helpers import random_batch, tiny_config

B, T, H, HKV, D = 2, 64, 4, 2, 8


def packed_ids():
    """Two rows of packed documents: segment ids and positions that restart per document."""
    seg = np.ones((B, T), np.int32)
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    for row, cut in ((0, 21), (1, 38)):  # cuts that fall inside chunks, not on edges
        seg[row, cut:] = 2
        pos[row, cut:] = np.arange(T - cut)
    return seg, pos


def test_layouts_place_chunks_and_find_left_neighbours():
    zz = Layout(4, "zigzag")
    assert zz.table().tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert zz.order(16).tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    # chunk 4 (device 3, slot 1) follows chunk 3 on the same device; chunk 6 follows 5
    assert zz.left_of(3, 1) == (3, 0) and zz.left_of(1, 1) == (2, 1)
    assert zz.left_of(0, 0) is None
    assert Layout(4, "contiguous").left_of(2, 0) == (1, 0)


@pytest.mark.parametrize("layout,impl,window,sinks", [
    ("zigzag", "ring", 5, False),  # halo: 4 keys from each chunk's left neighbour
    ("contiguous", "allgather", None, True),  # full causal layer, with GPT-OSS sinks
])  # zig-zag full layers (all-gather and ring): test_loss_and_gradients_match_one_device
def test_attention_matches_dense_oracle_with_packed_segments(devices, layout, impl, window,
                                                            sinks):
    mesh = make_mesh({"data": 1, "fsdp": 2, "context": 4, "tensor": 1}, devices)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (B, T, h, D))
               for kk, h in zip(keys[:3], (H, HKV, HKV), strict=True))
    sink = jax.random.normal(keys[3], (H,)) if sinks else None
    seg, pos = packed_ids()

    def loss(q, k, v, seg, pos, sink):
        spec = ops.MaskSpec(window=window, q_segment_ids=seg, kv_segment_ids=seg,
                            q_positions=pos, kv_positions=pos)
        return jnp.sum(jnp.sin(ops.attention(q, k, v, spec, "dense", sinks=sink)))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 5) if sinks else (0, 1, 2))
    want, want_grads = grad(q, k, v, seg, pos, sink)
    order = Layout(4, layout).order(T)
    with activation_sharding(mesh), context_parallel(
            mesh, {"context_attention": impl, "context_layout": layout}):
        lowered = jax.jit(grad).lower(*(x[:, order] for x in (q, k, v, seg, pos)), sink)
    hlo = lowered.as_text()
    assert ("collective_permute" in hlo) == (impl == "ring" or window is not None)
    assert ("all_gather" in hlo or "all-gather" in hlo) == (impl == "allgather")
    got, got_grads = lowered.compile()(*(x[:, order] for x in (q, k, v, seg, pos)), sink)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    back = np.argsort(order)
    for g, w in zip(got_grads, want_grads, strict=True):
        g = g if g.ndim == 1 else g[:, back]
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)


def loss_and_grads(cfg, mesh_cfg, devices, batch):
    """(loss, gradients) of one batch through the trainer's pieces on a mesh."""
    mesh = make_mesh(mesh_cfg, devices)
    graphdef, meta = abstract_model(cfg.model.to_dict(), cfg.train.seed)
    tx = make_optimizer(cfg.train, decay_mask(meta))
    layout = make_layout(graphdef, meta, tx, mesh)
    params = init_state(cfg.model.to_dict(), tx, layout, cfg.train.seed)["params"]
    settings = {**cfg.mesh.to_dict(), **mesh_cfg}
    placed = put_batch(reorder_batch(batch, mesh, settings), mesh, len(batch["inputs"]))

    def fn(params, batch):
        (_, (ce, w)), grads = jax.value_and_grad(loss_sums, has_aux=True)(params, graphdef,
                                                                         batch)
        return ce / w, grads

    with activation_sharding(mesh), context_parallel(mesh, settings):
        loss, grads = jax.jit(fn)(params, placed)
    return float(loss), jax.tree.map(np.asarray, grads)


ONE = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
CASES = {  # name: (paper variant, mesh)
    "rnope_swa_context4": ("rnope_swa", {"data": 2, "fsdp": 1, "context": 4, "tensor": 1,
                                         "context_attention": "ring"}),
    "rnope_swa_context2_fsdp2_tensor2": ("rnope_swa", {"data": 1, "fsdp": 2, "context": 2,
                                                       "tensor": 2}),
    "nope_context4": ("nope", {"data": 1, "fsdp": 2, "context": 4, "tensor": 1}),
}


def model_case(variant: str):
    cfg = tiny_config("data.seq_len=32", "train.batch_size=4", "model.attention_impl=dense",
                      variant=variant)
    batch = random_batch(cfg)
    seg, pos = packed_ids()
    batch["segment_ids"] = np.concatenate([seg, seg])[:, :32]
    batch["positions"] = np.concatenate([pos, pos])[:, :32]
    return cfg, batch


@functools.cache
def one_device(variant: str):
    cfg, batch = model_case(variant)
    return loss_and_grads(cfg, ONE, jax.devices()[:1], batch)


@pytest.mark.parametrize("name", CASES)
def test_loss_and_gradients_match_one_device(name, devices):
    variant, mesh_cfg = CASES[name]
    cfg, batch = model_case(variant)
    want_loss, want = one_device(variant)
    got_loss, got = loss_and_grads(cfg, mesh_cfg, devices, batch)
    np.testing.assert_allclose(got_loss, want_loss, rtol=2e-6)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=2e-4)


def test_sequence_must_split_into_the_layout_chunks(devices):
    mesh = make_mesh({"data": 2, "fsdp": 1, "context": 4, "tensor": 1}, devices)
    with pytest.raises(ConfigError, match=r"data.seq_len \(36\) must be a multiple of 8"):
        check_length(mesh, {"context_layout": "zigzag"}, 36)
    check_length(mesh, {"context_layout": "contiguous"}, 36)


@pytest.mark.parametrize("field,value", [("context_attention", "ulysses"),
                                         ("context_layout", "striped")])
def test_config_rejects_unknown_context_choices(field, value):
    with pytest.raises(ConfigError, match=f"mesh.{field} is '{value}'"):
        tiny_config(f"mesh.{field}={value}")


def test_reorder_batch_puts_rows_in_the_layout_order(devices):
    mesh = make_mesh({"data": 2, "fsdp": 1, "context": 4, "tensor": 1}, devices)
    tokens = np.tile(np.arange(16), (2, 1))
    got = reorder_batch({"inputs": tokens, "ids": np.arange(2)}, mesh,
                        {"context_layout": "zigzag"})
    assert got["inputs"][1].tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    assert got["ids"].tolist() == [0, 1]  # not [rows, T]: passed through
    same = reorder_batch({"inputs": tokens}, mesh, {"context_layout": "contiguous"})
    assert same["inputs"].tolist() == tokens.tolist()
