"""Llama-3 text decoder (self-attention layers and Mllama's gated cross-attention layers) and
`LlamaForCausalLM`.

Shape legend: B batch, T query length, S key length (S_x: vision tokens), D width, F MLP width,
N query heads, K kv heads, H head dim, V vocab; I images, C tiles per image.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sftrl_jax import ops
from sftrl_jax.models import config as config_lib
from sftrl_jax.models import kv_cache, layers
from sftrl_jax.parallel.rules import constrain

ACT = ("batch", "seq", "act_embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    logits: jax.Array | None  # [B, T, V] fp32 (or [B, 1, V] with last_logits_only)
    hidden_states: jax.Array  # [B, T, D] final normed hidden state (the PPO value head's input)
    cache: kv_cache.KVCache | None = None


class SelfAttention(nnx.Module):
    """GQA self-attention with RoPE; optional KV cache."""

    def __init__(self, cfg: config_lib.TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = layers.param(rngs, layers.normal, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = layers.param(rngs, layers.normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = layers.param(rngs, layers.normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = layers.param(rngs, layers.normal, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        self.inv_freq = tuple(float(f) for f in layers.rope_inv_freq(cfg))
        self.dtype = dtype
        self.scale = h**-0.5

    def __call__(self, x, *, rope, mask, cache_kv=None, cache_index=None):
        """x [B, T, D], rope: `ops.rope_cos_sin` of the positions ([B, T, H/2] * 2), mask [B, T, S];
        cache_kv: ([B, S_max, K, H],) * 2 or None."""
        # [B, T, N, H], [B, T, K, H] * 2
        q, k, v = ops.dense_fused(x, [layers.weight(p, self.dtype) for p in (self.q_proj, self.k_proj, self.v_proj)])
        q, k = ops.rope(q, *rope), ops.rope(k, *rope)
        if cache_kv is not None:
            k = constrain(kv_cache.write(cache_kv[0], k, cache_index), kv_cache.KV_NAMES)
            v = constrain(kv_cache.write(cache_kv[1], v, cache_index), kv_cache.KV_NAMES)
        # Without a cache the model's mask is causal by index: key blocks above the diagonal are skipped.
        # With a cache, the slots from cache_index + T on are still empty: a decode step reads only the rest.
        out = ops.attention(
            q,
            k.astype(self.dtype),
            v.astype(self.dtype),
            mask,
            scale=self.scale,
            causal=cache_kv is None,
            filled=None if cache_kv is None else cache_index + x.shape[1],
        )
        return ops.dense(out, layers.weight(self.o_proj, self.dtype), n_in=2), (k, v)  # [B, T, D]


class CrossAttention(nnx.Module):
    """Attention from text to vision tokens: RMSNorm on q and k over the head dim, no RoPE."""

    def __init__(self, cfg: config_lib.TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = layers.param(rngs, layers.normal, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = layers.param(rngs, layers.normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = layers.param(rngs, layers.normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = layers.param(rngs, layers.normal, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        norm = functools.partial(layers.RMSNorm, eps=cfg.rms_norm_eps, name="head_dim", param_dtype=param_dtype)
        self.q_norm = norm(h, rngs=rngs)
        self.k_norm = norm(h, rngs=rngs)
        self.dtype = dtype
        self.scale = h**-0.5

    def kv(self, states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys/values of the projected vision tokens [B, S_x, D] -> ([B, S_x, K, H],) * 2."""
        k = ops.dense(states, layers.weight(self.k_proj, self.dtype))  # [B, S, K, H]
        v = ops.dense(states, layers.weight(self.v_proj, self.dtype))
        return self.k_norm(k), v

    def __call__(self, x, *, kv, mask):
        q = self.q_norm(ops.dense(x, layers.weight(self.q_proj, self.dtype)))
        out = ops.attention(q, kv[0].astype(self.dtype), kv[1].astype(self.dtype), mask, scale=self.scale)
        return ops.dense(out, layers.weight(self.o_proj, self.dtype), n_in=2)


class DecoderLayer(nnx.Module):
    """Pre-norm self-attention + SwiGLU block."""

    def __init__(self, cfg: config_lib.TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.input_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = SelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = layers.SwiGLU(d, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, rope, mask, cache_kv=None, cache_index=None):
        h, kv = self.self_attn(
            self.input_layernorm(x), rope=rope, mask=mask, cache_kv=cache_kv, cache_index=cache_index
        )
        x = constrain(x + h, ACT)
        x = constrain(x + self.mlp(self.post_attention_layernorm(x)), ACT)
        return x, kv


class CrossAttentionLayer(nnx.Module):
    """Gated cross-attention block: x + tanh(g_attn) * xattn(x), then x + tanh(g_mlp) * mlp(x).

    `row_mask` [B, T] is False for text rows that see no image tile; their MLP output is zeroed, and
    with `zero_imageless_rows` (Meta) their cross-attention output too.
    """

    def __init__(self, cfg: config_lib.TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.input_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.cross_attn = CrossAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cross_attn_attn_gate = layers.param(rngs, layers.gate_init, (1,), (None,), param_dtype)
        self.post_attention_layernorm = layers.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = layers.SwiGLU(d, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cross_attn_mlp_gate = layers.param(rngs, layers.gate_init, (1,), (None,), param_dtype)
        self.zero_imageless_rows = cfg.cross_attention_zero_imageless_rows
        self.dtype = dtype

    def __call__(self, x, *, kv, mask, row_mask):
        row = row_mask[..., None].astype(self.dtype)  # [B, T, 1]
        h = self.cross_attn(self.input_layernorm(x), kv=kv, mask=mask)
        if self.zero_imageless_rows:
            h = h * row
        x = constrain(x + layers.gate(self.cross_attn_attn_gate, self.dtype) * h, ACT)
        h = self.mlp(self.post_attention_layernorm(x)) * row
        return constrain(x + layers.gate(self.cross_attn_mlp_gate, self.dtype) * h, ACT)


def default_positions(valid: jax.Array) -> jax.Array:
    """RoPE positions from a [B, T] validity mask: real tokens count 0, 1, ... (left padding skipped)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def _cross_masks(tile_mask: jax.Array, num_keys: int) -> tuple[jax.Array, jax.Array]:
    """[B, T, I, C] tile mask -> key mask [B, T, S_x] and row mask [B, T].

    Vision keys are ordered (image, tile, patch), S_x = I * C * P. A row that sees no tile attends to
    every key (transformers' and Meta's convention; its output is then masked by the caller).
    """
    b, t, i, c = tile_mask.shape
    patches = num_keys // (i * c)
    tile_mask = tile_mask.astype(bool)
    row = jnp.any(tile_mask, axis=(2, 3))
    keys = jnp.broadcast_to(tile_mask[..., None], (b, t, i, c, patches)).reshape(b, t, num_keys)
    return keys | ~row[..., None], row


class TextModel(nnx.Module):
    """Embedding, decoder layers, final norm. `cross_attention_layers` are skipped without images."""

    def __init__(self, cfg: config_lib.TextConfig, *, dtype, param_dtype, remat: bool = False, rngs: nnx.Rngs):
        self.embed_tokens = layers.param(
            rngs, layers.normal, (cfg.num_embeddings, cfg.hidden_size), ("vocab", "embed"), param_dtype
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                CrossAttentionLayer(cfg, **kw) if i in cfg.cross_attention_layers else DecoderLayer(cfg, **kw)
                for i in range(cfg.num_layers)
            ]
        )
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.cross_attention_layers = cfg.cross_attention_layers
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = False  # `build.scan_layers`: one scan over the layers in passes without a cache

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cross_states: jax.Array | None = None,
        cross_attention_mask: jax.Array | None = None,
        cache: kv_cache.KVCache | None = None,
    ) -> tuple[jax.Array, kv_cache.KVCache | None]:
        """input_ids [B, T]; attention_mask [B, T] (1 = real token); positions [B, T] (default: from the
        mask); cross_states [B, S_x, D] projected vision tokens; cross_attention_mask [B, T, I, C].
        Returns the final normed hidden state [B, T, D] and the updated cache (if one was given)."""
        b, t = input_ids.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        x = constrain(jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype), ACT)

        # Self-attention mask over key slots: causal by slot, padding slots never attended.
        if cache is None:
            key_valid, q_slot, k_slot = valid, jnp.arange(t), jnp.arange(t)
            if positions is None:
                positions = default_positions(valid)
        else:
            kv_cache.check_room(cache, t)
            key_valid = kv_cache.write(cache.key_mask, valid, cache.index)
            q_slot, k_slot = cache.index + jnp.arange(t), jnp.arange(cache.max_length)
            if positions is None:
                positions = cache.next_position[:, None] + default_positions(valid)
        mask = key_valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])  # [B, T, S]

        # Cross-attention: keys/values from new vision features, else from the cache, else skipped.
        cross_kv, cross_row, num_keys, xmask, row_mask = None, None, None, None, None
        scanned = self.scan_layers and cache is None
        if cross_states is not None:
            if cross_attention_mask is None:
                raise ValueError("cross_attention_mask [B, T, I, C] is required with image features")
            cross_states = cross_states.astype(self.dtype)
            num_keys = cross_states.shape[1]
            if not scanned:  # scanned: each cross-attention layer projects them in the scan body
                xlayers = [self.layers[i] for i in self.cross_attention_layers]
                cross_kv = [layer.cross_attn.kv(cross_states) for layer in xlayers]
            tile_mask = cross_attention_mask
            cross_row = cross_attention_mask[:, -1]
        elif cache is not None and cache.has_cross:
            cross_kv = list(zip(cache.cross_k, cache.cross_v))
            num_keys = cross_kv[0][0].shape[1]
            cross_row = cache.cross_row
            if cross_attention_mask is None:
                tile_mask = jnp.broadcast_to(cross_row[:, None], (b, t, *cross_row.shape[1:]))
            else:
                tile_mask = cross_attention_mask
        if num_keys is not None:
            xmask, row_mask = _cross_masks(tile_mask, num_keys)

        self_layers = [layer for i, layer in enumerate(self.layers) if i not in self.cross_attention_layers]
        rope = ops.rope_cos_sin(positions, self_layers[0].self_attn.inv_freq) if self_layers else None
        if scanned:
            x = self._scan(x, rope=rope, mask=mask, cross_states=cross_states, xmask=xmask, row_mask=row_mask)
            return self.norm(x), None
        new_k, new_v = [], []
        n_self = n_cross = 0
        for i, layer in enumerate(self.layers):
            if i in self.cross_attention_layers:
                if cross_kv is not None:
                    x = self._call(layer, x, kv=cross_kv[n_cross], mask=xmask, row_mask=row_mask)
                n_cross += 1
                continue
            cache_kv = None if cache is None else (cache.k[n_self], cache.v[n_self])
            index = None if cache is None else cache.index
            x, (k, v) = self._call(layer, x, rope=rope, mask=mask, cache_kv=cache_kv, cache_index=index)
            new_k.append(k)
            new_v.append(v)
            n_self += 1
        hidden = self.norm(x)

        if cache is not None:
            cross_k = tuple(kv[0] for kv in cross_kv) if cross_kv is not None else None
            cache = kv_cache.KVCache(
                k=tuple(new_k),
                v=tuple(new_v),
                key_mask=key_valid,
                index=cache.index + t,
                next_position=cache.next_position + jnp.sum(valid, axis=-1, dtype=jnp.int32),
                cross_k=cross_k,
                cross_v=tuple(kv[1] for kv in cross_kv) if cross_kv is not None else None,
                cross_row=cross_row,
            )
        return hidden, cache

    def _scan(self, x, *, rope, mask, cross_states, xmask, row_mask):
        """The layers as one scan over groups (`layers.scan`): without images the self-attention
        layers, one per group; with them every layer, a group being the shortest repeating pattern
        of self- and cross-attention layers (Llama 3.2 Vision: 8 groups of 3 self, 1 cross, 1 self)."""
        cross = set(self.cross_attention_layers)
        active = [i for i in range(len(self.layers)) if cross_states is not None or i not in cross]
        kinds = [i in cross for i in active]
        p = layers.period(kinds)
        groups = [[self.layers[i] for i in active[g : g + p]] for g in range(0, len(active), p)]

        def call(j, layer, x):
            if kinds[j]:
                return layer(x, kv=layer.cross_attn.kv(cross_states), mask=xmask, row_mask=row_mask)
            return layer(x, rope=rope, mask=mask)[0]

        return layers.scan(groups, call, x, remat=self.remat)

    def _call(self, layer, x, **kwargs):
        if not self.remat:
            return layer(x, **kwargs)
        # Recompute each layer's activations in the backward pass instead of storing them.
        return nnx.remat(lambda layer, x, kwargs: layer(x, **kwargs))(layer, x, kwargs)


def lm_logits(hidden: jax.Array, kernel: jax.Array, *, tied: bool) -> jax.Array:
    """hidden [B, T, D] -> fp32 logits [B, T, V]; `kernel` is [D, V] or, if tied, the embedding [V', D]."""
    if tied:
        return ops.dense(hidden, kernel.astype(hidden.dtype).T, out_dtype=jnp.float32)
    return ops.dense(hidden, kernel.astype(hidden.dtype), out_dtype=jnp.float32)


class LlamaForCausalLM(nnx.Module):
    """Llama 3 text model with its LM head (tied to the embedding for Llama 3.2 1B/3B)."""

    def __init__(
        self,
        config: config_lib.LlamaConfig,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        rngs = layers.KeyGen.of(rngs)
        dtype = param_dtype if dtype is None else dtype
        cfg = config.text
        self.config = config
        self.model = TextModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.param(
                rngs, layers.normal, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype
            )
        self.dtype = dtype

    def logits(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config.text
        if cfg.tie_word_embeddings:
            return lm_logits(hidden, self.model.embed_tokens[: cfg.vocab_size], tied=True)
        return lm_logits(hidden, self.lm_head[...], tied=False)

    def lm_head_matrix(self) -> jax.Array:
        """The LM head as [D, V] (the embedding's first V rows transposed when tied), in the parameter
        dtype: logits = hidden @ it. For losses that apply the head in chunks (`models.logprobs`)."""
        cfg = self.config.text
        if cfg.tie_word_embeddings:
            return self.model.embed_tokens[: cfg.vocab_size].T
        return self.lm_head[...]

    def init_cache(self, batch_size: int, max_length: int, dtype=None, *, mesh=None) -> kv_cache.KVCache:
        """Empty cache (dtype: the compute dtype), sharded on `mesh` if given; see `kv_cache`."""
        dtype = self.dtype if dtype is None else dtype
        return kv_cache.init_cache(self.config.text, batch_size, max_length, dtype, mesh=mesh)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: kv_cache.KVCache | None = None,
        last_logits_only: bool = False,
        return_logits: bool = True,
    ) -> ModelOutput:
        hidden, cache = self.model(input_ids, attention_mask=attention_mask, positions=position_ids, cache=cache)
        logits = None
        if return_logits:
            logits = self.logits(hidden[:, -1:] if last_logits_only else hidden)
            logits = constrain(logits, ("batch", "seq", "act_vocab"))
        return ModelOutput(logits=logits, hidden_states=hidden, cache=cache)
