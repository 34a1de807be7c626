"""One decode step (one new token per row) over the model's own weights and a sampler-owned KV cache.

The prompt goes through the model's regular forward (`model(..., cache=KVCache)`), which also
computes the cross-attention keys/values of the images once. `from_prefill` moves that cache into
the decode layout below, and `step` runs the text decoder for one token per row with the same
sub-modules and arithmetic as the training forward (norms, RoPE, gates, fp32 softmax and logits), so
the two agree to fp32 rounding. What differs is only the data layout, chosen for the decode shapes
(a few rows against all the weights), measured on CPU (docs/BENCHMARKS.md):

- matmul weights are [out, in] (`DecodeWeights`) and every projection is computed as the [out, B]
  product: 1.5-3x faster on XLA:CPU for 16 rows than `x @ w` with `w` [in, out];
- K/V are [B, K, S, H] (kv heads before slots), so attention is a batched product over (B, K) of
  contiguous [S, H] blocks; the cache holds exactly the padded prompt plus the generated tokens.

With `kernel=True` (fp32 on one CPU device, see `use_kernel`) the attention and the projections run
on the native kernels of `sftrl_jax.kernels` (same arithmetic, other summation order; 1.6x faster
for the benchmark's decode): the attention reads only the slots filled so far.

Shape legend: B batch, S cache slots, S_x vision keys, D width, F MLP width, N heads, K kv heads,
G heads per kv head, H head dim, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sftrl_jax import kernels
from sftrl_jax.models import kv_cache, layers, mllama, text
from sftrl_jax.parallel.rules import constrain

CACHE_NAMES = ("batch", "act_kv_heads", "seq", None)  # [B, K, S, H]
ACT = ("batch", "act_embed")  # [B, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    k: tuple[jax.Array, ...]  # per self-attention layer, [B, K, S, H]
    v: tuple[jax.Array, ...]
    key_mask: jax.Array  # [B, S] bool: the slot holds a real token
    cross_k: tuple[jax.Array, ...] | None = None  # per cross-attention layer, [B, K, S_x, H]
    cross_v: tuple[jax.Array, ...] | None = None
    cross_mask: jax.Array | None = None  # [B, S_x] bool: vision keys the generated tokens attend to
    cross_row: jax.Array | None = None  # [B] bool: generated tokens see at least one tile

    @property
    def length(self) -> int:
        return self.key_mask.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    """The decode step's matmul weights as [out, in] (torch's Linear layout), per self-attention layer.

    Every projection is computed as the [out, B] product `einsum("OI,BI->OB", w, x)`: XLA's CPU
    matmul is 1.5-3x faster for 16 rows in that form than `x @ w` with `w` [in, out] (see
    docs/BENCHMARKS.md). On CPU `prepare` materialises these once (a copy of the weights, reused
    while the parameters stay the same); elsewhere the transposes are logical and folded into the
    matmuls. Without model parallelism q|k|v and gate|up are stacked into one matmul each; with a
    `tensor` mesh axis they stay apart, each sharded on its own output axis.
    """

    qkv: tuple[tuple[jax.Array, ...], ...]  # per layer (q|k|v [(N + 2K) * H, D],) or (q [N*H, D], k, v)
    o: tuple[jax.Array, ...]  # [D, N * H]
    gate_up: tuple[tuple[jax.Array, ...], ...]  # per layer (gate|up [2F, D],) or (gate [F, D], up)
    down: tuple[jax.Array, ...]  # [D, F]
    head: jax.Array  # [V, D]


def text_model(model) -> text.TextModel:
    return model.language_model if isinstance(model, mllama.MllamaForConditionalGeneration) else model.model


def self_attention_layers(tm: text.TextModel) -> list[text.DecoderLayer]:
    return [layer for i, layer in enumerate(tm.layers) if i not in tm.cross_attention_layers]


def prepare(model, *, stack: bool = True) -> DecodeWeights:
    """The decode weights of `model` ([out, in]); `stack` fuses q|k|v and gate|up (see `DecodeWeights`)."""
    qkv, o, gate_up, down = [], [], [], []
    for layer in self_attention_layers(text_model(model)):
        a, m = layer.self_attn, layer.mlp
        d = a.q_proj.shape[0]
        proj = [w[...].reshape(d, -1).T for w in (a.q_proj, a.k_proj, a.v_proj)]
        mlp = [m.gate_proj[...].T, m.up_proj[...].T]
        qkv.append((jnp.concatenate(proj, axis=0),) if stack else tuple(proj))
        gate_up.append((jnp.concatenate(mlp, axis=0),) if stack else tuple(mlp))
        o.append(a.o_proj[...].reshape(-1, d).T)
        down.append(m.down_proj[...].T)
    tc = model.config.text
    if tc.tie_word_embeddings:
        head = text_model(model).embed_tokens[: tc.vocab_size]
    else:
        head = model.lm_head[...].T
    return DecodeWeights(qkv=tuple(qkv), o=tuple(o), gate_up=tuple(gate_up), down=tuple(down), head=head)


def from_prefill(cache: kv_cache.KVCache, length: int) -> DecodeCache:
    """The model's prefill cache ([B, P, K, H] per layer) as a decode cache of `length` >= P slots."""
    prompt = cache.key_mask.shape[1]
    pad = length - prompt

    def move(x):  # [B, P, K, H] -> [B, K, S, H]
        return constrain(jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0))), CACHE_NAMES)

    cross = {}
    if cache.has_cross:
        n_keys = cache.cross_k[0].shape[1]
        tiles = cache.cross_row[:, None]  # [B, 1, I, C]: generated tokens see what the last prompt token saw
        key_mask, row = text._cross_masks(tiles, n_keys)
        cross = dict(
            cross_k=tuple(constrain(jnp.swapaxes(x, 1, 2), CACHE_NAMES) for x in cache.cross_k),
            cross_v=tuple(constrain(jnp.swapaxes(x, 1, 2), CACHE_NAMES) for x in cache.cross_v),
            cross_mask=key_mask[:, 0],
            cross_row=row[:, 0],
        )
    return DecodeCache(
        k=tuple(move(x) for x in cache.k),
        v=tuple(move(x) for x in cache.v),
        key_mask=jnp.pad(cache.key_mask, ((0, 0), (0, pad))),
        **cross,
    )


def _attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *, filled=None, kernel: bool = False
) -> jax.Array:
    """`layers.attention` for one query per row: q [B, N, H], k/v [B, K, S, H], mask [B, S] -> [B, N, H].

    Scores are computed as [S, G] blocks (keys as the row operand: on CPU 1.5x faster than [G, S]
    for a handful of query heads), the softmax is normalised after the value product (one op
    fewer over [S, G]; the decode step is bound by per-op cost as much as by arithmetic).
    `kernel`: the same values from the native CPU kernel (`sftrl_jax.kernels`), which reads only
    the first `filled` slots (all when None; every later slot must be masked)."""
    if kernel:
        filled = k.shape[2] if filled is None else filled
        return kernels.decode_attention(q, k, v, mask, filled, scale=scale)
    b, n, h = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, kv_heads, n // kv_heads, h)  # [B, K, G, H]
    scores = jnp.einsum("BKGH,BKSH->BKSG", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, :, None], scores, jnp.finfo(jnp.float32).min)
    e = jnp.exp(scores - jnp.max(scores, axis=2, keepdims=True))
    e = jax.lax.optimization_barrier(jnp.swapaxes(e, 2, 3))  # [B, K, G, S]: the fast value-product form
    out = jnp.einsum("BKGS,BKSH->BKGH", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype).reshape(b, n, h)


def use_kernel(model, *, devices: int, params=None) -> bool:
    """Whether the decode step can use the native CPU kernels (attention and projections) for
    `model`: on CPU, on one device (the kernels are not partitioned), fp32 activations, and the
    kernels built (`sftrl_jax.kernels`). `params`: the model's split parameters, when the caller
    has them (saves walking the model again)."""
    if devices != 1 or jnp.dtype(text_model(model).dtype) != jnp.float32:
        return False
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param) if params is None else params)
    if not leaves or any(d.platform != "cpu" for d in leaves[0].devices()):
        return False
    return kernels.available()


def _norm(norm: layers.RMSNorm, x: jax.Array) -> jax.Array:
    """`layers.RMSNorm` of x [B, D] (fp32 statistics); the mean of squares as a matmul with a constant
    vector: one XLA:CPU op instead of three for a reduction over D."""
    x32 = x.astype(jnp.float32)
    d = x.shape[-1]
    mean_sq = jnp.einsum("BD,D->B", x32 * x32, jnp.full((d,), 1.0 / d, jnp.float32))[:, None]
    y = x32 * jax.lax.rsqrt(mean_sq + norm.eps)
    return norm.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_tables(model, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., H/2, B] of `layers.apply_rope`'s angles for positions [..., B] (the same fp32
    products). The sampler computes them for every step before the loop: inside the step XLA
    would fuse them into each layer's RoPE and evaluate them once per rotated element."""
    inv_freq = jnp.asarray(self_attention_layers(text_model(model))[0].self_attn.inv_freq, jnp.float32)
    angles = inv_freq[:, None] * positions.astype(jnp.float32)[..., None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`layers.apply_rope` (same fp32 arithmetic) for heads laid out [N, H, B] (the matmul's output)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1).astype(x.dtype)


def _matmul(w: jax.Array, x: jax.Array, dtype, *, out_dtype=None, kernel: bool = False) -> jax.Array:
    """x [B, I] times w [O, I] -> [B, O], computed as the [O, B] product (see `DecodeWeights`,
    `_project`) and transposed."""
    return _project(w, x, dtype, out_dtype=out_dtype, kernel=kernel).T


def _project(w: jax.Array, x: jax.Array, dtype, *, out_dtype=None, kernel: bool = False) -> jax.Array:
    """w [O, I], x [B, I] -> [O, B]; the barrier keeps XLA from folding a later transpose into the
    matmul (which would turn it back into the slow [B, O] form). `kernel`: by the native CPU
    kernel (`kernels.skinny_matmul`, fp32), when B is small enough for it to win."""
    if kernel and x.shape[0] <= kernels.SKINNY_MAX_ROWS:
        return kernels.skinny_matmul(w.astype(dtype), x)
    return jax.lax.optimization_barrier(jnp.einsum("OI,BI->OB", w.astype(dtype), x, preferred_element_type=out_dtype))


def _mlp(gate_up: tuple[jax.Array, ...], down: jax.Array, x: jax.Array, dtype, *, kernel: bool = False) -> jax.Array:
    """SwiGLU of x [B, D] with (gate|up [2F, D],) or (gate, up) and down [D, F]; the hidden layer
    stays [F, B]."""
    if len(gate_up) == 1:
        gate, up = jnp.split(_project(gate_up[0], x, dtype, kernel=kernel), 2, axis=0)
    else:
        gate, up = (_project(w, x, dtype, kernel=kernel) for w in gate_up)
    h = jax.nn.silu(gate) * up  # [F, B]
    if kernel and h.shape[1] <= kernels.SKINNY_MAX_ROWS:
        return kernels.skinny_matmul(down.astype(dtype), h, x_transposed=True).T
    return jax.lax.optimization_barrier(jnp.einsum("DF,FB->DB", down.astype(dtype), h)).T


def _self_attention_block(layer, x, w, *, index, rope, k_cache, v_cache, key_mask, kernel=False):
    """`text.DecoderLayer` for one token per row: x [B, D]; w = (qkv, o, gate_up, down) as [out, in].
    Returns (x, k_cache, v_cache). `kernel`: attention and projections by the native CPU kernels."""
    attn, dtype = layer.self_attn, layer.self_attn.dtype
    n, kv, hd = attn.q_proj.shape[1], attn.k_proj.shape[1], attn.q_proj.shape[2]
    b = x.shape[0]
    h = _norm(layer.input_layernorm, x)
    if len(w[0]) == 1:
        qkv = _project(w[0][0], h, dtype, kernel=kernel).reshape(n + 2 * kv, hd, b)
        q, k, v = qkv[:n], qkv[n : n + kv], qkv[n + kv :]  # [N or K, H, B]: RoPE in the matmul's layout
    else:
        q, k, v = (_project(wi, h, dtype, kernel=kernel).reshape(-1, hd, b) for wi in w[0])
    q, k = _rope(q, *rope), _rope(k, *rope)
    q, k, v = (jnp.transpose(t, (2, 0, 1)) for t in (q, k, v))  # [B, N or K, H]
    start = (0, 0, index, 0)
    k_cache = constrain(jax.lax.dynamic_update_slice(k_cache, k[:, :, None].astype(k_cache.dtype), start), CACHE_NAMES)
    v_cache = constrain(jax.lax.dynamic_update_slice(v_cache, v[:, :, None].astype(v_cache.dtype), start), CACHE_NAMES)
    # [B, N, H]; slots after `index` are empty (masked): the kernel does not read them
    out = _attend(
        q, k_cache.astype(dtype), v_cache.astype(dtype), key_mask, attn.scale, filled=index + 1, kernel=kernel
    )
    x = constrain(x + _matmul(w[1], out.reshape(b, n * hd), dtype, kernel=kernel), ACT)
    x = constrain(x + _mlp(w[2], w[3], _norm(layer.post_attention_layernorm, x), dtype, kernel=kernel), ACT)
    return x, k_cache, v_cache


def _cross_attention_block(layer, x, *, k, v, mask, row, kernel=False):
    """`text.CrossAttentionLayer` for one token per row, x [B, D] (weights as stored: cross-attention
    layers are few and only run with images)."""
    xattn, dtype = layer.cross_attn, layer.dtype
    row = row[:, None].astype(dtype)  # [B, 1]
    q = xattn.q_norm(jnp.einsum("BD,DNH->BNH", layer.input_layernorm(x), xattn.q_proj.astype(dtype)))
    out = _attend(q, k.astype(dtype), v.astype(dtype), mask, xattn.scale, kernel=kernel)
    h = jnp.einsum("BNH,NHD->BD", out, xattn.o_proj.astype(dtype))
    if layer.zero_imageless_rows:
        h = h * row
    x = constrain(x + layers.gate(layer.cross_attn_attn_gate, dtype) * h, ACT)
    h = layer.mlp(layer.post_attention_layernorm(x)[:, None])[:, 0] * row
    return constrain(x + layers.gate(layer.cross_attn_mlp_gate, dtype) * h, ACT)


def step(
    model,
    weights: DecodeWeights,
    cache: DecodeCache,
    tokens: jax.Array,
    *,
    index: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    kernel: bool = False,
) -> tuple[jax.Array, DecodeCache]:
    """Feeds `tokens` [B] at cache slot `index`, rotated by `rope` = `rope_tables` of their positions.
    Returns fp32 logits [B, V] and the updated cache. `kernel`: attention and projections by the
    native CPU kernels (fp32, one device; see `use_kernel`)."""
    tm = text_model(model)
    key_mask = cache.key_mask.at[:, index].set(True)
    x = constrain(jnp.take(tm.embed_tokens[...], tokens, axis=0).astype(tm.dtype), ACT)  # [B, D]
    new_k, new_v = [], []
    n_self = n_cross = 0
    for i, layer in enumerate(tm.layers):
        if i in tm.cross_attention_layers:
            if cache.cross_k is not None:
                kv = dict(k=cache.cross_k[n_cross], v=cache.cross_v[n_cross])
                x = _cross_attention_block(layer, x, **kv, mask=cache.cross_mask, row=cache.cross_row, kernel=kernel)
            n_cross += 1
            continue
        j = n_self
        x, k, v = _self_attention_block(
            layer,
            x,
            (weights.qkv[j], weights.o[j], weights.gate_up[j], weights.down[j]),
            index=index,
            rope=rope,
            k_cache=cache.k[j],
            v_cache=cache.v[j],
            key_mask=key_mask,
            kernel=kernel,
        )
        new_k.append(k)
        new_v.append(v)
        n_self += 1
    # [B, V] fp32, as `text.lm_logits`
    logits = _matmul(weights.head, _norm(tm.norm, x), x.dtype, out_dtype=jnp.float32, kernel=kernel)
    logits = constrain(logits, ("batch", "act_vocab"))
    return logits, dataclasses.replace(cache, k=tuple(new_k), v=tuple(new_v), key_mask=key_mask)
