"""Logical axis names -> mesh axes, and arrays created or placed with those shardings.

Parameters and activations use different tables because one name can mean different
things: `embed` on a weight is split over `fsdp` (each device keeps a slice of every
matrix), while `embed` on an activation stays whole because the activation's `batch`
axis already uses `fsdp`. A mesh axis that does not divide a dimension is dropped for
that array (e.g. 2 key/value heads on tensor=4 stay replicated) rather than failing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hybridlm.parallel.mesh import BATCH_AXES

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

PARAM_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)

ACTIVATION_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("length", "context"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = PARAM_RULES) -> P:
    """PartitionSpec for an array with these logical axis names and this shape.

    Mesh axes of size 1, axes already used by an earlier dimension, and axes that would
    not divide the dimension evenly are left out.
    """
    table, used, spec = dict(rules), set(), []
    for name, size in zip(names, shape, strict=True):
        target = table.get(name) if name else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in axes:
            split = math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]
            if mesh.shape[axis] > 1 and axis not in used and size % split == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: Rules = PARAM_RULES):
    """A pure dict of NamedShardings mirroring `nnx.to_pure_dict(abstract_params)`.

    Reads each parameter's logical names from its `out_sharding` metadata.
    """
    def sharding(var: nnx.Variable) -> NamedSharding:
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules))

    shardings = jax.tree.map(lambda v: v.replace(sharding(v)), abstract_params,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, length] inputs: rows over data x fsdp, the sequence over context."""
    rows = tuple(axis for axis in BATCH_AXES if mesh.shape[axis] > 1)
    length = "context" if mesh.shape["context"] > 1 else None
    return NamedSharding(mesh, P(rows or None, length))


def process_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """The rows of a [global_rows, ...] batch that this process's devices hold under
    `batch_sharding`, ascending: the rows it must load, in the order put_batch takes them.
    Read from the sharding, not assumed to be a block per process (a mesh may interleave
    processes' devices, or replicate rows across processes)."""
    shape = (global_rows, mesh.shape["context"])
    index = batch_sharding(mesh).addressable_devices_indices_map(shape)
    blocks = sorted({(s[0].start or 0, s[0].stop or global_rows) for s in index.values()})
    return np.concatenate([np.arange(a, b) for a, b in blocks])


def put_batch(local: Mapping[str, np.ndarray], mesh: Mesh,
              global_rows: int) -> dict[str, Any]:
    """This process's rows of each [rows, ...] array -> one global jax.Array per key.

    Works unchanged on one host and many: every process passes only the rows it holds,
    `process_rows(mesh, global_rows)`, in that order.
    """
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(
                sharding, value, (global_rows, *value.shape[1:]))
            for key, value in local.items()}
