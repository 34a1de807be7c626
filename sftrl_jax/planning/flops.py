"""The ideal FLOPs of a program: model FLOPs per token x tokens, counted from the config.

Counted: every matrix product a token goes through (2 FLOPs per multiply-add), attention's two
products over the keys it may see (causal self-attention: half of the [T, T] square on average,
the blocks a causal kernel computes: cuDNN's, the TPU flash kernel's, the CPU's query blocks;
a decode step: the filled cache slots, which is all `ops.attention(filled=..)` reads), the LM head over the vocabulary. Not counted: embeddings (a
lookup), norms, softmax and elementwise work. A training step is forward + backward = 3 forwards,
remat adds one more forward.
"""

from __future__ import annotations

from sftrl_jax.models import config as config_lib


def matmul_params(cfg: config_lib.ModelConfig, *, images: bool) -> tuple[int, int]:
    """(text-side matrix parameters one token multiplies with, vision-side ones per vision token).
    Without images Mllama's cross-attention layers are skipped; with them a text token goes through
    their q/o projections and MLP, and their k/v projections run once per vision token."""
    t = cfg.text
    d, f, n, k, h = t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim
    attn = d * (n + 2 * k) * h + n * h * d
    mlp = 3 * d * f
    n_self = len(t.self_attention_layers)
    n_cross = t.num_layers - n_self
    text = n_self * (attn + mlp) + d * t.vocab_size
    vision = 0
    if images and isinstance(cfg, config_lib.MllamaConfig):
        text += n_cross * (d * n * h + n * h * d + mlp)
        v = cfg.vision
        dv = v.hidden_size
        layer = 4 * dv * dv + 2 * dv * v.intermediate_size
        vision = (v.num_layers + v.num_global_layers) * layer
    return text, vision


def forward_flops(
    cfg: config_lib.ModelConfig, *, rows: int, length: int, keys: int | None = None, images: int = 0
) -> float:
    """FLOPs of one forward over [rows, length] tokens attending to `keys` keys each (default: causal
    self-attention over the `length` tokens), with `images` images per row."""
    return sum(_forward_parts(cfg, rows=rows, length=length, keys=keys, images=images))


def decode_flops(cfg: config_lib.ModelConfig, *, rows: int, keys: int, images: int = 0) -> float:
    """FLOPs of one decode step of `rows` rows attending to `keys` cache slots, with `images` images per
    row whose vision side (the tower, the projector, the cross-attention k/v) the prefill computed and
    cached: the new token still goes through the cross-attention layers over their keys."""
    return _forward_parts(cfg, rows=rows, length=1, keys=keys, images=images)[0]


def _forward_parts(
    cfg: config_lib.ModelConfig, *, rows: int, length: int, keys: int | None, images: int
) -> tuple[float, float]:
    """(the text tokens' FLOPs, the vision side's: the tower, the projector and the cross-attention
    k/v projections of the vision tokens)."""
    t = cfg.text
    seen = length / 2 if keys is None else keys  # causal self-attention sees half the square on average
    text_params, vision_params = matmul_params(cfg, images=images > 0)
    tokens = rows * length
    n_self = len(t.self_attention_layers)
    flops = 2.0 * text_params * tokens + 4.0 * n_self * t.num_heads * t.head_dim * seen * tokens
    side = 0.0
    if images and isinstance(cfg, config_lib.MllamaConfig):
        v = cfg.vision
        vision_tokens = rows * images * v.max_num_tiles * v.num_patches
        n_cross = t.num_layers - n_self
        s_x = images * v.max_num_tiles * v.num_patches
        side += (
            2.0 * vision_params * vision_tokens
            + 4.0
            * (v.num_layers + v.num_global_layers)
            * v.hidden_size
            * (v.max_num_tiles * v.num_patches)
            * vision_tokens
        )
        side += 2.0 * 2 * t.hidden_size * t.num_kv_heads * t.head_dim * vision_tokens * n_cross  # cross k/v
        side += 2.0 * v.output_dim * t.hidden_size * vision_tokens  # projector
        flops += 4.0 * n_cross * t.num_heads * t.head_dim * s_x * tokens
    return flops, side


def ideal_train_flops(
    cfg: config_lib.ModelConfig,
    *,
    rows: int,
    length: int,
    images: int = 0,
    remat: bool,
    frozen_base: bool = False,
    vision_trained: bool = True,
) -> float:
    """A training step's FLOPs: forward + backward (3 forwards) + remat's recomputed forward. With
    `frozen_base` (LoRA) the backward runs through the activations only (no weight gradients of the
    base: 2 forwards in all, the adapters' own products left out as negligible at ranks << width);
    and with no adapter on the vision side (`vision_trained=False`) nothing upstream of the vision
    tokens is trained, so the tower, the projector and the cross-attention k/v run forward only."""
    text, side = _forward_parts(cfg, rows=rows, length=length, keys=None, images=images)
    passes = (2.0 if frozen_base else 3.0) + (1.0 if remat else 0.0)
    return passes * text + (passes if vision_trained or not frozen_base else 1.0) * side
