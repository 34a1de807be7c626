"""`MllamaForConditionalGeneration`: vision encoder + projector + text decoder with gated
cross-attention layers + LM head.

Inputs are named as in transformers. Without `pixel_values` (and no cached vision keys) the vision
tower and the cross-attention layers are skipped: the model is a plain Llama decoder.
"""

from __future__ import annotations

import jax

from sftrl_jax.models import config as config_lib
from sftrl_jax.models import kv_cache, text, vision
from sftrl_jax.parallel.rules import constrain


class MllamaForConditionalGeneration(text.CausalLM):
    def build_towers(self, config: config_lib.MllamaConfig, *, dtype, param_dtype, rngs, **kw) -> None:
        tc, vc = config.text, config.vision
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)
        self.vision_model = vision.VisionModel(vc, **kw)
        self.multi_modal_projector = vision.Dense(
            vc.output_dim, tc.hidden_size, ("vision_mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.language_model = text.TextModel(tc, **kw)

    @property
    def decoder(self) -> text.TextModel:
        return self.language_model

    def vision_states(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask, *, remat=None) -> jax.Array:
        """Projected vision tokens [B, S_x = I * C * P, D] for the cross-attention layers."""
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError("pixel_values need aspect_ratio_ids [B, I] and aspect_ratio_mask [B, I, C]")
        # [B, I, C, P, D_v]
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask, remat=remat)
        b = features.shape[0]
        states = self.multi_modal_projector(features.reshape(b, -1, features.shape[-1]))
        return constrain(states, text.ACT)

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
        remat: bool | None = None,
    ) -> text.ModelOutput:
        """input_ids [B, T]; attention_mask [B, T]; position_ids [B, T]; pixel_values [B, I, C, 3, px, px];
        aspect_ratio_ids [B, I]; aspect_ratio_mask [B, I, C]; cross_attention_mask [B, T, I, C].
        `cross_attention_states` [B, I * C * P, D] (from `vision_states`) replaces `pixel_values`, so
        several forwards over the same images (log-probs, values, ...) run the vision tower once.
        `remat`: default the constructor's (sampling passes False)."""
        if pixel_values is not None and cross_attention_states is not None:
            raise ValueError("pass pixel_values or cross_attention_states, not both")
        cross_states = cross_attention_states
        if pixel_values is not None:
            cross_states = self.vision_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask, remat=remat)
        hidden, cache = self.language_model(
            input_ids,
            attention_mask=attention_mask,
            positions=position_ids,
            cross_states=cross_states,
            cross_attention_mask=cross_attention_mask,
            cache=cache,
            remat=remat,
        )
        return self.output(hidden, cache, last_logits_only=last_logits_only, return_logits=return_logits)
