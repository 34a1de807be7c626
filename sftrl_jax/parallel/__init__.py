"""Device mesh (axes data, fsdp, tensor) and the logical-axis rules table."""

from sftrl_jax.parallel.mesh import make_mesh, parse_mesh_spec, resolve_axis_sizes
from sftrl_jax.parallel.rules import RULES, constrain, logical_to_spec, named_sharding, state_shardings

__all__ = [
    "RULES",
    "constrain",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "parse_mesh_spec",
    "resolve_axis_sizes",
    "state_shardings",
]
