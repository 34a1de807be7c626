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
            x, [weight(self.gate_proj, self.dtype), weight(self.up_proj, self.dtype)]
        )  # [B, T, F]
        return ops.dense(jax.nn.silu(gate) * up, weight(self.down_proj, self.dtype))  # [B, T, D]


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
# Scanning over layers


def scan(groups: Sequence[Sequence[nnx.Module]], call, x: jax.Array, *, remat: bool, keep: str | None = None):
    """x through `groups` of layers with one `jax.lax.scan` over the groups (`model.scan_layers`).

    `groups[g][j]` is the j-th layer of group g; layers at the same position j share their structure
    (class, shapes, static attributes). `call(j, layer, x) -> x` runs one layer. The parameters of
    each position are stacked (one copy, sharded like the layers': [G, ...]) and the scan body holds
    one group: XLA compiles one group instead of every layer, and what a layer gathers (its FSDP
    weights) or produces in the backward pass (its full-size weight gradients before the
    reduce-scatter) lives for one iteration, not across the whole unrolled stack. With `remat` each
    layer is a `jax.checkpoint`: its input is all the backward pass keeps of it.

    keep: None, or "inputs" / "outputs" to also return every group's input / output stacked [G, ...].
    """
    period = len(groups[0])
    defs, stacks = [], []
    for j in range(period):
        splits = [nnx.split(group[j]) for group in groups]
        graphdef = splits[0][0]
        if any(s[0] != graphdef for s in splits[1:]):
            raise ValueError(f"layers at position {j} of their group differ in structure: they cannot be scanned")
        defs.append(graphdef)
        stacks.append(jax.tree.map(_stack, *[s[1] for s in splits], is_leaf=_is_variable))

    def position(j):
        def run(state, x):
            return call(j, nnx.merge(defs[j], state), x)

        return jax.checkpoint(run, prevent_cse=False) if remat else run

    runs = [position(j) for j in range(period)]

    def body(x, states):
        x_in = x
        for run, state in zip(runs, states):
            x = run(state, x)
        return x, (x_in if keep == "inputs" else x if keep == "outputs" else None)

    x, kept = jax.lax.scan(body, x, stacks)
    return (x, kept) if keep else x


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stack(*variables: nnx.Variable) -> nnx.Variable:
    value = jnp.stack([v[...] for v in variables])
    return variables[0].replace(rules.constrain(value, (None,) + rules.param_names(variables[0])))


def period(kinds: Sequence) -> int:
    """The shortest p that divides len(kinds) with kinds[i] == kinds[i % p] (len(kinds) at worst)."""
    n = len(kinds)
    return next(p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)))
