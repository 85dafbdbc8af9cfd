"""The device mesh from the `mesh` config section.

Four named axes, outermost first (slowest links outermost, tensor parallelism innermost):

    data     replicas of the whole model; each takes a slice of the batch
    fsdp     the batch is split as for `data`, and parameters and optimizer state are
             split too (ZeRO-3 / fully sharded data parallel)
    context  the sequence is split (attention gathers the keys and values it needs)
    tensor   heads, MLP units and vocabulary are split inside each layer

A field of -1 takes the devices the other axes leave. The axes use `AxisType.Auto` so that
XLA's GSPMD propagates shardings from the logical-axis rules (STACK_NOTES: the default
Explicit axes reject unannotated gathers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from hybridlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve -1 against the device count; ConfigError when the mesh does not fit."""
    sizes = {axis: mesh_cfg[axis] for axis in MESH_AXES}
    fields = ", ".join(f"mesh.{a}={s}" for a, s in sizes.items())
    free = [axis for axis, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"the mesh ({fields}) does not fit {num_devices} devices: the fixed axes "
                f"multiply to {fixed}, which does not divide {num_devices}; change the mesh "
                "fields so that their product divides the device count")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"the mesh ({fields}) has {fixed} devices but this job has {num_devices}; make "
            "the product of the mesh fields equal the device count, or set one field "
            "(usually mesh.data) to -1 to take the rest")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def batch_axes(mesh: Mesh) -> int:
    """How many ways the batch is split: data x fsdp."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch(mesh: Mesh, batch_size: int, seq_len: int, field: str,
                process_count: int = 1) -> None:
    """A batch of `batch_size` x `seq_len` must split evenly over the mesh and processes."""
    rows = batch_axes(mesh)
    if batch_size % rows:
        raise ConfigError(
            f"{field} ({batch_size}) is not a multiple of mesh.data x mesh.fsdp "
            f"({mesh.shape['data']} x {mesh.shape['fsdp']} = {rows}): every device of "
            "those axes needs the same number of sequences")
    if batch_size % process_count:
        raise ConfigError(f"{field} ({batch_size}) is not a multiple of the number of "
                          f"processes ({process_count}): each process loads an equal share")
    if seq_len % mesh.shape["context"]:
        raise ConfigError(f"data.seq_len ({seq_len}) is not a multiple of mesh.context "
                          f"({mesh.shape['context']})")
