"""An analytic per-device memory figure for a training step, beside XLA's measured one.

Why: XLA:CPU has no reduce-scatter; it reduces every FSDP weight gradient with an all-reduce of the
whole gradient and slices it afterwards, so its buffer assignment holds whole fp32 gradients that a
GPU or TPU (which reduce-scatter each gradient as the backward pass produces it) never holds. The
figure counts what such a device must hold at the step's worst moment:

    arguments (parameters, optimiser state, batch; as measured)
  + the sharded gradient sum (one fp32 copy of the parameters / devices)
  + remat's saved residuals (each layer's input, [rows, T, D] in the compute dtype, per device)
  + the largest layer's working set: its weights all-gathered in the compute dtype (twice: the
    forward and its recomputation overlap with prefetch), its whole fp32 weight gradient before the
    reduce-scatter, and its activations ([rows, T, 4 D + 3 F] in the compute dtype)
  + one chunk of fp32 LM-head logits (the chunked head's budget, 256 MiB, or all of them if fewer)
    x 3 (logits, softmax, gradient)
  + with images: the vision layers' saved inputs ([rows, I x C x P, D_v] per layer, compute dtype)
  (`model.scan_layers` stores the layer stacks stacked: no copy beyond the parameters and gradients)

It is an estimate (no fragmentation, no collective buffers), reported next to the measured peak,
never instead of it.
"""

from __future__ import annotations

import jax.numpy as jnp

from sftrl_jax.models import config as config_lib

LOGIT_CHUNK_BYTES = 256 * 2**20


def layer_params(cfg: config_lib.ModelConfig) -> int:
    """Parameters of the text model's largest layer (a self-attention layer: attention + MLP)."""
    t = cfg.text
    d, f, n, k, h = t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim
    return d * (n + 2 * k) * h + n * h * d + 3 * d * f


def train_step_bytes(
    cfg: config_lib.ModelConfig,
    *,
    argument_bytes: int,
    n_params: int,
    devices: int,
    batch_ways: int,
    rows: int,
    length: int,
    compute_dtype,
    remat: bool,
    images: int = 0,
) -> int | None:
    """The analytic figure of one micro-batch of a training step (None without remat: the saved
    activations of a non-remat backward depend on XLA's choices too much to count by hand)."""
    if not remat:
        return None
    t = cfg.text
    act = jnp.dtype(compute_dtype or jnp.float32).itemsize
    local_rows = max(rows // max(batch_ways, 1), 1)
    grads = 4 * n_params // devices
    residuals = t.num_layers * local_rows * length * t.hidden_size * act
    lp = layer_params(cfg)
    layer = 2 * lp * act + 4 * lp + local_rows * length * (4 * t.hidden_size + 3 * t.intermediate_size) * act
    logits = min(LOGIT_CHUNK_BYTES, local_rows * length * t.vocab_size * 4)  # one chunk, at most all of them
    vision = 0
    if images and isinstance(cfg, config_lib.MllamaConfig):
        v = cfg.vision
        tokens = images * v.max_num_tiles * (-(-v.num_patches // 8) * 8)  # padded to a multiple of 8
        vision = (v.num_layers + v.num_global_layers) * local_rows * tokens * v.hidden_size * act
    return int(argument_bytes + grads + residuals + layer + 3 * logits + vision)
