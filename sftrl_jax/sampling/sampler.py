"""Batched sampling: a jitted prefill, then a jitted `lax.while_loop` decode over a donated KV cache.

    result = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32, temperature=0.7, top_p=0.9,
                      stop_tokens=tok.stop_ids, seed=0)
    result.tokens      # [B, 32] int32, pad_id after each row's stop token
    result.lengths     # [B] tokens generated up to and including the first stop token
    result.logprobs    # [B, 32] log-probs under the distribution sampled from (see `methods`)
    result.logprobs_temperature  # log_softmax(logits / T) over the full vocabulary: what PPO uses

The sampler is a static `SamplerConfig` plus a pytree `State` (STYLE §8). Prompts are left-padded to
a length bucket, the batch to a batch bucket (`inputs`), so repeated calls compile once per bucket.
The prefill is the model's own forward with a cache (images go through the vision tower once there,
and the cross-attention keys/values are kept); the decode loop then feeds one token per row through
the same forward with the same cache (one model definition for training, prefill and decode, as
gemma's sampler loop does) until `max_new_tokens` or until every row has emitted a stop token.
Its matrices are cast to the compute dtype and, on a mesh, laid out for sampling (tensor-parallel over
the mesh, `parallel.rules.DECODE_RULES`) once per parameter version (`prepare_weights`), never inside
the programs. Parameters are
arguments of both jitted functions, never closed over, so a policy whose weights change between
calls (RL) reuses the compiled programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax import ops
from sftrl_jax.errors import UserError
from sftrl_jax.models import kv_cache, layers
from sftrl_jax.models import logprobs as model_logprobs
from sftrl_jax.parallel import placement, rules
from sftrl_jax.sampling import inputs, methods


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Everything static about a sampling program (hashable: a jit static argument)."""

    max_new_tokens: int
    method: methods.Method
    pad_id: int
    layout: str = "train"  # the rules table prefill and decode trace under (`parallel.rules.TABLES`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The decode loop's carry."""

    cache: kv_cache.KVCache  # the model's own cache: the prompt, then one slot per generated token
    last: jax.Array  # [B] int32: the token fed next (the last one chosen)
    step: jax.Array  # [] int32: output column of the next token (= tokens generated so far)
    done: jax.Array  # [B] bool: the row emitted a stop token (or is batch padding)
    lengths: jax.Array  # [B] int32
    tokens: jax.Array  # [B, M] int32
    logprobs: jax.Array  # [B, M] fp32, processed
    logprobs_raw: jax.Array  # [B, M] fp32
    logprobs_temperature: jax.Array  # [B, M] fp32
    stop_tokens: jax.Array  # [n] int32, padded with -1 (an array, so new stop sets do not recompile)
    key: jax.Array  # PRNG key of the request


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """Host arrays, one row per prompt. Columns at and after `lengths[b]` hold `pad_id` / 0."""

    tokens: np.ndarray  # [B, M] int32
    lengths: np.ndarray  # [B] int32: generated tokens up to and including the first stop token
    logprobs: np.ndarray  # [B, M] fp32: log-prob under the distribution sampled from (0 if greedy)
    logprobs_raw: np.ndarray  # [B, M] fp32: log_softmax(logits)
    logprobs_temperature: np.ndarray  # [B, M] fp32: log_softmax(logits / T), full vocabulary (raw if greedy)
    temperature: float
    steps: int  # decode columns computed (< M when every row stopped early)
    prompt_length: int  # the padded prompt length (bucket) used

    def responses(self) -> list[list[int]]:
        return [list(map(int, row[:n])) for row, n in zip(self.tokens, self.lengths)]


# ------------------------------------------------------------------------------------------ device


def _record(state: State, choice: methods.Choice, cfg: SamplerConfig) -> State:
    """Writes the chosen tokens into column `state.step` (pad / 0 for finished rows)."""
    live = ~state.done
    col = (jnp.zeros((), jnp.int32), state.step)

    def put(buf, value, fill):
        return jax.lax.dynamic_update_slice(buf, jnp.where(live, value, fill).astype(buf.dtype)[:, None], col)

    stop = jnp.any(choice.token[:, None] == state.stop_tokens[None, :], axis=-1)
    return dataclasses.replace(
        state,
        last=choice.token,
        step=state.step + 1,
        done=state.done | (live & stop),
        lengths=state.lengths + live.astype(jnp.int32),
        tokens=put(state.tokens, choice.token, cfg.pad_id),
        logprobs=put(state.logprobs, choice.processed, 0.0),
        logprobs_raw=put(state.logprobs_raw, choice.raw, 0.0),
        logprobs_temperature=put(state.logprobs_temperature, choice.temperature, 0.0),
    )


def _keys(state: State) -> jax.Array:
    return methods.row_keys(state.key, state.step, jnp.arange(state.done.shape[0]))


def prefill(
    params, batch: dict[str, jax.Array], stop_tokens: jax.Array, key: jax.Array, *, graphdef, cfg: SamplerConfig
) -> State:
    """The prompt through the model's forward; the first token; the decode state."""
    with rules.using(cfg.layout):
        model = nnx.merge(graphdef, params)
        ids, row_valid = batch["input_ids"], batch["row_valid"]
        b, p = ids.shape
        cache = model.init_cache(b, p)  # the model's own layout (per layer, or stacked)
        image_inputs = {k: batch[k] for k in model_logprobs.IMAGE_KEYS if k in batch}
        # remat=False: sampling takes no gradients, so recomputing activations in a backward pass only costs.
        out = model(
            ids, attention_mask=batch["attention_mask"], cache=cache, last_logits_only=True, remat=False, **image_inputs
        )
        m = cfg.max_new_tokens
        zeros = jnp.zeros((b, m), jnp.float32)
        state = State(
            # The cache holds the prompt and every generated token but the last (never fed back).
            cache=kv_cache.extend(out.cache, p + m - 1),
            last=jnp.zeros((b,), jnp.int32),
            step=jnp.zeros((), jnp.int32),
            done=~row_valid,
            lengths=jnp.zeros((b,), jnp.int32),
            tokens=jnp.full((b, m), cfg.pad_id, jnp.int32),
            logprobs=zeros,
            logprobs_raw=zeros,
            logprobs_temperature=zeros,
            stop_tokens=stop_tokens,
            key=key,
        )
        return _record(state, methods.choose(out.logits[:, -1], _keys(state), cfg.method), cfg)


def decode(params, state: State, *, graphdef, cfg: SamplerConfig) -> State:
    """Generates columns 1 .. M-1 through the model's own forward, one token per row per step, with
    the KV cache; stops early once every row is done. `params`: see `prepare_weights`."""
    with rules.using(cfg.layout):
        model = nnx.merge(graphdef, params)
        b = state.last.shape[0]
        one = jnp.ones((b, 1), jnp.int32)

        def cond(s: State) -> jax.Array:
            return (s.step < cfg.max_new_tokens) & ~jnp.all(s.done)

        def body(s: State) -> State:
            out = model(s.last[:, None], attention_mask=one, cache=s.cache, last_logits_only=True, remat=False)
            s = dataclasses.replace(s, cache=out.cache)
            return _record(s, methods.choose(out.logits[:, -1], _keys(s), cfg.method), cfg)

        return jax.lax.while_loop(cond, body, state)


_prefill_jit = jax.jit(prefill, static_argnames=("graphdef", "cfg"))
_decode_jits: dict = {}  # compiler options (ops.decode_compiler_options) -> jitted decode


def _decode_fn(options: dict | None):
    key = tuple(sorted((options or {}).items()))
    if key not in _decode_jits:
        # The state (above all the KV cache) is donated: the loop rewrites it in place, so XLA reuses the
        # prefill's buffers for the output instead of allocating a second cache and copying into it.
        _decode_jits[key] = jax.jit(
            decode, static_argnames=("graphdef", "cfg"), donate_argnames=("state",), compiler_options=options or None
        )
    return _decode_jits[key]


def compile_count() -> int:
    """Programs compiled so far by the sampler (prefill + decode), for tests and logs."""
    return sum(f._cache_size() for f in (_prefill_jit, *_decode_jits.values()))


def is_matrix(x) -> bool:
    # Matrices only: 1-D parameters (norm scales, tanh gates) are read in fp32 by the model. A
    # Variable's names tell a layer stack's leading axis: its [G, D] norm scales are no matrices.
    stacked = isinstance(x, nnx.Variable) and rules.param_names(x)[:1] == (layers.LAYERS,)
    return x.ndim - stacked >= 2 and jnp.issubdtype(x.dtype, jnp.floating)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _cast(params, *, dtype):
    return jax.tree.map(lambda v: v.replace(v[...].astype(dtype)) if is_matrix(v) else v, params, is_leaf=_is_variable)


_cast_jit = jax.jit(_cast, static_argnames=("dtype",))
_reshard_jits: dict = {}  # (target sharding, dtype) -> jitted cast into that sharding
_PREPARED: dict = {}  # the last prepared parameters, keyed by the identity of the parameter arrays
PREPARE_COUNT = [0]  # how often parameters were prepared (tests: once per parameter version)


def layout_shardings(params, mesh: jax.sharding.Mesh, layout: str = "decode"):
    """NamedSharding per Variable of `params` (or of an abstract State) under the `layout` table."""
    with rules.using(layout):
        return rules.state_shardings(params, mesh)


LAYOUTS = ("auto", *rules.TABLES)


def resolve_layout(layout: str, config, mesh: jax.sharding.Mesh | None) -> str:
    """The rules table sampling runs under: "train" or "decode" as asked; "auto" = "decode" when the
    model-parallel axes (fsdp x tensor) divide every head count and the MLP width (text, and vision
    for Mllama), so that every device holds a slice of every layer, else "train" (a model with 2 kv
    heads on 8 devices would replicate its attention, each device computing every row)."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown sampling layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    if mesh is None or mesh.size == 1:
        return "train"  # nothing to lay out
    ways = int(np.prod([mesh.shape.get(a, 1) for a in rules.MODEL_PARALLEL]))
    tc = config.text
    dims = [tc.num_heads, tc.num_kv_heads, tc.intermediate_size]
    vision = getattr(config, "vision", None)
    if vision is not None:
        dims += [vision.num_heads, vision.intermediate_size]
    return "decode" if all(d % ways == 0 for d in dims) else "train"


def _reshard(v: nnx.Variable, sharding, dtype) -> jax.Array:
    key = (sharding, jnp.dtype(dtype).name if is_matrix(v) else None)
    if key not in _reshard_jits:
        to = key[1]
        _reshard_jits[key] = jax.jit(lambda a: a.astype(to) if to else a, out_shardings=sharding)
    return _reshard_jits[key](v[...])


def prepare_weights(params, dtype, *, mesh: jax.sharding.Mesh | None = None, layout: str = "train"):
    """The sampler's parameters: matrices cast to the compute `dtype` (the model's own `astype` is then
    a no-op inside prefill and decode) and, on a mesh of several devices, laid out for sampling
    (`layout`, `parallel.rules.DECODE_RULES`: tensor-parallel over fsdp x tensor), done once per
    parameter version and reused while the same parameter arrays come back (JAX arrays are
    immutable; the entry keeps them alive, so their ids stay unique). The reshard goes one parameter
    at a time: the most any device holds on top of its shards is one matrix's decode slice, never a
    copy of the model. The parameters themselves when nothing changes."""
    leaves = tuple(jax.tree.leaves(params))
    relayout = mesh is not None and mesh.size > 1 and layout != "train"
    same_dtype = all(not is_matrix(x) or x.dtype == jnp.dtype(dtype) for x in leaves)
    if same_dtype and not relayout:
        return params
    key = (jnp.dtype(dtype).name, layout if relayout else None, tuple(map(id, leaves)))
    if _PREPARED.get("key") != key or any(leaf.is_deleted() for leaf in leaves):
        _PREPARED.clear()
        if relayout:
            shardings = layout_shardings(params, mesh, layout)
            reshard = lambda v, sh: v.replace(_reshard(v, sh.get_value(), dtype))  # noqa: E731
            out = jax.tree.map(reshard, params, shardings, is_leaf=_is_variable)
        else:
            out = _cast_jit(params, dtype=jnp.dtype(dtype))
        _PREPARED.update(key=key, leaves=leaves, params=out)
        PREPARE_COUNT[0] += 1
    return _PREPARED["params"]


def abstract_weights(params, mesh: jax.sharding.Mesh, layout: str, dtype):
    """Abstract parameters (`jax.ShapeDtypeStruct`s) as `prepare_weights` leaves them: floating
    matrices in the compute `dtype`, every leaf in the `layout` table's sharding (`sftrl plan`)."""
    shardings = layout_shardings(params, mesh, layout)

    def one(v, s):
        dt = jnp.dtype(dtype) if is_matrix(v) else v.dtype
        return v.replace(jax.ShapeDtypeStruct(v.shape, dt, sharding=s.get_value()))

    return jax.tree.map(one, params, shardings, is_leaf=_is_variable)


def abstract_state(state: State, mesh: jax.sharding.Mesh, layout: str) -> State:
    """An abstract decode state (`jax.eval_shape` of `prefill`) sharded as `prefill` leaves it under
    the `layout` table: the KV cache by its logical names (batch, kv heads), other leading batch axes
    over the batch mesh axes where they divide, scalars replicated (`sftrl plan`)."""

    def shard(x):
        names = ("batch",) + (None,) * (x.ndim - 1) if x.ndim else ()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rules.named_sharding(names, x.shape, mesh))

    with rules.using(layout):
        out = jax.tree.map(shard, state)
        cache = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            state.cache,
            kv_cache.shardings(state.cache, mesh),
        )
    return dataclasses.replace(out, cache=cache)


# -------------------------------------------------------------------------------------------- host


def mesh_of(params) -> jax.sharding.Mesh | None:
    """The mesh the parameters live on (None when they sit on one device)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def batch_devices(mesh: jax.sharding.Mesh | None, layout: str | None = None) -> int:
    """How many ways the batch is split on `mesh` (under the `layout` table; default the active one)."""
    with rules.using(layout) if layout else contextlib.nullcontext():
        return rules.batch_ways(mesh)


def stop_array(stop_tokens: Sequence[int]) -> np.ndarray:
    """Stop tokens padded with -1 to a multiple of 4 (at least 4): few distinct shapes."""
    n = max(4, -(-len(stop_tokens) // 4) * 4)
    return np.array(list(stop_tokens) + [-1] * (n - len(stop_tokens)), np.int32)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    pad_id: int | None = None,
    pixel_values: Any = None,
    aspect_ratio_ids: Any = None,
    aspect_ratio_mask: Any = None,
    cross_attention_mask: Sequence[Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    max_length: int | None = None,
    layout: str = "auto",
) -> GenerateResult:
    """Samples up to `max_new_tokens` tokens after each prompt (a list of token ids).

    temperature 0 = greedy; `top_k` 0 and `top_p` 1 = off. A row stops after its first token in
    `stop_tokens`. Mllama image inputs follow transformers' names and shapes: `pixel_values`
    [B, I, C, 3, px, px], `aspect_ratio_ids` [B, I], `aspect_ratio_mask` [B, I, C], and optionally
    `cross_attention_mask` as one [len(prompt_b), I, C] array per prompt (default: derived from the
    `<|image|>` tokens). `mesh` defaults to the one the parameters live on; `max_length` (default:
    the config's max_position_embeddings) bounds the cache. `layout`: "decode" (tensor-parallel over
    the mesh, the weights resharded once per parameter version, `prepare_weights`), "train" (the
    training layout: FSDP, each program all-gathers the weights it uses) or "auto" (`resolve_layout`).
    """
    config = model.config
    tc = config.text
    inputs.check_method(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    prompts = inputs.check_prompts(prompts, tc.num_embeddings)
    stops = inputs.check_stop_tokens(stop_tokens, tc.vocab_size)
    if pad_id is None:
        pad_id = tc.pad_token_id if tc.pad_token_id is not None else 0
    if not 0 <= pad_id < tc.num_embeddings:
        raise UserError(f"pad_id {pad_id} is outside the model's {tc.num_embeddings} embeddings")
    max_length = tc.max_position_embeddings if max_length is None else int(max_length)
    lengths = [len(p) for p in prompts]
    p_len = inputs.prompt_bucket(max(lengths))
    inputs.check_cache_length(lengths, p_len, max_new_tokens, max_length)

    graphdef, params = nnx.split(model)
    mesh = mesh if mesh is not None else mesh_of(params)
    layout = resolve_layout(layout, config, mesh)
    b = inputs.batch_bucket(len(prompts), batch_devices(mesh, layout))
    ids, attention = inputs.left_pad(prompts, batch=b, length=p_len, pad_id=pad_id)
    arrays = {"input_ids": ids, "attention_mask": attention, "row_valid": np.arange(b) < len(prompts)}
    arrays.update(
        inputs.image_arrays(
            config,
            prompts,
            batch=b,
            length=p_len,
            pixel_values=pixel_values,
            aspect_ratio_ids=aspect_ratio_ids,
            aspect_ratio_mask=aspect_ratio_mask,
            cross_attention_mask=cross_attention_mask,
        )
    )
    cfg = SamplerConfig(
        max_new_tokens=int(max_new_tokens),
        method=methods.Method(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k)),
        pad_id=int(pad_id),
        layout=layout,
    )
    key = jax.random.key(seed)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        with rules.using(layout):
            batch = (
                {k: jnp.asarray(v) for k, v in arrays.items()}
                if mesh is None
                else placement.replicated_batch(arrays, mesh)
            )
        weights = prepare_weights(params, model.dtype, mesh=mesh, layout=layout)
        state = _prefill_jit(weights, batch, stop_array(stops), key, graphdef=graphdef, cfg=cfg)
        if max_new_tokens > 1:
            run = _decode_fn(ops.decode_compiler_options(ops.policy_for(mesh)))
            state = run(weights, state, graphdef=graphdef, cfg=cfg)
    n = len(prompts)
    return GenerateResult(
        tokens=placement.to_host(state.tokens)[:n],
        lengths=placement.to_host(state.lengths)[:n],
        logprobs=placement.to_host(state.logprobs)[:n],
        logprobs_raw=placement.to_host(state.logprobs_raw)[:n],
        logprobs_temperature=placement.to_host(state.logprobs_temperature)[:n],
        temperature=float(temperature),
        steps=int(state.step),
        prompt_length=p_len,
    )
