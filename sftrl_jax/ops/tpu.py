"""The TPU backend of the seam: the Pallas flash-attention kernel JAX ships
(`jax.experimental.pallas.ops.tpu.flash_attention`) for causal self-attention, XLA otherwise.

The kernel takes masks as segment ids, so it runs where the mask is what our model builds for
training and prefill: causal by index with key padding (`ops.attention`'s `causal=True` promise):
queries and keys get segment 1 when real, 0 when padding; a real query then sees exactly the real
keys up to itself. (Padding queries see padding keys instead of attending uniformly as the XLA
path does; their outputs are never read.) Sequence lengths must be multiples of its 128-row
blocks; grouped kv heads are repeated to the query heads. A Pallas (Mosaic) kernel cannot be
partitioned by XLA's SPMD pass, so on a mesh the call runs per device inside `jax.shard_map`: each
device attends its own rows and heads (batch and heads split as the rules table splits the model's
activations; attention never mixes rows or heads). Everything else, cross-attention to image tiles
and the one-token decode steps included, runs the XLA ops of `ops.xla`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sftrl_jax.ops import policy as policy_lib
from sftrl_jax.ops import xla

BLOCK = 128


def attention(q, k, v, mask, *, scale: float, causal: bool = False) -> jax.Array:
    forced = policy_lib.current().attention
    b, t, n, _ = q.shape
    if causal and mask is None:
        mask = jnp.broadcast_to(jnp.tri(t, dtype=bool), (b, t, t))
    if forced in (None, "flash") and causal and k.shape[1] == t and t % BLOCK == 0:
        g = n // k.shape[2]
        valid = mask[:, -1, :].astype(jnp.int32)  # [B, S]: the last query of a causal mask sees every real key
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)))
        out = _flash_on_mesh(qt, kt, vt, valid, float(scale))
        return out.transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T, N, H]
    return xla.attention(q, k, v, mask, scale=scale)


def _flash(q, k, v, valid, scale):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    seg = fa.SegmentIds(q=valid, kv=valid)
    return fa.flash_attention(q, k, v, segment_ids=seg, causal=True, sm_scale=scale)


def _flash_on_mesh(q, k, v, valid, scale):
    """The kernel on q/k/v [B, N, T, H] and the key-validity [B, T], per device under the current mesh
    (rows over the batch axes, heads over the head axes, where they divide), or whole without one."""
    from sftrl_jax.parallel import rules

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _flash(q, k, v, valid, scale)
    spec = rules.logical_to_spec(("batch", "act_heads", None, None), q.shape, dict(mesh.shape))
    spec = jax.sharding.PartitionSpec(*(tuple(spec) + (None,) * (4 - len(spec))))
    rows = jax.sharding.PartitionSpec(spec[0], None)
    fn = jax.shard_map(
        lambda q, k, v, m: _flash(q, k, v, m, scale),
        mesh=mesh,
        in_specs=(spec, spec, spec, rows),
        out_specs=spec,
        check_vma=False,
    )
    return fn(q, k, v, valid)
