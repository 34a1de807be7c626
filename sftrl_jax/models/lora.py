"""LoRA adapters on the models' products: added to a built model, applied in its one forward, merged.

    paths = lora.add(model, LoRASection(rank=16, alpha=32), seed=0)   # base frozen, adapters added
    y = lora.apply(y, module, "q_proj", x, dtype)                      # in the forward: y + s (x A) B
    merged = lora.merge(model)                                         # W + s A B, adapters gone

Each targeted product weight W [in..., out...] (a layer stack's: [G, in..., out...]) gets A [in..., r]
(`nnx.LoRAParam`, PEFT's kaiming-uniform init) and B [r, out...] (zeros: the model is unchanged at the
start), and the product becomes x W + (alpha / r) (x A) B, in the factored form: a step never forms
a whole-matrix delta, so the frozen base costs a backward through the activations only. Every other
parameter of the model is frozen (`frozen` metadata): `train.accumulate` differentiates, and the
optimiser and the run's checkpoints hold, only the trainable ones (adapters, PPO's value head).
The sampler runs the same forward with the same parameters, so it decodes with the adapters of the
current step (nothing to merge or to forget after an update).

Targets are regular expressions over parameter paths (`re.search`), or the names of `GROUPS`:
"attention" and "mlp" (the text decoder's self-attention q/k/v/o and SwiGLU gate/up/down: the
default), "cross_attention" (Mllama's), "vision" (the vision tower's attention and MLP).

Why not a library: qwix (tunix's LoRA/QLoRA) intercepts the `dot_general`s a module runs, which here
would include the attention's and the custom CPU kernels' internals; flax's `nnx.LoRA` wraps
`nnx.Linear` modules, which these models do not use (their weights are raw parameters with logical
axis names, products through `sftrl_jax.ops`). flax's `nnx.LoRAParam` type is used for the adapters.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax import ops
from sftrl_jax.config import ConfigError

_TEXT = r"^(model|language_model)\.(layers|stacks)\.\d+\."
GROUPS = {
    "attention": _TEXT + r"self_attn\.(q|k|v|o)_proj$",
    "mlp": _TEXT + r"mlp\.(gate|up|down)_proj$",
    "cross_attention": _TEXT + r"cross_attn\.(q|k|v|o)_proj$",
    "vision": r"^vision_model\..*\.(self_attn\.(q|k|v|o)_proj|mlp\.fc[12]\.kernel)$",
}
PRODUCTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "kernel")
N_IN = {"o_proj": 2}  # input dims of a product weight (the heads and head dim of o_proj); others 1
A, B = "_lora_a", "_lora_b"
QSCALE = "_qscale"  # a quantized weight's per-output-channel scale, beside it on its module
QUANT = {"int8": (jnp.int8, 127), "int4": (jnp.int4, 7)}  # storage dtype, largest magnitude
FROZEN = "frozen"  # parameter metadata: True on the base's parameters of a LoRA model


@dataclasses.dataclass(frozen=True)
class LoRASection:
    """The `lora:` keys of `sftrl sft` / `sftrl rl` configs. rank 0 = no adapters (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0  # the delta is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, during training steps only
    targets: tuple[str, ...] = ("attention", "mlp")  # GROUPS names or regular expressions over paths
    # QLoRA: "int8" or "int4" = every product weight of the frozen base stored quantized (symmetric,
    # one scale per output channel), dequantized to the compute dtype where it is used; null = as loaded
    quantize: str | None = None

    def __post_init__(self):
        from sftrl_jax import config as config_lib

        config_lib.check_ranges(self, rank="[0, 4096]", alpha="(0, inf)", dropout="[0, 1)")
        if self.quantize is not None and self.quantize not in QUANT:
            raise ConfigError(f"lora.quantize must be one of {', '.join(QUANT)} or null, got {self.quantize!r}")
        if self.quantize is not None and not self.rank:
            raise ConfigError("lora.quantize quantizes a LoRA run's frozen base: set lora.rank > 0 too")
        if self.rank and not self.targets:
            raise ConfigError("lora.targets must name at least one group or path pattern")
        for t in self.targets:
            if t not in GROUPS:
                try:
                    re.compile(t)
                except re.error as e:
                    raise ConfigError(
                        f"lora.targets: {t!r} is neither a group ({', '.join(GROUPS)}) nor a regex: {e}"
                    ) from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def patterns(self) -> list[re.Pattern]:
        return [re.compile(GROUPS.get(t, t)) for t in self.targets]


def _modules(model: nnx.Module):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            yield ".".join(str(p) for p in path), node


def add(model: nnx.Module, section: LoRASection, *, seed: int = 0) -> list[str]:
    """Freezes every parameter of `model` and gives each targeted product weight its adapters (in
    place: a model made by `nnx.merge(graphdef, state)` shares its Variables with `state`, which is then
    frozen too: merge with `copy=True` first to keep it); with `section.quantize` the base's product
    weights are stored quantized (`quantize`). Returns the targeted weights' paths. ConfigError if no
    weight matches, if the section has rank 0, or if the model has adapters already."""
    if not section.enabled:
        raise ConfigError("lora.rank is 0: no adapters to add")
    if adapted(model):
        raise ConfigError(f"the {type(model).__name__} has LoRA adapters already (merge them first)")
    patterns = section.patterns()
    targets = []
    for prefix, module in list(_modules(model)):
        for name, var in list(vars(module).items()):
            if not isinstance(var, nnx.Param) or isinstance(var, nnx.LoRAParam):
                continue
            path = f"{prefix}.{name}" if prefix else name
            if name in PRODUCTS and any(p.search(path) for p in patterns):
                targets.append((path, module, name, var))
    if not targets:
        raise ConfigError(
            f"lora.targets {list(section.targets)} match no product weight of the {type(model).__name__} "
            f"(e.g. {next(iter(_paths(model)), '?')})"
        )
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and not isinstance(var, nnx.LoRAParam):
            var.set_metadata(FROZEN, True)
    if section.quantize is not None:
        quantize(model, section.quantize)
    key = jax.random.key(seed)
    for i, (_, module, name, var) in enumerate(targets):
        a, b = _adapters(var, name, section.rank, jax.random.fold_in(key, i))
        setattr(module, name + A, a)
        setattr(module, name + B, b)
        setattr(module, name + "_lora_scale", section.scale)
        setattr(module, name + "_lora_dropout", section.dropout)
    return [t[0] for t in targets]


def _paths(model):
    for prefix, module in _modules(model):
        for name, var in vars(module).items():
            if isinstance(var, nnx.Param):
                yield f"{prefix}.{name}"


def _split_dims(var: nnx.Param, name: str) -> tuple[int, int]:
    """(leading stack dims, input dims) of a product weight."""
    from sftrl_jax.models import layers

    lead = 1 if tuple(var.get_metadata().get("out_sharding") or ())[:1] == (layers.LAYERS,) else 0
    return lead, N_IN.get(name, 1)


def _adapters(var: nnx.Param, name: str, rank: int, key) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    lead, n_in = _split_dims(var, name)
    shape, names = tuple(var.shape), tuple(var.get_metadata().get("out_sharding") or (None,) * var.ndim)
    fan_in = int(np.prod(shape[lead : lead + n_in]))
    bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform with a = sqrt(5), PEFT's init of A
    a_shape = shape[: lead + n_in] + (rank,)
    b_shape = shape[:lead] + (rank,) + shape[lead + n_in :]
    a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    b = jnp.zeros(b_shape, jnp.float32)
    a_names = names[: lead + n_in] + (None,)
    b_names = names[:lead] + (None,) + names[lead + n_in :]
    kw = dict(eager_sharding=False)
    return nnx.LoRAParam(a, out_sharding=a_names, **kw), nnx.LoRAParam(b, out_sharding=b_names, **kw)


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """`module`'s product weight `name` in the compute `dtype` (`layers.weight`), dequantized where the
    frozen base is stored quantized (QLoRA)."""
    from sftrl_jax.models import layers

    var = getattr(module, name)
    if not hasattr(module, name + QSCALE):
        return layers.weight(var, dtype)
    return var[...].astype(dtype) * layers.weight(getattr(module, name + QSCALE), dtype)


def quantize(model: nnx.Module, kind: str) -> list[str]:
    """Every product weight W of `model` (`PRODUCTS`, not the adapters) as `kind` ("int8" / "int4")
    integers q and a scale per output channel, absmax / qmax (W ~ q * scale; fp32 scales [G, 1.., out...]),
    in place; frozen. Returns the quantized weights' paths."""
    dtype, qmax = QUANT[kind]
    done = []
    for prefix, module in list(_modules(model)):
        for name, var in list(vars(module).items()):
            if name not in PRODUCTS or not isinstance(var, nnx.Param) or isinstance(var, nnx.LoRAParam):
                continue
            lead, n_in = _split_dims(var, name)
            names = tuple(var.get_metadata().get("out_sharding") or (None,) * var.ndim)
            w = var[...].astype(jnp.float32)
            amax = jnp.max(jnp.abs(w), axis=tuple(range(lead, lead + n_in)), keepdims=True)
            scale = jnp.where(amax > 0, amax / qmax, 1.0)
            q = jnp.clip(jnp.round(w / scale), -qmax - 1, qmax).astype(dtype)
            meta = {k: v for k, v in var.get_metadata().items() if k not in ("hijax", "ref")}
            setattr(module, name, nnx.Param(q, **{**meta, FROZEN: True, "stored_as": str(var.dtype)}))
            scale_names = names[:lead] + (None,) * n_in + names[lead + n_in :]
            kw = dict(out_sharding=scale_names, eager_sharding=False)
            setattr(module, name + QSCALE, nnx.Param(scale, **kw, **{FROZEN: True}))
            done.append(f"{prefix}.{name}" if prefix else name)
    return done


def has(module: nnx.Module, name: str) -> bool:
    return hasattr(module, name + A)


def apply(y: jax.Array, module: nnx.Module, name: str, x: jax.Array, dtype) -> jax.Array:
    """`y` (= x W of `module`'s weight `name`) plus the adapters' (alpha / r) (x A) B where there are
    adapters; `y` itself otherwise (no op added)."""
    if not has(module, name):
        return y
    from sftrl_jax.models import layers

    n_in = N_IN.get(name, 1)
    x = _dropout(x, getattr(module, name + "_lora_dropout"))
    xa = ops.dense(x, layers.weight(getattr(module, name + A), dtype), n_in=n_in)  # [..., r]
    delta = ops.dense(xa, layers.weight(getattr(module, name + B), dtype))  # [..., out...]
    return y + (delta * getattr(module, name + "_lora_scale")).astype(y.dtype)


# -- dropout on the adapters' input, during training steps ------------------------------------------

_LOCAL = threading.local()  # .keys: [key, counter] while a training step's gradient is traced (per thread)


def _keys() -> list[list]:
    if not hasattr(_LOCAL, "keys"):
        _LOCAL.keys = []
    return _LOCAL.keys


class dropout_key:
    """`with lora.dropout_key(key):` the adapters traced inside drop their input at their `dropout` rate
    (inverted dropout); outside (evaluation, sampling, no-gradient passes) they never drop. Each
    product draws its own mask (the key folded with a trace-time counter); the layers of one scanned
    stack share their masks within a micro-batch."""

    def __init__(self, key):
        self.key = key

    def __enter__(self):
        if self.key is not None:
            _keys().append([self.key, 0])
        return self

    def __exit__(self, *exc):
        if self.key is not None:
            _keys().pop()


def _dropout(x: jax.Array, rate: float) -> jax.Array:
    keys = _keys()
    if not keys or rate <= 0:
        return x
    top = keys[-1]
    key = jax.random.fold_in(top[0], top[1])
    top[1] += 1
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# -- trainable and frozen parameters -------------------------------------------------------------


def is_frozen(path, var) -> bool:
    """An nnx filter: the base parameters a LoRA model keeps fixed."""
    return bool(isinstance(var, nnx.Variable) and var.get_metadata().get(FROZEN, False))


def partition(params) -> tuple[Any, Any | None]:
    """(trainable, frozen) of a parameter State; frozen None when nothing is frozen (no LoRA)."""
    frozen = nnx.filter_state(params, is_frozen)
    if not jax.tree.leaves(frozen):
        return params, None
    return nnx.filter_state(params, nnx.Not(is_frozen)), frozen


def combine(trainable, frozen):
    """The parameter State of `partition`'s two parts."""
    return trainable if frozen is None else nnx.merge_state(trainable, frozen)


# -- merge -------------------------------------------------------------------------------------------


def merge(model: nnx.Module) -> nnx.Module:
    """`model` with every adapter folded into its weight (W + (alpha / r) A B, in the weight's dtype,
    the product in fp32) and the adapters and the frozen marks removed, in place; returns it."""
    for _, module in list(_modules(model)):
        for name in list(vars(module)):
            if not name.endswith(A):
                continue
            base = name[: -len(A)]
            w, a, b = getattr(module, base), getattr(module, name), getattr(module, base + B)
            lead, n_in = _split_dims(w, base)
            full = weight(module, base, jnp.float32) + _delta(a[...], b[...], lead, n_in, w.shape, module, base)
            dtype = w.get_metadata().get("stored_as", w.dtype)  # a quantized base: its dtype before
            meta = {k: v for k, v in w.get_metadata().items() if k not in ("hijax", "ref", "stored_as")}
            setattr(module, base, nnx.Param(full.astype(dtype), **meta))
            for suffix in (A, B, "_lora_scale", "_lora_dropout"):
                delattr(module, base + suffix)
            if hasattr(module, base + QSCALE):
                delattr(module, base + QSCALE)
    for _, module in list(_modules(model)):  # quantized weights without adapters: dequantized
        for name in [n[: -len(QSCALE)] for n in vars(module) if n.endswith(QSCALE)]:
            w = getattr(module, name)
            meta = {k: v for k, v in w.get_metadata().items() if k not in ("hijax", "ref", "stored_as")}
            full = weight(module, name, jnp.float32).astype(w.get_metadata().get("stored_as", jnp.float32))
            setattr(module, name, nnx.Param(full, **meta))
            delattr(module, name + QSCALE)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and var.get_metadata().get(FROZEN, False):
            var.set_metadata(FROZEN, False)
    return model


def _delta(a, b, lead, n_in, shape, module, base):
    g = int(np.prod(shape[:lead])) if lead else 1
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(g, -1, r)
    b2 = b.astype(jnp.float32).reshape(g, r, -1)
    return (jnp.einsum("gir,gro->gio", a2, b2) * getattr(module, base + "_lora_scale")).reshape(shape)


def adapted(model: nnx.Module) -> dict[str, float]:
    """{path of each weight of `model` that carries adapters: its scale alpha / r}."""
    out = {}
    for prefix, module in _modules(model):
        for name in vars(module):
            if name.endswith(A):
                base = name[: -len(A)]
                out[f"{prefix}.{base}" if prefix else base] = float(getattr(module, base + "_lora_scale"))
    return out


def adapter_paths(model: nnx.Module) -> list[str]:
    """The weights of `model` that carry adapters."""
    return list(adapted(model))
