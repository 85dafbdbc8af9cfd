"""The mesh from config, logical-axis rules, sharded creation and input placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from hybridlm.config import ConfigError
from hybridlm.model import abstract_model
from hybridlm.model.layers import constrain
from hybridlm.parallel import (
    ACTIVATION_RULES,
    PARAM_RULES,
    activation_sharding,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    mesh_shape,
    put_batch,
)
from hybridlm.parallel.mesh import check_batch
from hybridlm.train.optim import decay_mask, make_optimizer
from hybridlm.train.state import init_state, make_layout
from tests.train_helpers import random_batch, single_device_mesh_cfg, tiny_config


def mesh_cfg(**sizes):
    return {**single_device_mesh_cfg(), **sizes}


def test_minus_one_takes_the_remaining_devices():
    assert mesh_shape(mesh_cfg(data=-1, fsdp=2, tensor=2), 8) == \
        {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    assert mesh_shape(mesh_cfg(data=1, fsdp=-1), 8)["fsdp"] == 8


@pytest.mark.parametrize("sizes,message", [
    (dict(data=3), "has 3 devices but this job has 8"),
    (dict(data=2, tensor=2), "has 4 devices but this job has 8"),
    (dict(data=-1, tensor=3), "the fixed axes multiply to 3, which does not divide 8"),
])
def test_a_mesh_that_does_not_fit_is_a_config_error(sizes, message, devices):
    with pytest.raises(ConfigError, match=message):
        make_mesh(mesh_cfg(**sizes))


def test_mesh_axes_are_auto_for_gspmd(devices):
    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "context", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_logical_names_map_to_mesh_axes(devices):
    mesh = make_mesh(mesh_cfg(data=1, fsdp=2, tensor=4))
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), mesh) == \
        P(None, "fsdp", "tensor", None)
    # 2 kv heads do not split 4 ways: replicated on that axis rather than an error.
    assert logical_to_spec(("embed", None, "kv_heads", "head_dim"), (32, 2, 2, 8), mesh) == \
        P("fsdp", None, None, None)
    assert logical_to_spec(("vocab", "embed"), (300, 32), mesh) == P("tensor", "fsdp")
    # Activations: the batch takes data x fsdp; embed stays whole (fsdp is taken).
    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    assert logical_to_spec(("batch", "length", "embed"), (8, 16, 32), mesh,
                           ACTIVATION_RULES) == P(("data", "fsdp"), None, None)
    # A mesh axis is used at most once per array; size-1 axes are left out.
    assert logical_to_spec(("embed", "embed"), (32, 32), mesh, PARAM_RULES) == P("fsdp", None)
    assert logical_to_spec(("batch",), (6,), mesh, ACTIVATION_RULES) == P(("data",))


def test_constrain_means_nothing_until_parallel_installs_the_rules(devices):
    """The model only names axes: without a resolver `constrain` is the identity (a mesh
    alone changes nothing); inside `activation_sharding` it constrains by the rules."""
    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2), devices)
    x, names = jnp.arange(72.0).reshape(4, 3, 6), ("batch", "length", "heads")
    assert constrain(x, names) is x

    def run():  # a fresh function each time: contexts are not part of jit's cache key
        return jax.jit(lambda x: constrain(x * 2, names))(x)

    with jax.set_mesh(mesh):
        plain = run()
    with activation_sharding(mesh):
        hinted = run()
    assert plain.sharding.is_fully_replicated
    assert hinted.sharding.spec == logical_to_spec(names, x.shape, mesh, ACTIVATION_RULES)
    assert hinted.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(hinted, plain)


def test_state_is_created_sharded_and_equals_the_single_device_state(devices):
    cfg = tiny_config()
    graphdef, meta = abstract_model(cfg.model.to_dict())
    tx = make_optimizer(cfg.train, decay_mask(meta))
    states = {}
    for name, sizes, devs in [("one", single_device_mesh_cfg(), devices[:1]),
                              ("fsdp2_tp4", mesh_cfg(fsdp=2, tensor=4), None)]:
        layout = make_layout(graphdef, meta, tx, make_mesh(sizes, devs))
        states[name] = (layout, init_state(cfg.model.to_dict(), tx, layout))
    layout, sharded = states["fsdp2_tp4"]
    wq = sharded["params"]["groups"]["blocks"][0]["attn"]["wq"]  # [layers, embed, heads, hd]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in wq.addressable_shards} == {(1, 16, 1, 8)}
    mu = sharded["opt_state"][1][0].mu["groups"]["blocks"][0]["attn"]["wq"]
    assert mu.sharding.spec == wq.sharding.spec, "Adam moments follow their parameter"
    for leaf, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(layout.shardings),
                          strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    for a, b in zip(jax.tree.leaves(states["one"][1]), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_adafactor_factored_statistics_are_replicated(devices):
    cfg = tiny_config("train.optimizer=adafactor", "model.d_model=128", "model.mlp_dim=256")
    graphdef, meta = abstract_model(cfg.model.to_dict())
    tx = make_optimizer(cfg.train, decay_mask(meta))
    layout = make_layout(graphdef, meta, tx, make_mesh(mesh_cfg(fsdp=2, tensor=4)))
    factored = layout.abstract["opt_state"][1]  # after clip_by_global_norm
    v_row = factored.v_row["groups"]["blocks"][0]["mlp"]["wo"]  # a factor of wo [1, 256, 128]
    assert v_row.ndim == 2 and v_row.size < 256 * 128 and v_row.sharding.spec == P()
    norm_v = factored.v["final_norm"]["scale"]  # unfactored: same shape as the parameter
    assert norm_v.shape == (128,) and norm_v.sharding.spec == P("fsdp")


def test_put_batch_splits_rows_over_data_and_fsdp(devices):
    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    cfg = tiny_config()
    local = random_batch(cfg)
    batch = put_batch(local, mesh, cfg.train.batch_size)
    assert batch["inputs"].sharding == batch_sharding(mesh)
    assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 16)}
    for key, value in local.items():
        np.testing.assert_array_equal(np.asarray(batch[key]), value)


def test_batches_that_do_not_split_are_config_errors(devices):
    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, context=2))
    with pytest.raises(ConfigError, match=r"train.batch_size \(6\) is not a multiple of "
                       r"mesh.data x mesh.fsdp \(2 x 2 = 4\)"):
        check_batch(mesh, 6, 16, "train.batch_size")
    with pytest.raises(ConfigError, match=r"data.seq_len \(15\) is not a multiple of mesh"):
        check_batch(mesh, 8, 15, "train.batch_size")
    with pytest.raises(ConfigError, match="multiple of the number of processes \\(3\\)"):
        check_batch(mesh, 4, 16, "train.batch_size", process_count=3)
