"""Mllama vision encoder.

Per tile: 14x14 patch embedding (no bias), gated pre-tile embedding (by aspect-ratio id), class
token, gated positional embedding (shared table + per-aspect-ratio tile table), LayerNorm, the
local layers (attention across all tiles of one image, sequence padded to a multiple of 8) that also
hand out intermediate features, LayerNorm, gated post-tile embedding, the gated global layers. The
output concatenates the final features with the intermediate ones.

Shape legend: B batch, I images per sample, C tiles per image, P tokens per tile (patches + class
token), D vision width, F MLP width, N heads, H head dim, R aspect-ratio ids (0 = padding image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sftrl_jax import ops
from sftrl_jax.models import config as config_lib
from sftrl_jax.models import layers, lora
from sftrl_jax.parallel.rules import constrain

ACT = ("batch", "seq", "act_embed")


class VisionAttention(nnx.Module):
    """Multi-head attention without bias or RoPE."""

    def __init__(self, cfg: config_lib.VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        qkv = (d, n, h), ("vision_embed", "vision_heads", "head_dim")
        self.q_proj = layers.param(rngs, layers.normal, *qkv, param_dtype)
        self.k_proj = layers.param(rngs, layers.normal, *qkv, param_dtype)
        self.v_proj = layers.param(rngs, layers.normal, *qkv, param_dtype)
        self.o_proj = layers.param(
            rngs, layers.normal, (n, h, d), ("vision_heads", "head_dim", "vision_embed"), param_dtype
        )
        self.dtype = dtype
        self.scale = h**-0.5

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = (
            lora.apply(jnp.einsum("BTD,DNH->BTNH", x, lora.weight(self, n, self.dtype)), self, n, x, self.dtype)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        out = ops.attention(q, k, v, mask, scale=self.scale)
        y = jnp.einsum("BTNH,NHD->BTD", out, lora.weight(self, "o_proj", self.dtype))
        return lora.apply(y, self, "o_proj", out, self.dtype)


class Dense(nnx.Module):
    """x @ kernel + bias."""

    def __init__(self, d_in: int, d_out: int, names, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = layers.param(rngs, layers.normal, (d_in, d_out), names, param_dtype)
        self.bias = layers.param(rngs, layers.zeros, (d_out,), names[1:], param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = lora.apply(
            jnp.einsum("...D,DF->...F", x, lora.weight(self, "kernel", self.dtype)), self, "kernel", x, self.dtype
        )
        return y + self.bias.astype(self.dtype)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: config_lib.VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionLayer(nnx.Module):
    """Pre-norm block; in the global encoder both residual branches are scaled by tanh gates."""

    def __init__(self, cfg: config_lib.VisionConfig, *, gated: bool, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layers.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = VisionAttention(cfg, **kw)
        self.post_attention_layernorm = layers.LayerNorm(
            cfg.hidden_size, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.mlp = VisionMLP(cfg, **kw)
        if gated:
            self.gate_attn = layers.param(rngs, layers.gate_init, (1,), (None,), param_dtype)
            self.gate_ffn = layers.param(rngs, layers.gate_init, (1,), (None,), param_dtype)
        self.gated = gated
        self.dtype = dtype

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = self.self_attn(self.input_layernorm(x), mask)
        if self.gated:
            h = layers.gate(self.gate_attn, self.dtype) * h
        x = constrain(x + h, ACT)
        h = self.mlp(self.post_attention_layernorm(x))
        if self.gated:
            h = layers.gate(self.gate_ffn, self.dtype) * h
        return constrain(x + h, ACT)


class VisionEncoder(nnx.Module):
    """`num_layers` layers: `layers`, or with `scan_layers` one stack of them (`stacks[0]`, [G, ...])."""

    def __init__(
        self, cfg: config_lib.VisionConfig, num_layers: int, *, gated: bool, remat: bool, scan_layers: bool, **kw
    ):
        built = [VisionLayer(cfg, gated=gated, **kw) for _ in range(num_layers)]
        if scan_layers:
            self.stacks = nnx.List([layers.stack(built)] if built else [])
        else:
            self.layers = nnx.List(built)
        self.remat = remat
        self.scan_layers = scan_layers

    def __call__(self, x, mask, *, collect: tuple[int, ...] = (), collect_inputs: bool = True, remat=None):
        """Returns the output and the features of the layers in `collect` (their inputs or outputs)."""

        def step(layer, x, s, c):
            y = layer(x, mask)
            return y, s, (x if collect_inputs else y) if collect else None

        units = self.stacks if self.scan_layers else self.layers
        remat = self.remat if remat is None else remat
        x, _, outs = layers.loop(units, step, x, stacked=self.scan_layers, remat=remat)
        # stacked: one stack, its features [G, ...]
        return x, [outs[0][i] if self.scan_layers else outs[i] for i in collect]


class TileEmbedding(nnx.Module):
    """Gated per-aspect-ratio embedding added to every token of each tile: [R, C, D]."""

    def __init__(self, cfg: config_lib.VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        shape = (cfg.num_aspect_ratios, cfg.max_num_tiles, cfg.hidden_size)
        self.embedding = layers.param(rngs, layers.normal, shape, (None, None, "vision_embed"), param_dtype)
        self.gate = layers.param(rngs, layers.gate_init, (1,), (None,), param_dtype)

    def __call__(self, x: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """x [B, C, P, D], aspect_ratio_ids [B]."""
        emb = jnp.take(self.embedding[...], aspect_ratio_ids, axis=0).astype(x.dtype)  # [B, C, D]
        return x + layers.gate(self.gate, x.dtype) * emb[:, :, None, :]


class PositionEmbedding(nnx.Module):
    """(1 - tanh g) * shared position table [P, D] + tanh g * per-aspect-ratio tile table [R, C, P, D]."""

    def __init__(self, cfg: config_lib.VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        p, d = cfg.num_patches, cfg.hidden_size
        self.embedding = layers.param(rngs, layers.normal, (p, d), (None, "vision_embed"), param_dtype)
        self.gate = layers.param(rngs, layers.gate_init, (1,), (None,), param_dtype)
        self.tile_embedding = layers.param(
            rngs,
            layers.normal,
            (cfg.num_aspect_ratios, cfg.max_num_tiles, p, d),
            (None, None, None, "vision_embed"),
            param_dtype,
        )

    def __call__(self, x: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        g = layers.gate(self.gate, x.dtype)
        tile = jnp.take(self.tile_embedding[...], aspect_ratio_ids, axis=0).astype(x.dtype)  # [B, C, P, D]
        return x + (1 - g) * self.embedding.astype(x.dtype) + g * tile


class VisionModel(nnx.Module):
    def __init__(self, cfg: config_lib.VisionConfig, *, dtype, param_dtype, remat=False, scan_layers=False, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = layers.param(
            rngs, layers.normal, (cfg.num_channels, p, p, d), (None, None, None, "vision_embed"), param_dtype
        )
        self.class_embedding = layers.param(rngs, layers.normal, (d,), ("vision_embed",), param_dtype)
        self.pre_tile_positional_embedding = TileEmbedding(cfg, param_dtype=param_dtype, rngs=rngs)
        self.gated_positional_embedding = PositionEmbedding(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_tile_positional_embedding = TileEmbedding(cfg, param_dtype=param_dtype, rngs=rngs)
        # transformers builds these two with nn.LayerNorm's default eps, not norm_eps.
        self.layernorm_pre = layers.LayerNorm(d, eps=1e-5, param_dtype=param_dtype, rngs=rngs)
        self.layernorm_post = layers.LayerNorm(d, eps=1e-5, param_dtype=param_dtype, rngs=rngs)
        kw = dict(remat=remat, scan_layers=scan_layers, **kw)
        self.transformer = VisionEncoder(cfg, cfg.num_layers, gated=False, **kw)
        self.global_transformer = VisionEncoder(cfg, cfg.num_global_layers, gated=True, **kw)
        self.cfg = cfg
        self.dtype = dtype

    def __call__(
        self, pixel_values: jax.Array, aspect_ratio_ids: jax.Array, aspect_ratio_mask: jax.Array, *, remat=None
    ) -> jax.Array:
        """pixel_values [B, I, C, 3, px, px], aspect_ratio_ids [B, I], aspect_ratio_mask [B, I, C]
        -> features [B, I, C, P, D * (1 + len(intermediate_layers_indices))]. `remat`: default the
        constructor's."""
        cfg = self.cfg
        b, i, c, ch, hpx, wpx = pixel_values.shape
        if c != cfg.max_num_tiles:
            raise ValueError(
                f"pixel_values has {c} tiles per image; the model expects max_num_tiles={cfg.max_num_tiles}"
            )
        p, d = cfg.patch_size, cfg.hidden_size
        gh, gw = hpx // p, wpx // p
        # Non-overlapping p x p patches, row-major, as the stride-p convolution sees them.
        x = pixel_values.astype(self.dtype).reshape(b * i * c, ch, gh, p, gw, p)
        x = x.transpose(0, 2, 4, 1, 3, 5)  # [BIC, gh, gw, ch, p, p]
        x = jnp.einsum("Mhwcij,cijD->MhwD", x, layers.weight(self.patch_embedding, self.dtype))
        x = x.reshape(b * i, c, gh * gw, d)  # [BI, C, P-1, D]

        ar_ids = aspect_ratio_ids.reshape(b * i)
        x = self.pre_tile_positional_embedding(x, ar_ids)
        cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (b * i, c, 1, d))
        x = jnp.concatenate([cls, x], axis=2)  # [BI, C, P, D]
        x = self.gated_positional_embedding(x, ar_ids)
        x = self.layernorm_pre(x)

        n_tok = x.shape[2]
        padded = -(-n_tok // 8) * 8
        x = jnp.pad(x, ((0, 0), (0, 0), (0, padded - n_tok), (0, 0)))
        # A token is padding if its tile is (aspect_ratio_mask == 0) or it pads the tile to a multiple
        # of 8. As in Meta's code, only padding-to-padding pairs are masked.
        pad_tile = aspect_ratio_mask.reshape(b * i, c) == 0
        pad_tok = pad_tile[:, :, None] | (jnp.arange(padded) >= n_tok)[None, None, :]
        pad_tok = pad_tok.reshape(b * i, c * padded)
        mask = ~(pad_tok[:, :, None] & pad_tok[:, None, :])  # [BI, L, L]

        x = constrain(x.reshape(b * i, c * padded, d), ACT)
        x, features = self.transformer(
            x,
            mask,
            collect=cfg.intermediate_layers_indices,
            collect_inputs=cfg.intermediate_layer_features == "input",
            remat=remat,
        )
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(b * i, c, padded, d), ar_ids)
        x, _ = self.global_transformer(x.reshape(b * i, c * padded, d), mask, remat=remat)
        x = x.reshape(b * i, c, padded, d)[:, :, :n_tok]

        # Intermediate features are interleaved per channel (stacked on a new last axis, then flattened).
        inter = jnp.stack(features, axis=-1).reshape(b * i, c, padded, d * len(features))[:, :, :n_tok]
        out = jnp.concatenate([x, inter], axis=-1)
        return out.reshape(b, i, c, n_tok, out.shape[-1])
