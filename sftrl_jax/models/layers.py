"""Building blocks shared by the text and vision towers.

Shape legend (STYLE.md §1): B batch, T query length, S key/value length, D model width, F MLP
width, N query heads, K kv heads, G query heads per kv head, H head dim, V vocab.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds *logical* axis names;
`sftrl_jax.parallel.rules` maps them to mesh axes. `eager_sharding=False`: building a module never
needs a mesh; shardings are applied when the state is created or loaded (see `models/build.py`).
Products, attention and RoPE go through `sftrl_jax.ops`, which picks their implementation per backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax import ops
from sftrl_jax.models import config as config_lib
from sftrl_jax.models import lora
from sftrl_jax.parallel import rules

# Initializers by name. The name is kept in the parameter's metadata (`init`) so that
# `build.create_model` can draw the same distributions on the host, shard by shard, without
# compiling an init program (XLA takes ~40 s on CPU to compile threefry for even the tiny model).
INITS: dict[str, tuple[float, float]] = {  # name -> (mean, stddev)
    "normal": (0.0, 0.02),
    "ones": (1.0, 0.0),
    "zeros": (0.0, 0.0),
    "gate": (0.0, 1.0),  # random init only serves tests: non-zero gates exercise every path
}
normal, ones, zeros, gate_init = "normal", "ones", "zeros", "gate"


def weight(p: nnx.Param, dtype) -> jax.Array:
    """A parameter in the compute `dtype`, cast where it is stored: the cast keeps the parameter's own
    (FSDP) sharding, so the all-gather a product needs moves compute-dtype bytes (bf16: half of fp32)
    and the gathered copy is that size. Left to itself XLA gathers the fp32 shards and casts after
    (`sftrl plan` on the 11B SFT step: 643 fp32 all-gathers per micro-batch)."""
    value = p[...]
    if value.dtype == jnp.dtype(dtype):
        return value
    return rules.constrain(value.astype(dtype), rules.param_names(p))


class KeyGen:
    """Fresh init keys by `fold_in(base, n)` with a Python counter.

    Drawing from `nnx.Rngs` once per parameter is slow under tracing (each draw updates a Variable,
    whose sharding check formats a tracer error message): ~20 s to build the 11B model abstractly
    versus well under a second with this.
    """

    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    @classmethod
    def of(cls, rngs: nnx.Rngs | KeyGen) -> KeyGen:
        return rngs if isinstance(rngs, KeyGen) else cls(rngs.params())

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def param(rngs: nnx.Rngs | KeyGen, init: str, shape: Sequence[int], names: Sequence[str | None], dtype) -> nnx.Param:
    """A parameter of `shape` whose dims carry the logical axis `names`, drawn from `INITS[init]`."""
    if len(shape) != len(names):
        raise ValueError(f"shape {tuple(shape)} and names {tuple(names)} differ in length")
    key = rngs() if isinstance(rngs, KeyGen) else rngs.params()
    mean, std = INITS[init]
    value = mean + std * jax.random.normal(key, tuple(shape), dtype) if std else jnp.full(shape, mean, dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False, init=init)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, the reduction in fp32."""

    def __init__(self, dim: int, *, eps: float, name: str = "embed", param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, ones, (dim,), (name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale.astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias, statistics in fp32."""

    def __init__(self, dim: int, *, eps: float, name: str = "vision_embed", param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, ones, (dim,), (name,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale.astype(jnp.float32) + self.bias.astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(x @ gate) * (x @ up)): the Llama MLP."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.gate_proj = param(rngs, normal, (dim, hidden), ("embed", "mlp"), param_dtype)
        self.up_proj = param(rngs, normal, (dim, hidden), ("embed", "mlp"), param_dtype)
        self.down_proj = param(rngs, normal, (hidden, dim), ("mlp", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = ops.dense_fused(
            x, [lora.weight(self, "gate_proj", self.dtype), lora.weight(self, "up_proj", self.dtype)]
        )  # [B, T, F]
        gate, up = lora.apply(gate, self, "gate_proj", x, self.dtype), lora.apply(up, self, "up_proj", x, self.dtype)
        h = jax.nn.silu(gate) * up
        return lora.apply(
            ops.dense(h, lora.weight(self, "down_proj", self.dtype)), self, "down_proj", h, self.dtype
        )  # [B, T, D]


def gate(g: nnx.Param, dtype) -> jax.Array:
    """tanh of a shape-[1] gate parameter, as a scalar."""
    return jnp.tanh(g[0].astype(jnp.float32)).astype(dtype)


# --------------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: config_lib.TextConfig) -> np.ndarray:
    """Inverse frequencies [H/2] in fp32, with Llama 3.1's frequency-dependent scaling if `llama3`."""
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
    if cfg.rope_type == "default":
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, the band in
    # between interpolated smoothly.
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Layer stacks and the layer loop

LAYERS = "layers"  # the logical name of a stack's leading axis (`parallel.rules`: replicated)


def stack(modules: Sequence[nnx.Module]) -> nnx.Module:
    """The `modules` as one module of their structure whose parameters are theirs stacked: [G, ...],
    the leading axis named `layers`. They must share their structure (class, shapes, static
    attributes): layer g of the stack is `modules[g]`."""
    splits = [nnx.split(m) for m in modules]
    graphdef = splits[0][0]
    if any(s[0] != graphdef for s in splits[1:]):
        raise ValueError("layers differ in structure: they cannot be stacked (and scanned)")
    return nnx.merge(graphdef, jax.tree.map(_stack, *[s[1] for s in splits], is_leaf=_is_variable))


def _stack(*variables: nnx.Variable) -> nnx.Variable:
    value = jnp.stack([v[...] for v in variables])
    return variables[0].replace(value, out_sharding=(LAYERS, *rules.param_names(variables[0])))


def _one_layer(state):
    """A stack's state as the scan slices it, [...] of [G, ...]: named as one layer's parameters."""
    return jax.tree.map(lambda v: v.replace(out_sharding=rules.param_names(v)[1:]), state, is_leaf=_is_variable)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def loop(units, step, x, *, state=None, inputs=None, active=None, stacked: bool, remat: bool):
    """x through a stack of layers, `step(layer, x, s, c) -> (x, s, y)` once per layer, in order.

    `units` are the layers one by one (per-layer layout), or, `stacked`, the stacks of a repeating
    pattern of p layers (`stack`: unit j holds layers j, j + p, ...), run as one `jax.lax.scan` over
    the G groups whose body holds one group: XLA compiles p layers instead of every layer, and what a
    layer gathers (its FSDP weights) or produces in the backward pass lives for one iteration.
    Per unit, aligned with `units` (None: nothing): `state` is what a layer reads and rewrites (its
    KV cache; stacked: [G, ...], updated in place in the scan's carry), `inputs` what it only reads
    (cached vision keys; stacked: [G, ...], scanned over); units not `active` are skipped. With
    `remat` each layer is a `jax.checkpoint`: its inputs are all the backward pass keeps of it.

    Returns (x, state, outs), `outs[u]` the units' `y`s (stacked: [G, ...]).
    """
    n = len(units)
    state = [None] * n if state is None else list(state)
    inputs = [None] * n if inputs is None else list(inputs)
    run = [u for u in range(n) if active is None or active[u]]
    outs = [None] * n
    defs, params = {}, {}
    for u in run:
        defs[u], params[u] = nnx.split(units[u])

    def call(u, p, x, s, c):
        return step(nnx.merge(defs[u], _one_layer(p) if stacked else p), x, s, c)

    if remat:  # inside a scan, CSE cannot merge the recomputation with the forward: no barrier needed
        call = jax.checkpoint(call, static_argnums=0, prevent_cse=not stacked)
    if not stacked:
        for u in run:
            x, state[u], outs[u] = call(u, params[u], x, state[u], inputs[u])
        return x, state, outs

    def body(carry, xs):
        x, st, g = carry
        ys = {}
        for u in run:
            s = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, keepdims=False), st[u])
            x, s, ys[u] = call(u, xs[0][u], x, s, xs[1][u])
            st[u] = jax.tree.map(lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b, g, 0), st[u], s)
        return (x, st, g + 1), ys

    if len(run) > 1 and all(defs[u] == defs[run[0]] and state[u] is None and inputs[u] is None for u in run):
        # The active units are one kind of layer (Mllama without images: its 4 self-attention stacks):
        # the group's layers run as an inner scan, one layer per iteration, so the backward pass
        # recomputes and differentiates them one at a time (in one body XLA overlapped several
        # layers' attention buffers: the 11B text PPO update's peak 38 -> 55 GiB). The inner stack is
        # one group's layers (their shards), not the model's.
        def body(carry, xs):  # noqa: F811
            x, st, g = carry

            def one(x, p):
                x, _, y = call(run[0], p, x, None, None)
                return x, y

            group = jax.tree.map(lambda *a: jnp.stack(a), *[xs[0][u] for u in run])
            x, ys = jax.lax.scan(one, x, group)
            return (x, st, g + 1), {u: jax.tree.map(lambda a, i=i: a[i], ys) for i, u in enumerate(run)}

    carry = (x, {u: state[u] for u in run}, jnp.zeros((), jnp.int32))
    (x, st, _), ys = jax.lax.scan(body, carry, ({u: params[u] for u in run}, {u: inputs[u] for u in run}))
    for u in run:
        state[u], outs[u] = st[u], ys[u]
    return x, state, outs


def period(kinds: Sequence) -> int:
    """The shortest p that divides len(kinds) with kinds[i] == kinds[i % p] (len(kinds) at worst)."""
    n = len(kinds)
    return next(p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)))
