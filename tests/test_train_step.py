"""The train step: accumulation, skipped non-finite steps, z-loss, schedules, decay mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridlm.model import Transformer, abstract_model
from hybridlm.parallel import put_batch
from hybridlm.train.optim import decay_mask, schedule
from hybridlm.train.step import gradients, loss_sums
from tests.train_helpers import build, random_batch, tiny_config


@pytest.fixture(scope="module")
def tiny():
    """(config with 16-row batches, graph definition, parameters)."""
    cfg = tiny_config("train.batch_size=16")
    graphdef, _ = abstract_model(cfg.model.to_dict())
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(
        Transformer(cfg.model.to_dict(), rngs=nnx.Rngs(params=0)), nnx.Param)))
    return cfg, graphdef, init.lower().compile({"xla_backend_optimization_level": 0})()


def test_k_microbatches_of_b_equal_one_batch_of_k_times_b(tiny):
    """Gradients, loss and token counts; the sharded loop repeats this on a mesh."""
    cfg, graphdef, params = tiny
    batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, seed=1).items()}
    batch["weights"] = batch["weights"].at[3:5, 7:].set(0.0)  # padding counts in neither
    results = {}
    for k in (1, 4):
        fn = jax.jit(functools.partial(gradients, graphdef=graphdef, grad_accum=k, z_loss=1e-3))
        compiled = fn.lower(params, batch=batch).compile()
        results[k] = (compiled(params, batch=batch),
                      compiled.memory_analysis().temp_size_in_bytes)
    (g1, ce1, w1), temp1 = results[1]
    (g4, ce4, w4), temp4 = results[4]
    assert float(w1) == float(w4) == 16 * 16 - 2 * 9
    np.testing.assert_allclose(ce4, ce1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert temp4 < 0.6 * temp1, "the microbatches run one at a time"


def test_a_non_finite_step_is_skipped_and_counted(devices):
    cfg = tiny_config()
    mesh, layout, _, state, step = build(cfg)
    before = jax.device_get(state)
    bad = random_batch(cfg, seed=1)
    bad["weights"][3, 5] = np.nan  # e.g. a corrupt record
    state, metrics = step(state, put_batch(bad, mesh, cfg.train.batch_size))
    after_bad = jax.device_get(state)
    assert not np.isfinite(metrics["loss"])
    assert (int(after_bad["nan_streak"]), int(after_bad["nan_skipped"])) == (1, 1)
    assert (int(after_bad["step"]), int(after_bad["applied"])) == (1, 0)
    for x, y in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                    jax.tree.leaves(after_bad["params"]) + jax.tree.leaves(after_bad["opt_state"]),
                    strict=True):
        np.testing.assert_array_equal(x, y)
    state, metrics = step(state, put_batch(random_batch(cfg, seed=2), mesh, 8))
    after = jax.device_get(state)
    assert np.isfinite(metrics["loss"])
    assert (int(after["nan_streak"]), int(after["nan_skipped"]), int(after["applied"])) == (0, 1, 1)
    assert not np.array_equal(after["params"]["embed"], before["params"]["embed"])


def test_z_loss_adds_mean_squared_log_normaliser(tiny):
    cfg, graphdef, params = tiny
    batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, seed=3).items()}
    logits = np.asarray(jax.jit(lambda p, b: nnx.merge(graphdef, p)(
        b["inputs"], b["positions"], b["segment_ids"]))(params, batch), np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    objective, (ce_sum, w_sum) = jax.jit(functools.partial(loss_sums, graphdef=graphdef,
                                                           z_loss=1e-2))(params, batch=batch)
    np.testing.assert_allclose(ce_sum, (log_z - target).sum(), rtol=1e-5)
    np.testing.assert_allclose(objective, (log_z - target).sum() + 1e-2 * (log_z ** 2).sum(),
                               rtol=1e-5)
    assert float(w_sum) == cfg.train.batch_size * cfg.data.seq_len


def test_schedules_by_hand():
    def lr(name, step, **kw):
        cfg = tiny_config("train.steps=100", "train.warmup_steps=10", "train.learning_rate=1.0",
                          f"train.schedule={name}", "train.min_lr_ratio=0.1",
                          *[f"train.{k}={v}" for k, v in kw.items()])
        return float(schedule(cfg.train)(step))

    for name in ("cosine", "wsd", "constant"):
        assert lr(name, 0) == 0.0 and lr(name, 5) == pytest.approx(0.5)
        assert lr(name, 10) == pytest.approx(1.0)
    assert lr("cosine", 55) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert lr("cosine", 100) == pytest.approx(0.1)
    assert lr("wsd", 80, decay_fraction=0.2) == pytest.approx(1.0)  # stable until 80
    assert lr("wsd", 90, decay_fraction=0.2) == pytest.approx(0.55)  # linear 1 -> 0.1
    assert lr("wsd", 100, decay_fraction=0.2) == pytest.approx(0.1)
    assert lr("constant", 99) == 1.0


def test_weight_decay_only_on_matrices():
    cfg = tiny_config("model.num_layers=8", "model.layer_types.global.sink=True")
    mask = decay_mask(abstract_model(cfg.model.to_dict())[1])
    block = mask["groups"]["blocks"][0]
    assert block["attn"]["wq"] and block["mlp"]["wi"] and mask["embed"]
    # [layers, embed] norm scales are vectors per layer: no decay.
    assert not block["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
    assert not mask["groups"]["blocks"][3]["attn"]["sinks"]


def checkpoints(jaxpr) -> int:
    """jax.checkpoint calls in a jaxpr, nested jaxprs (scan bodies) included, counted once."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
            count += 1
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += checkpoints(inner)
    return count


def test_remat_checkpoints_every_block_the_tail_included():
    """`model.remat` wraps each block (4 per RNoPE-SWA group, and the tail layers past the
    last whole group), not the group: the backward pass recomputes one block at a time."""
    def count(*overrides):
        cfg = tiny_config(*overrides)
        graphdef, _ = abstract_model(cfg.model.to_dict())
        params = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(
            Transformer(cfg.model.to_dict(), rngs=nnx.Rngs(params=0)), nnx.Param)))
        batch = random_batch(cfg, seed=0)
        return checkpoints(jax.make_jaxpr(lambda p: loss_sums(p, graphdef, batch))(params).jaxpr)

    assert count("model.num_layers=8", "model.remat=full") == 4  # the scan body: one group
    assert count("model.num_layers=6", "model.remat=dots", "model.allow_partial_pattern=True") == 6
    assert count("model.num_layers=8") == 0


def test_remat_recomputes_the_same_gradients_in_less_memory():
    """Remat changes no value: the same gradients, in less memory."""
    results = {}
    for policy in ("none", "full"):
        cfg = tiny_config("model.num_layers=16", f"model.remat={policy}")
        graphdef, _ = abstract_model(cfg.model.to_dict())
        init = jax.jit(lambda cfg=cfg: nnx.to_pure_dict(nnx.state(
            Transformer(cfg.model.to_dict(), rngs=nnx.Rngs(params=0)), nnx.Param)))
        params = init.lower().compile({"xla_backend_optimization_level": 0})()
        batch = {k: jnp.asarray(v) for k, v in random_batch(cfg, seed=4).items()}
        fn = jax.jit(functools.partial(gradients, graphdef=graphdef, grad_accum=1, z_loss=0.0))
        compiled = fn.lower(params, batch=batch).compile()
        results[policy] = (compiled(params, batch=batch)[0],
                           compiled.memory_analysis().temp_size_in_bytes)
    for a, b in zip(jax.tree.leaves(results["none"][0]), jax.tree.leaves(results["full"][0]),
                    strict=True):
        np.testing.assert_array_equal(b, a)  # recomputation repeats the same operations
    assert results["full"][1] < 0.7 * results["none"][1], results
