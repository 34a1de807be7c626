"""Host batches and train states onto a mesh: the placement both training arms (SFT, RL) share.

`global_batch` turns each process's numpy batch into global arrays sharded over the batch axes;
`replicated_batch` does it for a batch every process holds whole (RL), `to_host` brings a global array
back to every host; `on_mesh` puts a pytree on the mesh, keeping the sharding of arrays already there. They live here,
not in one arm's loop, so that `sft` and `rl` import them from below and never from each other.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from sftrl_jax.parallel import rules

# Arrays whose axis 1 is not time (images and their tile metadata): never padded by `pad_time`.
_NOT_TIME = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


def global_batch(batch: dict[str, np.ndarray], mesh, *, pad_id: int = 0) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded over the batch axes.

    With several processes the local batches may have picked different length buckets: all are
    padded to the longest (one tiny host all-gather per step).
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        T = int(np.max(multihost_utils.process_allgather(np.int32(batch["input_ids"].shape[1]))))
        batch = pad_time(batch, T, pad_id)
    out = {}
    for k, x in batch.items():
        names = ("batch",) + (None,) * (x.ndim - 1)
        sharding = rules.named_sharding(names, (x.shape[0] * jax.process_count(), *x.shape[1:]), mesh)
        out[k] = jax.make_array_from_process_local_data(sharding, x)
    return out


def replicated_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """The same whole numpy batch on every process -> global arrays sharded over the batch axes, each
    device taking its own rows (RL, where every process builds every batch: `episodes`)."""
    out = {}
    for k, x in batch.items():
        sharding = rules.named_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
        out[k] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (an all-gather when other processes hold parts of it)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def pad_time(batch: dict[str, np.ndarray], T: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pads the time axis (axis 1) of the [B, T, ...] arrays to T (ids with pad_id, masks with 0)."""
    out = dict(batch)
    for k in batch:
        if batch[k].ndim >= 2 and k not in _NOT_TIME and batch[k].shape[1] < T:
            x = batch[k]
            widths = [(0, 0), (0, T - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
            out[k] = np.pad(x, widths, constant_values=pad_id if k in ("input_ids", "targets") else 0)
    return out


def on_mesh(tree: Any, mesh) -> Any:
    """Every array on `mesh`: arrays already sharded there keep their sharding, others are replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, tree)


def param_count(params) -> int:
    """Number of scalars in a parameter pytree (the N of the compute axis)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
