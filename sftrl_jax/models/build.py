"""Shape first, then materialise sharded.

`abstract_model` builds a model with `nnx.eval_shape` (no weights allocated, seconds even at 11B);
`create_model` initialises random weights directly into their shardings; `map_params` rebuilds a
model from an abstract one param by param (how the converter and checkpoint loader fill it).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax.models import config as config_lib
from sftrl_jax.models import layers, mllama, text
from sftrl_jax.parallel import rules

_CLASSES = {
    config_lib.LlamaConfig: text.LlamaForCausalLM,
    config_lib.Qwen2Config: text.Qwen2ForCausalLM,
    config_lib.MllamaConfig: mllama.MllamaForConditionalGeneration,
}


def model_class(config: config_lib.ModelConfig) -> type[nnx.Module]:
    if type(config) not in _CLASSES:
        raise TypeError(f"not a model config: {type(config).__name__}")
    return _CLASSES[type(config)]


def canonical_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(dtype) if dtype is not None else None


def abstract_model(
    config: config_lib.ModelConfig,
    *,
    param_dtype=jnp.float32,
    dtype=None,
    remat: bool = False,
    scan_layers: bool = False,
) -> nnx.Module:
    """The model with `jax.ShapeDtypeStruct` in place of every weight. `scan_layers`: each layer stack
    (text decoder, vision encoders) stored stacked and run as one scan (`layers.loop`)."""
    cls = model_class(config)
    return nnx.eval_shape(
        lambda: cls(
            config,
            param_dtype=canonical_dtype(param_dtype),
            dtype=canonical_dtype(dtype),
            remat=remat,
            scan_layers=scan_layers,
            rngs=nnx.Rngs(0),
        )
    )


def path_str(path) -> str:
    """A pytree key path of an nnx State -> "language_model.layers.3.cross_attn.q_proj"."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return ".".join(parts)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def flat_params(state) -> dict[str, nnx.Variable]:
    """{dotted path: Variable} of an nnx State."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]
    return {path_str(p): v for p, v in leaves}


def map_params(state, fn: Callable[[str, nnx.Variable], jax.Array]):
    """A State of the same structure whose Variables hold `fn(path, variable)`."""
    return jax.tree_util.tree_map_with_path(lambda p, v: v.replace(fn(path_str(p), v)), state, is_leaf=_is_var)


def shardings(abstract_state, mesh: jax.sharding.Mesh | None):
    """NamedSharding per parameter under the rules table, or None (default device)."""
    return None if mesh is None else rules.state_shardings(abstract_state, mesh)


def create_model(
    config: config_lib.ModelConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    param_dtype=jnp.float32,
    dtype=None,
    remat: bool = False,
    scan_layers: bool = False,
    seed: int = 0,
) -> nnx.Module:
    """Randomly initialised model (tests, demos); each parameter is drawn on the host and placed
    directly in its sharding, one at a time."""
    abstract = abstract_model(config, param_dtype=param_dtype, dtype=dtype, remat=remat, scan_layers=scan_layers)
    graphdef, abstract_state = nnx.split(abstract)

    def init(path: str, var: nnx.Variable) -> jax.Array:
        mean, std = layers.INITS[var.get_metadata().get("init", "normal")]
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        value = (mean + std * rng.standard_normal(var.shape, np.float32)) if std else np.full(var.shape, mean)
        return put(value.astype(var.dtype), var, mesh)

    return nnx.merge(graphdef, map_params(abstract_state, init))


def put(value: np.ndarray, var: nnx.Variable, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """A host array onto the devices: sharded by the parameter's logical names on `mesh`, else the
    default device. Each device receives only its own shard."""
    if mesh is None:
        return jax.device_put(value)
    sharding = rules.named_sharding(rules.param_names(var), var.shape, mesh)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def param_count(config: config_lib.ModelConfig) -> int:
    state = nnx.state(abstract_model(config))
    return sum(math.prod(v.shape) for v in flat_params(state).values())


def per_device_bytes(
    config: config_lib.ModelConfig, axis_sizes: Mapping[str, int], *, param_dtype=jnp.float32
) -> dict[str, int]:
    """Bytes per device of parameters (and, at the same sharding, of gradients) under the rules.

    Computed from shapes and the rules table only (no devices needed), assuming the largest shard:
    a dimension of size n split over m devices holds ceil(n / m) rows.
    """
    state = nnx.state(abstract_model(config, param_dtype=param_dtype))
    total = 0
    for var in flat_params(state).values():
        spec = rules.logical_to_spec(rules.param_names(var), var.shape, axis_sizes)
        shard = list(var.shape)
        for i, axes in enumerate(spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            shard[i] = -(-shard[i] // math.prod(axis_sizes[a] for a in axes))
        total += math.prod(shard) * np.dtype(var.dtype).itemsize
    return {"params": total}
