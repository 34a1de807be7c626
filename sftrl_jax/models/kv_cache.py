"""Key/value cache for prefill + one-token decode steps.

One preallocated `[B, S_max, K, H]` buffer per self-attention layer, written in place with
`dynamic_update_slice` at slot `index` (the same slot for every row: prompts are left-padded to a
common length). `key_mask` [B, S_max] marks the slots that hold real tokens, so left padding is never
attended; `next_position` [B] is each row's next RoPE position (its count of real tokens so far).

Cross-attention keys/values (Mllama) are computed once from the vision features at prefill and kept
as `[B, S_x, K, H]` per cross-attention layer; `cross_row` [B, I, C] is the tile mask that later
tokens reuse (transformers' generate repeats the last row of `cross_attention_mask` the same way).

A decoder with stacked layers (`scan_layers`) keeps its cache stacked the same way: one
`[G, B, S_max, K, H]` buffer per self-attention stack (and `[G, B, S_x, K, H]` per cross-attention
stack), the leading axis named `layers`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sftrl_jax.models import config as config_lib
from sftrl_jax.models import layers
from sftrl_jax.parallel import rules


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per self-attention layer, [B, S_max, K, H] (or per stack, [G, B, S_max, K, H])
    v: tuple[jax.Array, ...]  # per self-attention layer, [B, S_max, K, H] (or per stack, [G, B, S_max, K, H])
    key_mask: jax.Array  # [B, S_max] bool: slot holds a real (non-padding) token
    index: jax.Array  # [] int32: next slot to write
    next_position: jax.Array  # [B] int32: RoPE position of each row's next real token
    cross_k: tuple[jax.Array, ...] | None = None  # per cross-attention layer, [B, S_x, K, H]
    cross_v: tuple[jax.Array, ...] | None = None
    cross_row: jax.Array | None = None  # [B, I, C] tile mask for tokens after the prompt

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]

    @property
    def has_cross(self) -> bool:
        return self.cross_k is not None


KV_NAMES = ("batch", "seq", "act_kv_heads", None)


def kv_names(x: jax.Array) -> tuple[str | None, ...]:
    """Logical names of a [B, S, K, H] buffer, or of a stack of them [G, B, S, K, H]."""
    return (layers.LAYERS,) * (x.ndim - len(KV_NAMES)) + KV_NAMES


def logical_names(cache: KVCache) -> KVCache:
    """The cache's logical axis names, leaf for leaf (a KVCache of name tuples)."""
    kv = lambda xs: None if xs is None else tuple(kv_names(x) for x in xs)  # noqa: E731
    return KVCache(
        k=kv(cache.k),
        v=kv(cache.v),
        key_mask=("batch", "seq"),
        index=(),
        next_position=("batch",),
        cross_k=kv(cache.cross_k),
        cross_v=kv(cache.cross_v),
        cross_row=None if cache.cross_row is None else ("batch", None, None),
    )


def shardings(cache: KVCache, mesh: jax.sharding.Mesh) -> KVCache:
    """NamedSharding for every leaf of `cache` (or of an abstract cache) under the rules table."""
    is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)  # noqa: E731
    return jax.tree.map(
        lambda names, x: rules.named_sharding(names, x.shape, mesh), logical_names(cache), cache, is_leaf=is_names
    )


def init_cache(
    cfg: config_lib.TextConfig,
    batch_size: int,
    max_length: int,
    dtype=jnp.float32,
    *,
    mesh=None,
    period: int | None = None,
) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_length` tokens (prompt + generated),
    created directly in its sharding (batch over data/fsdp, kv heads over tensor) when `mesh` is given.
    `period`: a stacked decoder's number of stacks (one buffer per self-attention stack), None for one
    buffer per self-attention layer."""
    shape = (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
    n = len(cfg.self_attention_layers)
    if period is not None:
        shape = (cfg.num_layers // period, *shape)
        n = sum(j not in cfg.cross_attention_layers for j in range(period))

    def zeros():
        return KVCache(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            key_mask=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch_size,), jnp.int32),
        )

    if mesh is None:
        return zeros()
    return jax.jit(zeros, out_shardings=shardings(jax.eval_shape(zeros), mesh))()


def check_room(cache: KVCache, new_tokens: int) -> None:
    """Raise if `new_tokens` more do not fit. Only checkable when the index is concrete (outside jit);
    under jit the caller must size the cache: `dynamic_update_slice` would clamp, not fail."""
    if new_tokens > cache.max_length:
        raise ValueError(f"{new_tokens} tokens do not fit a cache of max_length {cache.max_length}")
    if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + new_tokens > cache.max_length:
        raise ValueError(
            f"cache full: {int(cache.index)} tokens written + {new_tokens} new > max_length {cache.max_length}"
        )


def write(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """buffer [B, S_max, ...] with `new` [B, T, ...] written at slots [index, index + T)."""
    start = (jnp.zeros((), jnp.int32), index.astype(jnp.int32)) + (jnp.zeros((), jnp.int32),) * (buffer.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)


def extend(cache: KVCache, max_length: int) -> KVCache:
    """`cache` with room for `max_length` slots in all (empty, masked slots appended): a prefill runs
    over the prompt's slots only, the decode loop then writes the rest."""
    pad = max_length - cache.max_length
    if pad < 0:
        raise ValueError(f"cannot shrink a cache of {cache.max_length} slots to {max_length}")

    def grow(x):  # [..., B, P, K, H] -> [..., B, S, K, H]
        widths = [(0, 0)] * x.ndim
        widths[-3] = (0, pad)
        return rules.constrain(jnp.pad(x, widths), kv_names(x))

    return dataclasses.replace(
        cache,
        k=tuple(grow(x) for x in cache.k),
        v=tuple(grow(x) for x in cache.v),
        key_mask=jnp.pad(cache.key_mask, ((0, 0), (0, pad))),
    )
