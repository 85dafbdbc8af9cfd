"""Checkpoints on disk (real Orbax): load_model / export_params, resume, fallback, stages."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from hybridlm.config import ConfigError
from hybridlm.parallel import put_batch
from hybridlm.train.checkpoint import Checkpointer, export_params, load_model
from tests.train_helpers import build, random_batch, tiny_config

DENSE = "model.attention_impl=dense"
SHARDED = {"data": 1, "fsdp": 2, "context": 1, "tensor": 4}


def numpy_tree(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, devices):
    """A tiny model trained 2 steps on fsdp=2 x tensor=4, checkpointed at steps 1 and 2."""
    cfg = tiny_config(DENSE, "checkpoint.async_save=False")
    workdir = tmp_path_factory.mktemp("run")
    mesh, layout, tx, state, step = build(cfg, SHARDED, devices)
    checkpointer = Checkpointer(cfg, workdir)
    saved = {}
    for i in (1, 2):
        state, _ = step(state, put_batch(random_batch(cfg, i), mesh, cfg.train.batch_size))
        checkpointer.save(i, state, {"position": i})
        saved[i] = numpy_tree(state)
    checkpointer.close()
    return cfg, workdir, saved


def model_params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_load_model_reads_a_workdir_latest_or_a_given_step(trained):
    cfg, workdir, saved = trained
    loaded_cfg, model, step = load_model(workdir)
    assert step == 2 and loaded_cfg.to_dict() == cfg.to_dict()
    params = model_params(model)
    assert_trees_equal(params, saved[2]["params"])
    leaf = jax.tree.leaves(params)[0]
    assert leaf.dtype == np.float32 and leaf.sharding.device_set == {jax.local_devices()[0]}
    _, model, step = load_model(workdir / "checkpoints", step=1)
    assert step == 1
    assert_trees_equal(model_params(model), saved[1]["params"])
    with pytest.raises(ConfigError, match="no checkpoint of step 5"):
        load_model(workdir, step=5)


def test_export_then_load_model_round_trips(trained, tmp_path):
    cfg, workdir, saved = trained
    _, model, _ = load_model(workdir)
    export_params(cfg, model_params(model), tmp_path / "export", step=2)
    loaded_cfg, exported, step = load_model(tmp_path / "export")
    assert step == 2 and loaded_cfg.to_dict() == cfg.to_dict()
    assert_trees_equal(model_params(exported), saved[2]["params"])
    tokens = random_batch(cfg)["inputs"][:2]
    np.testing.assert_array_equal(np.asarray(exported(tokens)), np.asarray(model(tokens)))
    with pytest.raises(ConfigError, match="not empty"):
        export_params(cfg, model_params(model), tmp_path / "export")


def test_load_model_names_what_a_path_must_hold(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        load_model(tmp_path)
