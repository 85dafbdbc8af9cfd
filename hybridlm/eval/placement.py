"""Where evaluation runs: the training run's mesh, reshaped for inference.

Evaluation restores parameters straight into the same shards training used, so a model that
only fit sharded can still be evaluated. Its `fsdp` and `tensor` axes are kept (they split the
parameters); every other device becomes a `data` replica. The `context` axis is folded into
`data`: evaluation feeds one long sequence at a time through the model's own kernels, and
sequence-parallel attention stays a training feature (docs/evaluation.md).

The mesh can be reshaped with `--config.mesh.fsdp=N` / `--config.mesh.tensor=N` (for example
to evaluate on fewer devices than the run trained on); no other config field may change, since
the checkpoint fixes the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import ml_collections as mlc
from jax.sharding import Mesh

from hybridlm import config as config_lib
from hybridlm.errors import ConfigError
from hybridlm.model.attention import config_tiles
from hybridlm.ops import kernel_tiles
from hybridlm.parallel import activation_sharding, make_mesh

MESH_OVERRIDES = ("mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.context")


def check_overrides(overrides: Sequence[str]) -> None:
    """Only `mesh.*` axis sizes may be overridden at evaluation time."""
    for override in overrides:
        key = override.partition("=")[0].strip().removeprefix("--").removeprefix("config.")
        if key not in MESH_OVERRIDES:
            raise ConfigError(
                f"--config.{key}: evaluation takes the model and data settings from the "
                f"checkpoint; only the mesh may change here ({', '.join(MESH_OVERRIDES)})")


def eval_mesh(cfg: mlc.ConfigDict, overrides: Sequence[str] = (),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The run's fsdp x tensor over all devices, the rest of them data replicas (an axis
    the run set to -1 takes all the devices the other one leaves)."""
    check_overrides(overrides)
    mesh_cfg = mlc.ConfigDict(cfg.mesh.to_dict())
    for override in overrides:
        config_lib.apply_override(mlc.ConfigDict({"mesh": mesh_cfg}), override)
    devices = list(jax.devices() if devices is None else devices)
    fsdp, tensor = mesh_cfg.fsdp, mesh_cfg.tensor
    if -1 in (fsdp, tensor):  # the run's "rest of the devices" is the rest of these
        other = tensor if fsdp == -1 else fsdp
        rest = len(devices) // other if other != -1 and len(devices) % other == 0 else 1
        fsdp, tensor = (rest, tensor) if fsdp == -1 else (fsdp, rest)
    kept = fsdp * tensor
    if len(devices) % kept:
        raise ConfigError(
            f"the run's mesh.fsdp={fsdp} x mesh.tensor={tensor} = {kept} does not divide the "
            f"{len(devices)} devices here; pass --config.mesh.fsdp=N --config.mesh.tensor=M "
            f"with a product that divides {len(devices)} (parameters are resharded on load)")
    shape = {"data": len(devices) // kept, "fsdp": fsdp, "context": 1, "tensor": tensor}
    return make_mesh(shape, devices)


@contextlib.contextmanager
def on_mesh(mesh: Mesh, cfg: mlc.ConfigDict) -> Iterator[None]:
    """Trace and run the model on `mesh`, its sharding hints on (the training rules), with
    the run's attention tiles."""
    with activation_sharding(mesh), kernel_tiles(*config_tiles(cfg.model)):
        yield


def describe(mesh: Mesh) -> str:
    """'mesh data=2 fsdp=2 context=1 tensor=2 (8 cpu devices)'."""
    axes = " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    device = next(iter(mesh.devices.flat))
    return f"mesh {axes} ({math.prod(mesh.shape.values())} {device.platform} devices)"
