"""Per-layer <-> stacked parameters, at the edges (conversion, checkpoints, tests).

A model built with `scan_layers` keeps each layer stack as one module per position j of its
repeating pattern of p layers: `<owner>.stacks.{j}.<name>`, [G, ...]. Layer i of the per-layer
layout, `<owner>.layers.{i}.<name>`, is slice i // p of stack i % p. Hugging Face files and
per-layer checkpoints name layers one by one; these functions move between the two.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from sftrl_jax.models import build
from sftrl_jax.parallel import rules

_LAYER = re.compile(r"^((?:.*\.)?)layers\.(\d+)\.(.+)$")
_STACK = re.compile(r"^((?:.*\.)?)stacks\.(\d+)\.(.+)$")


def periods(paths: Iterable[str]) -> dict[str, int]:
    """{owner prefix ("language_model."): its number of stacks p} of a stacked model's parameter paths."""
    out: dict[str, int] = {}
    for path in paths:
        if m := _STACK.match(path):
            out[m[1]] = max(out.get(m[1], 0), int(m[2]) + 1)
    return out


def is_stacked(paths: Iterable[str]) -> bool:
    return bool(periods(paths))


def locate(path: str, periods: dict[str, int]) -> tuple[str, int | None]:
    """A per-layer parameter path -> (the stacked path holding it, its slice g); a path outside the
    stacks (or any path when `periods` is empty) -> (path, None)."""
    m = _LAYER.match(path)
    if m is None or m[1] not in periods:
        return path, None
    p, i = periods[m[1]], int(m[2])
    return f"{m[1]}stacks.{i % p}.{m[3]}", i // p


def layer_path(path: str, g: int, periods: dict[str, int]) -> str:
    """A stacked parameter path and a slice g -> the per-layer path of that layer."""
    m = _STACK.match(path)
    return f"{m[1]}layers.{g * periods[m[1]] + int(m[2])}.{m[3]}"


_index = jax.jit(lambda a, g: jax.lax.dynamic_index_in_dim(a, g, keepdims=False))


def layer(value: jax.Array, g: int) -> jax.Array:
    """Slice g of a stacked parameter (one compile per shape, not per slice)."""
    return _index(value, jnp.int32(g))


def relayout(state, target, *, mesh: jax.sharding.Mesh | None = None, consume: bool = False):
    """`state` (an nnx State of parameters, or of their gradients) in the layout of `target` (an
    abstract or concrete State of the same model, stacked or per layer): `target`'s tree holding
    `state`'s values, stacked (`jnp.stack`) or sliced where the layouts differ. With `mesh` each value
    is put in its sharding under the rules table. `consume`: delete each source array once the last
    value that needs it is made, so that a loaded model is never held twice."""
    src, dst = build.flat_params(state), build.flat_params(target)
    into, out_of = periods(dst), periods(src)
    parts = {}  # target path -> [(source path, slice or None)]
    for path, var in dst.items():
        if path in src:
            parts[path] = [(path, None)]
        elif _STACK.match(path) and into:
            parts[path] = [(layer_path(path, g, into), None) for g in range(var.shape[0])]
        else:
            parts[path] = [locate(path, out_of)]
    needed = collections.Counter(s for ps in parts.values() for s, _ in ps)
    unknown, unused = set(needed) - set(src), set(src) - set(needed)
    if unknown or unused:
        raise ValueError(
            f"layouts do not match: {sorted(unknown)[:4]} missing, {sorted(unused)[:4]} left over "
            f"({len(unknown)} and {len(unused)} in all)"
        )

    def value(path: str, var: nnx.Variable) -> jax.Array:
        pieces = [src[s][...] if g is None else layer(src[s][...], g) for s, g in parts[path]]
        out = jnp.stack(pieces) if _STACK.match(path) and into and path not in src else pieces[0]
        if mesh is not None:
            out = jax.device_put(out, rules.named_sharding(rules.param_names(var), var.shape, mesh))
        if consume:
            out.block_until_ready()
            for s, _ in parts[path]:
                needed[s] -= 1
                if needed[s] == 0 and src[s][...] is not out:
                    src[s][...].delete()
        return out

    return build.map_params(target, value)
