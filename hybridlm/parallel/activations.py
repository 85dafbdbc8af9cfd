"""What the model's logical hints mean on a mesh, installed around tracing.

The model names axes (`constrain(x, ("batch", "length", "embed"))`) and calls
`hybridlm.ops.attention`; it knows no mesh. `activation_sharding(mesh)` gives both their
meaning on `mesh`:

  constrain   a sharding constraint by the activation rules (`rules.logical_to_spec`:
              a mesh axis that does not divide a dimension is left out)
  attention   kernels XLA's partitioner cannot split (Mosaic: splash,
              `ops.attention.MANUAL_KERNELS`) run inside `jax.shard_map`, each device on its
              rows (the mesh axes of `batch`) and heads (those of `heads`, when the key/value
              heads split alike) and on whole sequences; every other kernel is left to XLA.
              Context parallelism (parallel/context.py) installs its own handler inside this.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hybridlm.model.layers import Axes, constraint_resolver
from hybridlm.ops.attention import MANUAL_KERNELS, LocalKernel, parallel_attention
from hybridlm.ops.masks import MaskSpec
from hybridlm.parallel.rules import ACTIVATION_RULES, Rules, logical_to_spec


def constrain_on(mesh: Mesh, rules: Rules = ACTIVATION_RULES
                 ) -> Callable[[jax.Array, Axes], jax.Array]:
    """The resolver of the model's `constrain(x, names)` on `mesh`."""
    def resolve(x: jax.Array, names: Axes) -> jax.Array:
        spec = logical_to_spec(names, x.shape, mesh, rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return resolve


def per_device_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *,
                         local: LocalKernel, scale: float, sinks: jax.Array | None,
                         mesh: Mesh) -> jax.Array:
    """`hybridlm.ops.attention` on `mesh`: a manual kernel per device, the rest as is."""
    if local.impl not in MANUAL_KERNELS:
        return local(q, k, v, spec, scale=scale, sinks=sinks)
    q_spec = logical_to_spec(("batch", None, "heads", None), q.shape, mesh, ACTIVATION_RULES)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh,
                              ACTIVATION_RULES)
    if q_spec[2] != kv_spec[2]:  # keep GQA groups together: heads split alike, or not at all
        q_spec = kv_spec = P(q_spec[0], None, None, None)
    # The mask's per-token arrays (segment ids, positions: [B or 1, L]) split by rows.
    per_token, mask_tree = jax.tree.flatten(spec)
    per_token = [jnp.broadcast_to(x, (q.shape[0], x.shape[-1])) for x in per_token]

    def shard(q, k, v, per_token, sinks):
        return local(q, k, v, jax.tree.unflatten(mask_tree, per_token), scale=scale,
                     sinks=sinks)

    in_specs = (q_spec, kv_spec, kv_spec, [P(q_spec[0], None)] * len(per_token),
                None if sinks is None else P(q_spec[2]))
    return jax.shard_map(shard, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                         check_vma=False)(q, k, v, per_token, sinks)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """Trace the model inside this to run it on `mesh` (see the module docstring)."""
    with (jax.set_mesh(mesh), constraint_resolver(constrain_on(mesh)),
          parallel_attention(functools.partial(per_device_attention, mesh=mesh))):
        yield
