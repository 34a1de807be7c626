"""Logical axis names -> mesh axes. The only module that names mesh axes.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, ...) in its `out_sharding`
metadata; activations are annotated with `constrain(x, names)`. `RULES` maps each logical name to
zero, one or several mesh axes. A mesh axis is dropped from a dimension when its size does not
divide that dimension (e.g. 2 kv heads on a tensor axis of 4, or the 128264-row Mllama embedding
on fsdp=16): the dimension is then replicated over that axis instead of failing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Mesh axes, outermost first: `data` replicates the model and splits the batch; `fsdp` splits the
# batch *and* shards parameters/optimizer state (ZeRO-3 style); `tensor` shards heads and MLP width.
DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# logical name -> mesh axis / tuple of mesh axes / None (replicated)
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": TENSOR,
    "embed": FSDP,
    "mlp": TENSOR,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "head_dim": None,
    "vision_embed": FSDP,
    "vision_mlp": TENSOR,
    "vision_heads": TENSOR,
    "layers": None,  # a layer stack's leading axis (`model.scan_layers`): every device holds every layer's shard
    # activations
    "batch": (DATA, FSDP),
    "seq": None,
    "act_embed": None,
    "act_mlp": TENSOR,
    "act_heads": TENSOR,
    "act_kv_heads": TENSOR,
    "act_vocab": TENSOR,
}


# The sampler's layout (prefill and decode, `sampling.layout: decode`): every model-parallel name over
# fsdp x tensor together and the batch over data only: each device keeps 1/(fsdp x tensor) of every
# matrix (Megatron-style column / row parallel: q/k/v and gate/up split by heads and MLP width, o and
# down by their inputs, one all-reduce of [B, T, D] after each) and computes every row of its data
# replica, so no program ever gathers a whole matrix. Training keeps `RULES` (FSDP: parameters
# sharded, gathered layer by layer, the batch split), which for decoding would all-gather the whole
# model on every device (`sftrl plan`: 27.96 GiB per device at 11B).
MODEL_PARALLEL = (FSDP, TENSOR)
DECODE_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    **RULES,
    "vocab": MODEL_PARALLEL,
    "embed": None,
    "mlp": MODEL_PARALLEL,
    "heads": MODEL_PARALLEL,
    "kv_heads": MODEL_PARALLEL,
    "vision_embed": None,
    "vision_mlp": MODEL_PARALLEL,
    "vision_heads": MODEL_PARALLEL,
    "batch": DATA,
    "act_mlp": MODEL_PARALLEL,
    "act_heads": MODEL_PARALLEL,
    "act_kv_heads": MODEL_PARALLEL,
    "act_vocab": MODEL_PARALLEL,
}
TABLES: Mapping[str, Mapping] = {"train": RULES, "decode": DECODE_RULES}
_ACTIVE: contextvars.ContextVar[Mapping] = contextvars.ContextVar("sftrl_rules", default=RULES)


def active() -> Mapping[str, str | tuple[str, ...] | None]:
    """The rules table in force (`RULES` unless inside `using`)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def using(table: Mapping | str) -> Iterator[None]:
    """Trace (and compute shardings) under another rules table: `DECODE_RULES` or its name "decode"."""
    if isinstance(table, str):
        if table not in TABLES:
            raise KeyError(f"unknown layout {table!r}; layouts: {', '.join(TABLES)}")
        table = TABLES[table]
    token = _ACTIVE.set(table)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def batch_axes() -> tuple[str, ...]:
    """The mesh axes the batch is split over under the active table."""
    return _axes("batch")


def batch_ways(mesh) -> int:
    """How many ways the batch is split on `mesh` (a Mesh, or anything with a `shape` mapping) under
    the active table; 1 without a mesh."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape.get(a, 1) for a in batch_axes())


def _axes(name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    table = active()
    if name not in table:
        raise KeyError(f"logical axis name {name!r} has no rule in sftrl_jax.parallel.rules.RULES")
    rule = table[name]
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], axis_sizes: Mapping[str, int]) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims are named `names`, on a mesh of `axis_sizes`.

    Mesh axes missing from the mesh, already used by an earlier dimension, or whose size does not
    divide the dimension are dropped (that dimension is replicated over them).
    """
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} logical names {tuple(names)} for an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        kept = []
        for axis in _axes(name):
            size = axis_sizes.get(axis)
            if size is None or axis in used:
                continue
            if dim % (math.prod(axis_sizes[a] for a in kept) * size) == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape)))


def param_names(variable) -> tuple[str | None, ...]:
    """Logical names of an nnx Variable (its `out_sharding` metadata); replicated if it has none."""
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else (None,) * len(variable.shape)


def state_shardings(state, mesh: jax.sharding.Mesh):
    """NamedSharding for every Variable of an (abstract) nnx State, same tree structure."""
    from flax import nnx

    def one(v):
        return v.replace(named_sharding(param_names(v), v.shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh (`jax.set_mesh`); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def constrain_params(tree):
    """`constrain` every Variable of an nnx State (parameters, or gradients of them: same tree) by its
    own logical names: a gradient sum is then sharded like its parameter instead of where XLA's
    propagation puts it (it kept the scanned accumulator whole on every device)."""
    from flax import nnx

    def one(v):
        return v.replace(constrain(v[...], param_names(v)))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
