"""Parallelism applied from outside the model: the mesh, logical-axis rules, sharded inputs.

The model only names its axes (`vocab`, `embed`, `heads`, ... on parameters; `batch`,
`length`, ... on activations); this package decides which mesh axis each name splits over.
"""

from hybridlm.parallel.activations import activation_sharding
from hybridlm.parallel.mesh import MESH_AXES, batch_axes, make_mesh, mesh_shape
from hybridlm.parallel.rules import (
    ACTIVATION_RULES,
    PARAM_RULES,
    batch_sharding,
    logical_to_spec,
    param_shardings,
    process_rows,
    put_batch,
    replicated,
)

__all__ = ["ACTIVATION_RULES", "MESH_AXES", "PARAM_RULES", "activation_sharding", "batch_axes",
           "batch_sharding", "logical_to_spec", "make_mesh", "mesh_shape", "param_shardings",
           "process_rows", "put_batch", "replicated"]
