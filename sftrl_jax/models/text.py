"""Llama-3 text decoder (self-attention layers and Mllama's gated cross-attention layers),
`LlamaForCausalLM` and `Qwen2ForCausalLM` (the same decoder with q/k/v bias).

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
from sftrl_jax.models import kv_cache, layers, lora
from sftrl_jax.parallel.rules import constrain

ACT = ("batch", "seq", "act_embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    logits: jax.Array | None  # [B, T, V] fp32 (or [B, 1, V] with last_logits_only)
    hidden_states: jax.Array  # [B, T, D] final normed hidden state (the PPO value head's input)
    cache: kv_cache.KVCache | None = None


class Attention(nnx.Module):
    """The four projections of an attention block: q [D, N, H], k and v [D, K, H], o [N, H, D]."""

    def __init__(self, cfg: config_lib.TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = layers.param(rngs, layers.normal, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = layers.param(rngs, layers.normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = layers.param(rngs, layers.normal, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = layers.param(rngs, layers.normal, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        self.dtype = dtype
        self.scale = h**-0.5


class SelfAttention(Attention):
    """GQA self-attention with RoPE; optional KV cache; with `qkv_bias` (Qwen2) q/k/v biases [N, H],
    [K, H], [K, H]."""

    def __init__(self, cfg: config_lib.TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.inv_freq = tuple(float(f) for f in layers.rope_inv_freq(cfg))
        self.qkv_bias = cfg.qkv_bias
        if cfg.qkv_bias:
            n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            self.q_bias = layers.param(rngs, layers.normal, (n, h), ("heads", "head_dim"), param_dtype)
            self.k_bias = layers.param(rngs, layers.normal, (k, h), ("kv_heads", "head_dim"), param_dtype)
            self.v_bias = layers.param(rngs, layers.normal, (k, h), ("kv_heads", "head_dim"), param_dtype)

    def __call__(self, x, *, rope, mask, cache_kv=None, cache_index=None):
        """x [B, T, D], rope: `ops.rope_cos_sin` of the positions ([B, T, H/2] * 2), mask [B, T, S];
        cache_kv: ([B, S_max, K, H],) * 2 or None."""
        # [B, T, N, H], [B, T, K, H] * 2
        q, k, v = ops.dense_fused(x, [lora.weight(self, n, self.dtype) for n in ("q_proj", "k_proj", "v_proj")])
        q, k, v = (lora.apply(y, self, n, x, self.dtype) for y, n in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")))
        if self.qkv_bias:  # before RoPE, as transformers' Qwen2 adds it inside the projection
            q, k, v = (y + b[...].astype(self.dtype) for y, b in ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias)))
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
        y = ops.dense(out, lora.weight(self, "o_proj", self.dtype), n_in=2)
        return lora.apply(y, self, "o_proj", out, self.dtype), (k, v)  # [B, T, D]


class CrossAttention(Attention):
    """Attention from text to vision tokens: RMSNorm on q and k over the head dim, no RoPE."""

    def __init__(self, cfg: config_lib.TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = functools.partial(layers.RMSNorm, eps=cfg.rms_norm_eps, name="head_dim", param_dtype=param_dtype)
        self.q_norm = norm(cfg.head_dim, rngs=rngs)
        self.k_norm = norm(cfg.head_dim, rngs=rngs)

    def kv(self, states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys/values of the projected vision tokens [B, S_x, D] -> ([B, S_x, K, H],) * 2."""
        k, v = (self._product(n, states) for n in ("k_proj", "v_proj"))  # [B, S, K, H]
        return self.k_norm(k), v

    def _product(self, name: str, x: jax.Array, n_in: int = 1) -> jax.Array:
        y = ops.dense(x, lora.weight(self, name, self.dtype), n_in=n_in)
        return lora.apply(y, self, name, x, self.dtype)

    def __call__(self, x, *, kv, mask):
        q = self.q_norm(self._product("q_proj", x))
        out = ops.attention(q, kv[0].astype(self.dtype), kv[1].astype(self.dtype), mask, scale=self.scale)
        return self._product("o_proj", out, n_in=2)


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
    """Embedding, decoder layers, final norm. `cross_attention_layers` are skipped without images.

    The layers are `layers` (one module per layer), or with `scan_layers` `stacks`: one per position
    j of the shortest repeating pattern of self- and cross-attention layers (Llama 3.2 Vision: 3 self,
    1 cross, 1 self), holding layers j, j + p, ... stacked (`layers.stack`), run by one scan.
    """

    def __init__(
        self,
        cfg: config_lib.TextConfig,
        *,
        dtype,
        param_dtype,
        remat: bool = False,
        scan_layers: bool = False,
        rngs: nnx.Rngs,
    ):
        self.embed_tokens = layers.param(
            rngs, layers.normal, (cfg.num_embeddings, cfg.hidden_size), ("vocab", "embed"), param_dtype
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cross = cfg.cross_attention_layers

        def layer(i):
            return CrossAttentionLayer(cfg, **kw) if i in cross else DecoderLayer(cfg, **kw)

        n = cfg.num_layers
        if scan_layers:
            p = layers.period([i in cross for i in range(n)])
            self.stacks = nnx.List([layers.stack([layer(i) for i in range(j, n, p)]) for j in range(p)])
        else:
            self.layers = nnx.List([layer(i) for i in range(n)])
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.cross_attention_layers = cross
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers

    @property
    def units(self) -> nnx.List:
        """What the layer loop runs: the layers, or the stacks (`scan_layers`)."""
        return self.stacks if self.scan_layers else self.layers

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cross_states: jax.Array | None = None,
        cross_attention_mask: jax.Array | None = None,
        cache: kv_cache.KVCache | None = None,
        remat: bool | None = None,
    ) -> tuple[jax.Array, kv_cache.KVCache | None]:
        """input_ids [B, T]; attention_mask [B, T] (1 = real token); positions [B, T] (default: from the
        mask); cross_states [B, S_x, D] projected vision tokens; cross_attention_mask [B, T, I, C];
        remat: default the constructor's (sampling passes False: no gradients, nothing to recompute).
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
        cached_cross = cross_states is None and cache is not None and cache.has_cross
        cross_row, xmask, row_mask = None, None, None
        if cross_states is not None:
            if cross_attention_mask is None:
                raise ValueError("cross_attention_mask [B, T, I, C] is required with image features")
            cross_states = cross_states.astype(self.dtype)
            tile_mask, cross_row = cross_attention_mask, cross_attention_mask[:, -1]
            xmask, row_mask = _cross_masks(tile_mask, cross_states.shape[1])
        elif cached_cross:
            cross_row = cache.cross_row
            tile_mask = cross_attention_mask
            if tile_mask is None:
                tile_mask = jnp.broadcast_to(cross_row[:, None], (b, t, *cross_row.shape[1:]))
            xmask, row_mask = _cross_masks(tile_mask, cache.cross_k[0].shape[-3])

        units = self.units
        is_cross = [u in self.cross_attention_layers for u in range(len(units))]  # unit j: layer j's kind
        selfs = [u for u in range(len(units)) if not is_cross[u]]
        crosses = [u for u in range(len(units)) if is_cross[u]]
        rope = ops.rope_cos_sin(positions, units[selfs[0]].self_attn.inv_freq) if selfs else None
        index = None if cache is None else cache.index

        def step(layer, x, kv, cached_kv):
            """One layer. Self-attention: `kv` its cache or None. Cross-attention: `cached_kv` its vision
            keys/values from the cache, else projected here; handed out (y) to fill a new cache."""
            if isinstance(layer, CrossAttentionLayer):
                xkv = layer.cross_attn.kv(cross_states) if cached_kv is None else cached_kv
                x = layer(x, kv=xkv, mask=xmask, row_mask=row_mask)
                return x, None, xkv if cache is not None and cached_kv is None else None
            x, new_kv = layer(x, rope=rope, mask=mask, cache_kv=kv, cache_index=index)
            return x, None if kv is None else new_kv, None

        state, inputs = [None] * len(units), [None] * len(units)
        if cache is not None:
            for u, k, v in zip(selfs, cache.k, cache.v):
                state[u] = (k, v)
            if cached_cross:
                for u, k, v in zip(crosses, cache.cross_k, cache.cross_v):
                    inputs[u] = (k, v)
        x, state, outs = layers.loop(
            units,
            step,
            x,
            state=state,
            inputs=inputs,
            active=[not c or xmask is not None for c in is_cross],
            stacked=self.scan_layers,
            remat=self.remat if remat is None else remat,
        )
        hidden = self.norm(x)

        if cache is not None:
            cross_kv = [inputs[u] if cached_cross else outs[u] for u in crosses] if xmask is not None else None
            cache = kv_cache.KVCache(
                k=tuple(state[u][0] for u in selfs),
                v=tuple(state[u][1] for u in selfs),
                key_mask=key_valid,
                index=cache.index + t,
                next_position=cache.next_position + jnp.sum(valid, axis=-1, dtype=jnp.int32),
                cross_k=None if cross_kv is None else tuple(kv[0] for kv in cross_kv),
                cross_v=None if cross_kv is None else tuple(kv[1] for kv in cross_kv),
                cross_row=cross_row,
            )
        return hidden, cache


def lm_logits(hidden: jax.Array, kernel: jax.Array, *, tied: bool) -> jax.Array:
    """hidden [B, T, D] -> fp32 logits [B, T, V]; `kernel` is [D, V] or, if tied, the embedding [V', D]."""
    if tied:
        return ops.dense(hidden, kernel.astype(hidden.dtype).T, out_dtype=jnp.float32)
    return ops.dense(hidden, kernel.astype(hidden.dtype), out_dtype=jnp.float32)


class CausalLM(nnx.Module):
    """What both model classes share around their towers (`build_towers`; `decoder`: their
    `TextModel`): the LM head (the embedding's first V rows when tied, else `lm_head` [D, V]), the
    KV cache, the output.

    dtype: the compute dtype (default: `param_dtype`); remat: each layer a `jax.checkpoint` in the
    backward pass (a call may override it); scan_layers: the layer stacks stored stacked and run as
    one scan each (`TextModel`, `layers.loop`).
    """

    def __init__(
        self,
        config: config_lib.ModelConfig,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        remat: bool = False,
        scan_layers: bool = False,
        rngs: nnx.Rngs,
    ):
        rngs = layers.KeyGen.of(rngs)
        dtype = param_dtype if dtype is None else dtype
        self.config = config
        self.build_towers(config, dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers, rngs=rngs)
        tc = config.text
        if not tc.tie_word_embeddings:
            self.lm_head = layers.param(
                rngs, layers.normal, (tc.hidden_size, tc.vocab_size), ("embed", "vocab"), param_dtype
            )
        self.dtype = dtype

    def build_towers(self, config: config_lib.ModelConfig, **kw) -> None:
        """Create the model's towers, named as in transformers (`kw`: `TextModel`'s options)."""
        raise NotImplementedError

    @property
    def decoder(self) -> TextModel:
        raise NotImplementedError

    def lm_head_matrix(self) -> jax.Array:
        """The LM head as [D, V] (the embedding's first V rows transposed when tied), in the parameter
        dtype: logits = hidden @ it. For losses that apply the head in chunks (`models.logprobs`)."""
        cfg = self.config.text
        if cfg.tie_word_embeddings:
            return self.decoder.embed_tokens[: cfg.vocab_size].T
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config.text
        if cfg.tie_word_embeddings:
            return lm_logits(hidden, self.decoder.embed_tokens[: cfg.vocab_size], tied=True)
        return lm_logits(hidden, self.lm_head[...], tied=False)

    def init_cache(self, batch_size: int, max_length: int, dtype=None, *, mesh=None) -> kv_cache.KVCache:
        """Empty cache (dtype: the compute dtype) in the decoder's layout, sharded on `mesh` if given;
        see `kv_cache`."""
        dtype = self.dtype if dtype is None else dtype
        period = len(self.decoder.stacks) if self.decoder.scan_layers else None
        return kv_cache.init_cache(self.config.text, batch_size, max_length, dtype, mesh=mesh, period=period)

    def output(self, hidden, cache, *, last_logits_only: bool, return_logits: bool) -> ModelOutput:
        logits = None
        if return_logits:
            logits = self.logits(hidden[:, -1:] if last_logits_only else hidden)
            logits = constrain(logits, ("batch", "seq", "act_vocab"))
        return ModelOutput(logits=logits, hidden_states=hidden, cache=cache)


class LlamaForCausalLM(CausalLM):
    """Llama 3 text model with its LM head (tied to the embedding for Llama 3.2 1B/3B)."""

    def build_towers(self, config: config_lib.LlamaConfig, **kw) -> None:
        self.model = TextModel(config.text, **kw)

    @property
    def decoder(self) -> TextModel:
        return self.model

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: kv_cache.KVCache | None = None,
        last_logits_only: bool = False,
        return_logits: bool = True,
        remat: bool | None = None,
    ) -> ModelOutput:
        hidden, cache = self.model(
            input_ids, attention_mask=attention_mask, positions=position_ids, cache=cache, remat=remat
        )
        return self.output(hidden, cache, last_logits_only=last_logits_only, return_logits=return_logits)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: the Llama decoder and forward with q/k/v bias (`TextConfig.qkv_bias`), RoPE
    theta 1e6 and a tied head at 0.5B-3B, all from the config. Its own class so that the HF family
    (config.json, `architectures`) round-trips and `isinstance` tells the two apart."""
