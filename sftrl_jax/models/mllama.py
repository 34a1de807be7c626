"""`MllamaForConditionalGeneration`: vision encoder + projector + text decoder with gated
cross-attention layers + LM head.

Inputs are named as in transformers. Without `pixel_values` (and no cached vision keys) the vision
tower and the cross-attention layers are skipped: the model is a plain Llama decoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sftrl_jax.models import config as config_lib
from sftrl_jax.models import kv_cache, layers, text, vision
from sftrl_jax.parallel.rules import constrain


class MllamaForConditionalGeneration(nnx.Module):
    def __init__(
        self,
        config: config_lib.MllamaConfig,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        rngs = layers.KeyGen.of(rngs)
        dtype = param_dtype if dtype is None else dtype
        tc, vc = config.text, config.vision
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.config = config
        self.vision_model = vision.VisionModel(vc, **kw)
        self.multi_modal_projector = vision.Dense(
            vc.output_dim, tc.hidden_size, ("vision_mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.language_model = text.TextModel(tc, **kw)
        if not tc.tie_word_embeddings:
            self.lm_head = layers.param(
                rngs, layers.normal, (tc.hidden_size, tc.vocab_size), ("embed", "vocab"), param_dtype
            )
        self.dtype = dtype

    def vision_states(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> jax.Array:
        """Projected vision tokens [B, S_x = I * C * P, D] for the cross-attention layers."""
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError("pixel_values need aspect_ratio_ids [B, I] and aspect_ratio_mask [B, I, C]")
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # [B, I, C, P, D_v]
        b = features.shape[0]
        states = self.multi_modal_projector(features.reshape(b, -1, features.shape[-1]))
        return constrain(states, text.ACT)

    def logits(self, hidden: jax.Array) -> jax.Array:
        tc = self.config.text
        if tc.tie_word_embeddings:
            return text.lm_logits(hidden, self.language_model.embed_tokens[: tc.vocab_size], tied=True)
        return text.lm_logits(hidden, self.lm_head[...], tied=False)

    def lm_head_matrix(self) -> jax.Array:
        """The LM head as [D, V] (see `LlamaForCausalLM.lm_head_matrix`)."""
        tc = self.config.text
        if tc.tie_word_embeddings:
            return self.language_model.embed_tokens[: tc.vocab_size].T
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
        pixel_values: jax.Array | None = None,
        aspect_ratio_ids: jax.Array | None = None,
        aspect_ratio_mask: jax.Array | None = None,
        cross_attention_mask: jax.Array | None = None,
        cross_attention_states: jax.Array | None = None,
        cache: kv_cache.KVCache | None = None,
        last_logits_only: bool = False,
        return_logits: bool = True,
    ) -> text.ModelOutput:
        """input_ids [B, T]; attention_mask [B, T]; position_ids [B, T]; pixel_values [B, I, C, 3, px, px];
        aspect_ratio_ids [B, I]; aspect_ratio_mask [B, I, C]; cross_attention_mask [B, T, I, C].
        `cross_attention_states` [B, I * C * P, D] (from `vision_states`) replaces `pixel_values`, so
        several forwards over the same images (log-probs, values, ...) run the vision tower once."""
        if pixel_values is not None and cross_attention_states is not None:
            raise ValueError("pass pixel_values or cross_attention_states, not both")
        cross_states = cross_attention_states
        if pixel_values is not None:
            cross_states = self.vision_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        hidden, cache = self.language_model(
            input_ids,
            attention_mask=attention_mask,
            positions=position_ids,
            cross_states=cross_states,
            cross_attention_mask=cross_attention_mask,
            cache=cache,
        )
        logits = None
        if return_logits:
            logits = self.logits(hidden[:, -1:] if last_logits_only else hidden)
            logits = constrain(logits, ("batch", "seq", "act_vocab"))
        return text.ModelOutput(logits=logits, hidden_states=hidden, cache=cache)
