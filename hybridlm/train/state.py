"""The train state created already sharded: no device ever holds the whole model first.

`model.abstract_model` traces the model's constructor without allocating (shapes and
logical axis names only); `StateLayout` turns that into a NamedSharding for every leaf of the
state; `init_state` runs the initialiser under jit with those shardings pinned as outputs,
so each device computes only its own slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from hybridlm.model import Transformer
from hybridlm.parallel import param_shardings, replicated

COUNTERS = ("step", "applied", "nan_streak", "nan_skipped")


def _opt_shardings(tx: optax.GradientTransformation, abstract_opt: Any, params_abs: Any,
                   params_sharding: Any, mesh: Mesh) -> Any:
    """Optimizer leaves shaped like their parameter share its sharding; the rest (counts,
    Adafactor's factored row/column statistics) are replicated."""
    def pick(leaf, param, sharding):
        return sharding if leaf.shape == param.shape else replicated(mesh)

    return optax.tree_map_params(tx, pick, abstract_opt, params_abs, params_sharding,
                                 transform_non_params=lambda _: replicated(mesh))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Everything the loop needs to build, place and restore the state."""

    graphdef: nnx.GraphDef
    abstract: Any  # the state as jax.ShapeDtypeStructs that carry their shardings
    shardings: Any  # the same tree of NamedShardings

    @property
    def params_sharding(self) -> Any:
        return self.shardings["params"]


def make_layout(graphdef: nnx.GraphDef, params_meta: nnx.State,
                tx: optax.GradientTransformation, mesh: Mesh) -> StateLayout:
    """Shardings for params (logical-axis rules), optimizer state and counters."""
    params_abs = nnx.to_pure_dict(params_meta)
    p_shard = param_shardings(params_meta, mesh)
    opt_abs = jax.eval_shape(tx.init, params_abs)
    shardings = {"params": p_shard,
                 "opt_state": _opt_shardings(tx, opt_abs, params_abs, p_shard, mesh),
                 **{name: replicated(mesh) for name in COUNTERS}}
    shapes = {"params": params_abs, "opt_state": opt_abs,
              **{name: jax.ShapeDtypeStruct((), jnp.int32) for name in COUNTERS}}
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return StateLayout(graphdef, abstract, shardings)


def init_state(model_cfg: Mapping[str, Any], tx: optax.GradientTransformation,
               layout: StateLayout, seed: int = 0) -> dict[str, Any]:
    """A fresh state, each leaf created directly with its sharding."""
    def init():
        model = Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        zero = jnp.zeros((), jnp.int32)
        return {"params": params, "opt_state": tx.init(params),
                **{name: zero for name in COUNTERS}}

    lowered = jax.jit(init, out_shardings=layout.shardings).lower()
    # The initialiser runs once. On CPU, LLVM's optimisation of its ~40 random-number
    # loops is most of its compile time (20 s -> 5 s measured here) and saves nothing.
    options = {"xla_backend_optimization_level": 0} if _on_cpu(layout) else {}
    return lowered.compile(compiler_options=options)()


def _on_cpu(layout: StateLayout) -> bool:
    sharding = jax.tree.leaves(layout.shardings)[0]
    return next(iter(sharding.mesh.devices.flat)).platform == "cpu"


def count_params(layout: StateLayout) -> int:
    return sum(x.size for x in jax.tree.leaves(layout.abstract["params"]))
